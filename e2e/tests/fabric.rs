//! The mesh on a leaf-spine fabric of network namespaces (`hack/fabric.sh`): two
//! spines, three ToRs, two hosts per ToR, ECMP with L4 hashing. The controller runs
//! in `pmf-mgmt` and agents reach it over a management bridge that never crosses
//! the fabric, so injected faults only touch probes.
//!
//! Each test builds the fabric afresh, starts `pingmesh-operator standalone` in
//! `pmf-mgmt` and one `pingmesh-agent` per host namespace (UDP bound to the host's
//! fabric address), waits for a healthy full mesh, injects a fault with
//! `hack/fabric.sh inject`, counts the windows until the expected root cause shows
//! in `GET /api/v1/findings` (`rootCauses`), clears the fault and counts the windows
//! until it is gone. Along the way it checks the plumbing the root causes stand on:
//! the pairs whose probes or ACKs cross the fault, and only those, lose probes in
//! `GET /api/v1/paths`, and SLA findings open. Which pairs cross a spine or a link
//! comes from the kernel's own ECMP choice for each of the agent's source ports
//! (`hack/fabric.sh paths`, i.e. `ip route get ... sport P dport 9403` in the ToR):
//! with five flows over two spines about one pair in sixteen never touches a given
//! spine, and must not be expected to lose. Every test prints a results row on
//! stderr, past the test harness's capture.
//!
//! Needs root (namespaces, iptables) and the built binaries (`cargo build
//! --workspace --bins`); gated by `PINGMESH_E2E_FABRIC`. Each test rebuilds the
//! fabric itself (`hack/fabric.sh up`) and removes it at the end;
//! `PINGMESH_E2E_FABRIC_KEEP=1` leaves the last one up and keeps the logs
//! (controller.log, <host>.log) in a directory it prints.
//!
//! ```sh
//! cargo build --workspace --bins
//! sudo PINGMESH_E2E_FABRIC=1 cargo test -p pingmesh-e2e --test fabric -- \
//!     --include-ignored --test-threads=1
//! ```

#![allow(clippy::expect_used, clippy::unwrap_used, clippy::panic)]

mod common;

use std::collections::{BTreeMap, BTreeSet};
use std::fmt;
use std::io::Write;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::Mutex;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use common::netns::in_netns;
use common::{Proc, WINDOW_MS, binary, get_json, get_text, wait_for};
use serde_json::Value;

const GATE: &str = "PINGMESH_E2E_FABRIC";
const KEEP: &str = "PINGMESH_E2E_FABRIC_KEEP";
const MGMT_NS: &str = "pmf-mgmt";
const GRPC_ADDR: &str = "10.78.0.1:9400";
const HTTP_ADDR: &str = "10.78.0.1:9401";
const HOSTS: usize = 6;
/// Flows (source ports) per inter-ToR target: what covering 2 ECMP paths takes
/// (`ecmpPaths: 2`); targets under the same ToR get one.
const FLOWS: usize = 5;
/// Ordered pairs of hosts under the same ToR (3 ToRs, 2 hosts each).
const SAME_TOR_PAIRS: usize = 6;
/// UDP port every agent's responder listens on.
const RESPONDER_PORT: u16 = 9403;
/// Windows after an injection in which the root cause must appear.
const LOCALIZE_WINDOWS: u64 = 8;
/// Windows after clearing in which it must be gone.
const CLEAR_WINDOWS: u64 = 6;
/// Windows a fault stays in at least, so that SLA findings (two bad windows) open.
const MIN_FAULT_WINDOWS: u64 = 4;
/// Windows observed on the clean fabric.
const CLEAN_WINDOWS: u64 = 12;

/// One fabric at a time: the namespaces and addresses are fixed.
static SERIAL: Mutex<()> = Mutex::new(());

fn gate() -> bool {
    common::enabled(
        GATE,
        "needs root and network namespaces; builds the fabric with hack/fabric.sh",
    )
}

// ---------------------------------------------------------------------------
// Network namespaces

fn http() -> SocketAddr {
    HTTP_ADDR.parse().unwrap()
}

/// GET on the controller's HTTP API from inside `pmf-mgmt`.
fn api_json(path: &str) -> Option<Value> {
    in_netns(MGMT_NS, || get_json(http(), path)).flatten()
}

fn api_text(path: &str) -> Option<String> {
    in_netns(MGMT_NS, || get_text(http(), path)).flatten()
}

fn now_ms() -> u64 {
    u64::try_from(
        SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .unwrap()
            .as_millis(),
    )
    .unwrap()
}

/// Start of the window `t_ms` falls in (windows are aligned to the Unix epoch).
fn window_of(t_ms: u64) -> u64 {
    t_ms / WINDOW_MS * WINDOW_MS
}

// ---------------------------------------------------------------------------
// The fabric

#[derive(Debug, Clone)]
struct Host {
    netns: String,
    name: String,
    tor: String,
    ip: String,
}

/// `hack/fabric.sh up` on creation, `down` on drop (unless `PINGMESH_E2E_FABRIC_KEEP`).
#[derive(Debug)]
struct Fabric {
    script: PathBuf,
}

impl Fabric {
    fn up() -> Self {
        let script = Path::new(env!("CARGO_MANIFEST_DIR")).join("../hack/fabric.sh");
        let f = Self { script };
        f.run(&["up"]);
        f
    }

    fn run(&self, args: &[&str]) -> String {
        let out = Command::new(&self.script)
            .args(args)
            .stdin(Stdio::null())
            .output()
            .expect("run hack/fabric.sh");
        assert!(
            out.status.success(),
            "hack/fabric.sh {} failed ({}); needs root:\n{}",
            args.join(" "),
            out.status,
            String::from_utf8_lossy(&out.stderr)
        );
        String::from_utf8_lossy(&out.stdout).into_owned()
    }

    fn hosts(&self) -> Vec<Host> {
        self.run(&["hosts"])
            .lines()
            .map(|line| {
                let f: Vec<&str> = line.split_whitespace().collect();
                assert_eq!(f.len(), 4, "hack/fabric.sh hosts: {line:?}");
                Host {
                    netns: f[0].into(),
                    name: f[1].into(),
                    tor: f[2].into(),
                    ip: f[3].into(),
                }
            })
            .collect()
    }

    fn inject(&self, fault: &[&str]) {
        let mut args = vec!["inject"];
        args.extend_from_slice(fault);
        self.run(&args);
    }

    fn clear(&self) {
        self.run(&["clear"]);
    }

    /// `hack/fabric.sh paths`: the routers each `<src> <dst> <sport> <dport>` flow
    /// crosses, one line per input line.
    fn flow_paths(&self, flows: &[String]) -> Vec<Vec<String>> {
        let mut child = Command::new(&self.script)
            .arg("paths")
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .expect("run hack/fabric.sh paths");
        let input = flows.join("\n") + "\n";
        child
            .stdin
            .take()
            .unwrap()
            .write_all(input.as_bytes())
            .unwrap();
        let out = child.wait_with_output().unwrap();
        assert!(
            out.status.success(),
            "hack/fabric.sh paths: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        let lines: Vec<Vec<String>> = String::from_utf8_lossy(&out.stdout)
            .lines()
            .map(|l| l.split_whitespace().map(str::to_owned).collect())
            .collect();
        assert_eq!(
            lines.len(),
            flows.len(),
            "hack/fabric.sh paths answered {lines:?}"
        );
        lines
    }
}

/// The UDP source ports an agent probes from: its sockets on the fabric address
/// other than the responder's.
fn prober_ports(host: &Host) -> Vec<u16> {
    let out = Command::new("ip")
        .args(["netns", "exec", &host.netns, "ss", "-Huan"])
        .output()
        .expect("ss in a host namespace");
    let mut ports: Vec<u16> = String::from_utf8_lossy(&out.stdout)
        .lines()
        .filter_map(|l| {
            l.split_whitespace()
                .nth(3)?
                .rsplit_once(':')
                .map(|(ip, port)| (ip.to_owned(), port.to_owned()))
        })
        .filter(|(ip, _)| *ip == host.ip)
        .filter_map(|(_, port)| port.parse().ok())
        .filter(|p| *p != RESPONDER_PORT)
        .collect();
    ports.sort_unstable();
    ports
}

/// What the probes and ACKs of one ordered pair of hosts cross, over all of the
/// prober's flows: routers, and directed router-to-router links.
#[derive(Debug, Default, Clone)]
struct Route {
    nodes: BTreeSet<String>,
    links: BTreeSet<(String, String)>,
    flows: usize,
}

impl Route {
    fn crosses_link(&self, from: &str, to: &str) -> bool {
        self.links.contains(&(from.to_owned(), to.to_owned()))
    }
}

/// The route of every ordered pair, from the kernel's ECMP choice for each of the
/// prober's source ports (probe) and back to it (ACKs).
fn routes(fabric: &Fabric, hosts: &[Host]) -> BTreeMap<(String, String), Route> {
    let mut flows = Vec::new();
    let mut keys = Vec::new();
    for a in hosts {
        let ports = prober_ports(a);
        assert!(!ports.is_empty(), "no prober sockets of {} found", a.name);
        for b in hosts.iter().filter(|b| b.name != a.name) {
            for p in &ports {
                flows.push(format!("{} {} {p} {RESPONDER_PORT}", a.name, b.name));
                flows.push(format!("{} {} {RESPONDER_PORT} {p}", b.name, a.name));
                keys.push((a.name.clone(), b.name.clone()));
                keys.push((a.name.clone(), b.name.clone()));
            }
        }
    }
    let mut out: BTreeMap<(String, String), Route> = BTreeMap::new();
    for (key, hops) in keys.into_iter().zip(fabric.flow_paths(&flows)) {
        assert!(
            !hops.iter().any(|h| h == "?"),
            "no ECMP choice for {key:?}: {hops:?}"
        );
        let r = out.entry(key).or_default();
        r.flows += 1;
        r.nodes.extend(hops.iter().cloned());
        for w in hops.windows(2) {
            r.links.insert((w[0].clone(), w[1].clone()));
        }
    }
    for r in out.values_mut() {
        r.flows /= 2;
    }
    out
}

impl Drop for Fabric {
    fn drop(&mut self) {
        if std::env::var_os(KEEP).is_some() {
            report(&[format!(
                "{KEEP}: leaving the fabric up (hack/fabric.sh down removes it)"
            )]);
            return;
        }
        let _ = Command::new(&self.script).arg("down").status();
    }
}

// ---------------------------------------------------------------------------
// What the controller says about one window

#[derive(Debug, Clone, PartialEq)]
struct RootCause {
    kind: String,
    component: String,
    side: Option<String>,
    signal: String,
    confidence: f64,
}

impl fmt::Display for RootCause {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{} {:?}", self.kind, self.component)?;
        if let Some(side) = &self.side {
            write!(f, " side={side}")?;
        }
        write!(f, " {} {:.2}", self.signal, self.confidence)
    }
}

fn str_at(v: &Value, key: &str) -> String {
    v.get(key)
        .and_then(Value::as_str)
        .unwrap_or_default()
        .to_owned()
}

/// `GET /api/v1/findings`: `{"rootCauses": [...], "findings": [...]}`, or the bare
/// array of SLA findings that controllers without localization serve.
fn parse_findings(v: &Value) -> (Vec<RootCause>, Vec<Value>) {
    if let Some(findings) = v.as_array() {
        return (Vec::new(), findings.clone());
    }
    let causes = v
        .get("rootCauses")
        .and_then(Value::as_array)
        .map(|a| {
            a.iter()
                .map(|c| RootCause {
                    kind: str_at(c, "kind"),
                    component: str_at(c, "component"),
                    side: c.get("side").and_then(Value::as_str).map(str::to_owned),
                    signal: str_at(c, "signal"),
                    confidence: c.get("confidence").and_then(Value::as_f64).unwrap_or(0.0),
                })
                .collect()
        })
        .unwrap_or_default();
    let findings = v
        .get("findings")
        .and_then(Value::as_array)
        .cloned()
        .unwrap_or_default();
    (causes, findings)
}

/// Node of an endpoint id ("h21/udp0" -> "h21").
fn node_of(endpoint: &str) -> String {
    endpoint.split('/').next().unwrap_or_default().to_owned()
}

#[derive(Debug, Clone, Copy, Default)]
struct Counts {
    ok: u64,
    lost: u64,
}

#[derive(Debug)]
struct View {
    start_ms: u64,
    root_causes: Vec<RootCause>,
    findings: Vec<Value>,
    /// (source node, target node) -> probes of the window.
    paths: BTreeMap<(String, String), Counts>,
}

impl View {
    fn lost(&self) -> u64 {
        self.paths.values().map(|c| c.lost).sum()
    }

    fn answered_pairs(&self) -> usize {
        self.paths.values().filter(|c| c.ok > 0).count()
    }
}

fn judged_window() -> Option<u64> {
    api_json("/api/v1/summary")?.get("windowStartMs")?.as_u64()
}

/// The first judged window after `after`: its paths and the findings open then.
fn next_window(after: u64) -> View {
    let deadline = Instant::now() + Duration::from_millis(4 * WINDOW_MS + 5_000);
    loop {
        assert!(
            Instant::now() < deadline,
            "no window judged after {after} within {} ms",
            4 * WINDOW_MS + 5_000
        );
        if let Some(start) = judged_window().filter(|s| *s > after) {
            let paths = api_json("/api/v1/paths");
            let findings = api_json("/api/v1/findings");
            // Same window before and after: paths and findings belong to it.
            if let (Some(paths), Some(findings), Some(true)) =
                (paths, findings, judged_window().map(|s| s == start))
            {
                let (root_causes, findings) = parse_findings(&findings);
                let mut by_pair: BTreeMap<(String, String), Counts> = BTreeMap::new();
                for p in paths.as_array().into_iter().flatten() {
                    let key = (
                        node_of(&str_at(p, "sourceEndpoint")),
                        node_of(&str_at(p, "targetEndpoint")),
                    );
                    let c = by_pair.entry(key).or_default();
                    c.ok += p["ok"].as_u64().unwrap_or(0);
                    c.lost += p["lost"].as_u64().unwrap_or(0);
                }
                return View {
                    start_ms: start,
                    root_causes,
                    findings,
                    paths: by_pair,
                };
            }
        }
        std::thread::sleep(Duration::from_millis(100));
    }
}

// ---------------------------------------------------------------------------
// Controller and agents in the namespaces

fn write_config(dir: &Path, switches: &str) -> PathBuf {
    let config = dir.join("mesh.yaml");
    // Every agent probes every other one (the ToR mesh plus all inter-ToR targets)
    // at 50 probes/s on the 5 source ports two spines need; 1 s windows. Latency
    // SLA at 2 ms: these scenarios are about loss, and a busy 2-core machine can
    // push a veth p99 past the 500 us default.
    std::fs::write(
        &config,
        format!(
            "pinglist:\n  windowMs: {WINDOW_MS}\n  probeTimeoutMs: {}\n  torMeshRatePps: 50\n  \
             interTorRatePps: 50\n  interTorSampleTors: 8\n  interTorTargetsPerTor: 8\n  \
             ecmpPaths: 2\nreportGraceMs: 600\nsla:\n  minProbes: 10\n  \
             maxP99NetworkRttNs: 2000000\ntraces:\n{switches}",
            common::TIMEOUT_MS
        ),
    )
    .unwrap();
    config
}

fn log_to(dir: &Path, name: &str) -> Stdio {
    std::fs::File::create(dir.join(format!("{name}.log")))
        .map_or_else(|_| Stdio::null(), Stdio::from)
}

fn start_controller(dir: &Path, switches: &str) -> Proc {
    let config = write_config(dir, switches);
    let child = Command::new("ip")
        .args(["netns", "exec", MGMT_NS])
        .arg(binary("pingmesh-operator"))
        .args(["standalone", "--config"])
        .arg(&config)
        .args(["--grpc-addr", GRPC_ADDR, "--http-addr", HTTP_ADDR])
        // Agents reach it across namespaces; the test fabric is trusted.
        .arg("--insecure-plaintext")
        .arg("--registry")
        .arg(format!("sqlite://{}", dir.join("r.db").display()))
        .env("PINGMESH_LOG_LEVEL", "info")
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(log_to(dir, "controller"))
        .spawn()
        .expect("start the controller in pmf-mgmt");
    // `ip netns exec` execs the command: the child's pid is the controller's.
    let proc = Proc {
        name: "controller".into(),
        child,
    };
    wait_for(
        Duration::from_secs(20),
        "controller /healthz in pmf-mgmt",
        || api_text("/healthz").is_some(),
    );
    proc
}

fn start_agent(dir: &Path, host: &Host) -> Proc {
    let child = Command::new("ip")
        .args(["netns", "exec", &host.netns])
        .arg(binary("pingmesh-agent"))
        .args([
            "--node",
            &host.name,
            "--tor",
            &host.tor,
            "--transport",
            "udp",
        ])
        .args(["--udp-bind", &format!("{}:{RESPONDER_PORT}", host.ip)])
        .args(["--metrics-addr", "127.0.0.1:9402"])
        .args(["--controller", &format!("http://{GRPC_ADDR}")])
        .arg("--insecure-plaintext")
        .env("PINGMESH_LOG_LEVEL", "info")
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(log_to(dir, &host.name))
        .spawn()
        .expect("start an agent in its host namespace");
    Proc {
        name: host.name.clone(),
        child,
    }
}

/// Waits up to 20 s for the controller to know the hops of `wanted` flows
/// both ways, the probes' and the ACKs' (`pingmesh_traced_flows_both_ways`);
/// returns how many it knows.
fn wait_for_traces(wanted: usize) -> usize {
    let traced = || {
        api_text("/metrics")
            .and_then(|m| {
                m.lines()
                    .find_map(|l| l.strip_prefix("pingmesh_traced_flows_both_ways "))
                    .and_then(|v| v.trim().parse::<usize>().ok())
            })
            .unwrap_or(0)
    };
    let deadline = Instant::now() + Duration::from_secs(20);
    while Instant::now() < deadline && traced() < wanted {
        std::thread::sleep(Duration::from_millis(500));
    }
    traced()
}

fn connected_agents() -> usize {
    api_json("/api/v1/agents")
        .and_then(|v| {
            v.as_array()
                .map(|a| a.iter().filter(|x| x["connected"] == true).count())
        })
        .unwrap_or(0)
}

/// Fabric, controller and agents; dropped in field order: agents, controller,
/// fabric, logs.
struct Mesh {
    _agents: Vec<Proc>,
    _controller: Proc,
    hosts: Vec<Host>,
    fabric: Fabric,
    dir: Option<tempfile::TempDir>,
    /// Last window seen healthy before any fault.
    healthy_window: u64,
    routes: BTreeMap<(String, String), Route>,
    started: Instant,
    startup: Duration,
}

impl Mesh {
    fn start() -> Self {
        let started = Instant::now();
        let fabric = Fabric::up();
        let hosts = fabric.hosts();
        assert_eq!(hosts.len(), HOSTS, "hack/fabric.sh hosts: {hosts:?}");
        let dir = tempfile::tempdir().unwrap();
        // Router addresses -> names, so path traces name links and spines.
        let switches = fabric.run(&["switches"]);
        let controller = start_controller(dir.path(), &switches);
        let agents: Vec<Proc> = hosts.iter().map(|h| start_agent(dir.path(), h)).collect();
        let mut mesh = Self {
            _agents: agents,
            _controller: controller,
            hosts,
            fabric,
            dir: Some(dir),
            healthy_window: 0,
            routes: BTreeMap::new(),
            started,
            startup: Duration::ZERO,
        };
        wait_for(Duration::from_secs(30), "all 6 agents to register", || {
            connected_agents() == HOSTS
        });
        let endpoints = api_json("/api/v1/endpoints")
            .and_then(|v| v.as_array().map(Vec::len))
            .unwrap_or(0);
        assert_eq!(endpoints, HOSTS, "GET /api/v1/endpoints");
        // A window in which every ordered pair answered and nothing was lost.
        let pairs = HOSTS * (HOSTS - 1);
        let mut last = 0;
        let mut seen = Vec::new();
        for _ in 0..10 {
            let view = next_window(last);
            last = view.start_ms;
            if view.answered_pairs() == pairs && view.lost() == 0 && view.root_causes.is_empty() {
                // Healthy flows' traces exonerate links; faults start once most are in.
                let probed = (pairs - SAME_TOR_PAIRS) * FLOWS + SAME_TOR_PAIRS;
                let traced = wait_for_traces(probed);
                eprintln!(
                    "flows traced both ways before the first fault: {traced} (of {probed} probed)"
                );
                mesh.healthy_window = last;
                mesh.routes = routes(&mesh.fabric, &mesh.hosts);
                mesh.startup = mesh.started.elapsed();
                return mesh;
            }
            seen.push(format!(
                "window {}: {} of {pairs} pairs answered, {} lost, root causes {:?}",
                view.start_ms,
                view.answered_pairs(),
                view.lost(),
                view.root_causes
            ));
        }
        panic!("no healthy full-mesh window in 10:\n{}", seen.join("\n"));
    }

    fn host(&self, name: &str) -> &Host {
        self.hosts.iter().find(|h| h.name == name).unwrap()
    }
}

impl Drop for Mesh {
    fn drop(&mut self) {
        if std::env::var_os(KEEP).is_some()
            && let Some(dir) = self.dir.take()
        {
            report(&[format!("{KEEP}: logs in {}", dir.keep().display())]);
        }
    }
}

// ---------------------------------------------------------------------------
// Scenarios

#[derive(Debug, Clone, Copy)]
enum Component {
    Exact(&'static str),
    Contains(&'static str),
    Any,
}

/// A root cause the controller should name.
#[derive(Debug, Clone, Copy)]
struct Expected {
    kind: &'static str,
    component: Component,
}

impl Expected {
    fn matches(&self, c: &RootCause) -> bool {
        c.kind == self.kind
            && match self.component {
                Component::Exact(s) => c.component == s,
                Component::Contains(s) => c.component.contains(s),
                Component::Any => true,
            }
    }
}

impl fmt::Display for Expected {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self.component {
            Component::Exact(s) => write!(f, "{} {s:?}", self.kind),
            Component::Contains(s) => write!(f, "{} *{s}*", self.kind),
            Component::Any => write!(f, "{} (any)", self.kind),
        }
    }
}

struct Scenario {
    name: &'static str,
    /// Arguments of `hack/fabric.sh inject`, one fault each.
    faults: &'static [&'static [&'static str]],
    expected: &'static [Expected],
    /// Whether probes from the first host to the second, or their ACKs, cross
    /// the fault on some flow.
    crosses: fn(&Host, &Host, &Route) -> bool,
}

#[derive(Debug, Default)]
struct Outcome {
    scenario: &'static str,
    /// Windows counted from the one the fault went in (1 = that window).
    loss_seen: Option<u64>,
    localized: Option<u64>,
    sla_open: Option<u64>,
    /// Windows counted from the one the fault was cleared in.
    cause_cleared: Option<u64>,
    loss_gone: Option<u64>,
    fault_windows: u64,
    /// Pairs that cross the fault but lost nothing; pairs that do not and lost.
    quiet_pairs: Vec<String>,
    stray_pairs: Vec<String>,
    lost_crossing: Counts,
    root_causes_seen: BTreeSet<String>,
    most_sla_findings: usize,
    crossing_pairs: usize,
    startup_s: f64,
    total_s: f64,
}

fn pair_name((s, t): &(String, String)) -> String {
    format!("{s}->{t}")
}

fn has_all(expected: &[Expected], causes: &[RootCause]) -> bool {
    expected.iter().all(|e| causes.iter().any(|c| e.matches(c)))
}

fn has_any(expected: &[Expected], causes: &[RootCause]) -> bool {
    expected.iter().any(|e| causes.iter().any(|c| e.matches(c)))
}

fn run_fault(mesh: &Mesh, s: &Scenario) -> Outcome {
    let mut out = Outcome {
        scenario: s.name,
        startup_s: mesh.startup.as_secs_f64(),
        ..Outcome::default()
    };
    let crosses = |pair: &(String, String)| {
        (s.crosses)(mesh.host(&pair.0), mesh.host(&pair.1), &mesh.routes[pair])
    };
    out.crossing_pairs = mesh.routes.keys().filter(|p| crosses(p)).count();

    for fault in s.faults {
        mesh.fabric.inject(fault);
    }
    let injected = window_of(now_ms());
    let mut last = mesh.healthy_window;
    let mut totals: BTreeMap<(String, String), Counts> = BTreeMap::new();
    loop {
        let view = next_window(last);
        last = view.start_ms;
        if view.start_ms < injected {
            continue; // judged before the fault went in
        }
        let n = (view.start_ms - injected) / WINDOW_MS + 1;
        out.fault_windows = n;
        for (pair, c) in &view.paths {
            let t = totals.entry(pair.clone()).or_default();
            t.ok += c.ok;
            t.lost += c.lost;
        }
        out.root_causes_seen
            .extend(view.root_causes.iter().map(ToString::to_string));
        out.most_sla_findings = out.most_sla_findings.max(view.findings.len());
        if out.sla_open.is_none() && !view.findings.is_empty() {
            out.sla_open = Some(n);
        }
        let all_lossy = totals
            .iter()
            .filter(|(p, _)| crosses(p))
            .all(|(_, c)| c.lost > 0);
        if out.loss_seen.is_none() && all_lossy && !totals.is_empty() {
            out.loss_seen = Some(n);
        }
        if out.localized.is_none() && has_all(s.expected, &view.root_causes) {
            out.localized = Some(n);
        }
        let done = out.localized.is_some() && out.loss_seen.is_some() && out.sla_open.is_some();
        if (done && n >= MIN_FAULT_WINDOWS) || n >= LOCALIZE_WINDOWS {
            break;
        }
    }
    for (pair, c) in &totals {
        if crosses(pair) {
            out.lost_crossing.ok += c.ok;
            out.lost_crossing.lost += c.lost;
            if c.lost == 0 {
                out.quiet_pairs.push(pair_name(pair));
            }
        } else if c.lost > 2 && c.lost * 100 > c.ok + c.lost {
            // More than a stray timeout and over 1 %: the fault reached a path
            // it does not lie on.
            out.stray_pairs.push(format!(
                "{} ({}/{})",
                pair_name(pair),
                c.lost,
                c.ok + c.lost
            ));
        }
    }
    // Pairs that vanished from the report (no answered or lost probes) cross
    // nothing we can see: name them as quiet.
    for a in &mesh.hosts {
        for b in &mesh.hosts {
            let pair = (a.name.clone(), b.name.clone());
            if a.name != b.name && crosses(&pair) && !totals.contains_key(&pair) {
                out.quiet_pairs
                    .push(format!("{} (absent)", pair_name(&pair)));
            }
        }
    }

    mesh.fabric.clear();
    let cleared = window_of(now_ms());
    loop {
        let view = next_window(last);
        last = view.start_ms;
        if view.start_ms < cleared {
            continue; // judged, but from before the clearing
        }
        let n = (view.start_ms - cleared) / WINDOW_MS + 1;
        if out.cause_cleared.is_none() && !has_any(s.expected, &view.root_causes) {
            out.cause_cleared = Some(n);
        }
        // The window the fault was cleared in still carries some of it.
        if out.loss_gone.is_none() && view.start_ms > cleared && view.lost() == 0 {
            out.loss_gone = Some(n);
        }
        if (out.cause_cleared.is_some() && out.loss_gone.is_some()) || n >= CLEAR_WINDOWS {
            break;
        }
    }
    out.total_s = mesh.started.elapsed().as_secs_f64();
    out
}

fn cell(v: Option<u64>) -> String {
    v.map_or_else(|| "never".to_owned(), |n| n.to_string())
}

/// Writes past the harness's output capture, so that passing tests show it too.
fn report(lines: &[String]) {
    let mut err = std::io::stderr().lock();
    for l in lines {
        let _ = writeln!(err, "{l}");
    }
}

fn print_outcome(o: &Outcome) {
    report(&[
        format!(
            "\n== fabric results (windows of {WINDOW_MS} ms; counted from the window the fault went in / was cleared in = 1)"
        ),
        format!(
            "{:<24} {:>9} {:>9} {:>8} {:>9} {:>9} {:>6} {:>6}",
            "scenario",
            "loss seen",
            "localized",
            "SLA open",
            "rc clear",
            "loss gone",
            "setup",
            "total"
        ),
        format!(
            "{:<24} {:>9} {:>9} {:>8} {:>9} {:>9} {:>5.1}s {:>5.1}s",
            o.scenario,
            cell(o.loss_seen),
            cell(o.localized),
            cell(o.sla_open),
            cell(o.cause_cleared),
            cell(o.loss_gone),
            o.startup_s,
            o.total_s
        ),
        format!(
            "   {} of {} pairs cross the fault (ECMP as the kernel hashes each flow); they lost {}/{} probes over {} fault windows; most SLA findings open {}; root causes seen: {}",
            o.crossing_pairs,
            HOSTS * (HOSTS - 1),
            o.lost_crossing.lost,
            o.lost_crossing.ok + o.lost_crossing.lost,
            o.fault_windows,
            o.most_sla_findings,
            if o.root_causes_seen.is_empty() {
                "none".to_owned()
            } else {
                o.root_causes_seen
                    .iter()
                    .cloned()
                    .collect::<Vec<_>>()
                    .join("; ")
            }
        ),
    ]);
}

fn check(o: &Outcome, s: &Scenario) {
    // Plumbing first: without loss on the right paths no localizer can work.
    assert!(
        o.quiet_pairs.is_empty(),
        "{}: paths across the fault lost nothing: {:?}",
        s.name,
        o.quiet_pairs
    );
    assert!(
        o.stray_pairs.is_empty(),
        "{}: paths off the fault lost probes: {:?}",
        s.name,
        o.stray_pairs
    );
    assert!(o.sla_open.is_some(), "{}: no SLA finding opened", s.name);
    assert!(
        o.loss_gone.is_some(),
        "{}: loss went on {CLEAR_WINDOWS} windows after clearing",
        s.name
    );
    let want: Vec<String> = s.expected.iter().map(ToString::to_string).collect();
    assert!(
        o.localized.is_some(),
        "{}: expected root cause(s) {want:?} not reported within {LOCALIZE_WINDOWS} windows; \
         root causes seen: {:?}",
        s.name,
        o.root_causes_seen
    );
    assert!(
        o.cause_cleared.is_some(),
        "{}: root cause(s) {want:?} still open {CLEAR_WINDOWS} windows after clearing",
        s.name
    );
}

fn run_scenario(s: &Scenario) {
    let _serial = SERIAL
        .lock()
        .unwrap_or_else(std::sync::PoisonError::into_inner);
    if !gate() {
        return;
    }
    let mesh = Mesh::start();
    let outcome = run_fault(&mesh, s);
    print_outcome(&outcome);
    drop(mesh);
    check(&outcome, s);
}

fn touches_host(a: &Host, b: &Host, name: &str) -> bool {
    a.name == name || b.name == name
}

// ---------------------------------------------------------------------------
// Tests

#[test]
#[ignore = "needs root and network namespaces: sudo hack/fabric.sh up; PINGMESH_E2E_FABRIC=1 cargo test -p pingmesh-e2e --test fabric -- --include-ignored --test-threads=1"]
fn a_clean_fabric_reports_no_root_cause() {
    let _serial = SERIAL
        .lock()
        .unwrap_or_else(std::sync::PoisonError::into_inner);
    if !gate() {
        return;
    }
    let mesh = Mesh::start();
    let mut last = mesh.healthy_window;
    let (mut causes, mut findings, mut lost_probes, mut probes) = (BTreeSet::new(), 0, 0, 0);
    let mut incomplete = 0;
    for _ in 0..CLEAN_WINDOWS {
        let view = next_window(last);
        last = view.start_ms;
        causes.extend(view.root_causes.iter().map(ToString::to_string));
        findings = findings.max(view.findings.len());
        lost_probes += view.lost();
        probes += view.paths.values().map(|c| c.ok + c.lost).sum::<u64>();
        if view.answered_pairs() < HOSTS * (HOSTS - 1) {
            incomplete += 1;
        }
    }
    report(&[
        format!("\n== fabric results (windows of {WINDOW_MS} ms)"),
        format!(
            "{:<24} {:>7} {:>11} {:>12} {:>10} {:>16} {:>6} {:>6}",
            "scenario",
            "windows",
            "root causes",
            "SLA findings",
            "lost",
            "partial windows",
            "setup",
            "total"
        ),
        format!(
            "{:<24} {:>7} {:>11} {:>12} {:>10} {:>16} {:>5.1}s {:>5.1}s",
            "clean",
            CLEAN_WINDOWS,
            causes.len(),
            findings,
            format!("{lost_probes}/{probes}"),
            incomplete,
            mesh.startup.as_secs_f64(),
            mesh.started.elapsed().as_secs_f64()
        ),
    ]);
    drop(mesh);
    assert!(
        causes.is_empty(),
        "root causes on a clean fabric: {causes:?}"
    );
    assert_eq!(findings, 0, "SLA findings on a clean fabric");
    assert_eq!(lost_probes, 0, "probes lost on a clean fabric");
    assert_eq!(incomplete, 0, "windows in which some pair went unanswered");
}

#[test]
#[ignore = "needs root and network namespaces: sudo hack/fabric.sh up; PINGMESH_E2E_FABRIC=1 cargo test -p pingmesh-e2e --test fabric -- --include-ignored --test-threads=1"]
fn a_black_holed_host_is_named_as_the_root_cause() {
    run_scenario(&Scenario {
        name: "host h21 black hole",
        faults: &[&["host", "h21", "100"]],
        expected: &[Expected {
            kind: "host",
            component: Component::Exact("h21"),
        }],
        crosses: |a, b, _| touches_host(a, b, "h21"),
    });
}

#[test]
#[ignore = "needs root and network namespaces: sudo hack/fabric.sh up; PINGMESH_E2E_FABRIC=1 cargo test -p pingmesh-e2e --test fabric -- --include-ignored --test-threads=1"]
fn a_host_losing_ten_percent_is_named_as_the_root_cause() {
    run_scenario(&Scenario {
        name: "host h21 10% loss",
        faults: &[&["host", "h21", "10"]],
        expected: &[Expected {
            kind: "host",
            component: Component::Exact("h21"),
        }],
        crosses: |a, b, _| touches_host(a, b, "h21"),
    });
}

#[test]
#[ignore = "needs root and network namespaces: sudo hack/fabric.sh up; PINGMESH_E2E_FABRIC=1 cargo test -p pingmesh-e2e --test fabric -- --include-ignored --test-threads=1"]
fn a_tor_dropping_twenty_percent_is_named_as_the_root_cause() {
    run_scenario(&Scenario {
        name: "tor2 20% loss",
        faults: &[&["tor", "tor2", "20"]],
        expected: &[Expected {
            kind: "tor",
            component: Component::Exact("tor2"),
        }],
        crosses: |_, _, r| r.nodes.contains("tor2"),
    });
}

#[test]
#[ignore = "needs root and network namespaces: sudo hack/fabric.sh up; PINGMESH_E2E_FABRIC=1 cargo test -p pingmesh-e2e --test fabric -- --include-ignored --test-threads=1"]
fn a_spine_to_tor_link_dropping_thirty_percent_one_way_is_named_as_a_link() {
    run_scenario(&Scenario {
        name: "link sp2->tor3 30% loss",
        faults: &[&["link", "sp2", "tor3", "30"]],
        expected: &[Expected {
            kind: "link",
            component: Component::Exact("sp2 -> tor3"),
        }],
        // Probes into tor3 and ACKs back into tor3 on flows hashed onto sp2.
        crosses: |_, _, r| r.crosses_link("sp2", "tor3"),
    });
}

#[test]
#[ignore = "needs root and network namespaces: sudo hack/fabric.sh up; PINGMESH_E2E_FABRIC=1 cargo test -p pingmesh-e2e --test fabric -- --include-ignored --test-threads=1"]
fn a_spine_dropping_thirty_percent_is_named_as_a_switch() {
    run_scenario(&Scenario {
        name: "spine sp1 30% loss",
        faults: &[&["spine", "sp1", "30"]],
        expected: &[Expected {
            kind: "switch",
            component: Component::Exact("sp1"),
        }],
        crosses: |_, _, r| r.nodes.contains("sp1"),
    });
}

#[test]
#[ignore = "needs root and network namespaces: sudo hack/fabric.sh up; PINGMESH_E2E_FABRIC=1 cargo test -p pingmesh-e2e --test fabric -- --include-ignored --test-threads=1"]
fn a_black_holed_host_and_a_lossy_tor_elsewhere_are_both_named() {
    run_scenario(&Scenario {
        name: "h21 black hole + tor3 20%",
        faults: &[&["host", "h21", "100"], &["tor", "tor3", "20"]],
        expected: &[
            Expected {
                kind: "host",
                component: Component::Exact("h21"),
            },
            Expected {
                kind: "tor",
                component: Component::Exact("tor3"),
            },
        ],
        crosses: |a, b, r| touches_host(a, b, "h21") || r.nodes.contains("tor3"),
    });
}

#[test]
fn findings_parse_from_the_array_and_the_object_shape() {
    let array = serde_json::json!([{"kind": "pathLoss", "location": "h11/udp0 -> h21/udp0"}]);
    let (causes, findings) = parse_findings(&array);
    assert!(causes.is_empty());
    assert_eq!(findings.len(), 1);

    let object = serde_json::json!({
        "rootCauses": [
            {"kind": "host", "component": "h21", "side": "both", "signal": "loss",
             "confidence": 0.9, "summary": "h21 loses 100%"},
            {"kind": "switch", "component": "spine layer", "side": null, "signal": "loss",
             "confidence": 0.5, "summary": "spine"}
        ],
        "findings": [{"kind": "pathLoss"}, {"kind": "torPairLoss"}]
    });
    let (causes, findings) = parse_findings(&object);
    assert_eq!(findings.len(), 2);
    assert_eq!(causes.len(), 2);
    assert_eq!(causes[0].side.as_deref(), Some("both"));
    assert_eq!(causes[1].side, None);
    let host = Expected {
        kind: "host",
        component: Component::Exact("h21"),
    };
    let spine = Expected {
        kind: "switch",
        component: Component::Any,
    };
    let link = Expected {
        kind: "link",
        component: Component::Contains("tor3"),
    };
    assert!(has_all(&[host, spine], &causes));
    assert!(!has_all(&[host, link], &causes));
    assert!(has_any(&[link, spine], &causes));
    assert_eq!(node_of("h21/udp0"), "h21");
}
