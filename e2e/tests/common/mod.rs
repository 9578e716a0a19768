//! Starts the built binaries as separate processes and talks to them over HTTP.

#![allow(clippy::expect_used, clippy::unwrap_used, clippy::panic)]
#![allow(dead_code)]

pub mod netns;
pub mod promql;

use std::net::{SocketAddr, TcpListener};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use serde_json::Value;

/// Window and timeout used by the end-to-end mesh: short, so tests are quick.
pub const WINDOW_MS: u64 = 1_000;
pub const TIMEOUT_MS: u64 = 200;

/// Whether the gated tests should run: `var` is set and not empty. Otherwise
/// the test is skipped loudly (see [`skip`]).
pub fn enabled(var: &str, why: &str) -> bool {
    if std::env::var_os(var).is_some_and(|v| !v.is_empty()) {
        return true;
    }
    skip(&format!("set {var}=1 to run ({why}); hack/test.sh does"));
    false
}

/// Skips a gated test that cannot run here, saying `how` to run it. Under CI
/// (see [`in_ci`]) that is a failure: a skipped test proves nothing, and CI
/// must run every test it asks for. Elsewhere a banner on stderr says that
/// nothing was tested.
pub fn skip(how: &str) {
    assert!(
        !in_ci(),
        "SKIPPED under CI, which must run this test: {how}"
    );
    eprintln!("\n*** SKIPPED, nothing was tested: {how} ***\n");
}

/// Whether this runs under CI: `CI` is set (as CI services set it) to
/// anything but empty, `0` or `false`.
pub fn in_ci() -> bool {
    std::env::var("CI").is_ok_and(|v| {
        let v = v.trim();
        !(v.is_empty() || v == "0" || v.eq_ignore_ascii_case("false"))
    })
}

/// Directory holding the workspace's binaries (next to this test's `deps/`).
pub fn bin_dir() -> PathBuf {
    let exe = std::env::current_exe().expect("test executable path");
    exe.parent()
        .and_then(Path::parent)
        .expect("target profile dir")
        .to_path_buf()
}

pub fn binary(name: &str) -> PathBuf {
    let path = bin_dir().join(name);
    assert!(
        path.exists(),
        "{} missing: run `cargo build --workspace --bins` first",
        path.display()
    );
    path
}

pub fn free_port(ip: &str) -> u16 {
    TcpListener::bind((ip, 0))
        .expect("bind a free port")
        .local_addr()
        .expect("local addr")
        .port()
}

/// A child process killed when dropped.
pub struct Proc {
    pub name: String,
    pub child: Child,
}

impl Proc {
    pub fn kill(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }

    /// Sends SIGTERM and waits for a clean exit.
    pub fn terminate(&mut self) -> std::process::ExitStatus {
        let pid = i32::try_from(self.child.id()).expect("pid");
        // SAFETY: kill(2) with a valid pid of our own child and a standard signal.
        unsafe { libc_kill(pid, 15) };
        let deadline = Instant::now() + Duration::from_secs(10);
        loop {
            if let Some(status) = self.child.try_wait().expect("wait") {
                return status;
            }
            assert!(Instant::now() < deadline, "{} ignored SIGTERM", self.name);
            std::thread::sleep(Duration::from_millis(50));
        }
    }
}

unsafe extern "C" {
    #[link_name = "kill"]
    fn libc_kill(pid: i32, sig: i32) -> i32;
}

impl Drop for Proc {
    fn drop(&mut self) {
        self.kill();
    }
}

pub struct Controller {
    pub proc: Proc,
    pub grpc: SocketAddr,
    pub http: SocketAddr,
    pub registry: PathBuf,
    pub config: PathBuf,
}

pub fn start_controller(dir: &Path, grpc: SocketAddr, http: SocketAddr) -> Controller {
    start_controller_with(dir, grpc, http, &[])
}

/// A controller with `extra` flags (probe keys, ...) after the usual ones.
pub fn start_controller_with(
    dir: &Path,
    grpc: SocketAddr,
    http: SocketAddr,
    extra: &[&str],
) -> Controller {
    let registry = dir.join("registry.db");
    let config = dir.join("mesh.yaml");
    // Full mesh between the test's ToRs, thresholds that a dead path crosses at once.
    std::fs::write(
        &config,
        format!(
            "pinglist:\n  windowMs: {WINDOW_MS}\n  probeTimeoutMs: {TIMEOUT_MS}\n  torMeshRatePps: 50\n  interTorRatePps: 50\n  interTorSampleTors: 8\n  interTorTargetsPerTor: 8\n  ecmpPaths: 2\nreportGraceMs: 600\nsla:\n  minProbes: 10\n"
        ),
    )
    .expect("write config");
    let child = Command::new(binary("pingmesh-operator"))
        .args(["standalone", "--config"])
        .arg(&config)
        .args([
            "--grpc-addr",
            &grpc.to_string(),
            "--http-addr",
            &http.to_string(),
        ])
        .arg("--registry")
        .arg(format!("sqlite://{}", registry.display()))
        .args(extra)
        .env("PINGMESH_LOG_LEVEL", "info")
        .stdout(Stdio::null())
        .stderr(log_file(dir, "controller"))
        .spawn()
        .expect("start controller");
    let c = Controller {
        proc: Proc {
            name: "controller".into(),
            child,
        },
        grpc,
        http,
        registry,
        config,
    };
    wait_for(Duration::from_secs(20), "controller /healthz", || {
        get_text(http, "/healthz").is_some()
    });
    c
}

pub fn restart_controller(dir: &Path, old: Controller) -> Controller {
    let (grpc, http) = (old.grpc, old.http);
    drop(old);
    start_controller(dir, grpc, http)
}

pub struct Agent {
    pub proc: Proc,
    pub node: String,
    pub ip: String,
    pub metrics: SocketAddr,
}

pub fn start_agent(dir: &Path, node: &str, tor: &str, ip: &str, controller: SocketAddr) -> Agent {
    let udp_bind = format!("{ip}:0");
    start_agent_with(
        dir,
        node,
        ip,
        controller,
        &["--tor", tor, "--udp-bind", &udp_bind],
    )
}

/// An agent with `extra` flags (transport, ToR, ...); metrics on `ip`.
pub fn start_agent_with(
    dir: &Path,
    node: &str,
    ip: &str,
    controller: SocketAddr,
    extra: &[&str],
) -> Agent {
    let metrics = SocketAddr::new(ip.parse().expect("ip"), free_port(ip));
    let child = Command::new(binary("pingmesh-agent"))
        .args(["--node", node])
        .args(extra)
        .args(["--controller", &format!("http://{controller}")])
        .args(["--metrics-addr", &metrics.to_string()])
        .stdout(Stdio::null())
        .stderr(log_file(dir, node))
        .spawn()
        .expect("start agent");
    Agent {
        proc: Proc {
            name: node.into(),
            child,
        },
        node: node.into(),
        ip: ip.into(),
        metrics,
    }
}

fn log_file(dir: &Path, name: &str) -> Stdio {
    std::fs::File::create(dir.join(format!("{name}.log")))
        .map_or_else(|_| Stdio::null(), Stdio::from)
}

/// Plain HTTP GET on a loopback address, blocking, with a short timeout.
pub fn get_text(addr: SocketAddr, path: &str) -> Option<String> {
    use std::io::{Read, Write};
    let mut s = std::net::TcpStream::connect_timeout(&addr, Duration::from_secs(2)).ok()?;
    s.set_read_timeout(Some(Duration::from_secs(5))).ok()?;
    write!(
        s,
        "GET {path} HTTP/1.1\r\nHost: {addr}\r\nConnection: close\r\n\r\n"
    )
    .ok()?;
    let mut raw = Vec::new();
    s.read_to_end(&mut raw).ok()?;
    let text = String::from_utf8(raw).ok()?;
    let (head, body) = text.split_once("\r\n\r\n")?;
    if !head.starts_with("HTTP/1.1 200") {
        return None;
    }
    if head
        .to_ascii_lowercase()
        .contains("transfer-encoding: chunked")
    {
        return Some(dechunk(body));
    }
    Some(body.to_owned())
}

fn dechunk(body: &str) -> String {
    let mut out = String::new();
    let mut rest = body;
    while let Some((size, after)) = rest.split_once("\r\n") {
        let n = usize::from_str_radix(size.trim(), 16).unwrap_or(0);
        if n == 0 || after.len() < n {
            break;
        }
        out.push_str(&after[..n]);
        rest = after[n..].trim_start_matches("\r\n");
    }
    out
}

pub fn get_json(addr: SocketAddr, path: &str) -> Option<Value> {
    serde_json::from_str(&get_text(addr, path)?).ok()
}

pub fn wait_for(limit: Duration, what: &str, mut check: impl FnMut() -> bool) {
    let deadline = Instant::now() + limit;
    while Instant::now() < deadline {
        if check() {
            return;
        }
        std::thread::sleep(Duration::from_millis(100));
    }
    panic!("timed out after {limit:?} waiting for {what}");
}

/// The start of the newest judged window, from /api/v1/summary.
pub fn judged_window(http: SocketAddr) -> Option<u64> {
    get_json(http, "/api/v1/summary")?
        .get("windowStartMs")?
        .as_u64()
}

/// Waits until `n` more windows have been judged; returns the last one's start.
pub fn wait_windows(http: SocketAddr, n: u64) -> u64 {
    let start = judged_window(http).unwrap_or(0);
    let mut last = start;
    wait_for(
        Duration::from_millis((n + 4) * WINDOW_MS + 5_000),
        "windows to be judged",
        || {
            last = judged_window(http).unwrap_or(0);
            last >= start + n * WINDOW_MS
        },
    );
    last
}

pub fn connected_agents(http: SocketAddr) -> usize {
    get_json(http, "/api/v1/agents")
        .and_then(|v| {
            v.as_array()
                .map(|a| a.iter().filter(|x| x["connected"] == true).count())
        })
        .unwrap_or(0)
}

/// (source endpoint, target endpoint) of every path in the last judged window
/// with at least one answered probe.
pub fn answered_paths(http: SocketAddr) -> Vec<(String, String)> {
    let mut out: Vec<(String, String)> = get_json(http, "/api/v1/paths")
        .and_then(|v| v.as_array().cloned())
        .unwrap_or_default()
        .iter()
        .filter(|p| p["ok"].as_u64().unwrap_or(0) > 0)
        .map(|p| (str_of(&p["sourceEndpoint"]), str_of(&p["targetEndpoint"])))
        .collect();
    out.sort();
    out
}

/// (kind, location) of every open SLA finding.
pub fn open_findings(http: SocketAddr) -> Vec<(String, String)> {
    let mut out: Vec<(String, String)> = get_json(http, "/api/v1/findings")
        .and_then(|v| v["findings"].as_array().cloned())
        .unwrap_or_default()
        .iter()
        .map(|f| (str_of(&f["kind"]), str_of(&f["location"])))
        .collect();
    out.sort();
    out
}

/// (kind, component) of every open root cause.
pub fn open_root_causes(http: SocketAddr) -> Vec<(String, String)> {
    let mut out: Vec<(String, String)> = get_json(http, "/api/v1/findings")
        .and_then(|v| v["rootCauses"].as_array().cloned())
        .unwrap_or_default()
        .iter()
        .map(|c| (str_of(&c["kind"]), str_of(&c["component"])))
        .collect();
    out.sort();
    out
}

fn str_of(v: &Value) -> String {
    v.as_str().unwrap_or_default().to_owned()
}

/// Every ordered pair of distinct endpoints "<node>/udp0".
pub fn full_mesh(nodes: &[&str]) -> Vec<(String, String)> {
    let mut out = Vec::new();
    for a in nodes {
        for b in nodes {
            if a != b {
                out.push((format!("{a}/udp0"), format!("{b}/udp0")));
            }
        }
    }
    out.sort();
    out
}

/// The value of one series of an agent's exposition: the sample of `family`
/// whose labels include every `name="value"` of `labels`; `None` when there is
/// none or the scrape failed.
pub fn metric_value(addr: SocketAddr, family: &str, labels: &[(&str, &str)]) -> Option<f64> {
    let text = get_text(addr, "/metrics")?;
    let wanted: Vec<String> = labels.iter().map(|(k, v)| format!("{k}=\"{v}\"")).collect();
    text.lines()
        .filter_map(|l| l.strip_prefix(family))
        .filter(|rest| rest.starts_with('{') || rest.starts_with(' '))
        .filter(|rest| {
            let names = rest.split_once('}').map_or("", |(l, _)| l);
            // Whole labels only: `node="a"` is not `dst_node="a"`.
            wanted
                .iter()
                .all(|w| names.contains(&format!("{{{w}")) || names.contains(&format!(",{w}")))
        })
        .find_map(|rest| rest.rsplit(' ').next()?.parse().ok())
}

/// Sum of every sample of a metric family (without `_bucket` etc.) in an agent's
/// exposition; `None` when the family is absent or the scrape failed.
pub fn metric_sum(addr: SocketAddr, family: &str) -> Option<f64> {
    let text = get_text(addr, "/metrics")?;
    let mut found = false;
    let mut sum = 0.0;
    for line in text.lines() {
        let Some(rest) = line.strip_prefix(family) else {
            continue;
        };
        if !(rest.starts_with('{') || rest.starts_with(' ')) {
            continue;
        }
        found = true;
        sum += rest.rsplit(' ').next()?.parse::<f64>().ok()?;
    }
    found.then_some(sum)
}
