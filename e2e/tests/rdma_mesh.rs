//! Two agents probing each other over a real RDMA device (an RNIC or
//! soft-RoCE), through the mesh controller: registration with GIDs and
//! responder QPNs, pinglists, UD probes with NIC (or host) timestamps, and
//! window reports. Both agents share the host's device, each with its own
//! queue pairs, as two nodes would share a fabric.
//!
//! Ignored by default; `hack/softroce.sh` sets up soft-RoCE on a Linux VM
//! and runs it:
//!
//! ```text
//! cargo build --workspace --bins
//! PINGMESH_RDMA_DEVICE=rxe0 cargo test -p pingmesh-e2e --test rdma_mesh -- --ignored
//! ```
#![allow(clippy::expect_used, clippy::unwrap_used, clippy::panic)]

mod common;

use std::time::Duration;

use common::{
    answered_paths, get_text, metric_sum, start_agent_with, start_controller, wait_for,
    wait_windows,
};

#[test]
#[ignore = "needs an RDMA device: PINGMESH_RDMA_DEVICE (hack/softroce.sh)"]
fn two_agents_probe_each_other_over_rdma() {
    let device = std::env::var("PINGMESH_RDMA_DEVICE")
        .expect("set PINGMESH_RDMA_DEVICE to an RDMA device name");
    let dir = tempfile::tempdir().unwrap();
    let ip = "127.0.0.1";
    let controller = start_controller(
        dir.path(),
        (
            ip.parse::<std::net::IpAddr>().unwrap(),
            common::free_port(ip),
        )
            .into(),
        (
            ip.parse::<std::net::IpAddr>().unwrap(),
            common::free_port(ip),
        )
            .into(),
    );
    let rdma = ["--transport", "rdma", "--rdma-devices", device.as_str()];
    let a = start_agent_with(dir.path(), "hw-a", ip, controller.grpc, &rdma);
    let b = start_agent_with(dir.path(), "hw-b", ip, controller.grpc, &rdma);

    let endpoint = |node: &str| format!("{node}/{device}-p1");
    let expected = vec![
        (endpoint("hw-a"), endpoint("hw-b")),
        (endpoint("hw-b"), endpoint("hw-a")),
    ];
    wait_for(Duration::from_mins(1), "both RDMA paths answered", || {
        wait_windows(controller.http, 1);
        answered_paths(controller.http) == expected
    });
    for agent in [&a, &b] {
        let text = get_text(agent.metrics, "/metrics").expect("agent metrics");
        assert!(
            text.lines()
                .any(|l| l.starts_with("pingmesh_transport_info{")
                    && l.contains("transport=\"rdma\"")
                    && l.ends_with(" 1")),
            "{} is not on RDMA:\n{text}",
            agent.node
        );
        let ok = metric_sum(agent.metrics, "pingmesh_probes_total").unwrap_or(0.0);
        assert!(ok > 0.0, "{} answered nothing", agent.node);
    }
    let endpoints = common::get_json(controller.http, "/api/v1/endpoints")
        .and_then(|v| v.as_array().cloned())
        .unwrap_or_default();
    for e in &endpoints {
        // The registry keeps the wire number of the transport: 2 is RDMA.
        assert_eq!(e["transport"].as_i64(), Some(2), "{e}");
        assert!(
            e["qpn"].as_u64().unwrap_or(0) > 0,
            "registered without a QPN: {e}"
        );
    }
}
