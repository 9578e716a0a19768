//! Agent configuration: every flag also reads an environment variable.

use std::net::{IpAddr, SocketAddr};
use std::path::PathBuf;
use std::time::Duration;

use clap::{ArgAction, Args, ValueEnum};

use crate::transport::TimestampMode;
use crate::transport::rdma::discovery::DEFAULT_SYSFS_ROOT;

#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum TimestampChoice {
    /// User-space monotonic time only.
    Off,
    /// Kernel software RX/TX timestamps (`SO_TIMESTAMPING`), the default.
    Software,
    /// NIC hardware timestamps where the NIC offers them, else software.
    Hardware,
}

impl From<TimestampChoice> for TimestampMode {
    fn from(c: TimestampChoice) -> Self {
        match c {
            TimestampChoice::Off => TimestampMode::Off,
            TimestampChoice::Software => TimestampMode::Software,
            TimestampChoice::Hardware => TimestampMode::Hardware,
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum TransportChoice {
    /// RDMA when the host has an RNIC port that opens, else UDP.
    Auto,
    /// RDMA only; the agent refuses to start without it.
    Rdma,
    /// UDP with kernel timestamps.
    Udp,
}

#[derive(Debug, Clone, Args)]
pub struct AgentConfig {
    /// Faults the prober emulates (the local demo's `--inject`); never from flags.
    #[arg(skip)]
    pub emulated_fabric: Option<std::sync::Arc<dyn crate::probe::emulate::EmulatedFabric>>,
    /// Which transport probes run over.
    #[arg(long, env = "PINGMESH_TRANSPORT", value_enum, default_value_t = TransportChoice::Auto)]
    pub transport: TransportChoice,
    /// Mesh controller gRPC URL: `https://` for TLS (see the `--controller-ca`
    /// family below), `http://` for plain text.
    #[arg(
        long,
        env = "PINGMESH_CONTROLLER",
        default_value = "http://127.0.0.1:9400"
    )]
    pub controller: String,
    #[command(flatten)]
    pub control_security: ControlSecurity,
    /// This node's name (in Kubernetes: from the downward API).
    #[arg(long, env = "NODE_NAME")]
    pub node: String,
    /// ToR of this node's UDP endpoint. Empty: the controller resolves it from node labels.
    #[arg(long, env = "PINGMESH_TOR", default_value = "")]
    pub tor: String,
    /// Address the UDP responder listens on.
    #[arg(long, env = "PINGMESH_UDP_BIND", default_value = "0.0.0.0:9403")]
    pub udp_bind: SocketAddr,
    /// Address other agents should probe. Default: the bind address, or when that is
    /// unspecified, the local address this host uses to reach the controller.
    #[arg(long, env = "PINGMESH_ADVERTISE_ADDR")]
    pub advertise_addr: Option<SocketAddr>,
    /// Kernel/NIC timestamping for T2..T5.
    #[arg(long, env = "PINGMESH_TIMESTAMPS", value_enum, default_value_t = TimestampChoice::Software)]
    pub timestamps: TimestampChoice,
    /// Most UDP source ports (ECMP flows) the prober opens, whatever the controller
    /// asks: 1 to 64 (`MAX_FLOWS_PER_TARGET`, what a summary's flow masks can tell apart).
    #[arg(
        long,
        env = "PINGMESH_MAX_FLOWS",
        default_value_t = 64,
        value_parser = clap::value_parser!(u16)
            .range(1..=i64::from(pingmesh_proto::limits::MAX_FLOWS_PER_TARGET))
    )]
    pub max_flows: u16,
    /// Most probes awaiting ACKs at once; more are not sent and are counted.
    #[arg(long, env = "PINGMESH_MAX_PENDING", default_value_t = 65_536)]
    pub max_pending: usize,
    /// Address of /metrics, /healthz and /readyz. Port 0 picks a free port.
    #[arg(long, env = "PINGMESH_METRICS_ADDR", default_value = "0.0.0.0:9402")]
    pub metrics_addr: SocketAddr,
    /// Export probe series per target node too (grows with the mesh; see docs/metrics.md).
    #[arg(
        long,
        env = "PINGMESH_METRICS_PER_TARGET_NODE",
        default_value_t = false
    )]
    pub metrics_per_target_node: bool,
    /// Window summaries kept for the controller while it is unreachable.
    #[arg(long, env = "PINGMESH_REPORT_BUFFER", default_value_t = 50_000)]
    pub report_buffer: usize,
    #[command(flatten)]
    pub rdma: RdmaArgs,
    /// Trace RDMA service connections with eBPF.
    #[arg(long, env = "PINGMESH_TRACING", default_value_t = false, action = ArgAction::Set)]
    pub tracing: bool,
}

/// How the control channel is secured (docs/security.md). Every file is read
/// again at each (re)connect, and the token file at every call, so rotated
/// certificates and tokens are picked up without a restart.
#[derive(Debug, Clone, Default, Args)]
pub struct ControlSecurity {
    /// PEM CA bundle the controller's certificate must chain to (needed for `https://`).
    #[arg(long, env = "PINGMESH_CONTROLLER_CA")]
    pub controller_ca: Option<PathBuf>,
    /// The same CA bundle inline, as PEM text (what the operator puts in an
    /// agent pod's environment); used when `--controller-ca` is not set.
    #[arg(long, env = "PINGMESH_CONTROLLER_CA_PEM", hide_env_values = true)]
    pub controller_ca_pem: Option<String>,
    /// Name the controller's certificate must carry. Default: the URL's host.
    #[arg(long, env = "PINGMESH_CONTROLLER_SERVER_NAME")]
    pub controller_server_name: Option<String>,
    /// PEM client certificate for mutual TLS; its subject CN must be this node's name.
    #[arg(long, env = "PINGMESH_TLS_CERT", requires = "tls_key")]
    pub tls_cert: Option<PathBuf>,
    /// PEM private key of `--tls-cert`.
    #[arg(long, env = "PINGMESH_TLS_KEY", requires = "tls_cert")]
    pub tls_key: Option<PathBuf>,
    /// File holding a bearer token sent with every call (in Kubernetes, the
    /// projected `ServiceAccount` token with the `pingmesh` audience).
    #[arg(long, env = "PINGMESH_TOKEN_FILE")]
    pub token_file: Option<PathBuf>,
    /// Allow an `http://` (plain-text) controller URL whose host is not
    /// loopback. Plain text across hosts is never the default.
    #[arg(long, env = "PINGMESH_INSECURE_PLAINTEXT", num_args = 0..=1, default_missing_value = "true", default_value_t = false, action = ArgAction::Set)]
    pub insecure_plaintext: bool,
}

/// RDMA transport settings (used when the transport is RDMA).
#[derive(Debug, Clone, Args)]
pub struct RdmaArgs {
    /// RNIC devices to probe from, comma-separated (for example `mlx5_0,mlx5_1`). Empty: all.
    #[arg(
        long = "rdma-devices",
        env = "PINGMESH_RDMA_DEVICES",
        value_delimiter = ','
    )]
    pub devices: Vec<String>,
    /// GID table index to use on every port. Unset: the RoCE v2 IPv4-mapped GID, found automatically.
    #[arg(long = "rdma-gid-index", env = "PINGMESH_RDMA_GID_INDEX")]
    pub gid_index: Option<u16>,
    /// GRH traffic class of probes and ACKs (DSCP << 2 | ECN).
    #[arg(
        long = "rdma-traffic-class",
        env = "PINGMESH_RDMA_TRAFFIC_CLASS",
        default_value_t = 0
    )]
    pub traffic_class: u8,
    /// Service level of probes and ACKs (0-15; the priority class on RoCE).
    #[arg(
        long = "rdma-service-level",
        env = "PINGMESH_RDMA_SERVICE_LEVEL",
        default_value_t = 0,
        value_parser = clap::value_parser!(u8).range(0..=15)
    )]
    pub service_level: u8,
    /// Where RNICs are listed in sysfs.
    #[arg(long = "rdma-sysfs-root", env = "PINGMESH_RDMA_SYSFS_ROOT", default_value = DEFAULT_SYSFS_ROOT)]
    pub sysfs_root: PathBuf,
}

impl Default for RdmaArgs {
    fn default() -> Self {
        Self {
            devices: Vec::new(),
            gid_index: None,
            traffic_class: 0,
            service_level: 0,
            sysfs_root: PathBuf::from(DEFAULT_SYSFS_ROOT),
        }
    }
}

impl RdmaArgs {
    /// The device allow-list, without the empty entries an empty variable leaves.
    pub fn allow_list(&self) -> Vec<String> {
        self.devices
            .iter()
            .map(|d| d.trim().to_owned())
            .filter(|d| !d.is_empty())
            .collect()
    }
}

impl AgentConfig {
    /// A configuration for tests and the local demo: everything on loopback.
    pub fn local(node: &str, tor: &str, controller: &str, ip: IpAddr) -> Self {
        Self {
            emulated_fabric: None,
            transport: TransportChoice::Udp,
            controller: controller.to_owned(),
            control_security: ControlSecurity::default(),
            node: node.to_owned(),
            tor: tor.to_owned(),
            udp_bind: SocketAddr::new(ip, 0),
            advertise_addr: None,
            timestamps: TimestampChoice::Software,
            max_flows: 64,
            max_pending: 65_536,
            metrics_addr: SocketAddr::new(ip, 0),
            metrics_per_target_node: false,
            report_buffer: 50_000,
            rdma: RdmaArgs::default(),
            tracing: false,
        }
    }
}

/// Retry pacing for the control channel: exponential with jitter, capped.
#[derive(Debug, Clone, Copy)]
pub struct Backoff {
    next: Duration,
    max: Duration,
}

impl Backoff {
    pub fn new(first: Duration, max: Duration) -> Self {
        Self { next: first, max }
    }

    /// The delay to wait now; doubles the next one. Jittered to 50..100 % so a
    /// fleet that lost its controller does not come back in lockstep.
    pub fn next_delay(&mut self) -> Duration {
        let base = self.next;
        self.next = (self.next * 2).min(self.max);
        base.mul_f64(rand::random_range(0.5..=1.0))
    }

    pub fn reset(&mut self, first: Duration) {
        self.next = first;
    }
}

#[cfg(test)]
mod tests {
    use clap::Parser;

    use super::*;

    #[derive(Debug, Parser)]
    struct Cli {
        #[command(flatten)]
        agent: AgentConfig,
    }

    #[test]
    fn the_operator_configmap_variables_are_read() {
        // The variables and values the operator's ConfigMap sets (operator/src/reconcile/configmap.rs).
        let cli = Cli::try_parse_from([
            "agent",
            "--node",
            "n1",
            "--rdma-devices",
            "mlx5_0,,mlx5_1",
            "--rdma-gid-index",
            "3",
            "--rdma-traffic-class",
            "106",
            "--rdma-service-level",
            "3",
            "--tracing",
            "true",
        ])
        .unwrap();
        let a = cli.agent;
        assert_eq!(a.rdma.allow_list(), ["mlx5_0", "mlx5_1"]);
        assert_eq!(a.rdma.gid_index, Some(3));
        assert_eq!((a.rdma.traffic_class, a.rdma.service_level), (106, 3));
        assert!(a.tracing);
        let defaults = Cli::try_parse_from(["agent", "--node", "n1"])
            .unwrap()
            .agent;
        assert!(defaults.rdma.allow_list().is_empty());
        assert_eq!(defaults.rdma.gid_index, None);
        assert!(!defaults.tracing);
        assert_eq!(defaults.transport, TransportChoice::Auto);
    }

    #[test]
    fn every_configmap_key_is_an_agent_variable() {
        use clap::CommandFactory;
        let command = Cli::command();
        let variables: Vec<String> = command
            .get_arguments()
            .filter_map(|a| a.get_env())
            .map(|v| v.to_string_lossy().into_owned())
            .collect();
        // The keys operator/src/reconcile/configmap.rs writes.
        for key in [
            "PINGMESH_TRANSPORT",
            "PINGMESH_RDMA_DEVICES",
            "PINGMESH_RDMA_GID_INDEX",
            "PINGMESH_RDMA_TRAFFIC_CLASS",
            "PINGMESH_RDMA_SERVICE_LEVEL",
            "PINGMESH_TRACING",
        ] {
            assert!(variables.iter().any(|v| v == key), "{key} is not read");
        }
    }

    #[test]
    fn out_of_range_rdma_settings_are_refused() {
        for args in [
            ["--rdma-service-level", "16"],
            ["--rdma-traffic-class", "256"],
            ["--rdma-gid-index", "-1"],
            ["--tracing", "maybe"],
            ["--max-flows", "65"],
            ["--max-flows", "0"],
        ] {
            let mut argv = vec!["agent", "--node", "n1"];
            argv.extend(args);
            assert!(Cli::try_parse_from(&argv).is_err(), "{args:?} accepted");
        }
    }

    #[test]
    fn control_channel_security_flags_are_read() {
        let a = Cli::try_parse_from([
            "agent",
            "--node",
            "n1",
            "--controller",
            "https://ctl:9400",
            "--controller-ca",
            "/ca.crt",
            "--tls-cert",
            "/tls.crt",
            "--tls-key",
            "/tls.key",
            "--token-file",
            "/token",
            "--insecure-plaintext",
        ])
        .unwrap()
        .agent;
        let s = a.control_security;
        assert_eq!(s.controller_ca, Some(PathBuf::from("/ca.crt")));
        assert_eq!(s.tls_key, Some(PathBuf::from("/tls.key")));
        assert_eq!(s.token_file, Some(PathBuf::from("/token")));
        assert!(s.insecure_plaintext);
        // A certificate without its key is refused at once.
        assert!(Cli::try_parse_from(["agent", "--node", "n1", "--tls-cert", "/c"]).is_err());
        let defaults = Cli::try_parse_from(["agent", "--node", "n1"])
            .unwrap()
            .agent;
        assert!(!defaults.control_security.insecure_plaintext);
    }

    #[test]
    fn backoff_grows_to_its_cap_and_stays_jittered_below_it() {
        let mut b = Backoff::new(Duration::from_millis(100), Duration::from_secs(2));
        let delays: Vec<Duration> = (0..10).map(|_| b.next_delay()).collect();
        assert!(delays[0] <= Duration::from_millis(100));
        assert!(delays[0] >= Duration::from_millis(50));
        assert!(delays.iter().all(|d| *d <= Duration::from_secs(2)));
        assert!(delays[9] >= Duration::from_secs(1));
    }
}
