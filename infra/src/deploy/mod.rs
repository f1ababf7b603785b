//! Making an inventory run, and stopping it: `herd up|down --inventory FILE` (here), its status
//! ([`status`]), and changing its workers while it runs ([`scale`]: `herd scale|rollout`).
//!
//! Up: connect to every machine (creating the network namespaces of `netns` machines), put
//! the files in place (supervisor script, executables and configs for `ssh` machines, one
//! environment file and executable link per unit), start Redis and wait until it is ready,
//! start the workers, then the gateways (the preferred one first), and wait until the active
//! gateway's admin API lists every worker of the plan as healthy. A failure on the way stops
//! what was started and removes the namespaces ([`Deployment`]'s drop guard).
//!
//! Down: the gateways (the standby first, so the active doesn't hand over to a gateway about
//! to stop), the workers together (they drain in parallel), Redis, then the namespaces. Down and
//! status work from the inventory alone: unit names, directories and namespace names all follow
//! from it ([`crate::inventory::plan`]).

pub mod admin;
pub mod rejoin;
pub mod scale;
pub mod sentinel;
pub mod status;
pub mod tls;

use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use crate::inventory::{Inventory, Kind, Transport, Unit, plan};
use crate::machine::local::Local;
use crate::machine::netns::Netns;
use crate::machine::ssh::Ssh;
use crate::machine::{Launch, Machine, MachineError, Stopped, quote, supervise, systemd};
use crate::netns::{HostSpec, NetnsError, Topology};

/// How long Redis gets to say it is ready.
const REDIS_READY: Duration = Duration::from_secs(15);
/// How long the active gateway gets to see every worker healthy.
const CLUSTER_READY: Duration = Duration::from_secs(90);
/// Lines of a unit's log shown when it fails.
const TAIL: usize = 15;

/// Why `up`, `down` or `status` failed.
#[derive(Debug, thiserror::Error)]
pub enum DeployError {
    /// Something on a machine.
    #[error(transparent)]
    Machine(#[from] MachineError),
    /// The namespaces of `netns` machines.
    #[error("network namespaces: {0}")]
    Netns(#[from] NetnsError),
    /// A herd executable is missing here.
    #[error(transparent)]
    Binary(#[from] crate::binaries::NotFound),
    /// redis-server is missing here.
    #[error(transparent)]
    Deps(#[from] crate::deps::DepsError),
    /// `netns` machines without root.
    #[error(
        "the inventory has netns machines, which need root (network namespaces); run herd as root"
    )]
    NotRoot,
    /// The cluster (or what is left of one) is still there.
    #[error("{0}; stop it first with `herd down --inventory FILE`")]
    AlreadyUp(String),
    /// A local file could not be written.
    #[error("cannot write {path}: {source}")]
    Io {
        /// The file.
        path: PathBuf,
        /// The OS error.
        source: std::io::Error,
    },
    /// A unit exited or did not become ready.
    #[error("{what}; last lines of its log on {machine}:\n{tail}")]
    Unit {
        /// What went wrong.
        what: String,
        /// The machine.
        machine: String,
        /// The end of its log.
        tail: String,
    },
    /// Redis with Sentinel refused or failed a request (e.g. `SENTINEL FAILOVER`).
    #[error("redis sentinel: {0}")]
    Sentinel(String),
    /// `herd tls push` can't push.
    #[error("{0}")]
    TlsPush(String),
    /// `herd scale` or `herd rollout` could not make the change (what was started for it is
    /// stopped again).
    #[error("{0}")]
    Change(String),
    /// The cluster did not become ready in time.
    #[error("the cluster was not ready after {waited:?}: {last}")]
    NotReady {
        /// How long we waited.
        waited: Duration,
        /// What was missing at the end.
        last: String,
    },
}

/// Where herd keeps its local files for an inventory, and the admin token of a new cluster.
#[derive(Debug, Clone)]
pub struct Options {
    /// `{state_dir}/inventory-{name}`: directories of local and netns machines.
    pub state_root: PathBuf,
    /// The gateways' admin token (only `up` uses it).
    pub token: String,
}

/// What `up` reports.
#[derive(Debug, Clone)]
pub struct UpReport {
    /// Where users reach the cluster.
    pub public_url: String,
    /// The active gateway's machine.
    pub active: String,
    /// Workers the active gateway sees healthy.
    pub workers: usize,
    /// How long `up` took.
    pub took: Duration,
}

/// The network namespace tag of an inventory's netns machines (`herdinv-{name}`): namespaces
/// are `{tag}-{machine}` and `{tag}-br`.
pub fn netns_tag(inventory: &Inventory) -> String {
    format!("herdinv-{}", inventory.name)
}

/// The namespace of netns machine `machine`.
pub fn netns_name(inventory: &Inventory, machine: &str) -> String {
    format!("{}-{machine}", netns_tag(inventory))
}

/// The host name of the client namespace `herd drill --inventory` puts on a netns
/// inventory's bridge to send users' requests from (`{tag}-drill-client`); `down` removes one
/// a drill that was killed left behind.
pub const DRILL_CLIENT: &str = "drill-client";

/// A machine's herd directory.
fn machine_dir(inventory: &Inventory, name: &str, options: &Options) -> String {
    let machine = inventory.machine(name).expect("validated");
    match (&machine.dir, machine.transport) {
        (Some(dir), _) => dir.clone(),
        (None, Transport::Ssh) => format!("/opt/herd/{}", inventory.name),
        (None, _) => options.state_root.join(name).display().to_string(),
    }
}

/// The machines of an inventory, connected.
#[derive(Debug)]
pub struct Machines {
    by_name: BTreeMap<String, Box<dyn Machine>>,
    /// netns machines whose namespace does not exist (down / status after a reboot).
    missing: BTreeSet<String>,
}

impl Machines {
    /// Machine `name`, if it can be reached at all.
    pub fn get(&self, name: &str) -> Option<&dyn Machine> {
        if self.missing.contains(name) {
            return None;
        }
        self.by_name.get(name).map(|m| m.as_ref())
    }
}

/// Connects to every machine. netns namespaces are not created here: a missing one is
/// recorded as missing.
pub fn connect(inventory: &Inventory, options: &Options) -> Machines {
    let mut machines = Machines {
        by_name: BTreeMap::new(),
        missing: BTreeSet::new(),
    };
    for entry in &inventory.machines {
        let dir = machine_dir(inventory, &entry.name, options);
        let machine: Box<dyn Machine> = match entry.transport {
            Transport::Local => Box::new(Local::new(&entry.name, &dir)),
            Transport::Netns => {
                let netns = netns_name(inventory, &entry.name);
                if !crate::netns::exists(&netns) {
                    machines.missing.insert(entry.name.clone());
                }
                Box::new(Netns::new(&entry.name, &netns, &dir))
            }
            Transport::Ssh => {
                let destination = entry
                    .ssh_host
                    .clone()
                    .unwrap_or_else(|| entry.address.to_string());
                let mut ssh = Ssh::new(
                    &entry.name,
                    &destination,
                    inventory.ssh.config_file.as_deref(),
                    &dir,
                );
                // Unreachable now: status reports it; up fails on its first command.
                let _ = ssh.detect_supervisor();
                Box::new(ssh)
            }
        };
        machines.by_name.insert(entry.name.clone(), machine);
    }
    machines
}

/// The launch record of a unit.
pub fn launch(unit: &Unit) -> Launch {
    Launch {
        name: unit.name.clone(),
        kind: unit.kind,
        id: unit.id.clone(),
    }
}

/// Everything `up` has started, stopped again (and the namespaces removed) if dropped before
/// [`Deployment::finish`].
struct Deployment<'a> {
    inventory: &'a Inventory,
    machines: Machines,
    topology: Option<Topology>,
    started: Vec<Unit>,
    done: bool,
}

impl Deployment<'_> {
    fn finish(mut self) {
        self.done = true;
        if let Some(topology) = self.topology.take() {
            topology.keep();
        }
    }
}

impl Drop for Deployment<'_> {
    fn drop(&mut self) {
        if self.done {
            return;
        }
        eprintln!("herd: the cluster did not come up; stopping what had started");
        let started = std::mem::take(&mut self.started);
        stop_units(&self.machines, &started, &mut |line| {
            eprintln!("herd: {line}")
        });
        // Dropping the topology removes the namespaces.
        self.topology.take();
        let _ = self.inventory;
    }
}

/// Brings `inventory` up; `say` gets a line for each step.
pub fn up(
    inventory: &Inventory,
    options: &Options,
    say: &mut dyn FnMut(String),
) -> Result<UpReport, DeployError> {
    let began = Instant::now();
    let units = plan(inventory, &options.token);
    // Everything local is looked up before anything starts.
    let local_binaries = local_binaries(inventory, &units)?;
    let topology = create_namespaces(inventory)?;
    let mut deployment = Deployment {
        inventory,
        machines: connect(inventory, options),
        topology,
        started: Vec::new(),
        done: false,
    };
    let machines = &deployment.machines;
    for unit in &units {
        let machine = machines.get(&unit.machine).expect("namespaces created");
        if machine.alive(&launch(unit))? {
            return Err(DeployError::AlreadyUp(format!(
                "{} already runs on machine {}",
                unit.name, unit.machine
            )));
        }
    }
    let used: BTreeSet<&str> = units.iter().map(|u| u.machine.as_str()).collect();
    for name in &used {
        let machine = machines.get(name).expect("connected");
        say(format!(
            "machine {name}: preparing {} ({:?} supervisor)",
            machine.dir(),
            machine.supervisor()
        ));
        prepare(machine)?;
        scale::forget(machine);
    }
    let mut programs: BTreeMap<(String, String), String> = BTreeMap::new();
    for unit in &units {
        let machine = machines.get(&unit.machine).expect("connected");
        let key = (unit.machine.clone(), unit.binary.clone());
        if !programs.contains_key(&key) {
            let program = install_binary(inventory, machine, unit, &local_binaries)?;
            programs.insert(key.clone(), program);
        }
        match (&inventory.gateways.tls, unit.kind) {
            (Some(tls), Kind::Gateway) => {
                let mut unit = unit.clone();
                unit.args.extend(tls::install(machine, tls, &unit)?);
                write_unit(machine, &unit, &programs[&key], &options.token)?;
            }
            _ => write_unit(machine, unit, &programs[&key], &options.token)?,
        }
    }

    // Redis first: everyone needs it.
    sentinel::write_configs(inventory, &deployment.machines, &units)?;
    let redis = units
        .iter()
        .find(|u| u.kind == Kind::Redis)
        .expect("planned");
    let machine = deployment.machines.get(&redis.machine).expect("connected");
    machine.start(&launch(redis))?;
    deployment.started.push(redis.clone());
    wait_redis(machine, redis)?;
    say(format!(
        "redis is up on {} ({})",
        redis.machine, redis.listen
    ));
    // With Sentinel: the replicas and the sentinels, agreed on the master before anyone uses it.
    sentinel::start(
        inventory,
        &deployment.machines,
        &units,
        &mut deployment.started,
        say,
    )?;

    for unit in units.iter().filter(|u| u.kind == Kind::Worker) {
        let machine = deployment.machines.get(&unit.machine).expect("connected");
        machine.start(&launch(unit))?;
        deployment.started.push(unit.clone());
    }
    let workers: Vec<&Unit> = units.iter().filter(|u| u.kind == Kind::Worker).collect();
    say(format!("{} workers started", workers.len()));
    for (index, unit) in units.iter().filter(|u| u.kind == Kind::Gateway).enumerate() {
        let machine = deployment.machines.get(&unit.machine).expect("connected");
        machine.start(&launch(unit))?;
        deployment.started.push(unit.clone());
        // The preferred gateway (first) gets to be active before its peer starts: otherwise
        // the peer could take the lease first and the pair start the wrong way round.
        let role = (index == 0).then_some("active");
        admin::wait_answers(machine, unit, role, Duration::from_secs(20)).map_err(|last| {
            DeployError::Unit {
                what: format!(
                    "gateway {} did not answer on its admin API ({last})",
                    unit.name
                ),
                machine: unit.machine.clone(),
                tail: machine.log_tail(&unit.name, TAIL),
            }
        })?;
        say(format!("gateway on {} is up", unit.machine));
    }

    let (active, healthy) = wait_healthy(&deployment.machines, &units, inventory)?;
    let public_url = public_url(inventory, &active);
    if let Some(tls) = &inventory.gateways.tls {
        say(format!(
            "both gateways serve HTTPS on port {} with the same certificates: {}",
            tls.port,
            https_url(&public_url, tls.port)
        ));
    }
    deployment.finish();
    Ok(UpReport {
        public_url,
        active,
        workers: healthy,
        took: began.elapsed(),
    })
}

/// Where users reach the cluster: the floating address, or the active gateway's own.
pub fn public_url(inventory: &Inventory, active: &str) -> String {
    let ip = inventory
        .gateways
        .floating_address
        .or(inventory.machine(active).map(|m| m.address))
        .map(|ip| ip.to_string())
        .unwrap_or_default();
    format!("http://{ip}:{}", inventory.gateways.port)
}

/// `public_url` (`http://IP:PORT`) with the https scheme and port `port`.
fn https_url(public_url: &str, port: u16) -> String {
    let authority = public_url.trim_start_matches("http://");
    let host = authority
        .rsplit_once(':')
        .map_or(authority, |(host, _)| host);
    format!("https://{host}:{port}")
}

/// The local path of every executable a local or netns machine runs, and of every herd
/// executable copied to ssh machines. Redis on an ssh machine is the machine's own.
fn local_binaries(
    inventory: &Inventory,
    units: &[Unit],
) -> Result<BTreeMap<String, PathBuf>, DeployError> {
    let mut found = BTreeMap::new();
    for unit in units {
        let transport = inventory
            .machine(&unit.machine)
            .expect("validated")
            .transport;
        if found.contains_key(&unit.binary)
            || (unit.kind == Kind::Redis && transport == Transport::Ssh)
        {
            continue;
        }
        let path = if unit.kind == Kind::Redis {
            crate::deps::ensure(crate::deps::REDIS_SERVER)?
        } else if unit.binary.contains('/') {
            std::path::absolute(&unit.binary).unwrap_or_else(|_| PathBuf::from(&unit.binary))
        } else {
            crate::binaries::locate(&unit.binary)?
        };
        found.insert(unit.binary.clone(), path);
    }
    Ok(found)
}

/// Creates the namespaces of the netns machines (none: `None`). Namespaces left from an earlier
/// cluster are refused.
fn create_namespaces(inventory: &Inventory) -> Result<Option<Topology>, DeployError> {
    let netns: Vec<_> = inventory
        .machines
        .iter()
        .filter(|m| m.transport == Transport::Netns)
        .collect();
    let Some(first) = netns.first() else {
        return Ok(None);
    };
    if !crate::deps::is_root() {
        return Err(DeployError::NotRoot);
    }
    let tag = netns_tag(inventory);
    if let Some(left) = netns
        .iter()
        .map(|m| netns_name(inventory, &m.name))
        .chain([format!("{tag}-br")])
        .find(|name| crate::netns::exists(name))
    {
        return Err(DeployError::AlreadyUp(format!(
            "network namespace {left} exists already"
        )));
    }
    let [a, b, c, _] = first.address.octets();
    let hosts: Vec<HostSpec> = netns
        .iter()
        .map(|m| {
            let host = HostSpec::new(&m.name, m.address.octets()[3]);
            // A standby gateway binds its public port before it holds the floating address.
            if inventory.gateways.machines.contains(&m.name) {
                host.nonlocal_bind()
            } else {
                host
            }
        })
        .collect();
    Ok(Some(Topology::create_named(&tag, [a, b, c], &hosts)?))
}

/// Creates a machine's directories and installs the fallback supervisor and the start script
/// of Sentinel data nodes.
fn prepare(machine: &dyn Machine) -> Result<(), DeployError> {
    let dir = quote(machine.dir());
    machine.run(&format!(
        "mkdir -p {dir} && cd {dir} && mkdir -p bin etc link run log redis && \
         printf '%s' {} > herd-supervise.sh && \
         printf '%s' {} > {file} && chmod 755 {file}",
        quote(supervise::SCRIPT),
        quote(rejoin::SCRIPT),
        file = rejoin::SCRIPT_FILE
    ))?;
    Ok(())
}

/// Puts `unit`'s executable on the machine (ssh: copied into `bin/`; redis-server: the
/// machine's own); returns its path there.
fn install_binary(
    inventory: &Inventory,
    machine: &dyn Machine,
    unit: &Unit,
    local: &BTreeMap<String, PathBuf>,
) -> Result<String, DeployError> {
    let transport = inventory
        .machine(&unit.machine)
        .expect("validated")
        .transport;
    if transport != Transport::Ssh {
        return Ok(local[&unit.binary].display().to_string());
    }
    if unit.kind == Kind::Redis {
        let path = machine
            .run("command -v redis-server || { echo 'redis-server is not installed (apt-get install redis-server)' >&2; exit 1; }")?;
        return Ok(path.trim().to_string());
    }
    let source = &local[&unit.binary];
    let file_name = source
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_else(|| unit.binary.clone());
    let target = format!("{}/bin/{file_name}", machine.dir());
    // Copied under a temporary name and renamed: a running old binary is never overwritten
    // in place ("text file busy"), and a half-copied file is never run.
    machine.copy(source, &format!("{target}.new"))?;
    machine.run(&format!(
        "chmod 755 {t}.new && mv -f {t}.new {t}",
        t = quote(&target)
    ))?;
    Ok(target)
}

/// The unit's environment file (mode 0600: it holds the admin token), its executable link and,
/// for a gateway, the admin header `herd status` uses.
fn write_unit(
    machine: &dyn Machine,
    unit: &Unit,
    program: &str,
    token: &str,
) -> Result<(), DeployError> {
    let dir = machine.dir();
    let mut args = unit.args.clone();
    if unit.kind == Kind::Redis {
        args.extend(["--dir".to_string(), format!("{dir}/redis")]);
    }
    let mut script = String::from("set -e\n");
    if let Some(config) = &unit.config {
        let remote = format!("{dir}/etc/{}.toml", unit.name);
        machine.copy(config, &remote)?;
        args.extend(["--config".to_string(), remote]);
    }
    let herd_args = args.join(" ");
    let mut env: String = unit
        .env
        .iter()
        .map(|(k, v)| format!("{k}='{v}'\n"))
        .collect();
    // A Sentinel data node starts through its start script, which then runs the program.
    let program = if rejoin::wraps(unit) {
        env.push_str(&format!("HERD_REDIS_SERVER='{program}'\n"));
        format!("{dir}/{}", rejoin::SCRIPT_FILE)
    } else {
        program.to_string()
    };
    env.push_str(&format!("HERD_ARGS='{}'\n", herd_args.replace('\'', "")));
    let env_path = format!("{dir}/etc/{}.env", unit.name);
    script.push_str(&format!(
        "umask 077\nprintf '%s' {} > {}\n",
        quote(&env),
        quote(&env_path)
    ));
    script.push_str(&format!(
        "ln -sfn {} {}\n",
        quote(&program),
        quote(&format!("{dir}/link/{}", unit.name))
    ));
    if unit.kind == Kind::Gateway {
        script.push_str(&format!(
            "printf 'authorization: Bearer %s\\n' {} > {}\n",
            quote(token),
            quote(&format!("{dir}/etc/admin-header"))
        ));
    }
    machine.run(&script)?;
    Ok(())
}

/// Waits until Redis' log says it accepts connections.
fn wait_redis(machine: &dyn Machine, redis: &Unit) -> Result<(), DeployError> {
    let log = quote(&format!("{}/log/{}.out", machine.dir(), redis.name));
    let deadline = Instant::now() + REDIS_READY;
    loop {
        if machine
            .run(&format!("grep -q 'Ready to accept connections' {log}"))
            .is_ok()
        {
            return Ok(());
        }
        if Instant::now() > deadline || !machine.alive(&launch(redis)).unwrap_or(false) {
            return Err(DeployError::Unit {
                what: format!("redis did not become ready within {REDIS_READY:?}"),
                machine: redis.machine.clone(),
                tail: machine
                    .run(&format!(
                        "tail -n {TAIL} {log} 2>/dev/null; tail -n {TAIL} {} 2>/dev/null || true",
                        quote(&format!("{}/log/{}.log", machine.dir(), redis.name))
                    ))
                    .unwrap_or_default(),
            });
        }
        std::thread::sleep(Duration::from_millis(100));
    }
}

/// Waits until one gateway is active and sees every planned worker healthy; returns its
/// machine and the number of healthy workers.
fn wait_healthy(
    machines: &Machines,
    units: &[Unit],
    inventory: &Inventory,
) -> Result<(String, usize), DeployError> {
    let expected: BTreeSet<&str> = units
        .iter()
        .filter(|u| u.kind == Kind::Worker)
        .map(|u| u.id.as_str())
        .collect();
    let deadline = Instant::now() + CLUSTER_READY;
    let mut last;
    loop {
        // A unit that died is an error at once, with its log.
        for unit in units {
            let machine = machines.get(&unit.machine).expect("connected");
            if !machine.alive(&launch(unit)).unwrap_or(true) {
                return Err(DeployError::Unit {
                    what: format!("{} exited while the cluster was starting", unit.name),
                    machine: unit.machine.clone(),
                    tail: machine.log_tail(&unit.name, TAIL),
                });
            }
        }
        match admin::active(machines, units) {
            Some((active, gateway)) => {
                let machine = machines.get(&gateway.machine).expect("connected");
                match admin::workers(machine, gateway) {
                    Ok(seen) => {
                        let healthy: BTreeSet<&str> = seen
                            .iter()
                            .filter(|w| w.state == "healthy" || w.state == "slow_start")
                            .map(|w| w.id.as_str())
                            .collect();
                        let missing: Vec<&str> = expected.difference(&healthy).copied().collect();
                        if missing.is_empty() {
                            return Ok((active, healthy.len()));
                        }
                        last = format!(
                            "the active gateway ({active}) does not see these workers healthy: {}",
                            missing.join(", ")
                        );
                    }
                    Err(error) => last = error,
                }
            }
            None => {
                last = format!(
                    "neither gateway ({}) says it is active",
                    inventory.gateways.machines.join(", ")
                )
            }
        }
        if Instant::now() > deadline {
            return Err(DeployError::NotReady {
                waited: CLUSTER_READY,
                last,
            });
        }
        std::thread::sleep(Duration::from_millis(250));
    }
}

/// Stops `units` in the reverse of start order by kind — gateways (the last started first),
/// workers together, Redis — and says how each went.
fn stop_units(machines: &Machines, units: &[Unit], say: &mut dyn FnMut(String)) {
    let gateways: Vec<&Unit> = units
        .iter()
        .filter(|u| u.kind == Kind::Gateway)
        .rev()
        .collect();
    let workers: Vec<&Unit> = units.iter().filter(|u| u.kind == Kind::Worker).collect();
    let redis: Vec<&Unit> = units.iter().filter(|u| u.kind == Kind::Redis).collect();
    let grace = |kind| {
        Duration::from_secs(u64::from(match kind {
            Kind::Worker => systemd::WORKER_STOP_SECS,
            Kind::Gateway => systemd::GATEWAY_STOP_SECS,
            Kind::Redis => systemd::REDIS_STOP_SECS,
        }))
    };
    for group in [gateways, workers, redis] {
        // One thread per unit: workers drain in parallel rather than one after the other.
        let outcomes: Vec<(String, String)> = std::thread::scope(|scope| {
            let handles: Vec<_> = group
                .iter()
                .map(|unit| {
                    scope.spawn(move || {
                        let outcome = match machines.get(&unit.machine) {
                            None => Ok(Stopped::Absent),
                            Some(machine) => machine.stop(&launch(unit), grace(unit.kind)),
                        };
                        (unit.name.clone(), unit.machine.clone(), outcome)
                    })
                })
                .collect();
            handles
                .into_iter()
                .filter_map(|h| h.join().ok())
                .map(|(name, machine, outcome)| {
                    let line = match outcome {
                        Ok(Stopped::Absent) => format!("{name} on {machine} was not running"),
                        Ok(Stopped::Exited) => format!("stopped {name} on {machine}"),
                        Ok(Stopped::Killed) => format!(
                            "killed {name} on {machine}: it did not exit within its grace period"
                        ),
                        Err(error) => format!("could not stop {name}: {error}"),
                    };
                    (name, line)
                })
                .collect()
        });
        for (_, line) in outcomes {
            say(line);
        }
    }
}

/// What `down` did.
#[derive(Debug, Clone, Default)]
pub struct DownReport {
    /// Namespaces removed.
    pub namespaces: Vec<String>,
}

/// Stops everything of `inventory` in order and removes its namespaces.
pub fn down(
    inventory: &Inventory,
    options: &Options,
    say: &mut dyn FnMut(String),
) -> Result<DownReport, DeployError> {
    let machines = connect(inventory, options);
    // Workers `herd scale` / `herd rollout` added are in the machines' records.
    let units = scale::units(inventory, "", &machines);
    for entry in &inventory.machines {
        if machines.get(&entry.name).is_some_and(|m| !m.reachable()) {
            say(format!(
                "machine {} is unreachable; its processes can't be stopped from here",
                entry.name
            ));
        }
    }
    stop_units(&machines, &units, say);
    for entry in &inventory.machines {
        if let Some(machine) = machines.get(&entry.name) {
            scale::forget(machine);
        }
    }
    let tag = netns_tag(inventory);
    let mut hosts: Vec<&str> = inventory
        .machines
        .iter()
        .filter(|m| m.transport == Transport::Netns)
        .map(|m| m.name.as_str())
        .collect();
    let namespaces = if hosts.is_empty() {
        Vec::new()
    } else {
        hosts.push(DRILL_CLIENT);
        Topology::remove_named(&tag, &hosts)?
    };
    if !namespaces.is_empty() {
        say(format!(
            "removed network namespaces {}",
            namespaces.join(", ")
        ));
    }
    Ok(DownReport { namespaces })
}

/// Writes `text` to a local file (for the CLI's token copy).
pub fn write_private(path: &Path, text: &str) -> Result<(), DeployError> {
    use std::os::unix::fs::OpenOptionsExt;
    let io = |source| DeployError::Io {
        path: path.to_path_buf(),
        source,
    };
    if let Some(parent) = path.parent() {
        std::fs::create_dir_all(parent).map_err(io)?;
    }
    let mut file = std::fs::OpenOptions::new()
        .write(true)
        .create(true)
        .truncate(true)
        .mode(0o600)
        .open(path)
        .map_err(io)?;
    std::io::Write::write_all(&mut file, text.as_bytes()).map_err(io)
}

/// Starts one more worker on a running cluster (one `herd drill scale-up` adds): its
/// executable, environment file and link put in place as `up` does, then started under the
/// machine's supervisor. Workers only: a gateway's TLS files and admin header are `up`'s.
/// `herd down` stops only what the plan names, so whoever adds a worker stops it again.
pub fn start_unit(
    inventory: &Inventory,
    machines: &Machines,
    unit: &Unit,
) -> Result<(), DeployError> {
    let local = local_binaries(inventory, std::slice::from_ref(unit))?;
    let machine = machines
        .get(&unit.machine)
        .ok_or_else(|| MachineError::Failed {
            machine: unit.machine.clone(),
            what: format!("start {}", unit.name),
            status: "no such machine".into(),
            stderr: "its network namespace does not exist".into(),
        })?;
    let program = install_binary(inventory, machine, unit, &local)?;
    // Workers get no admin token (only a gateway's admin header holds one).
    write_unit(machine, unit, &program, "")?;
    machine.start(&launch(unit))?;
    Ok(())
}
