//! A private `redis-server` for a local cluster or a test: on a free (or given) loopback port,
//! with its data in a given directory, append-only so that a restart keeps the sessions.

use std::io::{Read, Write};
use std::net::{Ipv4Addr, SocketAddr, TcpStream};
use std::path::{Path, PathBuf};
use std::time::Duration;

use crate::deps::{self, DepsError, REDIS_SERVER};
use crate::ports::free_port;
use crate::process::{Process, ProcessError, Spec};

/// How long redis-server gets to answer PING after starting.
const START_TIMEOUT: Duration = Duration::from_secs(10);

/// Why redis-server could not be started.
#[derive(Debug, thiserror::Error)]
pub enum RedisServerError {
    /// Not installed and not installable here.
    #[error(transparent)]
    Missing(#[from] DepsError),
    /// It did not start or did not answer.
    #[error(transparent)]
    Process(#[from] ProcessError),
    /// No free port found.
    #[error("cannot find a free port: {0}")]
    Port(std::io::Error),
}

/// A running redis-server, stopped when dropped.
#[derive(Debug)]
pub struct RedisServer {
    process: Option<Process>,
    program: PathBuf,
    bind: Ipv4Addr,
    /// Network namespace to run in (a host of a [`crate::netns::Topology`]), if any.
    netns: Option<String>,
    port: u16,
    data_dir: PathBuf,
    log_dir: PathBuf,
    /// More `redis-server` arguments (cluster mode).
    extra: Vec<String>,
}

impl RedisServer {
    /// Starts redis-server on `port` (or a free one) with data in `data_dir` and logs in
    /// `log_dir`, and waits until it answers PING.
    pub fn start(
        port: Option<u16>,
        data_dir: &Path,
        log_dir: &Path,
    ) -> Result<Self, RedisServerError> {
        Self::start_with(port, data_dir, log_dir, &[])
    }

    /// [`start`](Self::start) with more `redis-server` arguments (e.g. `--cluster-enabled yes`).
    pub fn start_with(
        port: Option<u16>,
        data_dir: &Path,
        log_dir: &Path,
        extra: &[String],
    ) -> Result<Self, RedisServerError> {
        let program = deps::ensure(REDIS_SERVER)?;
        let mut attempt = 0;
        loop {
            attempt += 1;
            let chosen = match port {
                Some(port) => port,
                None => free_port().map_err(RedisServerError::Port)?,
            };
            let mut server = RedisServer {
                process: None,
                program: program.clone(),
                bind: Ipv4Addr::LOCALHOST,
                netns: None,
                port: chosen,
                data_dir: data_dir.to_path_buf(),
                log_dir: log_dir.to_path_buf(),
                extra: extra.to_vec(),
            };
            match server.start_again() {
                Ok(()) => return Ok(server),
                // A free port can be taken between our check and redis' bind: try another.
                Err(_) if port.is_none() && attempt < 5 => continue,
                Err(error) => return Err(error),
            }
        }
    }

    /// Starts redis-server inside network namespace `netns`, listening on `bind:port`. Readiness
    /// is read from its log ("Ready to accept connections"), since this process can't reach the
    /// namespace's addresses.
    pub fn start_in_netns(
        netns: &str,
        bind: Ipv4Addr,
        port: u16,
        data_dir: &Path,
        log_dir: &Path,
    ) -> Result<Self, RedisServerError> {
        let mut server = RedisServer {
            process: None,
            program: deps::ensure(REDIS_SERVER)?,
            bind,
            netns: Some(netns.to_string()),
            port,
            data_dir: data_dir.to_path_buf(),
            log_dir: log_dir.to_path_buf(),
            extra: Vec::new(),
        };
        server.start_again()?;
        Ok(server)
    }

    /// Starts the server again after [`stop`](Self::stop) or [`kill`](Self::kill), on the same
    /// port and data directory.
    pub fn start_again(&mut self) -> Result<(), RedisServerError> {
        let spec = Spec::new(format!("redis-{}", self.port), &self.program, &self.log_dir)
            .arg("--port")
            .arg(self.port.to_string())
            .arg("--bind")
            .arg(self.bind.to_string())
            .arg("--dir")
            .arg(self.data_dir.display().to_string())
            .arg("--save")
            .arg("")
            .arg("--appendonly")
            .arg("yes")
            .arg("--logfile")
            .arg("")
            .arg("--daemonize")
            .arg("no");
        let spec = self
            .extra
            .iter()
            .fold(spec, |spec, arg| spec.arg(arg.clone()));
        let spec = match &self.netns {
            // Inside a lab namespace clients come from other hosts of the isolated segment, which
            // protected mode (no password, non-loopback client) would turn away.
            Some(netns) => spec.arg("--protected-mode").arg("no").in_netns(netns),
            None => spec,
        };
        let mut process = Process::spawn(&spec)?;
        let addr = self.addr();
        let out_path = self.log_path();
        let in_netns = self.netns.is_some();
        process.wait_until(START_TIMEOUT, |_| {
            if in_netns {
                std::fs::read_to_string(&out_path)
                    .is_ok_and(|log| log.contains("Ready to accept connections"))
            } else {
                ping(addr)
            }
        })?;
        self.process = Some(process);
        Ok(())
    }

    /// Stops the server cleanly (SIGTERM; it flushes its append-only file).
    pub fn stop(&mut self) {
        if let Some(mut process) = self.process.take() {
            process.terminate(Duration::from_secs(10));
        }
    }

    /// Kills the server (SIGKILL), as a crash would.
    pub fn kill(&mut self) {
        if let Some(mut process) = self.process.take() {
            process.kill();
        }
    }

    /// Whether the server is running (started and not stopped).
    pub fn is_running(&self) -> bool {
        self.process.is_some()
    }

    /// The port it listens on.
    pub fn port(&self) -> u16 {
        self.port
    }

    /// Its address.
    pub fn addr(&self) -> SocketAddr {
        SocketAddr::from((self.bind, self.port))
    }

    /// Its pid, while it runs.
    pub fn pid(&self) -> Option<u32> {
        self.process.as_ref().map(Process::pid)
    }

    /// Its log file. Redis logs to stdout here (`--logfile ""`), which goes to
    /// `redis-{port}.out` in the log directory.
    pub fn log_path(&self) -> PathBuf {
        self.log_dir.join(format!("redis-{}.out", self.port))
    }

    /// A `redis://` URL for database 0.
    pub fn url(&self) -> String {
        format!("redis://{}:{}/0", self.bind, self.port)
    }

    /// Leaves the server running after this handle is gone (for `herd up --detach`); returns
    /// its pid.
    pub fn detach(mut self) -> Option<u32> {
        self.process.take().map(Process::detach)
    }
}

impl Drop for RedisServer {
    fn drop(&mut self) {
        self.kill();
    }
}

/// Whether a Redis server at `addr` answers PING with PONG within 200 ms.
pub fn ping(addr: SocketAddr) -> bool {
    let timeout = Duration::from_millis(200);
    let Ok(mut stream) = TcpStream::connect_timeout(&addr, timeout) else {
        return false;
    };
    let _ = stream.set_read_timeout(Some(timeout));
    let _ = stream.set_write_timeout(Some(timeout));
    if stream.write_all(b"PING\r\n").is_err() {
        return false;
    }
    let mut reply = [0u8; 7];
    stream.read_exact(&mut reply).is_ok() && &reply == b"+PONG\r\n"
}
