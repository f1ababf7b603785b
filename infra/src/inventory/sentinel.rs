//! Redis with Sentinel in an inventory: `[redis] replicas = [...]` and `[redis] sentinel =
//! { ... }`. The types, their checks, and the units they add to the plan (a replica per replica
//! machine, a sentinel per sentinel machine) and the settings workers and gateways get to follow
//! the master (`[sentinel]` in both, see `worker/README.md` and `gateway/README.md`).
//!
//! The master named in `[redis] machine` is the master when the cluster comes up; Sentinel may
//! move it later. Every data node is the unit `redis` on its machine (its role changes, its
//! name doesn't), every sentinel the unit `redis-sentinel`.

use std::net::{Ipv4Addr, SocketAddr};

use serde::Deserialize;

use super::Inventory;
use super::plan::{Kind, Unit};

/// Fewest sentinels: with fewer, one lost machine leaves no majority to authorise a failover.
pub const MIN_SENTINELS: usize = 3;

/// `[redis] sentinel = { ... }`: the sentinels watching the master.
#[derive(Debug, Clone, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct RedisSentinel {
    /// The name the sentinels know the master by (`SENTINEL get-master-addr-by-name`).
    #[serde(default = "default_master")]
    pub master: String,
    /// Machines running a sentinel (at least 3, each once).
    pub machines: Vec<String>,
    /// The sentinels' port.
    #[serde(default = "default_port")]
    pub port: u16,
    /// Sentinels that must agree the master is down (default: a majority).
    #[serde(default)]
    pub quorum: Option<usize>,
    /// How long the master may be silent before a sentinel thinks it down, in ms.
    #[serde(default = "default_down_after_ms")]
    pub down_after_ms: u32,
}

fn default_master() -> String {
    "herd".into()
}
fn default_port() -> u16 {
    26379
}
/// 2 s, not 1: right after a failover every sentinel reconnects to the new master, and on a busy
/// 2-core box the first answer took over a second; the sentinels then failed over that healthy
/// new master too, to a replica that lagged it, and 176 acknowledged writes were lost (CI log,
/// `tests/tests/inventory_sentinel.rs`).
fn default_down_after_ms() -> u32 {
    2000
}

impl RedisSentinel {
    /// The quorum in force.
    pub fn quorum(&self) -> usize {
        self.quorum.unwrap_or(self.machines.len() / 2 + 1)
    }
}

type Check = Result<(), (String, String)>;

fn fail(entry: &str, problem: String) -> Check {
    Err((entry.to_string(), problem))
}

/// The checks for `replicas` and `sentinel`; port clashes are found with every other listener
/// by the inventory's general port check (the units are in the plan).
pub fn validate(inventory: &Inventory) -> Check {
    let redis = &inventory.redis;
    let known = |entry: &str, machine: &str| match inventory.machine(machine) {
        Some(_) => Ok(()),
        None => fail(
            entry,
            format!("machine `{machine}` is not in the inventory's [[machines]]"),
        ),
    };
    let mut seen = std::collections::BTreeSet::from([redis.machine.as_str()]);
    for machine in &redis.replicas {
        known("redis.replicas", machine)?;
        if !seen.insert(machine) {
            return fail(
                "redis.replicas",
                format!(
                    "machine `{machine}` already runs a Redis of this inventory (the master or another replica)"
                ),
            );
        }
    }
    let Some(sentinel) = &redis.sentinel else {
        if !redis.replicas.is_empty() {
            return fail(
                "redis.replicas",
                "replicas need `sentinel = { ... }`: without sentinels nothing promotes one when the master fails".into(),
            );
        }
        return Ok(());
    };
    let entry = "redis.sentinel";
    if redis.replicas.is_empty() {
        return fail(
            "redis.replicas",
            "Sentinel needs at least one replica to promote".into(),
        );
    }
    let mut seen = std::collections::BTreeSet::new();
    for machine in &sentinel.machines {
        known(entry, machine)?;
        if !seen.insert(machine) {
            return fail(entry, format!("machine `{machine}` is listed twice"));
        }
    }
    if sentinel.machines.len() < MIN_SENTINELS {
        return fail(
            entry,
            format!(
                "{} sentinel machine(s); at least {MIN_SENTINELS} are needed, so that losing one still leaves a majority to fail over",
                sentinel.machines.len()
            ),
        );
    }
    let quorum = sentinel.quorum();
    if quorum == 0 || quorum > sentinel.machines.len() {
        return fail(
            entry,
            format!(
                "quorum = {quorum} must be between 1 and the number of sentinels ({})",
                sentinel.machines.len()
            ),
        );
    }
    let name_ok = !sentinel.master.is_empty()
        && sentinel
            .master
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b"-_.".contains(&b));
    if !name_ok {
        return fail(
            entry,
            format!(
                "master = `{}` must be letters, digits, '-', '_' and '.'",
                sentinel.master
            ),
        );
    }
    if sentinel.down_after_ms < 100 {
        return fail(
            entry,
            "down_after_ms must be at least 100 (a master is not down after a hiccup)".into(),
        );
    }
    Ok(())
}

/// The address of machine `name` (validated: it exists).
fn address(inventory: &Inventory, name: &str) -> Ipv4Addr {
    inventory
        .machine(name)
        .map_or(Ipv4Addr::UNSPECIFIED, |m| m.address)
}

/// The first master's address.
pub fn first_master(inventory: &Inventory) -> SocketAddr {
    SocketAddr::from((
        address(inventory, &inventory.redis.machine),
        inventory.redis.port,
    ))
}

/// The sentinels' addresses as `ip:port,ip:port,...` (for the environment of those who ask them).
fn sentinel_list(inventory: &Inventory) -> String {
    sentinel_addrs(inventory)
        .iter()
        .map(SocketAddr::to_string)
        .collect::<Vec<_>>()
        .join(",")
}

/// The sentinels' addresses, in the inventory's order.
pub fn sentinel_addrs(inventory: &Inventory) -> Vec<SocketAddr> {
    inventory
        .redis
        .sentinel
        .iter()
        .flat_map(|s| {
            s.machines
                .iter()
                .map(|m| SocketAddr::from((address(inventory, m), s.port)))
        })
        .collect()
}

/// Arguments every data node gets on top of the single server's:
/// - replicas sync at once (no diskless-sync delay), so `up` and a rejoining old master don't
///   wait 5 s;
/// - a master takes writes only while at least one replica is linked and answered within the
///   last 5 s (`min-replicas-to-write 1`, `min-replicas-max-lag 5`). A master cut off from its
///   replicas (on the wrong side of a partition) refuses writes (`NOREPLICAS`, a 503 for the
///   user) instead of acknowledging writes that the promotion then discards. The price: with
///   every replica down, writes stop. It does not cover a dead master that restarts while the
///   sentinels fail it over: the replicas re-attach to it, so it has replicas. That case is the
///   start script's (`infra/src/deploy/rejoin.rs`): a restarted node rejoins as a replica.
const DATA_ARGS: [&str; 6] = [
    "--repl-diskless-sync-delay",
    "0",
    "--min-replicas-to-write",
    "1",
    "--min-replicas-max-lag",
    "5",
];

/// How long a failover may take before Sentinel gives it up and tries again, in ms.
fn failover_timeout_ms(sentinel: &RedisSentinel) -> u32 {
    (sentinel.down_after_ms * 10).max(5000)
}

/// The environment of a data node's start script (`infra/src/deploy/rejoin.rs`): a node that
/// restarts rejoins as a replica of the master the sentinels name, waiting up to three failover
/// timeouts for them to name one other than itself.
fn rejoin_env(
    inventory: &Inventory,
    sentinel: &RedisSentinel,
    listen: SocketAddr,
) -> Vec<(String, String)> {
    vec![
        (
            crate::deploy::rejoin::SENTINELS_ENV.into(),
            sentinel_list(inventory),
        ),
        ("HERD_REDIS_SENTINEL_MASTER".into(), sentinel.master.clone()),
        ("HERD_REDIS_SELF".into(), listen.to_string()),
        (
            "HERD_REDIS_REJOIN_WAIT".into(),
            (3 * failover_timeout_ms(sentinel))
                .div_ceil(1000)
                .to_string(),
        ),
    ]
}

/// Adds the Sentinel units to `units` (after the master, which `plan` put first) and the
/// master-following settings to the workers and gateways. No-op without `sentinel`.
pub fn extend_plan(inventory: &Inventory, units: &mut Vec<Unit>) {
    let Some(sentinel) = &inventory.redis.sentinel else {
        return;
    };
    let Some(index) = units.iter().position(|u| u.kind == Kind::Redis) else {
        return;
    };
    let template = units[index].clone();
    // A config file first, which the sentinels' `CONFIG REWRITE` keeps up to date with the
    // node's role: a node that restarts comes back as what it last was, not as the plan started
    // it (the command line's options would override the file, so `replicaof` is only in there).
    units[index].args.insert(0, DATA_CONF.into());
    units[index].args.extend(DATA_ARGS.map(String::from));
    let listen = units[index].listen;
    units[index]
        .env
        .extend(rejoin_env(inventory, sentinel, listen));
    let mut added = Vec::new();
    for machine in &inventory.redis.replicas {
        let listen = SocketAddr::from((address(inventory, machine), inventory.redis.port));
        let mut args: Vec<String> = template
            .args
            .iter()
            .map(|a| {
                if *a == template.listen.ip().to_string() {
                    listen.ip().to_string()
                } else {
                    a.clone()
                }
            })
            .collect();
        args.insert(0, DATA_CONF.into());
        args.extend(DATA_ARGS.map(String::from));
        added.push(Unit {
            name: "redis".into(),
            entry: "redis.replicas".into(),
            kind: Kind::Redis,
            machine: machine.clone(),
            id: format!("redis-{machine}"),
            listen,
            admin: None,
            peer: None,
            binary: template.binary.clone(),
            args,
            env: rejoin_env(inventory, sentinel, listen),
            config: None,
        });
    }
    for machine in &sentinel.machines {
        let listen = SocketAddr::from((address(inventory, machine), sentinel.port));
        added.push(Unit {
            name: SENTINEL_UNIT.into(),
            entry: "redis.sentinel".into(),
            kind: Kind::Redis,
            machine: machine.clone(),
            id: format!("sentinel-{machine}"),
            listen,
            admin: None,
            peer: None,
            binary: template.binary.clone(),
            // The config file comes first (redis-server's rule); herd writes it before the start
            // and the sentinel rewrites it as it learns. Relative to the machine's directory,
            // where both supervisors start units.
            args: vec![SENTINEL_CONF.into(), "--sentinel".into()],
            env: Vec::new(),
            config: None,
        });
    }
    units.splice(index + 1..index + 1, added);
    for unit in units.iter_mut() {
        let env = follow_env(inventory, unit.kind);
        // Before the inventory's own env, which was appended last and so still wins.
        let at = unit
            .env
            .iter()
            .position(|(k, _)| k.ends_with("REDIS__URL"))
            .map_or(unit.env.len(), |i| i + 1);
        unit.env.splice(at..at, env);
    }
}

/// The environment that makes a worker or gateway follow the master through the sentinels
/// (`HERD_WORKER_SENTINEL__ADDRS`, `..._MASTER`; `HERD_GATEWAY_...` for a gateway); empty
/// without Sentinel and for Redis units. For code that starts workers outside [`super::plan`]
/// (e.g. `herd scale`).
pub fn follow_env(inventory: &Inventory, kind: Kind) -> Vec<(String, String)> {
    let Some(sentinel) = &inventory.redis.sentinel else {
        return Vec::new();
    };
    let prefix = match kind {
        Kind::Worker => "HERD_WORKER",
        Kind::Gateway => "HERD_GATEWAY",
        Kind::Redis => return Vec::new(),
    };
    vec![
        (
            format!("{prefix}_SENTINEL__ADDRS"),
            sentinel_list(inventory),
        ),
        (
            format!("{prefix}_SENTINEL__MASTER"),
            sentinel.master.clone(),
        ),
    ]
}

/// A data node's config file, relative to its machine's directory: written by `herd up` (with
/// `replicaof` for a replica), then rewritten by the node when a sentinel changes its role.
pub const DATA_CONF: &str = "redis/redis.conf";

/// The config file herd writes for the data node `unit` at `up`: `replicaof` the first master
/// for a replica, nothing of its own for the master (its settings are on its command line).
pub fn data_conf(inventory: &Inventory, unit: &Unit) -> String {
    let mut text = String::from(
        "# Written by `herd up --inventory`; Redis rewrites it when Sentinel changes this node's role.\n",
    );
    if unit.entry == "redis.replicas" {
        let master = first_master(inventory);
        text.push_str(&format!("replicaof {} {}\n", master.ip(), master.port()));
    }
    text
}

/// The unit name of a sentinel on its machine.
pub const SENTINEL_UNIT: &str = "redis-sentinel";
/// A sentinel's config file, relative to its machine's directory.
pub const SENTINEL_CONF: &str = "redis/sentinel.conf";

/// The config file herd writes for the sentinel listening on `listen`.
pub fn sentinel_conf(inventory: &Inventory, listen: SocketAddr) -> Option<String> {
    let sentinel = inventory.redis.sentinel.as_ref()?;
    let master = first_master(inventory);
    let name = &sentinel.master;
    Some(format!(
        "# Written by `herd up --inventory`; the sentinel rewrites it as it learns.\n\
port {port}\n\
bind {ip}\n\
protected-mode no\n\
sentinel monitor {name} {mip} {mport} {quorum}\n\
sentinel down-after-milliseconds {name} {down}\n\
sentinel failover-timeout {name} {timeout}\n\
sentinel parallel-syncs {name} 1\n",
        port = listen.port(),
        ip = listen.ip(),
        mip = master.ip(),
        mport = master.port(),
        quorum = sentinel.quorum(),
        down = sentinel.down_after_ms,
        // A failover that stalls is given up and tried again after this.
        timeout = failover_timeout_ms(sentinel),
    ))
}

#[cfg(test)]
mod tests {
    use std::path::Path;

    use super::super::{parse, plan};
    use super::*;

    const BASE: &str = r#"
name = "t"
[[machines]]
name = "g1"
address = "10.9.0.1"
transport = "netns"
[[machines]]
name = "g2"
address = "10.9.0.2"
transport = "netns"
[[machines]]
name = "r1"
address = "10.9.0.11"
transport = "netns"
[[machines]]
name = "r2"
address = "10.9.0.12"
transport = "netns"
[[machines]]
name = "r3"
address = "10.9.0.13"
transport = "netns"
[gateways]
machines = ["g1", "g2"]
floating_address = "10.9.0.10"
[[images]]
name = "x"
per_machine = 1
machines = ["r1"]
[redis]
machine = "r1"
replicas = ["r2", "r3"]
sentinel = { master = "herd", machines = ["r1", "r2", "r3"] }
"#;

    fn check(text: &str) -> Result<Inventory, String> {
        let inventory = parse(Path::new("inv.toml"), text).map_err(|e| e.to_string())?;
        super::super::validate(&inventory).map_err(|(entry, problem)| {
            let line = format!("inv.toml: {entry}: {problem}");
            assert!(!line.contains('\n'), "one line: {line}");
            line
        })?;
        Ok(inventory)
    }

    fn bad(from: &str, to: &str) -> String {
        assert!(BASE.contains(from), "{from}");
        check(&BASE.replacen(from, to, 1)).unwrap_err()
    }

    #[test]
    fn the_plan_has_replicas_and_sentinels_and_everyone_follows_the_master() {
        let inventory = check(BASE).unwrap();
        let units = plan(&inventory, "tok");
        let redis: Vec<(&str, &str)> = units
            .iter()
            .filter(|u| u.kind == Kind::Redis)
            .map(|u| (u.name.as_str(), u.machine.as_str()))
            .collect();
        assert_eq!(
            redis,
            [
                ("redis", "r1"),
                ("redis", "r2"),
                ("redis", "r3"),
                ("redis-sentinel", "r1"),
                ("redis-sentinel", "r2"),
                ("redis-sentinel", "r3"),
            ]
        );
        let replica = &units[1];
        assert!(
            replica.args[0] == DATA_CONF && replica.args.join(" ").contains("--bind 10.9.0.12"),
            "{:?}",
            replica.args
        );
        assert!(!replica.args.contains(&"--replicaof".to_string()));
        assert!(data_conf(&inventory, replica).contains("\nreplicaof 10.9.0.11 6379\n"));
        assert!(!data_conf(&inventory, &units[0]).contains("replicaof"));
        assert_eq!(units[0].args[0], DATA_CONF);
        // Data nodes start through the start script that makes a restart rejoin as a replica;
        // sentinels, workers and gateways don't.
        for (unit, listen) in units[..3]
            .iter()
            .zip(["10.9.0.11", "10.9.0.12", "10.9.0.13"])
        {
            assert!(crate::deploy::rejoin::wraps(unit), "{}", unit.id);
            assert!(
                unit.env
                    .contains(&("HERD_REDIS_SELF".into(), format!("{listen}:6379")))
            );
            // Three failover timeouts: 10 × down_after_ms, at least 5 s.
            assert!(
                unit.env
                    .contains(&("HERD_REDIS_REJOIN_WAIT".into(), "60".into()))
            );
            assert!(unit.env.contains(&(
                "HERD_REDIS_SENTINELS".into(),
                "10.9.0.11:26379,10.9.0.12:26379,10.9.0.13:26379".into()
            )));
        }
        assert!(!units[3..].iter().any(crate::deploy::rejoin::wraps));
        for unit in units.iter().filter(|u| u.kind != Kind::Redis) {
            let prefix = if unit.kind == Kind::Worker {
                "HERD_WORKER"
            } else {
                "HERD_GATEWAY"
            };
            assert!(unit.env.contains(&(
                format!("{prefix}_SENTINEL__ADDRS"),
                "10.9.0.11:26379,10.9.0.12:26379,10.9.0.13:26379".into()
            )));
        }
        let conf = sentinel_conf(&inventory, units[4].listen).unwrap();
        assert!(
            conf.contains("sentinel monitor herd 10.9.0.11 6379 2\n"),
            "{conf}"
        );
        assert!(conf.contains("bind 10.9.0.12\n"), "{conf}");
    }

    #[test]
    fn bad_sentinel_settings_are_refused_naming_the_entry() {
        let error = bad(r#"["r1", "r2", "r3"] }"#, r#"["r1", "r2", "nope"] }"#);
        assert!(
            error.contains("redis.sentinel: machine `nope` is not in"),
            "{error}"
        );
        let error = bad(r#"["r1", "r2", "r3"] }"#, r#"["r1", "r2"] }"#);
        assert!(
            error.contains("redis.sentinel: 2 sentinel machine(s); at least 3"),
            "{error}"
        );
        let error = bad(
            r#"["r1", "r2", "r3"] }"#,
            r#"["r1", "r2", "r3"], quorum = 4 }"#,
        );
        assert!(
            error.contains("redis.sentinel: quorum = 4 must be between 1 and"),
            "{error}"
        );
        let error = bad(
            r#"["r1", "r2", "r3"] }"#,
            r#"["r1", "r2", "r3"], port = 6379 }"#,
        );
        assert!(
            error.contains("redis.sentinel: port clash on machine r1"),
            "{error}"
        );
        let error = bad(r#"replicas = ["r2", "r3"]"#, r#"replicas = ["r2", "zz"]"#);
        assert!(error.contains("redis.replicas: machine `zz`"), "{error}");
        let error = bad(r#"replicas = ["r2", "r3"]"#, r#"replicas = ["r2", "r1"]"#);
        assert!(
            error.contains("redis.replicas: machine `r1` already"),
            "{error}"
        );
        let error = bad(
            r#"sentinel = { master = "herd", machines = ["r1", "r2", "r3"] }"#,
            "",
        );
        assert!(error.contains("redis.replicas: replicas need"), "{error}");
        let error = bad(r#"{ master = "herd","#, r#"{ master = "herd", colour = 1,"#);
        assert!(error.contains("unknown field `colour`"), "{error}");
    }
}
