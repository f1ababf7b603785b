//! Where each process of an inventory goes: the [`Unit`]s, with their listeners, arguments and
//! environment. Pure: the same inventory (and admin token) always gives the same plan, which is
//! how `herd down` and `herd status` find what `herd up` started without a state file.

use std::net::{Ipv4Addr, SocketAddr};
use std::path::PathBuf;

use super::{Image, Inventory, Transport};

/// What a unit is.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, serde::Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Kind {
    /// The Redis server.
    Redis,
    /// A worker of an image.
    Worker,
    /// One gateway of the pair.
    Gateway,
}

/// One process to run on one machine.
#[derive(Debug, Clone, PartialEq)]
pub struct Unit {
    /// Its name on the machine (files, pid files): `redis`, `gateway-gw1`,
    /// `worker-demo-m1-1`.
    pub name: String,
    /// The inventory entry it comes from (for messages): `redis`, `gateways`, `images.demo`.
    pub entry: String,
    /// What it is.
    pub kind: Kind,
    /// The machine it runs on.
    pub machine: String,
    /// For workers: the id the registry, the gateway and responses (`x-herd-worker`) use.
    pub id: String,
    /// Its main listener.
    pub listen: SocketAddr,
    /// The gateway's admin and peer listeners.
    pub admin: Option<SocketAddr>,
    /// The gateway's peer link listener.
    pub peer: Option<SocketAddr>,
    /// The executable: a name (`herd-worker`, `redis-server`) or a path on this box.
    pub binary: String,
    /// Arguments.
    pub args: Vec<String>,
    /// Environment.
    pub env: Vec<(String, String)>,
    /// A config file on this box, copied and passed as `--config`.
    pub config: Option<PathBuf>,
}

impl Unit {
    /// Every listener, with its role.
    pub fn listeners(&self) -> Vec<(&'static str, SocketAddr)> {
        let mut all = vec![("public", self.listen)];
        all.extend(self.admin.map(|a| ("admin", a)));
        all.extend(self.peer.map(|a| ("peer", a)));
        all
    }
}

/// How many workers of `image` go on each of its machines, in its order: `per_machine` on
/// each, or `total` spread round-robin (the first machines get one more).
pub fn placement(image: &Image) -> Vec<(&str, u16)> {
    let machines = image.machines.len() as u16;
    image
        .machines
        .iter()
        .enumerate()
        .map(|(index, machine)| {
            let count = match (image.per_machine, image.total) {
                (Some(n), _) => n,
                (None, Some(total)) if machines > 0 => {
                    total / machines + u16::from((index as u16) < total % machines)
                }
                _ => 0,
            };
            (machine.as_str(), count)
        })
        .filter(|(_, count)| *count > 0)
        .collect()
}

/// Every unit of `inventory`, in start order: Redis, the workers, the gateways (preferred
/// first). `token` is the gateways' admin token.
pub fn plan(inventory: &Inventory, token: &str) -> Vec<Unit> {
    let address = |name: &str| {
        inventory
            .machine(name)
            .map_or(Ipv4Addr::UNSPECIFIED, |m| m.address)
    };
    let redis_addr = SocketAddr::from((address(&inventory.redis.machine), inventory.redis.port));
    let redis_url = format!("redis://{redis_addr}/0");
    let mut units = vec![Unit {
        name: "redis".into(),
        entry: "redis".into(),
        kind: Kind::Redis,
        machine: inventory.redis.machine.clone(),
        id: "redis".into(),
        listen: redis_addr,
        admin: None,
        peer: None,
        binary: "redis-server".into(),
        args: [
            "--port",
            &redis_addr.port().to_string(),
            "--bind",
            &redis_addr.ip().to_string(),
            // The cluster's other machines connect without a password on a private segment,
            // which protected mode would turn away.
            "--protected-mode",
            "no",
            "--appendonly",
            "yes",
            "--daemonize",
            "no",
        ]
        .map(String::from)
        .to_vec(),
        env: Vec::new(),
        config: None,
    }];
    for image in &inventory.images {
        for (machine, count) in placement(image) {
            for n in 1..=count {
                let id = format!("{}-{machine}-{n}", image.name);
                let listen = SocketAddr::from((address(machine), image.port + n - 1));
                let mut env = vec![
                    ("HERD_WORKER_ID".to_string(), id.clone()),
                    ("HERD_WORKER_MACHINE".into(), machine.to_string()),
                    ("HERD_WORKER_LISTEN".into(), listen.to_string()),
                    ("HERD_WORKER_REDIS__URL".into(), redis_url.clone()),
                    ("HERD_WORKER_REGISTRY__ENABLED".into(), "true".into()),
                ];
                env.extend(image.env.iter().map(|(k, v)| (k.clone(), v.clone())));
                let mut args = vec!["--log-format".to_string(), "json".to_string()];
                args.extend(image.args.iter().cloned());
                units.push(Unit {
                    name: format!("worker-{id}"),
                    entry: format!("images.{}", image.name),
                    kind: Kind::Worker,
                    machine: machine.to_string(),
                    id,
                    listen,
                    admin: None,
                    peer: None,
                    binary: image.binary.clone(),
                    args,
                    env,
                    config: image.config.clone(),
                });
            }
        }
    }
    let gateways = &inventory.gateways;
    let preferred = inventory.preferred_gateway();
    let mut pair: Vec<&String> = gateways.machines.iter().collect();
    pair.sort_by_key(|name| name.as_str() != preferred);
    for (index, machine) in pair.iter().enumerate() {
        let Some(entry) = inventory.machine(machine) else {
            continue;
        };
        let peer_name = pair.get(1 - index.min(1)).map_or("", |s| s.as_str());
        let own = entry.address;
        // With a floating address the public listener takes every address, so it serves the
        // floating one as soon as this gateway holds it.
        let public_ip = match gateways.floating_address {
            Some(_) => Ipv4Addr::UNSPECIFIED,
            None => own,
        };
        // The admin API stays on the machine's loopback unless the machine is this box's
        // loopback anyway; herd reaches it from the machine itself.
        let admin_ip = match entry.transport {
            Transport::Local => own,
            _ => Ipv4Addr::LOCALHOST,
        };
        let listen = SocketAddr::from((public_ip, gateways.port));
        let admin = SocketAddr::from((admin_ip, gateways.admin_port));
        let peer = SocketAddr::from((own, gateways.peer_port));
        let peer_of_peer = SocketAddr::from((address(peer_name), gateways.peer_port));
        let mut env = vec![
            ("HERD_GATEWAY_ID".to_string(), machine.to_string()),
            ("HERD_GATEWAY_LISTEN".into(), listen.to_string()),
            ("HERD_GATEWAY_ADMIN__LISTEN".into(), admin.to_string()),
            ("HERD_GATEWAY_ADMIN__TOKEN".into(), token.to_string()),
            ("HERD_GATEWAY_REGISTRY__ENABLED".into(), "true".into()),
            ("HERD_GATEWAY_REDIS__URL".into(), redis_url.clone()),
            ("HERD_GATEWAY_FAILOVER__ENABLED".into(), "true".into()),
            ("HERD_GATEWAY_FAILOVER__LISTEN".into(), peer.to_string()),
            (
                "HERD_GATEWAY_FAILOVER__PEER".into(),
                peer_of_peer.to_string(),
            ),
            (
                "HERD_GATEWAY_FAILOVER__PREFERRED".into(),
                (machine.as_str() == preferred).to_string(),
            ),
            (
                "HERD_GATEWAY_FAILOVER__PREEMPT".into(),
                gateways.preempt.to_string(),
            ),
        ];
        if let Some(ip) = gateways.floating_address {
            env.extend([
                ("HERD_GATEWAY_FAILOVER__ADDRESS__IP".into(), ip.to_string()),
                (
                    "HERD_GATEWAY_FAILOVER__ADDRESS__INTERFACE".into(),
                    gateways.interface.clone(),
                ),
                (
                    "HERD_GATEWAY_FAILOVER__ADDRESS__PREFIX_LEN".into(),
                    gateways.prefix_len.to_string(),
                ),
            ]);
        }
        for (key, hook) in [
            ("HERD_GATEWAY_FAILOVER__ON_ACTIVE", &gateways.on_active),
            ("HERD_GATEWAY_FAILOVER__ON_STANDBY", &gateways.on_standby),
        ] {
            if let Some(hook) = hook {
                env.push((key.into(), hook.clone()));
            }
        }
        env.extend(gateways.env.iter().map(|(k, v)| (k.clone(), v.clone())));
        units.push(Unit {
            name: format!("gateway-{machine}"),
            entry: "gateways".into(),
            kind: Kind::Gateway,
            machine: machine.to_string(),
            id: machine.to_string(),
            listen,
            admin: Some(admin),
            peer: Some(peer),
            binary: gateways.binary.clone(),
            args: vec!["--log-format".into(), "json".into()],
            env,
            config: None,
        });
    }
    super::sentinel::extend_plan(inventory, &mut units);
    units
}

#[cfg(test)]
mod tests {
    use std::path::Path;

    use super::super::parse;
    use super::*;

    fn inventory(images: &str) -> Inventory {
        let text = format!(
            r#"
name = "t"
[[machines]]
name = "a"
address = "10.9.0.1"
transport = "netns"
[[machines]]
name = "b"
address = "10.9.0.2"
transport = "netns"
[[machines]]
name = "c"
address = "10.9.0.3"
transport = "netns"
[redis]
machine = "c"
[gateways]
machines = ["a", "b"]
preferred = "b"
floating_address = "10.9.0.10"
{images}
"#
        );
        parse(Path::new("t.toml"), &text).unwrap()
    }

    #[test]
    fn total_is_spread_round_robin_and_per_machine_is_exact() {
        let inv = inventory(
            "[[images]]\nname = \"x\"\ntotal = 5\nmachines = [\"a\", \"b\", \"c\"]\n\
             [[images]]\nname = \"y\"\nper_machine = 2\nport = 9000\nmachines = [\"c\"]",
        );
        assert_eq!(placement(&inv.images[0]), [("a", 2), ("b", 2), ("c", 1)]);
        assert_eq!(placement(&inv.images[1]), [("c", 2)]);
        let units = plan(&inv, "tok");
        let names: Vec<&str> = units.iter().map(|u| u.name.as_str()).collect();
        assert_eq!(
            names,
            [
                "redis",
                "worker-x-a-1",
                "worker-x-a-2",
                "worker-x-b-1",
                "worker-x-b-2",
                "worker-x-c-1",
                "worker-y-c-1",
                "worker-y-c-2",
                "gateway-b",
                "gateway-a",
            ],
            "preferred gateway first"
        );
        let y2 = &units[7];
        assert_eq!(y2.listen, "10.9.0.3:9001".parse().unwrap());
        assert!(y2.env.contains(&("HERD_WORKER_ID".into(), "y-c-2".into())));
        assert!(y2.env.contains(&(
            "HERD_WORKER_REDIS__URL".into(),
            "redis://10.9.0.3:6379/0".into()
        )));
    }

    #[test]
    fn gateways_point_at_each_other_and_hold_the_floating_address() {
        let units = plan(&inventory(""), "tok");
        let b = units.iter().find(|u| u.name == "gateway-b").unwrap();
        let env = |key: &str| {
            b.env
                .iter()
                .find(|(k, _)| k == key)
                .map(|(_, v)| v.as_str())
        };
        assert_eq!(env("HERD_GATEWAY_FAILOVER__PEER"), Some("10.9.0.1:7946"));
        assert_eq!(env("HERD_GATEWAY_FAILOVER__LISTEN"), Some("10.9.0.2:7946"));
        assert_eq!(env("HERD_GATEWAY_FAILOVER__PREFERRED"), Some("true"));
        assert_eq!(env("HERD_GATEWAY_FAILOVER__ADDRESS__IP"), Some("10.9.0.10"));
        assert_eq!(env("HERD_GATEWAY_ADMIN__TOKEN"), Some("tok"));
        assert_eq!(b.listen, "0.0.0.0:8080".parse().unwrap());
        assert_eq!(b.admin, Some("127.0.0.1:9090".parse().unwrap()));
    }
}
