//! Redis with Sentinel on an inventory's machines: starting the replicas and the sentinels
//! after the master ([`start`], part of `herd up`), waiting until they agree ([`wait_agreement`]),
//! what they say for `herd status` ([`status`]), and failing the master over on purpose
//! ([`failover`], for `herd drill redis-restart`).
//!
//! Every question goes to the machine the asked process runs on (`redis-cli` there, under
//! `timeout`), the way herd reaches everything else: a netns or ssh machine's addresses need not
//! be reachable from here. Down needs nothing of its own: the data nodes and sentinels are units
//! of the plan, stopped with Redis.

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::time::{Duration, Instant};

use serde::Serialize;

use super::{DeployError, Machines, Options, TAIL, connect, launch, wait_redis};
use crate::inventory::sentinel::{
    DATA_CONF, SENTINEL_CONF, SENTINEL_UNIT, data_conf, sentinel_conf,
};
use crate::inventory::{Inventory, Unit, plan};
use crate::machine::{Machine, quote};

/// How long the sentinels get to agree on the master and see every replica and each other.
const AGREEMENT: Duration = Duration::from_secs(30);
/// First words of the error replies herd's questions can get.
const ERRORS: [&str; 7] = [
    "ERR",
    "NOGOODSLAVE",
    "INPROG",
    "READONLY",
    "LOADING",
    "NOAUTH",
    "MASTERDOWN",
];
/// Longest wait for one `redis-cli` answer.
const ASK_SECS: u32 = 2;

/// The data nodes (master and replicas) of `units`.
fn data_nodes(units: &[Unit]) -> Vec<&Unit> {
    units
        .iter()
        .filter(|u| u.entry == "redis" || u.entry == "redis.replicas")
        .collect()
}

/// The sentinels of `units`.
fn sentinels(units: &[Unit]) -> Vec<&Unit> {
    units.iter().filter(|u| u.name == SENTINEL_UNIT).collect()
}

/// `redis-cli` on `machine` against `addr`: the raw answer, one value a line.
fn cli(machine: &dyn Machine, addr: SocketAddr, command: &str) -> Result<String, String> {
    machine
        .run(&format!(
            "timeout {ASK_SECS} redis-cli --raw -h {} -p {} {command}",
            addr.ip(),
            addr.port()
        ))
        .map_err(|e| e.to_string())
        .and_then(|answer| match answer.lines().next() {
            // `--raw` prints an error reply as its text: its first word says it is one.
            Some(line)
                if ERRORS
                    .iter()
                    .any(|e| line.split_whitespace().next() == Some(*e)) =>
            {
                Err(answer.trim().to_string())
            }
            _ => Ok(answer),
        })
}

/// `field:value` lines of an `INFO` answer.
fn info(text: &str) -> BTreeMap<String, String> {
    text.lines()
        .filter_map(|l| l.trim().split_once(':'))
        .map(|(k, v)| (k.to_string(), v.to_string()))
        .collect()
}

/// Alternating name / value lines (`SENTINEL master NAME` with `--raw`).
fn pairs(text: &str) -> BTreeMap<String, String> {
    let lines: Vec<&str> = text.lines().collect();
    lines
        .chunks(2)
        .filter(|c| c.len() == 2)
        .map(|c| (c[0].to_string(), c[1].to_string()))
        .collect()
}

/// Writes every data node's config file (with Sentinel; before the master starts) and removes
/// its "started once" marker, so that its start script treats the coming start as the first.
pub(super) fn write_configs(
    inventory: &Inventory,
    machines: &Machines,
    units: &[Unit],
) -> Result<(), DeployError> {
    if inventory.redis.sentinel.is_none() {
        return Ok(());
    }
    for unit in data_nodes(units) {
        let machine = machines.get(&unit.machine).expect("connected");
        machine.run(&format!(
            "printf '%s' {} > {} && rm -f {}",
            quote(&data_conf(inventory, unit)),
            quote(&format!("{}/{DATA_CONF}", machine.dir())),
            quote(&format!("{}/{}", machine.dir(), super::rejoin::STARTED))
        ))?;
    }
    Ok(())
}

/// Starts the replicas (each ready before the next) and the sentinels, then waits until the
/// sentinels agree on the first master. Each started unit goes into `started`, so a failure
/// stops it.
pub(super) fn start(
    inventory: &Inventory,
    machines: &Machines,
    units: &[Unit],
    started: &mut Vec<Unit>,
    say: &mut dyn FnMut(String),
) -> Result<(), DeployError> {
    let Some(settings) = &inventory.redis.sentinel else {
        return Ok(());
    };
    for replica in units.iter().filter(|u| u.entry == "redis.replicas") {
        let machine = machines.get(&replica.machine).expect("connected");
        machine.start(&launch(replica))?;
        started.push(replica.clone());
        wait_redis(machine, replica)?;
    }
    for unit in sentinels(units) {
        let machine = machines.get(&unit.machine).expect("connected");
        let conf = sentinel_conf(inventory, unit.listen).expect("sentinel settings");
        machine.run(&format!(
            "printf '%s' {} > {}",
            quote(&conf),
            quote(&format!("{}/{SENTINEL_CONF}", machine.dir()))
        ))?;
        machine.start(&launch(unit))?;
        started.push(unit.clone());
    }
    let master = crate::inventory::sentinel::first_master(inventory);
    let began = Instant::now();
    wait_agreement_on(machines, inventory, units, Some(master), AGREEMENT)?;
    say(format!(
        "redis: master on {} ({master}), {} replica(s), {} sentinels agree on master `{}` (quorum {}) after {:.1} s",
        inventory.redis.machine,
        inventory.redis.replicas.len(),
        settings.machines.len(),
        settings.master,
        settings.quorum(),
        began.elapsed().as_secs_f64()
    ));
    Ok(())
}

/// What one sentinel says.
#[derive(Debug, Clone, Serialize)]
pub struct SentinelSeen {
    /// Its machine.
    pub machine: String,
    /// Its address.
    pub addr: String,
    /// The master it names (`None`: no answer).
    pub master: Option<String>,
    /// The master's flags as it sees them (`master`, `s_down`, `o_down`, ...).
    pub flags: Option<String>,
    /// Other sentinels it knows of.
    pub other_sentinels: Option<usize>,
}

/// What one data node says of itself.
#[derive(Debug, Clone, Serialize)]
pub struct NodeSeen {
    /// Its machine.
    pub machine: String,
    /// Its address.
    pub addr: String,
    /// `master`, `slave`, or `None` (no answer).
    pub role: Option<String>,
    /// A replica's master (`host:port`) and whether its link to it is up.
    pub following: Option<(String, bool)>,
}

/// Redis with Sentinel as the sentinels and data nodes tell it.
#[derive(Debug, Clone, Serialize)]
pub struct SentinelStatus {
    /// The master's name.
    pub name: String,
    /// The master the sentinels agree on, and its machine (`None`: they don't agree, or none
    /// answers).
    pub master: Option<(String, String)>,
    /// Each sentinel.
    pub sentinels: Vec<SentinelSeen>,
    /// Each data node.
    pub nodes: Vec<NodeSeen>,
}

impl SentinelStatus {
    /// The master's address when the sentinels agree, it says it is the master, every other
    /// node follows it with its link up, and every sentinel knows all the others.
    pub fn settled(&self) -> Option<String> {
        let (master, _) = self.master.as_ref()?;
        let all = self.sentinels.len();
        let sentinels_ok = self
            .sentinels
            .iter()
            .all(|s| s.flags.as_deref() == Some("master") && s.other_sentinels == Some(all - 1));
        let nodes_ok = self.nodes.iter().all(|n| {
            if &n.addr == master {
                n.role.as_deref() == Some("master")
            } else {
                n.role.as_deref() == Some("slave")
                    && n.following.as_ref() == Some(&(master.clone(), true))
            }
        });
        (sentinels_ok && nodes_ok).then(|| master.clone())
    }

    /// Lines for `herd status`'s table.
    pub fn table(&self) -> String {
        let mut out = format!(
            "\nREDIS (Sentinel master `{}`): {}\nNODE            ADDRESS                ROLE\n",
            self.name,
            match &self.master {
                Some((addr, machine)) => format!("master on {machine} ({addr})"),
                None => "the sentinels do NOT agree on a master".into(),
            }
        );
        for n in &self.nodes {
            let role = match (&n.role, &n.following) {
                (None, _) => "no answer".to_string(),
                (Some(role), Some((of, up))) => {
                    format!("{role} of {of} (link {})", if *up { "up" } else { "DOWN" })
                }
                (Some(role), None) => role.clone(),
            };
            out.push_str(&format!("{:<15} {:<22} {role}\n", n.machine, n.addr));
        }
        out.push_str("SENTINEL        ADDRESS                NAMES MASTER           FLAGS   OTHER SENTINELS\n");
        for s in &self.sentinels {
            out.push_str(&format!(
                "{:<15} {:<22} {:<22} {:<7} {}\n",
                s.machine,
                s.addr,
                s.master.as_deref().unwrap_or("no answer"),
                s.flags.as_deref().unwrap_or("-"),
                s.other_sentinels.map_or("-".into(), |n| n.to_string())
            ));
        }
        out
    }
}

/// Asks every sentinel and data node of `units`.
fn ask(machines: &Machines, inventory: &Inventory, units: &[Unit]) -> Option<SentinelStatus> {
    let settings = inventory.redis.sentinel.as_ref()?;
    let name = &settings.master;
    let seen: Vec<SentinelSeen> = sentinels(units)
        .iter()
        .map(|unit| {
            let answer = machines
                .get(&unit.machine)
                .and_then(|m| cli(m, unit.listen, &format!("SENTINEL master {name}")).ok())
                .map(|text| pairs(&text))
                .filter(|p| p.contains_key("ip"));
            SentinelSeen {
                machine: unit.machine.clone(),
                addr: unit.listen.to_string(),
                master: answer
                    .as_ref()
                    .map(|p| format!("{}:{}", p["ip"], p.get("port").cloned().unwrap_or_default())),
                flags: answer.as_ref().and_then(|p| p.get("flags").cloned()),
                other_sentinels: answer
                    .as_ref()
                    .and_then(|p| p.get("num-other-sentinels")?.parse().ok()),
            }
        })
        .collect();
    let nodes: Vec<NodeSeen> = data_nodes(units)
        .iter()
        .map(|unit| {
            let answer = machines
                .get(&unit.machine)
                .and_then(|m| cli(m, unit.listen, "INFO replication").ok())
                .map(|text| info(&text))
                .filter(|i| i.contains_key("role"));
            NodeSeen {
                machine: unit.machine.clone(),
                addr: unit.listen.to_string(),
                role: answer.as_ref().map(|i| i["role"].clone()),
                following: answer.as_ref().and_then(|i| {
                    Some((
                        format!("{}:{}", i.get("master_host")?, i.get("master_port")?),
                        i.get("master_link_status").map(String::as_str) == Some("up"),
                    ))
                }),
            }
        })
        .collect();
    let named: Vec<&String> = seen.iter().filter_map(|s| s.master.as_ref()).collect();
    let agreed = named
        .first()
        .filter(|first| named.len() == seen.len() && named.iter().all(|m| m == *first))
        .map(|addr| {
            let machine = data_nodes(units)
                .iter()
                .find(|u| u.listen.to_string() == **addr)
                .map_or("?".to_string(), |u| u.machine.clone());
            ((*addr).clone(), machine)
        });
    Some(SentinelStatus {
        name: name.clone(),
        master: agreed,
        sentinels: seen,
        nodes,
    })
}

/// `herd status`'s view of Redis with Sentinel (`None` without Sentinel).
pub fn status(inventory: &Inventory, options: &Options) -> Option<SentinelStatus> {
    inventory.redis.sentinel.as_ref()?;
    let units = plan(inventory, "");
    ask(&connect(inventory, options), inventory, &units)
}

fn wait_agreement_on(
    machines: &Machines,
    inventory: &Inventory,
    units: &[Unit],
    expect: Option<SocketAddr>,
    timeout: Duration,
) -> Result<String, DeployError> {
    let deadline = Instant::now() + timeout;
    loop {
        let status = ask(machines, inventory, units);
        let settled = status.as_ref().and_then(SentinelStatus::settled);
        match (settled, expect) {
            (Some(master), Some(want)) if master == want.to_string() => return Ok(master),
            (Some(master), None) => return Ok(master),
            _ => {}
        }
        for unit in sentinels(units) {
            let machine = machines.get(&unit.machine).expect("connected");
            if !machine.alive(&launch(unit)).unwrap_or(true) {
                return Err(DeployError::Unit {
                    what: format!("the sentinel on {} exited", unit.machine),
                    machine: unit.machine.clone(),
                    tail: machine.log_tail(&unit.name, TAIL),
                });
            }
        }
        if Instant::now() > deadline {
            return Err(DeployError::NotReady {
                waited: timeout,
                last: format!(
                    "Redis with Sentinel did not settle{}:{}",
                    expect.map_or(String::new(), |m| format!(" on master {m}")),
                    status.map_or(" no sentinel settings".into(), |s| s.table())
                ),
            });
        }
        std::thread::sleep(Duration::from_millis(200));
    }
}

/// Waits until the sentinels agree on one master, it says it is the master and every other
/// data node follows it with its link up; returns the master's `host:port`.
pub fn wait_agreement(
    inventory: &Inventory,
    options: &Options,
    timeout: Duration,
) -> Result<String, DeployError> {
    let units = plan(inventory, "");
    wait_agreement_on(
        &connect(inventory, options),
        inventory,
        &units,
        None,
        timeout,
    )
}

/// What [`failover`] did.
#[derive(Debug, Clone, Serialize)]
pub struct FailoverReport {
    /// The master before (`host:port`) and its machine.
    pub from: (String, String),
    /// The master after, and its machine.
    pub to: (String, String),
    /// How long writes waited on the old master (from the pause until it was a replica).
    pub writes_paused: Duration,
    /// From `SENTINEL FAILOVER` to every sentinel naming the new master.
    pub promoted_after: Duration,
    /// From `SENTINEL FAILOVER` to every data node following the new master (the old master
    /// rejoined as a replica, its link up).
    pub settled_after: Duration,
}

/// Longest pause of writes on the old master: Redis lifts it by itself after this, should herd
/// die half-way.
const PAUSE_MS: u64 = 3000;
/// How long the replicas get to catch up with the paused master.
const CATCH_UP: Duration = Duration::from_secs(2);

/// Fails the master over on purpose and without losing an acknowledged write, then waits
/// (within `timeout`) until every sentinel names the new master and the old one has rejoined
/// as its replica. Refused unless Redis is settled first.
///
/// With a bare `SENTINEL FAILOVER` the old master stays writable from the promotion until a
/// sentinel turns it into a replica, and its clients move only when they next ask the
/// sentinels: whatever it acknowledged in that gap would be dropped when it resyncs from the new
/// master. (Measured, Redis 7.0: the gap closed within ~3 s and nothing was lost, but that is
/// timing, not a guarantee.) So herd first pauses writes on the old master
/// (`CLIENT PAUSE .. WRITE`: they wait, reads go on), waits until every replica has its last
/// write, asks for the failover, makes the old master a replica of the promoted one as soon as
/// that one says it is master (`REPLICAOF`), and only then lifts the pause: the writes that
/// waited now meet a replica and fail (`READONLY`, an error the client sees), none is
/// acknowledged and lost.
pub fn failover(
    inventory: &Inventory,
    options: &Options,
    timeout: Duration,
) -> Result<FailoverReport, DeployError> {
    let Some(settings) = &inventory.redis.sentinel else {
        return Err(DeployError::Sentinel(
            "the inventory has no [redis] sentinel: nothing to fail over".into(),
        ));
    };
    let units = plan(inventory, "");
    let machines = connect(inventory, options);
    let before = ask(&machines, inventory, &units).expect("sentinel settings");
    let Some(from) = before.master.clone().filter(|_| before.settled().is_some()) else {
        return Err(DeployError::Sentinel(format!(
            "Redis is not settled, so no failover was asked for:{}",
            before.table()
        )));
    };
    let nodes = data_nodes(&units);
    let old = *nodes
        .iter()
        .find(|u| u.listen.to_string() == from.0)
        .expect("the agreed master is a data node");
    let old_machine = machines
        .get(&old.machine)
        .ok_or_else(|| DeployError::Sentinel(format!("machine {} is unreachable", old.machine)))?;
    let unpause = || {
        let _ = cli(old_machine, old.listen, "CLIENT UNPAUSE");
    };
    cli(
        old_machine,
        old.listen,
        &format!("CLIENT PAUSE {PAUSE_MS} WRITE"),
    )
    .map_err(|e| DeployError::Sentinel(format!("CLIENT PAUSE on {}: {e}", old.machine)))?;
    let paused = Instant::now();
    let replicas: Vec<&Unit> = nodes
        .iter()
        .filter(|u| u.listen != old.listen)
        .copied()
        .collect();
    if let Err(error) = wait_caught_up(&machines, old, &replicas) {
        unpause();
        return Err(error);
    }
    let began = Instant::now();
    let mut asked = Err("no sentinel answered".to_string());
    for unit in sentinels(&units) {
        let Some(machine) = machines.get(&unit.machine) else {
            continue;
        };
        asked = cli(
            machine,
            unit.listen,
            &format!("SENTINEL FAILOVER {}", settings.master),
        );
        if asked.is_ok() {
            break;
        }
    }
    if let Err(error) = asked {
        unpause();
        return Err(DeployError::Sentinel(format!(
            "SENTINEL FAILOVER was refused: {error}"
        )));
    }
    // The promoted replica: the first other data node that says it is a master.
    let deadline = paused + Duration::from_millis(PAUSE_MS) - Duration::from_millis(300);
    let promoted = loop {
        let found = replicas.iter().find(|u| {
            machines
                .get(&u.machine)
                .and_then(|m| cli(m, u.listen, "INFO replication").ok())
                .is_some_and(|text| info(&text).get("role").map(String::as_str) == Some("master"))
        });
        if let Some(unit) = found {
            break *unit;
        }
        if Instant::now() > deadline {
            unpause();
            return Err(DeployError::Sentinel(format!(
                "no replica was promoted while writes were paused on {} ({PAUSE_MS} ms); writes go on there",
                old.machine
            )));
        }
        std::thread::sleep(Duration::from_millis(5));
    };
    let demoted = cli(
        old_machine,
        old.listen,
        &format!(
            "REPLICAOF {} {}",
            promoted.listen.ip(),
            promoted.listen.port()
        ),
    );
    unpause();
    let writes_paused = paused.elapsed();
    demoted.map_err(|e| {
        DeployError::Sentinel(format!("REPLICAOF on the old master {}: {e}", old.machine))
    })?;
    let deadline = began + timeout;
    let mut promoted_after = None;
    loop {
        let now = ask(&machines, inventory, &units).expect("sentinel settings");
        if promoted_after.is_none() && now.master.as_ref().is_some_and(|(addr, _)| *addr != from.0)
        {
            promoted_after = Some(began.elapsed());
        }
        if let (Some(promoted), Some(_)) = (promoted_after, now.settled()) {
            return Ok(FailoverReport {
                from,
                to: now.master.expect("settled"),
                writes_paused,
                promoted_after: promoted,
                settled_after: began.elapsed(),
            });
        }
        if Instant::now() > deadline {
            return Err(DeployError::NotReady {
                waited: timeout,
                last: format!(
                    "after SENTINEL FAILOVER of {} the sentinels {}:{}",
                    from.0,
                    if promoted_after.is_some() {
                        "name the new master, but not every node follows it"
                    } else {
                        "still name the old master"
                    },
                    now.table()
                ),
            });
        }
        std::thread::sleep(Duration::from_millis(100));
    }
}

/// Waits until every replica linked to the (paused) master `old` has processed its last write,
/// as each replica reports it (`slave_repl_offset`; the master's own view of its replicas'
/// offsets is refreshed only once a second).
fn wait_caught_up(machines: &Machines, old: &Unit, replicas: &[&Unit]) -> Result<(), DeployError> {
    let deadline = Instant::now() + CATCH_UP;
    let master = machines.get(&old.machine).expect("checked");
    loop {
        let text = cli(master, old.listen, "INFO replication").map_err(DeployError::Sentinel)?;
        let offset: u64 = info(&text)
            .get("master_repl_offset")
            .and_then(|o| o.parse().ok())
            .unwrap_or(u64::MAX);
        let mut behind = Vec::new();
        let mut caught_up = 0;
        for replica in replicas {
            let fields = machines
                .get(&replica.machine)
                .and_then(|m| cli(m, replica.listen, "INFO replication").ok())
                .map(|t| info(&t))
                .unwrap_or_default();
            if fields.get("master_link_status").map(String::as_str) != Some("up") {
                continue;
            }
            let at: u64 = fields
                .get("slave_repl_offset")
                .and_then(|o| o.parse().ok())
                .unwrap_or(0);
            if at >= offset {
                caught_up += 1;
            } else {
                behind.push(format!("{} at {at} of {offset}", replica.machine));
            }
        }
        if caught_up > 0 && behind.is_empty() {
            return Ok(());
        }
        if Instant::now() > deadline {
            return Err(DeployError::Sentinel(format!(
                "no linked replica caught up with the paused master within {CATCH_UP:?}: {}",
                behind.join("; ")
            )));
        }
        std::thread::sleep(Duration::from_millis(10));
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn answers_are_parsed() {
        let p = pairs("name\nherd\nip\n10.0.0.1\nport\n6379\nflags\nmaster\n");
        assert_eq!(p["ip"], "10.0.0.1");
        assert_eq!(p["flags"], "master");
        let i = info(
            "# Replication\r\nrole:slave\r\nmaster_host:10.0.0.1\r\nmaster_port:6379\r\nmaster_link_status:up\r\n",
        );
        assert_eq!(i["role"], "slave");
        assert_eq!(i["master_link_status"], "up");
    }
}
