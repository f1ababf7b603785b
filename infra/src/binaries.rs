//! Finding the `herd-gateway`, `herd-worker` and `herd` executables.
//!
//! Order: the directory in `HERD_BIN_DIR`, then the directory of the running executable and its
//! parent (cargo puts test executables in `target/<profile>/deps/`, binaries one level up).

use std::path::{Path, PathBuf};

/// The gateway executable's name.
pub const GATEWAY: &str = "herd-gateway";
/// The worker (demo app) executable's name.
pub const WORKER: &str = "herd-worker";
/// The operator CLI's executable name (for tests that run it).
pub const HERD: &str = "herd";

/// A herd executable that could not be found.
#[derive(Debug, thiserror::Error)]
#[error(
    "cannot find the `{name}` executable (looked in {searched}); build it with `cargo build --release --bins` or set HERD_BIN_DIR"
)]
pub struct NotFound {
    /// Executable name.
    pub name: String,
    /// Directories searched, comma-separated.
    pub searched: String,
}

/// The path of the herd executable `name`.
pub fn locate(name: &str) -> Result<PathBuf, NotFound> {
    let dirs = search_dirs();
    dirs.iter()
        .map(|dir| dir.join(name))
        .find(|path| path.is_file())
        .ok_or_else(|| NotFound {
            name: name.to_string(),
            searched: dirs
                .iter()
                .map(|dir| dir.display().to_string())
                .collect::<Vec<_>>()
                .join(", "),
        })
}

fn search_dirs() -> Vec<PathBuf> {
    let mut dirs = Vec::new();
    if let Some(dir) = std::env::var_os("HERD_BIN_DIR") {
        dirs.push(PathBuf::from(dir));
    }
    if let Ok(exe) = std::env::current_exe() {
        let mut dir = exe.parent().map(Path::to_path_buf);
        for _ in 0..2 {
            if let Some(current) = dir {
                dir = current.parent().map(Path::to_path_buf);
                dirs.push(current);
            }
        }
    }
    dirs
}
