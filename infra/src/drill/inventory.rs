//! [`ClusterHandle`] for a cluster `herd up --inventory FILE` runs: its processes are known from
//! the inventory alone ([`crate::inventory::plan`], like `herd down` and `herd status`), and
//! everything is done on the unit's own machine through its transport (local, netns, ssh) and
//! its supervisor (herd's fallback loop, or systemd).
//!
//! - Signals go to the unit's process (its pid from the supervisor: `run/{unit}.child`, or
//!   systemd's `MainPID`), except a graceful gateway stop, which goes to the supervisor, as an
//!   operator's `systemctl stop` would, so that the gateway stays down until the drill starts
//!   it again. A killed process is brought back by its supervisor (as it would be without a
//!   drill); the drill only waits for that, and starts the unit itself when no supervisor runs
//!   it any more (a drained worker, a stopped gateway).
//! - Machine faults are real link faults on `netns` machines (`ip link set eth0 down` in the
//!   machine's namespace). On `ssh` and `local` machines they are not applicable: cutting an
//!   ssh machine's link would cut herd off from it too, with nothing left to undo it.
//! - Users' requests go to the public (floating) address. On a netns inventory that address
//!   lives on a bridge inside namespaces, so the drill plugs a client namespace of its own into
//!   the bridge ([`ClientNetns`], `{tag}-drill-client`) and removes it when done.
//! - Scaling adds a worker of the first image as `up` would start it (the next id on the
//!   image's machine with the fewest workers), and removes it again — `herd down` only knows
//!   the workers of the plan.

use std::collections::HashMap;
use std::net::{Ipv4Addr, SocketAddr};
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use nix::sys::signal::Signal;

use super::target::{ClusterHandle, GatewayInfo, Stopped, TargetError, WorkerInfo};
use crate::deploy::{self, DRILL_CLIENT, Machines, Options, admin, launch, netns_tag};
use crate::inventory::{Inventory, Kind, Transport, Unit, plan};
use crate::machine::{self, Machine, Supervisor, quote, systemd};

/// The gateways' default whole-request timeout (`timeouts.request`).
const DEFAULT_REQUEST_TIMEOUT: Duration = Duration::from_secs(15);
/// How long a unit gets to run (and listen) again after a fault: the fallback supervisor waits
/// 1–2 s before a restart, systemd 2 s.
const RESTART_TIMEOUT: Duration = Duration::from_secs(20);
/// How long Redis gets to write its data and exit after SIGTERM.
const REDIS_GRACE: Duration = Duration::from_secs(10);
/// The interface of a netns machine (see [`crate::netns`]).
const NETNS_INTERFACE: &str = "eth0";

fn failed(what: impl std::fmt::Display) -> TargetError {
    TargetError::failed(what)
}

/// Whether a unit's supervisor runs, and its process if that runs.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct UnitState {
    supervised: bool,
    pid: Option<u32>,
}

/// A shell function `alive PID`: the process exists and is not a zombie.
const ALIVE_FN: &str = r#"alive() { [ -n "$1" ] && [ -r "/proc/$1/stat" ] && [ "$(sed 's/.*) //' "/proc/$1/stat" | cut -c1)" != Z ]; }"#;

/// The state of `unit` on `machine`, from its supervisor.
fn unit_state(machine: &dyn Machine, unit: &Unit) -> Result<UnitState, TargetError> {
    let script = match machine.supervisor() {
        Supervisor::Fallback => format!(
            r#"{ALIVE_FN}
cd {dir} 2>/dev/null || {{ echo "no -"; exit 0; }}
s=$(cat run/{u}.pid 2>/dev/null); c=$(cat run/{u}.child 2>/dev/null)
if alive "$s"; then printf 'yes '; else printf 'no '; fi
if alive "$c"; then echo "$c"; else echo -; fi"#,
            dir = quote(machine.dir()),
            u = quote(&unit.name),
        ),
        Supervisor::Systemd => {
            let name = quote(&systemd::unit_name(&launch(unit)));
            format!(
                "if systemctl is-active --quiet {name}; then printf 'yes '; else printf 'no '; fi; \
                 p=$(systemctl show -p MainPID --value {name}); \
                 if [ \"${{p:-0}}\" != 0 ]; then echo \"$p\"; else echo -; fi"
            )
        }
    };
    let answer = machine.run(&script).map_err(failed)?;
    let mut words = answer.split_whitespace();
    Ok(UnitState {
        supervised: words.next() == Some("yes"),
        pid: words.next().and_then(|p| p.parse().ok()),
    })
}

/// `kill -s SIG PID` on `machine`.
fn kill_on(machine: &dyn Machine, pid: u32, signal: Signal) -> Result<(), TargetError> {
    let name = signal.as_str().trim_start_matches("SIG");
    machine
        .run(&format!("kill -s {name} {pid}"))
        .map(drop)
        .map_err(failed)
}

/// `GET {path}` on `gateway`'s admin API, from its machine (the API listens on the machine's
/// loopback), with the admin header `up` wrote; the body whatever the status (`/readyz` says
/// why it is not ready in a 503).
fn admin_get(machine: &dyn Machine, gateway: &Unit, path: &str) -> Option<String> {
    let admin = gateway.admin?;
    machine
        .run(&format!(
            "curl -sS --max-time 2 -H @{} {}",
            quote(&format!("{}/etc/admin-header", machine.dir())),
            quote(&format!("http://{admin}{path}"))
        ))
        .ok()
        .filter(|body| !body.is_empty())
}

/// Whether something answers HTTP on `addr` from `machine` (a worker's `/healthz`).
fn answers(machine: &dyn Machine, addr: SocketAddr) -> bool {
    machine
        .run(&format!(
            "curl -s -o /dev/null --fail --max-time 1 {}",
            quote(&format!("http://{addr}/healthz"))
        ))
        .is_ok()
}

/// The script that restarts unit `unit` under herd's fallback supervisor in one step: SIGTERM
/// to its supervisor (passed on to the process), a 10 ms poll until both are gone (at most
/// [`REDIS_GRACE`], then both are killed: `killed`), and a new supervisor started at once
/// (`restarted`); `absent` when nothing ran. The supervisor loop itself is
/// [`crate::machine::supervise`]'s.
fn restart_script(dir: &str, unit: &str) -> String {
    let hundredths = REDIS_GRACE.as_millis() / 10;
    format!(
        r#"{ALIVE_FN}
cd {dir} || exit 1
sup=$(cat run/{u}.pid 2>/dev/null); child=$(cat run/{u}.child 2>/dev/null)
alive "$sup" || sup=; alive "$child" || child=
if [ -z "$sup$child" ]; then echo absent; exit 0; fi
if [ -n "$sup" ]; then kill -TERM "$sup"; else kill -TERM "$child"; fi
i=0
while {{ alive "$sup" || alive "$child"; }} && [ $i -lt {hundredths} ]; do sleep 0.01; i=$((i + 1)); done
if alive "$sup" || alive "$child"; then
  [ -n "$sup" ] && kill -KILL -- "-$sup" 2>/dev/null
  for p in $sup $child; do kill -KILL "$p" 2>/dev/null; done
  echo killed; exit 0
fi
rm -f run/{u}.pid run/{u}.child run/{u}.state
setsid nohup sh {dir}/herd-supervise.sh {dir} {u} </dev/null >/dev/null 2>&1 &
echo restarted"#,
        dir = quote(dir),
        u = quote(unit),
    )
}

/// The script that takes `machine`'s link down (`up = false`) or up, run on the machine: only
/// netns machines have a link herd can cut and restore.
fn link_script(inventory: &Inventory, machine: &str, up: bool) -> Result<String, TargetError> {
    let entry = inventory
        .machine(machine)
        .ok_or_else(|| failed(format!("no machine {machine} in the inventory")))?;
    match entry.transport {
        Transport::Netns => Ok(format!(
            "ip link set {NETNS_INTERFACE} {}",
            if up { "up" } else { "down" }
        )),
        Transport::Ssh => Err(TargetError::NotApplicable(format!(
            "machine {machine} is reached over ssh: taking its link down would cut herd off \
             from it too, and nothing could bring it back; cut it from outside (switch port, \
             cloud console) and watch with `herd status --inventory`"
        ))),
        Transport::Local => Err(TargetError::NotApplicable(format!(
            "machine {machine} is an address on this box's loopback (transport local): it \
             has no link of its own to cut"
        ))),
    }
}

/// One more worker of the image of the first worker in `all` (the plan's workers and those
/// added so far), on that image's machine with the fewest of its workers (room permitting),
/// named and placed exactly as `up` would place it: the plan of an inventory with one more
/// worker there.
fn plan_added_worker(inventory: &Inventory, all: &[Unit]) -> Result<Unit, TargetError> {
    let first = all
        .iter()
        .find(|u| u.kind == Kind::Worker)
        .ok_or_else(|| failed("the inventory has no worker to copy"))?;
    let image_name = first.entry.strip_prefix("images.").unwrap_or_default();
    let image_index = inventory
        .images
        .iter()
        .position(|i| i.name == image_name)
        .ok_or_else(|| failed(format!("no image {image_name} in the inventory")))?;
    let count = |machine: &str| {
        all.iter()
            .filter(|u| u.entry == first.entry && u.machine == machine)
            .count()
    };
    let room = |machine: &str| {
        let max = inventory.machine(machine).map_or(0, |e| e.max_workers);
        all.iter()
            .filter(|u| u.kind == Kind::Worker && u.machine == machine)
            .count()
            < usize::from(max)
    };
    let machine = inventory.images[image_index]
        .machines
        .iter()
        .filter(|m| room(m))
        .min_by_key(|m| count(m))
        .cloned()
        .ok_or_else(|| failed(format!("image {image_name} has no machine with room")))?;
    let n = count(&machine) + 1;
    let mut bigger = inventory.clone();
    let grown = &mut bigger.images[image_index];
    grown.machines = vec![machine.clone()];
    grown.per_machine = Some(n as u16);
    grown.total = None;
    let id = format!("{image_name}-{machine}-{n}");
    let unit = plan(&bigger, "")
        .into_iter()
        .find(|u| u.kind == Kind::Worker && u.id == id)
        .ok_or_else(|| failed(format!("could not plan worker {id}")))?;
    if let Some(clash) = all
        .iter()
        .find(|u| u.listeners().iter().any(|(_, a)| *a == unit.listen))
    {
        return Err(failed(format!(
            "worker {id} would listen on {}, which {} uses",
            unit.listen, clash.name
        )));
    }
    Ok(unit)
}

/// A free address for the drill's client on `inventory`'s netns segment (the /24 of its first
/// netns machine): from .254 down, one no machine and not the floating address holds.
fn free_address(inventory: &Inventory) -> Option<Ipv4Addr> {
    let first = inventory
        .machines
        .iter()
        .find(|m| m.transport == Transport::Netns)?;
    let [a, b, c, _] = first.address.octets();
    let taken: Vec<Ipv4Addr> = inventory
        .machines
        .iter()
        .map(|m| m.address)
        .chain(inventory.gateways.floating_address)
        .collect();
    (2..=254u8)
        .rev()
        .map(|d| Ipv4Addr::new(a, b, c, d))
        .find(|ip| !taken.contains(ip))
}

/// The client namespace a drill sends users' requests from on a netns inventory: plugged into
/// the inventory's bridge at a free address; removed when dropped.
#[derive(Debug)]
pub struct ClientNetns {
    name: String,
}

impl ClientNetns {
    /// Plugs `{tag}-drill-client` into `inventory`'s bridge.
    fn create(inventory: &Inventory) -> Result<ClientNetns, TargetError> {
        let tag = netns_tag(inventory);
        let name = format!("{tag}-{DRILL_CLIENT}");
        let bridge = format!("{tag}-br");
        if !crate::netns::exists(&bridge) {
            return Err(failed(format!(
                "network namespace {bridge} does not exist: is inventory {} up? (herd up --inventory FILE)",
                inventory.name
            )));
        }
        if crate::netns::exists(&name) {
            return Err(failed(format!(
                "network namespace {name} exists already: another drill runs on this inventory, \
                 or one was killed (`herd down --inventory FILE` removes it)"
            )));
        }
        let address = free_address(inventory)
            .ok_or_else(|| failed("no free address on the inventory's netns segment"))?;
        ip(&["netns", "add", &name])?;
        // From here on a failure drops `client`, which removes the namespace (and the veth).
        let client = ClientNetns { name: name.clone() };
        let port = "pdrill";
        ip(&["-n", &name, "link", "set", "lo", "up"])?;
        ip(&[
            "-n", &name, "link", "add", "eth0", "type", "veth", "peer", "name", port,
        ])?;
        ip(&["-n", &name, "link", "set", port, "netns", &bridge])?;
        ip(&["-n", &bridge, "link", "set", port, "master", "br0"])?;
        ip(&["-n", &bridge, "link", "set", port, "up"])?;
        ip(&[
            "-n",
            &name,
            "addr",
            "add",
            &format!("{address}/24"),
            "dev",
            "eth0",
        ])?;
        ip(&["-n", &name, "link", "set", "eth0", "up"])?;
        Ok(client)
    }
}

impl Drop for ClientNetns {
    fn drop(&mut self) {
        // Deleting the namespace deletes its veth, and with it the bridge's end.
        let _ = ip(&["netns", "del", &self.name]);
    }
}

fn ip(args: &[&str]) -> Result<(), TargetError> {
    let output = Command::new("ip")
        .args(args)
        .stdin(Stdio::null())
        .output()
        .map_err(|e| failed(format!("cannot run `ip`: {e}")))?;
    if !output.status.success() {
        return Err(failed(format!(
            "`ip {}` failed: {}",
            args.join(" "),
            String::from_utf8_lossy(&output.stderr).trim()
        )));
    }
    Ok(())
}

/// How long a Sentinel failover may take, from the write pause until every node follows the
/// new master (measured 2.4–2.9 s; the sentinels look at a node every second or so).
const SENTINEL_FAILOVER: Duration = Duration::from_secs(30);

/// A running inventory cluster that drills run against.
#[derive(Debug)]
pub struct InventoryCluster {
    inventory: Inventory,
    file: PathBuf,
    machines: Machines,
    /// The units of the plan.
    units: Vec<Unit>,
    /// Workers the drill added.
    added: Vec<Unit>,
    /// The process each unit had when the drill signalled it, to tell it from the one its
    /// supervisor starts afterwards.
    signalled: HashMap<String, u32>,
    public: SocketAddr,
    client: Option<ClientNetns>,
    /// Directories of local and netns machines (what `deploy` needs besides the inventory).
    state_root: PathBuf,
}

impl InventoryCluster {
    /// Opens the cluster of `inventory` (read from `file`), whose local machine directories
    /// are under `state_root`; errors when it does not run.
    pub fn open(
        inventory: Inventory,
        file: &Path,
        state_root: PathBuf,
    ) -> Result<InventoryCluster, TargetError> {
        let options = Options {
            state_root: state_root.clone(),
            token: String::new(),
        };
        let machines = deploy::connect(&inventory, &options);
        // What runs now: the plan as `herd scale --inventory` has changed it.
        let units = deploy::scale::units(&inventory, "", &machines);
        for unit in &units {
            if machines.get(&unit.machine).is_none() {
                return Err(failed(format!(
                    "machine {} of inventory {} has no network namespace: is the cluster up? (herd up --inventory {})",
                    unit.machine,
                    inventory.name,
                    file.display()
                )));
            }
        }
        let (active, _) = admin::active(&machines, &units).ok_or_else(|| {
            failed(format!(
                "no gateway of inventory {} says it is active: is the cluster up? (herd status --inventory {})",
                inventory.name,
                file.display()
            ))
        })?;
        let url = deploy::public_url(&inventory, &active);
        let public = url
            .trim_start_matches("http://")
            .parse()
            .map_err(|e| failed(format!("public address {url}: {e}")))?;
        // Users reach the gateways where they are: on a bridge inside namespaces, from a
        // client namespace on it; otherwise from this box's network.
        let netns_gateways = inventory.gateways.machines.iter().any(|name| {
            inventory
                .machine(name)
                .is_some_and(|m| m.transport == Transport::Netns)
        });
        let client = if netns_gateways {
            Some(ClientNetns::create(&inventory)?)
        } else {
            None
        };
        Ok(InventoryCluster {
            inventory,
            file: file.to_path_buf(),
            machines,
            units,
            added: Vec::new(),
            signalled: HashMap::new(),
            public,
            client,
            state_root,
        })
    }

    /// The redis-restart drill where Redis runs with Sentinel: a planned failover of the master
    /// (writes paused until the replicas have them, `SENTINEL FAILOVER`, the old master a
    /// replica of the new one; see [`deploy::sentinel::failover`]).
    fn fail_redis_over(&mut self) -> Result<String, TargetError> {
        let options = Options {
            state_root: self.state_root.clone(),
            token: String::new(),
        };
        let report = deploy::sentinel::failover(&self.inventory, &options, SENTINEL_FAILOVER)
            .map_err(failed)?;
        Ok(format!(
            "Redis master failed over by Sentinel: {} on {} → {} on {} (writes paused {} ms, all nodes following after {} ms)",
            report.from.0,
            report.from.1,
            report.to.0,
            report.to.1,
            report.writes_paused.as_millis(),
            report.settled_after.as_millis()
        ))
    }

    fn machine(&self, name: &str) -> Result<&dyn Machine, TargetError> {
        self.machines
            .get(name)
            .ok_or_else(|| failed(format!("machine {name} cannot be reached")))
    }

    fn worker(&self, id: &str) -> Result<Unit, TargetError> {
        self.units
            .iter()
            .chain(&self.added)
            .find(|u| u.kind == Kind::Worker && u.id == id)
            .cloned()
            .ok_or_else(|| {
                failed(format!(
                    "no worker {id} in inventory {}",
                    self.inventory.name
                ))
            })
    }

    fn gateway(&self, name: &str) -> Result<Unit, TargetError> {
        self.units
            .iter()
            .find(|u| u.kind == Kind::Gateway && u.id == name)
            .cloned()
            .ok_or_else(|| {
                failed(format!(
                    "no gateway {name} in inventory {}",
                    self.inventory.name
                ))
            })
    }

    fn redis(&self) -> Result<Unit, TargetError> {
        self.units
            .iter()
            .find(|u| u.kind == Kind::Redis)
            .cloned()
            .ok_or_else(|| failed("the inventory has no Redis"))
    }

    /// Sends `signal` to `unit`'s process and remembers which process that was.
    fn signal_unit(&mut self, unit: &Unit, signal: Signal) -> Result<(), TargetError> {
        let machine = self.machine(&unit.machine)?;
        let state = unit_state(machine, unit)?;
        let pid = state
            .pid
            .ok_or_else(|| failed(format!("{} does not run on {}", unit.name, unit.machine)))?;
        kill_on(machine, pid, signal)?;
        self.signalled.insert(unit.name.clone(), pid);
        Ok(())
    }

    /// Waits until `unit` runs again as a new process (its supervisor restarts a killed one;
    /// one no supervisor runs any more is started here), then until `ready` says it serves.
    fn bring_back(
        &mut self,
        unit: &Unit,
        ready: &dyn Fn(&dyn Machine) -> bool,
    ) -> Result<(), TargetError> {
        let old = self.signalled.remove(&unit.name);
        let machine = self.machine(&unit.machine)?;
        let deadline = Instant::now() + RESTART_TIMEOUT;
        let mut forced = false;
        loop {
            let state = unit_state(machine, unit)?;
            match state.pid {
                Some(pid) if Some(pid) != old && ready(machine) => return Ok(()),
                // Not serving yet, or the old process still runs (a graceful stop still
                // draining): wait for it.
                Some(_) => {}
                None if !state.supervised => machine.start(&launch(unit)).map_err(failed)?,
                // Its supervisor restarts it after its back-off.
                None => {}
            }
            if Instant::now() > deadline {
                if forced {
                    return Err(failed(format!(
                        "{} on {} did not run again within {} s; last lines of its log:\n{}",
                        unit.name,
                        unit.machine,
                        RESTART_TIMEOUT.as_secs(),
                        machine.log_tail(&unit.name, 10)
                    )));
                }
                // What lingers is stopped hard and the unit started afresh, once.
                forced = true;
                machine
                    .stop(&launch(unit), Duration::from_secs(1))
                    .map_err(failed)?;
                machine.start(&launch(unit)).map_err(failed)?;
            }
            std::thread::sleep(Duration::from_millis(100));
        }
    }

    /// How many times Redis' log says it is ready (a restart adds one).
    fn redis_ready_count(machine: &dyn Machine, redis: &Unit) -> usize {
        let log = quote(&format!("{}/log/{}.out", machine.dir(), redis.name));
        machine
            .run(&format!(
                "grep -c 'Ready to accept connections' {log} 2>/dev/null || true"
            ))
            .ok()
            .and_then(|n| n.trim().parse().ok())
            .unwrap_or(0)
    }

    /// Starts Redis (unless `start` is false: it was started already) and waits until its
    /// log says it is ready once more than `before`.
    fn start_redis(&self, redis: &Unit, before: usize, start: bool) -> Result<(), TargetError> {
        let machine = self.machine(&redis.machine)?;
        if start {
            machine.start(&launch(redis)).map_err(failed)?;
        }
        let deadline = Instant::now() + RESTART_TIMEOUT;
        while Self::redis_ready_count(machine, redis) <= before {
            // Polled often: the drill marks the fault undone when this returns.
            if Instant::now() > deadline {
                return Err(failed(format!(
                    "Redis on {} was not ready within {} s; last lines of its log:\n{}",
                    redis.machine,
                    RESTART_TIMEOUT.as_secs(),
                    machine.log_tail(&redis.name, 10)
                )));
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        Ok(())
    }

    /// The gateways with their role (and metrics when `metrics`), the active one marked.
    fn gateway_views(&self, metrics: bool) -> Vec<(Unit, GatewayInfo)> {
        let mut views: Vec<(Unit, GatewayInfo, Option<admin::SeenGateway>)> = self
            .units
            .iter()
            .filter(|u| u.kind == Kind::Gateway)
            .map(|unit| {
                let machine = self.machines.get(&unit.machine);
                let seen = machine.and_then(|m| admin::failover(m, unit).ok());
                let info = GatewayInfo {
                    name: unit.id.clone(),
                    machine: unit.machine.clone(),
                    active: false,
                    metrics: if metrics {
                        machine.and_then(|m| admin_get(m, unit, "/metrics"))
                    } else {
                        None
                    },
                };
                (unit.clone(), info, seen)
            })
            .collect();
        let says_active = |seen: &Option<admin::SeenGateway>| {
            seen.as_ref()
                .is_some_and(|s| s.role.as_deref() == Some("active"))
        };
        let mut actives: Vec<usize> = (0..views.len())
            .filter(|&i| says_active(&views[i].2))
            .collect();
        // Two that say active (a gateway cut off from the network still believes it is): the
        // one holding the address is.
        if actives.len() > 1 {
            actives.retain(|&i| {
                views[i]
                    .2
                    .as_ref()
                    .is_some_and(|s| s.holds_address != Some(false))
            });
        }
        if let [only] = actives.as_slice() {
            views[*only].1.active = true;
        }
        views.into_iter().map(|(u, info, _)| (u, info)).collect()
    }
}

impl ClusterHandle for InventoryCluster {
    fn describe(&self) -> String {
        let mut worker_machines: Vec<&str> = Vec::new();
        for unit in self.units.iter().filter(|u| u.kind == Kind::Worker) {
            if !worker_machines.contains(&unit.machine.as_str()) {
                worker_machines.push(&unit.machine);
            }
        }
        format!(
            "inventory {} ({}: gateways {}, Redis on {}, workers on {})",
            self.inventory.name,
            self.file.display(),
            self.inventory.gateways.machines.join("+"),
            self.inventory.redis.machine,
            worker_machines.join(", ")
        )
    }

    fn public_addr(&self) -> SocketAddr {
        self.public
    }

    fn client_netns(&self) -> Option<String> {
        self.client.as_ref().map(|c| c.name.clone())
    }

    fn request_timeout(&self) -> Duration {
        self.inventory
            .gateways
            .env
            .get("HERD_GATEWAY_TIMEOUTS__REQUEST")
            .and_then(|v| humantime::parse_duration(v).ok())
            .unwrap_or(DEFAULT_REQUEST_TIMEOUT)
    }

    fn workers(&mut self) -> Vec<WorkerInfo> {
        self.units
            .iter()
            .chain(&self.added)
            .filter(|u| u.kind == Kind::Worker)
            .map(|unit| WorkerInfo {
                id: unit.id.clone(),
                pid: self
                    .machines
                    .get(&unit.machine)
                    .and_then(|m| unit_state(m, unit).ok())
                    .and_then(|s| s.pid)
                    .unwrap_or(0),
                machine: unit.machine.clone(),
            })
            .collect()
    }

    fn signal_worker(&mut self, id: &str, signal: Signal) -> Result<(), TargetError> {
        let unit = self.worker(id)?;
        self.signal_unit(&unit, signal)
    }

    fn restart_worker(&mut self, id: &str) -> Result<(), TargetError> {
        let unit = self.worker(id)?;
        let listen = unit.listen;
        self.bring_back(&unit, &|machine| answers(machine, listen))
    }

    fn set_link(&mut self, machine: &str, up: bool) -> Result<(), TargetError> {
        let script = link_script(&self.inventory, machine, up)?;
        self.machine(machine)?
            .run(&script)
            .map(drop)
            .map_err(failed)
    }

    fn gateways(&mut self) -> Vec<GatewayInfo> {
        self.gateway_views(true)
            .into_iter()
            .map(|(_, info)| info)
            .collect()
    }

    fn signal_gateway(&mut self, name: &str, signal: Signal) -> Result<(), TargetError> {
        let unit = self.gateway(name)?;
        if signal != Signal::SIGTERM {
            return self.signal_unit(&unit, signal);
        }
        // A graceful stop is the operator's: to the supervisor, which passes it on and does not
        // start the gateway again (systemd: a clean exit is not restarted).
        let machine = self.machine(&unit.machine)?;
        let state = unit_state(machine, &unit)?;
        let pid = state
            .pid
            .ok_or_else(|| failed(format!("{} does not run on {}", unit.name, unit.machine)))?;
        match machine.supervisor() {
            Supervisor::Fallback => {
                // Not the gateway itself when the supervisor cannot be found: its supervisor
                // would start it again at once, and the drill report a stop that never was.
                let pid_file = format!("{}/run/{}.pid", machine.dir(), unit.name);
                let supervisor = machine
                    .run(&format!("cat {}", quote(&pid_file)))
                    .ok()
                    .and_then(|p| p.trim().parse().ok())
                    .ok_or_else(|| {
                        failed(format!(
                            "{} on {}: no supervisor pid in {pid_file}",
                            unit.name, unit.machine
                        ))
                    })?;
                kill_on(machine, supervisor, Signal::SIGTERM)?;
            }
            Supervisor::Systemd => machine
                .run(&format!(
                    "systemctl kill --kill-who=main -s TERM {}",
                    quote(&systemd::unit_name(&launch(&unit)))
                ))
                .map(drop)
                .map_err(failed)?,
        }
        self.signalled.insert(unit.name.clone(), pid);
        Ok(())
    }

    fn restart_gateway(&mut self, name: &str) -> Result<(), TargetError> {
        let unit = self.gateway(name)?;
        let gateway = unit.clone();
        self.bring_back(&unit, &|machine| {
            admin::wait_answers(machine, &gateway, None, Duration::from_millis(200)).is_ok()
        })
    }

    fn restart_redis(&mut self) -> Result<String, TargetError> {
        if self.inventory.redis.sentinel.is_some() {
            return self.fail_redis_over();
        }
        let redis = self.redis()?;
        let machine = self.machine(&redis.machine)?;
        let before = Self::redis_ready_count(machine, &redis);
        // One step on the machine, as `systemctl restart` is: two round trips through the
        // transport and a coarse stop poll would add to the outage what is herd's, not Redis'.
        let answer = match machine.supervisor() {
            Supervisor::Fallback => machine.run(&restart_script(machine.dir(), &redis.name)),
            Supervisor::Systemd => machine.run(&format!(
                "systemctl restart {} && echo restarted",
                quote(&systemd::unit_name(&launch(&redis)))
            )),
        }
        .map_err(failed)?;
        match answer.trim() {
            "restarted" => {
                self.start_redis(&redis, before, false)?;
                Ok(super::target::REDIS_RESTARTED.to_string())
            }
            "killed" => Err(failed(format!(
                "redis-server did not exit within {} s of SIGTERM",
                REDIS_GRACE.as_secs()
            ))),
            _ => Err(failed("Redis was not running")),
        }
    }

    fn ensure_redis(&mut self) -> Result<(), TargetError> {
        let redis = self.redis()?;
        let machine = self.machine(&redis.machine)?;
        if machine.alive(&launch(&redis)).map_err(failed)? {
            return Ok(());
        }
        let before = Self::redis_ready_count(machine, &redis);
        self.start_redis(&redis, before, true)
    }

    fn add_worker(&mut self) -> Result<String, TargetError> {
        let all: Vec<Unit> = self.units.iter().chain(&self.added).cloned().collect();
        let unit = plan_added_worker(&self.inventory, &all)?;
        let id = unit.id.clone();
        deploy::start_unit(&self.inventory, &self.machines, &unit).map_err(failed)?;
        self.added.push(unit.clone());
        let listen = unit.listen;
        self.bring_back(&unit, &|machine| answers(machine, listen))?;
        Ok(id)
    }

    fn drain_worker(&mut self, id: &str, grace: Duration) -> Result<Stopped, TargetError> {
        let unit = self.worker(id)?;
        let machine = self.machine(&unit.machine)?;
        match machine.stop(&launch(&unit), grace).map_err(failed)? {
            machine::Stopped::Exited => Ok(Stopped::Drained),
            machine::Stopped::Killed => Ok(Stopped::Killed),
            machine::Stopped::Absent => Err(failed(format!("worker {id} was not running"))),
        }
    }

    fn remove_added_worker(&mut self, id: &str, grace: Duration) -> Result<Stopped, TargetError> {
        let stopped = self.drain_worker(id, grace)?;
        let unit = self.worker(id)?;
        let machine = self.machine(&unit.machine)?;
        // Its files go too: nothing of the plan refers to them.
        let dir = machine.dir().to_string();
        let _ = machine.run(&format!(
            "rm -f {} {}",
            quote(&format!("{dir}/etc/{}.env", unit.name)),
            quote(&format!("{dir}/link/{}", unit.name))
        ));
        self.added.retain(|u| u.id != id);
        Ok(stopped)
    }

    fn all_healthy(&mut self) -> Result<(), String> {
        let views = self.gateway_views(false);
        let (unit, _) = views
            .iter()
            .find(|(_, info)| info.active)
            .ok_or_else(|| "no one gateway says it is active".to_string())?;
        let machine = self
            .machines
            .get(&unit.machine)
            .ok_or_else(|| format!("machine {} cannot be reached", unit.machine))?;
        let body = admin_get(machine, unit, "/readyz")
            .ok_or_else(|| format!("{}'s /readyz did not answer", unit.id))?;
        super::local::healthy(&body, self.workers().len())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::inventory::parse;

    /// gw1, gw2 (netns, floating .10), m1 (netns, 2 workers), m2 (ssh, 1 worker), box (local).
    fn inventory() -> Inventory {
        parse(
            Path::new("t.toml"),
            r#"
name = "t"
[[machines]]
name = "gw1"
address = "10.9.0.11"
transport = "netns"
[[machines]]
name = "gw2"
address = "10.9.0.12"
transport = "netns"
[[machines]]
name = "m1"
address = "10.9.0.254"
transport = "netns"
max_workers = 3
[[machines]]
name = "m2"
address = "10.9.0.253"
transport = "ssh"
[[machines]]
name = "box"
address = "127.0.0.9"
transport = "local"
[redis]
machine = "gw1"
[gateways]
machines = ["gw1", "gw2"]
floating_address = "10.9.0.252"
[[images]]
name = "demo"
total = 3
machines = ["m1", "m2"]
"#,
        )
        .unwrap()
    }

    #[test]
    fn only_netns_links_are_cut_and_the_others_say_why_not() {
        let inventory = inventory();
        assert_eq!(
            link_script(&inventory, "m1", false).unwrap(),
            "ip link set eth0 down"
        );
        assert_eq!(
            link_script(&inventory, "m1", true).unwrap(),
            "ip link set eth0 up"
        );
        for (machine, why) in [("m2", "reached over ssh"), ("box", "loopback")] {
            match link_script(&inventory, machine, false) {
                Err(TargetError::NotApplicable(reason)) => {
                    assert!(reason.contains(why), "{reason}")
                }
                other => panic!("{machine}: {other:?}"),
            }
        }
        assert!(matches!(
            link_script(&inventory, "nope", false),
            Err(TargetError::Failed(_))
        ));
    }

    #[test]
    fn an_added_worker_goes_where_up_would_put_the_next_one() {
        let inventory = inventory();
        let units = plan(&inventory, "");
        let ids: Vec<&str> = units
            .iter()
            .filter(|u| u.kind == Kind::Worker)
            .map(|u| u.id.as_str())
            .collect();
        assert_eq!(ids, ["demo-m1-1", "demo-m1-2", "demo-m2-1"]);
        // m2 has fewer: the next one goes there, on the next port.
        let added = plan_added_worker(&inventory, &units).unwrap();
        assert_eq!(added.id, "demo-m2-2");
        assert_eq!(added.name, "worker-demo-m2-2");
        assert_eq!(added.listen, "10.9.0.253:8082".parse().unwrap());
        assert!(
            added
                .env
                .contains(&("HERD_WORKER_ID".into(), "demo-m2-2".into()))
        );
        // Then m1 (2 each), then m2 again: m1 is full at its max_workers of 3.
        let mut all = units.clone();
        all.push(added);
        let third = plan_added_worker(&inventory, &all).unwrap();
        assert_eq!(third.id, "demo-m1-3");
        all.push(third);
        assert_eq!(plan_added_worker(&inventory, &all).unwrap().id, "demo-m2-3");
    }

    /// A unit `u` under herd's fallback supervisor in a temporary machine directory, whose
    /// process drains for 0.2 s on SIGTERM.
    fn supervised_unit() -> (tempfile::TempDir, crate::machine::local::Local, Unit) {
        use std::os::unix::fs::PermissionsExt;
        let temp = tempfile::tempdir().unwrap();
        let dir = temp.path();
        for sub in ["etc", "link", "run", "log"] {
            std::fs::create_dir_all(dir.join(sub)).unwrap();
        }
        std::fs::write(
            dir.join("herd-supervise.sh"),
            crate::machine::supervise::SCRIPT,
        )
        .unwrap();
        std::fs::write(dir.join("etc/u.env"), "HERD_ARGS=''\n").unwrap();
        let program = dir.join("prog.sh");
        std::fs::write(
            &program,
            "#!/bin/sh\ntrap 'sleep 0.2; exit 0' TERM\nwhile :; do sleep 0.05; done\n",
        )
        .unwrap();
        std::fs::set_permissions(&program, std::fs::Permissions::from_mode(0o755)).unwrap();
        std::os::unix::fs::symlink(&program, dir.join("link/u")).unwrap();
        let machine = crate::machine::local::Local::new("here", dir.to_str().unwrap());
        let mut unit = plan(&inventory(), "").remove(0);
        unit.name = "u".into();
        (temp, machine, unit)
    }

    #[test]
    fn a_one_step_restart_drains_the_old_process_and_supervises_a_new_one() {
        let (_temp, machine, unit) = supervised_unit();
        let answer = machine
            .run(&restart_script(machine.dir(), &unit.name))
            .unwrap();
        assert_eq!(answer.trim(), "absent", "nothing ran yet");
        machine.start(&launch(&unit)).unwrap();
        let before = unit_state(&machine, &unit).unwrap();
        assert!(before.supervised && before.pid.is_some(), "{before:?}");
        let answer = machine
            .run(&restart_script(machine.dir(), &unit.name))
            .unwrap();
        assert_eq!(answer.trim(), "restarted");
        let old = before.pid.unwrap();
        assert!(
            !std::path::Path::new(&format!("/proc/{old}")).exists()
                || std::fs::read_to_string(format!("/proc/{old}/stat"))
                    .is_ok_and(|stat| stat.contains(") Z")),
            "the old process drained and exited"
        );
        // The new process's pid can show a moment before its supervisor does: wait for both.
        let deadline = Instant::now() + Duration::from_secs(5);
        let after = loop {
            let state = unit_state(&machine, &unit).unwrap();
            if (state.supervised && state.pid.is_some()) || Instant::now() > deadline {
                break state;
            }
            std::thread::sleep(Duration::from_millis(20));
        };
        assert!(after.supervised, "a new supervisor runs it: {after:?}");
        assert!(after.pid.is_some_and(|pid| pid != old), "{after:?}");
        assert_eq!(
            machine
                .stop(&launch(&unit), Duration::from_secs(5))
                .unwrap(),
            machine::Stopped::Exited
        );
    }

    #[test]
    fn the_drill_client_takes_an_address_nobody_holds() {
        // .254 and .253 are machines, .252 the floating address.
        assert_eq!(
            free_address(&inventory()),
            Some(Ipv4Addr::new(10, 9, 0, 251))
        );
    }
}
