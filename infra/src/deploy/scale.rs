//! `herd scale` and `herd rollout` over an inventory's machines.
//!
//! The inventory says how many workers of an image run where; `scale` and `rollout` change
//! that on the running cluster. What they changed is recorded **on each machine**, in
//! `{dir}/etc/workers.json` ([`Record`]: per image, the worker slots there, in start order, with
//! the executable and environment a rollout gave them). `herd status` and `herd down` read the
//! records ([`units`]), so they see scaled workers from the inventory file alone, like the rest
//! of the cluster; `down` removes the records (the next `up` starts from the inventory again).
//! A machine without a record for an image runs what the plan says.
//!
//! A worker is `{image}-{machine}-{n}` on a port of its own. A new worker takes the next
//! number on its machine (one past the highest there: a replacement never reuses the id of the
//! worker it replaces, which the gateway's per-worker counters would mix up) and the smallest
//! free port from `image.port` up, so a machine's ports stay in `image.port ..` the most workers
//! it ever ran at once; both are checked against every other listener with the inventory's port
//! rule ([`crate::inventory::listeners`]) and against the machine's `max_workers` before
//! anything starts.
//!
//! Scale up: new workers go to the image's machine with the fewest of its workers (or the one
//! `--on` names), are started under the machine's supervisor, and the command returns once the
//! active gateway (asked on its machine, like `up`) sends every new worker traffic; a new worker
//! that exits or is not taking traffic in time is stopped again and the record put back. Scale
//! down: the newest workers of the machine with the most go first; each leaves the record, then
//! is drained and stopped (SIGTERM: it announces `draining`, the gateway sends it nothing new, it
//! exits once its requests are done). Rollout: one batch at a time, a replacement beside each
//! old worker on the same machine, wait for traffic, drain the old; a failed batch is stopped
//! and the batches already done are rolled back the same way.

use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use serde::{Deserialize, Serialize};

use super::{DeployError, Machines, Options, TAIL, admin, connect, launch, write_unit};
use crate::inventory::{self, Image, Inventory, Kind, Transport, Unit, plan};
use crate::machine::{Machine, quote};

/// A machine's record, relative to its herd directory.
const RECORD: &str = "etc/workers.json";
/// How often the active gateway is asked while waiting for new workers.
const POLL: Duration = Duration::from_millis(100);

/// One worker herd runs on a machine.
#[derive(Debug, Clone, PartialEq, Eq, Default, Serialize, Deserialize)]
pub struct Slot {
    /// Its number: id `{image}-{machine}-{n}`.
    pub n: u16,
    /// Its port (the plan's workers: `image.port + n - 1`).
    pub port: u16,
    /// The executable a rollout gave it (a path on this box); none: the image's.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub binary: Option<String>,
    /// Environment a rollout put on top of the image's.
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub env: BTreeMap<String, String>,
}

/// A machine's record: for each image `scale` or `rollout` changed there, its workers in start
/// order (newest last).
pub type Record = BTreeMap<String, Vec<Slot>>;

/// The records of every machine that answers (a machine without one, or unreachable, has none).
fn records(inventory: &Inventory, machines: &Machines) -> BTreeMap<String, Record> {
    let mut all = BTreeMap::new();
    for entry in &inventory.machines {
        let Some(machine) = machines.get(&entry.name) else {
            continue;
        };
        let path = quote(&format!("{}/{RECORD}", machine.dir()));
        let Ok(text) = machine.run(&format!("cat {path} 2>/dev/null || true")) else {
            continue;
        };
        if let Ok(record) = serde_json::from_str::<Record>(text.trim()) {
            all.insert(entry.name.clone(), record);
        }
    }
    all
}

/// Every unit of the running cluster: the plan, with the workers of each image on each machine
/// replaced by what the machine's record says, where it has one.
pub fn units(inventory: &Inventory, token: &str, machines: &Machines) -> Vec<Unit> {
    units_with(inventory, token, &records(inventory, machines))
}

fn units_with(inventory: &Inventory, token: &str, records: &BTreeMap<String, Record>) -> Vec<Unit> {
    let recorded = |unit: &Unit| {
        unit.kind == Kind::Worker
            && records
                .get(&unit.machine)
                .is_some_and(|record| record.contains_key(unit.entry.trim_start_matches("images.")))
    };
    let mut units: Vec<Unit> = plan(inventory, token)
        .into_iter()
        .filter(|u| !recorded(u))
        .collect();
    let at = units
        .iter()
        .position(|u| u.kind == Kind::Gateway)
        .unwrap_or(units.len());
    let mut added = Vec::new();
    for (machine, record) in records {
        for (name, slots) in record {
            let Some(image) = inventory.images.iter().find(|i| &i.name == name) else {
                continue;
            };
            added.extend(
                slots
                    .iter()
                    .map(|slot| slot_unit(inventory, image, machine, slot)),
            );
        }
    }
    units.splice(at..at, added);
    units
}

/// The worker unit of `slot` on `machine`: the plan's worker for the image there, with the
/// slot's id, port, executable and environment.
fn slot_unit(inventory: &Inventory, image: &Image, machine: &str, slot: &Slot) -> Unit {
    // The plan builds a worker's environment (Redis, registry, machine); plan one worker of
    // the image on this machine and renumber it, so the two never disagree.
    let mut single = inventory.clone();
    single.images = vec![Image {
        per_machine: Some(1),
        total: None,
        machines: vec![machine.to_string()],
        ..image.clone()
    }];
    let mut unit = plan(&single, "")
        .into_iter()
        .find(|u| u.kind == Kind::Worker)
        .expect("one worker planned");
    let id = format!("{}-{machine}-{}", image.name, slot.n);
    unit.listen.set_port(slot.port);
    set(&mut unit.env, "HERD_WORKER_ID", &id);
    set(
        &mut unit.env,
        "HERD_WORKER_LISTEN",
        &unit.listen.to_string(),
    );
    for (key, value) in &slot.env {
        set(&mut unit.env, key, value);
    }
    if let Some(binary) = &slot.binary {
        unit.binary = binary.clone();
    }
    unit.name = format!("worker-{id}");
    unit.id = id;
    unit
}

fn set(env: &mut Vec<(String, String)>, key: &str, value: &str) {
    match env.iter_mut().find(|(k, _)| k == key) {
        Some(entry) => entry.1 = value.to_string(),
        None => env.push((key.to_string(), value.to_string())),
    }
}

/// Removes every machine's record (`down`), so the next `up` starts from the inventory.
pub fn forget(machine: &dyn Machine) {
    let _ = machine.run(&format!(
        "rm -f {}",
        quote(&format!("{}/{RECORD}", machine.dir()))
    ));
}

/// What `scale` and `rollout` need while they change one image.
struct Change<'a> {
    inventory: &'a Inventory,
    image: &'a Image,
    machines: Machines,
    /// The records, as written so far.
    records: BTreeMap<String, Record>,
    /// Machines whose directory this change has made sure of (`up` prepares only the
    /// machines its plan uses; `--on` or a spread may pick another).
    prepared: BTreeSet<String>,
    timeout: Duration,
    say: &'a mut dyn FnMut(String),
}

impl<'a> Change<'a> {
    fn new(
        inventory: &'a Inventory,
        options: &Options,
        image: &str,
        timeout: Duration,
        say: &'a mut dyn FnMut(String),
    ) -> Result<Self, DeployError> {
        let image = inventory
            .images
            .iter()
            .find(|i| i.name == image)
            .ok_or_else(|| {
                DeployError::Change(format!(
                    "no image {image:?} in the inventory (it has: {})",
                    names(inventory.images.iter().map(|i| i.name.as_str()))
                ))
            })?;
        let machines = connect(inventory, options);
        if let Some(name) = inventory
            .machines
            .iter()
            .find(|m| machines.get(&m.name).is_none())
        {
            return Err(DeployError::Change(format!(
                "machine {} has no network namespace: is the cluster up? (`herd up --inventory FILE`)",
                name.name
            )));
        }
        let records = records(inventory, &machines);
        Ok(Change {
            inventory,
            image,
            machines,
            records,
            prepared: BTreeSet::new(),
            timeout,
            say,
        })
    }

    /// The image's workers per machine (machines of the image first, in its order), in start
    /// order.
    fn slots(&self) -> Vec<(String, Vec<Slot>)> {
        let planned: BTreeMap<&str, u16> = inventory::placement(self.image).into_iter().collect();
        let mut order: Vec<&str> = self.image.machines.iter().map(String::as_str).collect();
        for (machine, record) in &self.records {
            if record.contains_key(&self.image.name) && !order.contains(&machine.as_str()) {
                order.push(machine);
            }
        }
        order
            .into_iter()
            .map(|machine| {
                let slots = match self
                    .records
                    .get(machine)
                    .and_then(|r| r.get(&self.image.name))
                {
                    Some(slots) => slots.clone(),
                    None => (1..=planned.get(machine).copied().unwrap_or(0))
                        .map(|n| Slot {
                            n,
                            port: self.image.port.saturating_add(n - 1),
                            ..Slot::default()
                        })
                        .collect(),
                };
                (machine.to_string(), slots)
            })
            .collect()
    }

    /// Every unit that runs now, by the records as written so far.
    fn units(&self) -> Vec<Unit> {
        units_with(self.inventory, "", &self.records)
    }

    /// Writes the image's `slots` on `machine` into its record (the other images' stay).
    fn record(&mut self, machine: &str, slots: Vec<Slot>) -> Result<(), DeployError> {
        let mut record = self.records.get(machine).cloned().unwrap_or_default();
        record.insert(self.image.name.clone(), slots);
        let target = self.machines.get(machine).expect("checked in new");
        if self.prepared.insert(machine.to_string()) {
            super::prepare(target)?;
        }
        let path = format!("{}/{RECORD}", target.dir());
        let text = serde_json::to_string(&record).expect("a record serializes");
        // Written aside and renamed: a reader never sees half a record.
        target.run(&format!(
            "printf '%s' {} > {p}.new && mv -f {p}.new {p}",
            quote(&text),
            p = quote(&path)
        ))?;
        self.records.insert(machine.to_string(), record);
        Ok(())
    }

    /// The image's workers on `machine` now.
    fn slots_on(&self, machine: &str) -> Vec<Slot> {
        self.slots()
            .into_iter()
            .find(|(m, _)| m == machine)
            .map(|(_, s)| s)
            .unwrap_or_default()
    }

    /// A new slot on `machine` like `like` (executable, environment): the next number and the
    /// smallest free port, checked against `max_workers` and every listener on the machine.
    fn new_slot(&self, machine: &str, like: &Slot) -> Result<Slot, DeployError> {
        let entry = self.inventory.machine(machine).expect("validated");
        let units = self.units();
        let here = units
            .iter()
            .filter(|u| u.kind == Kind::Worker && u.machine == machine)
            .count();
        if here >= usize::from(entry.max_workers) {
            return Err(DeployError::Change(format!(
                "machine {machine} runs {here} workers, its max_workers"
            )));
        }
        let slots = self.slots_on(machine);
        let n = slots
            .iter()
            .map(|s| s.n)
            .max()
            .unwrap_or(0)
            .saturating_add(1);
        let taken: BTreeSet<u16> = slots.iter().map(|s| s.port).collect();
        let Some(port) = (self.image.port..=u16::MAX).find(|p| !taken.contains(p)) else {
            return Err(DeployError::Change(format!(
                "images.{}: no port left from {} up on {machine}",
                self.image.name, self.image.port
            )));
        };
        let slot = Slot {
            n,
            port,
            ..like.clone()
        };
        let mut all = units;
        all.push(slot_unit(self.inventory, self.image, machine, &slot));
        inventory::listeners(self.inventory, &all)
            .map_err(|(entry, problem)| DeployError::Change(format!("{entry}: {problem}")))?;
        Ok(slot)
    }

    /// Puts a worker's files on `machine` and starts it; the record must list it already.
    fn start(&self, machine: &str, slot: &Slot) -> Result<Unit, DeployError> {
        let unit = slot_unit(self.inventory, self.image, machine, slot);
        let target = self.machines.get(machine).expect("checked in new");
        let program = self.program(target, &unit)?;
        write_unit(target, &unit, &program, "")?;
        // An id can come back (scale down, then up): the earlier worker's logs move aside
        // (`.1`), so the tail printed on a failure is this worker's own.
        let log = quote(&format!("{}/log/{}", target.dir(), unit.name));
        target.run(&format!(
            "for f in {log}.log {log}.out; do [ -f \"$f\" ] && mv -f \"$f\" \"$f.1\"; done; true"
        ))?;
        target.start(&launch(&unit))?;
        Ok(unit)
    }

    /// The worker's executable on its machine: this box's file for local and netns machines;
    /// on ssh machines the copy `up` made (the image's) or one copied now under a name of its
    /// own (a rollout's), so the old workers' executable is never replaced under them.
    fn program(&self, machine: &dyn Machine, unit: &Unit) -> Result<String, DeployError> {
        let local = if unit.binary.contains('/') {
            std::path::absolute(&unit.binary).unwrap_or_else(|_| PathBuf::from(&unit.binary))
        } else {
            crate::binaries::locate(&unit.binary)?
        };
        let transport = self
            .inventory
            .machine(&unit.machine)
            .expect("validated")
            .transport;
        if transport != Transport::Ssh {
            return Ok(local.display().to_string());
        }
        let file = local
            .file_name()
            .map(|n| n.to_string_lossy().into_owned())
            .unwrap_or_else(|| "worker".into());
        let target = if unit.binary == self.image.binary {
            format!("{}/bin/{file}", machine.dir())
        } else {
            let stamp = std::fs::metadata(&local)
                .ok()
                .and_then(|m| m.modified().ok())
                .and_then(|t| t.duration_since(std::time::UNIX_EPOCH).ok())
                .map_or(0, |d| d.as_secs());
            format!("{}/bin/{file}.{stamp}", machine.dir())
        };
        if machine.run(&format!("test -x {}", quote(&target))).is_err() {
            machine.copy(&local, &format!("{target}.new"))?;
            machine.run(&format!(
                "chmod 755 {t}.new && mv -f {t}.new {t}",
                t = quote(&target)
            ))?;
        }
        Ok(target)
    }

    /// Waits until the active gateway sends traffic to every one of `units`; how long that
    /// took, or why not (a unit that exited, with its log; the timeout, with what the gateway
    /// says).
    fn wait_traffic(&self, units: &[Unit]) -> Result<Duration, String> {
        let began = Instant::now();
        let gateways: Vec<Unit> = plan(self.inventory, "")
            .into_iter()
            .filter(|u| u.kind == Kind::Gateway)
            .collect();
        let mut last;
        loop {
            if let Some((_, gateway)) = admin::active(&self.machines, &gateways) {
                let machine = self.machines.get(&gateway.machine).expect("connected");
                match admin::workers(machine, gateway) {
                    Ok(seen) => {
                        let missing: Vec<String> = units
                            .iter()
                            .filter(|u| {
                                !seen.iter().any(|w| {
                                    w.id == u.id
                                        && (w.state == "healthy" || w.state == "slow_start")
                                })
                            })
                            .map(|u| {
                                let state = seen
                                    .iter()
                                    .find(|w| w.id == u.id)
                                    .map_or("not listed", |w| w.state.as_str());
                                format!("{} {state}", u.id)
                            })
                            .collect();
                        if missing.is_empty() {
                            return Ok(began.elapsed());
                        }
                        last = format!(
                            "gateway on {} says: {}",
                            gateway.machine,
                            missing.join(", ")
                        );
                    }
                    Err(error) => last = error,
                }
            } else {
                last = "no gateway says it is active".into();
            }
            for unit in units {
                let machine = self.machines.get(&unit.machine).expect("connected");
                if !machine.alive(&launch(unit)).unwrap_or(true) {
                    return Err(format!(
                        "{} exited on {}; last lines of its log:\n{}",
                        unit.name,
                        unit.machine,
                        machine.log_tail(&unit.name, TAIL)
                    ));
                }
            }
            if began.elapsed() > self.timeout {
                return Err(format!(
                    "not taking traffic after {} ({last})",
                    humantime::format_duration(self.timeout)
                ));
            }
            std::thread::sleep(POLL);
        }
    }

    /// Drains and stops `units` (in parallel), saying how each went.
    fn stop(&mut self, units: &[Unit]) {
        super::stop_units(&self.machines, units, self.say);
    }

    /// Takes `gone` (machine, slot number) out of the records, then drains and stops them.
    fn retire(&mut self, gone: &[(String, Slot)]) -> Result<(), DeployError> {
        let machines: BTreeSet<&String> = gone.iter().map(|(m, _)| m).collect();
        for machine in machines {
            let keep: Vec<Slot> = self
                .slots_on(machine)
                .into_iter()
                .filter(|s| !gone.iter().any(|(m, g)| m == machine && g.n == s.n))
                .collect();
            self.record(machine, keep)?;
        }
        let units: Vec<Unit> = gone
            .iter()
            .map(|(machine, slot)| slot_unit(self.inventory, self.image, machine, slot))
            .collect();
        self.stop(&units);
        Ok(())
    }

    /// Records and starts a worker like `like` on each of `machines`, and waits until the
    /// gateway sends them all traffic; on failure stops them, puts the records back and says
    /// why.
    fn add(&mut self, machines: &[String], like: &Slot) -> Result<Vec<Unit>, String> {
        let mut added: Vec<(String, Slot)> = Vec::new();
        let mut started = Vec::new();
        let mut failure = None;
        for machine in machines {
            let step = self.new_slot(machine, like).and_then(|slot| {
                let mut slots = self.slots_on(machine);
                slots.push(slot.clone());
                self.record(machine, slots)?;
                added.push((machine.clone(), slot.clone()));
                self.start(machine, &slot)
            });
            match step {
                Ok(unit) => started.push(unit),
                Err(error) => {
                    failure = Some(error.to_string());
                    break;
                }
            }
        }
        if failure.is_none() {
            match self.wait_traffic(&started) {
                Ok(took) => {
                    (self.say)(format!(
                        "started {}; the gateway sends them traffic after {} ms",
                        started
                            .iter()
                            .map(|u| format!("{} on {} ({})", u.id, u.machine, u.listen))
                            .collect::<Vec<_>>()
                            .join(", "),
                        took.as_millis()
                    ));
                    return Ok(started);
                }
                Err(why) => failure = Some(why),
            }
        }
        let _ = self.retire(&added);
        Err(failure.unwrap_or_default())
    }
}

fn names<'a>(items: impl Iterator<Item = &'a str>) -> String {
    items.collect::<Vec<_>>().join(", ")
}

/// Where the next worker goes: the candidate with the fewest of the image's workers (the first
/// in order on a tie) that has room; `None` when none has.
fn fewest<'a>(counts: &[(&'a str, usize, bool)]) -> Option<&'a str> {
    counts
        .iter()
        .filter(|(_, _, room)| *room)
        .min_by_key(|(_, count, _)| *count)
        .map(|(machine, _, _)| *machine)
}

/// Which worker goes next on scale-down: the newest on the candidate with the most (the last
/// in order on a tie).
fn newest_of_most(slots: &[(String, Vec<Slot>)], candidates: &[&str]) -> Option<(String, Slot)> {
    slots
        .iter()
        .filter(|(m, s)| candidates.contains(&m.as_str()) && !s.is_empty())
        .max_by_key(|(m, s)| {
            (
                s.len(),
                candidates.iter().position(|c| c == m).unwrap_or_default(),
            )
        })
        .map(|(m, s)| (m.clone(), s.last().cloned().expect("not empty")))
}

/// `herd scale IMAGE N --inventory FILE [--on MACHINE]`: makes `image` run `wanted` workers in
/// all, adding or removing them on `on` only when given.
pub fn scale(
    inventory: &Inventory,
    options: &Options,
    image: &str,
    wanted: usize,
    on: Option<&str>,
    timeout: Duration,
    say: &mut dyn FnMut(String),
) -> Result<(), DeployError> {
    let mut change = Change::new(inventory, options, image, timeout, say)?;
    let candidates: Vec<String> = match on {
        Some(machine) => {
            // Any machine with room may take workers; its listeners are checked as they are
            // added.
            if inventory
                .machine(machine)
                .is_none_or(|m| m.max_workers == 0)
            {
                return Err(DeployError::Change(format!(
                    "--on {machine}: no machine of that name takes workers (machines: {})",
                    names(
                        inventory
                            .machines
                            .iter()
                            .filter(|m| m.max_workers > 0)
                            .map(|m| m.name.as_str())
                    )
                )));
            }
            vec![machine.to_string()]
        }
        None => change.image.machines.clone(),
    };
    let current: usize = change.slots().iter().map(|(_, s)| s.len()).sum();
    if wanted > current {
        // New workers run what the image's workers run now (after a rollout, every one has
        // its executable and env; the last listed stands for them).
        let like = change
            .slots()
            .iter()
            .flat_map(|(_, s)| s.last())
            .last()
            .cloned()
            .map(|s| Slot { n: 0, port: 0, ..s })
            .unwrap_or_default();
        let mut placed: Vec<String> = Vec::new();
        let mut counts: BTreeMap<String, usize> = change
            .slots()
            .into_iter()
            .map(|(m, s)| (m, s.len()))
            .collect();
        for _ in current..wanted {
            let units = change.units();
            let rows: Vec<(&str, usize, bool)> = candidates
                .iter()
                .map(|m| {
                    let here = units
                        .iter()
                        .filter(|u| u.kind == Kind::Worker && &u.machine == m)
                        .count()
                        + placed.iter().filter(|p| *p == m).count();
                    let max = inventory
                        .machine(m)
                        .map_or(0, |e| usize::from(e.max_workers));
                    (m.as_str(), counts.get(m).copied().unwrap_or(0), here < max)
                })
                .collect();
            let Some(machine) = fewest(&rows) else {
                return Err(DeployError::Change(format!(
                    "no room for {} more workers of {image} on {} (max_workers)",
                    wanted - current - placed.len(),
                    names(candidates.iter().map(String::as_str))
                )));
            };
            let machine = machine.to_string();
            *counts.entry(machine.clone()).or_default() += 1;
            placed.push(machine);
        }
        change.add(&placed, &like).map_err(|why| {
            DeployError::Change(format!(
                "new workers of {image} did not come up, stopped them again: {why}"
            ))
        })?;
    } else if wanted < current {
        let candidates: Vec<&str> = candidates.iter().map(String::as_str).collect();
        let mut gone: Vec<(String, Slot)> = Vec::new();
        let mut slots = change.slots();
        for _ in wanted..current {
            let Some((machine, slot)) = newest_of_most(&slots, &candidates) else {
                break;
            };
            if let Some((_, list)) = slots.iter_mut().find(|(m, _)| *m == machine) {
                list.retain(|s| s.n != slot.n);
            }
            gone.push((machine, slot));
        }
        if gone.len() < current - wanted {
            return Err(DeployError::Change(format!(
                "--on {}: it runs only {} workers of {image}",
                candidates.join(","),
                gone.len()
            )));
        }
        change.retire(&gone)?;
    }
    let now: Vec<String> = change
        .slots()
        .into_iter()
        .filter(|(_, s)| !s.is_empty())
        .map(|(m, s)| format!("{m} {}", s.len()))
        .collect();
    (change.say)(format!("{image}: {wanted} workers ({})", now.join(", ")));
    Ok(())
}

/// What a rollout changes.
#[derive(Debug, Clone, Copy)]
pub struct Upgrade<'a> {
    /// The new worker executable (a file on this box); none: the current one.
    pub binary: Option<&'a Path>,
    /// Environment put on top of the current one.
    pub env: &'a [(String, String)],
    /// Workers replaced at a time (at least 1).
    pub batch: usize,
}

/// `herd rollout IMAGE --inventory FILE [--binary B] [--env K=V]`: replaces every worker of
/// `image`, `upgrade.batch` at a time, by one running the new executable and/or environment,
/// on the same machine. A batch whose new workers don't take traffic in `timeout` is stopped,
/// and the batches already done are rolled back.
pub fn rollout(
    inventory: &Inventory,
    options: &Options,
    image: &str,
    upgrade: Upgrade<'_>,
    timeout: Duration,
    say: &mut dyn FnMut(String),
) -> Result<(), DeployError> {
    let Upgrade { binary, env, batch } = upgrade;
    let mut change = Change::new(inventory, options, image, timeout, say)?;
    let old: Vec<(String, Slot)> = change
        .slots()
        .into_iter()
        .flat_map(|(m, slots)| slots.into_iter().map(move |s| (m.clone(), s)))
        .collect();
    let renew = |slot: &Slot| {
        let mut new = slot.clone();
        if let Some(binary) = binary {
            new.binary = Some(binary.display().to_string());
        }
        new.env.extend(env.iter().cloned());
        new
    };
    // (old worker, its replacement) of every batch done, for a roll-back.
    let mut done: Vec<((String, Slot), (String, Slot))> = Vec::new();
    for (index, group) in old.chunks(batch.max(1)).enumerate() {
        match replace(&mut change, group, &renew) {
            Ok(new) => {
                (change.say)(format!(
                    "batch {}: {} replaced by {}",
                    index + 1,
                    ids(image, group),
                    ids(image, &new)
                ));
                done.extend(group.iter().cloned().zip(new));
            }
            Err(why) => {
                (change.say)(format!("batch {} failed, rolling back: {why}", index + 1));
                for (old, new) in done.iter().rev() {
                    let back = |_: &Slot| old.1.clone();
                    match replace(&mut change, std::slice::from_ref(new), &back) {
                        Ok(_) => (change.say)(format!(
                            "rolled back {} to the old command",
                            ids(image, std::slice::from_ref(new))
                        )),
                        Err(why) => (change.say)(format!(
                            "could not roll back {}: {why}; it keeps the new command",
                            ids(image, std::slice::from_ref(new))
                        )),
                    }
                }
                return Err(DeployError::Change(format!(
                    "rollout of {image} aborted and rolled back: {why}"
                )));
            }
        }
    }
    (change.say)(format!("{image}: rolled out to {} workers", done.len()));
    Ok(())
}

/// Starts a replacement for each of `group` on its machine (`renew` says how it differs),
/// waits until they take traffic, then drains and stops `group`. On failure the replacements
/// are stopped and `group` keeps running.
fn replace(
    change: &mut Change<'_>,
    group: &[(String, Slot)],
    renew: &dyn Fn(&Slot) -> Slot,
) -> Result<Vec<(String, Slot)>, String> {
    let mut new = Vec::new();
    let mut failure = None;
    for (machine, slot) in group {
        match change.add(std::slice::from_ref(machine), &renew(slot)) {
            Ok(_) => {
                let newest = change
                    .slots_on(machine)
                    .last()
                    .cloned()
                    .expect("just added");
                new.push((machine.clone(), newest));
            }
            Err(why) => {
                failure = Some(why);
                break;
            }
        }
    }
    if let Some(why) = failure {
        let _ = change.retire(&new);
        return Err(why);
    }
    change.retire(group).map_err(|e| e.to_string())?;
    Ok(new)
}

fn ids(image: &str, workers: &[(String, Slot)]) -> String {
    names(
        workers
            .iter()
            .map(|(m, s)| format!("{image}-{m}-{}", s.n))
            .collect::<Vec<_>>()
            .iter()
            .map(String::as_str),
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    fn inventory() -> Inventory {
        let text = r#"
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
floating_address = "10.9.0.10"
[[images]]
name = "x"
per_machine = 2
port = 9000
machines = ["c"]
"#;
        inventory::parse(Path::new("t.toml"), text).unwrap()
    }

    #[test]
    fn a_record_replaces_the_planned_workers_of_its_image_on_its_machine() {
        let inv = inventory();
        let slot = |n: u16| Slot {
            n,
            port: 9001,
            ..Slot::default()
        };
        let mut record = Record::new();
        record.insert(
            "x".into(),
            vec![
                slot(2),
                Slot {
                    n: 3,
                    port: 9000,
                    binary: Some("/new/worker".into()),
                    env: [("K".to_string(), "v".to_string())].into(),
                },
            ],
        );
        let units = units_with(&inv, "", &[("c".to_string(), record)].into());
        let workers: Vec<(&str, String)> = units
            .iter()
            .filter(|u| u.kind == Kind::Worker)
            .map(|u| (u.name.as_str(), u.listen.to_string()))
            .collect();
        assert_eq!(
            workers,
            [
                ("worker-x-c-2", "10.9.0.3:9001".to_string()),
                ("worker-x-c-3", "10.9.0.3:9000".to_string())
            ]
        );
        let third = units.iter().find(|u| u.name == "worker-x-c-3").unwrap();
        assert_eq!(third.binary, "/new/worker");
        let env = |key: &str| {
            third
                .env
                .iter()
                .find(|(k, _)| k == key)
                .map(|(_, v)| v.clone())
        };
        assert_eq!(env("HERD_WORKER_ID").as_deref(), Some("x-c-3"));
        assert_eq!(env("HERD_WORKER_LISTEN").as_deref(), Some("10.9.0.3:9000"));
        assert_eq!(env("K").as_deref(), Some("v"));
        assert!(env("HERD_WORKER_REDIS__URL").is_some());
        // Gateways still come last, after every worker.
        assert_eq!(units.last().unwrap().kind, Kind::Gateway);
        // Without a record, the plan.
        assert_eq!(units_with(&inv, "", &BTreeMap::new()), plan(&inv, ""));
    }

    #[test]
    fn growth_goes_to_the_fewest_and_removal_takes_the_newest_of_the_most() {
        assert_eq!(
            fewest(&[("a", 2, true), ("b", 1, true), ("c", 1, true)]),
            Some("b")
        );
        assert_eq!(fewest(&[("a", 2, true), ("b", 1, false)]), Some("a"));
        assert_eq!(fewest(&[("a", 2, false)]), None);
        let slot = |n: u16| Slot {
            n,
            port: n,
            ..Slot::default()
        };
        let slots = vec![
            ("a".to_string(), vec![slot(1), slot(2)]),
            ("b".to_string(), vec![slot(3), slot(1)]),
            ("c".to_string(), vec![slot(1)]),
        ];
        assert_eq!(
            newest_of_most(&slots, &["a", "b", "c"]),
            Some(("b".to_string(), slot(1))),
            "a tie goes to the last machine; its newest is the last started"
        );
        assert_eq!(
            newest_of_most(&slots, &["c"]),
            Some(("c".to_string(), slot(1)))
        );
        assert_eq!(newest_of_most(&slots, &["d"]), None);
    }
}
