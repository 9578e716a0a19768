/* A "service" that sets up and tears down queue pairs through the fake
 * libibverbs, with structures built from the real <infiniband/verbs.h>.
 * With --wait it prints "ready" and waits for a line on stdin first (so the
 * test can find it in /proc and attach before the calls); with --hold it
 * prints "connected" and waits for another line before the destroy (so the
 * test can see the connection in the agent's flow table).
 *
 * Calls, in order (tests/tracer_bpf.rs checks which are traced):
 *   QP 0x1234 (device mlx5_7): INIT (not traced), RTR (traced), RTS (not traced)
 *   QP 0x2222: mask without IBV_QP_STATE but qp_state RTR (not traced)
 *   QP 0x1234: destroy (traced) */
#include <infiniband/verbs.h>
#include <stdio.h>
#include <string.h>

static int wait_for_line(const char *say)
{
	char line[16];
	printf("%s\n", say);
	fflush(stdout);
	return fgets(line, sizeof(line), stdin) ? 0 : -1;
}

int main(int argc, char **argv)
{
	int wait = 0, hold = 0;
	for (int i = 1; i < argc; i++) {
		wait |= strcmp(argv[i], "--wait") == 0;
		hold |= strcmp(argv[i], "--hold") == 0;
	}
	if (wait && wait_for_line("ready"))
		return 2;
	/* The device the QP belongs to: the tracer reads its name through
	 * qp->context->device. */
	struct ibv_device device;
	memset(&device, 0, sizeof(device));
	strcpy(device.name, "mlx5_7");
	struct ibv_context context;
	memset(&context, 0, sizeof(context));
	context.device = &device;

	struct ibv_qp qp;
	memset(&qp, 0, sizeof(qp));
	qp.context = &context;
	qp.qp_num = 0x1234;
	qp.qp_type = IBV_QPT_RC;

	struct ibv_qp_attr attr;
	memset(&attr, 0, sizeof(attr));
	attr.qp_state = IBV_QPS_INIT;
	attr.port_num = 1;
	if (ibv_modify_qp(&qp, &attr, IBV_QP_STATE | IBV_QP_PKEY_INDEX | IBV_QP_PORT | IBV_QP_ACCESS_FLAGS))
		return 3;

	memset(&attr, 0, sizeof(attr));
	attr.qp_state = IBV_QPS_RTR;
	attr.path_mtu = IBV_MTU_1024;
	attr.dest_qp_num = 0x5678;
	attr.rq_psn = 7;
	attr.ah_attr.is_global = 1;
	attr.ah_attr.port_num = 1;
	static const unsigned char dgid[16] = {0xfe, 0x80, 0, 0, 0, 0, 0, 0,
					       0x02, 0x11, 0x22, 0xff, 0xfe, 0x33, 0x44, 0x55};
	memcpy(attr.ah_attr.grh.dgid.raw, dgid, sizeof(dgid));
	attr.ah_attr.grh.flow_label = 0xabcde;
	attr.ah_attr.grh.sgid_index = 3;
	attr.ah_attr.grh.hop_limit = 64;
	attr.ah_attr.grh.traffic_class = 106;
	if (ibv_modify_qp(&qp, &attr, IBV_QP_STATE | IBV_QP_AV | IBV_QP_PATH_MTU | IBV_QP_DEST_QPN |
					      IBV_QP_RQ_PSN | IBV_QP_MAX_DEST_RD_ATOMIC |
					      IBV_QP_MIN_RNR_TIMER))
		return 4;

	attr.qp_state = IBV_QPS_RTS;
	attr.dest_qp_num = 0x9999;
	if (ibv_modify_qp(&qp, &attr, IBV_QP_STATE | IBV_QP_SQ_PSN | IBV_QP_TIMEOUT))
		return 5;

	struct ibv_qp other;
	memset(&other, 0, sizeof(other));
	other.qp_num = 0x2222;
	attr.qp_state = IBV_QPS_RTR;
	if (ibv_modify_qp(&other, &attr, IBV_QP_AV))
		return 6;

	if (hold && wait_for_line("connected"))
		return 8;
	if (ibv_destroy_qp(&qp))
		return 7;
	return 0;
}
