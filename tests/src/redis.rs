//! A private redis-server for one test.

use herd::redis_server::RedisServer;

/// A redis-server on a free port with its own temp dir; killed and removed on drop.
#[derive(Debug)]
pub struct TestRedis {
    server: RedisServer,
    // Dropped after the server (fields drop in order), so the server never outlives its files.
    _dir: tempfile::TempDir,
}

impl TestRedis {
    /// Starts one (installing redis-server with apt-get when missing and allowed).
    pub fn start() -> Self {
        let dir = crate::temp_dir();
        let server = RedisServer::start(None, dir.path(), dir.path())
            .unwrap_or_else(|error| panic!("cannot start redis-server: {error}"));
        TestRedis { server, _dir: dir }
    }

    /// `redis://127.0.0.1:PORT/0`.
    pub fn url(&self) -> String {
        self.server.url()
    }

    /// The port.
    pub fn port(&self) -> u16 {
        self.server.port()
    }

    /// Stops it cleanly (as `redis-cli shutdown` would); data is kept for [`start_again`].
    ///
    /// [`start_again`]: Self::start_again
    pub fn stop(&mut self) {
        self.server.stop();
    }

    /// Its process id while it runs (to stop it with SIGSTOP: alive but silent).
    pub fn pid(&self) -> Option<u32> {
        self.server.pid()
    }

    /// Kills it with SIGKILL, as a crash would.
    pub fn kill(&mut self) {
        self.server.kill();
    }

    /// Starts it again on the same port with the same data.
    pub fn start_again(&mut self) {
        self.server
            .start_again()
            .unwrap_or_else(|error| panic!("cannot restart redis-server: {error}"));
    }

    /// A plain client for inspecting keys from the test.
    pub fn client(&self) -> ::redis::Client {
        ::redis::Client::open(self.url()).expect("valid url")
    }

    /// A multiplexed async connection for the test's own checks.
    pub async fn connection(&self) -> ::redis::aio::MultiplexedConnection {
        self.client()
            .get_multiplexed_async_connection()
            .await
            .expect("connect to test redis")
    }
}
