/* A stand-in for libibverbs with its ABI: exports ibv_modify_qp and
 * ibv_destroy_qp with the prototypes of the real <infiniband/verbs.h>, so the
 * tracer's uprobes can be tested without an RDMA device. Built at test time
 * (tests/tracer_bpf.rs) as libibverbs.so.1. */
#include <infiniband/verbs.h>

int ibv_modify_qp(struct ibv_qp *qp, struct ibv_qp_attr *attr, int attr_mask)
{
	if (!qp || !attr || !attr_mask)
		return -1;
	qp->state = attr->qp_state;
	return 0;
}

int ibv_destroy_qp(struct ibv_qp *qp)
{
	return qp ? 0 : -1;
}
