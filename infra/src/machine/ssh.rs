//! The `ssh` transport: a real host, reached with the user's own `ssh` and `scp` (their config,
//! keys and agent; `BatchMode`, so a missing key fails instead of asking for a password). Units
//! run under systemd when the host runs it and herd logs in as root; otherwise under herd's
//! fallback supervisor ([`super::supervise`]).
//!
//! One herd command sends many short commands to a host; they share one ssh connection
//! (`ControlMaster`, a socket private to this herd process), which the [`Ssh`] closes when it
//! is dropped. Measured in the ssh test (two hosts in netns, a busy 2-core box): `herd status`
//! took 11.6 s with a new connection per command.

use std::path::{Path, PathBuf};
use std::process::Command;

use super::{Machine, MachineError, Supervisor, output, quote, what};

/// A host reached over ssh.
#[derive(Debug, Clone)]
pub struct Ssh {
    name: String,
    destination: String,
    config_file: Option<PathBuf>,
    dir: String,
    supervisor: Supervisor,
    /// The shared connection's socket.
    control_path: PathBuf,
}

impl Ssh {
    /// Machine `name` at ssh `destination` (`user@host` or a `Host` of the ssh config), herd
    /// directory `dir`; `config_file` replaces `~/.ssh/config`. The supervisor is fallback until
    /// [`detect_supervisor`](Self::detect_supervisor) looks.
    pub fn new(name: &str, destination: &str, config_file: Option<&Path>, dir: &str) -> Self {
        Ssh {
            name: name.into(),
            destination: destination.into(),
            config_file: config_file.map(Path::to_path_buf),
            dir: dir.into(),
            supervisor: Supervisor::Fallback,
            control_path: std::env::temp_dir()
                .join(format!("herd-ssh-{}-{name}", std::process::id())),
        }
    }

    /// Asks the host whether it runs systemd (and herd is root there, which writing units
    /// needs); keeps the fallback supervisor otherwise.
    pub fn detect_supervisor(&mut self) -> Result<Supervisor, MachineError> {
        let answer = self.run(
            "if [ -d /run/systemd/system ] && command -v systemctl >/dev/null 2>&1 && [ \"$(id -u)\" = 0 ]; \
             then echo systemd; else echo fallback; fi",
        )?;
        self.supervisor = if answer.trim() == "systemd" {
            Supervisor::Systemd
        } else {
            Supervisor::Fallback
        };
        Ok(self.supervisor)
    }

    fn options(&self, command: &mut Command) {
        if let Some(file) = &self.config_file {
            command.arg("-F").arg(file);
        }
        command.args(["-o", "BatchMode=yes", "-o", "ConnectTimeout=5"]);
        // The master lingers at most 2 minutes if herd dies before closing it.
        command
            .args(["-o", "ControlMaster=auto", "-o", "ControlPersist=120"])
            .arg("-o")
            .arg(format!("ControlPath={}", self.control_path.display()));
    }
}

impl Drop for Ssh {
    fn drop(&mut self) {
        if !self.control_path.exists() {
            return;
        }
        let mut command = Command::new("ssh");
        self.options(&mut command);
        let _ = command
            .args(["-O", "exit"])
            .arg(&self.destination)
            .stdin(std::process::Stdio::null())
            .stdout(std::process::Stdio::null())
            .stderr(std::process::Stdio::null())
            .status();
    }
}

impl Machine for Ssh {
    fn name(&self) -> &str {
        &self.name
    }

    fn dir(&self) -> &str {
        &self.dir
    }

    fn supervisor(&self) -> Supervisor {
        self.supervisor
    }

    fn run(&self, script: &str) -> Result<String, MachineError> {
        let mut command = Command::new("ssh");
        self.options(&mut command);
        // ssh hands the remote login shell one string; quoting the script once makes `sh -c`
        // get it unchanged whatever that shell is.
        command
            .arg(&self.destination)
            .arg(format!("sh -c {}", quote(script)));
        output(&self.name, "ssh", &what(script), &mut command)
    }

    fn copy(&self, local: &Path, remote: &str) -> Result<(), MachineError> {
        let mut command = Command::new("scp");
        command.arg("-q");
        self.options(&mut command);
        command
            .arg(local)
            .arg(format!("{}:{remote}", self.destination));
        output(
            &self.name,
            "scp",
            &format!("copy {} to {remote}", local.display()),
            &mut command,
        )
        .map(drop)
    }
}
