//! One connection to Redis, driven by the task that uses it: the caller writes its command on
//! the socket and reads and parses the reply itself ([`crate::resp`]).
//!
//! redis-rs's `MultiplexedConnection` lets many tasks share one socket: each call goes over a
//! channel to the connection's own I/O task, which writes it, reads and parses the reply, and
//! sends it back over a oneshot, so every call wakes two tasks, often on two threads. A pooled
//! connection has one user at a time and needs none of that; the gateway's client to its workers
//! was built the same way for the same reason (docs/performance.md, sections 1 and 49).
//! Commands, pipelines and scripts are still redis-rs's (packing, `EVALSHA` with its `NOSCRIPT`
//! fallback, typed replies): this type only moves their bytes; a hot path may also hand it
//! commands it packed itself ([`WireConnection::exchange_packed`]).
//!
//! A call that does not end with its reply read whole (an I/O error, a timeout, or the caller's
//! future dropped half-way) leaves the connection out of step with Redis: it is marked broken for
//! good and [`WireConnection::is_closed`] says so, which the pool checks before handing it out.

use std::io;
use std::pin::Pin;
use std::task::{Context, Waker};
use std::time::Duration;

use bytes::{Buf, BytesMut};
use redis::aio::ConnectionLike;
use redis::{
    ConnectionAddr, ConnectionInfo, ErrorKind, ProtocolVersion, RedisError, RedisFuture,
    RedisResult, Value,
};
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt, ReadBuf};

use crate::resp;

/// Room made in the reply buffer before each read.
const READ_SIZE: usize = 4096;

/// The socket of a connection, TCP or a Unix socket.
pub(crate) trait Socket: AsyncRead + AsyncWrite + Unpin + Send {}
impl<S: AsyncRead + AsyncWrite + Unpin + Send> Socket for S {}

/// A connection to one Redis, used by one caller at a time.
pub struct WireConnection {
    socket: Box<dyn Socket>,
    /// Bytes read and not yet parsed.
    replies: BytesMut,
    db: i64,
    response_timeout: Duration,
    /// A call did not end with its reply read whole: the stream's position is unknown.
    broken: bool,
}

impl WireConnection {
    /// Connects to `info`'s address and, when it asks for them, authenticates and selects its
    /// database (one round trip). Speaks RESP2, as herd always has.
    pub async fn connect(info: &ConnectionInfo, response_timeout: Duration) -> RedisResult<Self> {
        let settings = info.redis_settings();
        if settings.protocol() != ProtocolVersion::RESP2 {
            return Err(RedisError::from((
                ErrorKind::InvalidClientConfig,
                "herd speaks RESP2 to Redis; take `protocol` out of the Redis URL",
            )));
        }
        let socket: Box<dyn Socket> = match info.addr() {
            ConnectionAddr::Tcp(host, port) => {
                let stream = tokio::net::TcpStream::connect((host.as_str(), *port)).await?;
                stream.set_nodelay(true)?;
                Box::new(stream)
            }
            #[cfg(unix)]
            ConnectionAddr::Unix(path) => Box::new(tokio::net::UnixStream::connect(path).await?),
            other => {
                return Err(RedisError::from((
                    ErrorKind::InvalidClientConfig,
                    "not a TCP or Unix socket address",
                    format!("{other:?}"),
                )));
            }
        };
        let mut connection = WireConnection {
            socket,
            replies: BytesMut::with_capacity(READ_SIZE),
            db: settings.db(),
            response_timeout,
            broken: false,
        };
        // Always one round trip: a Redis that refuses the connection (`maxclients`, protected
        // mode) says so and closes it, and that must fail the connect, not its first command.
        let mut setup = redis::pipe();
        let authenticates = settings.password().is_some();
        if let Some(password) = settings.password() {
            let auth = setup.cmd("AUTH");
            if let Some(username) = settings.username() {
                auth.arg(username);
            }
            auth.arg(password);
        }
        if settings.db() != 0 {
            setup.cmd("SELECT").arg(settings.db());
        }
        if setup.is_empty() {
            setup.cmd("PING");
        }
        let packed = setup.get_packed_pipeline();
        let replies = connection.exchange(&packed, 0, setup.len(), false).await?;
        for (n, reply) in replies.into_iter().enumerate() {
            if let Value::ServerError(error) = reply {
                let what = match n {
                    0 if authenticates => "Redis refused the URL's user or password",
                    _ if settings.db() != 0 => "Redis refused to switch to the URL's database",
                    _ => "Redis refused the connection",
                };
                return Err(RedisError::from((
                    ErrorKind::AuthenticationFailed,
                    what,
                    RedisError::from(error).to_string(),
                )));
            }
        }
        Ok(connection)
    }

    /// The connected socket, for a connection shared by many callers ([`crate::redis_line`]).
    pub(crate) fn into_socket(self) -> Box<dyn Socket> {
        self.socket
    }

    /// Whether the connection can no longer be used: a call left it out of step, or Redis
    /// closed it (or sent what nobody asked for). Costs no round trip: a look at the socket,
    /// which reads nothing unless the kernel has something for it.
    pub fn is_closed(&mut self) -> bool {
        if self.broken {
            return true;
        }
        let mut probe = [0u8; 1];
        let mut probe = ReadBuf::new(&mut probe);
        let mut context = Context::from_waker(Waker::noop());
        // Pending: nothing to read, the connection is idle and open. Anything else (its end,
        // an error, a byte Redis sent unasked) means it is not in step with Redis any more.
        if Pin::new(&mut self.socket)
            .poll_read(&mut context, &mut probe)
            .is_ready()
        {
            self.broken = true;
        }
        self.broken
    }

    /// Writes `packed` (`skip + count` commands) and reads their replies, returning the last
    /// `count`. In a transaction, a server error among the skipped replies (a command
    /// `MULTI` refused to queue) is the call's error.
    async fn exchange(
        &mut self,
        packed: &[u8],
        skip: usize,
        count: usize,
        transaction: bool,
    ) -> RedisResult<Vec<Value>> {
        let timeout = self.begin(packed)?;
        let (skipped, wanted) =
            match tokio::time::timeout(timeout, self.write_and_read(packed, skip, count)).await {
                Ok(replies) => replies?,
                Err(_) => return Err(timed_out(timeout)),
            };
        self.end();
        match skipped {
            Some(error) if transaction => Err(error),
            _ => Ok(wanted),
        }
    }

    /// Starts a call of `packed`: refuses it on a broken connection, and marks the connection
    /// broken until [`Self::end`] (a call that does not get there leaves it out of step).
    /// Returns the response timeout.
    fn begin(&mut self, packed: &[u8]) -> RedisResult<Duration> {
        if packed.is_empty() {
            return Err(RedisError::from((ErrorKind::Client, "empty command")));
        }
        if self.broken {
            return Err(io::Error::new(
                io::ErrorKind::NotConnected,
                "the connection to Redis broke in an earlier call",
            )
            .into());
        }
        self.broken = true;
        Ok(self.response_timeout)
    }

    /// Ends a call whose replies were read whole: in step with Redis again, unless it sent
    /// more than was asked.
    fn end(&mut self) {
        self.broken = !self.replies.is_empty();
    }

    /// Sends commands packed by the caller ([`resp::pack_command`], or by hand), `replies` of
    /// them, in one round trip, and has `read` read their replies in place as they came (RESP,
    /// through a [`resp::Cursor`]): no redis-rs `Cmd` is built, no `redis::Value` and no copy of
    /// the replies ([`resp::read_replies`]). `Ok(None)`: the replies came whole but were not
    /// what `read` expected. A server error among them is the call's error, as with a pipeline
    /// of those commands. `read` may be called again as more bytes come.
    pub async fn exchange_packed<T>(
        &mut self,
        packed: &[u8],
        replies: usize,
        read: impl FnMut(&mut resp::Cursor<'_>) -> Option<T>,
    ) -> RedisResult<Option<T>> {
        // A count short of the commands would leave replies owed on the connection, for its next
        // user to read as its own: packed by hand, so checked in debug builds.
        debug_assert_eq!(
            resp::commands_in(packed),
            Some(replies),
            "packed commands and replies"
        );
        let timeout = self.begin(packed)?;
        let answered = match tokio::time::timeout(
            timeout,
            self.write_and_read_in_place(packed, replies, read),
        )
        .await
        {
            Ok(answered) => answered?,
            Err(_) => return Err(timed_out(timeout)),
        };
        self.end();
        answered
    }

    /// The I/O of [`Self::exchange_packed`]: what `read` made of the replies, or the first
    /// server error among them (inner result: the replies were read whole either way).
    async fn write_and_read_in_place<T>(
        &mut self,
        packed: &[u8],
        count: usize,
        mut read: impl FnMut(&mut resp::Cursor<'_>) -> Option<T>,
    ) -> RedisResult<RedisResult<Option<T>>> {
        self.socket.write_all(packed).await?;
        loop {
            // Nothing is read before the first bytes come (there is at least one reply: an
            // empty `packed` is refused); then from the start after each read: these are short
            // replies, read in one go but for a rare long field.
            self.fill().await?;
            if let Some((end, answered)) = resp::read_replies(&self.replies, count, &mut read)? {
                self.replies.advance(end);
                return Ok(answered);
            }
        }
    }

    /// The I/O of [`Self::exchange`]: the first server error among the skipped replies, and the
    /// wanted replies.
    async fn write_and_read(
        &mut self,
        packed: &[u8],
        skip: usize,
        count: usize,
    ) -> RedisResult<(Option<RedisError>, Vec<Value>)> {
        self.socket.write_all(packed).await?;
        let mut skipped_error = None;
        for _ in 0..skip {
            if let Value::ServerError(error) = self.read_reply().await? {
                skipped_error.get_or_insert(error.into());
            }
        }
        let mut wanted = Vec::with_capacity(count);
        for _ in 0..count {
            wanted.push(self.read_reply().await?);
        }
        Ok((skipped_error, wanted))
    }

    /// The next reply, reading until it has come whole. The usual reply comes in one read and
    /// is parsed once; one that takes more reads is checked for its end as its bytes come,
    /// without parsing again what came before ([`resp::Framer`]), and parsed once whole.
    async fn read_reply(&mut self) -> RedisResult<Value> {
        let mut framer: Option<resp::Framer> = None;
        loop {
            let whole = match &mut framer {
                None => resp::parse(&self.replies)?,
                Some(framer) => match framer.advance(&self.replies)? {
                    Some(length) => resp::parse(&self.replies[..length])?,
                    None => None,
                },
            };
            if let Some((value, used)) = whole {
                self.replies.advance(used);
                return Ok(value);
            }
            if framer.is_none() && !self.replies.is_empty() {
                framer = Some(resp::Framer::default());
            }
            self.fill().await?;
        }
    }

    /// Reads what Redis sent next into the reply buffer, making at least double the room: a
    /// long reply takes few reads and few copies.
    async fn fill(&mut self) -> RedisResult<()> {
        self.replies.reserve(READ_SIZE.max(self.replies.len()));
        if self.socket.read_buf(&mut self.replies).await? == 0 {
            return Err(io::Error::new(
                io::ErrorKind::UnexpectedEof,
                "Redis closed the connection",
            )
            .into());
        }
        Ok(())
    }
}

/// The error of a call Redis did not answer within `timeout`.
fn timed_out(timeout: Duration) -> RedisError {
    io::Error::new(
        io::ErrorKind::TimedOut,
        format!("Redis did not answer within {timeout:?}"),
    )
    .into()
}

impl ConnectionLike for WireConnection {
    fn req_packed_command<'a>(&'a mut self, cmd: &'a redis::Cmd) -> RedisFuture<'a, Value> {
        Box::pin(async move {
            let packed = cmd.get_packed_command();
            if cmd.is_no_response() {
                self.exchange(&packed, 0, 0, false).await?;
                return Ok(Value::Nil);
            }
            let mut replies = self.exchange(&packed, 0, 1, false).await?;
            Ok(replies.pop().unwrap_or(Value::Nil))
        })
    }

    fn req_packed_commands<'a>(
        &'a mut self,
        pipeline: &'a redis::Pipeline,
        offset: usize,
        count: usize,
    ) -> RedisFuture<'a, Vec<Value>> {
        Box::pin(async move {
            let packed = pipeline.get_packed_pipeline();
            self.exchange(&packed, offset, count, pipeline.is_transaction())
                .await
        })
    }

    fn get_db(&self) -> i64 {
        self.db
    }
}
