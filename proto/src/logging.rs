//! Log setup shared by every `PingMesh` binary: `--log-format json|plain`, level
//! from `--log-level` or `RUST_LOG`.

use clap::{Args, ValueEnum};
use tracing_subscriber::EnvFilter;

#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum LogFormat {
    Plain,
    Json,
}

#[derive(Debug, Clone, Args)]
pub struct LogArgs {
    /// Log line format.
    #[arg(long, env = "PINGMESH_LOG_FORMAT", value_enum, default_value_t = LogFormat::Plain, global = true)]
    pub log_format: LogFormat,
    /// Log filter, e.g. `info` or `pingmesh_agent=debug,info` (`RUST_LOG` syntax).
    #[arg(
        long,
        env = "PINGMESH_LOG_LEVEL",
        default_value = "info",
        global = true
    )]
    pub log_level: String,
}

/// Installs the global subscriber; logs go to stderr so stdout stays for output.
/// A second call (tests) is a no-op.
pub fn init(args: &LogArgs) {
    let filter = EnvFilter::try_new(&args.log_level).unwrap_or_else(|_| EnvFilter::new("info"));
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr);
    let _ = match args.log_format {
        LogFormat::Json => builder.json().try_init(),
        LogFormat::Plain => builder.try_init(),
    };
}
