use std::net::{IpAddr, Ipv4Addr};

use super::*;

const NETNS: u32 = 4_026_532_000;

/// Owners by pid: pid 100 is a pod's process, others are not in pods.
struct FakeHost;

impl Resolve for FakeHost {
    fn owner(&mut self, origin: &Origin, _now_ms: u64) -> Owner {
        Owner {
            pid: origin.pid,
            command: origin.comm.clone(),
            pod: (origin.pid == 100).then(|| PodRef {
                pod_uid: "1b2c3d4e-5f60-7182-93a4-b5c6d7e8f901".into(),
                container_id: "ab".repeat(32),
            }),
        }
    }
    fn local_gid(&mut self, device: &str, port: u8, sgid_index: u8) -> Option<String> {
        (device == "mlx5_0" && port == 1 && sgid_index == 3).then(|| "::ffff:10.0.0.1".into())
    }
}

fn origin(pid: u32) -> Origin {
    Origin {
        pid,
        cgroup_id: 7,
        ts_ns: 1,
        comm: format!("proc{pid}"),
    }
}

fn tcp(sock: u64, pid: u32, ports: (u16, u16), states: (TcpState, TcpState)) -> TraceEvent {
    TraceEvent::Tcp(TcpEvent {
        origin: origin(pid),
        sock,
        src: IpAddr::V4(Ipv4Addr::new(10, 0, 0, 1)),
        dst: IpAddr::V4(Ipv4Addr::new(10, 0, 0, 2)),
        sport: ports.0,
        dport: ports.1,
        old_state: states.0,
        new_state: states.1,
        netns: NETNS,
    })
}

fn rtr(pid: u32, qpn: u32) -> TraceEvent {
    TraceEvent::QpRtr(QpRtrEvent {
        origin: origin(pid),
        qp_num: qpn,
        dest_qp_num: 0x5678,
        dgid: [0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0xff, 0xff, 10, 0, 0, 2],
        flow_label: 0xF_ABCDE,
        sgid_index: 3,
        traffic_class: 0,
        hop_limit: 64,
        port_num: 1,
        attr_mask: 0,
        qp_type: 2,
        device: "mlx5_0".into(),
    })
}

fn destroy(pid: u32, qpn: u32) -> TraceEvent {
    TraceEvent::QpDestroy(QpDestroyEvent {
        origin: origin(pid),
        qp_num: qpn,
    })
}

fn table(capacity: usize) -> FlowTable {
    FlowTable::new(TableLimits {
        capacity,
        listeners: 2,
        idle_ttl_ms: 1_000,
    })
}

use TcpState::{Close, Established, FinWait1, Listen, SynRecv, SynSent};

#[test]
fn an_active_tcp_open_enters_with_its_owner_and_leaves_at_close() {
    let mut t = table(8);
    let up = tcp(1, 100, (40000, 5201), (SynSent, Established));
    assert_eq!(t.apply(&up, &mut FakeHost, 10), Outcome::Added);
    let flow = t.get(&FlowKey::Tcp { sock: 1 }).unwrap().to_proto();
    assert_eq!(flow.kind, ServiceFlowKind::Tcp as i32);
    assert_eq!(
        (flow.local_address.as_str(), flow.local_port),
        ("10.0.0.1", 40000)
    );
    assert_eq!(
        (flow.remote_address.as_str(), flow.remote_port),
        ("10.0.0.2", 5201)
    );
    assert_eq!(flow.pod_uid, "1b2c3d4e-5f60-7182-93a4-b5c6d7e8f901");
    assert_eq!(flow.container_id, "ab".repeat(32));
    assert_eq!((flow.pid, flow.command.as_str()), (100, "proc100"));
    assert_eq!((flow.first_seen_ms, flow.last_seen_ms), (10, 10));

    // Going down keeps it (data may still flow) and marks the sighting.
    let down = tcp(1, 55, (40000, 5201), (Established, FinWait1));
    assert_eq!(t.apply(&down, &mut FakeHost, 20), Outcome::Refreshed);
    assert_eq!(t.get(&FlowKey::Tcp { sock: 1 }).unwrap().last_seen_ms, 20);
    let closed = tcp(1, 55, (40000, 5201), (FinWait1, Close));
    assert_eq!(t.apply(&closed, &mut FakeHost, 30), Outcome::Closed);
    assert!(t.is_empty());
    // A second CLOSE (or one of a connection never seen) changes nothing.
    assert_eq!(t.apply(&closed, &mut FakeHost, 31), Outcome::Ignored);
}

#[test]
fn a_passive_open_takes_the_listener_owner_not_the_interrupted_task() {
    let mut t = table(8);
    let listen = tcp(9, 100, (5201, 0), (Close, Listen));
    assert_eq!(t.apply(&listen, &mut FakeHost, 1), Outcome::Listener);
    // Softirq context: pid 4242 is whatever ran when the ACK arrived.
    let accepted = tcp(2, 4242, (5201, 40000), (SynRecv, Established));
    assert_eq!(t.apply(&accepted, &mut FakeHost, 2), Outcome::Added);
    let owner = &t.get(&FlowKey::Tcp { sock: 2 }).unwrap().owner;
    assert_eq!(owner.pid, 100);
    assert!(owner.pod.is_some());

    // The listener closes: later passive opens on its port are unattributed.
    let unlisten = tcp(9, 100, (5201, 0), (Listen, Close));
    assert_eq!(t.apply(&unlisten, &mut FakeHost, 3), Outcome::Listener);
    let later = tcp(3, 4242, (5201, 40001), (SynRecv, Established));
    assert_eq!(t.apply(&later, &mut FakeHost, 4), Outcome::Added);
    assert_eq!(
        t.get(&FlowKey::Tcp { sock: 3 }).unwrap().owner,
        Owner::default()
    );
}

#[test]
fn listeners_in_other_namespaces_do_not_claim_connections() {
    let mut t = table(8);
    let mut listen = tcp(9, 100, (5201, 0), (Close, Listen));
    if let TraceEvent::Tcp(e) = &mut listen {
        e.netns = NETNS + 1;
    }
    t.apply(&listen, &mut FakeHost, 1);
    let accepted = tcp(2, 4242, (5201, 40000), (SynRecv, Established));
    t.apply(&accepted, &mut FakeHost, 2);
    assert_eq!(t.get(&FlowKey::Tcp { sock: 2 }).unwrap().owner.pid, 0);
}

#[test]
fn the_listener_memory_is_bounded() {
    let mut t = table(8);
    for port in 1..=5 {
        t.apply(
            &tcp(u64::from(port), 100, (port, 0), (Close, Listen)),
            &mut FakeHost,
            1,
        );
    }
    assert_eq!(t.listeners.len(), 2);
}

#[test]
fn loopback_and_unspecified_connections_are_ignored() {
    let mut t = table(8);
    for (src, dst) in [
        (
            IpAddr::V4(Ipv4Addr::LOCALHOST),
            IpAddr::V4(Ipv4Addr::LOCALHOST),
        ),
        ("::1".parse().unwrap(), "::1".parse().unwrap()),
        (
            "::ffff:127.0.0.1".parse().unwrap(),
            "::ffff:127.0.0.1".parse().unwrap(),
        ),
        (
            IpAddr::V4(Ipv4Addr::UNSPECIFIED),
            IpAddr::V4(Ipv4Addr::new(10, 0, 0, 2)),
        ),
    ] {
        let TraceEvent::Tcp(mut e) = tcp(1, 100, (1, 2), (SynSent, Established)) else {
            unreachable!()
        };
        e.src = src;
        e.dst = dst;
        assert_eq!(
            t.apply(&TraceEvent::Tcp(e), &mut FakeHost, 1),
            Outcome::Ignored,
            "{src} -> {dst}"
        );
    }
    assert!(t.is_empty());
}

#[test]
fn an_rdma_queue_pair_enters_at_rtr_and_leaves_when_destroyed() {
    let mut t = table(8);
    assert_eq!(t.apply(&rtr(100, 0x1234), &mut FakeHost, 5), Outcome::Added);
    let flow = t.snapshot().pop().unwrap();
    assert_eq!(flow.kind, ServiceFlowKind::Rdma as i32);
    assert_eq!(flow.local_address, "::ffff:10.0.0.1");
    assert_eq!(flow.remote_address, "::ffff:10.0.0.2");
    assert_eq!((flow.local_port, flow.remote_port), (0x1234, 0x5678));
    assert_eq!(
        flow.flow_label, 0xA_BCDE,
        "20 bits: the rest is not a label"
    );
    assert!(!flow.pod_uid.is_empty());
    // Another process's QP with the same number is another flow.
    assert_eq!(t.apply(&rtr(200, 0x1234), &mut FakeHost, 6), Outcome::Added);
    assert_eq!(
        t.apply(&destroy(100, 0x1234), &mut FakeHost, 7),
        Outcome::Destroyed
    );
    assert_eq!(t.len(), 1);
    assert_eq!(
        t.apply(&destroy(100, 0x1234), &mut FakeHost, 8),
        Outcome::Ignored
    );
    let left = t.flows();
    assert_eq!(
        left[0].0,
        FlowKey::Rdma {
            pid: 200,
            qpn: 0x1234
        }
    );
}

#[test]
fn an_unknown_local_gid_leaves_the_address_empty() {
    let mut t = table(8);
    let TraceEvent::QpRtr(mut e) = rtr(100, 1) else {
        unreachable!()
    };
    e.device = String::new();
    t.apply(&TraceEvent::QpRtr(e), &mut FakeHost, 1);
    assert_eq!(t.snapshot()[0].local_address, "");
}

#[test]
fn a_full_table_refuses_and_counts_new_flows_but_updates_known_ones() {
    let mut t = table(2);
    assert_eq!(t.apply(&rtr(100, 1), &mut FakeHost, 1), Outcome::Added);
    assert_eq!(t.apply(&rtr(100, 2), &mut FakeHost, 1), Outcome::Added);
    assert_eq!(
        t.apply(&rtr(100, 3), &mut FakeHost, 1),
        Outcome::DroppedFull
    );
    assert_eq!(
        t.apply(
            &tcp(1, 100, (1, 2), (SynSent, Established)),
            &mut FakeHost,
            1
        ),
        Outcome::DroppedFull
    );
    assert_eq!(t.dropped_full(), 2);
    assert_eq!(t.len(), 2);
    // A known key still updates, keeping its first sighting.
    assert_eq!(t.apply(&rtr(100, 2), &mut FakeHost, 9), Outcome::Refreshed);
    let f = t.get(&FlowKey::Rdma { pid: 100, qpn: 2 }).unwrap();
    assert_eq!((f.first_seen_ms, f.last_seen_ms), (1, 9));
    // Room again after a destroy.
    t.apply(&destroy(100, 1), &mut FakeHost, 10);
    assert_eq!(t.apply(&rtr(100, 3), &mut FakeHost, 10), Outcome::Added);
}

#[test]
fn idle_flows_are_checked_and_only_dead_ones_leave() {
    let mut t = table(8);
    t.apply(&rtr(100, 1), &mut FakeHost, 0);
    t.apply(&rtr(100, 2), &mut FakeHost, 0);
    t.apply(&rtr(100, 3), &mut FakeHost, 900);
    let mut asked = Vec::new();
    // QP 1 is dead, QP 2 alive; QP 3 is not idle yet and not asked about.
    let removed = t.expire(1_000, &mut |k, _| {
        asked.push(*k);
        *k != FlowKey::Rdma { pid: 100, qpn: 1 }
    });
    assert_eq!(removed, 1);
    asked.sort();
    assert_eq!(
        asked,
        vec![
            FlowKey::Rdma { pid: 100, qpn: 1 },
            FlowKey::Rdma { pid: 100, qpn: 2 }
        ]
    );
    let alive = t.get(&FlowKey::Rdma { pid: 100, qpn: 2 }).unwrap();
    assert_eq!(
        alive.last_seen_ms, 1_000,
        "checked alive: silent again from now"
    );
    assert_eq!(t.expire(1_500, &mut |_, _| false), 0, "nothing idle yet");
    assert_eq!(t.expire(2_000, &mut |_, _| false), 2);
    assert!(t.is_empty());
}

#[test]
fn a_reused_socket_replaces_the_flow_whose_close_was_lost() {
    let mut t = table(8);
    t.apply(
        &tcp(1, 100, (40000, 5201), (SynSent, Established)),
        &mut FakeHost,
        1,
    );
    t.apply(
        &tcp(1, 200, (40001, 80), (SynSent, Established)),
        &mut FakeHost,
        2,
    );
    let f = t.get(&FlowKey::Tcp { sock: 1 }).unwrap();
    assert_eq!((f.local_port, f.remote_port, f.owner.pid), (40001, 80, 200));
    assert_eq!(
        f.first_seen_ms, 2,
        "another connection: a new first sighting"
    );
    assert_eq!(t.len(), 1);
}
