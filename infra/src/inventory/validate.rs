//! The checks an inventory must pass before anything starts: names, references to machines,
//! the gateway pair, placements that fit, and no two listeners on one port of one machine.
//! Each failure is `(entry, problem)`; [`super::load`] adds the file's name.

use std::collections::{BTreeMap, BTreeSet};
use std::net::{IpAddr, Ipv4Addr, SocketAddr};

use super::{Inventory, Transport, plan};

type Check = Result<(), (String, String)>;

fn fail(entry: impl Into<String>, problem: impl Into<String>) -> Check {
    Err((entry.into(), problem.into()))
}

/// Checks `inventory`; the first problem found is returned as `(entry, problem)`.
pub fn validate(inventory: &Inventory) -> Check {
    names(inventory)?;
    machines(inventory)?;
    references(inventory)?;
    gateways(inventory)?;
    images(inventory)?;
    capacity(inventory)?;
    super::tls::validate(inventory)?;
    super::sentinel::validate(inventory)?;
    ports(inventory)
}

fn is_name(name: &str, max: usize) -> bool {
    !name.is_empty()
        && name.len() <= max
        && name
            .bytes()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-')
        && !name.starts_with('-')
}

fn names(inventory: &Inventory) -> Check {
    if !is_name(&inventory.name, 12) {
        return fail(
            "name",
            format!(
                "`{}` must be 1-12 characters of a-z, 0-9 and - (it becomes part of namespace and unit names)",
                inventory.name
            ),
        );
    }
    Ok(())
}

fn machines(inventory: &Inventory) -> Check {
    if inventory.machines.is_empty() {
        return fail("machines", "the inventory lists no [[machines]]");
    }
    let mut seen_names = BTreeSet::new();
    let mut seen_addrs = BTreeMap::new();
    let mut subnet: Option<(String, [u8; 3])> = None;
    for machine in &inventory.machines {
        let entry = format!("machines.{}", machine.name);
        if !is_name(&machine.name, 15) {
            return fail(
                format!("machines.`{}`", machine.name),
                "a machine name must be 1-15 characters of a-z, 0-9 and -",
            );
        }
        if !seen_names.insert(&machine.name) {
            return fail(entry, "a second machine with this name");
        }
        if let Some(other) = seen_addrs.insert(machine.address, &machine.name) {
            return fail(
                entry,
                format!(
                    "address {} is machine {other}'s address too",
                    machine.address
                ),
            );
        }
        if machine.ssh_host.is_some() && machine.transport != Transport::Ssh {
            return fail(entry, "ssh_host is only for transport = \"ssh\"");
        }
        match machine.transport {
            Transport::Local if !machine.address.is_loopback() => {
                return fail(
                    entry,
                    format!(
                        "a local machine's address must be a loopback address (127.x.y.z), not {}",
                        machine.address
                    ),
                );
            }
            Transport::Netns => {
                let [a, b, c, d] = machine.address.octets();
                if d == 0 || d == 255 || machine.address.is_loopback() {
                    return fail(
                        entry,
                        format!("{} can't be a host address on a /24", machine.address),
                    );
                }
                match &subnet {
                    None => subnet = Some((machine.name.clone(), [a, b, c])),
                    Some((first, prefix)) if *prefix != [a, b, c] => {
                        return fail(
                            entry,
                            format!(
                                "netns machines share one /24 segment: {} is not in machine {first}'s {}.{}.{}.0/24",
                                machine.address, prefix[0], prefix[1], prefix[2]
                            ),
                        );
                    }
                    Some(_) => {}
                }
            }
            _ => {}
        }
    }
    Ok(())
}

fn known(inventory: &Inventory, entry: &str, machine: &str) -> Check {
    if inventory.machine(machine).is_none() {
        return fail(
            entry,
            format!("machine `{machine}` is not in the inventory's [[machines]]"),
        );
    }
    Ok(())
}

fn references(inventory: &Inventory) -> Check {
    known(inventory, "redis", &inventory.redis.machine)?;
    for machine in &inventory.gateways.machines {
        known(inventory, "gateways", machine)?;
    }
    for image in &inventory.images {
        for machine in &image.machines {
            known(inventory, &format!("images.{}", image.name), machine)?;
        }
    }
    Ok(())
}

fn gateways(inventory: &Inventory) -> Check {
    let gateways = &inventory.gateways;
    if gateways.machines.len() != 2 || gateways.machines[0] == gateways.machines[1] {
        return fail(
            "gateways",
            format!(
                "machines must name two different machines (the active / standby pair), not {:?}",
                gateways.machines
            ),
        );
    }
    if let Some(preferred) = &gateways.preferred
        && !gateways.machines.contains(preferred)
    {
        return fail(
            "gateways",
            format!("preferred = `{preferred}` is not one of the pair's machines"),
        );
    }
    match gateways.floating_address {
        None if gateways.on_active.is_none() => {
            return fail(
                "gateways",
                "set floating_address (the address the active holds) or on_active (a hook that moves it)",
            );
        }
        Some(ip) => {
            if let Some(holder) = inventory.machines.iter().find(|m| m.address == ip) {
                return fail(
                    "gateways",
                    format!(
                        "floating_address {ip} is machine {}'s own address",
                        holder.name
                    ),
                );
            }
            for name in &gateways.machines {
                let machine = inventory.machine(name).expect("checked above");
                match machine.transport {
                    Transport::Local => {
                        return fail(
                            "gateways",
                            format!(
                                "floating_address needs netns or ssh gateway machines; {name} is local (use on_active hooks instead)"
                            ),
                        );
                    }
                    Transport::Netns if machine.address.octets()[..3] != ip.octets()[..3] => {
                        return fail(
                            "gateways",
                            format!(
                                "floating_address {ip} is not on the netns segment of {name} ({})",
                                machine.address
                            ),
                        );
                    }
                    _ => {}
                }
            }
        }
        None => {}
    }
    if !(1..=32).contains(&gateways.prefix_len) {
        return fail("gateways", "prefix_len must be between 1 and 32");
    }
    for (key, value) in &gateways.env {
        if !key.starts_with("HERD_GATEWAY_") {
            return fail(
                "gateways.env",
                format!("`{key}` is not a gateway setting (they start with HERD_GATEWAY_)"),
            );
        }
        env_value("gateways.env", key, value)?;
    }
    for (name, hook) in [
        ("on_active", &gateways.on_active),
        ("on_standby", &gateways.on_standby),
    ] {
        if let Some(hook) = hook {
            env_value("gateways", name, hook)?;
        }
    }
    Ok(())
}

/// Values go into environment files read by both systemd and `sh`; the one quoting both read
/// alike is single quotes without a quote or newline inside.
fn env_value(entry: &str, key: &str, value: &str) -> Check {
    if value.contains('\'') || value.contains('\n') {
        return fail(
            entry,
            format!("{key}: a value may not contain a single quote or a newline"),
        );
    }
    Ok(())
}

fn images(inventory: &Inventory) -> Check {
    let mut seen = BTreeSet::new();
    for image in &inventory.images {
        let entry = format!("images.{}", image.name);
        if !is_name(&image.name, 20) {
            return fail(
                format!("images.`{}`", image.name),
                "an image name must be 1-20 characters of a-z, 0-9 and -",
            );
        }
        if !seen.insert(&image.name) {
            return fail(entry, "a second image with this name");
        }
        if image.machines.is_empty() {
            return fail(entry, "machines is empty: nowhere to place its workers");
        }
        let distinct: BTreeSet<_> = image.machines.iter().collect();
        if distinct.len() != image.machines.len() {
            return fail(entry, "a machine is listed twice in machines");
        }
        match (image.per_machine, image.total) {
            (Some(_), Some(_)) | (None, None) => {
                return fail(entry, "set exactly one of per_machine and total");
            }
            (Some(0), _) | (_, Some(0)) => {
                return fail(entry, "a count of 0 workers: remove the image instead");
            }
            _ => {}
        }
        if image.binary.is_empty() {
            return fail(entry, "binary is empty");
        }
        if let Some(config) = &image.config
            && !config.is_file()
        {
            return fail(
                entry,
                format!("config file {} does not exist", config.display()),
            );
        }
        for (key, value) in &image.env {
            env_value(&entry, key, value)?;
        }
        let most = plan::placement(image)
            .iter()
            .map(|(_, count)| *count)
            .max()
            .unwrap_or(0);
        if u32::from(image.port) + u32::from(most) > 65_536 || image.port == 0 {
            return fail(
                entry,
                format!(
                    "ports {}..{} don't fit below 65536 (port 0 is not allowed either)",
                    image.port,
                    u32::from(image.port) + u32::from(most)
                ),
            );
        }
    }
    Ok(())
}

fn capacity(inventory: &Inventory) -> Check {
    let mut placed: BTreeMap<&str, Vec<(&str, u16)>> = BTreeMap::new();
    for image in &inventory.images {
        for (machine, count) in plan::placement(image) {
            placed
                .entry(machine)
                .or_default()
                .push((image.name.as_str(), count));
        }
    }
    for (name, images) in placed {
        let machine = inventory.machine(name).expect("checked above");
        let total: u32 = images.iter().map(|(_, count)| u32::from(*count)).sum();
        if total > u32::from(machine.max_workers) {
            let list = images
                .iter()
                .map(|(image, count)| format!("{image} {count}"))
                .collect::<Vec<_>>()
                .join(", ");
            return fail(
                format!("machines.{name}"),
                format!(
                    "placement doesn't fit: {total} workers ({list}) but max_workers = {}",
                    machine.max_workers
                ),
            );
        }
    }
    Ok(())
}

/// Two listeners clash when they are in one network stack (every local machine shares this
/// box's; each netns or ssh machine has its own), on one port, and on the same address or one
/// of them on every address (0.0.0.0).
fn ports(inventory: &Inventory) -> Check {
    listeners(inventory, &plan(inventory, ""))
}

/// The port rule of [`validate`] over any set of units of `inventory` (`herd scale` checks the
/// units it is about to add with the ones that run); `Err((entry, problem))` on a clash.
pub fn listeners(inventory: &Inventory, units: &[super::Unit]) -> Check {
    let mut seen: Vec<(String, SocketAddr, String)> = Vec::new();
    for unit in units {
        let machine = inventory.machine(&unit.machine).expect("checked above");
        let stack = match machine.transport {
            Transport::Local => "this box".to_string(),
            _ => machine.name.clone(),
        };
        let mut listeners = unit.listeners();
        listeners.extend(super::tls_listener(inventory, unit).map(|a| ("https", a)));
        for (role, addr) in listeners {
            let what = format!("{} {role} {addr}", unit.name);
            if addr.port() == 0 {
                return fail(unit.entry.clone(), format!("{what}: port 0 is not allowed"));
            }
            let clash = seen.iter().find(|(other_stack, other, _)| {
                *other_stack == stack
                    && other.port() == addr.port()
                    && (other.ip() == addr.ip()
                        || other.ip() == IpAddr::V4(Ipv4Addr::UNSPECIFIED)
                        || addr.ip() == IpAddr::V4(Ipv4Addr::UNSPECIFIED))
            });
            if let Some((_, _, other)) = clash {
                return fail(
                    unit.entry.clone(),
                    format!("port clash on machine {}: {what} and {other}", machine.name),
                );
            }
            seen.push((stack.clone(), addr, what));
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use std::path::Path;

    use super::super::{InventoryError, parse};
    use super::*;

    const GOOD: &str = r#"
name = "lab"

[[machines]]
name = "gw1"
address = "10.77.0.11"
transport = "netns"

[[machines]]
name = "gw2"
address = "10.77.0.12"
transport = "netns"

[[machines]]
name = "m1"
address = "10.77.0.21"
transport = "netns"
max_workers = 4

[[machines]]
name = "m2"
address = "10.77.0.22"
transport = "netns"

[redis]
machine = "m2"

[gateways]
machines = ["gw1", "gw2"]
floating_address = "10.77.0.10"

[[images]]
name = "demo"
per_machine = 2
machines = ["m1", "m2"]
"#;

    fn check(text: &str) -> Result<Inventory, String> {
        let inventory = parse(Path::new("inv.toml"), text).map_err(|e| e.to_string())?;
        validate(&inventory).map_err(|(entry, problem)| format!("inv.toml: {entry}: {problem}"))?;
        Ok(inventory)
    }

    /// `GOOD` with `from` replaced by `to` (which must change something).
    fn bad(from: &str, to: &str) -> String {
        assert!(GOOD.contains(from), "{from}");
        let error = check(&GOOD.replacen(from, to, 1)).unwrap_err();
        assert!(!error.contains('\n'), "one line: {error}");
        error
    }

    #[test]
    fn the_good_inventory_passes_with_defaults() {
        let inventory = check(GOOD).unwrap();
        assert_eq!(inventory.redis.port, 6379);
        assert_eq!(inventory.gateways.port, 8080);
        assert_eq!(inventory.preferred_gateway(), "gw1");
        assert_eq!(inventory.machine("m2").unwrap().max_workers, 64);
        assert_eq!(inventory.images[0].binary, "herd-worker");
    }

    #[test]
    fn an_unknown_key_is_refused_with_its_line_and_table() {
        let error = bad(
            "transport = \"netns\"\nmax_workers",
            "transprt = \"netns\"\nmax_workers",
        );
        assert!(
            error.starts_with("inv.toml:17: [[machines]]: unknown field `transprt`"),
            "{error}"
        );
        let error = bad("floating_address", "floating_adress");
        assert!(
            error.contains("[gateways]") && error.contains("floating_adress"),
            "{error}"
        );
        let error = bad("name = \"lab\"", "name = \"lab\"\ncolour = 1");
        assert!(
            error.contains("top level: unknown field `colour`"),
            "{error}"
        );
        let error = bad("transport = \"netns\"", "transport = \"telnet\"");
        assert!(error.contains("unknown variant `telnet`"), "{error}");
    }

    #[test]
    fn an_unknown_machine_is_refused_naming_the_entry() {
        let error = bad("machines = [\"m1\", \"m2\"]", "machines = [\"m1\", \"m9\"]");
        assert_eq!(
            error,
            "inv.toml: images.demo: machine `m9` is not in the inventory's [[machines]]"
        );
        let error = bad("machine = \"m2\"", "machine = \"db\"");
        assert!(
            error.starts_with("inv.toml: redis: machine `db`"),
            "{error}"
        );
        let error = bad("[\"gw1\", \"gw2\"]", "[\"gw1\", \"gw3\"]");
        assert!(
            error.starts_with("inv.toml: gateways: machine `gw3`"),
            "{error}"
        );
    }

    #[test]
    fn a_port_clash_is_refused_naming_both_listeners() {
        // Redis on m2 at 8082 and the second demo worker on m2 at 8082.
        let error = bad("machine = \"m2\"", "machine = \"m2\"\nport = 8082");
        assert_eq!(
            error,
            "inv.toml: images.demo: port clash on machine m2: worker-demo-m2-2 public 10.77.0.22:8082 and redis public 10.77.0.22:8082"
        );
        // The public listener on 0.0.0.0 (floating address) clashes with anything on its port.
        let error = bad(
            "machines = [\"m1\", \"m2\"]",
            "machines = [\"m1\", \"gw1\"]\nport = 8080",
        );
        assert!(error.contains("port clash on machine gw1"), "{error}");
        assert!(error.contains("gateway-gw1 public 0.0.0.0:8080"), "{error}");
        // Two images on one machine with overlapping port ranges.
        let error = bad(
            "machines = [\"m1\", \"m2\"]",
            "machines = [\"m1\", \"m2\"]\n[[images]]\nname = \"api\"\nport = 8082\ntotal = 1\nmachines = [\"m1\"]",
        );
        assert!(
            error.starts_with("inv.toml: images.api: port clash on machine m1"),
            "{error}"
        );
        let error = bad(
            "floating_address = \"10.77.0.10\"",
            "floating_address = \"10.77.0.10\"\nport = 7946",
        );
        assert!(error.contains("port clash on machine gw1"), "{error}");
    }

    #[test]
    fn local_machines_share_one_port_space_by_address() {
        let local = r#"
name = "dev"
[[machines]]
name = "a"
address = "127.0.0.1"
transport = "local"
[[machines]]
name = "b"
address = "127.0.0.2"
transport = "local"
[redis]
machine = "a"
port = 6400
[gateways]
machines = ["a", "b"]
on_active = "true"
[[images]]
name = "demo"
per_machine = 1
machines = ["a", "b"]
"#;
        check(local).unwrap();
        let error = check(&local.replace("127.0.0.2", "127.0.0.1")).unwrap_err();
        assert!(
            error.contains("machines.b: address 127.0.0.1 is machine a's"),
            "{error}"
        );
        let error = check(&local.replace("port = 6400", "port = 8081")).unwrap_err();
        assert!(
            error.contains("images.demo: port clash on machine a"),
            "{error}"
        );
        let error = check(&local.replace("127.0.0.2", "10.0.0.2")).unwrap_err();
        assert!(
            error.contains("machines.b: a local machine's address must be a loopback"),
            "{error}"
        );
    }

    #[test]
    fn a_placement_that_does_not_fit_is_refused() {
        let error = bad("per_machine = 2", "per_machine = 5");
        assert_eq!(
            error,
            "inv.toml: machines.m1: placement doesn't fit: 5 workers (demo 5) but max_workers = 4"
        );
        let error = bad("per_machine = 2", "total = 9");
        assert!(
            error.contains("machines.m1: placement doesn't fit: 5 workers"),
            "{error}"
        );
        let error = bad("per_machine = 2", "per_machine = 2\ntotal = 3");
        assert!(
            error.ends_with("images.demo: set exactly one of per_machine and total"),
            "{error}"
        );
        let error = bad("per_machine = 2", "per_machine = 0");
        assert!(error.contains("images.demo: a count of 0"), "{error}");
        let error = bad("machines = [\"m1\", \"m2\"]", "machines = []");
        assert!(error.contains("images.demo: machines is empty"), "{error}");
        let error = bad("per_machine = 2", "per_machine = 2\nport = 65535");
        assert!(error.contains("images.demo: ports 65535..65537"), "{error}");
    }

    #[test]
    fn the_gateway_pair_must_be_two_machines_with_a_way_to_move_the_address() {
        let error = bad("[\"gw1\", \"gw2\"]", "[\"gw1\", \"gw1\"]");
        assert!(
            error.contains("gateways: machines must name two different machines"),
            "{error}"
        );
        let error = bad(
            "[\"gw1\", \"gw2\"]",
            "[\"gw1\", \"gw2\"]\npreferred = \"m1\"",
        );
        assert!(error.contains("preferred = `m1` is not one of"), "{error}");
        let error = bad("floating_address = \"10.77.0.10\"", "");
        assert!(error.contains("gateways: set floating_address"), "{error}");
        let error = bad("\"10.77.0.10\"", "\"10.77.0.11\"");
        assert!(error.contains("is machine gw1's own address"), "{error}");
        let error = bad("\"10.77.0.10\"", "\"10.78.0.10\"");
        assert!(error.contains("not on the netns segment of gw1"), "{error}");
        let error = bad(
            "machines = [\"gw1\", \"gw2\"]",
            "machines = [\"gw1\", \"gw2\"]\nenv = { RUST_LOG = \"x\" }",
        );
        assert!(
            error.contains("gateways.env: `RUST_LOG` is not a gateway setting"),
            "{error}"
        );
    }

    #[test]
    fn names_and_addresses_are_checked() {
        let error = bad("name = \"lab\"", "name = \"Lab Cluster\"");
        assert!(
            error.starts_with("inv.toml: name: `Lab Cluster` must be"),
            "{error}"
        );
        let error = bad("name = \"m2\"", "name = \"m1\"");
        assert!(
            error.contains("machines.m1: a second machine with this name"),
            "{error}"
        );
        let error = bad("10.77.0.22", "10.78.0.22");
        assert!(
            error.contains("machines.m2: netns machines share one /24 segment"),
            "{error}"
        );
        let error = bad("10.77.0.22", "10.77.0.21");
        assert!(
            error.contains("machines.m2: address 10.77.0.21 is machine m1's address too"),
            "{error}"
        );
        let error = bad("name = \"m2\"", "name = \"m2\"\nssh_host = \"x\"");
        assert!(
            error.contains("machines.m2: ssh_host is only for"),
            "{error}"
        );
        let error = bad("per_machine = 2", "per_machine = 2\nenv = { A = \"it's\" }");
        assert!(
            error.contains("images.demo: A: a value may not contain a single quote"),
            "{error}"
        );
        let error = bad(
            "per_machine = 2",
            "per_machine = 2\nconfig = \"/nonexistent/w.toml\"",
        );
        assert!(
            error.contains("config file /nonexistent/w.toml does not exist"),
            "{error}"
        );
    }

    #[test]
    fn load_reports_a_missing_file_and_makes_paths_absolute() {
        let dir = tempfile::tempdir().unwrap();
        let missing = super::super::load(&dir.path().join("nope.toml")).unwrap_err();
        assert!(matches!(missing, InventoryError::Read { .. }), "{missing}");
        std::fs::write(dir.path().join("w.toml"), "").unwrap();
        let file = dir.path().join("inv.toml");
        std::fs::write(
            &file,
            GOOD.replace("per_machine = 2", "per_machine = 2\nconfig = \"w.toml\""),
        )
        .unwrap();
        let inventory = super::super::load(&file).unwrap();
        assert_eq!(
            inventory.images[0].config.as_deref(),
            Some(dir.path().join("w.toml").as_path())
        );
    }
}
