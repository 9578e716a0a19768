/* libibverbs' ABI, as far as the uprobes read it: the prefix of struct ibv_qp
 * up to qp_num and of struct ibv_qp_attr up to alt_ah_attr, with the exact
 * field types and order of <infiniband/verbs.h> (rdma-core, LP64). These are
 * user-space structures, absent from kernel BTF, so they are read with
 * bpf_probe_read_user at these fixed offsets. The test library build checks
 * every offset against the real verbs.h with _Static_assert
 * (tests/abi_check.c). */
#ifndef PINGMESH_IBVERBS_ABI_H
#define PINGMESH_IBVERBS_ABI_H

/* enum ibv_qp_state: RESET, INIT, RTR, RTS, SQD, SQE, ERR, UNKNOWN. RTR is 2;
 * 3 is RTS (comparing against 3 misses every connection setup). */
#define PM_IBV_QPS_RTR 2
/* enum ibv_qp_attr_mask */
#define PM_IBV_QP_STATE (1 << 0)
#define PM_IBV_QP_AV (1 << 7)
#define PM_IBV_QP_DEST_QPN (1 << 20)

/* struct ibv_device: the device name follows the two ops pointers and two
 * enums (node_type, transport_type). */
#define PM_IBV_DEVICE_NAME_OFFSET 24

/* struct ibv_context starts with the device pointer. */
struct pm_ibv_context {
	__u64 device;
};

struct pm_ibv_qp {
	__u64 context;
	__u64 qp_context;
	__u64 pd;
	__u64 send_cq;
	__u64 recv_cq;
	__u64 srq;
	__u32 handle;
	__u32 qp_num;
	__u32 state;
	__u32 qp_type;
};

union pm_ibv_gid {
	__u8 raw[16];
	struct {
		__u64 subnet_prefix;
		__u64 interface_id;
	} global;
};

struct pm_ibv_global_route {
	union pm_ibv_gid dgid;
	__u32 flow_label;
	__u8 sgid_index;
	__u8 hop_limit;
	__u8 traffic_class;
};

struct pm_ibv_ah_attr {
	struct pm_ibv_global_route grh;
	__u16 dlid;
	__u8 sl;
	__u8 src_path_bits;
	__u8 static_rate;
	__u8 is_global;
	__u8 port_num;
};

struct pm_ibv_qp_cap {
	__u32 max_send_wr;
	__u32 max_recv_wr;
	__u32 max_send_sge;
	__u32 max_recv_sge;
	__u32 max_inline_data;
};

struct pm_ibv_qp_attr {
	__u32 qp_state;
	__u32 cur_qp_state;
	__u32 path_mtu;
	__u32 path_mig_state;
	__u32 qkey;
	__u32 rq_psn;
	__u32 sq_psn;
	__u32 dest_qp_num;
	__u32 qp_access_flags;
	struct pm_ibv_qp_cap cap;
	struct pm_ibv_ah_attr ah_attr;
	struct pm_ibv_ah_attr alt_ah_attr;
};

#endif
