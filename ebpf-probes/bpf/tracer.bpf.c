// SPDX-License-Identifier: GPL-2.0 OR Apache-2.0
/* PingMesh service tracing: which TCP connections and RDMA queue pairs the
 * node's services open and close. Every record goes into one ring buffer,
 * EVENTS, read by the agent (node-agent/src/tracer); records that find it
 * full are counted in LOST (maps.h). */
#include "kernel_types.h"
#include <bpf/bpf_helpers.h>
#include <bpf/bpf_tracing.h>

#include "events.h"
#include "ibverbs_abi.h"

#define AF_INET 2
#define AF_INET6 10
#define IPPROTO_TCP 6
#define TCP_ESTABLISHED 1
#define TCP_CLOSE 7
#define TCP_LISTEN 10

char LICENSE[] SEC("license") = "Dual BSD/GPL";

#define PM_EVENTS_BYTES (1 << 20)
#include "maps.h"

static __always_inline __u32 sock_netns(const void *skaddr)
{
	const struct sock *sk = skaddr;
	struct net *net = 0;
	__u32 inum = 0;
	if (bpf_probe_read_kernel(&net, sizeof(net), &sk->__sk_common.skc_net.net) || !net)
		return 0;
	bpf_probe_read_kernel(&inum, sizeof(inum), &net->ns.inum);
	return inum;
}

/* Connections coming up (-> ESTABLISHED), going down (ESTABLISHED -> any),
 * ending (-> CLOSE), and listening sockets opening and closing (-> LISTEN,
 * LISTEN -> CLOSE: listen() and close() run in the server's context, so they
 * name the owner of the connections the listener later accepts). Handshake
 * states are left out. The pid is the task the kernel runs the transition
 * on: the process itself for its own connect/listen/close, and for
 * transitions in softirq context (a passive open completing, a peer's FIN)
 * whatever process was interrupted (see docs/tracing.md). */
SEC("tracepoint/sock/inet_sock_set_state")
int pingmesh_tcp_state(struct trace_event_raw_inet_sock_set_state *ctx)
{
	if (ctx->protocol != IPPROTO_TCP)
		return 0;
	int oldstate = ctx->oldstate;
	int newstate = ctx->newstate;
	bool up = newstate == TCP_ESTABLISHED;
	bool down = oldstate == TCP_ESTABLISHED;
	bool closed = newstate == TCP_CLOSE;
	bool listen = newstate == TCP_LISTEN;
	if (!up && !down && !closed && !listen)
		return 0;

	struct pm_tcp_event *e = pm_reserve(sizeof(*e));
	if (!e)
		return 0;
	fill_header(&e->hdr, PM_EVENT_TCP_STATE);
	e->sock = (__u64)ctx->skaddr;
	e->family = ctx->family;
	e->sport = ctx->sport;
	e->dport = ctx->dport;
	e->oldstate = oldstate;
	e->newstate = newstate;
	e->netns = sock_netns(ctx->skaddr);
	e->_pad = 0;
	__builtin_memset(e->saddr, 0, sizeof(e->saddr));
	__builtin_memset(e->daddr, 0, sizeof(e->daddr));
	if (e->family == AF_INET6) {
		bpf_probe_read_kernel(e->saddr, 16, ctx->saddr_v6);
		bpf_probe_read_kernel(e->daddr, 16, ctx->daddr_v6);
	} else {
		bpf_probe_read_kernel(e->saddr, 4, ctx->saddr);
		bpf_probe_read_kernel(e->daddr, 4, ctx->daddr);
	}
	bpf_ringbuf_submit(e, 0);
	return 0;
}

/* int ibv_modify_qp(struct ibv_qp *qp, struct ibv_qp_attr *attr, int attr_mask)
 * A connected QP learns its peer on the move to RTR (Ready To Receive). */
/* BPF_KPROBE: the argument-reading wrapper, the same for uprobes (older
 * libbpf headers have no BPF_UPROBE). */
SEC("uprobe/ibv_modify_qp")
int BPF_KPROBE(pingmesh_ibv_modify_qp, struct pm_ibv_qp *qp, struct pm_ibv_qp_attr *attr,
	       int attr_mask)
{
	if (!(attr_mask & PM_IBV_QP_STATE))
		return 0;
	__u32 state = 0;
	if (bpf_probe_read_user(&state, sizeof(state), &attr->qp_state))
		return 0;
	if (state != PM_IBV_QPS_RTR)
		return 0;

	struct pm_qp_rtr_event *e = pm_reserve(sizeof(*e));
	if (!e)
		return 0;
	fill_header(&e->hdr, PM_EVENT_QP_RTR);
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
	bpf_probe_read_user(&e->qp_num, sizeof(e->qp_num), &qp->qp_num);
	bpf_probe_read_user(&e->qp_type, sizeof(e->qp_type), &qp->qp_type);
	bpf_probe_read_user(&e->dest_qp_num, sizeof(e->dest_qp_num), &attr->dest_qp_num);
	bpf_probe_read_user(e->dgid, sizeof(e->dgid), &attr->ah_attr.grh.dgid);
	bpf_probe_read_user(&e->flow_label, sizeof(e->flow_label), &attr->ah_attr.grh.flow_label);
	bpf_probe_read_user(&e->sgid_index, 1, &attr->ah_attr.grh.sgid_index);
	bpf_probe_read_user(&e->hop_limit, 1, &attr->ah_attr.grh.hop_limit);
	bpf_probe_read_user(&e->traffic_class, 1, &attr->ah_attr.grh.traffic_class);
	bpf_probe_read_user(&e->port_num, 1, &attr->ah_attr.port_num);
	e->device[0] = 0;
	__u64 context = 0, device = 0;
	if (!bpf_probe_read_user(&context, sizeof(context), &qp->context) && context &&
	    !bpf_probe_read_user(&device, sizeof(device),
				 &((struct pm_ibv_context *)context)->device) &&
	    device)
		bpf_probe_read_user_str(e->device, sizeof(e->device),
					(void *)(device + PM_IBV_DEVICE_NAME_OFFSET));
	bpf_ringbuf_submit(e, 0);
	return 0;
}

/* int ibv_destroy_qp(struct ibv_qp *qp) */
SEC("uprobe/ibv_destroy_qp")
int BPF_KPROBE(pingmesh_ibv_destroy_qp, struct pm_ibv_qp *qp)
{
	struct pm_qp_destroy_event *e = pm_reserve(sizeof(*e));
	if (!e)
		return 0;
	fill_header(&e->hdr, PM_EVENT_QP_DESTROY);
	e->qp_num = 0;
	e->_pad = 0;
	bpf_probe_read_user(&e->qp_num, sizeof(e->qp_num), &qp->qp_num);
	bpf_ringbuf_submit(e, 0);
	return 0;
}
