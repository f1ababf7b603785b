//! The inventory: one TOML file that says which machines a herd cluster runs on, how `herd`
//! reaches each of them (its transport), and what runs where — the worker images, the gateway
//! pair and Redis. `herd up|down|status --inventory FILE` read it; the format is documented in
//! `infra/README.md`, with examples in `infra/examples/`.
//!
//! This module is data only: the file's types ([`Inventory`]), reading them ([`load`], every
//! unknown key refused), the checks that need no machine ([`validate`]), and where each process
//! goes ([`plan`]). Nothing here starts a process or opens a connection, so a bad file is
//! refused before anything starts.

mod plan;
pub mod sentinel;
mod tls;
mod validate;

pub use plan::{Kind, Unit, placement, plan};
pub use sentinel::RedisSentinel;
pub use tls::{GatewayTls, TlsFile, TlsSni, tls_listener};
pub use validate::{listeners, validate};

use std::collections::BTreeMap;
use std::net::Ipv4Addr;
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

/// Most workers on one machine unless its `max_workers` says otherwise (as `herd up`).
pub const DEFAULT_MAX_WORKERS: u16 = 64;

/// A whole inventory file.
#[derive(Debug, Clone, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct Inventory {
    /// The cluster's name: part of network namespace names, unit names and remote directories,
    /// so two clusters on one box or one machine stay apart (`a-z`, `0-9`, `-`, at most 12).
    pub name: String,
    /// How `ssh` machines are reached.
    #[serde(default)]
    pub ssh: SshSettings,
    /// The machines.
    #[serde(default)]
    pub machines: Vec<Machine>,
    /// The Redis server (sessions, registry, the gateway pair's lease).
    pub redis: Redis,
    /// The gateway pair.
    pub gateways: Gateways,
    /// The worker images.
    #[serde(default)]
    pub images: Vec<Image>,
}

/// How `herd` reaches a machine.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Transport {
    /// Processes on this box, bound to the machine's loopback address (127.x.y.z).
    Local,
    /// A network namespace on this box, on a bridge herd creates (and removes on `down`).
    Netns,
    /// A real host reached with the user's `ssh` and `scp`.
    Ssh,
}

/// `[[machines]]`: one machine.
#[derive(Debug, Clone, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct Machine {
    /// Its name in the inventory, in worker ids and in `x-herd-machine`.
    pub name: String,
    /// The address the cluster's processes bind and reach it on.
    pub address: Ipv4Addr,
    /// How herd reaches it.
    pub transport: Transport,
    /// `ssh` only: the ssh destination (`user@host`, or a `Host` of the ssh config); default:
    /// the address.
    #[serde(default)]
    pub ssh_host: Option<String>,
    /// Where binaries, configs, pid files and logs go on the machine. Default: for `ssh`,
    /// `/opt/herd/{name}`; otherwise a directory under herd's state directory.
    #[serde(default)]
    pub dir: Option<String>,
    /// Most workers placed on it.
    #[serde(default = "default_max_workers")]
    pub max_workers: u16,
}

fn default_max_workers() -> u16 {
    DEFAULT_MAX_WORKERS
}

/// `[ssh]`: settings for every `ssh` machine.
#[derive(Debug, Clone, Default, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct SshSettings {
    /// An ssh config file to use instead of `~/.ssh/config` (`ssh -F`); relative to the
    /// inventory file.
    #[serde(default)]
    pub config_file: Option<PathBuf>,
}

/// `[redis]`: one Redis server, or a master with replicas watched by Sentinel.
#[derive(Debug, Clone, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct Redis {
    /// The machine it runs on (with Sentinel: the master when the cluster comes up).
    pub machine: String,
    /// Its port (every replica's too).
    #[serde(default = "default_redis_port")]
    pub port: u16,
    /// Machines with a replica of the master (Sentinel only).
    #[serde(default)]
    pub replicas: Vec<String>,
    /// `sentinel = { machines = [...], ... }`: sentinels that promote a replica when the master
    /// fails, and that workers and gateways ask where the master is ([`sentinel`]).
    #[serde(default)]
    pub sentinel: Option<RedisSentinel>,
}

fn default_redis_port() -> u16 {
    6379
}

/// `[gateways]`: the active / standby pair.
#[derive(Debug, Clone, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct Gateways {
    /// The two machines.
    pub machines: Vec<String>,
    /// The one that is active when both run (default: the first).
    #[serde(default)]
    pub preferred: Option<String>,
    /// Whether the preferred one takes the role back when it returns.
    #[serde(default)]
    pub preempt: bool,
    /// The floating address users reach the pair on (the active holds it).
    #[serde(default)]
    pub floating_address: Option<Ipv4Addr>,
    /// The interface the floating address goes on.
    #[serde(default = "default_interface")]
    pub interface: String,
    /// Prefix length of the floating address.
    #[serde(default = "default_prefix_len")]
    pub prefix_len: u8,
    /// Hook run on becoming active, for addresses that move another way (cloud API, DNS).
    #[serde(default)]
    pub on_active: Option<String>,
    /// Hook run on stepping down.
    #[serde(default)]
    pub on_standby: Option<String>,
    /// Public port.
    #[serde(default = "default_port")]
    pub port: u16,
    /// Admin API port.
    #[serde(default = "default_admin_port")]
    pub admin_port: u16,
    /// Peer link port (heartbeats between the two).
    #[serde(default = "default_peer_port")]
    pub peer_port: u16,
    /// The gateway executable (a name found like `herd`'s own binaries, or a path).
    #[serde(default = "default_gateway_binary")]
    pub binary: String,
    /// Extra `HERD_GATEWAY_*` environment for both gateways.
    #[serde(default)]
    pub env: BTreeMap<String, String>,
    /// `[gateways.tls]`: HTTPS on both gateways with the same certificates (none: cleartext
    /// only).
    #[serde(default)]
    pub tls: Option<GatewayTls>,
}

fn default_interface() -> String {
    "eth0".into()
}
fn default_prefix_len() -> u8 {
    24
}
fn default_port() -> u16 {
    8080
}
fn default_admin_port() -> u16 {
    9090
}
fn default_peer_port() -> u16 {
    7946
}
fn default_gateway_binary() -> String {
    crate::binaries::GATEWAY.into()
}

/// `[[images]]`: a worker app and how many run where.
#[derive(Debug, Clone, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct Image {
    /// Its name (part of worker ids: `{image}-{machine}-{n}`).
    pub name: String,
    /// The executable (a name found like `herd`'s own binaries, or a path).
    #[serde(default = "default_worker_binary")]
    pub binary: String,
    /// Extra arguments.
    #[serde(default)]
    pub args: Vec<String>,
    /// Extra environment (e.g. `HERD_WORKER_APP = "hello"`).
    #[serde(default)]
    pub env: BTreeMap<String, String>,
    /// A config file copied to the machine and passed as `--config` (relative to the inventory).
    #[serde(default)]
    pub config: Option<PathBuf>,
    /// Port of the first worker of this image on each machine; the next ones count up.
    #[serde(default = "default_worker_port")]
    pub port: u16,
    /// Workers on each of `machines` (this or `total`).
    #[serde(default)]
    pub per_machine: Option<u16>,
    /// Workers in all, spread round-robin over `machines` (this or `per_machine`).
    #[serde(default)]
    pub total: Option<u16>,
    /// Where they may run.
    pub machines: Vec<String>,
}

fn default_worker_binary() -> String {
    crate::binaries::WORKER.into()
}
fn default_worker_port() -> u16 {
    8081
}

impl Inventory {
    /// The machine named `name`.
    pub fn machine(&self, name: &str) -> Option<&Machine> {
        self.machines.iter().find(|m| m.name == name)
    }

    /// The preferred gateway machine.
    pub fn preferred_gateway(&self) -> &str {
        self.gateways
            .preferred
            .as_deref()
            .or(self.gateways.machines.first().map(String::as_str))
            .unwrap_or_default()
    }

    /// Whether any machine is a network namespace (then herd needs root).
    pub fn uses_netns(&self) -> bool {
        self.machines
            .iter()
            .any(|m| m.transport == Transport::Netns)
    }
}

/// Why an inventory was refused. Every message is one line naming the file, the entry and the
/// problem.
#[derive(Debug, thiserror::Error)]
pub enum InventoryError {
    /// The file could not be read.
    #[error("cannot read inventory {path}: {source}")]
    Read {
        /// The file.
        path: PathBuf,
        /// The OS error.
        source: std::io::Error,
    },
    /// Not TOML, an unknown key, a wrong type.
    #[error("{path}:{line}: {entry}: {problem}")]
    Parse {
        /// The file.
        path: PathBuf,
        /// 1-based line of the problem.
        line: usize,
        /// The table header the line belongs to (`[[machines]]`, or `top level`).
        entry: String,
        /// What is wrong.
        problem: String,
    },
    /// Well-formed, but it can't work (unknown machine, port clash, placement that doesn't fit).
    #[error("{path}: {entry}: {problem}")]
    Invalid {
        /// The file.
        path: PathBuf,
        /// The entry, e.g. `images.demo` or `machines.m1`.
        entry: String,
        /// What is wrong.
        problem: String,
    },
}

/// Reads, parses and validates the inventory at `path`. Relative paths in it (`config`,
/// `ssh.config_file`, the `[gateways.tls]` files) are made absolute against the file's directory.
pub fn load(path: &Path) -> Result<Inventory, InventoryError> {
    let text = std::fs::read_to_string(path).map_err(|source| InventoryError::Read {
        path: path.to_path_buf(),
        source,
    })?;
    let mut inventory = parse(path, &text)?;
    let base = path.parent().unwrap_or(Path::new("."));
    let absolute = |file: &mut PathBuf| {
        if file.is_relative() {
            *file = base.join(&*file);
        }
    };
    if let Some(file) = inventory.ssh.config_file.as_mut() {
        absolute(file);
    }
    for image in &mut inventory.images {
        if let Some(file) = image.config.as_mut() {
            absolute(file);
        }
    }
    if let Some(tls) = inventory.gateways.tls.as_mut() {
        tls.absolute(base);
    }
    validate(&inventory).map_err(|(entry, problem)| InventoryError::Invalid {
        path: path.to_path_buf(),
        entry,
        problem,
    })?;
    Ok(inventory)
}

/// Parses inventory text (no validation); `path` only names the file in errors.
pub fn parse(path: &Path, text: &str) -> Result<Inventory, InventoryError> {
    toml::from_str(text).map_err(|error| {
        let offset = error.span().map_or(0, |span| span.start);
        let line = text[..offset.min(text.len())].matches('\n').count() + 1;
        // The header of the table the bad line is in names the entry; toml's own message is
        // several lines with a snippet, of which the first line of the message is the point.
        let entry = text[..offset.min(text.len())]
            .lines()
            .rev()
            .map(str::trim)
            .find(|l| l.starts_with('['))
            .unwrap_or("top level")
            .to_string();
        InventoryError::Parse {
            path: path.to_path_buf(),
            line,
            entry,
            problem: error.message().lines().next().unwrap_or("").to_string(),
        }
    })
}
