/* Records the BPF programs write into the EVENTS ring buffer. The Rust mirror
 * is ebpf-probes/src/lib.rs; both sides assert the sizes and offsets. All
 * integers are in host byte order except the addresses and GIDs, which are
 * copied as the kernel / libibverbs hold them (network order). */
#ifndef PINGMESH_EVENTS_H
#define PINGMESH_EVENTS_H

#define PM_EVENT_TCP_STATE 1
#define PM_EVENT_QP_RTR 2
#define PM_EVENT_QP_DESTROY 3

#define PM_COMM_LEN 16
#define PM_DEVICE_LEN 16

struct pm_event_header {
	__u32 kind;
	__u32 pid; /* thread-group id (the process) */
	__u64 cgroup_id;
	__u64 ts_ns; /* bpf_ktime_get_ns, CLOCK_MONOTONIC */
	char comm[PM_COMM_LEN];
};

struct pm_tcp_event {
	struct pm_event_header hdr;
	__u64 sock; /* the socket's kernel address: pairs up a flow's events */
	__u8 saddr[16]; /* IPv4 in the first 4 bytes when family is AF_INET */
	__u8 daddr[16];
	__u16 family;
	__u16 sport;
	__u16 dport;
	__u8 oldstate;
	__u8 newstate;
	__u32 netns; /* inode of the socket's network namespace */
	__u32 _pad;
};

struct pm_qp_rtr_event {
	struct pm_event_header hdr;
	__u32 qp_num;
	__u32 dest_qp_num;
	__u8 dgid[16];
	__u32 flow_label;
	__u32 attr_mask;
	__u8 sgid_index;
	__u8 port_num;
	__u8 traffic_class;
	__u8 hop_limit;
	__u32 qp_type;
	char device[PM_DEVICE_LEN]; /* qp->context->device->name, NUL-terminated */
};

struct pm_qp_destroy_event {
	struct pm_event_header hdr;
	__u32 qp_num;
	__u32 _pad;
};

_Static_assert(sizeof(struct pm_event_header) == 40, "header size");
_Static_assert(sizeof(struct pm_tcp_event) == 96, "tcp event size");
_Static_assert(sizeof(struct pm_qp_rtr_event) == 96, "qp rtr event size");
_Static_assert(sizeof(struct pm_qp_destroy_event) == 48, "qp destroy event size");

#endif
