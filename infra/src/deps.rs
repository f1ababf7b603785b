//! Outside programs herd needs (redis-server, later haproxy, nginx…): find them, or install them
//! with apt-get when we are root on Debian, or say exactly how to get them.

use std::path::PathBuf;
use std::process::{Command, Stdio};
use std::sync::Mutex;

/// A program herd runs, and the Debian package that provides it.
#[derive(Debug, Clone, Copy)]
pub struct Program {
    /// Executable name, looked up on `PATH` and in `/usr/sbin`, `/usr/bin`.
    pub command: &'static str,
    /// Debian package that installs it.
    pub package: &'static str,
}

/// Redis, for sessions, the registry and the gateway lease.
pub const REDIS_SERVER: Program = Program {
    command: "redis-server",
    package: "redis-server",
};

/// redis-cli (package redis-tools, pulled in by redis-server): `--cluster create` and reshard.
pub const REDIS_CLI: Program = Program {
    command: "redis-cli",
    package: "redis-tools",
};

/// HAProxy, the reference proxy of the comparisons.
pub const HAPROXY: Program = Program {
    command: "haproxy",
    package: "haproxy",
};

/// keepalived, the reference failover of the comparisons.
pub const KEEPALIVED: Program = Program {
    command: "keepalived",
    package: "keepalived",
};

/// curl, which keepalived's health script runs.
pub const CURL: Program = Program {
    command: "curl",
    package: "curl",
};

/// Node.js, for `herd bench proxy --upstream node` (an app server that is neither herd's nor
/// Rust's).
pub const NODE: Program = Program {
    command: "node",
    package: "nodejs",
};

/// Why a program is not available.
#[derive(Debug, thiserror::Error)]
pub enum DepsError {
    /// Not installed and we can't install it here.
    #[error(
        "{command} is not installed; install it with `apt-get install -y {package}` (as root on Debian) or your system's package manager"
    )]
    Missing {
        /// The missing executable.
        command: &'static str,
        /// The package to install.
        package: &'static str,
    },
    /// apt-get ran but failed.
    #[error("`apt-get install -y {package}` failed ({status}); see its output above")]
    InstallFailed {
        /// The package.
        package: &'static str,
        /// apt-get's exit status.
        status: String,
    },
}

/// Where `command` is, if anywhere.
pub fn find(command: &str) -> Option<PathBuf> {
    let path = std::env::var_os("PATH").unwrap_or_default();
    std::env::split_paths(&path)
        .chain(["/usr/sbin", "/usr/bin", "/sbin", "/bin"].map(PathBuf::from))
        .map(|dir| dir.join(command))
        .find(|candidate| candidate.is_file())
}

/// Returns the path of `program`, installing its package with apt-get first when it is missing
/// and we are root on a machine with apt-get. Installs are serialised within this process.
pub fn ensure(program: Program) -> Result<PathBuf, DepsError> {
    static INSTALLING: Mutex<()> = Mutex::new(());
    if let Some(path) = find(program.command) {
        return Ok(path);
    }
    let _guard = INSTALLING
        .lock()
        .unwrap_or_else(|poisoned| poisoned.into_inner());
    if let Some(path) = find(program.command) {
        return Ok(path);
    }
    let missing = DepsError::Missing {
        command: program.command,
        package: program.package,
    };
    if !is_root() || find("apt-get").is_none() {
        return Err(missing);
    }
    eprintln!(
        "herd: {} is missing; installing Debian package {}",
        program.command, program.package
    );
    let apt = |args: &[&str]| {
        Command::new("apt-get")
            .args(args)
            .env("DEBIAN_FRONTEND", "noninteractive")
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .status()
    };
    // A fresh machine may have no package lists yet; an update failure shows in the install.
    let _ = apt(&["update", "-qq"]);
    let status = apt(&["install", "-y", "-qq", program.package]).map_err(|_| missing)?;
    if !status.success() {
        return Err(DepsError::InstallFailed {
            package: program.package,
            status: status.to_string(),
        });
    }
    find(program.command).ok_or(DepsError::Missing {
        command: program.command,
        package: program.package,
    })
}

/// Whether this process runs as root.
pub fn is_root() -> bool {
    // The effective uid is in /proc/self/status; reading it avoids any unsafe libc call.
    std::fs::read_to_string("/proc/self/status")
        .ok()
        .and_then(|status| {
            status
                .lines()
                .find(|line| line.starts_with("Uid:"))
                .and_then(|line| line.split_whitespace().nth(2).map(|euid| euid == "0"))
        })
        .unwrap_or(false)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn finds_programs_on_the_path() {
        assert!(find("sh").is_some());
        assert!(find("no-such-program-herd").is_none());
    }

    #[test]
    fn missing_program_error_says_how_to_install() {
        let error = DepsError::Missing {
            command: "redis-server",
            package: "redis-server",
        };
        assert!(
            error
                .to_string()
                .contains("apt-get install -y redis-server")
        );
    }
}
