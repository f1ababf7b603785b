//! A local Redis Cluster (for `herd up --redis-cluster` and the tests): `masters` masters with
//! `replicas` replicas each, every node a [`RedisServer`] with `--cluster-enabled yes` on a free
//! loopback port (whose cluster-bus port, port + 10000, is free too), joined by
//! `redis-cli --cluster create … --cluster-yes`.
//!
//! Each node has its own data directory (nodes.conf and the append-only files would clash).

use std::net::{Ipv4Addr, TcpListener};
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

use crate::deps::{self, DepsError, REDIS_CLI};
use crate::ports;
use crate::redis_server::{RedisServer, RedisServerError};

/// Why the cluster could not be started or changed.
#[derive(Debug, thiserror::Error)]
pub enum RedisClusterError {
    /// A node did not start.
    #[error(transparent)]
    Server(#[from] RedisServerError),
    /// redis-cli is missing.
    #[error(transparent)]
    Missing(#[from] DepsError),
    /// No port pair (node + cluster bus) found.
    #[error("cannot find a free port pair for a cluster node")]
    Port,
    /// A `redis-cli` call failed.
    #[error("redis-cli {args}: {problem}")]
    Cli {
        /// Its arguments.
        args: String,
        /// Its output or the spawn error.
        problem: String,
    },
    /// The cluster did not reach `cluster_state:ok` in time.
    #[error("the cluster did not become ready within {0:?}")]
    NotReady(Duration),
    /// A directory could not be made.
    #[error("cannot create {path}: {source}")]
    Dir {
        /// The directory.
        path: PathBuf,
        /// Why.
        source: std::io::Error,
    },
}

/// A running local cluster; every node is killed when it is dropped.
#[derive(Debug)]
pub struct RedisCluster {
    nodes: Vec<RedisServer>,
    cli: PathBuf,
}

/// How long `start` waits for the whole cluster to report `cluster_state:ok`.
const READY_TIMEOUT: Duration = Duration::from_secs(20);
/// A node's cluster-bus port is its port plus this.
const BUS_OFFSET: u16 = 10_000;

impl RedisCluster {
    /// Starts `masters` × (1 + `replicas`) nodes under `dir` (one sub-directory each) and makes
    /// them a cluster; `node_timeout` is `cluster-node-timeout` (how long a master may be
    /// unreachable before its replica is promoted).
    pub fn start(
        masters: usize,
        replicas: usize,
        dir: &Path,
        node_timeout: Duration,
    ) -> Result<Self, RedisClusterError> {
        let cli = deps::ensure(REDIS_CLI)?;
        let mut nodes = Vec::new();
        for _ in 0..masters * (1 + replicas) {
            nodes.push(start_node(dir, node_timeout)?);
        }
        let cluster = RedisCluster { nodes, cli };
        let mut args: Vec<String> = vec!["--cluster".into(), "create".into()];
        args.extend(cluster.nodes.iter().map(|node| node.addr().to_string()));
        args.extend(
            ["--cluster-replicas", &replicas.to_string(), "--cluster-yes"].map(String::from),
        );
        cluster.cli(&args)?;
        cluster.wait_ready(READY_TIMEOUT)?;
        Ok(cluster)
    }

    /// Seed URLs for `redis.cluster` (every node).
    pub fn seeds(&self) -> Vec<String> {
        self.nodes
            .iter()
            .map(|node| format!("redis://{}", node.addr()))
            .collect()
    }

    /// The nodes, in start order (masters first, as `--cluster create` assigns them).
    pub fn nodes(&self) -> &[RedisServer] {
        &self.nodes
    }

    /// Kills the node on `port` with SIGKILL, as a crash would.
    pub fn kill(&mut self, port: u16) {
        if let Some(node) = self.nodes.iter_mut().find(|node| node.port() == port) {
            node.kill();
        }
    }

    /// Runs `redis-cli` with `args`; its standard output.
    pub fn cli(&self, args: &[String]) -> Result<String, RedisClusterError> {
        let failed = |problem: String| RedisClusterError::Cli {
            args: args.join(" "),
            problem,
        };
        let output = Command::new(&self.cli)
            .args(args)
            .output()
            .map_err(|error| failed(error.to_string()))?;
        let stdout = String::from_utf8_lossy(&output.stdout).into_owned();
        if !output.status.success() || stdout.contains("[ERR]") {
            return Err(failed(format!(
                "{}{}",
                stdout,
                String::from_utf8_lossy(&output.stderr)
            )));
        }
        Ok(stdout)
    }

    /// `redis-cli -p PORT args…` against one node.
    pub fn node_cli(&self, port: u16, args: &[&str]) -> Result<String, RedisClusterError> {
        let mut all = vec!["-p".to_string(), port.to_string()];
        all.extend(args.iter().map(|arg| (*arg).to_string()));
        self.cli(&all)
    }

    /// Waits until every running node reports `cluster_state:ok` and agrees on the masters.
    pub fn wait_ready(&self, timeout: Duration) -> Result<(), RedisClusterError> {
        let started = Instant::now();
        // Bounded by `timeout`.
        while started.elapsed() < timeout {
            let ok = self
                .nodes
                .iter()
                .filter(|node| node.is_running())
                .all(|node| {
                    self.node_cli(node.port(), &["cluster", "info"])
                        .is_ok_and(|info| info.contains("cluster_state:ok"))
                });
            if ok && self.masters().is_ok_and(|masters| !masters.is_empty()) {
                return Ok(());
            }
            std::thread::sleep(Duration::from_millis(100));
        }
        Err(RedisClusterError::NotReady(timeout))
    }

    /// `(port, node id, slot ranges)` of every master that is up and holds slots, as a running
    /// node sees the cluster (`CLUSTER NODES`).
    pub fn masters(&self) -> Result<Vec<(u16, String, Vec<String>)>, RedisClusterError> {
        let node = self
            .nodes
            .iter()
            .find(|node| node.is_running())
            .ok_or(RedisClusterError::Port)?;
        let table = self.node_cli(node.port(), &["cluster", "nodes"])?;
        let mut masters = Vec::new();
        for line in table.lines() {
            let fields: Vec<&str> = line.split_whitespace().collect();
            let [id, addr, flags, ..] = fields[..] else {
                continue;
            };
            if !flags.contains("master") || flags.contains("fail") || fields.len() < 9 {
                continue;
            }
            let Some(port) = addr
                .split('@')
                .next()
                .and_then(|host| host.rsplit_once(':'))
                .and_then(|(_, port)| port.parse().ok())
            else {
                continue;
            };
            let slots = fields[8..]
                .iter()
                .filter(|range| !range.starts_with('['))
                .map(|range| (*range).to_string())
                .collect();
            masters.push((port, id.to_string(), slots));
        }
        masters.sort();
        Ok(masters)
    }

    /// Leaves every node running after this handle is gone (`herd up --detach`); their pids.
    pub fn detach(self) -> Vec<u32> {
        self.nodes
            .into_iter()
            .filter_map(RedisServer::detach)
            .collect()
    }
}

/// Starts one cluster node under `dir` on a free port pair. A port found free can be taken
/// before redis-server binds it (by another test's server, or as an ephemeral port): then the
/// node is started again on another pair, up to five tries in all.
fn start_node(dir: &Path, node_timeout: Duration) -> Result<RedisServer, RedisClusterError> {
    let mut attempt = 0;
    loop {
        attempt += 1;
        let port = cluster_port()?;
        let node_dir = dir.join(format!("node-{port}"));
        std::fs::create_dir_all(&node_dir).map_err(|source| RedisClusterError::Dir {
            path: node_dir.clone(),
            source,
        })?;
        let extra = [
            "--cluster-enabled",
            "yes",
            "--cluster-config-file",
            "nodes.conf",
            "--cluster-node-timeout",
            &node_timeout.as_millis().to_string(),
            // A replica of a dead master is promoted however stale it is: the tests want the
            // failover, and the loss window is stated (docs/sessions.md).
            "--cluster-replica-validity-factor",
            "0",
            // Without this, every shard refuses commands (CLUSTERDOWN) from the moment a
            // master is marked failed until its replica is promoted: other shards' sessions
            // must not notice one shard's failure.
            "--cluster-require-full-coverage",
            "no",
        ]
        .map(String::from);
        match RedisServer::start_with(Some(port), &node_dir, dir, &extra) {
            Ok(node) => return Ok(node),
            Err(error) if attempt < 5 => {
                eprintln!(
                    "redis cluster node on port {port} did not start (try {attempt} of 5, trying another port): {error}"
                );
                let _ = std::fs::remove_dir_all(&node_dir);
            }
            Err(error) => return Err(error.into()),
        }
    }
}

/// A free port whose cluster-bus port (port + 10000) is free as well, both below the ephemeral
/// range (see [`crate::ports`]).
fn cluster_port() -> Result<u16, RedisClusterError> {
    let below_bus = ports::ephemeral_start().saturating_sub(BUS_OFFSET);
    for _ in 0..50 {
        let port = ports::free_port_in(10_000..below_bus).map_err(|_| RedisClusterError::Port)?;
        if port > u16::MAX - BUS_OFFSET {
            continue;
        }
        if TcpListener::bind((Ipv4Addr::LOCALHOST, port + BUS_OFFSET)).is_ok() {
            return Ok(port);
        }
    }
    Err(RedisClusterError::Port)
}
