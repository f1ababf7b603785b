//! The command line of `herd`: commands and flags (clap derive), and the checks clap can't do.

use std::path::PathBuf;

use clap::{Args, Parser, Subcommand};
use herd_shared::telemetry::LogFormat;

use super::CliError;

/// Most workers `herd up` starts on one machine; more only fight over its cores.
pub const MAX_WORKERS: u16 = 64;

/// `herd`: run a local herd cluster (Redis, workers, a gateway) and look after it.
#[derive(Debug, Parser)]
#[command(name = "herd", version, about, long_about = None)]
pub struct Cli {
    /// Format of herd's own log lines on stderr.
    #[arg(long, value_enum, default_value_t = LogFormat::Auto, global = true)]
    pub log_format: LogFormat,
    /// What to do.
    #[command(subcommand)]
    pub command: Command,
}

/// The commands.
#[derive(Debug, Subcommand)]
pub enum Command {
    /// Start Redis, the workers and a gateway on this machine; stay until Ctrl-C (or --detach).
    Up(UpArgs),
    /// Show whether every process of the cluster runs and answers; exit 0 all healthy, 1 some
    /// down, 3 no cluster.
    Status(StateDirArgs),
    /// Stop a cluster started with `herd up` (gateway, workers, Redis, in that order).
    Down(StateDirArgs),
    /// Multi-host experiments in network namespaces on this machine (needs root).
    #[command(subcommand)]
    Lab(LabCommand),
}

/// `herd lab …`.
#[derive(Debug, Subcommand)]
pub enum LabCommand {
    /// Kill -9 the active proxy and take the active machine's link down, against herd's gateway
    /// pair and against keepalived + HAProxy in the same topology, and print the figures side by
    /// side (the table of docs/failover.md).
    FailoverCompare(FailoverCompareArgs),
}

/// Flags of `herd lab failover-compare`.
#[derive(Debug, Clone, Args)]
pub struct FailoverCompareArgs {
    /// How long each run probes (the fault comes 2 s in).
    #[arg(long, default_value = "8s", value_parser = humantime::parse_duration, value_name = "DURATION")]
    pub duration: std::time::Duration,
    /// Also write the Markdown table to this file.
    #[arg(long, value_name = "FILE")]
    pub out: Option<PathBuf>,
    /// Keep every process's logs here (default: a temporary directory, removed afterwards).
    #[arg(long, value_name = "DIR")]
    pub log_dir: Option<PathBuf>,
}

/// Where a cluster's state lives.
#[derive(Debug, Clone, Args)]
pub struct StateDirArgs {
    /// State directory: state file, admin token, logs, Redis data.
    #[arg(
        long,
        env = "HERD_STATE_DIR",
        default_value = ".herd",
        value_name = "DIR"
    )]
    pub state_dir: PathBuf,
}

/// Flags of `herd up`.
#[derive(Debug, Clone, Args)]
pub struct UpArgs {
    /// Number of workers (ids w1..wN).
    #[arg(long, default_value_t = 3, value_name = "N",
          value_parser = clap::value_parser!(u16).range(1..=i64::from(MAX_WORKERS)))]
    pub workers: u16,
    /// Public port of the gateway on 127.0.0.1 (0 = any free port).
    #[arg(long, default_value_t = 8080, value_name = "PORT")]
    pub port: u16,
    /// Admin port of the gateway on 127.0.0.1 (0 = any free port).
    #[arg(long, default_value_t = 9090, value_name = "PORT")]
    pub admin_port: u16,
    /// Port of the private redis-server (default or 0: a free one).
    #[arg(long, value_name = "PORT")]
    pub redis_port: Option<u16>,
    /// Start the cluster, record it in the state file and return, leaving it running.
    #[arg(long)]
    pub detach: bool,
    /// Where the cluster's state lives.
    #[command(flatten)]
    pub state: StateDirArgs,
}

impl UpArgs {
    /// The fixed Redis port, if one was asked for (0 means "any free one", like no flag).
    pub fn fixed_redis_port(&self) -> Option<u16> {
        self.redis_port.filter(|port| *port != 0)
    }

    /// Checks what clap can't: two listeners can't share a fixed port.
    pub fn validate(&self) -> Result<(), CliError> {
        let fixed = [
            ("--port", Some(self.port)),
            ("--admin-port", Some(self.admin_port)),
            ("--redis-port", self.fixed_redis_port()),
        ];
        for (i, (flag, port)) in fixed.iter().enumerate() {
            for (other_flag, other_port) in &fixed[i + 1..] {
                if let (Some(port), Some(other)) = (port, other_port)
                    && *port != 0
                    && port == other
                {
                    return Err(CliError::Usage(format!(
                        "{flag} and {other_flag} are both {port}; each listener needs its own port"
                    )));
                }
            }
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::path::Path;

    fn parse(args: &[&str]) -> Result<Cli, clap::Error> {
        Cli::try_parse_from(std::iter::once("herd").chain(args.iter().copied()))
    }

    fn up(args: &[&str]) -> UpArgs {
        match parse(&[&["up"], args].concat()).unwrap().command {
            Command::Up(up) => up,
            other => panic!("not up: {other:?}"),
        }
    }

    #[test]
    fn up_defaults() {
        let args = up(&[]);
        assert_eq!(args.workers, 3);
        assert_eq!(args.port, 8080);
        assert_eq!(args.admin_port, 9090);
        assert_eq!(args.fixed_redis_port(), None);
        assert!(!args.detach);
        // HERD_STATE_DIR may be set where the tests run; only check the default when it isn't.
        if std::env::var_os("HERD_STATE_DIR").is_none() {
            assert_eq!(args.state.state_dir, PathBuf::from(".herd"));
        }
        args.validate().unwrap();
    }

    #[test]
    fn up_flags() {
        let args = up(&[
            "--workers",
            "5",
            "--port",
            "0",
            "--admin-port",
            "0",
            "--redis-port",
            "0",
            "--state-dir",
            "/tmp/x",
            "--detach",
        ]);
        assert_eq!(args.workers, 5);
        assert_eq!((args.port, args.admin_port), (0, 0));
        assert_eq!(args.fixed_redis_port(), None);
        assert_eq!(args.state.state_dir, PathBuf::from("/tmp/x"));
        assert!(args.detach);
        // Two "any free port" listeners don't clash.
        args.validate().unwrap();
    }

    #[test]
    fn worker_count_is_bounded() {
        assert!(parse(&["up", "--workers", "0"]).is_err());
        assert!(parse(&["up", "--workers", "65"]).is_err());
        assert!(parse(&["up", "--workers", "many"]).is_err());
        assert_eq!(up(&["--workers", "64"]).workers, 64);
    }

    #[test]
    fn clashing_ports_are_refused() {
        for args in [
            &["--port", "7000", "--admin-port", "7000"][..],
            &["--redis-port", "9090"][..],
            &["--port", "6400", "--redis-port", "6400"][..],
        ] {
            let error = up(args).validate().unwrap_err();
            assert!(matches!(error, CliError::Usage(_)), "{args:?}");
            assert!(error.to_string().contains("own port"), "{error}");
            assert_eq!(error.exit_code(), 2);
        }
    }

    #[test]
    fn status_and_down_take_a_state_dir() {
        let cli = parse(&["status", "--state-dir", "/tmp/s"]).unwrap();
        assert!(matches!(cli.command, Command::Status(s) if s.state_dir == Path::new("/tmp/s")));
        let cli = parse(&["down", "--log-format", "json"]).unwrap();
        assert!(matches!(cli.command, Command::Down(_)));
        assert_eq!(cli.log_format, LogFormat::Json);
        assert!(parse(&["sideways"]).is_err());
        assert!(parse(&["up", "--port", "70000"]).is_err());
    }
}
