//! `herd rollout [IMAGE] [--binary PATH] [--env K=V…]`: a rolling upgrade.
//!
//! Batch by batch (`--batch`, default 1): start the new workers beside the old ones, wait until
//! the active gateway sends them traffic, then drain and stop the old ones (SIGTERM: they leave
//! the gateway's rotation at once and finish what they hold). Capacity never drops below the
//! starting count, and no request is cut: old workers stop only after their replacements serve.
//! Sessions live in Redis, so a user's next request finds the cart on any worker.
//!
//! A new worker that exits, or is not taking traffic within `--timeout`, aborts the rollout: the
//! batch's new workers are stopped and every batch already done is rolled back the same way
//! (start a worker from the old command, wait, drain the new one). Exit 1 then, saying so.

use std::time::Duration;

use super::workers::{self, GatewayView, LocalMachine, Placement};
use super::{CliError, EXIT_OK, RolloutArgs};
use crate::process::Spec;
use crate::state::{Member, StateDir};

/// `template` as worker `w{n}`: the same command, another id and a free port, with `binary` and
/// `env` applied on top.
pub(crate) fn respec(
    template: &Spec,
    n: u32,
    binary: Option<&std::path::Path>,
    env: &[(String, String)],
) -> Spec {
    let id = format!("w{n}");
    let mut spec = template
        .clone()
        .set_env("HERD_WORKER_ID", &id)
        .set_env("HERD_WORKER_LISTEN", "127.0.0.1:0");
    spec.name = format!("worker-{id}");
    if let Some(binary) = binary {
        spec.program = binary.to_path_buf();
    }
    for (key, value) in env {
        spec = spec.set_env(key, value);
    }
    spec
}

/// Runs `herd rollout`; returns the exit code.
pub(crate) fn run(args: &RolloutArgs) -> Result<u8, CliError> {
    let env = args.env_pairs()?;
    let image = args
        .image
        .clone()
        .unwrap_or_else(|| super::cluster::IMAGE.to_string());
    let binary = match &args.binary {
        Some(path) => Some(std::path::absolute(path).map_err(|source| CliError::Os {
            what: "resolve --binary",
            source,
        })?),
        None => None,
    };
    if let Some(binary) = &binary
        && !binary.is_file()
    {
        return Err(CliError::Usage(format!(
            "--binary {}: no such file",
            binary.display()
        )));
    }
    let dir = StateDir::new(&args.state.state_dir)?;
    let Some(state) = dir.load()? else {
        return Err(CliError::NotRunning(format!(
            "no herd cluster is running (no state file at {}); start one with `{} up`",
            dir.state_file().display(),
            super::up::herd_command()
        )));
    };
    workers::check_image(&state, &image)?;
    let old: Vec<Member> = workers::of_image(&state, &image)
        .into_iter()
        .cloned()
        .collect();
    super::say_if_restart(args);
    let rollout = Rollout {
        placement: LocalMachine,
        dir: &dir,
        image: &image,
        view: GatewayView::new(&state)?,
        timeout: args.timeout,
    };
    super::runtime()?.block_on(rollout.run(&old, args.batch as usize, binary.as_deref(), &env))
}

struct Rollout<'a> {
    placement: LocalMachine,
    dir: &'a StateDir,
    image: &'a str,
    view: GatewayView,
    timeout: Duration,
}

impl Rollout<'_> {
    async fn run(
        &self,
        old: &[Member],
        batch: usize,
        binary: Option<&std::path::Path>,
        env: &[(String, String)],
    ) -> Result<u8, CliError> {
        // (the old worker, its replacement) for every batch done, for a roll-back.
        let mut done: Vec<(Member, Member)> = Vec::new();
        // The new workers share the CPUs among as many workers as the image has (after a scale
        // down, a rolling restart gives the rest their larger share); `--env
        // HERD_WORKER_THREADS=N` wins.
        let (key, threads) = super::cluster::worker_threads(old.len());
        let env: Vec<(String, String)> = std::iter::once((key.to_string(), threads))
            .chain(env.iter().cloned())
            .collect();
        for (index, group) in old.chunks(batch).enumerate() {
            // Numbered as they start (see `replace`).
            let specs: Vec<Spec> = group
                .iter()
                .filter_map(|m| m.spec.as_ref())
                .map(|template| respec(template, 0, binary, &env))
                .collect();
            match self.replace(group, &specs).await {
                Ok(new) => {
                    super::say(format!(
                        "batch {}: {} replaced by {}",
                        index + 1,
                        ids(group),
                        ids(&new)
                    ));
                    done.extend(group.iter().cloned().zip(new));
                }
                Err(why) => {
                    super::warn(format!(
                        "herd rollout: batch {} failed: {why}; rolling back",
                        index + 1
                    ));
                    self.roll_back(&done).await;
                    return Err(CliError::Change(format!(
                        "rollout of {} aborted and rolled back: {why}",
                        self.image
                    )));
                }
            }
        }
        super::say(format!(
            "{}: rolled out to {} workers",
            self.image,
            done.len()
        ));
        Ok(EXIT_OK)
    }

    /// The next worker number, read afresh (each start records its worker).
    fn next_number(&self) -> u32 {
        self.dir
            .load()
            .ok()
            .flatten()
            .map(|state| workers::next_worker_number(&state))
            .unwrap_or(1)
    }

    /// Starts workers from `specs`, waits until they take traffic, then drains and stops `old`.
    /// On failure, the new ones are stopped again and `old` keeps running.
    async fn replace(&self, old: &[Member], specs: &[Spec]) -> Result<Vec<Member>, String> {
        let mut started: Vec<Member> = Vec::new();
        let mut failure = None;
        for spec in specs {
            // Each new worker takes the next number: record it before starting the next.
            let mut spec = spec.clone();
            let n = self.next_number();
            let id = format!("w{n}");
            spec = spec.set_env("HERD_WORKER_ID", &id);
            spec.name = format!("worker-{id}");
            match self.placement.start(&spec, self.image) {
                Ok(member) => {
                    if let Err(error) = self.dir.update(|s| s.members.push(member.clone())) {
                        failure = Some(error.to_string());
                    }
                    started.push(member);
                }
                Err(error) => failure = Some(error.to_string()),
            }
            if failure.is_some() {
                break;
            }
        }
        if failure.is_none() {
            let ids: Vec<String> = started.iter().map(|m| m.id().to_string()).collect();
            let names: Vec<String> = started.iter().map(|m| m.name.clone()).collect();
            let dir = self.dir;
            if let Err(why) = self
                .view
                .wait_taking_traffic(&ids, self.timeout, "waiting for new workers", |id| {
                    names
                        .iter()
                        .find(|n| n.ends_with(&format!("-{id}")))
                        .is_some_and(|name| !workers::runs(dir, name))
                })
                .await
            {
                failure = Some(why);
            }
        }
        if let Some(why) = failure {
            for line in workers::retire(&self.placement, self.dir, &started).unwrap_or_default() {
                super::warn(format!("herd rollout: {line}"));
            }
            return Err(why);
        }
        for line in workers::retire(&self.placement, self.dir, old).map_err(|e| e.to_string())? {
            super::say(line);
        }
        Ok(started)
    }

    /// Puts the old command back for every batch already done, newest first.
    async fn roll_back(&self, done: &[(Member, Member)]) {
        for (old, new) in done.iter().rev() {
            let Some(template) = old.spec.clone() else {
                continue;
            };
            let spec = respec(&template, 0, None, &[]);
            match self.replace(std::slice::from_ref(new), &[spec]).await {
                Ok(back) => super::warn(format!(
                    "herd rollout: rolled back {} to the old command as {}",
                    new.id(),
                    ids(&back)
                )),
                Err(why) => super::warn(format!(
                    "herd rollout: could not roll back {}: {why}; it keeps running the new command",
                    new.id()
                )),
            }
        }
    }
}

fn ids(members: &[Member]) -> String {
    members
        .iter()
        .map(|m| m.id().to_string())
        .collect::<Vec<_>>()
        .join(", ")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_new_worker_spec_keeps_the_command_and_changes_id_port_binary_and_env() {
        let template = Spec::new("worker-w1", "/bin/old", std::path::Path::new("/logs"))
            .arg("--log-format")
            .env("HERD_WORKER_LISTEN", "127.0.0.1:4001")
            .env("HERD_WORKER_ID", "w1")
            .env("HERD_WORKER_REDIS__URL", "redis://x");
        let spec = respec(
            &template,
            9,
            Some(std::path::Path::new("/bin/new")),
            &[("HERD_LOG".into(), "debug".into())],
        );
        assert_eq!(spec.name, "worker-w9");
        assert_eq!(spec.program, std::path::PathBuf::from("/bin/new"));
        assert_eq!(spec.args, ["--log-format"]);
        assert_eq!(spec.env_value("HERD_WORKER_ID"), Some("w9"));
        assert_eq!(spec.env_value("HERD_WORKER_LISTEN"), Some("127.0.0.1:0"));
        assert_eq!(spec.env_value("HERD_WORKER_REDIS__URL"), Some("redis://x"));
        assert_eq!(spec.env_value("HERD_LOG"), Some("debug"));
    }
}
