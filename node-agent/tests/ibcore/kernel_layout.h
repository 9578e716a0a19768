/* ib_core's structures with the field order and sizes of Linux 6.x
 * (include/rdma/ib_verbs.h, abridged: fields the hooks do not read are kept
 * as padding of the right size where they sit between read ones). This is
 * "the kernel" for node-agent/tests/ib_core_bpf.rs: a test library built from
 * it stands in for ib_core, and its BTF (clang -g -target bpf of
 * kernel_btf.c) is the target of the CO-RE relocations. The BPF program's own
 * view (ebpf-probes/bpf/ib_core_types.h) orders and sizes things differently
 * on purpose, so the test fails unless every field is relocated by name. */
#ifndef PM_TEST_KERNEL_LAYOUT_H
#define PM_TEST_KERNEL_LAYOUT_H

typedef unsigned char u8;
typedef unsigned short u16;
typedef unsigned int u32;
typedef unsigned long long u64;

enum ib_qp_state { IB_QPS_RESET, IB_QPS_INIT, IB_QPS_RTR, IB_QPS_RTS, IB_QPS_SQD, IB_QPS_SQE, IB_QPS_ERR };
enum ib_qp_type { IB_QPT_SMI, IB_QPT_GSI, IB_QPT_RC = 2, IB_QPT_UC = 3, IB_QPT_UD = 4 };
enum ib_mtu { IB_MTU_256 = 1, IB_MTU_1024 = 3, IB_MTU_4096 = 5 };
enum ib_mig_state { IB_MIG_MIGRATED };
enum rdma_ah_attr_type { RDMA_AH_ATTR_TYPE_UNDEFINED, RDMA_AH_ATTR_TYPE_IB, RDMA_AH_ATTR_TYPE_ROCE };
enum { IB_QP_STATE = 1, IB_QP_AV = 1 << 7, IB_QP_PATH_MTU = 1 << 8, IB_QP_DEST_QPN = 1 << 20 };

struct ib_device {
	void *dma_device;
	char ops[1024]; /* struct ib_device_ops: function pointers */
	char name[64];
	void *port_data;
};

struct ib_uqp_object {
	u64 id;
};

struct ib_qp {
	struct ib_device *device;
	void *pd;
	void *send_cq;
	void *recv_cq;
	u64 mr_lock;
	int mrs_used;
	char rdma_mrs[16];
	char sig_mrs[16];
	void *srq;
	void *xrcd;
	char xrcd_list[16];
	int usecnt;
	char open_list[16];
	struct ib_qp *real_qp;
	struct ib_uqp_object *uobject;
	void (*event_handler)(void *, void *);
	void *qp_context;
	const void *av_sgid_attr;
	const void *alt_path_sgid_attr;
	u32 qp_num;
	u32 max_write_sge;
	u32 max_read_sge;
	enum ib_qp_type qp_type;
	void *rwq_ind_tbl;
	void *qp_sec;
	u32 port;
	u8 integrity_en;
};

union ib_gid {
	u8 raw[16];
	struct {
		u64 subnet_prefix;
		u64 interface_id;
	} global;
};

struct ib_global_route {
	const void *sgid_attr;
	union ib_gid dgid;
	u32 flow_label;
	u8 sgid_index;
	u8 hop_limit;
	u8 traffic_class;
};

struct rdma_ah_attr {
	struct ib_global_route grh;
	u8 sl;
	u8 static_rate;
	u32 port_num;
	u8 ah_flags;
	enum rdma_ah_attr_type type;
	union {
		struct { u8 dmac[6]; } roce;
		struct { u16 dlid; u8 src_path_bits; } ib;
	};
};

struct ib_qp_cap {
	u32 max_send_wr;
	u32 max_recv_wr;
	u32 max_send_sge;
	u32 max_recv_sge;
	u32 max_inline_data;
	u32 max_rdma_ctxs;
};

struct ib_qp_attr {
	enum ib_qp_state qp_state;
	enum ib_qp_state cur_qp_state;
	enum ib_mtu path_mtu;
	enum ib_mig_state path_mig_state;
	u32 qkey;
	u32 rq_psn;
	u32 sq_psn;
	u32 dest_qp_num;
	int qp_access_flags;
	struct ib_qp_cap cap;
	struct rdma_ah_attr ah_attr;
	struct rdma_ah_attr alt_ah_attr;
	u16 pkey_index;
	u32 port_num;
};

#endif
