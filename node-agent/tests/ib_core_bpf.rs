//! The kernel RDMA hooks (`ib_core`) and the lost-record counter against this
//! machine's kernel. Root and BPF like `tracer_bpf.rs`:
//!
//! ```text
//! mountpoint -q /sys/kernel/tracing || mount -t tracefs nodev /sys/kernel/tracing
//! PINGMESH_BPF_TESTS=1 cargo test -p pingmesh-agent --test ib_core_bpf -- --include-ignored --test-threads 1
//! ```
//!
//! What runs where:
//! - Here (no `ib_core`, no kprobes, fentry refused): the hooks are reported
//!   off with the reason; the shipped object's kprobe programs pass the
//!   verifier once relocated against a BTF with a 6.x kernel's `ib_core` layout;
//!   the same programs, built to read user memory, run as uprobes on a test
//!   library with that layout and decode a kernel consumer's and a uverbs
//!   user's QP; a 4 KiB ring buffer flooded by a uprobe counts every record
//!   it could not take.
//! - Only on a kernel with kprobes or fentry and `rdma_rxe` (soft-RoCE):
//!   `kernel_hooks_see_the_mad_layer_set_up_and_tear_down_its_qp`, which is
//!   ignored unless `PINGMESH_IB_CORE_TESTS=1` (command in its ignore message
//!   and in docs/tracing.md). IT DOES NOT RUN ON THIS PROJECT'S CI MACHINES.
#![cfg(all(target_os = "linux", feature = "ebpf"))]
#![allow(
    clippy::expect_used,
    clippy::unwrap_used,
    clippy::panic,
    clippy::too_many_lines
)]

use std::ffi::CString;
use std::path::Path;
use std::process::Command;
use std::time::{Duration, Instant};

mod common;

use aya::maps::{MapData, RingBuf};
use aya::programs::{KProbe, UProbe, uprobe::UProbeScope};
use aya::{Btf, EbpfLoader, Endianness};
use common::{build_fake_verbs, enabled};
use pingmesh_agent::service_flows::metrics::TracerMetrics;
use pingmesh_agent::service_flows::tracking;
use pingmesh_agent::tracer::{
    IbCoreOff, IbCoreState, QpDestroyEvent, QpRtrEvent, TraceEvent, Tracer, TracerOptions,
    parse_event,
};
use pingmesh_ebpf_probes::programs::{self, ib_core as names};

const TESTS: &str = "tests/ibcore";
/// Records written into the flooded ring buffer.
const CALLS: u64 = 1000;

fn run(cmd: &mut Command) {
    let out = cmd.output().unwrap_or_else(|e| panic!("{cmd:?}: {e}"));
    assert!(
        out.status.success(),
        "{cmd:?}: {}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
}

fn arch_define() -> &'static str {
    if cfg!(target_arch = "aarch64") {
        "-D__TARGET_ARCH_arm64"
    } else {
        "-D__TARGET_ARCH_x86"
    }
}

fn clang() -> String {
    std::env::var("CLANG").unwrap_or_else(|_| "clang".to_owned())
}

/// The BTF of the test's "kernel" (`tests/ibcore/kernel_layout.h` and `pt_regs`).
fn kernel_layout_btf(dir: &Path) -> Btf {
    let src = Path::new(env!("CARGO_MANIFEST_DIR")).join(TESTS);
    let object = dir.join("kernel_btf.o");
    run(Command::new(clang())
        .args(["-g", "-O2", "-target", "bpf", arch_define(), "-c"])
        .arg(src.join("kernel_btf.c"))
        .arg("-o")
        .arg(&object));
    let raw = dir.join("kernel.btf");
    run(Command::new("llvm-objcopy")
        .arg(format!("--dump-section=.BTF={}", raw.display()))
        .arg(&object)
        .arg(dir.join("kernel_btf.stripped.o")));
    Btf::parse(&std::fs::read(&raw).unwrap(), Endianness::default()).expect("parse the BTF")
}

fn proc_has_symbol(symbol: &str) -> bool {
    std::fs::read_to_string("/proc/kallsyms")
        .unwrap_or_default()
        .lines()
        .any(|l| l.split_whitespace().nth(2) == Some(symbol))
}

#[test]
#[ignore = "needs root and BPF: PINGMESH_BPF_TESTS=1 cargo test -p pingmesh-agent --test ib_core_bpf -- --include-ignored --test-threads 1"]
fn kernel_hooks_say_why_they_are_off_and_the_agent_goes_on() {
    if !enabled() {
        return;
    }
    let registry = prometheus::Registry::new();
    let metrics = TracerMetrics::new(&registry).unwrap();
    let tracer = tracking::open(Path::new("/proc"), &metrics).expect("the main tracer loads");
    let text = {
        let mut out = Vec::new();
        prometheus::Encoder::encode(
            &prometheus::TextEncoder::new(),
            &registry.gather(),
            &mut out,
        )
        .unwrap();
        String::from_utf8(out).unwrap()
    };
    let ib_core_here =
        Path::new("/sys/module/ib_core").exists() || proc_has_symbol(names::DESTROY_FUNCTION);
    if ib_core_here {
        // A kernel with ib_core: whatever happened is named, never "not tried".
        assert_ne!(tracer.ib_core_state(), &IbCoreState::NotTried);
        eprintln!("ib_core present: {:?}", tracer.ib_core_state());
        return;
    }
    // This machine (and any kernel without an RDMA stack): off, with the reason.
    let IbCoreState::Off { reason, detail } = tracer.ib_core_state() else {
        panic!("no ib_core here, yet {:?}", tracer.ib_core_state());
    };
    assert_eq!(*reason, IbCoreOff::NoIbCore);
    assert!(detail.contains("/sys/module/ib_core"), "{detail}");
    assert!(
        text.contains("pingmesh_tracer_ib_core_state{reason=\"no_ib_core\"} 1"),
        "{text}"
    );
    for hook in [
        "fentry_ib_modify_qp",
        "fentry_ib_destroy_qp",
        "kprobe_ib_modify_qp",
        "kprobe_ib_destroy_qp",
    ] {
        assert!(
            text.contains(&format!("pingmesh_tracer_hooks{{hook=\"{hook}\"}} 0")),
            "{hook}: {text}"
        );
    }
    // The main object is unaffected: the tracepoint is on and so is the tracer.
    assert!(
        text.contains("pingmesh_tracer_state{reason=\"on\"} 1"),
        "{text}"
    );
    assert!(
        text.contains("pingmesh_tracer_hooks{hook=\"tracepoint_inet_sock_set_state\"} 1"),
        "{text}"
    );
}

#[test]
#[ignore = "needs root and BPF: PINGMESH_BPF_TESTS=1 cargo test -p pingmesh-agent --test ib_core_bpf -- --include-ignored --test-threads 1"]
fn the_shipped_kprobe_programs_pass_the_verifier_against_a_kernel_layout() {
    if !enabled() {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let btf = kernel_layout_btf(dir.path());
    let mut ebpf = EbpfLoader::new()
        .btf(Some(&btf))
        .load(pingmesh_ebpf_probes::IB_CORE_OBJECT)
        .expect("relocate the ib_core object");
    for name in [names::KPROBE_MODIFY_QP, names::KPROBE_DESTROY_QP] {
        let program: &mut KProbe = ebpf.program_mut(name).unwrap().try_into().unwrap();
        program
            .load()
            .unwrap_or_else(|e| panic!("{name} refused by the verifier: {e:?}"));
    }
}

/// The records of the uprobe build, read from its ring buffer.
fn drain(ring: &mut RingBuf<MapData>) -> Vec<TraceEvent> {
    let mut out = Vec::new();
    while let Some(record) = ring.next() {
        out.push(parse_event(&record).expect("a well-formed record"));
    }
    out
}

#[test]
#[ignore = "needs root and BPF: PINGMESH_BPF_TESTS=1 cargo test -p pingmesh-agent --test ib_core_bpf -- --include-ignored --test-threads 1"]
fn the_hook_programs_decode_a_kernel_consumer_and_a_uverbs_user_through_ib_core_layout() {
    if !enabled() {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let tests = Path::new(env!("CARGO_MANIFEST_DIR")).join(TESTS);
    let probes = Path::new(env!("CARGO_MANIFEST_DIR")).join("../ebpf-probes/bpf");
    // The same C source as the shipped object, reading user memory, as uprobes.
    let object = dir.path().join("ib_core_user.bpf.o");
    run(Command::new(clang())
        .args([
            "-O2",
            "-g",
            "-target",
            "bpf",
            "-Wall",
            "-Werror",
            arch_define(),
        ])
        .arg("-DPM_IB_CORE_USER_SELFTEST")
        .arg("-I")
        .arg(&probes)
        .arg("-c")
        .arg(probes.join("ib_core.bpf.c"))
        .arg("-o")
        .arg(&object));
    let library = dir.path().join("libfakeibcore.so");
    let cc = std::env::var("CC").unwrap_or_else(|_| "cc".to_owned());
    run(Command::new(cc)
        .args(["-shared", "-fPIC", "-O0", "-Wall", "-Werror", "-o"])
        .arg(&library)
        .arg(tests.join("fakeibcore.c")));

    let btf = kernel_layout_btf(dir.path());
    let mut ebpf = EbpfLoader::new()
        .btf(Some(&btf))
        .load(&std::fs::read(&object).unwrap())
        .expect("relocate the uprobe build");
    let plan = [
        (names::KPROBE_MODIFY_QP, &names::MODIFY_FUNCTIONS[..]),
        (names::KPROBE_DESTROY_QP, &[names::DESTROY_FUNCTION][..]),
    ];
    for (name, functions) in plan {
        let program: &mut UProbe = ebpf.program_mut(name).unwrap().try_into().unwrap();
        program.load().unwrap();
        for function in functions {
            program
                .attach(*function, &library, UProbeScope::AllProcesses)
                .unwrap();
        }
    }
    let mut ring = RingBuf::try_from(ebpf.take_map(programs::EVENTS_MAP).unwrap()).unwrap();

    // SAFETY: a library built above; pm_run_scenario takes no arguments and
    // only touches its own static structures.
    let rc = unsafe {
        let path = CString::new(library.as_os_str().as_encoded_bytes()).unwrap();
        let handle = libc::dlopen(path.as_ptr(), libc::RTLD_NOW);
        assert!(!handle.is_null(), "dlopen {}", library.display());
        let symbol = libc::dlsym(handle, c"pm_run_scenario".as_ptr());
        assert!(!symbol.is_null());
        let scenario: extern "C" fn() -> libc::c_int = std::mem::transmute(symbol);
        scenario()
    };
    assert_eq!(rc, 0, "the scenario's calls succeed");

    let deadline = Instant::now() + Duration::from_secs(5);
    let mut events = Vec::new();
    while events.len() < 4 && Instant::now() < deadline {
        events.extend(drain(&mut ring));
        std::thread::sleep(Duration::from_millis(20));
    }
    events.extend(drain(&mut ring));
    let rtr: Vec<&QpRtrEvent> = events
        .iter()
        .filter_map(|e| match e {
            TraceEvent::QpRtr(r) => Some(r),
            _ => None,
        })
        .collect();
    let destroy: Vec<&QpDestroyEvent> = events
        .iter()
        .filter_map(|e| match e {
            TraceEvent::QpDestroy(d) => Some(d),
            _ => None,
        })
        .collect();
    assert_eq!(
        rtr.len(),
        2,
        "INIT, RTS and a mask without IB_QP_STATE are not RTR: {events:#?}"
    );
    assert_eq!(destroy.len(), 2, "{events:#?}");

    let gid = |last: u8| {
        let mut g = [0u8; 16];
        g[10] = 0xff;
        g[11] = 0xff;
        g[12] = 10;
        g[15] = last;
        g
    };
    let kernel = rtr[0];
    assert_eq!((kernel.qp_num, kernel.dest_qp_num), (0x111, 0x222));
    assert_eq!(
        kernel.origin.pid, 0,
        "a kernel consumer's QP has no process"
    );
    assert_eq!(kernel.origin.cgroup_id, 0);
    assert_eq!(kernel.device, "rxe0");
    assert_eq!(kernel.dgid, gid(2));
    assert_eq!(kernel.flow_label, 0xabcde);
    assert_eq!(
        (kernel.sgid_index, kernel.hop_limit, kernel.traffic_class),
        (3, 64, 106)
    );
    assert_eq!(kernel.port_num, 1, "ah_attr.port_num, not qp_attr.port_num");
    assert_eq!(kernel.qp_type, 2, "RC");

    let user = rtr[1];
    assert_eq!((user.qp_num, user.dest_qp_num), (0x333, 0x555));
    assert_eq!(
        user.origin.pid,
        std::process::id(),
        "a uverbs QP names its process"
    );
    assert_eq!(user.device, "mlx5_3");
    assert_eq!(user.dgid, gid(5));
    assert_eq!(user.flow_label, 0x12345);
    assert_eq!(user.qp_type, 3, "UC");

    assert_eq!((destroy[0].qp_num, destroy[0].origin.pid), (0x111, 0));
    assert_eq!(
        (destroy[1].qp_num, destroy[1].origin.pid),
        (0x333, std::process::id())
    );
}

#[test]
#[ignore = "needs root and BPF: PINGMESH_BPF_TESTS=1 cargo test -p pingmesh-agent --test ib_core_bpf -- --include-ignored --test-threads 1"]
fn a_full_ring_buffer_counts_every_record_it_could_not_take() {
    if !enabled() {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let (library, _driver) = build_fake_verbs(dir.path());
    // One page: 73 destroy records (48 bytes and an 8-byte header each).
    let mut tracer = Tracer::load_with(TracerOptions {
        ring_bytes: Some(4096),
    })
    .expect("load");
    tracer.attach_verbs(&library).expect("attach the uprobes");
    assert_eq!(tracer.lost_records(), 0);

    let qp = [0u8; 256];
    // SAFETY: the fake libibverbs built above; ibv_destroy_qp only checks its
    // argument for NULL, and the uprobe only reads it.
    unsafe {
        let path = CString::new(library.as_os_str().as_encoded_bytes()).unwrap();
        let handle = libc::dlopen(path.as_ptr(), libc::RTLD_NOW | libc::RTLD_LOCAL);
        assert!(!handle.is_null(), "dlopen {}", library.display());
        let symbol = libc::dlsym(handle, c"ibv_destroy_qp".as_ptr());
        assert!(!symbol.is_null());
        let destroy: extern "C" fn(*const u8) -> libc::c_int = std::mem::transmute(symbol);
        for _ in 0..CALLS {
            assert_eq!(destroy(qp.as_ptr()), 0);
        }
    }
    let mut taken = 0u64;
    let deadline = Instant::now() + Duration::from_secs(2);
    while Instant::now() < deadline {
        taken += tracer
            .poll(Duration::from_millis(50))
            .unwrap()
            .iter()
            .filter(|e| matches!(e, TraceEvent::QpDestroy(d) if d.origin.pid == std::process::id()))
            .count() as u64;
    }
    let lost = tracer.lost_records();
    assert!(taken > 0 && taken < CALLS, "taken {taken}");
    assert!(lost > 0, "a 4 KiB ring cannot hold {CALLS} records");
    assert_eq!(
        taken + lost,
        CALLS,
        "every call is either read or counted lost"
    );
}

/// Veth pair carrying a soft-RoCE device, removed on drop.
struct SoftRoce {
    device: String,
    veth: String,
}

impl Drop for SoftRoce {
    fn drop(&mut self) {
        let _ = Command::new("rdma")
            .args(["link", "delete", &self.device])
            .status();
        let _ = Command::new("ip")
            .args(["link", "del", &self.veth])
            .status();
    }
}

#[test]
#[ignore = "needs a kernel with kprobes or fentry and rdma_rxe (soft-RoCE), root, iproute2's rdma: \
            PINGMESH_BPF_TESTS=1 PINGMESH_IB_CORE_TESTS=1 cargo test -p pingmesh-agent --test ib_core_bpf \
            -- --include-ignored --test-threads 1 kernel_hooks_see"]
fn kernel_hooks_see_the_mad_layer_set_up_and_tear_down_its_qp() {
    if std::env::var_os("PINGMESH_IB_CORE_TESTS").is_none() {
        eprintln!(
            "SKIPPED: set PINGMESH_IB_CORE_TESTS=1 on a kernel with kprobes or fentry and \
             rdma_rxe; this kernel test did not run"
        );
        return;
    }
    run(Command::new("modprobe").arg("rdma_rxe"));
    let mut tracer = Tracer::load().expect("load the main object");
    let state = tracer.attach_ib_core().clone();
    let IbCoreState::On(how) = state else {
        panic!("the kernel RDMA hooks did not attach: {state:?}");
    };
    eprintln!("kernel RDMA hooks attached with {}", how.label());

    // Registering an RDMA device makes ib_core's MAD layer (a kernel
    // consumer) create its GSI QP (QP1) and move it through INIT, RTR and
    // RTS with ib_modify_qp; removing the device destroys it.
    let tag = std::process::id() % 10_000;
    let soft = SoftRoce {
        device: format!("pmrxe{tag}"),
        veth: format!("pmib{tag}a"),
    };
    run(Command::new("ip").args([
        "link",
        "add",
        &soft.veth,
        "type",
        "veth",
        "peer",
        "name",
        &format!("pmib{tag}b"),
    ]));
    run(Command::new("ip").args(["addr", "add", "10.214.0.1/24", "dev", &soft.veth]));
    run(Command::new("ip").args(["link", "set", &soft.veth, "up"]));
    run(Command::new("rdma").args([
        "link",
        "add",
        &soft.device,
        "type",
        "rxe",
        "netdev",
        &soft.veth,
    ]));
    let mut events = Vec::new();
    let deadline = Instant::now() + Duration::from_secs(10);
    let is_gsi_rtr = |e: &TraceEvent| matches!(e, TraceEvent::QpRtr(r) if r.qp_num == 1 && r.device == soft.device);
    while Instant::now() < deadline && !events.iter().any(is_gsi_rtr) {
        events.extend(tracer.poll(Duration::from_millis(100)).unwrap());
    }
    let rtr = events
        .iter()
        .find_map(|e| match e {
            TraceEvent::QpRtr(r) if r.qp_num == 1 && r.device == soft.device => Some(r.clone()),
            _ => None,
        })
        .unwrap_or_else(|| panic!("no RTR of {}'s QP1: {events:#?}", soft.device));
    assert_eq!(rtr.origin.pid, 0, "the MAD layer is a kernel consumer");

    let device = soft.device.clone();
    drop(soft);
    let deadline = Instant::now() + Duration::from_secs(10);
    let mut after = Vec::new();
    while Instant::now() < deadline
        && !after
            .iter()
            .any(|e| matches!(e, TraceEvent::QpDestroy(d) if d.qp_num == 1 && d.origin.pid == 0))
    {
        after.extend(tracer.poll(Duration::from_millis(100)).unwrap());
    }
    assert!(
        after
            .iter()
            .any(|e| matches!(e, TraceEvent::QpDestroy(d) if d.qp_num == 1 && d.origin.pid == 0)),
        "no destroy of {device}'s QP1: {after:#?}"
    );
}
