use super::*;
use crate::transport::rdma::clock::NicClock;
use crate::transport::rdma::verbs::{Call, RecordingVerbs};

const PROBER: QpRole = QpRole::Prober;
const RESPONDER: QpRole = QpRole::Responder;

fn config(gid: Gid, ah_cache_capacity: usize) -> EngineConfig {
    EngineConfig {
        local_gid: gid,
        traffic_class: 0,
        service_level: 0,
        ah_cache_capacity,
    }
}

fn ipv4_gid() -> Gid {
    Gid::from_ipv4([10, 0, 0, 7])
}

/// An engine over the fake with a 1 GHz NIC clock.
fn engine_with(gid: Gid, ah_cache_capacity: usize) -> Engine<RecordingVerbs> {
    Engine::new(
        RecordingVerbs::new(gid),
        config(gid, ah_cache_capacity),
        NicClock::new(1_000_000, u64::MAX),
    )
    .unwrap()
}

fn engine() -> Engine<RecordingVerbs> {
    engine_with(ipv4_gid(), 64)
}

/// The responder QP of the same fake device, with flow label `label`.
fn own_responder(e: &Engine<RecordingVerbs>, label: u32) -> RdmaDest {
    RdmaDest {
        gid: e.verbs().local_gid,
        qpn: e.verbs().qpns[RESPONDER.index()],
        flow_label: label,
    }
}

fn next(e: &mut Engine<RecordingVerbs>, role: QpRole, buf: &mut [u8]) -> RdmaEvent {
    e.next_ready(role, buf).unwrap().expect("an event is ready")
}

fn calls(e: &Engine<RecordingVerbs>) -> &[Call] {
    &e.verbs().calls
}

#[test]
fn every_receive_slot_of_both_queue_pairs_is_posted_at_start() {
    let e = engine();
    for role in QpRole::ALL {
        assert_eq!(e.verbs().posted_receives(role), usize::from(QUEUE_DEPTH));
    }
}

#[test]
fn a_probe_reaches_the_responder_with_the_sender_read_from_the_ipv4_header() {
    let mut e = engine();
    let dest = own_responder(&e, 0x1_2345);
    e.send(PROBER, b"probe", &dest).unwrap();
    let mut buf = [0u8; 64];
    let RdmaEvent::Datagram {
        len,
        from,
        nic_ns,
        truncated,
        ..
    } = next(&mut e, RESPONDER, &mut buf)
    else {
        panic!("expected a datagram");
    };
    assert_eq!(&buf[..len], b"probe");
    assert_eq!(from.gid, ipv4_gid());
    assert_eq!(from.qpn, e.verbs().qpns[PROBER.index()]);
    // An IPv4 header has no flow label: the ACK label is the stable per-prober one.
    assert_eq!(from.flow_label, ack_flow_label(None, &ipv4_gid(), from.qpn));
    assert!(nic_ns.is_some());
    assert!(!truncated);
}

#[test]
fn on_ipv6_gids_the_ack_reuses_the_probe_flow_label_from_the_grh() {
    let gid: Gid = "fd00::7".parse().unwrap();
    let mut e = engine_with(gid, 64);
    let dest = own_responder(&e, 0xA_BCDE);
    e.send(PROBER, b"probe", &dest).unwrap();
    let mut buf = [0u8; 64];
    let RdmaEvent::Datagram { from, .. } = next(&mut e, RESPONDER, &mut buf) else {
        panic!("expected a datagram");
    };
    assert_eq!(from.flow_label, 0xA_BCDE);
    assert_eq!(from.gid, gid);
}

#[test]
fn send_completions_are_matched_to_their_receipts_by_work_request_id() {
    let mut e = engine();
    let dest = RdmaDest {
        gid: Gid::from_ipv4([10, 0, 0, 9]),
        qpn: 0x999,
        flow_label: 5,
    };
    let receipts: Vec<u32> = (0..5)
        .map(|_| e.send(PROBER, b"x", &dest).unwrap().tx_key)
        .collect();
    assert_eq!(receipts, vec![0, 1, 2, 3, 4]);
    let mut buf = [0u8; 64];
    let mut stamps = Vec::new();
    for _ in 0..5 {
        let RdmaEvent::TxTimestamp { key, nic_ns, .. } = next(&mut e, PROBER, &mut buf) else {
            panic!("expected a send completion");
        };
        stamps.push((key, nic_ns.unwrap()));
    }
    // The fake NIC clock starts at 1000 cycles and adds 10 per completion; 1 GHz = 1 ns/cycle.
    assert_eq!(
        stamps,
        vec![(0, 1_000), (1, 1_010), (2, 1_020), (3, 1_030), (4, 1_040)]
    );
    assert_eq!(e.outstanding_sends(PROBER), 0);
}

#[test]
fn a_send_completion_for_a_slot_not_in_use_is_skipped() {
    let mut e = engine();
    e.verbs_mut().completions[PROBER.index()].push_back(Completion {
        wr_id: send_wr_id(7, 3),
        kind: CompletionKind::Send,
        status: STATUS_SUCCESS,
        byte_len: 0,
        src_qp: 0,
        raw_timestamp: None,
    });
    let mut buf = [0u8; 8];
    assert_eq!(
        next(&mut e, PROBER, &mut buf),
        RdmaEvent::Skipped {
            reason: "unknown_send_completion"
        }
    );
}

#[test]
fn an_error_completion_reports_the_failed_send_and_frees_its_slot() {
    let mut e = engine();
    let dest = RdmaDest {
        gid: Gid::from_ipv4([10, 0, 0, 9]),
        qpn: 0x999,
        flow_label: 5,
    };
    let key = e.send(PROBER, b"x", &dest).unwrap().tx_key;
    e.verbs_mut().completions[PROBER.index()][0].status = 12; // IBV_WC_RETRY_EXC_ERR
    let mut buf = [0u8; 8];
    assert_eq!(
        next(&mut e, PROBER, &mut buf),
        RdmaEvent::SendFailed { key, status: 12 }
    );
    assert_eq!(e.outstanding_sends(PROBER), 0);
}

#[test]
fn a_failed_post_returns_its_slot_and_uses_up_no_key() {
    let mut e = engine();
    let dest = RdmaDest {
        gid: Gid::from_ipv4([10, 0, 0, 9]),
        qpn: 0x999,
        flow_label: 5,
    };
    e.verbs_mut().fail_next_send = Some(12); // ENOMEM
    let err = e.send(PROBER, b"x", &dest).unwrap_err();
    assert!(
        matches!(
            err,
            RdmaError::Verbs {
                op: "ibv_post_send",
                ..
            }
        ),
        "{err}"
    );
    assert_eq!(e.outstanding_sends(PROBER), 0);
    assert_eq!(e.send(PROBER, b"x", &dest).unwrap().tx_key, 0);
}

#[test]
fn a_failed_address_handle_creation_is_an_error_and_caches_nothing() {
    let mut e = engine();
    let dest = RdmaDest {
        gid: Gid::from_ipv4([10, 0, 0, 9]),
        qpn: 0x999,
        flow_label: 5,
    };
    e.verbs_mut().fail_next_ah = Some(113); // EHOSTUNREACH: no neighbour entry
    let err = e.send(PROBER, b"x", &dest).unwrap_err();
    assert!(
        matches!(
            err,
            RdmaError::Verbs {
                op: "ibv_create_ah",
                ..
            }
        ),
        "{err}"
    );
    assert_eq!(e.cached_address_handles(), 0);
    assert_eq!(e.outstanding_sends(PROBER), 0);
}

#[test]
fn the_send_queue_holds_at_most_its_depth_until_completions_are_read() {
    let mut e = engine();
    let dest = RdmaDest {
        gid: Gid::from_ipv4([10, 0, 0, 9]),
        qpn: 0x999,
        flow_label: 5,
    };
    for _ in 0..QUEUE_DEPTH {
        e.send(PROBER, b"x", &dest).unwrap();
    }
    let full = e.send(PROBER, b"x", &dest).unwrap_err();
    assert_eq!(full.category(), "send_queue_full");
    let mut buf = [0u8; 8];
    next(&mut e, PROBER, &mut buf);
    assert_eq!(
        e.send(PROBER, b"x", &dest).unwrap().tx_key,
        u32::from(QUEUE_DEPTH)
    );
}

#[test]
fn oversized_payloads_are_refused_before_touching_the_device() {
    let mut e = engine();
    let dest = own_responder(&e, 1);
    let before = calls(&e).len();
    assert_eq!(
        e.send(PROBER, &[0; MAX_PAYLOAD + 1], &dest)
            .unwrap_err()
            .category(),
        "payload_too_large"
    );
    assert_eq!(calls(&e).len(), before);
}

#[test]
fn each_receive_slot_is_reposted_after_its_datagram_is_read() {
    let mut e = engine();
    let dest = own_responder(&e, 1);
    let mut buf = [0u8; 64];
    for _ in 0..(3 * QUEUE_DEPTH) {
        e.send(PROBER, b"p", &dest).unwrap();
        assert!(matches!(
            next(&mut e, RESPONDER, &mut buf),
            RdmaEvent::Datagram { .. }
        ));
        next(&mut e, PROBER, &mut buf); // the send completion
    }
    assert_eq!(
        e.verbs().posted_receives(RESPONDER),
        usize::from(QUEUE_DEPTH)
    );
}

#[test]
fn a_failed_receive_is_skipped_and_its_slot_reposted() {
    let mut e = engine();
    let from = Gid::from_ipv4([10, 0, 0, 1]);
    assert!(e.verbs_mut().deliver(RESPONDER, &from, 0x42, 1, b"p"));
    e.verbs_mut().completions[RESPONDER.index()][0].status = 4; // IBV_WC_LOC_PROT_ERR
    let mut buf = [0u8; 64];
    assert_eq!(
        next(&mut e, RESPONDER, &mut buf),
        RdmaEvent::Skipped {
            reason: "receive_error"
        }
    );
    assert_eq!(
        e.verbs().posted_receives(RESPONDER),
        usize::from(QUEUE_DEPTH)
    );
}

#[test]
fn a_datagram_longer_than_the_buffer_is_cut_and_flagged() {
    let mut e = engine();
    let dest = own_responder(&e, 1);
    e.send(PROBER, &[7u8; 40], &dest).unwrap();
    let mut buf = [0u8; 16];
    let RdmaEvent::Datagram { len, truncated, .. } = next(&mut e, RESPONDER, &mut buf) else {
        panic!("expected a datagram");
    };
    assert_eq!(len, 16);
    assert!(truncated);
}

#[test]
fn an_idle_queue_is_armed_once_and_reports_nothing() {
    let mut e = engine();
    let mut buf = [0u8; 8];
    assert_eq!(e.next_ready(PROBER, &mut buf).unwrap(), None);
    let arms = calls(&e)
        .iter()
        .filter(|c| matches!(c, Call::Arm { role } if *role == PROBER))
        .count();
    assert_eq!(arms, 1);
}

#[test]
fn without_a_nic_clock_completions_carry_host_time_only() {
    let gid = ipv4_gid();
    let mut verbs = RecordingVerbs::new(gid);
    verbs.clock = None;
    let mut e = Engine::new(verbs, config(gid, 8), None).unwrap();
    assert!(!e.nic_timed());
    let dest = own_responder(&e, 1);
    let receipt = e.send(PROBER, b"p", &dest).unwrap();
    let mut buf = [0u8; 64];
    let RdmaEvent::TxTimestamp {
        nic_ns, host_ns, ..
    } = next(&mut e, PROBER, &mut buf)
    else {
        panic!("expected a send completion");
    };
    assert_eq!(nic_ns, None);
    assert!(host_ns >= receipt.host_ns);
}

#[test]
fn address_handles_are_created_once_per_flow_label_and_reused() {
    let mut e = engine();
    let mut buf = [0u8; 64];
    for round in 0..3 {
        for label in 1..=4 {
            e.send(PROBER, b"p", &own_responder(&e, label)).unwrap();
            next(&mut e, PROBER, &mut buf);
            next(&mut e, RESPONDER, &mut buf);
        }
        let created = calls(&e)
            .iter()
            .filter(|c| matches!(c, Call::CreateAh { .. }))
            .count();
        assert_eq!(created, 4, "round {round}");
    }
    assert_eq!(e.cached_address_handles(), 4);
}

#[test]
fn an_evicted_address_handle_is_destroyed_once_no_send_may_still_use_it() {
    let mut e = engine_with(ipv4_gid(), 2);
    let far = |label| RdmaDest {
        gid: Gid::from_ipv4([10, 0, 0, 9]),
        qpn: 0x999,
        flow_label: label,
    };
    e.send(PROBER, b"p", &far(1)).unwrap();
    e.send(PROBER, b"p", &far(2)).unwrap();
    e.send(PROBER, b"p", &far(3)).unwrap(); // evicts label 1's handle
    let destroyed = |e: &Engine<RecordingVerbs>| {
        calls(e)
            .iter()
            .filter_map(|c| {
                if let Call::DestroyAh { id } = c {
                    Some(*id)
                } else {
                    None
                }
            })
            .collect::<Vec<_>>()
    };
    assert!(destroyed(&e).is_empty(), "sends are still outstanding");
    let mut buf = [0u8; 8];
    for _ in 0..3 {
        next(&mut e, PROBER, &mut buf);
    }
    assert_eq!(
        destroyed(&e),
        vec![1],
        "the first handle created was the one evicted"
    );
    assert_eq!(e.cached_address_handles(), 2);
}

#[test]
fn teardown_releases_in_dependency_order_and_destroys_every_handle_once() {
    let mut e = engine_with(ipv4_gid(), 2);
    let far = |label| RdmaDest {
        gid: Gid::from_ipv4([10, 0, 0, 9]),
        qpn: 0x999,
        flow_label: label,
    };
    for label in 1..=3 {
        e.send(PROBER, b"p", &far(label)).unwrap();
    }
    e.teardown();
    e.teardown(); // idempotent, and Drop calls it once more
    let tail: Vec<String> = calls(&e)
        .iter()
        .skip_while(|c| !matches!(c, Call::Release(_)))
        .map(|c| match c {
            Call::Release(r) => format!("{r:?}"),
            Call::DestroyAh { .. } => "Ah".to_owned(),
            other => format!("unexpected {other:?}"),
        })
        .collect();
    assert_eq!(
        tail,
        [
            "QueuePairs",
            "CompletionQueues",
            "Ah",
            "Ah",
            "Ah",
            "MemoryRegions",
            "ProtectionDomain",
            "CompletionChannels",
            "Context"
        ]
    );
}

#[test]
fn send_keys_and_slots_round_trip_through_the_work_request_id() {
    for (key, slot) in [(0, 0), (u32::MAX, QUEUE_DEPTH - 1), (12_345, 7)] {
        assert_eq!(split_send_wr_id(send_wr_id(key, slot)), (key, slot));
    }
}
