//! The state directory of a local cluster and its state file: what `herd up` started, so that
//! `herd status` and `herd down` (run later, from another shell) can find it.
//!
//! Layout of the directory (default `.herd`):
//! - `state.json`: a [`State`], written once the cluster is up, removed when it is stopped;
//! - `admin-token`: the gateway's admin bearer token (mode 0600);
//! - `logs/`: `{name}.log` (stderr) and `{name}.out` (stdout) of every process;
//! - `redis/`: Redis' append-only file.
//!
//! The state file holds the admin token too, so it is written with mode 0600 as well.

use std::fs::{self, OpenOptions};
use std::io::Write;
use std::net::SocketAddr;
use std::os::unix::fs::{OpenOptionsExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use serde::{Deserialize, Serialize};

use crate::pid::ProcessId;
use crate::process::Spec;

/// Version of the state file's format; bumped when a field changes meaning.
pub const VERSION: u32 = 1;

/// Why the state directory could not be read or written.
#[derive(Debug, thiserror::Error)]
pub enum StateError {
    /// A file or directory operation failed.
    #[error("cannot {action} {path}: {source}")]
    Io {
        /// What we tried (`read`, `write`, `create`, `remove`).
        action: &'static str,
        /// The path.
        path: PathBuf,
        /// The OS error.
        source: std::io::Error,
    },
    /// The state file is not one we understand.
    #[error(
        "{path} is not a herd state file ({source}); if no herd cluster runs from this directory, remove it"
    )]
    Parse {
        /// The file.
        path: PathBuf,
        /// The JSON error.
        source: serde_json::Error,
    },
}

/// The state directory of one local cluster.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct StateDir {
    root: PathBuf,
}

impl StateDir {
    /// The state directory at `path`, made absolute (against the current directory) so that
    /// every path recorded in it still works from another directory.
    pub fn new(path: &Path) -> Result<Self, StateError> {
        let root = std::path::absolute(path).map_err(|source| StateError::Io {
            action: "resolve",
            path: path.to_path_buf(),
            source,
        })?;
        Ok(StateDir { root })
    }

    /// The directory itself.
    pub fn root(&self) -> &Path {
        &self.root
    }

    /// `state.json`.
    pub fn state_file(&self) -> PathBuf {
        self.root.join("state.json")
    }

    /// `admin-token`.
    pub fn token_file(&self) -> PathBuf {
        self.root.join("admin-token")
    }

    /// `logs/`.
    pub fn log_dir(&self) -> PathBuf {
        self.root.join("logs")
    }

    /// `redis/`.
    pub fn redis_dir(&self) -> PathBuf {
        self.root.join("redis")
    }

    /// Creates the directory with its `logs/` and `redis/` subdirectories.
    pub fn create(&self) -> Result<(), StateError> {
        for dir in [self.root.clone(), self.log_dir(), self.redis_dir()] {
            fs::create_dir_all(&dir).map_err(|source| StateError::Io {
                action: "create",
                path: dir,
                source,
            })?;
        }
        Ok(())
    }

    /// The recorded cluster, or `None` when there is no state file.
    pub fn load(&self) -> Result<Option<State>, StateError> {
        let path = self.state_file();
        let text = match fs::read_to_string(&path) {
            Ok(text) => text,
            Err(error) if error.kind() == std::io::ErrorKind::NotFound => return Ok(None),
            Err(source) => {
                return Err(StateError::Io {
                    action: "read",
                    path,
                    source,
                });
            }
        };
        serde_json::from_str(&text)
            .map(Some)
            .map_err(|source| StateError::Parse { path, source })
    }

    /// Writes the state file (atomically: a reader sees the old file or the new one).
    pub fn save(&self, state: &State) -> Result<(), StateError> {
        let json = serde_json::to_string_pretty(state).expect("a State always serializes");
        let path = self.state_file();
        let temporary = self.root.join("state.json.tmp");
        write_private(&temporary, &format!("{json}\n"))?;
        fs::rename(&temporary, &path).map_err(|source| StateError::Io {
            action: "write",
            path,
            source,
        })
    }

    /// Writes the admin token file, readable by the owner only.
    pub fn write_token(&self, token: &str) -> Result<(), StateError> {
        write_private(&self.token_file(), &format!("{token}\n"))
    }

    /// Runs `change` on the state file under an exclusive lock (`state.lock`) and saves the
    /// result if it differs: the supervisor, `herd scale` and `herd rollout` all edit the file, and none may
    /// lose another's change. Errors when there is no state file.
    pub fn update<T>(&self, change: impl FnOnce(&mut State) -> T) -> Result<T, StateError> {
        let _lock = self.lock()?;
        let mut state = self.load()?.ok_or_else(|| StateError::Io {
            action: "read",
            path: self.state_file(),
            source: std::io::Error::from(std::io::ErrorKind::NotFound),
        })?;
        let before = state.clone();
        let out = change(&mut state);
        // The supervisor looks five times a second; rewrite the file only when something changed.
        if state != before {
            self.save(&state)?;
        }
        Ok(out)
    }

    /// Holds the state directory's lock (`flock` on `state.lock`) until the returned guard is
    /// dropped.
    pub fn lock(&self) -> Result<nix::fcntl::Flock<fs::File>, StateError> {
        let path = self.root.join("state.lock");
        let io_error = |source| StateError::Io {
            action: "lock",
            path: path.clone(),
            source,
        };
        let file = OpenOptions::new()
            .create(true)
            .truncate(false)
            .write(true)
            .mode(0o600)
            .open(&path)
            .map_err(io_error)?;
        nix::fcntl::Flock::lock(file, nix::fcntl::FlockArg::LockExclusive)
            .map_err(|(_, errno)| io_error(std::io::Error::from(errno)))
    }

    /// Removes the state file and the token file (logs and Redis data stay, for a look after
    /// the fact and for the next `herd up`).
    pub fn clear(&self) -> Result<(), StateError> {
        for path in [self.state_file(), self.token_file()] {
            match fs::remove_file(&path) {
                Ok(()) => {}
                Err(error) if error.kind() == std::io::ErrorKind::NotFound => {}
                Err(source) => {
                    return Err(StateError::Io {
                        action: "remove",
                        path,
                        source,
                    });
                }
            }
        }
        Ok(())
    }
}

/// Writes `contents` to `path` with mode 0600, also when the file existed with a looser mode.
fn write_private(path: &Path, contents: &str) -> Result<(), StateError> {
    let io_error = |source| StateError::Io {
        action: "write",
        path: path.to_path_buf(),
        source,
    };
    let mut file = OpenOptions::new()
        .write(true)
        .create(true)
        .truncate(true)
        .mode(0o600)
        .open(path)
        .map_err(io_error)?;
    // `mode` only applies to a file created now; an older file keeps its mode otherwise.
    file.set_permissions(fs::Permissions::from_mode(0o600))
        .map_err(io_error)?;
    file.write_all(contents.as_bytes()).map_err(io_error)
}

/// What one member process of the cluster is.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Kind {
    /// The `herd` process that supervises the others: the foreground `herd up`, or the
    /// background `herd supervise` that `herd up --detach` leaves.
    Supervisor,
    /// The private redis-server.
    Redis,
    /// A herd-worker.
    Worker,
    /// The herd-gateway.
    Gateway,
}

/// One process of the cluster.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Member {
    /// Name in logs and output (`redis`, `worker-w1`, `gateway`, `herd`).
    pub name: String,
    /// What it is.
    pub kind: Kind,
    /// Which process it is.
    #[serde(flatten)]
    pub process: ProcessId,
    /// Its main listener (public for the gateway), if it has one.
    #[serde(default)]
    pub addr: Option<SocketAddr>,
    /// The gateway's admin listener.
    #[serde(default)]
    pub admin_addr: Option<SocketAddr>,
    /// Its stderr log.
    #[serde(default)]
    pub log: Option<PathBuf>,
    /// How to start it again (workers and gateways): the supervisor restarts it from this, on
    /// the same addresses.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub spec: Option<Spec>,
    /// The image (worker app) of a worker, e.g. `web`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub image: Option<String>,
    /// What the supervisor did to it.
    #[serde(default)]
    pub supervision: Supervision,
}

impl Member {
    /// The worker id of a worker (`w1` for `worker-w1`), the gateway id of a gateway.
    pub fn id(&self) -> &str {
        self.name
            .strip_prefix("worker-")
            .or_else(|| self.name.strip_prefix("gateway-"))
            .unwrap_or(&self.name)
    }
}

/// The supervisor's record of one member's restarts.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Supervision {
    /// Restarts since the cluster came up.
    pub restarts: u32,
    /// When it was last restarted (seconds since the Unix epoch).
    #[serde(default)]
    pub last_restart_at: Option<u64>,
    /// Set while it restarts too often (see `cli::supervisor`): it keeps being restarted, with
    /// the longest backoff, and `herd status` shows it.
    #[serde(default)]
    pub crash_loop: bool,
}

/// Everything recorded about a running local cluster.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct State {
    /// Format version ([`VERSION`]).
    pub version: u32,
    /// When the cluster came up, in seconds since the Unix epoch.
    pub started_at: u64,
    /// Whether it was started with `--detach` (no supervising `herd up`).
    pub detached: bool,
    /// Where users reach it, e.g. `http://127.0.0.1:8080`.
    pub public_url: String,
    /// The gateway's admin listener, e.g. `http://127.0.0.1:9090`.
    pub admin_url: String,
    /// The gateway's admin bearer token.
    pub admin_token: String,
    /// Redis URL the workers and the gateway use.
    pub redis_url: String,
    /// Redis key prefix of this cluster.
    pub redis_prefix: String,
    /// Every process, in start order.
    pub members: Vec<Member>,
    /// The gateway pair's floating address on the loopback interface, when there is one (root
    /// only), e.g. `127.77.3.9`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub floating_ip: Option<String>,
}

impl State {
    /// When the cluster came up.
    pub fn started(&self) -> SystemTime {
        UNIX_EPOCH + Duration::from_secs(self.started_at)
    }

    /// The supervising foreground `herd up`, if there is one.
    pub fn supervisor(&self) -> Option<&Member> {
        self.members.iter().find(|m| m.kind == Kind::Supervisor)
    }

    /// Members that still run.
    pub fn running(&self) -> Vec<&Member> {
        self.members
            .iter()
            .filter(|m| m.process.is_running())
            .collect()
    }

    /// Whether the file describes a cluster that is gone: not one of its processes still runs.
    pub fn is_stale(&self) -> bool {
        self.running().is_empty()
    }

    /// The workers, in start order.
    pub fn workers(&self) -> impl Iterator<Item = &Member> {
        self.members.iter().filter(|m| m.kind == Kind::Worker)
    }

    /// The cluster's servers in the order they must stop, grouped: gateways first (no new
    /// requests), then the workers together (they drain in parallel), Redis last (the workers
    /// need it while they drain). The supervisor is not in any group.
    pub fn stop_groups(&self) -> Vec<(Kind, Vec<&Member>)> {
        [Kind::Gateway, Kind::Worker, Kind::Redis]
            .into_iter()
            .map(|kind| {
                let members = self.members.iter().filter(|m| m.kind == kind).collect();
                (kind, members)
            })
            .filter(|(_, members): &(Kind, Vec<&Member>)| !members.is_empty())
            .collect()
    }
}

/// Seconds since the Unix epoch, now.
pub fn now_unix() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|elapsed| elapsed.as_secs())
        .unwrap_or_default()
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::process::Command;

    fn member(name: &str, kind: Kind, process: ProcessId) -> Member {
        Member {
            name: name.into(),
            kind,
            process,
            addr: Some("127.0.0.1:4000".parse().unwrap()),
            admin_addr: None,
            log: Some(PathBuf::from(format!("/tmp/{name}.log"))),
            spec: None,
            image: None,
            supervision: Supervision::default(),
        }
    }

    fn state(members: Vec<Member>) -> State {
        State {
            version: VERSION,
            started_at: 1_700_000_000,
            detached: true,
            public_url: "http://127.0.0.1:8080".into(),
            admin_url: "http://127.0.0.1:9090".into(),
            admin_token: "secret".into(),
            redis_url: "redis://127.0.0.1:6400/0".into(),
            redis_prefix: "herd:".into(),
            members,
            floating_ip: None,
        }
    }

    /// A pid that existed a moment ago and has exited (and been reaped) since.
    fn dead_process() -> ProcessId {
        let mut child = Command::new("true").spawn().unwrap();
        let id = ProcessId::of(child.id());
        child.wait().unwrap();
        id
    }

    #[test]
    fn state_file_round_trips_with_private_modes() {
        let temp = tempfile::tempdir().unwrap();
        let dir = StateDir::new(&temp.path().join("s")).unwrap();
        assert_eq!(dir.load().unwrap(), None);
        dir.create().unwrap();
        let written = state(vec![
            member("redis", Kind::Redis, ProcessId::of(std::process::id())),
            member("worker-w1", Kind::Worker, dead_process()),
        ]);
        dir.save(&written).unwrap();
        dir.write_token("secret").unwrap();
        assert_eq!(dir.load().unwrap(), Some(written));
        for path in [dir.state_file(), dir.token_file()] {
            let mode = fs::metadata(&path).unwrap().permissions().mode() & 0o777;
            assert_eq!(mode, 0o600, "{}", path.display());
        }
        assert!(dir.log_dir().is_dir() && dir.redis_dir().is_dir());
        dir.clear().unwrap();
        assert_eq!(dir.load().unwrap(), None);
        assert!(!dir.token_file().exists());
        // Clearing twice is fine.
        dir.clear().unwrap();
    }

    #[test]
    fn update_changes_the_file_under_the_lock() {
        let temp = tempfile::tempdir().unwrap();
        let dir = StateDir::new(temp.path()).unwrap();
        assert!(dir.update(|_| ()).is_err(), "no state file yet");
        dir.save(&state(vec![])).unwrap();
        let count = dir
            .update(|s| {
                s.members
                    .push(member("worker-w1", Kind::Worker, dead_process()));
                s.members.len()
            })
            .unwrap();
        assert_eq!(count, 1);
        let loaded = dir.load().unwrap().unwrap();
        assert_eq!(loaded.members[0].id(), "w1");
        // The lock is free again, and exclusive while held.
        let held = dir.lock().unwrap();
        let again = std::fs::File::open(temp.path().join("state.lock")).unwrap();
        assert!(
            nix::fcntl::Flock::lock(again, nix::fcntl::FlockArg::LockExclusiveNonblock).is_err()
        );
        drop(held);
        dir.update(|_| ()).unwrap();
    }

    #[test]
    fn relative_dirs_become_absolute() {
        let dir = StateDir::new(Path::new(".herd")).unwrap();
        assert!(dir.root().is_absolute());
        assert!(dir.state_file().ends_with(".herd/state.json"));
    }

    #[test]
    fn a_garbled_state_file_is_an_error_naming_the_file() {
        let temp = tempfile::tempdir().unwrap();
        let dir = StateDir::new(temp.path()).unwrap();
        fs::write(dir.state_file(), "{ not json").unwrap();
        let error = dir.load().unwrap_err().to_string();
        assert!(error.contains("state.json"), "{error}");
        assert!(error.contains("not a herd state file"), "{error}");
    }

    #[test]
    fn stale_when_every_process_has_exited() {
        let all_dead = state(vec![
            member("redis", Kind::Redis, dead_process()),
            member("gateway", Kind::Gateway, dead_process()),
        ]);
        assert!(all_dead.is_stale());
        let one_alive = state(vec![
            member("redis", Kind::Redis, dead_process()),
            member("gateway", Kind::Gateway, ProcessId::of(std::process::id())),
        ]);
        assert!(!one_alive.is_stale());
        assert_eq!(one_alive.running()[0].name, "gateway");
    }

    #[test]
    fn stop_order_is_gateway_workers_redis() {
        let any = ProcessId::of(std::process::id());
        let started = state(vec![
            member("herd", Kind::Supervisor, any),
            member("redis", Kind::Redis, any),
            member("worker-w1", Kind::Worker, any),
            member("worker-w2", Kind::Worker, any),
            member("gateway", Kind::Gateway, any),
        ]);
        let order: Vec<(Kind, Vec<&str>)> = started
            .stop_groups()
            .into_iter()
            .map(|(kind, members)| (kind, members.iter().map(|m| m.name.as_str()).collect()))
            .collect();
        assert_eq!(
            order,
            vec![
                (Kind::Gateway, vec!["gateway"]),
                (Kind::Worker, vec!["worker-w1", "worker-w2"]),
                (Kind::Redis, vec!["redis"]),
            ]
        );
        assert_eq!(started.supervisor().unwrap().name, "herd");
    }
}
