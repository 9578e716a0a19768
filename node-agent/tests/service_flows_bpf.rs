//! The agent's service-flow pipeline against this machine's kernel: the real
//! BPF programs, loaded and attached by the agent's tracking code, feed the
//! flow table; processes placed in cgroups shaped like a kubelet's come out
//! with their pod UID and container id. Needs root, BTF, tracefs, a cgroup v2
//! mount, a C compiler and libibverbs' headers:
//!
//! ```text
//! mountpoint -q /sys/kernel/tracing || mount -t tracefs nodev /sys/kernel/tracing
//! PINGMESH_BPF_TESTS=1 cargo test -p pingmesh-agent --test service_flows_bpf -- --include-ignored --test-threads 1
//! ```
#![cfg(all(target_os = "linux", feature = "ebpf"))]
#![allow(clippy::expect_used, clippy::unwrap_used, clippy::panic)]

use std::io::{BufRead, BufReader, Write};
use std::net::{IpAddr, TcpListener};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

mod common;

use common::{NetnsPair, build_fake_verbs, cgroup2_root, enabled};
use pingmesh_agent::service_flows::metrics::TracerMetrics;
use pingmesh_agent::service_flows::tracking::{self, SharedTable, TrackingConfig, lock};
use pingmesh_agent::service_flows::{Flow, FlowKey, TableLimits};
use prometheus::{Encoder, Registry, TextEncoder};
use tokio_util::sync::CancellationToken;

/// A cgroup shaped like the kubelet's (systemd driver, containerd), removed on drop.
struct PodCgroup {
    pod_uid: String,
    container_id: String,
    dirs: Vec<PathBuf>,
}

impl PodCgroup {
    fn new(tag: u32) -> Self {
        let root = cgroup2_root().expect("a cgroup v2 mount");
        let pod_uid = format!("{tag:08x}-5f60-4182-93a4-b5c6d7e8f901");
        let container_id = format!("{tag:08x}{}", "c0de".repeat(14));
        let slice = root.join("kubepods.slice");
        let qos = slice.join("kubepods-besteffort.slice");
        let pod = qos.join(format!(
            "kubepods-besteffort-pod{}.slice",
            pod_uid.replace('-', "_")
        ));
        let container = pod.join(format!("cri-containerd-{container_id}.scope"));
        std::fs::create_dir_all(&container).expect("create the pod cgroup");
        Self {
            pod_uid,
            container_id,
            dirs: vec![container, pod, qos, slice],
        }
    }

    fn procs(&self) -> PathBuf {
        self.dirs[0].join("cgroup.procs")
    }
}

impl Drop for PodCgroup {
    fn drop(&mut self) {
        for dir in &self.dirs {
            // Fails while a process is still inside, or for a shared parent.
            let _ = std::fs::remove_dir(dir);
        }
    }
}

/// Starts `cmd` (a shell line) in `cgroup`, optionally in network namespace
/// `netns`. The cgroup comes first: `ip netns exec` mounts another /sys.
fn spawn_in_pod(cgroup: &PodCgroup, netns: Option<&str>, cmd: &str) -> Child {
    let enter = netns.map_or(String::new(), |ns| format!("ip netns exec {ns} "));
    let line = format!(
        "echo $$ > {} && exec {enter}{cmd}",
        cgroup.procs().display()
    );
    Command::new("bash")
        .args(["-c", &line])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .spawn()
        .expect("start the pod process")
}

/// The `pingmesh_tracer_verbs_libraries` gauge (this test binary maps the
/// system's libibverbs too, so the count starts above 0).
fn verbs_libraries(registry: &Registry) -> u64 {
    text(registry)
        .lines()
        .find_map(|l| l.strip_prefix("pingmesh_tracer_verbs_libraries "))
        .and_then(|v| v.trim().parse().ok())
        .unwrap_or(0)
}

/// Waits until the rescan attached one more libibverbs copy than `before`.
fn wait_for_new_library(registry: &Registry, before: u64) {
    let deadline = Instant::now() + Duration::from_secs(10);
    while verbs_libraries(registry) <= before {
        assert!(
            Instant::now() < deadline,
            "never attached:\n{}",
            text(registry)
        );
        std::thread::sleep(Duration::from_millis(50));
    }
}

fn read_line(child: &mut Child) -> String {
    let mut line = String::new();
    BufReader::new(child.stdout.as_mut().expect("stdout"))
        .read_line(&mut line)
        .expect("read from the pod process");
    line.trim().to_owned()
}

fn text(registry: &Registry) -> String {
    let mut out = Vec::new();
    TextEncoder::new()
        .encode(&registry.gather(), &mut out)
        .unwrap();
    String::from_utf8(out).unwrap()
}

/// Waits up to 10 s for `done` over the table's flows.
fn wait_for(
    table: &SharedTable,
    registry: &Registry,
    what: &str,
    done: impl Fn(&[(FlowKey, Flow)]) -> bool,
) {
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let flows = lock(table).flows();
        if done(&flows) {
            return;
        }
        assert!(
            Instant::now() < deadline,
            "{what}: {flows:#?}\n{}",
            text(registry)
        );
        std::thread::sleep(Duration::from_millis(50));
    }
}

fn start_tracking(sysfs: &Path) -> (SharedTable, Registry, CancellationToken) {
    let registry = Registry::new();
    let metrics = TracerMetrics::new(&registry).unwrap();
    let cancel = CancellationToken::new();
    let config = TrackingConfig {
        rescan_every: Duration::from_millis(200),
        expire_every: Duration::from_millis(500),
        limits: TableLimits::default(),
        ..TrackingConfig::host(sysfs)
    };
    let table = tracking::start(config, metrics, cancel.clone());
    let deadline = Instant::now() + Duration::from_secs(10);
    while !text(&registry).contains("pingmesh_tracer_state{reason=\"on\"} 1") {
        assert!(
            Instant::now() < deadline,
            "tracer never came on:\n{}",
            text(&registry)
        );
        std::thread::sleep(Duration::from_millis(50));
    }
    (table, registry, cancel)
}

/// Both ends added, both closed, the listener seen, nothing malformed.
fn check_tcp_counters(registry: &Registry) {
    let metrics = text(registry);
    let value = |series: &str| -> u64 {
        metrics
            .lines()
            .find_map(|l| l.strip_prefix(series)?.trim().parse().ok())
            .unwrap_or(0)
    };
    let tcp = |outcome: &str| {
        value(&format!(
            "pingmesh_tracer_events_total{{kind=\"tcp\",outcome=\"{outcome}\"}}"
        ))
    };
    assert!(tcp("added") >= 2, "{metrics}");
    assert!(tcp("closed") >= 2, "{metrics}");
    assert!(tcp("listener") >= 1, "{metrics}");
    assert_eq!(value("pingmesh_tracer_malformed_records_total"), 0);
}

#[test]
#[ignore = "needs root and BPF: PINGMESH_BPF_TESTS=1 cargo test -p pingmesh-agent --test service_flows_bpf -- --include-ignored"]
fn a_pod_tcp_connection_between_namespaces_enters_the_table_with_its_pod_and_leaves_at_close() {
    if !enabled() {
        return;
    }
    let (table, registry, cancel) = start_tracking(Path::new("/nonexistent"));
    let metrics = text(&registry);
    assert!(
        metrics.contains("pingmesh_tracer_hooks{hook=\"tracepoint_inet_sock_set_state\"} 1"),
        "{metrics}"
    );

    let pair = NetnsPair::new();
    let pod = PodCgroup::new(std::process::id());
    let [client_ip, server_ip] = NetnsPair::ADDRS;
    // The server listens after the tracer started: its listen() names the
    // owner of the connections it accepts.
    let listener = pair.run(1, move || {
        TcpListener::bind((server_ip, 0)).expect("bind in b")
    });
    let sport = listener.local_addr().unwrap().port();
    // The client is a process in the pod's cgroup and in namespace a.
    let mut client = spawn_in_pod(
        &pod,
        Some(&pair.names[0]),
        &format!("bash -c 'exec 3<>/dev/tcp/{server_ip}/{sport} && echo connected && read x'"),
    );
    assert_eq!(read_line(&mut client), "connected");
    let client_pid = client.id();
    let (accepted, peer) = listener.accept().expect("accept");
    let cport = peer.port();

    let is_tcp = |f: &Flow, local: u16, remote: u16| {
        f.kind == pingmesh_proto::v1::ServiceFlowKind::Tcp
            && (f.local_port, f.remote_port) == (u32::from(local), u32::from(remote))
    };
    wait_for(&table, &registry, "both ends of the connection", |flows| {
        flows.iter().any(|(_, f)| is_tcp(f, cport, sport))
            && flows.iter().any(|(_, f)| is_tcp(f, sport, cport))
    });
    let flows = lock(&table).flows();
    let active = &flows
        .iter()
        .find(|(_, f)| is_tcp(f, cport, sport))
        .unwrap()
        .1;
    assert_eq!(
        (
            active.local_address.as_str(),
            active.remote_address.as_str()
        ),
        (
            client_ip.to_string().as_str(),
            server_ip.to_string().as_str()
        )
    );
    assert_eq!(
        active.owner.pid, client_pid,
        "the pod's process (exec keeps the pid)"
    );
    assert_eq!(active.owner.command, "bash");
    let pod_ref = active
        .owner
        .pod
        .clone()
        .expect("the client is in a pod cgroup");
    assert_eq!(pod_ref.pod_uid, pod.pod_uid);
    assert_eq!(pod_ref.container_id, pod.container_id);
    let proto = active.to_proto();
    assert_eq!(proto.pod_uid, pod.pod_uid);
    assert_eq!(proto.local_address, client_ip.to_string());

    // The accepted socket: the listener's owner (this test, in no pod), not
    // whatever the softirq interrupted.
    let passive = &flows
        .iter()
        .find(|(_, f)| is_tcp(f, sport, cport))
        .unwrap()
        .1;
    assert_eq!(
        passive.local_address.parse::<IpAddr>().unwrap(),
        IpAddr::V4(server_ip)
    );
    assert_eq!(passive.owner.pid, std::process::id());
    assert_eq!(passive.owner.pod, None);

    // Closed: both leave the table.
    client.stdin.as_mut().unwrap().write_all(b"bye\n").unwrap();
    assert!(client.wait().unwrap().success());
    drop(accepted);
    wait_for(
        &table,
        &registry,
        "both ends removed after close",
        |flows| {
            !flows
                .iter()
                .any(|(_, f)| is_tcp(f, cport, sport) || is_tcp(f, sport, cport))
        },
    );
    check_tcp_counters(&registry);
    cancel.cancel();
    drop(listener);
    drop(pair);
}

#[test]
#[ignore = "needs root and BPF: PINGMESH_BPF_TESTS=1 cargo test -p pingmesh-agent --test service_flows_bpf -- --include-ignored"]
fn a_pod_queue_pair_found_by_the_proc_rescan_enters_at_rtr_and_leaves_when_destroyed() {
    if !enabled() {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let (_, driver) = build_fake_verbs(dir.path());
    // The RNIC's GID table, as sysfs shows it.
    let sysfs = dir.path().join("infiniband");
    let gids = sysfs.join("mlx5_7/ports/1/gids");
    std::fs::create_dir_all(&gids).unwrap();
    std::fs::write(gids.join("3"), "0000:0000:0000:0000:0000:ffff:0ad5:0001\n").unwrap();
    let (table, registry, cancel) = start_tracking(&sysfs);

    // A service started after the tracer, with its own copy of libibverbs:
    // the periodic /proc rescan finds and attaches it.
    let pod = PodCgroup::new(std::process::id() ^ 0x5a5a);
    let before = verbs_libraries(&registry);
    let mut service = spawn_in_pod(&pod, None, &format!("{} --wait --hold", driver.display()));
    assert_eq!(read_line(&mut service), "ready");
    wait_for_new_library(&registry, before);
    let pid = service.id();
    service.stdin.as_mut().unwrap().write_all(b"go\n").unwrap();
    assert_eq!(read_line(&mut service), "connected");

    let key = FlowKey::Rdma { pid, qpn: 0x1234 };
    wait_for(&table, &registry, "the queue pair", |flows| {
        flows.iter().any(|(k, _)| *k == key)
    });
    let flow = lock(&table).get(&key).cloned().unwrap();
    assert_eq!(
        flow.local_address, "::ffff:10.213.0.1",
        "GID 3 of mlx5_7 port 1"
    );
    assert_eq!(flow.remote_address, "fe80::211:22ff:fe33:4455");
    assert_eq!((flow.local_port, flow.remote_port), (0x1234, 0x5678));
    assert_eq!(flow.flow_label, 0xabcde);
    assert_eq!(flow.device, "mlx5_7");
    let pod_ref = flow.owner.pod.clone().expect("in a pod cgroup");
    assert_eq!(pod_ref.pod_uid, pod.pod_uid);
    assert_eq!(pod_ref.container_id, pod.container_id);
    // Only the RTR transition made a flow (not INIT, RTS, nor the call
    // without IBV_QP_STATE).
    assert_eq!(
        lock(&table)
            .flows()
            .iter()
            .filter(|(k, _)| matches!(k, FlowKey::Rdma { pid: p, .. } if *p == pid))
            .count(),
        1
    );

    service.stdin.as_mut().unwrap().write_all(b"go\n").unwrap();
    assert!(service.wait().unwrap().success());
    wait_for(&table, &registry, "removed after ibv_destroy_qp", |flows| {
        !flows.iter().any(|(k, _)| *k == key)
    });
    let metrics = text(&registry);
    assert!(
        metrics
            .contains("pingmesh_tracer_events_total{kind=\"qp_destroy\",outcome=\"destroyed\"} 1"),
        "{metrics}"
    );
    assert!(metrics.contains("pingmesh_tracer_hooks{hook=\"uprobe_ibv_modify_qp\"} 1"));
    cancel.cancel();
}

#[test]
#[ignore = "needs root and BPF: PINGMESH_BPF_TESTS=1 cargo test -p pingmesh-agent --test service_flows_bpf -- --include-ignored"]
fn a_queue_pair_whose_process_died_without_destroying_it_expires() {
    if !enabled() {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let (_, driver) = build_fake_verbs(dir.path());
    let registry = Registry::new();
    let metrics = TracerMetrics::new(&registry).unwrap();
    let cancel = CancellationToken::new();
    let config = TrackingConfig {
        rescan_every: Duration::from_millis(200),
        expire_every: Duration::from_millis(200),
        limits: TableLimits {
            idle_ttl_ms: 500,
            ..TableLimits::default()
        },
        ..TrackingConfig::host("/nonexistent")
    };
    let table = tracking::start(config, metrics, cancel.clone());
    std::thread::sleep(Duration::from_millis(500));
    let before = verbs_libraries(&registry);
    let mut service = Command::new(&driver)
        .args(["--wait", "--hold"])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .spawn()
        .unwrap();
    assert_eq!(read_line(&mut service), "ready");
    wait_for_new_library(&registry, before);
    service.stdin.as_mut().unwrap().write_all(b"go\n").unwrap();
    assert_eq!(read_line(&mut service), "connected");
    let key = FlowKey::Rdma {
        pid: service.id(),
        qpn: 0x1234,
    };
    wait_for(&table, &registry, "the queue pair", |flows| {
        flows.iter().any(|(k, _)| *k == key)
    });
    // Still alive after several idle periods: kept.
    std::thread::sleep(Duration::from_millis(1_500));
    assert!(
        lock(&table).get(&key).is_some(),
        "a live process keeps its flow"
    );
    service.kill().unwrap();
    service.wait().unwrap();
    wait_for(
        &table,
        &registry,
        "expired after the process died",
        |flows| !flows.iter().any(|(k, _)| *k == key),
    );
    assert!(text(&registry).contains("pingmesh_service_flows_expired_total 1"));
    cancel.cancel();
}
