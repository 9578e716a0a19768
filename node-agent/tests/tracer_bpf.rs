//! The service tracer against this machine's kernel: the real BPF programs
//! loaded, attached and read. Needs root (`CAP_BPF`, `CAP_PERFMON`), BTF, tracefs
//! mounted at /sys/kernel/tracing, a C compiler and libibverbs' headers:
//!
//! ```text
//! mountpoint -q /sys/kernel/tracing || mount -t tracefs nodev /sys/kernel/tracing
//! PINGMESH_BPF_TESTS=1 cargo test -p pingmesh-agent --test tracer_bpf -- --include-ignored
//! ```
//!
//! hack/test.sh runs them when it runs as root.
#![cfg(all(target_os = "linux", feature = "ebpf"))]
#![allow(clippy::expect_used, clippy::unwrap_used, clippy::panic)]

use std::io::{BufRead, BufReader, Write};
use std::net::{Ipv4Addr, Ipv6Addr, SocketAddr, TcpListener, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

mod common;

use common::{NetnsPair, build_fake_verbs, cgroup_id, enabled};
use pingmesh_agent::tracer::{Hook, QpRtrEvent, TcpEvent, TcpState, TraceEvent, Tracer};

/// Collects events until `done` holds for what was collected, or 10 s pass.
fn collect(tracer: &mut Tracer, mut done: impl FnMut(&[TraceEvent]) -> bool) -> Vec<TraceEvent> {
    let deadline = Instant::now() + Duration::from_secs(10);
    let mut events = Vec::new();
    while Instant::now() < deadline && !done(&events) {
        events.extend(
            tracer
                .poll(Duration::from_millis(100))
                .expect("poll the ring buffer"),
        );
    }
    events
}

fn tcp_events(events: &[TraceEvent], port_a: u16, port_b: u16) -> Vec<TcpEvent> {
    events
        .iter()
        .filter_map(|e| match e {
            TraceEvent::Tcp(t) if (t.sport, t.dport) == (port_a, port_b) => Some(t.clone()),
            _ => None,
        })
        .collect()
}

fn check_tcp_connection(tracer: &mut Tracer, listen: SocketAddr) {
    let listener = TcpListener::bind(listen).expect("bind");
    let server = listener.local_addr().expect("local addr");
    let client = TcpStream::connect(server).expect("connect");
    let (accepted, _) = listener.accept().expect("accept");
    let cport = client.local_addr().expect("client addr").port();
    let sport = server.port();

    let up = |events: &[TraceEvent]| {
        let established = |a, b| {
            tcp_events(events, a, b)
                .iter()
                .any(|t| t.new_state == TcpState::Established)
        };
        established(cport, sport) && established(sport, cport)
    };
    let events = collect(tracer, up);
    let client_side = tcp_events(&events, cport, sport);
    let server_side = tcp_events(&events, sport, cport);
    let established = client_side
        .iter()
        .find(|t| t.new_state == TcpState::Established)
        .unwrap_or_else(|| panic!("no ESTABLISHED for the client socket: {events:#?}"));
    assert_eq!(established.old_state, TcpState::SynSent);
    assert_eq!(established.src, server.ip());
    assert_eq!(established.dst, server.ip());
    assert_eq!(
        established.origin.pid,
        std::process::id(),
        "{established:?}"
    );
    if let Some(id) = cgroup_id(std::process::id()) {
        assert_eq!(established.origin.cgroup_id, id);
    }
    let passive = server_side
        .iter()
        .find(|t| t.new_state == TcpState::Established)
        .unwrap_or_else(|| panic!("no ESTABLISHED for the accepted socket: {events:#?}"));
    assert_eq!(passive.old_state, TcpState::SynRecv);
    assert_ne!(passive.sock, established.sock);

    drop(client);
    drop(accepted);
    let closed = |events: &[TraceEvent]| {
        let close = |a, b| {
            tcp_events(events, a, b)
                .iter()
                .any(|t| t.new_state == TcpState::Close)
        };
        close(cport, sport) && close(sport, cport)
    };
    let events = collect(tracer, closed);
    for (a, b, sock) in [
        (cport, sport, established.sock),
        (sport, cport, passive.sock),
    ] {
        let flow = tcp_events(&events, a, b);
        assert!(
            flow.iter()
                .any(|t| t.old_state == TcpState::Established && t.sock == sock),
            "{a}->{b} never left ESTABLISHED: {flow:#?}"
        );
        assert!(
            flow.iter()
                .any(|t| t.new_state == TcpState::Close && t.sock == sock),
            "{a}->{b} never reached CLOSE: {flow:#?}"
        );
    }
}

#[test]
#[ignore = "needs root and BPF: PINGMESH_BPF_TESTS=1 cargo test -p pingmesh-agent --test tracer_bpf -- --include-ignored"]
fn tcp_connections_on_loopback_are_traced_up_and_down() {
    if !enabled() {
        return;
    }
    let mut tracer = Tracer::load().expect("load the BPF object");
    tracer
        .attach_tcp()
        .expect("attach sock:inet_sock_set_state (is tracefs mounted?)");
    assert_eq!(tracer.active_hooks(), vec![Hook::TcpStateTracepoint]);
    check_tcp_connection(&mut tracer, SocketAddr::from((Ipv4Addr::LOCALHOST, 0)));
    check_tcp_connection(&mut tracer, SocketAddr::from((Ipv6Addr::LOCALHOST, 0)));
    assert_eq!(tracer.malformed_records(), 0);
}

#[test]
#[ignore = "needs root and BPF: PINGMESH_BPF_TESTS=1 cargo test -p pingmesh-agent --test tracer_bpf -- --include-ignored"]
fn tcp_connections_between_network_namespaces_are_traced_up_and_down() {
    if !enabled() {
        return;
    }
    let mut tracer = Tracer::load().expect("load the BPF object");
    tracer
        .attach_tcp()
        .expect("attach sock:inet_sock_set_state (is tracefs mounted?)");
    let pair = NetnsPair::new();
    let [client_ip, server_ip] = NetnsPair::ADDRS;
    let listener = pair.run(1, move || {
        TcpListener::bind((server_ip, 0)).expect("bind in b")
    });
    let server = listener.local_addr().expect("listener addr");
    // Sockets keep the namespace they were created in.
    let client = pair.run(0, move || {
        TcpStream::connect(server).expect("connect from a")
    });
    let (accepted, peer) = listener.accept().expect("accept");
    assert_eq!(peer.ip(), client_ip);
    let (cport, sport) = (peer.port(), server.port());

    let up = |events: &[TraceEvent]| {
        let est = |a, b| {
            tcp_events(events, a, b)
                .iter()
                .any(|t| t.new_state == TcpState::Established)
        };
        est(cport, sport) && est(sport, cport)
    };
    let events = collect(&mut tracer, up);
    let active = tcp_events(&events, cport, sport);
    let active = active
        .iter()
        .find(|t| t.new_state == TcpState::Established)
        .unwrap_or_else(|| panic!("no ESTABLISHED in namespace a: {events:#?}"));
    assert_eq!(
        (active.src, active.dst),
        (client_ip.into(), server_ip.into())
    );
    assert_eq!(active.origin.pid, std::process::id());
    let passive = tcp_events(&events, sport, cport);
    let passive = passive
        .iter()
        .find(|t| t.new_state == TcpState::Established)
        .unwrap_or_else(|| panic!("no ESTABLISHED in namespace b: {events:#?}"));
    assert_eq!(
        (passive.src, passive.dst),
        (server_ip.into(), client_ip.into())
    );

    drop(client);
    drop(accepted);
    let closed = |events: &[TraceEvent]| {
        let close = |a, b| {
            tcp_events(events, a, b)
                .iter()
                .any(|t| t.new_state == TcpState::Close)
        };
        close(cport, sport) && close(sport, cport)
    };
    let events = collect(&mut tracer, closed);
    assert!(closed(&events), "both ends reach CLOSE: {events:#?}");
    drop(pair);
}

fn verbs_events(events: &[TraceEvent], pid: u32) -> (Vec<QpRtrEvent>, Vec<u32>) {
    let mut rtr = Vec::new();
    let mut destroyed = Vec::new();
    for e in events {
        match e {
            TraceEvent::QpRtr(r) if r.origin.pid == pid => rtr.push(r.clone()),
            TraceEvent::QpDestroy(d) if d.origin.pid == pid => destroyed.push(d.qp_num),
            _ => {}
        }
    }
    (rtr, destroyed)
}

/// Exactly the driver's one RTR transition and its destroy, with its fields.
fn check_driver_events(tracer: &mut Tracer, pid: u32) {
    let events = collect(tracer, |events| !verbs_events(events, pid).1.is_empty());
    let (rtr, destroyed) = verbs_events(&events, pid);
    assert_eq!(rtr.len(), 1, "one RTR transition expected: {rtr:#?}");
    let r = &rtr[0];
    assert_eq!(r.qp_num, 0x1234);
    assert_eq!(r.dest_qp_num, 0x5678);
    assert_eq!(
        r.dgid,
        [
            0xfe, 0x80, 0, 0, 0, 0, 0, 0, 0x02, 0x11, 0x22, 0xff, 0xfe, 0x33, 0x44, 0x55
        ]
    );
    assert_eq!(r.flow_label, 0xabcde);
    assert_eq!(r.sgid_index, 3);
    assert_eq!(r.hop_limit, 64);
    assert_eq!(r.traffic_class, 106);
    assert_eq!(r.port_num, 1);
    assert_eq!(r.qp_type, 2, "IBV_QPT_RC");
    assert_eq!(r.device, "mlx5_7");
    assert_eq!(r.origin.comm, "driver");
    if let Some(id) = cgroup_id(std::process::id()) {
        // The driver is this test's child, in the same cgroup.
        assert_eq!(r.origin.cgroup_id, id);
    }
    assert_eq!(destroyed, vec![0x1234]);
}

#[test]
#[ignore = "needs root and BPF: PINGMESH_BPF_TESTS=1 cargo test -p pingmesh-agent --test tracer_bpf -- --include-ignored"]
fn uprobes_on_a_library_see_qp_setup_and_teardown() {
    if !enabled() {
        return;
    }
    let dir = tempfile::tempdir().expect("tempdir");
    let (lib, driver) = build_fake_verbs(dir.path());
    let mut tracer = Tracer::load().expect("load the BPF object");
    tracer.attach_verbs(&lib).expect("attach the uprobes");
    assert_eq!(
        tracer.active_hooks(),
        vec![
            Hook::IbvModifyQp {
                library: lib.clone()
            },
            Hook::IbvDestroyQp { library: lib }
        ]
    );
    let child = Command::new(&driver).spawn().expect("start the driver");
    let pid = child.id();
    let status = child
        .wait_with_output()
        .expect("wait for the driver")
        .status;
    assert!(status.success(), "driver: {status}");
    check_driver_events(&mut tracer, pid);
    assert_eq!(tracer.malformed_records(), 0);
}

#[test]
#[ignore = "needs root and BPF: PINGMESH_BPF_TESTS=1 cargo test -p pingmesh-agent --test tracer_bpf -- --include-ignored"]
fn libraries_found_in_proc_maps_are_attached_for_running_and_later_processes() {
    if !enabled() {
        return;
    }
    let dir = tempfile::tempdir().expect("tempdir");
    let (_, driver) = build_fake_verbs(dir.path());
    let mut tracer = Tracer::load().expect("load the BPF object");

    // A running service: found through /proc/<pid>/maps, attached through
    // /proc/<pid>/root.
    let mut running = Command::new(&driver)
        .arg("--wait")
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .spawn()
        .expect("start the driver");
    let pid = running.id();
    let mut ready = String::new();
    BufReader::new(running.stdout.take().expect("stdout"))
        .read_line(&mut ready)
        .expect("read ready");
    assert_eq!(ready.trim(), "ready");
    let failures = tracer.attach_loaded_verbs(Path::new("/proc"));
    assert!(failures.is_empty(), "{failures:?}");
    let expected = PathBuf::from(format!("/proc/{pid}/root")).join(
        dir.path()
            .join("libibverbs.so.1")
            .strip_prefix("/")
            .expect("absolute"),
    );
    assert!(
        tracer.active_hooks().contains(&Hook::IbvModifyQp {
            library: expected.clone()
        }),
        "{:?}",
        tracer.active_hooks()
    );
    // A second scan attaches nothing new.
    let before = tracer.active_hooks().len();
    assert!(tracer.attach_loaded_verbs(Path::new("/proc")).is_empty());
    assert_eq!(tracer.active_hooks().len(), before);

    running
        .stdin
        .take()
        .expect("stdin")
        .write_all(b"go\n")
        .expect("release the driver");
    assert!(running.wait().expect("wait").success());
    check_driver_events(&mut tracer, pid);

    // A process started after the attach: the uprobe is on the file.
    let later = Command::new(&driver)
        .spawn()
        .expect("start the driver again");
    let later_pid = later.id();
    assert!(later.wait_with_output().expect("wait").status.success());
    check_driver_events(&mut tracer, later_pid);
}
