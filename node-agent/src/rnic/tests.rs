//! The RDMA probe path end to end over the loopback device: the real engine,
//! GRH parsing, flow labels, prober, responder and window aggregation, with
//! only the verbs faked. The endpoint probes its own responder, as the
//! hardware tests do on one host.

use std::sync::Mutex;
use std::time::Duration;

use pingmesh_proto::v1::{PingTarget, TargetKind};
use tokio::task::JoinHandle;
use tokio::time::timeout;

use super::*;
use crate::transport::rdma::RnicEndpointSpec;
use crate::transport::rdma::loopback::LoopbackDevice;

const GUARD: Duration = Duration::from_secs(15);

struct NullObserver;

impl ResponderObserver for NullObserver {
    fn answered(&self, _software_timed: bool) {}
    fn malformed(&self, _reason: &'static str) {}
    fn dropped(&self, _reason: &'static str) {}
    fn auth_failed(&self, _reason: &'static str) {}
}

struct Harness {
    ctx: RnicContext,
    pinglist_tx: watch::Sender<Option<Arc<Pinglist>>>,
    summaries: mpsc::Receiver<Vec<WindowSummary>>,
}

fn harness() -> Harness {
    let (pinglist_tx, pinglists) = watch::channel(None);
    let (summary_tx, summaries) = mpsc::channel(64);
    Harness {
        ctx: RnicContext {
            metrics: Arc::new(AgentMetrics::new("n1", false).unwrap()),
            observer: Arc::new(NullObserver),
            tor: String::new(),
            max_flows: 4,
            max_pending: 1_024,
            pinglists,
            summaries: summary_tx,
            endpoints: EndpointSet::new(),
            probe_keys: crate::probe::auth::ProbeKeyRing::off(),
        },
        pinglist_tx,
        summaries,
    }
}

fn spec() -> RnicEndpointSpec {
    LoopbackDevice::spec("n1", "fake0", [10, 0, 0, 1])
}

/// A pinglist probing `endpoint` (our own) from it.
fn self_probe(endpoint: &Endpoint, version: u64) -> Arc<Pinglist> {
    Arc::new(Pinglist {
        version,
        window_ms: 500,
        probe_timeout_ms: 100,
        targets: vec![PingTarget {
            source_endpoint: endpoint.id.clone(),
            target: Some(endpoint.clone()),
            target_node: "n1".into(),
            kind: TargetKind::TorMesh as i32,
            rate_pps: 200.0,
            flows: 4,
            source_tor: "tor-a".into(),
            flow_label: 0,
        }],
        probe_keys: None,
    })
}

/// Waits for a window summary with answered probes; returns it.
async fn answered_window(rx: &mut mpsc::Receiver<Vec<WindowSummary>>) -> WindowSummary {
    timeout(GUARD, async {
        loop {
            let batch = rx.recv().await.expect("prober gone");
            if let Some(w) = batch.into_iter().find(|w| w.ok > 0) {
                return w;
            }
        }
    })
    .await
    .expect("no answered window in time")
}

const OK_PROBES: &str =
    "pingmesh_probes_total{dst_tor=\"\",result=\"ok\",src_tor=\"tor-a\",node=\"n1\"}";
const PAUSED_PROBES: &str = "pingmesh_probes_not_sent_total{reason=\"port_down\",node=\"n1\"}";
const ENDPOINT_UP: &str =
    "pingmesh_rdma_endpoint_up{device=\"fake0\",endpoint=\"n1/fake0-p1\",node=\"n1\"}";

async fn wait_until(what: &str, condition: impl Fn() -> bool) {
    timeout(GUARD, async {
        while !condition() {
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    })
    .await
    .unwrap_or_else(|_| panic!("timed out waiting for: {what}"));
}

/// The value of the series whose line starts with `line_start` (0 when absent).
fn metric(metrics: &AgentMetrics, line_start: &str) -> u64 {
    let text = String::from_utf8(metrics.encode()).unwrap();
    text.lines()
        .find(|l| l.starts_with(line_start))
        .and_then(|l| l.rsplit(' ').next())
        .and_then(|v| v.parse().ok())
        .unwrap_or(0)
}

/// Runs an RNIC endpoint on `device` that is never re-opened.
fn start(h: &Harness, device: Arc<LoopbackDevice>) -> (CancellationToken, JoinHandle<()>) {
    let cancel = CancellationToken::new();
    let task = tokio::spawn(run_rnic(
        device,
        || Err(RdmaError::NoRuntime),
        h.ctx.clone(),
        cancel.clone(),
    ));
    (cancel, task)
}

async fn stop(cancel: CancellationToken, task: JoinHandle<()>) {
    cancel.cancel();
    timeout(GUARD, task).await.unwrap().unwrap();
}

async fn wait_for_endpoint(set: &EndpointSet, qpn: u32) -> Endpoint {
    let mut rx = set.subscribe();
    timeout(GUARD, async {
        loop {
            if let Some(e) = set.current().into_iter().find(|e| e.qpn == qpn) {
                return e;
            }
            rx.changed().await.unwrap();
        }
    })
    .await
    .expect("endpoint not registered in time")
}

#[tokio::test]
async fn an_rnic_probes_its_own_responder_with_nic_timestamps() {
    let mut h = harness();
    let (device, _events) = LoopbackDevice::open(spec(), [0x100, 0x200], true).unwrap();
    let (cancel, task) = start(&h, device);

    let endpoint = wait_for_endpoint(&h.ctx.endpoints, 0x200).await;
    assert_eq!(endpoint.transport, Transport::Rdma as i32);
    assert_eq!(endpoint.address, "::ffff:10.0.0.1");
    assert_eq!(endpoint.device, "fake0");
    assert_eq!(endpoint.id, "n1/fake0-p1");
    h.pinglist_tx.send_replace(Some(self_probe(&endpoint, 1)));

    let window = answered_window(&mut h.summaries).await;
    assert_eq!(window.source_endpoint, "n1/fake0-p1");
    assert_eq!(window.target_endpoint, "n1/fake0-p1");
    assert_eq!(window.sent, window.ok + window.lost + window.invalid);
    assert_eq!(window.invalid, 0, "{window:?}");
    assert_eq!(window.software_timed, 0, "NIC-timed device: {window:?}");
    let rtt = window.network_rtt.unwrap();
    // The fake NIC clock advances 1 µs per completion: the network RTT is a
    // few µs of fake clock, never host scheduling time.
    assert!(rtt.p50_ns > 0 && rtt.max_ns < 100_000, "{rtt:?}");
    assert_eq!(metric(&h.ctx.metrics, ENDPOINT_UP), 1, "port active");

    stop(cancel, task).await;
    assert!(
        h.ctx.endpoints.current().is_empty(),
        "stopped endpoint leaves"
    );
}

#[tokio::test]
async fn with_probe_keys_the_rnic_signs_and_verifies_56_byte_messages() {
    let mut h = harness();
    let (device, _events) = LoopbackDevice::open(spec(), [0x100, 0x200], true).unwrap();
    let (cancel, task) = start(&h, device);
    let endpoint = wait_for_endpoint(&h.ctx.endpoints, 0x200).await;
    let mut list = Arc::unwrap_or_clone(self_probe(&endpoint, 1));
    list.probe_keys = Some(pingmesh_proto::probe_auth::keys_around(
        b"0123456789abcdef0123456789abcdef",
        9,
    ));
    h.pinglist_tx.send_replace(Some(Arc::new(list)));
    let window = answered_window(&mut h.summaries).await;
    assert_eq!(window.invalid, 0, "{window:?}");
    assert!(
        h.ctx.probe_keys.keys().is_some(),
        "the prober installed the keys"
    );
    let text = String::from_utf8(h.ctx.metrics.encode()).unwrap();
    let failures: Vec<&str> = text
        .lines()
        .filter(|l| l.starts_with("pingmesh_probe_auth_failures_total{") && !l.ends_with(" 0"))
        .collect();
    assert!(failures.is_empty(), "{failures:?}");
    stop(cancel, task).await;
}

#[tokio::test]
async fn without_nic_clock_samples_are_host_timed_and_flagged() {
    let mut h = harness();
    let (device, _events) = LoopbackDevice::open(spec(), [0x100, 0x200], false).unwrap();
    let (cancel, task) = start(&h, device);
    let endpoint = wait_for_endpoint(&h.ctx.endpoints, 0x200).await;
    h.pinglist_tx.send_replace(Some(self_probe(&endpoint, 1)));
    let window = answered_window(&mut h.summaries).await;
    assert_eq!(window.software_timed, window.ok, "{window:?}");
    assert_eq!(window.invalid, 0, "{window:?}");
    stop(cancel, task).await;
}

#[tokio::test]
async fn port_down_pauses_probing_and_port_up_resumes_it() {
    let h = harness();
    let (device, events) = LoopbackDevice::open(spec(), [0x100, 0x200], true).unwrap();
    let (cancel, task) = start(&h, device);
    let endpoint = wait_for_endpoint(&h.ctx.endpoints, 0x200).await;
    h.pinglist_tx.send_replace(Some(self_probe(&endpoint, 1)));
    let metrics = h.ctx.metrics.clone();
    let ok = || metric(&metrics, OK_PROBES);
    let paused = || metric(&metrics, PAUSED_PROBES);
    wait_until("probes answered", || ok() > 5).await;

    events.send(DeviceEvent::PortDown { port: 2 }).unwrap();
    events.send(DeviceEvent::PortDown { port: 1 }).unwrap();
    wait_until("probes held back while down", || paused() > 5).await;
    // In-flight probes finish within the 100 ms timeout; then nothing is sent.
    tokio::time::sleep(Duration::from_millis(300)).await;
    let ok_while_down = ok();
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert_eq!(
        ok(),
        ok_while_down,
        "no probe answered while the port is down"
    );
    assert_eq!(metric(&metrics, ENDPOINT_UP), 0);
    assert_eq!(
        h.ctx.endpoints.current().len(),
        1,
        "a down port stays registered: peers see the loss"
    );

    events.send(DeviceEvent::PortUp { port: 1 }).unwrap();
    wait_until("probing resumed", || ok() > ok_while_down + 5).await;
    assert_eq!(metric(&metrics, ENDPOINT_UP), 1);
    stop(cancel, task).await;
}

#[tokio::test]
async fn a_fatal_error_reopens_the_device_and_registers_the_new_qpn() {
    let mut h = harness();
    let (device, events) = LoopbackDevice::open(spec(), [0x100, 0x200], true).unwrap();
    let attempts = Arc::new(Mutex::new(0u32));
    let reopen = {
        let attempts = attempts.clone();
        move || {
            let mut n = attempts.lock().unwrap();
            *n += 1;
            if *n == 1 {
                // The device is still resetting.
                return Err(RdmaError::DeviceNotFound {
                    device: "fake0".into(),
                });
            }
            LoopbackDevice::open(spec(), [0x300, 0x400], true).map(|(d, _)| d)
        }
    };
    let cancel = CancellationToken::new();
    let task = tokio::spawn(run_rnic(device, reopen, h.ctx.clone(), cancel.clone()));
    let first = wait_for_endpoint(&h.ctx.endpoints, 0x200).await;
    h.pinglist_tx.send_replace(Some(self_probe(&first, 1)));
    answered_window(&mut h.summaries).await;

    let mut changes = h.ctx.endpoints.subscribe();
    changes.mark_unchanged();
    events
        .send(DeviceEvent::Fatal {
            reason: "test".into(),
        })
        .unwrap();
    timeout(GUARD, changes.changed()).await.unwrap().unwrap();
    assert!(
        h.ctx.endpoints.current().is_empty(),
        "a failed endpoint leaves the registration at once"
    );

    let second = wait_for_endpoint(&h.ctx.endpoints, 0x400).await;
    assert_eq!(second.id, first.id, "same endpoint, new QPN");
    assert_eq!(*attempts.lock().unwrap(), 2);
    let text = String::from_utf8(h.ctx.metrics.encode()).unwrap();
    for event in ["fatal", "reopen_failed", "reopened"] {
        assert!(
            text.contains(&format!(
                "pingmesh_rdma_device_events_total{{device=\"fake0\",event=\"{event}\",node=\"n1\"}} 1"
            )),
            "{event} not counted once:\n{text}"
        );
    }

    // The re-opened endpoint probes with the pinglist in force (pointing at the new QPN).
    h.pinglist_tx.send_replace(Some(self_probe(&second, 2)));
    while h.summaries.try_recv().is_ok() {}
    let window = answered_window(&mut h.summaries).await;
    assert_eq!(window.invalid, 0);
    stop(cancel, task).await;
}

#[tokio::test]
async fn each_rnic_of_a_node_probes_only_its_own_targets() {
    let mut h = harness();
    let specs = [
        LoopbackDevice::spec("n1", "fake0", [10, 0, 0, 1]),
        LoopbackDevice::spec("n1", "fake1", [10, 0, 1, 1]),
    ];
    let cancel = CancellationToken::new();
    let mut tasks = Vec::new();
    let mut senders = Vec::new();
    for (i, spec) in specs.iter().enumerate() {
        let base = 0x100 * (u32::try_from(i).unwrap() + 1) * 16;
        let (device, events) = LoopbackDevice::open(spec.clone(), [base, base + 1], true).unwrap();
        senders.push(events);
        tasks.push(tokio::spawn(run_rnic(
            device,
            || Err(RdmaError::NoRuntime),
            h.ctx.clone(),
            cancel.clone(),
        )));
    }
    let first = wait_for_endpoint(&h.ctx.endpoints, 0x1001).await;
    let second = wait_for_endpoint(&h.ctx.endpoints, 0x2001).await;
    assert_eq!(
        (first.device.as_str(), second.device.as_str()),
        ("fake0", "fake1")
    );
    assert_eq!(
        (first.address.as_str(), second.address.as_str()),
        ("::ffff:10.0.0.1", "::ffff:10.0.1.1"),
        "each RNIC registers its own GID"
    );
    // One pinglist for the node: each RNIC probes its own responder (a
    // rail-optimized fabric pairs RNICs of the same rail).
    let mut list = (*self_probe(&first, 1)).clone();
    list.targets.extend(self_probe(&second, 1).targets.clone());
    h.pinglist_tx.send_replace(Some(Arc::new(list)));

    let mut seen = std::collections::BTreeSet::new();
    timeout(GUARD, async {
        while seen.len() < 2 {
            for w in h.summaries.recv().await.unwrap() {
                assert_eq!(
                    w.source_endpoint, w.target_endpoint,
                    "an RNIC probed another RNIC's target: {w:?}"
                );
                if w.ok > 0 {
                    seen.insert(w.source_endpoint.clone());
                }
            }
        }
    })
    .await
    .expect("both RNICs answered");
    assert_eq!(
        seen.into_iter().collect::<Vec<_>>(),
        ["n1/fake0-p1", "n1/fake1-p1"]
    );
    cancel.cancel();
    for t in tasks {
        timeout(GUARD, t).await.unwrap().unwrap();
    }
}
