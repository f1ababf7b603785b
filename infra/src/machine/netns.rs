//! The `netns` transport: the machine is a network namespace on this box, on a bridge herd
//! made ([`crate::netns::Topology`]). Scripts run with `ip netns exec`; files are on this box's
//! filesystem already, so a copy is a `cp`.

use std::path::Path;
use std::process::Command;

use super::{Machine, MachineError, output, what};

/// A machine that is network namespace `netns` on this box.
#[derive(Debug, Clone)]
pub struct Netns {
    name: String,
    netns: String,
    dir: String,
}

impl Netns {
    /// Machine `name` in namespace `netns`, herd directory `dir`.
    pub fn new(name: &str, netns: &str, dir: &str) -> Self {
        Netns {
            name: name.into(),
            netns: netns.into(),
            dir: dir.into(),
        }
    }

    /// Its namespace.
    pub fn netns(&self) -> &str {
        &self.netns
    }
}

impl Machine for Netns {
    fn name(&self) -> &str {
        &self.name
    }

    fn dir(&self) -> &str {
        &self.dir
    }

    fn run(&self, script: &str) -> Result<String, MachineError> {
        output(
            &self.name,
            "ip",
            &what(script),
            Command::new("ip")
                .args(["netns", "exec", &self.netns, "sh", "-c"])
                .arg(script),
        )
    }

    fn copy(&self, local: &Path, remote: &str) -> Result<(), MachineError> {
        output(
            &self.name,
            "cp",
            &format!("copy {} to {remote}", local.display()),
            Command::new("cp").arg(local).arg(remote),
        )
        .map(drop)
    }
}
