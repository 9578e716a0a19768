//! The controller under test: `pingmesh-operator standalone` as a child
//! process (temporary SQLite registry, fixed ports so a restart comes back on
//! the same address), its CPU and memory from `/proc`, and its `/metrics`.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::time::{Duration, Instant};

use anyhow::{Context, bail};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio::process::{Child, Command};

/// How to start the controller again after a restart.
#[derive(Debug, Clone)]
pub struct Launch {
    pub binary: PathBuf,
    pub registry: PathBuf,
    pub grpc_addr: SocketAddr,
    pub http_addr: SocketAddr,
    pub window_ms: u32,
    pub log: PathBuf,
}

#[derive(Debug)]
pub struct ChildController {
    pub launch: Launch,
    child: Child,
}

/// Two free loopback ports (bound and released: a tiny race, fine for a benchmark).
pub fn free_addrs() -> anyhow::Result<(SocketAddr, SocketAddr)> {
    let a = std::net::TcpListener::bind("127.0.0.1:0")?;
    let b = std::net::TcpListener::bind("127.0.0.1:0")?;
    Ok((a.local_addr()?, b.local_addr()?))
}

/// `pingmesh-operator` next to this binary (both live in `target/<profile>/`).
pub fn default_binary() -> Option<PathBuf> {
    let me = std::env::current_exe().ok()?;
    let candidate = me.parent()?.join("pingmesh-operator");
    candidate.exists().then_some(candidate)
}

impl ChildController {
    pub async fn start(launch: Launch) -> anyhow::Result<Self> {
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(&launch.log)
            .with_context(|| format!("opening {}", launch.log.display()))?;
        let child = Command::new(&launch.binary)
            .arg("standalone")
            .arg("--grpc-addr")
            .arg(launch.grpc_addr.to_string())
            .arg("--http-addr")
            .arg(launch.http_addr.to_string())
            .arg("--registry")
            .arg(format!("sqlite://{}", launch.registry.display()))
            .arg("--window-ms")
            .arg(launch.window_ms.to_string())
            .arg("--log-format")
            .arg("json")
            .env("PINGMESH_LOG_LEVEL", "warn")
            .env_remove("PINGMESH_CONFIG")
            .stdin(Stdio::null())
            .stdout(log.try_clone()?)
            .stderr(log)
            .kill_on_drop(true)
            .spawn()
            .with_context(|| format!("starting {}", launch.binary.display()))?;
        let mut c = Self { launch, child };
        c.wait_ready(Duration::from_mins(1)).await?;
        Ok(c)
    }

    pub fn pid(&self) -> Option<u32> {
        self.child.id()
    }

    async fn wait_ready(&mut self, limit: Duration) -> anyhow::Result<()> {
        let began = Instant::now();
        loop {
            if let Some(status) = self.child.try_wait()? {
                bail!(
                    "controller exited at start ({status}); see {}",
                    self.launch.log.display()
                );
            }
            if http_get(self.launch.http_addr, "/healthz").await.is_ok() {
                return Ok(());
            }
            if began.elapsed() > limit {
                bail!("controller not serving after {limit:?}");
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    /// `Some(status)` when the process has exited.
    pub fn exited(&mut self) -> Option<std::process::ExitStatus> {
        self.child.try_wait().ok().flatten()
    }

    /// SIGTERM (graceful, as a rolling update does), then waits for the exit.
    pub async fn stop(&mut self) -> anyhow::Result<std::process::ExitStatus> {
        if let Some(pid) = self.child.id() {
            let _ = Command::new("kill")
                .arg("-TERM")
                .arg(pid.to_string())
                .status()
                .await;
        }
        if let Ok(status) = tokio::time::timeout(Duration::from_secs(30), self.child.wait()).await {
            return Ok(status?);
        }
        self.child.kill().await?;
        Ok(self.child.wait().await?)
    }
}

/// CPU seconds (user + system) and memory of a process, from `/proc`.
#[derive(Debug, Clone, Copy, Default)]
pub struct ProcSample {
    pub cpu_secs: f64,
    pub rss_bytes: u64,
    pub peak_rss_bytes: u64,
    pub at: Option<Instant>,
}

/// `None` where `/proc` is not there (macOS) or the process is gone.
pub fn proc_sample(pid: u32) -> Option<ProcSample> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    // Fields after the command (which may hold spaces) start after the last ')'.
    let rest = &stat[stat.rfind(')')? + 2..];
    let fields: Vec<&str> = rest.split_whitespace().collect();
    // utime and stime are fields 14 and 15 of the line, 12 and 13 after the command.
    let utime: u64 = fields.get(11)?.parse().ok()?;
    let stime: u64 = fields.get(12)?.parse().ok()?;
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    let kib = |key: &str| {
        status
            .lines()
            .find_map(|l| l.strip_prefix(key))
            .and_then(|v| v.split_whitespace().next()?.parse::<u64>().ok())
            .unwrap_or(0)
            * 1_024
    };
    Some(ProcSample {
        cpu_secs: (utime + stime) as f64 / clock_ticks(),
        rss_bytes: kib("VmRSS:"),
        peak_rss_bytes: kib("VmHWM:"),
        at: Some(Instant::now()),
    })
}

fn clock_ticks() -> f64 {
    static TICKS: std::sync::OnceLock<f64> = std::sync::OnceLock::new();
    *TICKS.get_or_init(|| {
        std::process::Command::new("getconf")
            .arg("CLK_TCK")
            .output()
            .ok()
            .and_then(|o| String::from_utf8(o.stdout).ok())
            .and_then(|s| s.trim().parse::<f64>().ok())
            .filter(|t| *t > 0.0)
            .unwrap_or(100.0)
    })
}

/// Share of one core between two samples.
pub fn cpu_share(a: &ProcSample, b: &ProcSample) -> Option<f64> {
    let wall = b.at?.duration_since(a.at?).as_secs_f64();
    (wall > 0.0).then(|| (b.cpu_secs - a.cpu_secs) / wall)
}

/// A plain HTTP/1.1 GET (no client library: the controller's port speaks it).
pub async fn http_get(addr: SocketAddr, path: &str) -> anyhow::Result<String> {
    let mut stream = tokio::time::timeout(Duration::from_secs(5), TcpStream::connect(addr))
        .await
        .context("connect timed out")??;
    let request = format!("GET {path} HTTP/1.1\r\nHost: {addr}\r\nConnection: close\r\n\r\n");
    stream.write_all(request.as_bytes()).await?;
    let mut body = Vec::new();
    tokio::time::timeout(Duration::from_mins(1), stream.read_to_end(&mut body))
        .await
        .context("read timed out")??;
    let text = String::from_utf8_lossy(&body).into_owned();
    let (head, rest) = text.split_once("\r\n\r\n").context("no HTTP header end")?;
    if !head.starts_with("HTTP/1.1 200") {
        bail!("GET {path}: {}", head.lines().next().unwrap_or_default());
    }
    if head
        .to_ascii_lowercase()
        .contains("transfer-encoding: chunked")
    {
        return Ok(dechunk(rest));
    }
    Ok(rest.to_owned())
}

fn dechunk(mut s: &str) -> String {
    let mut out = String::new();
    while let Some((size, rest)) = s.split_once("\r\n") {
        let Ok(n) = usize::from_str_radix(size.trim(), 16) else {
            break;
        };
        if n == 0 || rest.len() < n {
            break;
        }
        out.push_str(&rest[..n]);
        s = rest[n..].trim_start_matches("\r\n");
    }
    out
}

/// The figures the simulator reads from a `/metrics` scrape.
#[derive(Debug, Clone, Default)]
pub struct Scrape {
    /// Sample lines (series), comments left out.
    pub series: usize,
    pub windows_evaluated: f64,
    pub summaries_accepted: f64,
    /// Summaries refused for any reason other than being duplicates.
    pub summaries_rejected: f64,
    /// `(sum, count)` of `pingmesh_window_processing_seconds` per phase.
    pub phases: Vec<(String, f64, f64)>,
    pub root_causes_localized: f64,
    pub connected_agents: f64,
    /// Series of the ToR-pair families (the part of the budget that grows with the fleet).
    pub tor_pair_series: usize,
}

pub async fn scrape(addr: SocketAddr) -> anyhow::Result<Scrape> {
    Ok(parse_metrics(&http_get(addr, "/metrics").await?))
}

fn label<'a>(line: &'a str, name: &str) -> Option<&'a str> {
    let start = line.find(&format!("{name}=\""))? + name.len() + 2;
    let len = line[start..].find('"')?;
    Some(&line[start..start + len])
}

pub fn parse_metrics(text: &str) -> Scrape {
    let mut s = Scrape::default();
    for line in text.lines() {
        if line.is_empty() || line.starts_with('#') {
            continue;
        }
        s.series += 1;
        let Some((name_labels, value)) = line.rsplit_once(' ') else {
            continue;
        };
        let value: f64 = value.parse().unwrap_or(0.0);
        let name = name_labels.split('{').next().unwrap_or_default();
        match name {
            "pingmesh_controller_windows_evaluated_total" => s.windows_evaluated = value,
            "pingmesh_controller_window_summaries_total" => match label(line, "result") {
                Some("accepted") => s.summaries_accepted += value,
                Some("duplicate") => {}
                _ => s.summaries_rejected += value,
            },
            "pingmesh_root_causes_localized" => s.root_causes_localized += value,
            "pingmesh_controller_agents" if label(line, "state") == Some("connected") => {
                s.connected_agents = value;
            }
            "pingmesh_window_processing_seconds_sum"
            | "pingmesh_window_processing_seconds_count" => {
                let phase = label(line, "phase").unwrap_or_default().to_owned();
                let i = s
                    .phases
                    .iter()
                    .position(|p| p.0 == phase)
                    .unwrap_or_else(|| {
                        s.phases.push((phase, 0.0, 0.0));
                        s.phases.len() - 1
                    });
                if name.ends_with("_sum") {
                    s.phases[i].1 = value;
                } else {
                    s.phases[i].2 = value;
                }
            }
            _ => {}
        }
        if name.starts_with("pingmesh_tor_pair_") {
            s.tor_pair_series += 1;
        }
    }
    s
}

impl Scrape {
    /// Mean seconds per judged window of `phase` between `self` (earlier) and `later`.
    pub fn phase_mean(&self, later: &Scrape, phase: &str) -> Option<f64> {
        let get = |s: &Scrape| {
            s.phases
                .iter()
                .find(|p| p.0 == phase)
                .map(|p| (p.1, p.2))
                .unwrap_or_default()
        };
        let (s0, c0) = get(self);
        let (s1, c1) = get(later);
        (c1 > c0).then(|| (s1 - s0) / (c1 - c0))
    }
}

/// Log lines at ERROR level (the controller logs JSON).
pub fn error_lines(log: &Path) -> Vec<String> {
    std::fs::read_to_string(log)
        .unwrap_or_default()
        .lines()
        .filter(|l| l.contains("\"level\":\"ERROR\""))
        .map(str::to_owned)
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn scrape_reads_phases_counts_and_series() {
        let text = "# HELP x\n\
            pingmesh_controller_windows_evaluated_total 3\n\
            pingmesh_controller_window_summaries_total{result=\"accepted\"} 100\n\
            pingmesh_controller_window_summaries_total{result=\"duplicate\"} 4\n\
            pingmesh_controller_window_summaries_total{result=\"too_old\"} 2\n\
            pingmesh_window_processing_seconds_sum{phase=\"evaluate\"} 0.5\n\
            pingmesh_window_processing_seconds_count{phase=\"evaluate\"} 2\n\
            pingmesh_tor_pair_loss_ratio{src_tor=\"a\",dst_tor=\"b\"} 0\n";
        let s = parse_metrics(text);
        assert_eq!(s.series, 7);
        assert!((s.windows_evaluated - 3.0).abs() < 1e-9);
        assert!((s.summaries_accepted - 100.0).abs() < 1e-9);
        assert!((s.summaries_rejected - 2.0).abs() < 1e-9);
        assert_eq!(s.tor_pair_series, 1);
        let zero = Scrape::default();
        assert_eq!(zero.phase_mean(&s, "evaluate"), Some(0.25));
    }

    #[test]
    fn chunked_bodies_are_joined() {
        assert_eq!(dechunk("4\r\nabcd\r\n2\r\nef\r\n0\r\n\r\n"), "abcdef");
    }
}
