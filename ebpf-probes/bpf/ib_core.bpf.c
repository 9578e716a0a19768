// SPDX-License-Identifier: GPL-2.0 OR Apache-2.0
/* PingMesh kernel RDMA hooks: ib_core's modify-QP and destroy-QP paths. They
 * see every queue pair on the node, including those of kernel consumers
 * (NVMe-oF, RDS, SMB Direct, iSER) that never go through libibverbs, and they
 * write the same records as the libibverbs uprobes (events.h).
 *
 * A separate object from tracer.bpf.c: its CO-RE relocations need ib_core's
 * BTF, and a kernel without it (no RDMA stack, ib_core not loaded) must not
 * break the main object's load. The agent loads it after the main object
 * (node-agent/src/tracer/ib_core.rs) and attaches, in this order:
 *
 * - fentry on ib_modify_qp, ib_modify_qp_with_udata and ib_destroy_qp_user
 *   (only where ib_core is built into the kernel: see ib_core.rs);
 * - kprobes on the same three functions.
 *
 * Kernel consumers call ib_modify_qp (EXPORT_SYMBOL, verbs.c); uverbs calls
 * ib_modify_qp_with_udata; both end in the static _ib_modify_qp, whose name
 * the compiler may change, so the two exported entry points are hooked.
 * ib_destroy_qp() is an inline wrapper of ib_destroy_qp_user (both paths).
 *
 * Built with PM_IB_CORE_USER_SELFTEST, the same programs read user memory and
 * are uprobes: node-agent/tests/ib_core_bpf.rs runs them on a test library
 * whose structures have a kernel's layout, where kprobes are unavailable. */
#include "kernel_types.h"
#include <bpf/bpf_helpers.h>
#include <bpf/bpf_tracing.h>

#include "events.h"
#include "ib_core_types.h"

#define PM_EVENTS_BYTES (1 << 18)
#include "maps.h"

char LICENSE[] SEC("license") = "Dual BSD/GPL";

#ifdef PM_IB_CORE_USER_SELFTEST
#define pm_read bpf_probe_read_user
#define pm_read_str bpf_probe_read_user_str
#define PM_SEC_MODIFY "uprobe/ib_modify_qp"
#define PM_SEC_DESTROY "uprobe/ib_destroy_qp_user"
#else
#define pm_read bpf_probe_read_kernel
#define pm_read_str bpf_probe_read_kernel_str
#define PM_SEC_MODIFY "kprobe/ib_modify_qp"
#define PM_SEC_DESTROY "kprobe/ib_destroy_qp_user"
#endif

/* A kernel consumer's QP is not owned by the task that happens to run the
 * call (a kworker, an rdma_cm handler): its records carry pid 0 so that the
 * modify and the destroy, often on different threads, name the same flow. */
static __always_inline void set_owner(struct pm_event_header *hdr, struct ib_qp *qp)
{
	struct ib_uqp_object *uobject = 0;
	if (pm_read(&uobject, sizeof(uobject), &qp->uobject) || !uobject) {
		hdr->pid = 0;
		hdr->cgroup_id = 0;
	}
}

static __always_inline int on_modify(struct ib_qp *qp, struct ib_qp_attr *attr, int attr_mask)
{
	if (!(attr_mask & PM_IB_QP_STATE))
		return 0;
	__u32 state = 0;
	if (pm_read(&state, sizeof(state), &attr->qp_state))
		return 0;
	if (state != PM_IB_QPS_RTR)
		return 0;

	struct pm_qp_rtr_event *e = pm_reserve(sizeof(*e));
	if (!e)
		return 0;
	fill_header(&e->hdr, PM_EVENT_QP_RTR);
	set_owner(&e->hdr, qp);
	e->attr_mask = attr_mask;
	e->qp_num = 0;
	e->qp_type = 0;
	e->dest_qp_num = 0;
	e->flow_label = 0;
	e->sgid_index = 0;
	e->port_num = 0;
	e->traffic_class = 0;
	e->hop_limit = 0;
	__builtin_memset(e->dgid, 0, sizeof(e->dgid));
	pm_read(&e->qp_num, sizeof(e->qp_num), &qp->qp_num);
	pm_read(&e->qp_type, sizeof(e->qp_type), &qp->qp_type);
	pm_read(&e->dest_qp_num, sizeof(e->dest_qp_num), &attr->dest_qp_num);
	pm_read(e->dgid, sizeof(e->dgid), &attr->ah_attr.grh.dgid);
	pm_read(&e->flow_label, sizeof(e->flow_label), &attr->ah_attr.grh.flow_label);
	pm_read(&e->sgid_index, 1, &attr->ah_attr.grh.sgid_index);
	pm_read(&e->hop_limit, 1, &attr->ah_attr.grh.hop_limit);
	pm_read(&e->traffic_class, 1, &attr->ah_attr.grh.traffic_class);
	/* u8 before 5.14, u32 since: the first byte on little-endian targets. */
	pm_read(&e->port_num, 1, &attr->ah_attr.port_num);
	e->device[0] = 0;
	struct ib_device *device = 0;
	if (!pm_read(&device, sizeof(device), &qp->device) && device)
		pm_read_str(e->device, sizeof(e->device), &device->name);
	bpf_ringbuf_submit(e, 0);
	return 0;
}

static __always_inline int on_destroy(struct ib_qp *qp)
{
	struct pm_qp_destroy_event *e = pm_reserve(sizeof(*e));
	if (!e)
		return 0;
	fill_header(&e->hdr, PM_EVENT_QP_DESTROY);
	set_owner(&e->hdr, qp);
	e->qp_num = 0;
	e->_pad = 0;
	pm_read(&e->qp_num, sizeof(e->qp_num), &qp->qp_num);
	bpf_ringbuf_submit(e, 0);
	return 0;
}

/* int ib_modify_qp(struct ib_qp *qp, struct ib_qp_attr *qp_attr, int qp_attr_mask)
 * int ib_modify_qp_with_udata(struct ib_qp *ib_qp, struct ib_qp_attr *attr,
 *                             int attr_mask, struct ib_udata *udata)
 * The same leading arguments: one kprobe program serves both. */
SEC(PM_SEC_MODIFY)
int BPF_KPROBE(pingmesh_kprobe_ib_modify_qp, struct ib_qp *qp, struct ib_qp_attr *attr,
	       int attr_mask)
{
	return on_modify(qp, attr, attr_mask);
}

/* int ib_destroy_qp_user(struct ib_qp *qp, struct ib_udata *udata) */
SEC(PM_SEC_DESTROY)
int BPF_KPROBE(pingmesh_kprobe_ib_destroy_qp_user, struct ib_qp *qp)
{
	return on_destroy(qp);
}

#ifndef PM_IB_CORE_USER_SELFTEST
/* fentry programs are bound to one function each at load time. */
SEC("fentry/ib_modify_qp")
int BPF_PROG(pingmesh_fentry_ib_modify_qp, struct ib_qp *qp, struct ib_qp_attr *attr,
	     int attr_mask)
{
	return on_modify(qp, attr, attr_mask);
}

SEC("fentry/ib_modify_qp_with_udata")
int BPF_PROG(pingmesh_fentry_ib_modify_qp_with_udata, struct ib_qp *qp, struct ib_qp_attr *attr,
	     int attr_mask)
{
	return on_modify(qp, attr, attr_mask);
}

SEC("fentry/ib_destroy_qp_user")
int BPF_PROG(pingmesh_fentry_ib_destroy_qp_user, struct ib_qp *qp)
{
	return on_destroy(qp);
}
#endif
