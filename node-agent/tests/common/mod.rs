//! Helpers of the root-only tests (`tracer_bpf.rs`, `service_flows_bpf.rs`,
//! `path_trace.rs`, ...).
#![allow(dead_code, clippy::expect_used, clippy::unwrap_used, clippy::panic)]

use std::net::Ipv4Addr;
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};
use std::process::Command;

/// Whether the root-only tests were asked for (`PINGMESH_BPF_TESTS=1`).
pub fn enabled() -> bool {
    gate(
        "PINGMESH_BPF_TESTS",
        "set PINGMESH_BPF_TESTS=1 (and run as root) to load the BPF programs",
    )
}

/// Whether `variable` is set (non-empty). Without it a test is skipped
/// loudly: under CI (`CI` set, not `false` or `0`) that fails, since CI must
/// run what it asks for; elsewhere a banner says that nothing was tested.
pub fn gate(variable: &str, how: &str) -> bool {
    if std::env::var_os(variable).is_some_and(|v| !v.is_empty()) {
        return true;
    }
    let in_ci = std::env::var("CI").is_ok_and(|v| {
        let v = v.trim();
        !(v.is_empty() || v == "0" || v.eq_ignore_ascii_case("false"))
    });
    assert!(!in_ci, "SKIPPED under CI, which must run this test: {how}");
    eprintln!("\n*** SKIPPED, nothing was tested: {how} ***\n");
    false
}

/// The cgroup v2 mount (`/sys/fs/cgroup`, or `.../unified` on hybrid hosts).
pub fn cgroup2_root() -> Option<PathBuf> {
    let mounts = std::fs::read_to_string("/proc/self/mounts").ok()?;
    mounts.lines().find_map(|l| {
        let mut f = l.split_whitespace();
        let (_, dir, fstype) = (f.next()?, f.next()?, f.next()?);
        (fstype == "cgroup2").then(|| PathBuf::from(dir))
    })
}

/// The cgroup v2 id of a process (the inode of its cgroup directory), when
/// the unified hierarchy is mounted.
pub fn cgroup_id(pid: u32) -> Option<u64> {
    let cgroups = std::fs::read_to_string(format!("/proc/{pid}/cgroup")).ok()?;
    let path = cgroups.lines().find_map(|l| l.strip_prefix("0::"))?;
    let dir = cgroup2_root()?.join(path.trim_start_matches('/'));
    Some(std::fs::metadata(dir).ok()?.ino())
}

/// Two network namespaces joined by a veth pair, removed on drop.
pub struct NetnsPair {
    pub names: [String; 2],
}

impl NetnsPair {
    pub const ADDRS: [Ipv4Addr; 2] = [Ipv4Addr::new(10, 213, 0, 1), Ipv4Addr::new(10, 213, 0, 2)];

    pub fn new() -> Self {
        let tag = std::process::id();
        let pair = Self {
            names: [format!("pmbpf-a-{tag}"), format!("pmbpf-b-{tag}")],
        };
        let [a, b] = &pair.names;
        let ip = |args: &[&str]| {
            let out = Command::new("ip").args(args).output().expect("run ip");
            assert!(
                out.status.success(),
                "ip {args:?}: {}",
                String::from_utf8_lossy(&out.stderr)
            );
        };
        ip(&["netns", "add", a]);
        ip(&["netns", "add", b]);
        ip(&[
            "link", "add", "pmbpf0", "netns", a, "type", "veth", "peer", "name", "pmbpf1", "netns",
            b,
        ]);
        for (ns, dev, addr) in [(a, "pmbpf0", Self::ADDRS[0]), (b, "pmbpf1", Self::ADDRS[1])] {
            ip(&["-n", ns, "addr", "add", &format!("{addr}/24"), "dev", dev]);
            ip(&["-n", ns, "link", "set", dev, "up"]);
            ip(&["-n", ns, "link", "set", "lo", "up"]);
        }
        pair
    }

    /// Runs `f` on a thread that has joined namespace `index`.
    pub fn run<T: Send + 'static>(
        &self,
        index: usize,
        f: impl FnOnce() -> T + Send + 'static,
    ) -> T {
        let path = format!("/run/netns/{}", self.names[index]);
        std::thread::spawn(move || {
            let ns = std::fs::File::open(&path).expect("open the namespace");
            // SAFETY: a valid namespace fd; setns changes only this thread's
            // network namespace.
            let rc =
                unsafe { libc::setns(std::os::fd::AsRawFd::as_raw_fd(&ns), libc::CLONE_NEWNET) };
            assert_eq!(rc, 0, "setns: {}", std::io::Error::last_os_error());
            f()
        })
        .join()
        .expect("namespace thread")
    }
}

impl Drop for NetnsPair {
    fn drop(&mut self) {
        for name in &self.names {
            let _ = Command::new("ip").args(["netns", "del", name]).status();
        }
    }
}

/// Builds the fake libibverbs.so.1 and the driver linked to it in `dir`.
pub fn build_fake_verbs(dir: &Path) -> (PathBuf, PathBuf) {
    let src = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fakeverbs");
    let cc = std::env::var("CC").unwrap_or_else(|_| "cc".to_owned());
    let lib = dir.join("libibverbs.so.1");
    let driver = dir.join("driver");
    let run = |cmd: &mut Command| {
        let out = cmd.output().expect("run cc");
        assert!(
            out.status.success(),
            "{cmd:?}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
    };
    run(Command::new(&cc)
        .args(["-shared", "-fPIC", "-O1", "-Wall", "-Werror", "-o"])
        .arg(&lib)
        .arg(src.join("libibverbs.c")));
    run(Command::new(&cc)
        .args(["-O1", "-Wall", "-Werror", "-o"])
        .arg(&driver)
        .arg(src.join("driver.c"))
        .arg(format!("-L{}", dir.display()))
        .arg("-l:libibverbs.so.1")
        .arg(format!("-Wl,-rpath,{}", dir.display())));
    (lib, driver)
}
