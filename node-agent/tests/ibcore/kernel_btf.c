/* The BTF of "the kernel" for node-agent/tests/ib_core_bpf.rs: compiled with
 * `clang -g -target bpf -D__TARGET_ARCH_x86 -c`, its .BTF section holds
 * ib_core's structures in kernel_layout.h and the kernel's pt_regs (the
 * kprobe programs read their arguments through it). */
#include "kernel_layout.h"

#if defined(__TARGET_ARCH_x86)
struct pt_regs {
	unsigned long r15, r14, r13, r12, bp, bx, r11, r10, r9, r8, ax, cx, dx, si, di, orig_ax, ip,
		cs, flags, sp, ss;
};
#elif defined(__TARGET_ARCH_arm64)
struct user_pt_regs {
	u64 regs[31];
	u64 sp;
	u64 pc;
	u64 pstate;
};
struct pt_regs {
	union {
		struct user_pt_regs user_regs;
		struct {
			u64 regs[31];
			u64 sp;
			u64 pc;
			u64 pstate;
		};
	};
};
#endif

struct ib_qp pm_btf_qp;
struct ib_qp_attr pm_btf_attr;
struct ib_device pm_btf_device;
struct ib_uqp_object pm_btf_uobject;
struct pt_regs pm_btf_regs;
