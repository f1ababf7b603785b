//! Redis's replies read off a buffer (RESP2): a complete reply parsed straight into
//! `redis::Value`, an incomplete one left where it is until more bytes arrive.
//!
//! redis-rs reads replies with `combine`'s resumable parser combinators: about a thousand
//! instructions per value, a sixth of a worker's instructions per session request
//! (docs/performance.md, section 49). A reply of the kinds herd's connections get (simple
//! strings, integers, bulk strings, arrays of them, in RESP2: no `HELLO 3` is sent) is read here
//! in a single pass over the buffer, with the same result as redis-rs's parser. An error reply is
//! handed to redis-rs's own parser, so that its kind (`NOSCRIPT`, `READONLY`, `LOADING`, …) is
//! what redis-rs makes of it. Anything else is a protocol error.
//!
//! [`pack_command`] and [`pack_argument`] write the other way, for a hot path that sends fixed commands without
//! building redis-rs's `Cmd`s (an allocation per argument list and per packed command).

use redis::{ErrorKind, RedisError, RedisResult, Value};

/// Arrays nested deeper than this are refused (redis-rs's limit).
const MAX_DEPTH: usize = 100;

/// The first reply in `buffer` and the bytes it took, or `None` when its last byte has not
/// arrived yet.
pub fn parse(buffer: &[u8]) -> RedisResult<Option<(Value, usize)>> {
    let mut reader = Reader { buffer, at: 0 };
    Ok(reader.value(0)?.map(|value| (value, reader.at)))
}

/// Appends the command `arguments` to `out` (a RESP array of bulk strings), as redis-rs packs a
/// `Cmd` with those arguments.
pub fn pack_command(out: &mut Vec<u8>, arguments: &[&[u8]]) {
    out.push(b'*');
    out.extend_from_slice(itoa::Buffer::new().format(arguments.len()).as_bytes());
    out.extend_from_slice(b"\r\n");
    for argument in arguments {
        pack_argument(out, argument);
    }
}

/// Appends `argument` to `out` as one argument of a command (a RESP bulk string), as redis-rs
/// packs it: for a command whose other parts are packed already (a constant around a key).
pub fn pack_argument(out: &mut Vec<u8>, argument: &[u8]) {
    let mut digits = itoa::Buffer::new();
    let length = digits.format(argument.len()).as_bytes();
    out.reserve(argument.len() + length.len() + 5);
    out.push(b'$');
    out.extend_from_slice(length);
    out.extend_from_slice(b"\r\n");
    out.extend_from_slice(argument);
    out.extend_from_slice(b"\r\n");
}

/// Finds where a reply ends as its bytes come, going on from where it stopped: a long reply
/// that takes many reads (a big array) is looked through once, not parsed again from its start
/// at each read. What it passes over is checked by [`parse`] once the reply is whole.
#[derive(Debug, Default)]
pub struct Framer {
    /// Where the next value starts.
    at: usize,
    /// Elements still to come in each array open around `at`, outermost first.
    open: Vec<usize>,
}

impl Framer {
    /// The reply's length once `buffer` (the same buffer each time, grown) holds all of it.
    pub fn advance(&mut self, buffer: &[u8]) -> RedisResult<Option<usize>> {
        loop {
            let mut reader = Reader {
                buffer,
                at: self.at,
            };
            let Some(kind) = reader.kind()? else {
                return Ok(None);
            };
            if self.open.len() >= MAX_DEPTH {
                return Err(too_deep());
            }
            reader.at += 1;
            let Some(line) = reader.line() else {
                return Ok(None);
            };
            match kind {
                b'$' => {
                    if let Some(length) = length(line)? {
                        let Some(end) = reader.bulk_end(length)? else {
                            return Ok(None);
                        };
                        reader.at = end + 2;
                    }
                }
                b'*' => {
                    if let Some(length @ 1..) = length(line)? {
                        self.open.push(length);
                        self.at = reader.at;
                        continue;
                    }
                }
                _ => {}
            }
            self.at = reader.at;
            // A whole value: it may be the last of the arrays around it.
            loop {
                let Some(left) = self.open.last_mut() else {
                    return Ok(Some(self.at));
                };
                *left -= 1;
                if *left > 0 {
                    break;
                }
                self.open.pop();
            }
        }
    }
}

/// A position in a buffer of replies.
struct Reader<'b> {
    buffer: &'b [u8],
    at: usize,
}

impl<'b> Reader<'b> {
    /// The next value, `None` when incomplete.
    fn value(&mut self, depth: usize) -> RedisResult<Option<Value>> {
        let start = self.at;
        let Some(kind) = self.kind()? else {
            return Ok(None);
        };
        if depth >= MAX_DEPTH {
            return Err(too_deep());
        }
        self.at += 1;
        let Some(line) = self.line() else {
            return Ok(None);
        };
        let value = match kind {
            b'+' => match text(line)? {
                "OK" => Value::Okay,
                other => Value::SimpleString(other.to_owned()),
            },
            b':' => Value::Int(integer(line)?),
            b'$' => {
                let Some(length) = length(line)? else {
                    return Ok(Some(Value::Nil));
                };
                let Some(end) = self.bulk_end(length)? else {
                    return Ok(None);
                };
                let bytes = self.buffer[self.at..end].to_vec();
                self.at = end + 2;
                Value::BulkString(bytes)
            }
            b'*' => {
                let Some(length) = length(line)? else {
                    return Ok(Some(Value::Nil));
                };
                // Each element takes at least 3 bytes: no allocation larger than what came.
                let room = (self.buffer.len() - self.at) / 3;
                let mut elements = Vec::with_capacity(length.min(room));
                for _ in 0..length {
                    match self.value(depth + 1)? {
                        Some(element) => elements.push(element),
                        None => return Ok(None),
                    }
                }
                Value::Array(elements)
            }
            // `-`: an error reply, whose kind is what redis-rs makes of it.
            _ => redis::parse_redis_value(&self.buffer[start..self.at])?,
        };
        Ok(Some(value))
    }

    /// Where a bulk string of `length` bytes starting here ends (before its CRLF); `None` when
    /// it has not all come.
    fn bulk_end(&self, length: usize) -> RedisResult<Option<usize>> {
        if length.saturating_add(2) > self.buffer.len() - self.at {
            return Ok(None);
        }
        let end = self.at + length;
        if &self.buffer[end..end + 2] != b"\r\n" {
            return Err(invalid("a bulk string not ended by CRLF", String::new()));
        }
        Ok(Some(end))
    }

    /// The type byte of the value here, when it is one herd reads.
    fn kind(&self) -> RedisResult<Option<u8>> {
        match self.buffer.get(self.at) {
            None => Ok(None),
            Some(&kind @ (b'+' | b':' | b'$' | b'*' | b'-')) => Ok(Some(kind)),
            Some(&other) => Err(invalid(
                "a reply type herd does not ask for (RESP2 only)",
                char::from(other).escape_default().to_string(),
            )),
        }
    }

    /// The rest of the current line, without its CRLF; `None` when it has not ended yet.
    fn line(&mut self) -> Option<&'b [u8]> {
        let rest = &self.buffer[self.at..];
        let mut from = 0;
        loop {
            let newline = from + rest[from..].iter().position(|&byte| byte == b'\n')?;
            if newline > 0 && rest[newline - 1] == b'\r' {
                self.at += newline + 1;
                return Some(&rest[..newline - 1]);
            }
            from = newline + 1;
        }
    }
}

/// A line as text (redis-rs refuses a line that is not UTF-8, too).
fn text(line: &[u8]) -> RedisResult<&str> {
    std::str::from_utf8(line).map_err(|_| invalid("a line that is not UTF-8", lossy(line)))
}

/// A line as an integer, surrounding spaces allowed (as redis-rs allows them).
fn integer(line: &[u8]) -> RedisResult<i64> {
    // What Redis sends: an optional minus and at most 18 digits, which cannot overflow.
    let (negative, digits) = match line {
        [b'-', digits @ ..] => (true, digits),
        digits => (false, digits),
    };
    if (1..=18).contains(&digits.len()) && digits.iter().all(u8::is_ascii_digit) {
        let n = digits
            .iter()
            .fold(0i64, |n, digit| n * 10 + i64::from(digit - b'0'));
        return Ok(if negative { -n } else { n });
    }
    text(line)?
        .trim()
        .parse()
        .map_err(|_| invalid("expected an integer", lossy(line)))
}

/// A bulk string's or an array's length; `None` for a negative one (nil).
fn length(line: &[u8]) -> RedisResult<Option<usize>> {
    match integer(line)? {
        ..0 => Ok(None),
        n => usize::try_from(n)
            .map(Some)
            .map_err(|_| invalid("a length past this machine's memory", lossy(line))),
    }
}

fn too_deep() -> RedisError {
    invalid("arrays nested too deep", String::new())
}

fn lossy(bytes: &[u8]) -> String {
    String::from_utf8_lossy(bytes).into_owned()
}

fn invalid(what: &'static str, detail: String) -> RedisError {
    RedisError::from((ErrorKind::Parse, what, detail))
}

#[cfg(test)]
mod tests {
    use super::*;

    /// What redis-rs's own parser makes of `bytes`, which must be one whole reply.
    fn theirs(bytes: &[u8]) -> Value {
        redis::parse_redis_value(bytes).expect("redis-rs parses it")
    }

    fn ours(bytes: &[u8]) -> (Value, usize) {
        parse(bytes).expect("parses").expect("complete")
    }

    #[test]
    fn arguments_are_packed_as_redis_rs_packs_them() {
        let long = vec![b'x'; 1000];
        let commands: [&[&[u8]]; 4] = [
            &[b"TIME"],
            &[b"HMGET", b"herd:session:abc", b"v", b"data", b""],
            &[b"SET", b"k", &long],
            &[b"ECHO", b"line\r\nbreak \xff"],
        ];
        for arguments in commands {
            let mut theirs = redis::Cmd::new();
            for argument in arguments {
                theirs.arg(*argument);
            }
            let mut ours = b"before".to_vec();
            pack_command(&mut ours, arguments);
            assert_eq!(ours[6..], theirs.get_packed_command()[..], "{arguments:?}");
        }
    }

    const REPLIES: &[&[u8]] = &[
        b"+OK\r\n",
        b"+QUEUED\r\n",
        b"+\r\n",
        b":0\r\n",
        b":-42\r\n",
        b": 7 \r\n",
        b":+7\r\n",
        b":-9223372036854775808\r\n",
        b":999999999999999999\r\n",
        b":9223372036854775807\r\n",
        b"$-1\r\n",
        b"$0\r\n\r\n",
        b"$5\r\nhello\r\n",
        b"$4\r\na\r\nb\r\n",
        b"$3\r\n\xff\x00\n\r\n",
        b"*-1\r\n",
        b"*0\r\n",
        b"*2\r\n$10\r\n1733500000\r\n$6\r\n123456\r\n",
        b"*7\r\n$1\r\n3\r\n$12\r\n{\"cart\":[1]}\r\n$-1\r\n$2\r\n17\r\n$2\r\n99\r\n$2\r\n98\r\n$-1\r\n",
        b"*3\r\n:1\r\n*2\r\n+OK\r\n$-1\r\n*0\r\n",
        b"-ERR unknown command 'FOO'\r\n",
        b"-NOSCRIPT No matching script. Please use EVAL.\r\n",
        b"-READONLY You can't write against a read only replica.\r\n",
        b"-LOADING Redis is loading the dataset in memory\r\n",
        b"*2\r\n-MOVED 3999 127.0.0.1:6381\r\n:1\r\n",
        b"+a\rb\r\n",
    ];

    #[test]
    fn every_reply_reads_as_redis_rs_reads_it() {
        for reply in REPLIES {
            let (value, used) = ours(reply);
            assert_eq!(value, theirs(reply), "{}", lossy(reply));
            assert_eq!(used, reply.len(), "{}", lossy(reply));
        }
    }

    #[test]
    fn a_reply_cut_anywhere_waits_for_the_rest() {
        for reply in REPLIES {
            for cut in 0..reply.len() {
                assert_eq!(
                    parse(&reply[..cut]).expect("no error on a prefix"),
                    None,
                    "{} cut at {cut}",
                    lossy(reply)
                );
            }
        }
    }

    #[test]
    fn the_framer_finds_each_reply_s_end_as_its_bytes_come() {
        for reply in REPLIES {
            // Fed a byte at a time, one framer going on from where it stopped.
            let mut framer = Framer::default();
            for cut in 0..reply.len() {
                assert_eq!(
                    framer.advance(&reply[..cut]).unwrap(),
                    None,
                    "{} cut at {cut}",
                    lossy(reply)
                );
            }
            assert_eq!(
                framer.advance(reply).unwrap(),
                Some(reply.len()),
                "{}",
                lossy(reply)
            );
            // And at once, with the next reply's first bytes behind it.
            let mut more = reply.to_vec();
            more.extend_from_slice(b"*3\r\n");
            assert_eq!(Framer::default().advance(&more).unwrap(), Some(reply.len()));
        }
        let deep = "*1\r\n".repeat(MAX_DEPTH) + ":1\r\n";
        assert!(Framer::default().advance(deep.as_bytes()).is_err());
    }

    #[test]
    fn replies_in_a_row_are_read_one_at_a_time() {
        let both = b"*2\r\n$10\r\n1733500000\r\n$1\r\n7\r\n$3\r\nabc\r\n:5";
        let (first, used) = ours(both);
        assert_eq!(first, theirs(b"*2\r\n$10\r\n1733500000\r\n$1\r\n7\r\n"));
        let (second, more) = ours(&both[used..]);
        assert_eq!(second, Value::BulkString(b"abc".to_vec()));
        assert_eq!(parse(&both[used + more..]).unwrap(), None);
    }

    #[test]
    fn malformed_replies_are_protocol_errors() {
        for bad in [
            &b"$3\r\nabcd\r\n"[..],
            b":12x\r\n",
            b":9223372036854775808\r\n",
            b":-\r\n",
            b":\r\n",
            b"*z\r\n",
            b"+\xff\xfe\r\n",
            b"%1\r\n+a\r\n+b\r\n",
            b"!",
        ] {
            let error = parse(bad).expect_err(&lossy(bad));
            assert_eq!(error.kind(), ErrorKind::Parse, "{}", lossy(bad));
        }
    }

    #[test]
    fn nesting_past_the_limit_is_refused_and_a_huge_count_allocates_nothing_ahead() {
        let deep = "*1\r\n".repeat(MAX_DEPTH) + ":1\r\n";
        assert!(parse(deep.as_bytes()).is_err());
        assert!(redis::parse_redis_value(deep.as_bytes()).is_err());
        let within = "*1\r\n".repeat(MAX_DEPTH - 1) + ":1\r\n";
        assert_eq!(ours(within.as_bytes()).0, theirs(within.as_bytes()));
        assert_eq!(parse(b"*4611686018427387903\r\n:1\r\n").unwrap(), None);
    }
}
