/* A stand-in for ib_core in user space: exports ib_modify_qp,
 * ib_modify_qp_with_udata and ib_destroy_qp_user with the kernel's
 * prototypes and kernel_layout.h's structures, plus pm_run_scenario, which
 * plays a kernel consumer and a uverbs user setting up and tearing down QPs.
 * node-agent/tests/ib_core_bpf.rs builds it (cc -shared -O0), attaches the
 * user-memory build of ebpf-probes/bpf/ib_core.bpf.c to it as uprobes, and
 * calls pm_run_scenario through dlopen.
 *
 * Calls, in order (the test checks which are traced):
 *   kernel QP 0x111 on rxe0: ib_modify_qp INIT (not traced), RTR (traced,
 *     pid 0), RTS (not traced)
 *   user QP 0x333 on mlx5_3: ib_modify_qp_with_udata RTR (traced, the pid)
 *   kernel QP 0x444: ib_modify_qp with qp_state RTR but no IB_QP_STATE in
 *     the mask (not traced)
 *   ib_destroy_qp_user 0x111 (traced, pid 0), 0x333 (traced, the pid) */
#include <string.h>

#include "kernel_layout.h"

__attribute__((noinline)) int ib_modify_qp_with_udata(struct ib_qp *qp, struct ib_qp_attr *attr,
						      int attr_mask, void *udata)
{
	if (!qp || !attr || !attr_mask)
		return -22;
	return udata ? 0 : 1;
}

__attribute__((noinline)) int ib_modify_qp(struct ib_qp *qp, struct ib_qp_attr *attr, int attr_mask)
{
	if (!qp || !attr || !attr_mask)
		return -22;
	return 0;
}

__attribute__((noinline)) int ib_destroy_qp_user(struct ib_qp *qp, void *udata)
{
	(void)udata;
	return qp ? 0 : -22;
}

static void rtr(struct ib_qp_attr *attr, u32 dest, u8 last_gid_byte, u32 flow_label)
{
	memset(attr, 0, sizeof(*attr));
	attr->qp_state = IB_QPS_RTR;
	attr->path_mtu = IB_MTU_1024;
	attr->dest_qp_num = dest;
	/* ::ffff:10.0.0.x, a RoCE v2 GID */
	attr->ah_attr.grh.dgid.raw[10] = 0xff;
	attr->ah_attr.grh.dgid.raw[11] = 0xff;
	attr->ah_attr.grh.dgid.raw[12] = 10;
	attr->ah_attr.grh.dgid.raw[15] = last_gid_byte;
	attr->ah_attr.grh.flow_label = flow_label;
	attr->ah_attr.grh.sgid_index = 3;
	attr->ah_attr.grh.hop_limit = 64;
	attr->ah_attr.grh.traffic_class = 106;
	attr->ah_attr.port_num = 1;
	attr->ah_attr.type = RDMA_AH_ATTR_TYPE_ROCE;
	attr->port_num = 9; /* a different field with the same name: not read */
}

int pm_run_scenario(void)
{
	static struct ib_device rxe, mlx;
	static struct ib_uqp_object uobject = { 7 };
	static struct ib_qp kqp, uqp, other;
	struct ib_qp_attr attr;
	int rc = 0;

	memset(&rxe, 0, sizeof(rxe));
	strcpy(rxe.name, "rxe0");
	memset(&mlx, 0, sizeof(mlx));
	strcpy(mlx.name, "mlx5_3");

	memset(&kqp, 0, sizeof(kqp));
	kqp.device = &rxe;
	kqp.qp_num = 0x111;
	kqp.qp_type = IB_QPT_RC;
	kqp.port = 2;

	memset(&uqp, 0, sizeof(uqp));
	uqp.device = &mlx;
	uqp.uobject = &uobject;
	uqp.qp_num = 0x333;
	uqp.qp_type = IB_QPT_UC;

	memset(&other, 0, sizeof(other));
	other.device = &rxe;
	other.qp_num = 0x444;

	memset(&attr, 0, sizeof(attr));
	attr.qp_state = IB_QPS_INIT;
	rc |= ib_modify_qp(&kqp, &attr, IB_QP_STATE);
	rtr(&attr, 0x222, 2, 0xabcde);
	rc |= ib_modify_qp(&kqp, &attr, IB_QP_STATE | IB_QP_AV | IB_QP_PATH_MTU | IB_QP_DEST_QPN);
	memset(&attr, 0, sizeof(attr));
	attr.qp_state = IB_QPS_RTS;
	rc |= ib_modify_qp(&kqp, &attr, IB_QP_STATE);

	rtr(&attr, 0x555, 5, 0x12345);
	rc |= ib_modify_qp_with_udata(&uqp, &attr, IB_QP_STATE | IB_QP_AV | IB_QP_DEST_QPN, &uobject) != 0;

	rtr(&attr, 0x666, 6, 0x1);
	rc |= ib_modify_qp(&other, &attr, IB_QP_AV | IB_QP_DEST_QPN);

	rc |= ib_destroy_qp_user(&kqp, 0);
	rc |= ib_destroy_qp_user(&uqp, &uobject);
	return rc;
}
