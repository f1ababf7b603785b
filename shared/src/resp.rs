//! Redis's replies read off a buffer (RESP2): a complete reply parsed straight into
//! `redis::Value` ([`parse`]), or, for a hot path that knows what it asked for, read in place
//! ([`read_replies`] with a [`Cursor`]), and only when they are not what it expected looked
//! through for their end and first server error without building anything ([`replies_end`]);
//! an incomplete one is left where it is until more bytes arrive.
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

/// Where the first `count` replies in `buffer` end, and the first server error among them
/// (one nested in an array too), found without building them; `None` when they have not all
/// come. A malformed reply is a protocol error, as with [`parse`].
pub fn replies_end(
    buffer: &[u8],
    count: usize,
) -> RedisResult<Option<(usize, Option<RedisError>)>> {
    match plain_replies_end(buffer, count) {
        Plain::End(end) => return Ok(Some((end, None))),
        Plain::Incomplete => return Ok(None),
        Plain::Other => {}
    }
    careful_replies_end(buffer, count)
}

/// [`replies_end`] value by value, every kind of reply read and checked, the first server error
/// kept.
fn careful_replies_end(
    buffer: &[u8],
    count: usize,
) -> RedisResult<Option<(usize, Option<RedisError>)>> {
    let mut reader = Reader { buffer, at: 0 };
    let mut first_error = None;
    for _ in 0..count {
        if reader.skip(0, &mut first_error)?.is_none() {
            return Ok(None);
        }
    }
    Ok(Some((reader.at, first_error)))
}

/// What [`plain_replies_end`] found.
#[derive(Debug, PartialEq, Eq)]
enum Plain {
    /// The replies end here.
    End(usize),
    /// Not all here yet, and all before that plain: the careful walk would wait too.
    Incomplete,
    /// Something the tight pass does not read: the careful walk decides.
    Other,
}

/// [`replies_end`]'s common case, in one tight pass with nothing but counters: `count` replies
/// made of arrays, bulk strings and integers whose numbers are plain (`-`, then 1 to 18 digits),
/// as herd's hot paths get them (the shared line cuts every batch of replies with this).
/// [`Plain::Other`] when it meets anything else (an error reply, a simple string, arrays nested
/// deeper than it follows, a number written otherwise): the careful walk then decides, with the
/// same answer where both give one (unit tests here, and `shared/tests/resp_properties.rs`).
fn plain_replies_end(buffer: &[u8], count: usize) -> Plain {
    /// Arrays followed one inside another (deeper: the careful walk).
    const DEPTH: usize = 8;
    let mut open = [0usize; DEPTH];
    let (mut depth, mut at, mut left) = (0, 0, count);
    while left > 0 {
        let kind = match buffer.get(at) {
            None => return Plain::Incomplete,
            Some(&kind @ (b'$' | b'*' | b':')) => kind,
            // Error replies, simple strings, and what the careful walk refuses.
            Some(_) => return Plain::Other,
        };
        let (number, next) = match plain_number(buffer, at + 1) {
            Ok(read) => read,
            Err(plain) => return plain,
        };
        at = next;
        match kind {
            b'$' if number >= 0 => {
                let Some(end) = usize::try_from(number)
                    .ok()
                    .and_then(|length| at.checked_add(length))
                    .filter(|end| *end <= usize::MAX - 2)
                else {
                    return Plain::Other;
                };
                match buffer.get(end..end + 2) {
                    None => return Plain::Incomplete,
                    Some(b"\r\n") => at = end + 2,
                    Some(_) => return Plain::Other,
                }
            }
            b'*' if number > 0 => {
                if depth == DEPTH {
                    return Plain::Other;
                }
                let Ok(elements) = usize::try_from(number) else {
                    return Plain::Other;
                };
                open[depth] = elements;
                depth += 1;
                continue;
            }
            // A nil bulk string or array, an empty array, an integer: whole already.
            _ => {}
        }
        // A whole value: it may be the last of the arrays around it.
        loop {
            if depth == 0 {
                left -= 1;
                break;
            }
            open[depth - 1] -= 1;
            if open[depth - 1] > 0 {
                break;
            }
            depth -= 1;
        }
    }
    Plain::End(at)
}

/// A plain number at `at` (an optional `-`, 1 to 18 digits, CRLF) and where its line ends, read
/// as [`integer`] reads it; [`Plain::Incomplete`] when the bytes end before its line does
/// (the careful walk waits for a line's end too), [`Plain::Other`] for anything else.
#[inline]
fn plain_number(buffer: &[u8], at: usize) -> Result<(i64, usize), Plain> {
    let negative = buffer.get(at) == Some(&b'-');
    let first = at + usize::from(negative);
    let (mut number, mut end) = (0i64, first);
    loop {
        let Some(byte) = buffer.get(end) else {
            return Err(Plain::Incomplete);
        };
        let digit = byte.wrapping_sub(b'0');
        if digit > 9 {
            break;
        }
        if end - first == 18 {
            return Err(Plain::Other);
        }
        number = number * 10 + i64::from(digit);
        end += 1;
    }
    match buffer.get(end..end + 2) {
        _ if end == first => Err(Plain::Other),
        Some(b"\r\n") => Ok((if negative { -number } else { number }, end + 2)),
        // One byte after the digits: the careful walk finds no line end yet either.
        None => Err(Plain::Incomplete),
        Some(_) => Err(Plain::Other),
    }
}

/// Replies of commands sent together, read in place by a hot path that knows what it asked
/// for ([`Cursor`]), once: `count` of them at the start of `buffer`. When `read` makes something
/// of exactly `count` whole replies, that is the answer, and the replies were looked at once.
/// Otherwise (they have not all come, one is a server error, or they are not what `read`
/// expects) they are looked through for their end ([`replies_end`]): not all here yet is
/// `Ok(None)`; all here is where they end and what `read` made of them (`Ok(None)`: not what
/// it expected) or the first server error among them. A malformed reply is a protocol error,
/// as with [`parse`]. `read` may be called again as more bytes come.
pub fn read_replies<'b, T>(
    buffer: &'b [u8],
    count: usize,
    read: impl FnOnce(&mut Cursor<'b>) -> Option<T>,
) -> RedisResult<Option<(usize, RedisResult<Option<T>>)>> {
    let mut cursor = Cursor::new(buffer);
    if let Some(value) = read(&mut cursor)
        && cursor.replies_read() == count
    {
        return Ok(Some((cursor.reader.at, Ok(Some(value)))));
    }
    // A read that took fewer or more replies than were asked for is no answer either: the
    // connection's place in the stream is where the replies end, whatever `read` took.
    Ok(replies_end(buffer, count)?.map(|(end, error)| match error {
        Some(error) => (end, Err(error)),
        None => (end, Ok(None)),
    }))
}

/// Arrays a [`Cursor`] follows into, one inside another (a deeper one is "not what was
/// expected": [`read_replies`] looks through it the long way).
const CURSOR_DEPTH: usize = 4;

/// Replies read in place, value by value, by a hot path that knows what it asked for: no
/// `redis::Value` is built and nothing is allocated (a `Value` per bulk string was a dozen
/// allocations per session load; docs/performance.md, section 52). Each method reads the next
/// value if it is of its kind; `None` (and the cursor unmoved) when it is not, or is cut short
/// or malformed. Read `Some(None)` as a nil value and `None` as "not what was expected":
/// `cursor.bulk()??` is the bytes of a bulk string that must be there. The cursor counts the
/// whole replies it has read ([`Cursor::replies_read`]), the elements of arrays included.
#[derive(Debug)]
pub struct Cursor<'b> {
    reader: Reader<'b>,
    /// Elements still to read of each array open around the cursor, outermost first.
    open: [usize; CURSOR_DEPTH],
    /// How many arrays are open (the first entries of `open`).
    depth: usize,
    /// Whole replies read.
    replies: usize,
}

impl<'b> Cursor<'b> {
    /// A cursor at the first of `replies`.
    pub fn new(replies: &'b [u8]) -> Self {
        Cursor {
            reader: Reader {
                buffer: replies,
                at: 0,
            },
            open: [0; CURSOR_DEPTH],
            depth: 0,
            replies: 0,
        }
    }

    /// An array's length (`Some(None)`: a nil array); its elements are the values that follow.
    pub fn array(&mut self) -> Option<Option<usize>> {
        let start = self.reader.at;
        let line = self.header(b'*')?;
        match length(line) {
            Ok(Some(elements @ 1..)) if self.depth < CURSOR_DEPTH => {
                self.open[self.depth] = elements;
                self.depth += 1;
                Some(Some(elements))
            }
            // Empty or nil: a whole value already.
            Ok(read @ (None | Some(0))) => {
                self.value_read();
                Some(read)
            }
            // Deeper than the cursor follows, or not a length.
            _ => {
                self.reader.at = start;
                None
            }
        }
    }

    /// A bulk string's bytes (`Some(None)`: nil, as `HMGET` answers for a field not there).
    pub fn bulk(&mut self) -> Option<Option<&'b [u8]>> {
        let start = self.reader.at;
        let line = self.header(b'$')?;
        let read = match length(line) {
            Ok(None) => Some(None),
            Ok(Some(length)) => match self.reader.bulk_end(length) {
                Ok(Some(end)) => {
                    let bytes = &self.reader.buffer[self.reader.at..end];
                    self.reader.at = end + 2;
                    Some(Some(bytes))
                }
                _ => None,
            },
            Err(_) => None,
        };
        self.settle(start, read)
    }

    /// The next whole value as redis-rs's `Value`, whatever its shape (a script's reply);
    /// `None` (the cursor unmoved) when it is a server error, which [`read_replies`] then
    /// hands back as the error it is, or is cut short or malformed.
    pub fn value(&mut self) -> Option<Value> {
        let start = self.reader.at;
        if self.reader.buffer.get(start) == Some(&b'-') {
            return None;
        }
        let read = self.reader.value(self.depth).ok().flatten();
        self.settle(start, read)
    }

    /// An integer reply (`HSET`'s, `INCR`'s).
    pub fn integer(&mut self) -> Option<i64> {
        let start = self.reader.at;
        let line = self.header(b':')?;
        let read = integer(line).ok();
        self.settle(start, read)
    }

    /// Whole replies read so far: an array counts once all its elements are read.
    pub fn replies_read(&self) -> usize {
        self.replies
    }

    /// Ends the read of a value that started at `start`: counted when it was read, the cursor
    /// put back there when not.
    fn settle<T>(&mut self, start: usize, read: Option<T>) -> Option<T> {
        match read {
            Some(_) => self.value_read(),
            None => self.reader.at = start,
        }
        read
    }

    /// Counts a value just read: one more element of the innermost open array (which, once
    /// whole, is a value of the one around it), or a whole reply.
    fn value_read(&mut self) {
        while self.depth > 0 {
            let left = &mut self.open[self.depth - 1];
            *left -= 1;
            if *left > 0 {
                return;
            }
            self.depth -= 1;
        }
        self.replies += 1;
    }

    /// The line after a `kind` byte here, the cursor past it; `None` (cursor unmoved) when the
    /// next value is another kind or its line has not ended.
    fn header(&mut self, kind: u8) -> Option<&'b [u8]> {
        if self.reader.buffer.get(self.reader.at) != Some(&kind) {
            return None;
        }
        let start = self.reader.at;
        self.reader.at += 1;
        let line = self.reader.line();
        if line.is_none() {
            self.reader.at = start;
        }
        line
    }
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

/// How many commands `packed` holds, as [`pack_command`] packs them (arrays of bulk strings),
/// or `None` when it is not whole commands: read by their lengths, nothing built. A caller that
/// shares a connection checks what it packed against the replies it will wait for.
pub fn commands_in(packed: &[u8]) -> Option<usize> {
    /// The number after `marker` at `at`, up to its `\r\n`; and where the line ends. Plain
    /// digits only, as packing writes them, added up in one tight pass: every call on the
    /// shared line pays this count, a script's call with a dozen arguments and more
    /// (`str::parse` per number was 80 instructions a header).
    fn header(packed: &[u8], at: usize, marker: u8) -> Option<(usize, usize)> {
        if *packed.get(at)? != marker {
            return None;
        }
        let (mut number, mut end) = (0u64, at + 1);
        loop {
            let digit = packed.get(end)?.wrapping_sub(b'0');
            if digit > 9 {
                break;
            }
            // 18 digits at most: no overflow of a u64.
            if end - at > 18 {
                return None;
            }
            number = number * 10 + u64::from(digit);
            end += 1;
        }
        let number = usize::try_from(number).ok()?;
        (end > at + 1 && packed.get(end..end + 2)? == b"\r\n").then_some((number, end + 2))
    }
    let (mut at, mut commands) = (0, 0);
    while at < packed.len() {
        let (arguments, mut next) = header(packed, at, b'*')?;
        // Redis answers an empty command with nothing at all: counted as one, it would take
        // the next command's reply.
        if arguments == 0 {
            return None;
        }
        for _ in 0..arguments {
            let (length, start) = header(packed, next, b'$')?;
            let end = start.checked_add(length)?;
            if packed.get(end..end + 2)? != b"\r\n" {
                return None;
            }
            next = end + 2;
        }
        at = next;
        commands += 1;
    }
    Some(commands)
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
            let Some((kind, line)) = reader.head(self.open.len())? else {
                return Ok(None);
            };
            match kind {
                b'$' => {
                    let Some(()) = reader.pass_bulk(line)? else {
                        return Ok(None);
                    };
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
#[derive(Debug)]
struct Reader<'b> {
    buffer: &'b [u8],
    at: usize,
}

impl<'b> Reader<'b> {
    /// The next value, `None` when incomplete.
    fn value(&mut self, depth: usize) -> RedisResult<Option<Value>> {
        let start = self.at;
        let Some((kind, line)) = self.head(depth)? else {
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

    /// Passes over the next value, keeping the first server error met (`first_error`); `None`
    /// when it is incomplete. Checks what [`Self::value`] checks.
    fn skip(
        &mut self,
        depth: usize,
        first_error: &mut Option<RedisError>,
    ) -> RedisResult<Option<()>> {
        let start = self.at;
        let Some((kind, line)) = self.head(depth)? else {
            return Ok(None);
        };
        match kind {
            b'+' => {
                text(line)?;
            }
            b':' => {
                integer(line)?;
            }
            b'$' => {
                let Some(()) = self.pass_bulk(line)? else {
                    return Ok(None);
                };
            }
            b'*' => {
                if let Some(length) = length(line)? {
                    for _ in 0..length {
                        if self.skip(depth + 1, first_error)?.is_none() {
                            return Ok(None);
                        }
                    }
                }
            }
            // `-`: an error reply, whose kind is what redis-rs makes of it. Every one is read
            // (refused where `value` refuses it), the first kept.
            _ => {
                if let Value::ServerError(error) =
                    redis::parse_redis_value(&self.buffer[start..self.at])?
                {
                    first_error.get_or_insert(error.into());
                }
            }
        }
        Ok(Some(()))
    }

    /// The type byte and the first line of the value here (`depth` arrays deep), the reader
    /// past them; `None` when the line has not ended yet.
    #[inline]
    fn head(&mut self, depth: usize) -> RedisResult<Option<(u8, &'b [u8])>> {
        let Some(kind) = self.kind()? else {
            return Ok(None);
        };
        if depth >= MAX_DEPTH {
            return Err(too_deep());
        }
        self.at += 1;
        Ok(self.line().map(|line| (kind, line)))
    }

    /// Passes over the bytes of a bulk string whose first line was `line` (none for nil);
    /// `None` when they have not all come.
    #[inline]
    fn pass_bulk(&mut self, line: &[u8]) -> RedisResult<Option<()>> {
        if let Some(length) = length(line)? {
            let Some(end) = self.bulk_end(length)? else {
                return Ok(None);
            };
            self.at = end + 2;
        }
        Ok(Some(()))
    }

    /// Where a bulk string of `length` bytes starting here ends (before its CRLF); `None` when
    /// it has not all come.
    #[inline]
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
    #[inline]
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
    #[inline]
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
#[inline]
fn integer(line: &[u8]) -> RedisResult<i64> {
    // What Redis sends: an optional minus and at most 18 digits, which cannot overflow. Read
    // here, inlined where lengths are read (a dozen times a session load); anything else goes
    // to the out-of-line fallback, whose error building would otherwise make every call pay
    // for a large stack frame (docs/performance.md, section 57).
    let (negative, digits) = match line {
        [b'-', digits @ ..] => (true, digits),
        digits => (false, digits),
    };
    if (1..=18).contains(&digits.len()) {
        // One pass: the digits checked as they are added up.
        let mut n = 0i64;
        let mut all_digits = true;
        for &byte in digits {
            let digit = byte.wrapping_sub(b'0');
            all_digits &= digit <= 9;
            // Wrapping: a line of other bytes may overflow here, and is refused below.
            n = n.wrapping_mul(10).wrapping_add(i64::from(digit));
        }
        if all_digits {
            return Ok(if negative { -n } else { n });
        }
    }
    integer_otherwise(line)
}

/// [`integer`] for a line that is not a plain run of digits: spaces around them, a plus sign,
/// 19 digits, or not a number at all.
#[cold]
#[inline(never)]
fn integer_otherwise(line: &[u8]) -> RedisResult<i64> {
    text(line)?
        .trim()
        .parse()
        .map_err(|_| invalid("expected an integer", lossy(line)))
}

/// A bulk string's or an array's length; `None` for a negative one (nil).
#[inline]
fn length(line: &[u8]) -> RedisResult<Option<usize>> {
    match integer(line)? {
        ..0 => Ok(None),
        n => usize::try_from(n)
            .map(Some)
            .map_err(|_| invalid("a length past this machine's memory", lossy(line))),
    }
}

#[cold]
fn too_deep() -> RedisError {
    invalid("arrays nested too deep", String::new())
}

fn lossy(bytes: &[u8]) -> String {
    String::from_utf8_lossy(bytes).into_owned()
}

#[cold]
fn invalid(what: &'static str, detail: String) -> RedisError {
    RedisError::from((ErrorKind::Parse, what, detail))
}

#[cfg(test)]
mod tests {

    #[test]
    fn packed_commands_are_counted_by_their_lengths() {
        let mut packed = Vec::new();
        assert_eq!(commands_in(&packed), Some(0));
        pack_command(&mut packed, &[b"TIME"]);
        pack_command(&mut packed, &[b"HMGET", b"k\r\n*1", b""]);
        assert_eq!(
            commands_in(&packed),
            Some(2),
            "a CRLF inside an argument is its bytes"
        );
        // Cut anywhere but after TIME's 14 bytes, it is not whole commands.
        for cut in 1..packed.len() {
            let whole = (cut == 14).then_some(1);
            assert_eq!(commands_in(&packed[..cut]), whole, "cut at {cut}");
        }
        assert_eq!(
            commands_in(b"*1\r\n$4\r\nTIMEx\r\n"),
            None,
            "length short of the bytes"
        );
        assert_eq!(
            commands_in(b"PING\r\n"),
            None,
            "inline commands are not packed ones"
        );
        assert_eq!(commands_in(b"*1\r\n$99999999999999999999\r\n"), None);
        let mut empty = Vec::new();
        pack_command(&mut empty, &[]);
        pack_command(&mut empty, &[b"TIME"]);
        assert_eq!(
            commands_in(&empty),
            None,
            "an empty command gets no reply: refused, not counted"
        );
    }
    use super::*;

    /// The tight pass of `replies_end` answers as the careful walk does wherever it answers:
    /// the same end, and "not all here" only where the careful walk waits too (each input
    /// whole and cut at every byte).
    #[test]
    fn the_tight_pass_agrees_with_the_careful_walk() {
        let cases: &[(&[u8], usize)] = &[
            (
                b"*2\r\n$10\r\n1700000000\r\n$1\r\n0\r\n*3\r\n$1\r\n7\r\n$-1\r\n$0\r\n\r\n",
                2,
            ),
            (b"$-0\r\n\r\n:007\r\n*-0\r\n*0\r\n*-1\r\n:-12\r\n", 6),
            (b":123456789012345678\r\n:1234567890123456789\r\n", 2),
            (b"$1234567890123456789\r\n", 1),
            (
                b"*1\r\n*1\r\n*1\r\n*1\r\n*1\r\n*1\r\n*1\r\n*1\r\n*1\r\n:1\r\n",
                1,
            ),
            (b"*2\r\n:1\r\n-ERR no\r\n:2\r\n", 2),
            (b"*1\r\n+OK\r\n", 1),
            (b"$3\r\nabc\n\n", 1),
            (b"$3x\r\nabc\r\n", 1),
            (b"%1\r\n", 1),
            (b":+5\r\n", 1),
            (b":5\n", 1),
            (b"", 0),
        ];
        for &(whole, count) in cases {
            for cut in 0..=whole.len() {
                let bytes = &whole[..cut];
                let careful = careful_replies_end(bytes, count);
                match plain_replies_end(bytes, count) {
                    Plain::End(end) => assert!(
                        matches!(careful, Ok(Some((e, None))) if e == end),
                        "{}: tight {end}, careful {careful:?}",
                        lossy(bytes)
                    ),
                    Plain::Incomplete => assert!(
                        matches!(careful, Ok(None)),
                        "{}: tight incomplete, careful {careful:?}",
                        lossy(bytes)
                    ),
                    Plain::Other => {}
                }
            }
        }
        // What the hot path gets is read by the tight pass itself.
        assert_eq!(
            plain_replies_end(cases[0].0, 2),
            Plain::End(cases[0].0.len())
        );
        assert_eq!(
            plain_replies_end(cases[1].0, 6),
            Plain::End(cases[1].0.len())
        );
    }

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

    /// `replies_end` finds where replies end as `parse` does, and the first server error
    /// among them wherever it sits (its kind kept), without building them.
    #[test]
    fn replies_end_where_parse_ends_them_and_finds_their_first_error() {
        let replies: &[u8] = b"*2\r\n:1\r\n*2\r\n$-1\r\n-LOADING Redis is loading\r\n\
                               -ERR second\r\n$2\r\n-x\r\n";
        let (first, used) = parse(replies).unwrap().unwrap();
        let (end, error) = replies_end(replies, 1).unwrap().unwrap();
        assert_eq!(end, used);
        assert_eq!(
            error.expect("the nested error").kind(),
            ErrorKind::Server(redis::ServerErrorKind::BusyLoading)
        );
        assert!(matches!(first, Value::Array(_)));
        let (end, error) = replies_end(replies, 3).unwrap().unwrap();
        assert_eq!(end, replies.len());
        assert_eq!(
            error.expect("the first error").kind(),
            ErrorKind::Server(redis::ServerErrorKind::BusyLoading),
            "the first one"
        );
        let (_, error) = replies_end(b"*2\r\n+OK\r\n$2\r\n-x\r\n", 1)
            .unwrap()
            .unwrap();
        assert!(
            error.is_none(),
            "a bulk string that starts with `-` is no error"
        );
        for cut in 0..replies.len() {
            assert!(
                replies_end(&replies[..cut], 3).unwrap().is_none(),
                "cut at {cut}"
            );
        }
        assert!(replies_end(b"*1\r\n:x\r\n", 1).is_err(), "malformed");
        assert!(
            replies_end(b"*2\r\n-A\r\n-\xff\r\n", 1).is_err(),
            "an error line after the first is read too"
        );
        assert!(replies_end(b"%1\r\n", 1).is_err(), "RESP3");
    }

    /// A cursor reads what the session load's commands answer, in place, and stops at anything
    /// else without moving.
    #[test]
    fn a_cursor_reads_arrays_and_bulk_strings_in_place() {
        let replies: &[u8] =
            b"*2\r\n$10\r\n1700000000\r\n$6\r\n123456\r\n*3\r\n$1\r\n7\r\n$-1\r\n$0\r\n\r\n";
        let mut cursor = Cursor::new(replies);
        assert_eq!(cursor.array(), Some(Some(2)));
        assert_eq!(cursor.array(), None, "a bulk string is next");
        assert_eq!(cursor.bulk(), Some(Some(&b"1700000000"[..])));
        assert_eq!(cursor.bulk(), Some(Some(&b"123456"[..])));
        assert_eq!(cursor.bulk(), None, "an array is next");
        assert_eq!(cursor.array(), Some(Some(3)));
        assert_eq!(cursor.bulk(), Some(Some(&b"7"[..])));
        assert_eq!(cursor.bulk(), Some(None), "nil");
        assert_ne!(cursor.reader.at, replies.len());
        assert_eq!(cursor.bulk(), Some(Some(&b""[..])));
        assert_eq!(cursor.reader.at, replies.len());
        assert_eq!(cursor.bulk(), None);

        let mut nil = Cursor::new(b"*-1\r\n");
        assert_eq!(nil.array(), Some(None));
        let mut bad = Cursor::new(b"*x\r\n");
        assert_eq!(bad.array(), None, "not a length");
        assert_eq!(bad.reader.at, 0, "not moved");
        for broken in [
            &b"$5\r\nabc\r\n"[..],
            b"$x\r\n",
            b"$3\r\nabcd\r\n",
            b"$3",
            b":1\r\n",
        ] {
            let mut cursor = Cursor::new(broken);
            assert_eq!(cursor.bulk(), None, "{}", lossy(broken));
            assert_eq!(cursor.reader.at, 0, "not moved");
        }
    }

    /// A cursor reads a script's reply of any shape whole, as redis-rs's parser does, and
    /// leaves a server error (and anything cut short) where it is, for [`read_replies`].
    #[test]
    fn a_cursor_reads_a_whole_value_of_any_shape() {
        let replies: &[u8] = b"*3\r\n$1\r\n1\r\n:5\r\n*1\r\n+OK\r\n$-1\r\n";
        let mut cursor = Cursor::new(replies);
        let first = cursor.value().unwrap();
        assert_eq!(Some(first), parse(replies).unwrap().map(|(value, _)| value));
        assert_eq!(cursor.value(), Some(Value::Nil));
        assert_eq!(cursor.replies_read(), 2);
        let error = b"-NOSCRIPT No matching script.\r\n";
        let (_, answer) = read_replies(error, 1, |cursor| cursor.value())
            .unwrap()
            .unwrap();
        let error = answer.unwrap_err();
        assert_eq!(
            error.kind(),
            redis::ErrorKind::Server(redis::ServerErrorKind::NoScript)
        );
        for short in [&b"*2\r\n:1\r\n"[..], b"$3\r\nab", b"-ERR x\r\n"] {
            let mut cursor = Cursor::new(short);
            assert_eq!(cursor.value(), None, "{}", lossy(short));
            assert_eq!((cursor.reader.at, cursor.replies_read()), (0, 0));
        }
    }

    /// The cursor counts whole replies: an array once all its elements (nested arrays, empty
    /// and nil ones among them) are read, and refuses arrays deeper than it follows.
    #[test]
    fn a_cursor_counts_the_whole_replies_it_read() {
        let replies: &[u8] = b"*2\r\n*2\r\n:1\r\n*0\r\n$1\r\na\r\n*-1\r\n:-7\r\n$-1\r\n";
        let mut cursor = Cursor::new(replies);
        assert_eq!(cursor.array(), Some(Some(2)));
        assert_eq!(cursor.array(), Some(Some(2)));
        assert_eq!(cursor.integer(), Some(1));
        assert_eq!(cursor.replies_read(), 0);
        assert_eq!(cursor.array(), Some(Some(0)));
        assert_eq!(
            cursor.replies_read(),
            0,
            "the outer array has an element to come"
        );
        assert_eq!(cursor.integer(), None, "a bulk string is next");
        assert_eq!(cursor.bulk(), Some(Some(&b"a"[..])));
        assert_eq!(cursor.replies_read(), 1);
        assert_eq!(cursor.array(), Some(None));
        assert_eq!(cursor.integer(), Some(-7));
        assert_eq!(cursor.bulk(), Some(None));
        assert_eq!(cursor.replies_read(), 4);
        assert_eq!(cursor.reader.at, replies.len());

        let deep = "*1\r\n".repeat(CURSOR_DEPTH + 1) + ":1\r\n";
        let mut cursor = Cursor::new(deep.as_bytes());
        for _ in 0..CURSOR_DEPTH {
            assert_eq!(cursor.array(), Some(Some(1)));
        }
        assert_eq!(cursor.array(), None, "deeper than the cursor follows");
        let mut bad = Cursor::new(b":1x\r\n");
        assert_eq!(bad.integer(), None);
        assert_eq!((bad.reader.at, bad.replies_read()), (0, 0), "not moved");
    }

    /// Replies a reader makes something of are read once; otherwise they are looked through
    /// for their end and first error, and only an incomplete one waits.
    #[test]
    fn read_replies_answers_with_what_the_reader_made_of_all_of_them() {
        let replies: &[u8] = b"*2\r\n$1\r\n7\r\n$-1\r\n:5\r\n+tail";
        type Both<'b> = (usize, &'b [u8], Option<&'b [u8]>, i64);
        fn both<'b>(cursor: &mut Cursor<'b>) -> Option<Both<'b>> {
            Some((
                cursor.array()??,
                cursor.bulk()??,
                cursor.bulk()?,
                cursor.integer()?,
            ))
        }
        let (end, read) = read_replies(replies, 2, both).unwrap().unwrap();
        assert_eq!(
            end,
            replies.len() - 5,
            "the bytes after the two are not taken"
        );
        assert_eq!(read.unwrap(), Some((2, &b"7"[..], None, 5)));
        // Not what the reader expects, or fewer replies than asked for (or more): no answer,
        // and the replies' true end.
        for count in [1, 2] {
            let (end, read) = read_replies(replies, count, |cursor| cursor.integer())
                .unwrap()
                .unwrap();
            assert_eq!(read.unwrap(), None);
            assert_eq!(
                Some(end),
                replies_end(replies, count).unwrap().map(|(end, _)| end)
            );
        }
        let (_, read) = read_replies(replies, 1, both).unwrap().unwrap();
        assert_eq!(read.unwrap(), None, "the reader took two of one");
        // A server error where the reader expects a value: the call's error, past all replies.
        let refused: &[u8] = b":1\r\n-WRONGTYPE Operation against a key\r\n:3\r\n";
        let (end, read) = read_replies(refused, 3, |cursor| {
            Some((cursor.integer()?, cursor.integer()?, cursor.integer()?))
        })
        .unwrap()
        .unwrap();
        assert_eq!(end, refused.len());
        let error = read.expect_err("the server error");
        assert_eq!(error.code(), Some("WRONGTYPE"), "{error}");
        // Cut anywhere: wait for the rest, whatever the reader.
        let whole = &replies[..replies.len() - 5];
        for cut in 0..whole.len() {
            assert!(
                read_replies(&whole[..cut], 2, both).unwrap().is_none(),
                "cut at {cut}"
            );
        }
        assert!(read_replies(b"*1\r\n:x\r\n", 1, both).is_err(), "malformed");
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
            // Eighteen bytes that are not digits: their sum overflows, and must not panic.
            b"$\xff\xff\xff\xff\xff\xff\xff\xff\xff\xff\xff\xff\xff\xff\xff\xff\xff\xff\r\n",
            b":99999999999999999x\r\n",
        ] {
            let error = parse(bad).expect_err(&lossy(bad));
            assert_eq!(error.kind(), ErrorKind::Parse, "{}", lossy(bad));
            assert!(replies_end(bad, 1).is_err(), "{}", lossy(bad));
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
        // The same limit when replies are only looked through.
        assert!(replies_end(deep.as_bytes(), 1).is_err());
        assert_eq!(
            replies_end(within.as_bytes(), 1)
                .unwrap()
                .map(|(end, _)| end),
            Some(within.len())
        );
    }
}
