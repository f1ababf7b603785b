//! Machines herd deploys to, behind one small trait: [`Machine`] runs a shell script on the
//! machine and copies a file to it; starting, stopping and watching a unit are built on those
//! two, by the machine's supervisor (systemd where it runs, else herd's fallback supervisor).
//!
//! Transports, one module each:
//! - [`local`]: this box (`sh -c`);
//! - [`netns`]: a network namespace on this box (`ip netns exec NS sh -c`), created and removed
//!   with [`crate::netns::Topology`];
//! - [`ssh`]: a real host (`ssh` and `scp` with the user's ssh config and keys).
//!
//! Supervisors: [`supervise`] (a `nohup` + pid file shell loop that restarts a crashed process
//! with backoff and gives up on a crash loop) and [`systemd`] (units herd writes:
//! `herd-worker@.service`, `herd-gateway.service`, `herd-redis.service`).
//!
//! Layout of a machine's directory (`dir`): `bin/` copied executables, `etc/{unit}.env` each
//! unit's environment (and `HERD_ARGS`), `link/{unit}` a symlink to the unit's executable,
//! `run/` pid files, `log/{unit}.out|.log` stdout and stderr, `redis/` Redis' data.

pub mod local;
pub mod netns;
pub mod ssh;
pub mod supervise;
pub mod systemd;

use std::path::Path;
use std::time::Duration;

use crate::inventory::Kind;

/// Why something on a machine failed.
#[derive(Debug, thiserror::Error)]
pub enum MachineError {
    /// The transport's command could not be started at all.
    #[error("machine {machine}: cannot run {program}: {source}")]
    Spawn {
        /// The machine.
        machine: String,
        /// `sh`, `ip`, `ssh`, `scp`.
        program: &'static str,
        /// The OS error.
        source: std::io::Error,
    },
    /// A script or copy ran and failed.
    #[error("machine {machine}: {what} failed ({status}): {stderr}")]
    Failed {
        /// The machine.
        machine: String,
        /// What was attempted.
        what: String,
        /// Its exit status.
        status: String,
        /// What it printed on stderr (last line).
        stderr: String,
    },
    /// A network namespace could not be made or removed.
    #[error("machine {machine}: {source}")]
    Netns {
        /// The machine.
        machine: String,
        /// The `ip` error.
        source: crate::netns::NetnsError,
    },
}

/// Which supervisor keeps a machine's processes running.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Supervisor {
    /// herd's `nohup` + pid file loop ([`supervise`]).
    Fallback,
    /// systemd units ([`systemd`]).
    Systemd,
}

/// How a unit stopped.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Stopped {
    /// It was not running.
    Absent,
    /// It exited within its grace period.
    Exited,
    /// It had to be killed.
    Killed,
}

/// One unit to start on a machine (its environment file and executable link are in place).
#[derive(Debug, Clone)]
pub struct Launch {
    /// Unit name (`worker-demo-m1-1`).
    pub name: String,
    /// What it is (systemd picks the unit file by it).
    pub kind: Kind,
    /// Worker id (the systemd instance name), or the machine name for a gateway.
    pub id: String,
}

/// A machine herd can run things on.
pub trait Machine: Send + Sync + std::fmt::Debug {
    /// Its inventory name.
    fn name(&self) -> &str;

    /// Its herd directory (absolute, on the machine).
    fn dir(&self) -> &str;

    /// Runs `script` with `sh -c` on the machine; returns its stdout, or an error with its
    /// stderr when it exits non-zero.
    fn run(&self, script: &str) -> Result<String, MachineError>;

    /// Copies the local file `local` to `remote` on the machine.
    fn copy(&self, local: &Path, remote: &str) -> Result<(), MachineError>;

    /// The supervisor this machine's units run under.
    fn supervisor(&self) -> Supervisor {
        Supervisor::Fallback
    }

    /// Whether the machine answers at all.
    fn reachable(&self) -> bool {
        self.run("true").is_ok()
    }

    /// Starts `launch` under the machine's supervisor.
    fn start(&self, launch: &Launch) -> Result<(), MachineError> {
        match self.supervisor() {
            Supervisor::Fallback => supervise::start(self, launch),
            Supervisor::Systemd => systemd::start(self, launch),
        }
    }

    /// Stops unit `name` (SIGTERM, up to `grace`, then SIGKILL), under whichever supervisor
    /// runs it.
    fn stop(&self, launch: &Launch, grace: Duration) -> Result<Stopped, MachineError> {
        let fallback = supervise::stop(self, &launch.name, grace)?;
        if self.supervisor() == Supervisor::Systemd {
            return systemd::stop(self, launch);
        }
        Ok(fallback)
    }

    /// Whether unit `name` runs.
    fn alive(&self, launch: &Launch) -> Result<bool, MachineError> {
        match self.supervisor() {
            Supervisor::Fallback => supervise::alive(self, &launch.name),
            Supervisor::Systemd => systemd::alive(self, launch),
        }
    }

    /// The last `lines` lines of unit `name`'s stderr (empty when unreadable), after the first
    /// panic or `main` error message if there is one (a backtrace would push it out of the tail).
    fn log_tail(&self, name: &str, lines: usize) -> String {
        let log = quote(&format!("{}/log/{name}.log", self.dir()));
        self.run(&format!(
            "grep -m1 -A1 -e 'panicked at' -e '^Error: ' -e '^herd-gateway: ' -e '^herd-worker: ' {log} 2>/dev/null; tail -n {lines} {log} 2>/dev/null || true"
        ))
        .unwrap_or_default()
    }
}

/// `text` quoted for `sh`: single quotes, each `'` as `'\''`.
pub fn quote(text: &str) -> String {
    format!("'{}'", text.replace('\'', r"'\''"))
}

/// Runs `command`, mapping a failure to [`MachineError`] with the last line of its stderr.
pub(crate) fn output(
    machine: &str,
    program: &'static str,
    what: &str,
    command: &mut std::process::Command,
) -> Result<String, MachineError> {
    let output = command
        .stdin(std::process::Stdio::null())
        .output()
        .map_err(|source| MachineError::Spawn {
            machine: machine.to_string(),
            program,
            source,
        })?;
    if !output.status.success() {
        let stderr = String::from_utf8_lossy(&output.stderr);
        return Err(MachineError::Failed {
            machine: machine.to_string(),
            what: what.to_string(),
            status: output.status.to_string(),
            stderr: stderr
                .lines()
                .rev()
                .find(|l| !l.trim().is_empty())
                .unwrap_or("")
                .to_string(),
        });
    }
    Ok(String::from_utf8_lossy(&output.stdout).into_owned())
}

/// The first word of a script, for messages.
pub(crate) fn what(script: &str) -> String {
    let first = script.lines().find(|l| !l.trim().is_empty()).unwrap_or("");
    let mut short: String = first.chars().take(60).collect();
    if short.len() < first.len() {
        short.push('…');
    }
    format!("`{short}`")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn quoting_survives_sh() {
        let tricky = "it's a $HOME `x` \"y\"";
        let out = std::process::Command::new("sh")
            .arg("-c")
            .arg(format!("printf %s {}", quote(tricky)))
            .output()
            .unwrap();
        assert_eq!(String::from_utf8_lossy(&out.stdout), tricky);
    }
}
