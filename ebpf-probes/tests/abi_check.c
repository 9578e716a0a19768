/* Checks bpf/ibverbs_abi.h against the real <infiniband/verbs.h>: every field
 * the uprobes read must sit at the same offset. Compiled (syntax only) by
 * tests/abi.rs. */
#include <stddef.h>
#include <infiniband/verbs.h>
#include "ibverbs_abi.h"

#define SAME(pm, real, field) \
	_Static_assert(offsetof(struct pm, field) == offsetof(struct real, field), #real "." #field)

SAME(pm_ibv_qp, ibv_qp, context);
SAME(pm_ibv_context, ibv_context, device);
_Static_assert(offsetof(struct ibv_device, name) == PM_IBV_DEVICE_NAME_OFFSET, "ibv_device.name");
SAME(pm_ibv_qp, ibv_qp, qp_num);
SAME(pm_ibv_qp, ibv_qp, qp_type);
SAME(pm_ibv_qp_attr, ibv_qp_attr, qp_state);
SAME(pm_ibv_qp_attr, ibv_qp_attr, dest_qp_num);
SAME(pm_ibv_qp_attr, ibv_qp_attr, ah_attr);
SAME(pm_ibv_qp_attr, ibv_qp_attr, ah_attr.grh.dgid);
SAME(pm_ibv_qp_attr, ibv_qp_attr, ah_attr.grh.flow_label);
SAME(pm_ibv_qp_attr, ibv_qp_attr, ah_attr.grh.sgid_index);
SAME(pm_ibv_qp_attr, ibv_qp_attr, ah_attr.grh.hop_limit);
SAME(pm_ibv_qp_attr, ibv_qp_attr, ah_attr.grh.traffic_class);
SAME(pm_ibv_qp_attr, ibv_qp_attr, ah_attr.port_num);
_Static_assert(sizeof(struct pm_ibv_ah_attr) == sizeof(struct ibv_ah_attr), "ibv_ah_attr size");
_Static_assert(PM_IBV_QPS_RTR == IBV_QPS_RTR, "IBV_QPS_RTR");
_Static_assert(PM_IBV_QP_STATE == IBV_QP_STATE, "IBV_QP_STATE");
_Static_assert(PM_IBV_QP_AV == IBV_QP_AV, "IBV_QP_AV");
_Static_assert(PM_IBV_QP_DEST_QPN == IBV_QP_DEST_QPN, "IBV_QP_DEST_QPN");
