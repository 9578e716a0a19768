//! The processes the chaos scenarios break: a controller on any registry
//! (optionally inside a network namespace), and a 3-node rqlite cluster.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use crate::common::netns::in_netns;
use crate::common::{Proc, TIMEOUT_MS, WINDOW_MS, binary, free_port, get_json, get_text, wait_for};

/// How a controller is started; kept so it can be started again on the same
/// ports and registry.
#[derive(Clone, Debug)]
pub struct ControllerSpec {
    pub dir: PathBuf,
    pub registry: String,
    pub grpc: SocketAddr,
    pub http: SocketAddr,
    /// Network namespace to run in (its HTTP API is then read from inside it).
    pub netns: Option<String>,
    /// Seconds after which an agent that is not connected leaves the registry.
    pub stale_after_secs: u64,
    /// Name of its log file under `dir` (restarts append).
    pub log: String,
}

impl ControllerSpec {
    pub fn loopback(dir: &Path, registry: String) -> Self {
        Self {
            dir: dir.to_path_buf(),
            registry,
            grpc: SocketAddr::new([127, 0, 0, 1].into(), free_port("127.0.0.1")),
            http: SocketAddr::new([127, 0, 0, 1].into(), free_port("127.0.0.1")),
            netns: None,
            stale_after_secs: 300,
            log: "controller.log".into(),
        }
    }

    /// Starts it and waits until /healthz answers.
    pub fn start(&self) -> Proc {
        let config = self.dir.join("mesh.yaml");
        std::fs::write(
            &config,
            format!(
                "staleAfterSecs: {}\nreportGraceMs: 600\npinglist:\n  windowMs: {WINDOW_MS}\n  probeTimeoutMs: {TIMEOUT_MS}\n  torMeshRatePps: 50\n  interTorRatePps: 50\n  interTorSampleTors: 8\n  interTorTargetsPerTor: 8\n  ecmpPaths: 2\nsla:\n  minProbes: 10\n",
                self.stale_after_secs
            ),
        )
        .expect("write config");
        let mut command = match &self.netns {
            Some(ns) => {
                let mut c = Command::new("ip");
                c.args(["netns", "exec", ns])
                    .arg(binary("pingmesh-operator"));
                c
            }
            None => Command::new(binary("pingmesh-operator")),
        };
        command
            .args(["standalone", "--config"])
            .arg(&config)
            .args(["--grpc-addr", &self.grpc.to_string()])
            .args(["--http-addr", &self.http.to_string()])
            .args(["--registry", &self.registry]);
        if !self.grpc.ip().is_loopback() {
            // Plain text off loopback is refused unless allowed (docs/security.md).
            command.env("PINGMESH_INSECURE_PLAINTEXT", "true");
        }
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(self.dir.join(&self.log))
            .expect("controller log");
        let child = command
            .env("PINGMESH_LOG_LEVEL", "info")
            .stdout(Stdio::null())
            .stderr(log)
            .spawn()
            .expect("start controller");
        let proc = Proc {
            name: "controller".into(),
            child,
        };
        wait_for(Duration::from_secs(30), "controller /healthz", || {
            self.get_text("/healthz").is_some()
        });
        proc
    }

    pub fn get_text(&self, path: &str) -> Option<String> {
        match &self.netns {
            Some(ns) => in_netns(ns, || get_text(self.http, path)).flatten(),
            None => get_text(self.http, path),
        }
    }

    pub fn get_json(&self, path: &str) -> Option<serde_json::Value> {
        match &self.netns {
            Some(ns) => in_netns(ns, || get_json(self.http, path)).flatten(),
            None => get_json(self.http, path),
        }
    }

    pub fn metrics(&self) -> String {
        self.get_text("/metrics").unwrap_or_default()
    }

    /// Nodes in /api/v1/agents, and how many of them are connected.
    pub fn agents(&self) -> (Vec<String>, usize) {
        let list = self
            .get_json("/api/v1/agents")
            .and_then(|v| v.as_array().cloned())
            .unwrap_or_default();
        let connected = list.iter().filter(|a| a["connected"] == true).count();
        let nodes = list
            .iter()
            .filter_map(|a| a["node"].as_str().map(str::to_owned))
            .collect();
        (nodes, connected)
    }
}

/// Agent flags that allow a plain-text controller off loopback, for agents
/// that refuse one without them (docs/security.md); none for older agents.
pub fn agent_plaintext_flags() -> &'static [&'static str] {
    let help = Command::new(binary("pingmesh-agent"))
        .arg("--help")
        .output()
        .map(|o| String::from_utf8_lossy(&o.stdout).into_owned())
        .unwrap_or_default();
    if help.contains("--insecure-plaintext") {
        &["--insecure-plaintext", "true"]
    } else {
        &[]
    }
}

/// Sends SIGKILL: the process gets no chance to flush or say goodbye.
pub fn sigkill(proc: &mut Proc) {
    proc.kill();
}

/// One `rqlited` process of a test cluster.
pub struct RqliteNode {
    pub http: SocketAddr,
    pub proc: Option<Proc>,
}

/// A 3-node rqlite cluster on free loopback ports; killed when dropped.
pub struct RqliteCluster {
    pub nodes: Vec<RqliteNode>,
}

impl RqliteCluster {
    pub fn start(rqlited: &Path, dir: &Path) -> Self {
        let ports: Vec<(u16, u16)> = (0..3)
            .map(|_| (free_port("127.0.0.1"), free_port("127.0.0.1")))
            .collect();
        let join = format!("127.0.0.1:{}", ports[0].1);
        let mut nodes = Vec::new();
        for (i, (http, raft)) in ports.iter().enumerate() {
            let log = std::fs::File::create(dir.join(format!("rqlited-{i}.log"))).expect("log");
            let mut command = Command::new(rqlited);
            command
                .arg(format!("-node-id={}", i + 1))
                .arg(format!("-http-addr=127.0.0.1:{http}"))
                .arg(format!("-raft-addr=127.0.0.1:{raft}"));
            if i > 0 {
                command.arg(format!("-join={join}"));
            }
            let child = command
                .arg(dir.join(format!("rqlite-{i}")))
                .stdin(Stdio::null())
                .stdout(Stdio::null())
                .stderr(log)
                .spawn()
                .expect("start rqlited");
            let node = RqliteNode {
                http: SocketAddr::new([127, 0, 0, 1].into(), *http),
                proc: Some(Proc {
                    name: format!("rqlited-{i}"),
                    child,
                }),
            };
            // The others join through the first, which must lead before they ask.
            wait_for(Duration::from_mins(1), "rqlited /readyz", || {
                get_text(node.http, "/readyz").is_some()
            });
            nodes.push(node);
        }
        let cluster = Self { nodes };
        wait_for(Duration::from_mins(1), "3 reachable rqlite nodes", || {
            cluster.reachable_members() == 3
        });
        cluster
    }

    /// `rqlite://` location naming every node.
    pub fn url(&self) -> String {
        let hosts: Vec<String> = self.nodes.iter().map(|n| n.http.to_string()).collect();
        format!("rqlite://{}", hosts.join(","))
    }

    fn live(&self) -> impl Iterator<Item = &RqliteNode> {
        self.nodes.iter().filter(|n| n.proc.is_some())
    }

    fn nodes_view(&self) -> Vec<serde_json::Value> {
        self.live()
            .find_map(|n| get_json(n.http, "/nodes?ver=2"))
            .and_then(|v| v["nodes"].as_array().cloned())
            .unwrap_or_default()
    }

    fn reachable_members(&self) -> usize {
        self.nodes_view()
            .iter()
            .filter(|n| n["reachable"] == true)
            .count()
    }

    /// Index of the live node that leads, as a live node sees it.
    pub fn leader(&self) -> Option<usize> {
        let view = self.nodes_view();
        let leader = view.iter().find(|n| n["leader"] == true)?;
        let api = leader["api_addr"].as_str()?;
        self.nodes
            .iter()
            .position(|n| n.proc.is_some() && api.ends_with(&n.http.to_string()))
    }

    /// SIGKILLs node `i`.
    pub fn kill(&mut self, i: usize) {
        if let Some(mut p) = self.nodes[i].proc.take() {
            p.kill();
        }
    }

    /// Waits until a live node leads; returns how long that took.
    pub fn wait_for_leader(&self, limit: Duration) -> Duration {
        let began = Instant::now();
        wait_for(limit, "a new rqlite leader", || self.leader().is_some());
        began.elapsed()
    }

    /// One value of a strongly consistent query on a live node.
    pub fn query_count(&self, sql: &str) -> Option<u64> {
        let q: String = sql
            .bytes()
            .map(|b| match b {
                b' ' => "%20".to_owned(),
                b'*' => "%2A".to_owned(),
                b'(' => "%28".to_owned(),
                b')' => "%29".to_owned(),
                _ => char::from(b).to_string(),
            })
            .collect();
        let path = format!("/db/query?level=strong&q={q}");
        self.live()
            .find_map(|n| get_json(n.http, &path)?["results"][0]["values"][0][0].as_u64())
    }
}
