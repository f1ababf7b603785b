//! The `local` transport: the machine is this box; its processes bind the machine's loopback
//! address (127.x.y.z), so several local "machines" don't clash.

use std::path::Path;
use std::process::Command;

use super::{Machine, MachineError, output, what};

/// A machine that is this box.
#[derive(Debug, Clone)]
pub struct Local {
    name: String,
    dir: String,
}

impl Local {
    /// Machine `name` with its herd directory `dir`.
    pub fn new(name: &str, dir: &str) -> Self {
        Local {
            name: name.into(),
            dir: dir.into(),
        }
    }
}

impl Machine for Local {
    fn name(&self) -> &str {
        &self.name
    }

    fn dir(&self) -> &str {
        &self.dir
    }

    fn run(&self, script: &str) -> Result<String, MachineError> {
        output(
            &self.name,
            "sh",
            &what(script),
            Command::new("sh").arg("-c").arg(script),
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
