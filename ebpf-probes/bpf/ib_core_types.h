/* The parts of ib_core's structures (include/rdma/ib_verbs.h) that the
 * kernel RDMA hooks read. Only field names and types matter: every access is
 * relocated (CO-RE) against the running kernel's BTF, which for ib_core is the
 * module's split BTF at /sys/kernel/btf/ib_core (merged with vmlinux's by the
 * agent) or vmlinux's own when ib_core is built in. The order and the absent
 * fields here are deliberately not the kernel's.
 *
 * Checked against 5.15 and 6.x: the names used here are the same in all of
 * them. rdma_ah_attr.port_num was a u8 before 5.14 and is a u32 since; the
 * program reads its first byte, which is the value on the little-endian
 * targets built (x86_64, aarch64) since port numbers are below 256. */
#ifndef PINGMESH_IB_CORE_TYPES_H
#define PINGMESH_IB_CORE_TYPES_H

/* enum ib_qp_state: RESET, INIT, RTR, RTS, ... (the same numbers as verbs). */
#define PM_IB_QPS_RTR 2
/* enum ib_qp_attr_mask */
#define PM_IB_QP_STATE (1 << 0)

#pragma clang attribute push(__attribute__((preserve_access_index)), apply_to = record)

struct ib_device {
	char name[64]; /* IB_DEVICE_NAME_MAX */
};

struct ib_uqp_object;

enum ib_qp_type {
	IB_QPT_SMI,
};

struct ib_qp {
	struct ib_device *device;
	/* NULL for a QP a kernel consumer created (NVMe-oF, RDS, SMB Direct,
	 * iSER...), set for one created through uverbs by a process. */
	struct ib_uqp_object *uobject;
	__u32 qp_num;
	enum ib_qp_type qp_type;
};

union ib_gid {
	__u8 raw[16];
	struct {
		__u64 subnet_prefix;
		__u64 interface_id;
	} global;
};

struct ib_global_route {
	union ib_gid dgid;
	__u32 flow_label;
	__u8 sgid_index;
	__u8 hop_limit;
	__u8 traffic_class;
};

struct rdma_ah_attr {
	struct ib_global_route grh;
	__u32 port_num;
};

enum ib_qp_state {
	IB_QPS_RESET,
};

struct ib_qp_attr {
	enum ib_qp_state qp_state;
	__u32 dest_qp_num;
	struct rdma_ah_attr ah_attr;
};

#pragma clang attribute pop

#endif
