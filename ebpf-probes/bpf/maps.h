/* The two maps every PingMesh BPF object has, and the record helpers around
 * them. Each object (tracer.bpf.c, ib_core.bpf.c) gets its own copy: the
 * agent reads both.
 *
 * EVENTS: the ring buffer the records go to.
 * LOST:   records that could not be written because EVENTS was full (the
 *         agent stops consuming, or a burst outruns it). One counter per CPU,
 *         so no atomic is needed; the agent sums them
 *         (pingmesh_tracer_events_lost_total). */
#ifndef PINGMESH_MAPS_H
#define PINGMESH_MAPS_H

struct {
	__uint(type, BPF_MAP_TYPE_RINGBUF);
	__uint(max_entries, PM_EVENTS_BYTES);
} EVENTS SEC(".maps");

struct {
	__uint(type, BPF_MAP_TYPE_PERCPU_ARRAY);
	__uint(max_entries, 1);
	__type(key, __u32);
	__type(value, __u64);
} LOST SEC(".maps");

/* bpf_ringbuf_reserve, counting a failure in LOST. */
static __always_inline void *pm_reserve(__u64 size)
{
	void *record = bpf_ringbuf_reserve(&EVENTS, size, 0);
	if (!record) {
		__u32 key = 0;
		__u64 *lost = bpf_map_lookup_elem(&LOST, &key);
		if (lost)
			*lost += 1;
	}
	return record;
}

static __always_inline void fill_header(struct pm_event_header *hdr, __u32 kind)
{
	hdr->kind = kind;
	hdr->pid = bpf_get_current_pid_tgid() >> 32;
	hdr->cgroup_id = bpf_get_current_cgroup_id();
	hdr->ts_ns = bpf_ktime_get_ns();
	bpf_get_current_comm(hdr->comm, sizeof(hdr->comm));
}

#endif
