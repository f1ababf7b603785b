//! The command line of `herd`: commands and flags (clap derive), and the checks clap can't do.

use std::path::PathBuf;
use std::time::Duration;

use clap::{Args, Parser, Subcommand};
use herd_shared::telemetry::LogFormat;

use super::CliError;
use crate::bench::proxy::Scenario;
use crate::bench::targets::{TargetKind, UpstreamServer};

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
    /// Show the cluster: every process, the workers as the active gateway sees them, both
    /// gateways' roles, Redis; exit 0 all healthy, 1 some down, 3 no cluster.
    Status(StatusArgs),
    /// Set the number of workers of an image: add workers (returns once the gateway sees them
    /// healthy) or drain and stop some.
    Scale(ScaleArgs),
    /// Replace the workers of an image one batch at a time with a new binary or environment;
    /// roll back when a new worker fails its readiness check.
    Rollout(RolloutArgs),
    /// The background supervisor that `herd up --detach` leaves (restarts dead processes).
    #[command(hide = true)]
    Supervise(StateDirArgs),
    /// Stop a cluster started with `herd up` (gateway, workers, Redis, in that order).
    Down(StateDirArgs),
    /// Multi-host experiments in network namespaces on this machine (needs root).
    #[command(subcommand)]
    Lab(LabCommand),
    /// Benchmarks on this machine, loopback only: the gateway against HAProxy and nginx, and the
    /// cost of health-checking many workers.
    #[command(subcommand)]
    Bench(BenchCommand),
    /// Inject a fault under load (a worker or gateway killed, hung or cut off, Redis restarted,
    /// workers added or drained), undo it, check every session, and judge: PASS (exit 0) or
    /// FAIL (exit 1) against the targets of docs/drills.md.
    Drill(DrillArgs),
    /// The gateways' certificates of an inventory's `[gateways.tls]`.
    #[command(subcommand)]
    Tls(TlsCommand),
}

/// `herd tls …`.
#[derive(Debug, Subcommand)]
pub enum TlsCommand {
    /// Copy the certificate and key files of `[gateways.tls]` to both gateway machines again
    /// and have both gateways reload them (SIGHUP): how a renewed certificate goes live.
    Push(TlsPushArgs),
}

/// Flags of `herd tls push`.
#[derive(Debug, Clone, Args)]
pub struct TlsPushArgs {
    /// The inventory whose gateways get the files.
    #[arg(long, value_name = "FILE")]
    pub inventory: PathBuf,
    /// State directory (where `herd up --inventory` keeps local and netns machines' files).
    #[arg(
        long,
        env = "HERD_STATE_DIR",
        default_value = ".herd",
        value_name = "DIR"
    )]
    pub state_dir: PathBuf,
}

/// Longest load `herd drill` runs per drill.
const MAX_DRILL_DURATION: Duration = Duration::from_secs(600);

/// Flags of `herd drill`.
#[derive(Debug, Clone, Args)]
pub struct DrillArgs {
    /// Which drill (`all`: every one in turn, one summary).
    #[arg(value_enum)]
    pub kind: crate::drill::Kind,
    /// Load length per drill (the fault comes at 30 %, is undone at 60 %); 2 s – 10 min.
    #[arg(long, default_value = "10s", value_parser = humantime::parse_duration, value_name = "DURATION")]
    pub duration: Duration,
    /// Requests per second through the public address (a quarter are cart writes).
    #[arg(long, default_value_t = 100, value_name = "N",
          value_parser = clap::value_parser!(u32).range(1..=5000))]
    pub rate: u32,
    /// Users logged in before the fault; every one's cart is checked afterwards.
    #[arg(long, default_value_t = 20, value_name = "N",
          value_parser = clap::value_parser!(u32).range(1..=1000))]
    pub users: u32,
    /// Print the report as one JSON object instead of text.
    #[arg(long)]
    pub json: bool,
    /// Also write the report as Markdown to this file.
    #[arg(long, value_name = "FILE")]
    pub out: Option<PathBuf>,
    /// Build the netns lab (client, gw1, gw2, redis, m1, m2; needs root), drill it, remove it,
    /// instead of drilling the local cluster of --state-dir.
    #[arg(long)]
    pub lab: bool,
    /// Extra environment for the lab's gateways, KEY=VALUE, repeatable (e.g.
    /// HERD_GATEWAY_RETRY__MAX_ATTEMPTS=1 to watch worker-kill fail). Only with --lab.
    #[arg(long, value_name = "KEY=VALUE")]
    pub lab_gateway_env: Vec<String>,
    /// Keep the lab's logs here (default: a temporary directory, removed afterwards).
    #[arg(long, value_name = "DIR")]
    pub log_dir: Option<PathBuf>,
    /// The cluster to drill (without --lab): the local one of --state-dir, or with
    /// --inventory FILE the one `herd up --inventory FILE` runs.
    #[command(flatten)]
    pub state: StateDirArgs,
}

impl DrillArgs {
    /// Checks what clap can't; returns the lab's extra gateway environment.
    pub fn validate(&self) -> Result<Vec<(String, String)>, CliError> {
        if self.duration < Duration::from_secs(2) || self.duration > MAX_DRILL_DURATION {
            return Err(CliError::Usage(format!(
                "--duration must be between 2s and {}",
                humantime::format_duration(MAX_DRILL_DURATION)
            )));
        }
        if self.lab && self.state.inventory.is_some() {
            return Err(CliError::Usage(
                "--lab and --inventory do not go together: --lab builds a lab of its own, --inventory drills the cluster the file describes".into(),
            ));
        }
        if !self.lab && (!self.lab_gateway_env.is_empty() || self.log_dir.is_some()) {
            return Err(CliError::Usage(
                "--lab-gateway-env and --log-dir need --lab".into(),
            ));
        }
        self.lab_gateway_env
            .iter()
            .map(|pair| match pair.split_once('=') {
                Some((key, value)) if key.starts_with("HERD_GATEWAY_") => {
                    Ok((key.to_string(), value.to_string()))
                }
                _ => Err(CliError::Usage(format!(
                    "--lab-gateway-env {pair}: expected HERD_GATEWAY_…=VALUE"
                ))),
            })
            .collect()
    }
}

/// `herd bench …`.
#[derive(Debug, Subcommand)]
pub enum BenchCommand {
    /// Load herd-gateway, HAProxy, nginx and the upstream itself (direct) in one run and print
    /// req/s, latency, the proxies' CPU per request and memory, median over rounds.
    Proxy(BenchProxyArgs),
    /// Register N workers and measure the CPU and memory an idle gateway spends checking them.
    Health(BenchHealthArgs),
    /// Hold many keep-alive connections through the gateway for a long time while workers are
    /// killed and restarted; sample its RSS and descriptors; PASS (exit 0) or FAIL (exit 1).
    Soak(BenchSoakArgs),
    /// Serve a minimal hyper app (200 "hello\n" on every path, HTTP/1.1 and h2c) until killed:
    /// the upstream of `herd bench proxy --upstream hyper`.
    Upstream(BenchUpstreamArgs),
}

/// Flags of `herd bench upstream`.
#[derive(Debug, Clone, Args)]
pub struct BenchUpstreamArgs {
    /// Address to listen on (port 0: a free one; the bound address is printed as a JSON line).
    #[arg(long, default_value = "127.0.0.1:0", value_name = "ADDR")]
    pub listen: std::net::SocketAddr,
}

/// Where a benchmark writes its results and logs.
#[derive(Debug, Clone, Args)]
pub struct BenchOutputArgs {
    /// Also write the Markdown tables to this file.
    #[arg(long, value_name = "FILE")]
    pub out: Option<PathBuf>,
    /// Write the raw per-run results as JSON here (default: beside --out, as .json).
    #[arg(long, value_name = "FILE")]
    pub json: Option<PathBuf>,
    /// Keep configs and every process's logs here (default: a temporary directory, removed
    /// afterwards).
    #[arg(long, value_name = "DIR")]
    pub log_dir: Option<PathBuf>,
}

impl BenchOutputArgs {
    /// Where the JSON goes: `--json`, else `--out` with the extension `.json`.
    pub fn json_path(&self) -> Option<PathBuf> {
        self.json
            .clone()
            .or_else(|| self.out.as_ref().map(|out| out.with_extension("json")))
    }
}

/// Longest single run `herd bench` accepts.
const MAX_BENCH_DURATION: Duration = Duration::from_secs(600);

/// Flags of `herd bench proxy`.
#[derive(Debug, Clone, Args)]
pub struct BenchProxyArgs {
    /// Length of each load run (whole seconds, 1 s – 10 min).
    #[arg(long, default_value = "10s", value_parser = humantime::parse_duration, value_name = "DURATION")]
    pub duration: Duration,
    /// Rounds; every round loads every target at every concurrency, and the tables show the
    /// median over the rounds.
    #[arg(long, default_value_t = 3, value_name = "N",
          value_parser = clap::value_parser!(u32).range(1..=100))]
    pub rounds: u32,
    /// Requests in flight (wrk connections), comma-separated.
    #[arg(long, value_delimiter = ',', default_value = "64,256", value_name = "C,…",
          value_parser = clap::value_parser!(u32).range(1..=10_000))]
    pub concurrency: Vec<u32>,
    /// What to load: hello (HTTP/1.1, hello app), session (GET /me of the demo app with a
    /// session cookie; Redis), h2 (HTTP/2 cleartext, hello app, with h2load); over TLS (not by
    /// default; docs/tls.md): tls-ecdsa / tls-rsa (keep-alive), tls-ecdsa-handshake /
    /// tls-rsa-handshake (a new connection and full handshake per request), tls-h2 (HTTP/2
    /// over TLS, ALPN h2, with h2load), browser (tls-h2 with a browser's 13 request headers and
    /// cookies); api (a JSON POST), page (64 KiB answers) and close (hello with `Connection:
    /// close`: a new connection per request).
    #[arg(
        long,
        value_delimiter = ',',
        value_enum,
        default_value = "hello,session,h2",
        value_name = "S,…"
    )]
    pub scenarios: Vec<Scenario>,
    /// Which targets to load, in the order each round visits them.
    #[arg(
        long,
        value_delimiter = ',',
        value_enum,
        default_value = "direct,herd,haproxy,nginx",
        value_name = "T,…"
    )]
    pub targets: Vec<TargetKind>,
    /// Warm-up load per target, at the highest concurrency, before the first round (0s: none).
    #[arg(long, default_value = "1s", value_parser = humantime::parse_duration, value_name = "DURATION")]
    pub warmup: Duration,
    /// Load generator threads (wrk -t, h2load -t).
    #[arg(long, default_value_t = 2, value_name = "N",
          value_parser = clap::value_parser!(u32).range(1..=64))]
    pub threads: u32,
    /// HTTP/2 streams per connection in the h2 scenario (connections = concurrency / streams).
    #[arg(long, default_value_t = 8, value_name = "N",
          value_parser = clap::value_parser!(u32).range(1..=1000))]
    pub h2_streams: u32,
    /// What the upstreams run: herd-worker (the hello app; the demo app for session), hyper
    /// (`herd bench upstream`, a minimal hyper server) or node (Node.js's http server, with its
    /// `Connection: keep-alive` and `Keep-Alive` on every answer, as Express apps send); hyper
    /// and node not with the session scenario.
    #[arg(long, value_enum, default_value = "herd-worker", value_name = "SERVER")]
    pub upstream: UpstreamServer,
    /// Hold every proxy to this much CPU (0.1 – 1; a cgroup CPU quota, as root), so that the
    /// proxy alone bounds req/s and each serves what that budget serves, as on a machine of its
    /// own; the report says how much of its budget each used. Unset: as much as it takes (the
    /// load generator and the upstreams share the machine's CPUs with it).
    #[arg(long, value_name = "CPUS")]
    pub proxy_cpus: Option<f64>,
    /// Send this many requests a second in all, at a steady pace, instead of as many as the
    /// targets answer: the light load most gateways carry most of the day, where CPU per request
    /// counts wake-ups more than work. With it --concurrency is connections (h2: connections ×
    /// streams), each sending its share, and the HTTP/1.1 scenarios run with `h2load --h1`
    /// (wrk has no fixed rate); not with close or the handshake scenarios.
    #[arg(long, value_name = "REQ/S",
          value_parser = clap::value_parser!(u32).range(1..=1_000_000))]
    pub rate: Option<u32>,
    /// Output files.
    #[command(flatten)]
    pub output: BenchOutputArgs,
}

impl BenchProxyArgs {
    /// Checks what clap can't.
    pub fn validate(&self) -> Result<(), CliError> {
        check_duration("--duration", self.duration)?;
        if self.warmup > MAX_BENCH_DURATION {
            return Err(CliError::Usage(format!(
                "--warmup must be at most {}",
                humantime::format_duration(MAX_BENCH_DURATION)
            )));
        }
        if let Some(cpus) = self.proxy_cpus {
            crate::bench::cpu_budget::check_cpus(cpus).map_err(CliError::Usage)?;
        }
        for (flag, empty) in [
            ("--concurrency", self.concurrency.is_empty()),
            ("--scenarios", self.scenarios.is_empty()),
            ("--targets", self.targets.is_empty()),
        ] {
            if empty {
                return Err(CliError::Usage(format!("{flag} needs at least one value")));
            }
        }
        Ok(())
    }
}

/// Flags of `herd bench health`.
#[derive(Debug, Clone, Args)]
pub struct BenchHealthArgs {
    /// Workers to register (each with its own 127.0.x.y address).
    #[arg(long, default_value_t = 1000, value_name = "N",
          value_parser = clap::value_parser!(u32).range(1..=i64::from(crate::bench::health::MAX_WORKERS)))]
    pub workers: u32,
    /// How long to measure the idle gateway (1 s – 10 min).
    #[arg(long, default_value = "30s", value_parser = humantime::parse_duration, value_name = "DURATION")]
    pub duration: Duration,
    /// Output files.
    #[command(flatten)]
    pub output: BenchOutputArgs,
}

impl BenchHealthArgs {
    /// Checks what clap can't.
    pub fn validate(&self) -> Result<(), CliError> {
        check_duration("--duration", self.duration)
    }
}

/// Longest soak.
const MAX_SOAK_DURATION: Duration = Duration::from_secs(6 * 3600);

/// Flags of `herd bench soak`.
#[derive(Debug, Clone, Args)]
pub struct BenchSoakArgs {
    /// Client connections to hold open (keep-alive) through the gateway.
    #[arg(long, default_value_t = 10_000, value_name = "N",
          value_parser = clap::value_parser!(u32).range(1..=i64::from(crate::bench::soak::MAX_CONNECTIONS)))]
    pub connections: u32,
    /// How long to hold them once all are open (5 s – 6 h).
    #[arg(long, default_value = "10m", value_parser = humantime::parse_duration, value_name = "DURATION")]
    pub duration: Duration,
    /// How many of the connections send the active load (GET /work?ms=1).
    #[arg(long, default_value_t = 200, value_name = "N")]
    pub active: u32,
    /// Requests per second over all active connections.
    #[arg(long, default_value_t = 200, value_name = "R",
          value_parser = clap::value_parser!(u32).range(0..=100_000))]
    pub rate: u32,
    /// SIGKILL one worker (in turn) this often and start it again 2 s later; 0s: no kills.
    #[arg(long, default_value = "30s", value_parser = humantime::parse_duration, value_name = "DURATION")]
    pub kill_every: Duration,
    /// Workers behind the gateway (demo app).
    #[arg(long, default_value_t = 3, value_name = "N",
          value_parser = clap::value_parser!(u32).range(2..=16))]
    pub workers: u32,
    /// How often each idle connection sends one GET /work?ms=0 (1 s – 55 s: below the
    /// gateway's 60 s client_idle, so it stays a live keep-alive connection).
    #[arg(long, default_value = "45s", value_parser = humantime::parse_duration, value_name = "DURATION")]
    pub idle_every: Duration,
    /// How often the gateway's RSS and descriptors are read.
    #[arg(long, default_value = "5s", value_parser = humantime::parse_duration, value_name = "DURATION")]
    pub sample_every: Duration,
    /// Output files.
    #[command(flatten)]
    pub output: BenchOutputArgs,
}

impl BenchSoakArgs {
    /// Checks what clap can't (the soak checks the rest, see [`crate::bench::soak::validate`]).
    pub fn validate(&self) -> Result<(), CliError> {
        let between = |flag: &str, value: Duration, low: Duration, high: Duration| {
            if value < low || value > high {
                Err(CliError::Usage(format!(
                    "{flag} must be between {} and {}",
                    humantime::format_duration(low),
                    humantime::format_duration(high)
                )))
            } else {
                Ok(())
            }
        };
        between(
            "--duration",
            self.duration,
            Duration::from_secs(5),
            MAX_SOAK_DURATION,
        )?;
        between(
            "--idle-every",
            self.idle_every,
            Duration::from_secs(1),
            Duration::from_secs(55),
        )?;
        between(
            "--sample-every",
            self.sample_every,
            Duration::from_millis(200),
            Duration::from_secs(60),
        )
    }

    /// The soak's options.
    pub fn options(&self) -> crate::bench::soak::SoakOptions {
        crate::bench::soak::SoakOptions {
            connections: self.connections,
            active: self.active,
            rate: self.rate,
            duration: self.duration,
            kill_every: (!self.kill_every.is_zero()).then_some(self.kill_every),
            workers: self.workers,
            idle_every: self.idle_every,
            sample_every: self.sample_every,
        }
    }
}

fn check_duration(flag: &str, duration: Duration) -> Result<(), CliError> {
    if duration < Duration::from_secs(1) || duration > MAX_BENCH_DURATION {
        return Err(CliError::Usage(format!(
            "{flag} must be between 1s and {}",
            humantime::format_duration(MAX_BENCH_DURATION)
        )));
    }
    Ok(())
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
    /// Run on the machines of this inventory file instead of this machine alone (format:
    /// infra/README.md, examples in infra/examples/).
    #[arg(long, value_name = "FILE")]
    pub inventory: Option<PathBuf>,
    /// State directory: state file, admin token, logs, Redis data.
    #[arg(
        long,
        env = "HERD_STATE_DIR",
        default_value = ".herd",
        value_name = "DIR"
    )]
    pub state_dir: PathBuf,
}

/// Flags of `herd status`.
#[derive(Debug, Clone, Args)]
pub struct StatusArgs {
    /// Print one JSON document instead of tables.
    #[arg(long)]
    pub json: bool,
    /// Refresh every 2 s until Ctrl-C.
    #[arg(long, conflicts_with = "json")]
    pub watch: bool,
    /// Where the cluster's state lives.
    #[command(flatten)]
    pub state: StateDirArgs,
}

/// Most workers `herd scale` runs.
pub const MAX_SCALE: u32 = 64;

/// Flags of `herd scale`.
#[derive(Debug, Clone, Args)]
pub struct ScaleArgs {
    /// `[IMAGE] N`: the image (default: the local cluster's only one, `web`) and the number of
    /// workers wanted.
    #[arg(value_name = "[IMAGE] N", num_args = 1..=2, required = true)]
    pub target: Vec<String>,
    /// Longest wait for new workers to be healthy in the gateway.
    #[arg(long, default_value = "30s", value_parser = humantime::parse_duration, value_name = "DURATION")]
    pub timeout: Duration,
    /// With --inventory: add or remove workers on this machine only (default: spread over the
    /// image's machines).
    #[arg(long, value_name = "MACHINE", requires = "inventory")]
    pub on: Option<String>,
    /// Where the cluster's state lives.
    #[command(flatten)]
    pub state: StateDirArgs,
}

impl ScaleArgs {
    /// The image and the count (at most [`MAX_SCALE`], the local cluster's limit).
    pub fn image_and_count(&self) -> Result<(String, u32), CliError> {
        self.image_and_count_up_to(MAX_SCALE)
    }

    /// The image and the count, at most `max` (an inventory: its machines' `max_workers`
    /// together).
    pub fn image_and_count_up_to(&self, max: u32) -> Result<(String, u32), CliError> {
        let (image, count) = match self.target.as_slice() {
            [count] => ("web".to_string(), count),
            [image, count] => (image.clone(), count),
            _ => return Err(CliError::Usage("usage: herd scale [IMAGE] N".into())),
        };
        let count: u32 = count.parse().map_err(|_| {
            CliError::Usage(format!("N must be a number of workers, got {count:?}"))
        })?;
        if !(1..=max).contains(&count) {
            return Err(CliError::Usage(format!(
                "N must be between 1 and {max}, got {count}"
            )));
        }
        Ok((image, count))
    }
}

/// Flags of `herd rollout`.
#[derive(Debug, Clone, Args)]
pub struct RolloutArgs {
    /// The image to upgrade (default: the local cluster's only one, `web`).
    #[arg(value_name = "IMAGE")]
    pub image: Option<String>,
    /// The new worker executable (default: the current one, e.g. for an environment change).
    #[arg(long, value_name = "PATH")]
    pub binary: Option<PathBuf>,
    /// Environment of the new workers, on top of the current one (repeatable).
    #[arg(long = "env", value_name = "K=V")]
    pub env: Vec<String>,
    /// Workers replaced at a time.
    #[arg(long, default_value_t = 1, value_name = "N",
          value_parser = clap::value_parser!(u32).range(1..=64))]
    pub batch: u32,
    /// Longest wait for a new worker to be healthy in the gateway before the rollout is rolled
    /// back.
    #[arg(long, default_value = "20s", value_parser = humantime::parse_duration, value_name = "DURATION")]
    pub timeout: Duration,
    /// Where the cluster's state lives.
    #[command(flatten)]
    pub state: StateDirArgs,
}

impl RolloutArgs {
    /// The `--env` pairs, checked.
    pub fn env_pairs(&self) -> Result<Vec<(String, String)>, CliError> {
        self.env
            .iter()
            .map(|pair| match pair.split_once('=') {
                Some((key, value)) if !key.is_empty() => Ok((key.to_string(), value.to_string())),
                _ => Err(CliError::Usage(format!(
                    "--env takes KEY=VALUE, got {pair:?}"
                ))),
            })
            .collect()
    }
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
    /// Start a local Redis Cluster (3 masters + 3 replicas on free ports) instead of one
    /// redis-server; workers and gateway get `redis.cluster`.
    #[arg(long, conflicts_with = "redis_port")]
    pub redis_cluster: bool,
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
    fn bench_proxy_defaults_and_lists() {
        let Command::Bench(BenchCommand::Proxy(args)) = parse(&["bench", "proxy"]).unwrap().command
        else {
            panic!("not bench proxy")
        };
        assert_eq!(args.duration, Duration::from_secs(10));
        assert_eq!(args.rounds, 3);
        assert_eq!(args.concurrency, [64, 256]);
        assert_eq!(
            args.scenarios,
            [Scenario::Hello, Scenario::Session, Scenario::H2]
        );
        assert_eq!(args.targets.len(), 4);
        assert_eq!(args.output.json_path(), None);
        args.validate().unwrap();

        let Command::Bench(BenchCommand::Proxy(args)) = parse(&[
            "bench",
            "proxy",
            "--duration",
            "1s",
            "--rounds",
            "1",
            "--concurrency",
            "8",
            "--scenarios",
            "hello",
            "--targets",
            "direct,herd",
            "--out",
            "/tmp/b.md",
        ])
        .unwrap()
        .command
        else {
            panic!("not bench proxy")
        };
        assert_eq!(args.concurrency, [8]);
        assert_eq!(args.scenarios, [Scenario::Hello]);
        assert_eq!(args.targets, [TargetKind::Direct, TargetKind::Herd]);
        assert_eq!(args.output.json_path(), Some(PathBuf::from("/tmp/b.json")));
        args.validate().unwrap();

        assert!(parse(&["bench", "proxy", "--scenarios", "nope"]).is_err());
        assert!(parse(&["bench", "proxy", "--concurrency", "0"]).is_err());
        let Command::Bench(BenchCommand::Proxy(args)) =
            parse(&["bench", "proxy", "--duration", "200ms"])
                .unwrap()
                .command
        else {
            panic!("not bench proxy")
        };
        assert_eq!(args.validate().unwrap_err().exit_code(), 2);
    }

    #[test]
    fn bench_health_flags() {
        let Command::Bench(BenchCommand::Health(args)) =
            parse(&["bench", "health", "--workers", "20", "--duration", "2s"])
                .unwrap()
                .command
        else {
            panic!("not bench health")
        };
        assert_eq!((args.workers, args.duration), (20, Duration::from_secs(2)));
        args.validate().unwrap();
        assert!(parse(&["bench", "health", "--workers", "0"]).is_err());
    }

    #[test]
    fn bench_soak_flags() {
        let Command::Bench(BenchCommand::Soak(args)) = parse(&["bench", "soak"]).unwrap().command
        else {
            panic!("not bench soak")
        };
        args.validate().unwrap();
        let options = args.options();
        assert_eq!(
            (options.connections, options.active, options.rate),
            (10_000, 200, 200)
        );
        assert_eq!(options.duration, Duration::from_secs(600));
        assert_eq!(options.kill_every, Some(Duration::from_secs(30)));
        let Command::Bench(BenchCommand::Soak(args)) = parse(&[
            "bench",
            "soak",
            "--connections",
            "500",
            "--duration",
            "15s",
            "--kill-every",
            "0s",
            "--idle-every",
            "60s",
        ])
        .unwrap()
        .command
        else {
            panic!("not bench soak")
        };
        assert_eq!(args.options().kill_every, None);
        assert_eq!(
            args.validate().unwrap_err().exit_code(),
            2,
            "idle above 55 s"
        );
        assert!(parse(&["bench", "soak", "--connections", "0"]).is_err());
        assert!(parse(&["bench", "soak", "--workers", "1"]).is_err());
    }

    #[test]
    fn status_and_down_take_a_state_dir() {
        let cli = parse(&["status", "--state-dir", "/tmp/s"]).unwrap();
        assert!(
            matches!(cli.command, Command::Status(s) if s.state.state_dir == Path::new("/tmp/s"))
        );
        let cli = parse(&["status", "--inventory", "i.toml", "--json"]).unwrap();
        assert!(matches!(cli.command, Command::Status(s)
            if s.json && s.state.inventory.as_deref() == Some(Path::new("i.toml"))));
        let cli = parse(&["up", "--inventory", "i.toml"]).unwrap();
        assert!(matches!(cli.command, Command::Up(u) if u.state.inventory.is_some()));
        let cli = parse(&["down", "--log-format", "json"]).unwrap();
        assert!(matches!(cli.command, Command::Down(_)));
        assert_eq!(cli.log_format, LogFormat::Json);
        assert!(parse(&["sideways"]).is_err());
        assert!(parse(&["up", "--port", "70000"]).is_err());
    }

    #[test]
    fn scale_takes_an_optional_image_and_a_count() {
        let scale = |args: &[&str]| {
            let mut all = vec!["scale"];
            all.extend(args);
            match parse(&all).map(|cli| cli.command) {
                Ok(Command::Scale(args)) => args.image_and_count().map_err(|e| e.to_string()),
                other => Err(format!("{other:?}")),
            }
        };
        assert_eq!(scale(&["8"]).unwrap(), ("web".to_string(), 8));
        assert_eq!(scale(&["api", "2"]).unwrap(), ("api".to_string(), 2));
        assert!(scale(&["0"]).unwrap_err().contains("between 1 and 64"));
        assert!(scale(&["many"]).unwrap_err().contains("\"many\""));
        assert!(scale(&[]).is_err());
    }

    #[test]
    fn rollout_env_pairs_are_checked() {
        let Command::Rollout(args) = parse(&["rollout", "--env", "A=1", "--env", "B=x=y"])
            .unwrap()
            .command
        else {
            panic!("not rollout")
        };
        assert_eq!(args.image, None);
        assert_eq!(
            args.env_pairs().unwrap(),
            [("A".into(), "1".into()), ("B".into(), "x=y".into())]
        );
        let Command::Rollout(args) = parse(&["rollout", "web", "--env", "=1"]).unwrap().command
        else {
            panic!("not rollout")
        };
        assert_eq!(args.env_pairs().unwrap_err().exit_code(), 2);
        assert!(parse(&["status", "--json", "--watch"]).is_err());
    }
}
