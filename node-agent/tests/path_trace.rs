//! Same-5-tuple path traces through a real Linux router: three network
//! namespaces (a prober host, a router, a responder host) built by the test,
//! raw sockets, ICMP time-exceeded from the router's kernel. Needs root:
//!
//! ```text
//! sudo PINGMESH_NETNS_TESTS=1 cargo test -p pingmesh-agent --test path_trace -- --include-ignored --test-threads=1
//! ```
//!
//! hack/test.sh runs them when it runs as root.
#![cfg(target_os = "linux")]
#![allow(clippy::expect_used, clippy::unwrap_used, clippy::panic)]

use std::net::{IpAddr, SocketAddr, UdpSocket};
use std::os::fd::AsRawFd;
use std::process::Command;
use std::time::Duration;

use pingmesh_agent::pathtrace::{FlowTuple, TRACE_MAGIC, Tracer};

const NS: [&str; 3] = ["pmt-a", "pmt-r", "pmt-b"];

mod common;

/// Whether the root-only tests were asked for (see `common::gate`).
fn enabled() -> bool {
    common::gate(
        "PINGMESH_NETNS_TESTS",
        "set PINGMESH_NETNS_TESTS=1 and run as root to build network namespaces",
    )
}

fn sh(args: &[&str]) {
    let out = Command::new(args[0])
        .args(&args[1..])
        .output()
        .expect("run");
    assert!(
        out.status.success(),
        "{args:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
}

/// a (10.79.1.2) -- (10.79.1.1) r (10.79.2.1) -- (10.79.2.2) b
struct Topology;

impl Topology {
    fn up() -> Self {
        Self::down();
        for ns in NS {
            sh(&["ip", "netns", "add", ns]);
            sh(&["ip", "-n", ns, "link", "set", "lo", "up"]);
        }
        sh(&[
            "ip", "-n", "pmt-a", "link", "add", "a0", "type", "veth", "peer", "name", "ra",
            "netns", "pmt-r",
        ]);
        sh(&[
            "ip", "-n", "pmt-r", "link", "add", "rb", "type", "veth", "peer", "name", "b0",
            "netns", "pmt-b",
        ]);
        for (ns, dev, addr) in [
            ("pmt-a", "a0", "10.79.1.2/24"),
            ("pmt-r", "ra", "10.79.1.1/24"),
            ("pmt-r", "rb", "10.79.2.1/24"),
            ("pmt-b", "b0", "10.79.2.2/24"),
        ] {
            sh(&["ip", "-n", ns, "addr", "add", addr, "dev", dev]);
            sh(&["ip", "-n", ns, "link", "set", dev, "up"]);
        }
        sh(&[
            "ip",
            "-n",
            "pmt-a",
            "route",
            "add",
            "default",
            "via",
            "10.79.1.1",
        ]);
        sh(&[
            "ip",
            "-n",
            "pmt-b",
            "route",
            "add",
            "default",
            "via",
            "10.79.2.1",
        ]);
        sh(&[
            "ip",
            "netns",
            "exec",
            "pmt-r",
            "sysctl",
            "-qw",
            "net.ipv4.ip_forward=1",
            "net.ipv4.icmp_ratelimit=0",
        ]);
        sh(&[
            "ip",
            "netns",
            "exec",
            "pmt-b",
            "sysctl",
            "-qw",
            "net.ipv4.icmp_ratelimit=0",
        ]);
        Self
    }

    fn down() {
        for ns in NS {
            let _ = Command::new("ip").args(["netns", "del", ns]).output();
        }
    }
}

impl Drop for Topology {
    fn drop(&mut self) {
        Self::down();
    }
}

unsafe extern "C" {
    fn setns(fd: i32, nstype: i32) -> i32;
}

/// Runs `f` on a thread inside network namespace `ns`.
fn in_netns<T: Send + 'static>(ns: &str, f: impl FnOnce() -> T + Send + 'static) -> T {
    let path = format!("/run/netns/{ns}");
    std::thread::spawn(move || {
        let file = std::fs::File::open(path).expect("open netns");
        // SAFETY: setns on this thread only, with an open namespace descriptor.
        let rc = unsafe { setns(file.as_raw_fd(), 0x4000_0000) };
        assert_eq!(rc, 0, "setns");
        f()
    })
    .join()
    .expect("netns thread")
}

fn trace_from_a(tuple: FlowTuple) -> pingmesh_agent::pathtrace::TraceOutcome {
    in_netns("pmt-a", move || {
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .unwrap();
        rt.block_on(async move {
            // The prober owns the source port: the trace must not need it free.
            let _prober = UdpSocket::bind(tuple.source).expect("bind the prober's port");
            let tracer = Tracer::open().expect("raw sockets (root)");
            tracer
                .trace(tuple, 6, 2, Duration::from_millis(300))
                .await
                .expect("trace")
        })
    })
}

fn addr(s: &str) -> SocketAddr {
    s.parse().unwrap()
}

#[test]
#[ignore = "needs root and network namespaces: sudo PINGMESH_NETNS_TESTS=1 cargo test -p pingmesh-agent --test path_trace -- --include-ignored"]
fn a_trace_names_the_router_and_reaches_a_closed_port() {
    if !enabled() {
        return;
    }
    let _topology = Topology::up();
    let outcome = trace_from_a(FlowTuple {
        source: addr("10.79.1.2:40000"),
        destination: addr("10.79.2.2:9999"),
        flow_label: 0,
    });
    assert_eq!(outcome.hops, vec!["10.79.1.1".parse::<IpAddr>().unwrap()]);
    assert!(outcome.reached, "b answers port unreachable: {outcome:?}");
}

#[test]
#[ignore = "needs root and network namespaces: sudo PINGMESH_NETNS_TESTS=1 cargo test -p pingmesh-agent --test path_trace -- --include-ignored"]
fn a_trace_to_an_open_port_ends_there_and_delivers_the_trace_magic() {
    if !enabled() {
        return;
    }
    let _topology = Topology::up();
    let responder = in_netns("pmt-b", || {
        let s = UdpSocket::bind("10.79.2.2:9403").unwrap();
        s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
        s
    });
    let outcome = trace_from_a(FlowTuple {
        source: addr("10.79.1.2:40001"),
        destination: addr("10.79.2.2:9403"),
        flow_label: 0,
    });
    assert_eq!(outcome.hops, vec!["10.79.1.1".parse::<IpAddr>().unwrap()]);
    assert!(!outcome.reached, "an open port answers nothing");
    let mut buf = [0u8; 64];
    let (n, from) = responder
        .recv_from(&mut buf)
        .expect("the last TTL reached b");
    assert_eq!(
        from,
        addr("10.79.1.2:40001"),
        "sent from the flow's own port"
    );
    assert!(buf[..n].starts_with(&TRACE_MAGIC));
}
