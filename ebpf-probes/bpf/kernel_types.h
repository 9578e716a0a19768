/* The few kernel types the BPF programs use, in place of a full vmlinux.h.
 *
 * Checked in on purpose: generating vmlinux.h needs bpftool and the build
 * machine's /sys/kernel/btf/vmlinux, which container image builds and CI
 * runners do not always have, and the programs only touch a handful of
 * structures. The structures carry preserve_access_index, so the offsets here
 * are only a starting point: at load time the loader relocates every field
 * access against the running kernel's BTF (CO-RE), by field name.
 */
#ifndef PINGMESH_KERNEL_TYPES_H
#define PINGMESH_KERNEL_TYPES_H

/* bpf_tracing.h picks the kernel's pt_regs field names (di, si, ...) when
 * this is defined, as it would be by a generated vmlinux.h. */
#define __VMLINUX_H__

typedef unsigned char __u8;
typedef signed char __s8;
typedef unsigned short __u16;
typedef short __s16;
typedef unsigned int __u32;
typedef int __s32;
typedef unsigned long long __u64;
typedef long long __s64;
typedef __u16 __be16;
typedef __u32 __be32;
typedef __u32 __wsum;
typedef _Bool bool;
#define true 1
#define false 0

enum bpf_map_type {
	BPF_MAP_TYPE_PERCPU_ARRAY = 6,
	BPF_MAP_TYPE_RINGBUF = 27,
};

#pragma clang attribute push(__attribute__((preserve_access_index)), apply_to = record)

struct trace_entry {
	unsigned short type;
	unsigned char flags;
	unsigned char preempt_count;
	int pid;
};

/* The sock:inet_sock_set_state tracepoint's record. */
struct trace_event_raw_inet_sock_set_state {
	struct trace_entry ent;
	const void *skaddr;
	int oldstate;
	int newstate;
	__u16 sport;
	__u16 dport;
	__u16 family;
	__u16 protocol;
	__u8 saddr[4];
	__u8 daddr[4];
	__u8 saddr_v6[16];
	__u8 daddr_v6[16];
};

/* The socket's network namespace: sk->__sk_common.skc_net.net->ns.inum, the
 * inode `ls -l /proc/<pid>/ns/net` shows. Tells apart listeners on the same
 * port in different pods. */
struct ns_common {
	unsigned int inum;
};

struct net {
	struct ns_common ns;
};

typedef struct {
	struct net *net;
} possible_net_t;

struct sock_common {
	possible_net_t skc_net;
};

struct sock {
	struct sock_common __sk_common;
};

#if defined(__TARGET_ARCH_x86)
struct pt_regs {
	unsigned long r15;
	unsigned long r14;
	unsigned long r13;
	unsigned long r12;
	unsigned long bp;
	unsigned long bx;
	unsigned long r11;
	unsigned long r10;
	unsigned long r9;
	unsigned long r8;
	unsigned long ax;
	unsigned long cx;
	unsigned long dx;
	unsigned long si;
	unsigned long di;
	unsigned long orig_ax;
	unsigned long ip;
	unsigned long cs;
	unsigned long flags;
	unsigned long sp;
	unsigned long ss;
};
#elif defined(__TARGET_ARCH_arm64)
struct user_pt_regs {
	__u64 regs[31];
	__u64 sp;
	__u64 pc;
	__u64 pstate;
};
struct pt_regs {
	union {
		struct user_pt_regs user_regs;
		struct {
			__u64 regs[31];
			__u64 sp;
			__u64 pc;
			__u64 pstate;
		};
	};
};
#else
#error "pingmesh BPF programs: only x86_64 and aarch64 are supported"
#endif

#pragma clang attribute pop

#endif
