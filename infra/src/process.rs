//! One herd process (or redis-server) started by `herd` or a test: spawn, wait until it listens,
//! signal it, stop it, and never leave it behind.
//!
//! Each process runs in its own process group (so a Ctrl-C on `herd up` reaches herd, which then
//! stops everything in order), with stdout and stderr in files under a log directory. herd servers
//! print one JSON line per listener on stdout once bound —
//! `{"event":"listening","role":"public","addr":"127.0.0.1:PORT"}` — which is how callers learn the
//! ports of processes started on port 0. A [`Process`] that is dropped while still running is
//! killed, also when a test panics; its log tail is printed then, to explain the failure.

use std::fs::File;
use std::net::SocketAddr;
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use nix::sys::signal::{Signal, kill};
use nix::unistd::Pid;
use serde::{Deserialize, Serialize};

/// What to start. Serializable, so the state file can record how to start a process again (the
/// supervisor's restarts, `herd rollout`'s roll-back).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Spec {
    /// Short name for logs and file names, e.g. `worker-1`.
    pub name: String,
    /// The executable.
    pub program: PathBuf,
    /// Its arguments.
    pub args: Vec<String>,
    /// Extra environment variables.
    pub env: Vec<(String, String)>,
    /// Directory for `{name}.out` (stdout) and `{name}.log` (stderr).
    pub log_dir: PathBuf,
}

impl Spec {
    /// A spec with no arguments or environment.
    pub fn new(name: impl Into<String>, program: impl Into<PathBuf>, log_dir: &Path) -> Self {
        Spec {
            name: name.into(),
            program: program.into(),
            args: Vec::new(),
            env: Vec::new(),
            log_dir: log_dir.to_path_buf(),
        }
    }

    /// Adds an argument.
    pub fn arg(mut self, arg: impl Into<String>) -> Self {
        self.args.push(arg.into());
        self
    }

    /// Adds several arguments.
    pub fn args_from<I: IntoIterator<Item = S>, S: Into<String>>(mut self, args: I) -> Self {
        self.args.extend(args.into_iter().map(Into::into));
        self
    }

    /// The same command, run inside network namespace `netns` (`ip netns exec` execs it, so the
    /// pid is still the program's own).
    pub fn in_netns(self, netns: &str) -> Self {
        self.run_by("ip", ["netns", "exec", netns])
    }

    /// The same command, started inside the cgroup whose `cgroup.procs` file is `procs`: a shell
    /// writes its own pid there and execs the program (same pid), so the program and everything
    /// it starts run in the cgroup from their first instruction.
    pub fn in_cgroup(self, procs: &Path) -> Self {
        let script = r#"echo $$ > "$0" || { echo "cannot enter the cgroup of $0" >&2; exit 125; }; exec "$@""#;
        self.run_by("sh", ["-c", script, &procs.display().to_string()])
    }

    /// The same command, run by `launcher` with `launcher_args` before it (a launcher that execs
    /// it, so the pid stays the program's).
    fn run_by<const N: usize>(self, launcher: &str, launcher_args: [&str; N]) -> Self {
        let mut args: Vec<String> = launcher_args.iter().map(ToString::to_string).collect();
        args.push(self.program.display().to_string());
        args.extend(self.args);
        Spec {
            program: launcher.into(),
            args,
            ..self
        }
    }

    /// Adds an environment variable.
    pub fn env(mut self, key: impl Into<String>, value: impl Into<String>) -> Self {
        self.env.push((key.into(), value.into()));
        self
    }

    /// Sets an environment variable, replacing an earlier value of the same key.
    pub fn set_env(mut self, key: &str, value: impl Into<String>) -> Self {
        self.env.retain(|(k, _)| k != key);
        self.env.push((key.to_string(), value.into()));
        self
    }

    /// The value of an environment variable of this spec.
    pub fn env_value(&self, key: &str) -> Option<&str> {
        self.env
            .iter()
            .rev()
            .find(|(k, _)| k == key)
            .map(|(_, v)| v.as_str())
    }
}

/// One listener a herd process announced on stdout.
#[derive(Debug, Clone, Deserialize, PartialEq, Eq)]
pub struct Listening {
    /// `public` or `admin`.
    pub role: String,
    /// The bound address.
    pub addr: SocketAddr,
    /// The worker id, for workers.
    #[serde(default)]
    pub id: Option<String>,
}

/// Why a process could not be started or did not come up.
#[derive(Debug, thiserror::Error)]
pub enum ProcessError {
    /// The executable could not be started.
    #[error("cannot start {name} ({program}): {source}")]
    Spawn {
        /// Process name.
        name: String,
        /// Executable path.
        program: String,
        /// The OS error.
        source: std::io::Error,
    },
    /// A log file could not be created.
    #[error("cannot create log file {path}: {source}")]
    Log {
        /// The file.
        path: String,
        /// The OS error.
        source: std::io::Error,
    },
    /// It exited before it was ready.
    #[error("{name} exited with {status} before it was ready; last log lines:\n{log}")]
    Exited {
        /// Process name.
        name: String,
        /// Its exit status.
        status: ExitStatus,
        /// The tail of its stderr.
        log: String,
    },
    /// It did not become ready in time.
    #[error("{name} was not ready after {waited:?}; last log lines:\n{log}")]
    NotReady {
        /// Process name.
        name: String,
        /// How long we waited.
        waited: Duration,
        /// The tail of its stderr.
        log: String,
    },
}

/// Set by [`end_with_their_starter`].
static END_WITH_STARTER: AtomicBool = AtomicBool::new(false);

/// From now on, every process this program starts is killed by the kernel when the thread that
/// started it ends (`setpriv --pdeathsig KILL`, util-linux): also when this program is killed
/// with SIGKILL and has no chance to stop them. For `herd bench`, whose processes all start on
/// its one benchmark thread and live no longer than it; not for `herd up`, whose cluster
/// outlives it. Without `setpriv` on the `PATH` nothing changes, and the error says so.
pub fn end_with_their_starter() -> Result<(), String> {
    let found = std::env::var_os("PATH")
        .is_some_and(|path| std::env::split_paths(&path).any(|dir| dir.join("setpriv").is_file()));
    if !found {
        return Err(
            "setpriv (util-linux) is not on the PATH: the processes started now would \
                    outlive a herd killed with SIGKILL"
                .into(),
        );
    }
    END_WITH_STARTER.store(true, Ordering::Relaxed);
    Ok(())
}

/// A running process that is killed when dropped (unless [`Process::detach`]ed).
#[derive(Debug)]
pub struct Process {
    name: String,
    child: Child,
    out_path: PathBuf,
    log_path: PathBuf,
    listening: Vec<Listening>,
    detached: bool,
}

impl Process {
    /// Starts `spec` in its own process group, stdout and stderr to files.
    pub fn spawn(spec: &Spec) -> Result<Process, ProcessError> {
        Self::spawn_with(spec, false)
    }

    /// Keeps the logs of process `name`'s last run in `log_dir` under the next free number
    /// (`gw1.log` becomes `gw1.1.log`, the next time `gw1.2.log`), before it is started again
    /// with fresh ones: the lines of a gateway a drill stopped say what it did meanwhile.
    pub fn keep_previous_logs(log_dir: &Path, name: &str) -> std::io::Result<()> {
        let taken = |n: u32| {
            ["log", "out"]
                .iter()
                .any(|ext| log_dir.join(format!("{name}.{n}.{ext}")).exists())
        };
        let Some(free) = (1..).find(|&n| !taken(n)) else {
            return Ok(());
        };
        for ext in ["log", "out"] {
            let current = log_dir.join(format!("{name}.{ext}"));
            if current.exists() {
                std::fs::rename(&current, log_dir.join(format!("{name}.{free}.{ext}")))?;
            }
        }
        Ok(())
    }

    /// Like [`Process::spawn`], but appends to the log files instead of truncating them: a
    /// restarted process must not wipe the lines that say why its predecessor died.
    pub fn spawn_appending(spec: &Spec) -> Result<Process, ProcessError> {
        Self::spawn_with(spec, true)
    }

    fn spawn_with(spec: &Spec, append: bool) -> Result<Process, ProcessError> {
        let out_path = spec.log_dir.join(format!("{}.out", spec.name));
        let log_path = spec.log_dir.join(format!("{}.log", spec.name));
        let create = |path: &Path| {
            let opened = if append {
                std::fs::OpenOptions::new()
                    .create(true)
                    .append(true)
                    .open(path)
            } else {
                File::create(path)
            };
            opened.map_err(|source| ProcessError::Log {
                path: path.display().to_string(),
                source,
            })
        };
        let stdout = create(&out_path)?;
        let stderr = create(&log_path)?;
        let mut command = if END_WITH_STARTER.load(Ordering::Relaxed) {
            let mut setpriv = Command::new("setpriv");
            setpriv
                .args(["--pdeathsig", "KILL", "--"])
                .arg(&spec.program);
            setpriv
        } else {
            Command::new(&spec.program)
        };
        let child = command
            .args(&spec.args)
            .envs(spec.env.iter().map(|(k, v)| (k, v)))
            .stdin(Stdio::null())
            .stdout(stdout)
            .stderr(stderr)
            .process_group(0)
            .spawn()
            .map_err(|source| ProcessError::Spawn {
                name: spec.name.clone(),
                program: spec.program.display().to_string(),
                source,
            })?;
        Ok(Process {
            name: spec.name.clone(),
            child,
            out_path,
            log_path,
            listening: Vec::new(),
            detached: false,
        })
    }

    /// Starts `spec` and waits until it has announced a listener for every role in `roles`.
    pub fn spawn_and_wait(
        spec: &Spec,
        roles: &[&str],
        timeout: Duration,
    ) -> Result<Process, ProcessError> {
        let mut process = Process::spawn(spec)?;
        process.wait_listening(roles, timeout)?;
        Ok(process)
    }

    /// Waits until the process has printed a listening line for each role in `roles`.
    pub fn wait_listening(
        &mut self,
        roles: &[&str],
        timeout: Duration,
    ) -> Result<(), ProcessError> {
        self.wait_until(timeout, |process| {
            process.listening = read_listening(&process.out_path);
            roles
                .iter()
                .all(|role| process.listening.iter().any(|l| l.role == *role))
        })
    }

    /// Polls `ready` every 10 ms until it holds, the process exits, or `timeout` passes.
    pub fn wait_until(
        &mut self,
        timeout: Duration,
        mut ready: impl FnMut(&mut Process) -> bool,
    ) -> Result<(), ProcessError> {
        let started = Instant::now();
        loop {
            if ready(self) {
                return Ok(());
            }
            if let Ok(Some(status)) = self.child.try_wait() {
                return Err(ProcessError::Exited {
                    name: self.name.clone(),
                    status,
                    log: self.log_tail(20),
                });
            }
            if started.elapsed() > timeout {
                return Err(ProcessError::NotReady {
                    name: self.name.clone(),
                    waited: timeout,
                    log: self.log_tail(20),
                });
            }
            std::thread::sleep(Duration::from_millis(10));
        }
    }

    /// The address announced for `role`.
    pub fn addr(&self, role: &str) -> Option<SocketAddr> {
        self.listening
            .iter()
            .find(|l| l.role == role)
            .map(|l| l.addr)
    }

    /// Every listener announced so far.
    pub fn listening(&self) -> &[Listening] {
        &self.listening
    }

    /// Process name.
    pub fn name(&self) -> &str {
        &self.name
    }

    /// Process id.
    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    /// Path of the stderr log.
    pub fn log_path(&self) -> &Path {
        &self.log_path
    }

    /// Sends `signal` (e.g. SIGSTOP, SIGCONT, SIGTERM, SIGKILL).
    pub fn signal(&self, signal: Signal) -> nix::Result<()> {
        kill(pid(self.child.id()), signal)
    }

    /// The exit status, if it has exited.
    pub fn try_wait(&mut self) -> Option<ExitStatus> {
        self.child.try_wait().ok().flatten()
    }

    /// Waits up to `timeout` for the process to exit.
    pub fn wait_exit(&mut self, timeout: Duration) -> Option<ExitStatus> {
        let started = Instant::now();
        loop {
            if let Some(status) = self.try_wait() {
                return Some(status);
            }
            if started.elapsed() > timeout {
                return None;
            }
            std::thread::sleep(Duration::from_millis(10));
        }
    }

    /// SIGTERM, wait up to `grace` for a clean exit, then SIGKILL. Returns the exit status and
    /// whether the exit was clean (without the SIGKILL).
    pub fn terminate(&mut self, grace: Duration) -> (Option<ExitStatus>, bool) {
        if let Some(status) = self.try_wait() {
            return (Some(status), true);
        }
        let _ = self.signal(Signal::SIGCONT);
        let _ = self.signal(Signal::SIGTERM);
        if let Some(status) = self.wait_exit(grace) {
            return (Some(status), true);
        }
        self.kill();
        (self.try_wait(), false)
    }

    /// SIGKILL to the process and everything it started (its process group: keepalived's
    /// children, a gateway's `arping`), and reap it.
    pub fn kill(&mut self) {
        // The group outlives its leader, so kill it even when the leader already exited.
        let _ = nix::sys::signal::killpg(pid(self.child.id()), Signal::SIGKILL);
        if self.try_wait().is_none() {
            let _ = self.child.kill();
            let _ = self.child.wait();
        }
    }

    /// Leaves the process running after this handle is gone (for `herd up --detach`).
    pub fn detach(mut self) -> u32 {
        self.detached = true;
        self.child.id()
    }

    /// The last `lines` lines of the process's stderr; of its stdout when stderr is empty
    /// (redis-server logs to stdout: why it exited is there).
    pub fn log_tail(&self, lines: usize) -> String {
        let log = tail(&self.log_path, lines);
        if log.trim().is_empty() {
            return tail(&self.out_path, lines);
        }
        log
    }
}

impl Drop for Process {
    fn drop(&mut self) {
        if self.detached {
            return;
        }
        if std::thread::panicking() {
            eprintln!(
                "--- last log lines of {} ({}, or {} when that is empty) ---\n{}",
                self.name,
                self.log_path.display(),
                self.out_path.display(),
                self.log_tail(30)
            );
        }
        self.kill();
    }
}

/// The listening lines in a stdout file; lines that are not listening events are skipped.
pub fn read_listening(out_path: &Path) -> Vec<Listening> {
    #[derive(Deserialize)]
    struct Line {
        event: String,
        #[serde(flatten)]
        listening: Listening,
    }
    std::fs::read_to_string(out_path)
        .unwrap_or_default()
        .lines()
        .filter_map(|line| serde_json::from_str::<Line>(line).ok())
        .filter(|line| line.event == "listening")
        .map(|line| line.listening)
        .collect()
}

/// Whether a process with this pid exists (and is not a zombie we reaped).
pub fn is_alive(pid_number: u32) -> bool {
    kill(pid(pid_number), None).is_ok()
}

/// Sends `signal` to a process by pid (for processes started by an earlier `herd up`).
pub fn signal_pid(pid_number: u32, signal: Signal) -> nix::Result<()> {
    kill(pid(pid_number), signal)
}

fn pid(number: u32) -> Pid {
    Pid::from_raw(i32::try_from(number).unwrap_or(i32::MAX))
}

/// The last `lines` lines of the file at `path`, after the first panic or `main` error message
/// when that is not among them (a backtrace after it would push it out of the tail).
fn tail(path: &Path, lines: usize) -> String {
    let text = std::fs::read_to_string(path).unwrap_or_default();
    let all: Vec<&str> = text.lines().collect();
    let from = all.len().saturating_sub(lines);
    let mut shown = Vec::new();
    if let Some(at) = all[..from].iter().position(|line| is_fatal_message(line)) {
        let end = (at + 2).min(from);
        shown.extend_from_slice(&all[at..end]);
        if end < from {
            shown.push("[…]");
        }
    }
    shown.extend_from_slice(&all[from..]);
    shown.join("\n")
}

/// Whether a log line is how a herd binary or Rust itself reports a fatal error.
fn is_fatal_message(line: &str) -> bool {
    line.contains("panicked at")
        || ["Error: ", "herd-gateway: ", "herd-worker: "]
            .iter()
            .any(|start| line.starts_with(start))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_restarts_previous_logs_are_kept_under_the_next_number() {
        let dir = tempfile::tempdir().unwrap();
        let write = |name: &str, text: &str| std::fs::write(dir.path().join(name), text).unwrap();
        let read = |name: &str| std::fs::read_to_string(dir.path().join(name)).unwrap();
        write("gw1.log", "first run");
        write("gw1.out", "first out");
        Process::keep_previous_logs(dir.path(), "gw1").unwrap();
        write("gw1.log", "second run");
        Process::keep_previous_logs(dir.path(), "gw1").unwrap();
        assert_eq!(read("gw1.1.log"), "first run");
        assert_eq!(read("gw1.1.out"), "first out");
        assert_eq!(read("gw1.2.log"), "second run");
        assert!(!dir.path().join("gw1.log").exists());
        assert!(!dir.path().join("gw1.2.out").exists());
    }

    #[test]
    fn the_tail_keeps_the_reason_a_backtrace_pushed_out() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("x.log");
        let frames: String = (0..40).map(|n| format!("  {n}: frame\n")).collect();
        std::fs::write(
            &path,
            format!("starting\nherd-gateway: cannot bind 127.0.0.1:9: address in use\n\nStack backtrace:\n{frames}"),
        )
        .unwrap();
        let shown = tail(&path, 5);
        assert!(
            shown.starts_with("herd-gateway: cannot bind 127.0.0.1:9: address in use\n\n[…]\n"),
            "{shown}"
        );
        assert!(shown.ends_with("  39: frame"), "{shown}");
        assert_eq!(
            tail(&path, 100).lines().count(),
            44,
            "a whole log is shown once"
        );
    }

    #[test]
    fn reads_listening_lines_and_skips_others() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("x.out");
        std::fs::write(
            &path,
            "noise\n{\"event\":\"listening\",\"role\":\"public\",\"addr\":\"127.0.0.1:5\",\"id\":\"w1\"}\n{\"event\":\"other\"}\n",
        )
        .unwrap();
        let listening = read_listening(&path);
        assert_eq!(listening.len(), 1);
        assert_eq!(listening[0].role, "public");
        assert_eq!(listening[0].id.as_deref(), Some("w1"));
    }

    #[test]
    fn a_dropped_process_is_killed() {
        let dir = tempfile::tempdir().unwrap();
        let process = Process::spawn(&Spec::new("sleeper", "sleep", dir.path()).arg("30")).unwrap();
        let pid = process.pid();
        assert!(is_alive(pid));
        drop(process);
        assert!(!is_alive(pid));
    }

    #[test]
    fn early_exit_is_reported_with_the_log() {
        let dir = tempfile::tempdir().unwrap();
        let spec = Spec::new("failing", "sh", dir.path())
            .arg("-c")
            .arg("echo 'config error: listen: bad' >&2; exit 2");
        let error =
            Process::spawn_and_wait(&spec, &["public"], Duration::from_secs(5)).unwrap_err();
        let text = error.to_string();
        assert!(text.contains("config error: listen: bad"), "{text}");
    }

    /// A program that logs to stdout (redis-server) and exits: its last lines there are the
    /// report's, stderr being empty.
    #[test]
    fn early_exit_with_an_empty_stderr_is_reported_with_stdout() {
        let dir = tempfile::tempdir().unwrap();
        let spec = Spec::new("redis-like", "sh", dir.path())
            .arg("-c")
            .arg("echo 'Could not create server TCP listening socket: in use'; exit 1");
        let error =
            Process::spawn_and_wait(&spec, &["public"], Duration::from_secs(5)).unwrap_err();
        let text = error.to_string();
        assert!(text.contains("listening socket: in use"), "{text}");
    }
}
