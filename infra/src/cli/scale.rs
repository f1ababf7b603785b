//! `herd scale [IMAGE] N`: make an image run N workers.
//!
//! Up: start the missing workers (ids continue after the highest one ever used), record them
//! (from then on the supervisor watches them), and return once the active gateway sends them
//! traffic. Down: the newest workers go first; each is taken out of the state file (so the
//! supervisor lets it go), then drained and stopped (SIGTERM: it announces `draining` in the
//! registry, the gateway sends it nothing new, in-flight requests finish, it exits).

use super::workers::{self, GatewayView, LocalMachine, Placement};
use super::{CliError, EXIT_OK, ScaleArgs};
use crate::state::StateDir;

/// Runs `herd scale`; returns the exit code.
pub(crate) fn run(args: &ScaleArgs) -> Result<u8, CliError> {
    let (image, wanted) = args.image_and_count()?;
    let dir = StateDir::new(&args.state.state_dir)?;
    let Some(state) = dir.load()? else {
        return Err(CliError::NotRunning(format!(
            "no herd cluster is running (no state file at {}); start one with `{} up`",
            dir.state_file().display(),
            super::up::herd_command()
        )));
    };
    workers::check_image(&state, &image)?;
    let current = workers::of_image(&state, &image).len() as u32;
    let placement = LocalMachine;
    if wanted > current {
        super::runtime()?.block_on(grow(
            &placement,
            &dir,
            &image,
            wanted - current,
            args.timeout,
        ))?;
    } else if wanted < current {
        let members: Vec<_> = workers::of_image(&state, &image)
            .into_iter()
            .rev()
            .take((current - wanted) as usize)
            .cloned()
            .collect();
        let bar = workers::progress(members.len() as u64, "draining");
        let lines = workers::retire(&placement, &dir, &members)?;
        bar.finish_and_clear();
        for line in lines {
            super::say(line);
        }
    }
    super::say(format!("{image}: {wanted} workers"));
    Ok(EXIT_OK)
}

/// Starts `count` new workers of `image` and waits until the gateway sends them traffic. On
/// failure the new workers are stopped again.
async fn grow(
    placement: &LocalMachine,
    dir: &StateDir,
    image: &str,
    count: u32,
    timeout: std::time::Duration,
) -> Result<(), CliError> {
    let state = dir
        .load()?
        .ok_or_else(|| CliError::NotRunning("the cluster stopped".into()))?;
    let template = workers::of_image(&state, image)
        .first()
        .and_then(|m| m.spec.clone())
        .ok_or_else(|| {
            CliError::Usage(format!(
                "the workers of {image} have no recorded command (started by an older herd?); restart the cluster"
            ))
        })?;
    let first = workers::next_worker_number(&state);
    let total = workers::of_image(&state, image).len() + count as usize;
    let (key, threads) = super::cluster::worker_threads(total);
    let mut started = Vec::new();
    for n in first..first + count {
        let spec = super::rollout::respec(&template, n, None, &[]).set_env(key, threads.clone());
        match placement.start(&spec, image) {
            Ok(member) => {
                dir.update(|state| state.members.push(member.clone()))?;
                started.push(member);
            }
            Err(error) => {
                let _ = workers::retire(placement, dir, &started);
                return Err(error);
            }
        }
    }
    let ids: Vec<String> = started.iter().map(|m| m.id().to_string()).collect();
    let view = GatewayView::new(&state)?;
    let names: Vec<String> = started.iter().map(|m| m.name.clone()).collect();
    let waited = view
        .wait_taking_traffic(&ids, timeout, "waiting for the gateway", |id| {
            names
                .iter()
                .find(|n| n.ends_with(&format!("-{id}")))
                .is_some_and(|name| !workers::runs(dir, name))
        })
        .await;
    match waited {
        Ok(took) => {
            super::say(format!(
                "started {} ({}); the gateway sends them traffic after {} ms",
                ids.join(", "),
                started
                    .iter()
                    .filter_map(|m| m.addr)
                    .map(|a| a.to_string())
                    .collect::<Vec<_>>()
                    .join(", "),
                took.as_millis()
            ));
            Ok(())
        }
        Err(why) => {
            let _ = workers::retire(placement, dir, &started);
            Err(CliError::Change(format!(
                "new workers did not come up, stopped them again: {why}"
            )))
        }
    }
}
