//! Header handling of the request path: hop-by-hop removal, request ids, forwarding headers, size.
//!
//! Hop-by-hop headers (RFC 9110 §7.6.1) describe one connection, not the message, so a proxy
//! must drop them — the fixed list plus every name listed in `Connection`. The request id is
//! kept when the client sent a sane one (≤ 128 characters of `[A-Za-z0-9._-]`), else generated:
//! a random per-thread prefix and a counter, unique and cheap. What the gateway adds for the
//! worker ([`Forwarding`]) is written by the request encoder, not into the request's map.

use std::cell::{Cell, RefCell};
use std::io::Write as _;
use std::net::IpAddr;

use bytes::{Bytes, BytesMut};
use http::header::{self, HeaderMap, HeaderName, HeaderValue};

/// `x-herd-gateway`: the id of the gateway that answered.
pub const GATEWAY: HeaderName = HeaderName::from_static("x-herd-gateway");
/// `x-request-id`.
pub const REQUEST_ID: HeaderName = HeaderName::from_static("x-request-id");
/// Headers the gateway adds to a worker's response: `x-request-id` (when the worker sent none)
/// and `x-herd-gateway`. A response's map is made with room for them: growing it after the
/// worker's headers are in rehashes them all (on HTTP/2, whose maps hyper does not hand back for
/// reuse, once per request: `infra/bench/instructions.sh h2`).
pub const ADDED_TO_RESPONSES: usize = 2;
/// `x-forwarded-for`.
pub const FORWARDED_FOR: HeaderName = HeaderName::from_static("x-forwarded-for");
/// `x-forwarded-proto`.
pub const FORWARDED_PROTO: HeaderName = HeaderName::from_static("x-forwarded-proto");

/// Hop-by-hop headers always removed.
const HOP_BY_HOP: [HeaderName; 8] = [
    header::CONNECTION,
    HeaderName::from_static("keep-alive"),
    HeaderName::from_static("proxy-connection"),
    header::PROXY_AUTHENTICATE,
    header::PROXY_AUTHORIZATION,
    header::TE,
    header::TRAILER,
    header::TRANSFER_ENCODING,
];

/// Whether `name` is one of the always-removed hop-by-hop headers, or `Upgrade`.
fn is_hop_by_hop(name: &HeaderName) -> bool {
    name == header::UPGRADE || HOP_BY_HOP.iter().any(|h| h == name)
}

/// [`is_hop_by_hop`] for a name as it was spelled on the wire (any case; [`hop_by_hop_raw`]).
pub fn is_hop_by_hop_raw(name: &[u8]) -> bool {
    hop_by_hop_raw(name).is_some()
}

/// Which hop-by-hop header a name spelled on the wire (any case) is, if it is one (see
/// [`is_hop_by_hop`]): those a raw response head may leave out apart from the others.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum HopByHop {
    /// `Connection`.
    Connection,
    /// `Keep-Alive`.
    KeepAlive,
    /// `Transfer-Encoding`.
    TransferEncoding,
    /// `TE`, `Trailer`, `Upgrade` and the proxy headers.
    Other,
}

impl HopByHop {
    /// Whether a worker's response header of this kind with `value` may be left out of a raw
    /// response head: a `Connection` that says only `keep-alive` or `close` (any case, OWS
    /// around it), any `Keep-Alive`, a `Transfer-Encoding` that says only `chunked`. All are
    /// about the worker's own connection and how it framed the body, which the gateway reads
    /// them for (`upstream::codec`) and frames again for its client: Node.js puts the first
    /// two on every answer, and the third on every streamed one.
    pub fn may_leave_out_of_response(self, value: &[u8]) -> bool {
        let value = value.trim_ascii();
        match self {
            HopByHop::Connection => {
                value.eq_ignore_ascii_case(b"keep-alive") || value.eq_ignore_ascii_case(b"close")
            }
            HopByHop::KeepAlive => true,
            HopByHop::TransferEncoding => value.eq_ignore_ascii_case(b"chunked"),
            HopByHop::Other => false,
        }
    }
}

/// [`HopByHop`] of a name spelled on the wire: by its length first, so most names are told
/// apart without a comparison. Inlined: it runs for every header of every head.
#[inline]
pub fn hop_by_hop_raw(name: &[u8]) -> Option<HopByHop> {
    let is = |spelled: &[u8]| name.eq_ignore_ascii_case(spelled);
    let kind = match name.len() {
        2 if is(b"te") => HopByHop::Other,
        7 if is(b"trailer") || is(b"upgrade") => HopByHop::Other,
        10 if is(b"connection") => HopByHop::Connection,
        10 if is(b"keep-alive") => HopByHop::KeepAlive,
        16 if is(b"proxy-connection") => HopByHop::Other,
        17 if is(b"transfer-encoding") => HopByHop::TransferEncoding,
        18 if is(b"proxy-authenticate") => HopByHop::Other,
        19 if is(b"proxy-authorization") => HopByHop::Other,
        _ => return None,
    };
    Some(kind)
}

/// Whether the gateway sets a response header of this name (as spelled on the wire, any case)
/// in place of the worker's: `x-herd-gateway`, and `Strict-Transport-Security` on a TLS listener.
pub fn is_replaced_in_responses_raw(name: &[u8]) -> bool {
    match name.len() {
        14 => name.eq_ignore_ascii_case(GATEWAY.as_str().as_bytes()),
        25 => name.eq_ignore_ascii_case(header::STRICT_TRANSPORT_SECURITY.as_str().as_bytes()),
        _ => false,
    }
}

/// The header lines of a parsed head (`spans`: where each header's name and value sit in it),
/// kept as they came on the wire to be written through without a `HeaderMap`, and the [`Cut`]
/// of the lines at indices `cut` of `spans` (empty: none): a run of adjacent hop-by-hop lines
/// left out, which ask for nothing the gateway does not do anyway (`upstream::RawHead`; a
/// request's runs are [`RawRequestHead::of`]'s). `None` unless each line ends with CRLF
/// (httparse also takes a bare LF, which is not passed on as is) and the lines are at most
/// 65 535 bytes (the cut's offsets are two bytes each). Inlined: a call of its own cost each head more than its work
/// (`infra/bench/instructions.sh`, docs/performance.md section 31).
#[inline(always)]
pub fn header_lines(
    head: &Bytes,
    spans: &[HeaderSpan],
    cut: std::ops::Range<usize>,
) -> Option<(Bytes, Cut)> {
    let lines = crlf_header_lines(head, spans)?;
    if lines.len() > usize::from(u16::MAX) {
        return None;
    }
    if cut.is_empty() {
        return Some((lines, Cut::default()));
    }
    let cut = Cut {
        start: line_start(spans, lines.len(), cut.start),
        end: line_start(spans, lines.len(), cut.end),
    };
    Some((lines, cut))
}

/// Where the line of `spans[index]` starts in header lines of `length` bytes (`length` past the
/// last line): a line runs from its name to the next line's name.
#[inline(always)]
fn line_start(spans: &[HeaderSpan], length: usize, index: usize) -> u16 {
    let first = spans.first().map_or(0, |(name, _)| name.start);
    spans
        .get(index)
        .map_or(length, |(name, _)| name.start - first) as u16
}

/// Where the run of lines left out of raw header lines ([`header_lines`]) sits in them: its
/// start and end (empty: none). Two bytes each, beside the lines in a raw head: a response's
/// stays 40 bytes, as it was before lines could be left out (it is moved through several
/// futures; docs/performance.md section 31).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Cut {
    start: u16,
    end: u16,
}

impl Cut {
    fn is_empty(self) -> bool {
        self.start == self.end
    }

    /// The bytes of `lines` in the cut.
    fn of(self, lines: &[u8]) -> &[u8] {
        &lines[usize::from(self.start)..usize::from(self.end)]
    }

    /// What to write of `lines`: the lines before the run left out, and those after it.
    pub fn runs(self, lines: &[u8]) -> [&[u8]; 2] {
        [
            &lines[..usize::from(self.start)],
            &lines[usize::from(self.end)..],
        ]
    }
}

/// Where a header's name and value sit in a parsed head.
pub type HeaderSpan = (std::ops::Range<usize>, std::ops::Range<usize>);

/// The most runs of adjacent lines a raw request head leaves out; a head with more takes the map.
const REQUEST_RUNS_LEFT_OUT: usize = 3;

/// A plain request's header lines as the client sent them, written to the worker as they are
/// instead of through a `HeaderMap` (`crate::plain_http1` keeps them so only when nothing in them
/// must change or be read, see `is_read_or_replaced_in_requests_raw`, but the lines a raw head
/// leaves out, [`LeftOut`]): a browser's `Connection: keep-alive`, the forwarding headers
/// and request id that a proxy in front (a CDN, a cloud load balancer) puts on every request,
/// which the gateway writes its own of, and a small body's `Content-Length`, which the gateway
/// writes from the body it read. Those lines are left out where they are, in up to three
/// runs of adjacent lines; the hops of the one `X-Forwarded-For` line are kept for the
/// gateway's own ([`RawRequestHead::earlier_hops`]), and the first `X-Request-Id`'s value as
/// the request's id ([`RawRequestHead::request_id`]).
#[derive(Debug, Clone)]
pub struct RawRequestHead {
    /// From the first header's name to the CRLF ending the last header line.
    pub lines: Bytes,
    /// The head's size as [`head_size`] counts it (the lines left out too).
    pub size: u32,
    /// The runs of lines left out, in order; those unused are empty, after the used ones.
    left_out: [Cut; REQUEST_RUNS_LEFT_OUT],
    /// Where the value of the client's `X-Forwarded-For` line sits in `lines` (empty: none).
    forwarded_for: Cut,
    /// Where the value of the client's first `X-Request-Id` sits in `lines` (empty: none).
    request_id: Cut,
}

/// The headers a raw request head reads from lines it leaves out: their indices in the head.
#[derive(Debug, Clone, Copy, Default)]
pub struct ReadFromRaw {
    /// The one `X-Forwarded-For`.
    pub forwarded_for: Option<usize>,
    /// The first `X-Request-Id`.
    pub request_id: Option<usize>,
}

impl RawRequestHead {
    /// The header lines of a parsed request head of `size` (see [`header_lines`]) less those
    /// of the headers at the indices set in `left_out` (bit `i`: `spans[i]`), with where the
    /// values of those in `read` sit. `None` when the lines cannot be kept as they came
    /// ([`header_lines`]) or those left out are more than three runs of adjacent lines.
    /// Inlined into the parser, as [`header_lines`] was before it (a call cost more than its
    /// work on the common head, which leaves nothing out).
    #[inline(always)]
    pub fn of(
        head: &Bytes,
        spans: &[HeaderSpan],
        size: usize,
        left_out: u64,
        read: ReadFromRaw,
    ) -> Option<Self> {
        let (lines, _) = header_lines(head, spans, 0..0)?;
        let mut runs = [Cut::default(); REQUEST_RUNS_LEFT_OUT];
        let mut rest = left_out;
        for run in &mut runs {
            if rest == 0 {
                break;
            }
            let start = rest.trailing_zeros() as usize;
            let end = start + (!(rest >> start)).trailing_zeros() as usize;
            *run = Cut {
                start: line_start(spans, lines.len(), start),
                end: line_start(spans, lines.len(), end),
            };
            // The run's bits cleared (all of them when it ends at the last header).
            rest &= u64::MAX.checked_shl(end as u32).unwrap_or(0);
        }
        if rest != 0 {
            return None;
        }
        let first = spans.first().map_or(0, |(name, _)| name.start);
        let value = |index: Option<usize>| {
            index.map_or(Cut::default(), |index| {
                let value = &spans[index].1;
                Cut {
                    start: (value.start - first) as u16,
                    end: (value.end - first) as u16,
                }
            })
        };
        Some(RawRequestHead {
            lines,
            size: u32::try_from(size).ok()?,
            left_out: runs,
            forwarded_for: value(read.forwarded_for),
            request_id: value(read.request_id),
        })
    }

    /// Writes the lines kept: all but the runs left out, in their order.
    pub fn write_lines(&self, out: &mut BytesMut) {
        let mut from = 0;
        let runs = self.left_out.iter().take_while(|run| !run.is_empty());
        for run in runs {
            out.extend_from_slice(&self.lines[from..usize::from(run.start)]);
            from = usize::from(run.end);
        }
        out.extend_from_slice(&self.lines[from..]);
    }

    /// The request's id, as [`request_id`] takes it from a map: the client's first
    /// `X-Request-Id` when sane, else a new one.
    pub fn request_id(&self) -> HeaderValue {
        let sent = self.request_id.of(&self.lines);
        if !is_sane_request_id(sent) {
            return new_request_id();
        }
        HeaderValue::from_maybe_shared(self.lines.slice_ref(sent))
            .expect("a sane request id is a valid header value")
    }

    /// The `X-Forwarded-For` hops before the gateway's, as [`Forwarding::earlier_hops`] reads
    /// them from a map: the line's value, trimmed, unless empty.
    pub fn earlier_hops(&self) -> Option<&[u8]> {
        let hops = self.forwarded_for.of(&self.lines).trim_ascii();
        (!hops.is_empty()).then_some(hops)
    }
}

/// A request header line that a raw request head leaves out (see [`RawRequestHead`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum LeftOut {
    /// `Connection` whose only option is `keep-alive` or `close` (any case, OWS around it): the
    /// gateway's connection to the worker is its own, and the server reads `close` itself (it
    /// closes the client's connection after the answer, which says so).
    ConnectionOption,
    /// `X-Forwarded-For`: its hops go before the gateway's in the gateway's own line.
    ForwardedFor,
    /// `X-Request-Id`: the request's id when sane (the first line's), sent in the gateway's
    /// own line.
    RequestId,
    /// `X-Forwarded-Proto` and `Forwarded`: the gateway is the edge and writes its own; and a
    /// body's `Content-Length`, which the gateway writes from the body it read.
    Replaced,
}

/// Whether, and as what, a raw request head leaves out this line of a name the request path
/// reads or replaces. `None` for every other such line (another `Connection`, any other
/// hop-by-hop header): that head needs the map.
pub fn left_out_of_request(name: &[u8], value: &[u8]) -> Option<LeftOut> {
    let is = |known: &HeaderName| name.eq_ignore_ascii_case(known.as_str().as_bytes());
    let left_out = match name.len() {
        9 if is(&header::FORWARDED) => LeftOut::Replaced,
        // Browsers send `keep-alive`, clients without keep-alive `close`: the same rule as for
        // a worker's answer.
        10 if is(&header::CONNECTION) && HopByHop::Connection.may_leave_out_of_response(value) => {
            LeftOut::ConnectionOption
        }
        12 if is(&REQUEST_ID) => LeftOut::RequestId,
        // The parser reads the length (one line, digits only) before it gets here.
        14 if is(&header::CONTENT_LENGTH) => LeftOut::Replaced,
        15 if is(&FORWARDED_FOR) => LeftOut::ForwardedFor,
        17 if is(&FORWARDED_PROTO) => LeftOut::Replaced,
        _ => return None,
    };
    Some(left_out)
}

/// The header lines of a parsed head (`spans`: where each header's name and value sit in it),
/// from the first name to the CRLF ending the last line (empty without headers); `None` when a
/// line ends with a bare LF, which httparse accepts but which is not passed on as it came.
fn crlf_header_lines(head: &Bytes, spans: &[HeaderSpan]) -> Option<Bytes> {
    let Some((first, _)) = spans.first() else {
        return Some(Bytes::new());
    };
    // Each header line ends where the next begins; the blank line ends the head.
    let crlf_before = |end: usize| &head[end - 2..end] == b"\r\n";
    let end = head.len() - 2;
    let all_crlf = spans[1..].iter().all(|(name, _)| crlf_before(name.start)) && crlf_before(end);
    all_crlf.then(|| head.slice(first.start..end))
}

/// Whether the request path reads or rewrites a request header of this name (as spelled on the
/// wire, any case): the id and forwarding headers (kept, checked or replaced), the framing and
/// expectation headers, and every hop-by-hop one (stripped; `Upgrade` among them). A raw head
/// leaves such a line out when [`left_out_of_request`] says it may, and needs the map
/// otherwise. `Host` is read too, but only counted: a head with exactly one needs no map for it.
pub fn is_read_or_replaced_in_requests_raw(name: &[u8]) -> bool {
    is_hop_by_hop_raw(name)
        || match name.len() {
            6 => name.eq_ignore_ascii_case(b"expect"),
            9 => name.eq_ignore_ascii_case(b"forwarded"),
            12 => name.eq_ignore_ascii_case(REQUEST_ID.as_str().as_bytes()),
            14 => name.eq_ignore_ascii_case(b"content-length"),
            15 => name.eq_ignore_ascii_case(FORWARDED_FOR.as_str().as_bytes()),
            17 => name.eq_ignore_ascii_case(FORWARDED_PROTO.as_str().as_bytes()),
            _ => false,
        }
}

/// Removes hop-by-hop headers, including those named in `Connection`, and `Upgrade`.
pub fn strip_hop_by_hop(headers: &mut HeaderMap) {
    // Runs twice per request. Most messages carry none, or only `Connection: keep-alive`: find
    // the ones present in one pass instead of removing all ten names blindly.
    let present: Vec<HeaderName> = headers
        .keys()
        .filter(|n| is_hop_by_hop(n))
        .cloned()
        .collect();
    if present.is_empty() {
        return;
    }
    // Names listed in Connection go too (besides the `close` / `keep-alive` options).
    let listed: Vec<HeaderName> = connection_options(headers)
        .filter(|t| !t.eq_ignore_ascii_case(b"close") && !t.eq_ignore_ascii_case(b"keep-alive"))
        .filter_map(|name| HeaderName::from_bytes(name).ok())
        .collect();
    for name in listed.iter().chain(&present) {
        headers.remove(name);
    }
}

/// The protocol an HTTP/1.1 message asks to switch to: its `Upgrade` value when `Connection`
/// lists `upgrade` (RFC 9110 §7.8); `None` for an ordinary message.
pub fn upgrade(headers: &HeaderMap) -> Option<HeaderValue> {
    let upgrade = headers.get(header::UPGRADE)?;
    connection_options(headers)
        .any(|option| option.eq_ignore_ascii_case(b"upgrade"))
        .then(|| upgrade.clone())
}

/// The comma-separated options of every `Connection` header, trimmed. Split as bytes: a value
/// with a non-ASCII byte anywhere still lists its other options (read as text, the whole value
/// was skipped and the names it listed were forwarded).
fn connection_options(headers: &HeaderMap) -> impl Iterator<Item = &[u8]> {
    headers
        .get_all(header::CONNECTION)
        .iter()
        .flat_map(|v| v.as_bytes().split(|b| *b == b','))
        .map(<[u8]>::trim_ascii)
}

/// Puts back the two hop-by-hop headers of a protocol switch (after [`strip_hop_by_hop`]), so
/// the next hop sees the same request or answer to switch.
pub fn set_upgrade(headers: &mut HeaderMap, protocol: HeaderValue) {
    headers.insert(header::UPGRADE, protocol);
    headers.insert(header::CONNECTION, HeaderValue::from_static("upgrade"));
}

/// Whether a client-sent request id may be kept.
pub fn is_sane_request_id(value: &[u8]) -> bool {
    !value.is_empty()
        && value.len() <= 128
        && value
            .iter()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'.' | b'_' | b'-'))
}

/// The request's id: the client's when sane, otherwise a new one. The worker is sent this one
/// in place of whatever the client sent (see [`Forwarding`]).
pub fn request_id(headers: &HeaderMap) -> HeaderValue {
    match headers.get(&REQUEST_ID) {
        Some(value) if is_sane_request_id(value.as_bytes()) => value.clone(),
        _ => new_request_id(),
    }
}

/// A new request id: 16 hex digits of per-thread randomness, a dash, a counter. Per thread, so
/// that serving threads share no counter (a shared one is a cache line both cores write for
/// every request).
pub fn new_request_id() -> HeaderValue {
    thread_local! {
        /// The thread's prefix (written out once) and its counter.
        static NEXT: Cell<([u8; 17], u64)> = Cell::new((id_prefix(rand::random()), 0));
    }
    let (prefix, n) = NEXT.get();
    NEXT.set((prefix, n + 1));
    // Hand-rolled hex: this runs for every request, and `format!` costs several times more.
    let mut text = [0u8; 33];
    text[..17].copy_from_slice(&prefix);
    let digits = (64 - n.leading_zeros()).div_ceil(4).max(1) as usize;
    put_hex(&mut text[17..17 + digits], n);
    // Written into a per-thread block shared by many ids, so the clones this value gets (the
    // response's header, logs) are reference counts, not allocations: a value made with
    // `from_bytes` owns a buffer that its first clone must move into a shared allocation.
    thread_local! {
        static BLOCK: RefCell<BytesMut> = RefCell::new(BytesMut::new());
    }
    let id = BLOCK.with_borrow_mut(|block| {
        if block.capacity() < text.len() {
            *block = BytesMut::with_capacity(ID_BLOCK);
        }
        block.extend_from_slice(&text[..17 + digits]);
        block.split().freeze()
    });
    HeaderValue::from_maybe_shared(id).expect("hex digits are a valid header value")
}

/// A request's header map, given back to [`spare_map`] when dropped.
#[derive(Debug)]
pub struct Recycled(pub HeaderMap);

impl std::ops::Deref for Recycled {
    type Target = HeaderMap;
    fn deref(&self) -> &HeaderMap {
        &self.0
    }
}

impl std::ops::DerefMut for Recycled {
    fn deref_mut(&mut self) -> &mut HeaderMap {
        &mut self.0
    }
}

impl Drop for Recycled {
    fn drop(&mut self) {
        recycle(&mut self.0);
    }
}

/// Header maps kept per thread for reuse.
const SPARE_MAPS: usize = 64;
/// A map grown past this many headers is not kept (one odd request must not pin its size).
const SPARE_MAP_CAPACITY: usize = 64;

thread_local! {
    static SPARES: RefCell<Vec<HeaderMap>> = const { RefCell::new(Vec::new()) };
}

/// An empty header map with room for `headers`: a request's map used again where one is at hand.
/// A response's map goes to hyper, which reuses it for the connection's next request; that
/// request's map then comes back here when the request is over (`Recycled`) — so neither side
/// allocates one per request (two allocations each, and a third when the gateway's own request
/// headers made the map grow).
pub fn spare_map(headers: usize) -> HeaderMap {
    match SPARES.with_borrow_mut(Vec::pop) {
        Some(mut map) => {
            map.reserve(headers);
            map
        }
        None => HeaderMap::with_capacity(headers),
    }
}

/// Takes `map`, emptied, for [`spare_map`], unless it never had room (a raw head's: taking it
/// would make a new empty map and drop two, for nothing) or grew too big.
pub fn recycle(map: &mut HeaderMap) {
    if map.capacity() == 0 || map.capacity() > SPARE_MAP_CAPACITY {
        return;
    }
    let mut map = std::mem::take(map);
    map.clear();
    SPARES.with_borrow_mut(|spares| {
        if spares.len() < SPARE_MAPS {
            spares.push(map);
        }
    });
}

/// Bytes of request ids allocated at once (about 120 ids).
const ID_BLOCK: usize = 4096;

/// `random` as 16 hex digits and a dash: the start of every request id a thread makes.
fn id_prefix(random: u64) -> [u8; 17] {
    let mut prefix = [b'-'; 17];
    put_hex(&mut prefix[..16], random);
    prefix
}

/// Writes the low `out.len()` hex digits of `value` into `out`, most significant first.
fn put_hex(out: &mut [u8], mut value: u64) {
    const DIGITS: &[u8; 16] = b"0123456789abcdef";
    for slot in out.iter_mut().rev() {
        *slot = DIGITS[(value & 0xf) as usize];
        value >>= 4;
    }
}

/// The client's address as an `X-Forwarded-For` entry; asked for once per client connection.
///
/// The last few addresses' entries are kept per serving thread: a client that opens a connection
/// per request, or a load balancer in front, comes from a few addresses again and again, and
/// making an entry formatted the address into two strings and copied it into a third
/// allocation (`infra/bench/instructions.sh close`). A kept one's clone is a reference count.
pub fn forwarded_for(client: IpAddr) -> HeaderValue {
    /// Addresses remembered per thread; the oldest is replaced.
    const KEPT: usize = 4;
    /// The entries kept, and where the next one goes.
    type Recent = (usize, [Option<(IpAddr, HeaderValue)>; KEPT]);
    thread_local! {
        static RECENT: RefCell<Recent> = const { RefCell::new((0, [const { None }; KEPT])) };
    }
    RECENT.with_borrow_mut(|(next, recent)| {
        let kept = recent
            .iter()
            .flatten()
            .find(|(address, _)| *address == client);
        if let Some((_, entry)) = kept {
            return entry.clone();
        }
        // At most 39 characters (IPv6; a mapped IPv4 address is written as IPv6 is).
        let mut text = [0u8; 64];
        let mut cursor = std::io::Cursor::new(&mut text[..]);
        write!(cursor, "{client}").expect("an IP address fits in 64 bytes");
        let length = usize::try_from(cursor.position()).expect("at most 64");
        let entry = HeaderValue::from_bytes(&text[..length])
            .expect("an IP address is a valid header value");
        recent[*next] = Some((client, entry.clone()));
        *next = (*next + 1) % KEPT;
        entry
    })
}

/// Set on a request's extensions by the TLS listener (`crate::tls`): the request came over
/// https. Holds the connection's `Forwarded` element, made once per connection.
#[derive(Debug, Clone)]
pub struct OverTls {
    /// `for="<client>";proto=https`.
    pub forwarded: HeaderValue,
}

impl OverTls {
    /// The marker for a TLS connection from `client`.
    pub fn new(client: IpAddr) -> Self {
        let element = match client.to_canonical() {
            IpAddr::V4(v4) => format!("for={v4};proto=https"),
            IpAddr::V6(v6) => format!("for=\"[{v6}]\";proto=https"),
        };
        OverTls {
            forwarded: HeaderValue::from_str(&element).expect("an address is a valid header value"),
        }
    }
}

/// What the gateway tells a worker beyond the client's headers: the request's id (see
/// [`request_id`]), the client's address (`X-Forwarded-For`, appended to the hops before), the scheme
/// (`X-Forwarded-Proto`) and, over TLS, `Forwarded` (RFC 7239). A client's own
/// `X-Forwarded-Proto` and `Forwarded` are never passed on: the gateway is the edge, so workers
/// may trust the scheme they see.
///
/// Written by the request encoder (`upstream::codec::encode_request_head`) after the client's
/// headers rather than inserted into the request's map: that was three hash inserts and a
/// removal per request, and the map's growth.
#[derive(Debug, Clone, Copy)]
pub struct Forwarding<'a> {
    /// The request's id.
    pub request_id: &'a HeaderValue,
    /// The client's address, see [`forwarded_for`].
    pub client: &'a HeaderValue,
    /// Set when the request came over TLS.
    pub over_tls: Option<&'a OverTls>,
    /// The request URI's authority (what an HTTP/2 client sends as `:authority`), written as
    /// `Host` when the request has none: HTTP/1.1 workers want one. Written, not inserted into
    /// the request's map: a value made from it was an allocation per HTTP/2 request.
    pub authority: Option<&'a str>,
}

impl Forwarding<'_> {
    /// Whether a client's header of this name is left out (the gateway writes its own).
    pub fn replaces(&self, name: &HeaderName) -> bool {
        *name == REQUEST_ID
            || *name == FORWARDED_FOR
            || *name == FORWARDED_PROTO
            || *name == header::FORWARDED
    }

    /// `X-Forwarded-Proto`'s value.
    pub fn proto(&self) -> &'static [u8] {
        if self.over_tls.is_some() {
            b"https"
        } else {
            b"http"
        }
    }

    /// The `X-Forwarded-For` hops before this one, from the client's `headers`: every line
    /// counts (a list may arrive split over several), trimmed, as bytes — one odd byte must not
    /// drop the hops before ours.
    pub fn earlier_hops(headers: &HeaderMap) -> impl Iterator<Item = &[u8]> {
        headers
            .get_all(&FORWARDED_FOR)
            .into_iter()
            .map(|hop| hop.as_bytes().trim_ascii())
            .filter(|hop| !hop.is_empty())
    }
}

/// Size of the request head as the limit counts it: target plus every `name: value\r\n`.
pub fn head_size(uri: &http::Uri, headers: &HeaderMap) -> usize {
    let target = uri.path_and_query().map_or(1, |p| p.as_str().len());
    headers
        .iter()
        .map(|(name, value)| name.as_str().len() + value.len() + 4)
        .sum::<usize>()
        + target
}

/// Whether retrying this method is safe by definition (RFC 9110 §9.2.2).
pub fn is_idempotent(method: &http::Method) -> bool {
    matches!(
        *method,
        http::Method::GET
            | http::Method::HEAD
            | http::Method::PUT
            | http::Method::DELETE
            | http::Method::OPTIONS
            | http::Method::TRACE
    )
}

#[cfg(test)]
mod tests {
    #[test]
    fn a_clients_forwarded_for_entry_is_its_address_whether_kept_or_made() {
        use std::net::IpAddr;
        let addresses: Vec<IpAddr> = [
            "10.0.0.1",
            "2001:db8::7",
            "::ffff:192.0.2.9",
            "10.0.0.2",
            "10.0.0.3",
            "ffff:ffff:ffff:ffff:ffff:ffff:ffff:ffff",
            "10.0.0.1",
        ]
        .iter()
        .map(|text| text.parse().unwrap())
        .collect();
        // Twice over: made, then kept or made again after more than four others came between.
        for _ in 0..2 {
            for address in &addresses {
                assert_eq!(
                    super::forwarded_for(*address).to_str().unwrap(),
                    address.to_string()
                );
            }
        }
    }

    /// A request head's bytes and where each header's name and value sit (as httparse says).
    fn parsed(lines: &[&str]) -> (Bytes, Vec<super::HeaderSpan>) {
        let head = format!("GET / HTTP/1.1\r\n{}\r\n", lines.concat());
        let mut slots = [httparse::EMPTY_HEADER; 70];
        let mut request = httparse::Request::new(&mut slots);
        assert!(request.parse(head.as_bytes()).unwrap().is_complete());
        let base = head.as_ptr() as usize;
        let span = |bytes: &[u8]| {
            let start = bytes.as_ptr() as usize - base;
            start..start + bytes.len()
        };
        let spans = request
            .headers
            .iter()
            .map(|h| (span(h.name.as_bytes()), span(h.value)))
            .collect();
        (Bytes::from(head.clone()), spans)
    }

    /// The lines a raw request head of `lines` writes when it leaves out those at `left_out`,
    /// and the hops and id it read from them.
    fn raw_request(
        lines: &[&str],
        left_out: &[usize],
        read: super::ReadFromRaw,
    ) -> Option<(String, Option<String>, String)> {
        let (head, spans) = parsed(lines);
        let mask = left_out.iter().fold(0u64, |mask, index| mask | 1 << index);
        let raw = super::RawRequestHead::of(&head, &spans, 1, mask, read)?;
        let mut out = BytesMut::new();
        raw.write_lines(&mut out);
        let hops = raw
            .earlier_hops()
            .map(|hops| String::from_utf8(hops.to_vec()).unwrap());
        let id = raw.request_id().to_str().unwrap().to_owned();
        Some((String::from_utf8(out.to_vec()).unwrap(), hops, id))
    }

    #[test]
    fn a_raw_request_head_leaves_out_up_to_three_runs_and_reads_its_hops_and_id() {
        use super::ReadFromRaw;
        let lines = [
            "X-Forwarded-For: 203.0.113.7\r\n",
            "X-Forwarded-Proto: https\r\n",
            "Host: gw\r\n",
            "Connection: keep-alive\r\n",
            "Accept: */*\r\n",
            "X-Request-Id:  lb-42 \r\n",
        ];
        let read = ReadFromRaw {
            forwarded_for: Some(0),
            request_id: Some(5),
        };
        // Three runs: first (two lines), middle, last.
        let (written, hops, id) = raw_request(&lines, &[0, 1, 3, 5], read).unwrap();
        assert_eq!(written, "Host: gw\r\nAccept: */*\r\n");
        assert_eq!(hops.as_deref(), Some("203.0.113.7"));
        assert_eq!(id, "lb-42");
        // Nothing left out: every line, no hops, a new id.
        let (written, hops, id) = raw_request(&lines, &[], ReadFromRaw::default()).unwrap();
        assert_eq!(written, lines.concat());
        assert_eq!(hops, None);
        assert!(super::is_sane_request_id(id.as_bytes()) && id != "lb-42");
        // Four runs: the map's way.
        let four = [
            "A: 1\r\n", "B: 2\r\n", "C: 3\r\n", "D: 4\r\n", "E: 5\r\n", "F: 6\r\n", "G: 7\r\n",
        ];
        assert!(raw_request(&four, &[0, 2, 4, 6], ReadFromRaw::default()).is_none());
        let (written, _, _) = raw_request(&four, &[0, 2, 3, 4, 6], ReadFromRaw::default()).unwrap();
        assert_eq!(written, "B: 2\r\nF: 6\r\n");
        // The last of 64 headers (the mask's last bit), and all of them.
        let many: Vec<String> = (0..64).map(|i| format!("X-{i}: {i}\r\n")).collect();
        let many: Vec<&str> = many.iter().map(String::as_str).collect();
        let (written, _, _) = raw_request(&many, &[63], ReadFromRaw::default()).unwrap();
        assert_eq!(written, many[..63].concat());
        let all: Vec<usize> = (0..64).collect();
        let (written, _, _) = raw_request(&many, &all, ReadFromRaw::default()).unwrap();
        assert_eq!(written, "");
        // An empty `X-Forwarded-For` adds no hop; an id that is not sane is replaced.
        let odd = [
            "Host: gw\r\n",
            "X-Forwarded-For: \r\n",
            "X-Request-Id: a b\r\n",
        ];
        let read = ReadFromRaw {
            forwarded_for: Some(1),
            request_id: Some(2),
        };
        let (written, hops, id) = raw_request(&odd, &[1, 2], read).unwrap();
        assert_eq!((written.as_str(), hops), ("Host: gw\r\n", None));
        assert!(super::is_sane_request_id(id.as_bytes()));
    }

    #[test]
    fn a_raw_request_head_leaves_out_only_what_the_gateway_replaces_or_needs_not() {
        use super::{LeftOut, left_out_of_request};
        let left_out =
            |name: &str, value: &str| left_out_of_request(name.as_bytes(), value.as_bytes());
        for option in ["keep-alive", " Keep-Alive ", "close", "CLOSE "] {
            assert_eq!(
                left_out("Connection", option),
                Some(LeftOut::ConnectionOption),
                "{option}"
            );
        }
        assert_eq!(
            left_out("X-Forwarded-For", "1.2.3.4"),
            Some(LeftOut::ForwardedFor)
        );
        assert_eq!(left_out("x-request-id", "r"), Some(LeftOut::RequestId));
        assert_eq!(
            left_out("X-Forwarded-Proto", "https"),
            Some(LeftOut::Replaced)
        );
        assert_eq!(left_out("FORWARDED", "for=x"), Some(LeftOut::Replaced));
        for (name, value) in [
            ("Connection", "close, keep-alive"),
            ("Connection", "keep-alive, X-Secret"),
            ("Connection", "upgrade"),
            ("Keep-Alive", "timeout=5"),
            ("TE", "trailers"),
            ("Upgrade", "websocket"),
            ("Proxy-Connection", "keep-alive"),
            ("X-Forwarded-Host", "a"),
        ] {
            assert_eq!(left_out(name, value), None, "{name}: {value}");
        }
    }

    #[test]
    fn a_raw_response_head_may_leave_out_only_what_its_worker_said_of_its_connection() {
        let may = |name: &str, value: &str| {
            hop_by_hop_raw(name.as_bytes())
                .is_some_and(|hop| hop.may_leave_out_of_response(value.as_bytes()))
        };
        for (name, value) in [
            ("Connection", "keep-alive"),
            ("connection", " Close "),
            ("Keep-Alive", "timeout=5, max=100"),
            ("Transfer-Encoding", "chunked"),
            ("transfer-encoding", "CHUNKED"),
        ] {
            assert!(may(name, value), "{name}: {value}");
        }
        for (name, value) in [
            ("Connection", "keep-alive, x-secret"),
            ("Connection", "upgrade"),
            ("Transfer-Encoding", "gzip, chunked"),
            ("Transfer-Encoding", "identity"),
            ("TE", "trailers"),
            ("Upgrade", "websocket"),
            ("Proxy-Connection", "keep-alive"),
            ("X-Keep-Alive", "1"),
        ] {
            assert!(!may(name, value), "{name}: {value}");
        }
    }

    #[test]
    fn hop_by_hop_names_are_told_the_same_way_as_spelled_on_the_wire() {
        let hop_by_hop = HOP_BY_HOP;
        for name in hop_by_hop.iter().chain([&header::UPGRADE]) {
            assert!(is_hop_by_hop(name));
            assert!(is_hop_by_hop_raw(name.as_str().as_bytes()), "{name}");
            let shouted = name.as_str().to_ascii_uppercase();
            assert!(is_hop_by_hop_raw(shouted.as_bytes()), "{shouted}");
        }
        for other in [
            "tea",
            "trailers",
            "content-length",
            "x-request-id",
            "upgrades",
            "",
            "t",
        ] {
            assert!(!is_hop_by_hop_raw(other.as_bytes()), "{other}");
        }
        // Everything the request path strips, replaces or reads makes a request head need a
        // map: the hop-by-hop names, what `Forwarding` writes in place of the client's, the
        // framing and expectation headers `encode_request_head` leaves out.
        let forwarding = Forwarding {
            request_id: &HeaderValue::from_static("r"),
            client: &HeaderValue::from_static("c"),
            over_tls: None,
            authority: None,
        };
        let all = [
            REQUEST_ID,
            FORWARDED_FOR,
            FORWARDED_PROTO,
            header::FORWARDED,
            header::CONTENT_LENGTH,
            header::TRANSFER_ENCODING,
            header::EXPECT,
            header::UPGRADE,
            header::HOST,
            header::USER_AGENT,
            header::COOKIE,
            GATEWAY,
        ];
        for name in HOP_BY_HOP.iter().chain(all.iter()) {
            let needed = is_hop_by_hop(name)
                || forwarding.replaces(name)
                || [
                    header::CONTENT_LENGTH,
                    header::TRANSFER_ENCODING,
                    header::EXPECT,
                ]
                .contains(name);
            let spelled = name.as_str().to_ascii_uppercase();
            assert_eq!(
                is_read_or_replaced_in_requests_raw(spelled.as_bytes()),
                needed,
                "{name}"
            );
        }
        for replaced in [
            "x-herd-gateway",
            "X-Herd-Gateway",
            "strict-transport-security",
        ] {
            assert!(
                is_replaced_in_responses_raw(replaced.as_bytes()),
                "{replaced}"
            );
        }
        for other in ["x-herd-worker", "x-herd-gatewax", "content-length", ""] {
            assert!(!is_replaced_in_responses_raw(other.as_bytes()), "{other}");
        }
    }

    use super::*;

    #[test]
    fn an_upgrade_needs_both_headers() {
        let mut headers = HeaderMap::new();
        headers.insert(header::UPGRADE, HeaderValue::from_static("websocket"));
        assert_eq!(
            upgrade(&headers),
            None,
            "Upgrade without Connection: upgrade"
        );
        headers.insert(
            header::CONNECTION,
            HeaderValue::from_static("keep-alive, Upgrade"),
        );
        assert_eq!(upgrade(&headers).unwrap(), "websocket");
        headers.remove(header::UPGRADE);
        assert_eq!(
            upgrade(&headers),
            None,
            "Connection: upgrade without Upgrade"
        );
    }

    #[test]
    fn hop_by_hop_headers_and_connection_listed_ones_go() {
        let mut headers = HeaderMap::new();
        headers.insert(
            header::CONNECTION,
            "keep-alive, x-secret, Close".parse().unwrap(),
        );
        headers.insert("keep-alive", "timeout=5".parse().unwrap());
        headers.insert("x-secret", "1".parse().unwrap());
        headers.insert(header::TRANSFER_ENCODING, "chunked".parse().unwrap());
        headers.insert(header::TE, "trailers".parse().unwrap());
        headers.insert(header::UPGRADE, "websocket".parse().unwrap());
        headers.insert("proxy-authorization", "Basic x".parse().unwrap());
        headers.insert("x-herd-worker", "w1".parse().unwrap());
        headers.insert(header::CONTENT_TYPE, "text/plain".parse().unwrap());
        strip_hop_by_hop(&mut headers);
        let left: Vec<&str> = headers.keys().map(|k| k.as_str()).collect();
        assert_eq!(left, vec!["x-herd-worker", "content-type"]);
    }

    /// Found by the property tests: a `Connection` value with a non-ASCII byte was skipped
    /// whole, so the names it listed were forwarded and its `upgrade` was not seen.
    #[test]
    fn connection_options_are_read_past_non_ascii_bytes() {
        let mut headers = HeaderMap::new();
        headers.insert(
            header::CONNECTION,
            HeaderValue::from_bytes(b"x-secret, caf\xe9, Upgrade").unwrap(),
        );
        headers.insert(header::UPGRADE, "websocket".parse().unwrap());
        headers.insert("x-secret", "1".parse().unwrap());
        assert_eq!(upgrade(&headers).unwrap(), "websocket");
        strip_hop_by_hop(&mut headers);
        assert!(headers.is_empty(), "{headers:?}");
    }

    #[test]
    fn request_ids_are_kept_when_sane() {
        assert!(is_sane_request_id(b"abc-123_x.y"));
        assert!(!is_sane_request_id(b""));
        assert!(!is_sane_request_id(b"has space"));
        assert!(!is_sane_request_id(b"semi;colon"));
        assert!(!is_sane_request_id(&[b'a'; 129]));
        assert!(is_sane_request_id(&[b'a'; 128]));

        let mut headers = HeaderMap::new();
        headers.insert(REQUEST_ID, "client-id-1".parse().unwrap());
        assert_eq!(request_id(&headers), "client-id-1");

        let mut headers = HeaderMap::new();
        headers.insert(REQUEST_ID, "bad id!".parse().unwrap());
        let id = request_id(&headers);
        assert_ne!(id, "bad id!");
        assert!(is_sane_request_id(id.as_bytes()));
        let none_sent = request_id(&HeaderMap::new());
        assert!(is_sane_request_id(none_sent.as_bytes()));
        assert_ne!(none_sent, id, "a new one each time");
    }

    #[test]
    fn new_request_ids_are_the_threads_prefix_and_its_counter() {
        let first = new_request_id();
        let second = new_request_id();
        let (first, second) = (first.to_str().unwrap(), second.to_str().unwrap());
        assert_eq!(first[..17], second[..17], "one prefix per thread");
        assert_eq!(&first[16..17], "-");
        assert!(first[..16].bytes().all(|b| b.is_ascii_hexdigit()));
        let counter = |id: &str| u64::from_str_radix(&id[17..], 16).unwrap();
        assert_eq!(counter(first) + 1, counter(second));
        assert_eq!(id_prefix(0xab), *b"00000000000000ab-");
    }

    #[test]
    fn recycled_maps_come_back_empty_and_big_ones_are_dropped() {
        // Another test on this thread may have left spares: start from none.
        while SPARES.with_borrow_mut(Vec::pop).is_some() {}
        let mut map = HeaderMap::with_capacity(8);
        map.insert(header::HOST, HeaderValue::from_static("a"));
        let capacity = map.capacity();
        drop(Recycled(map));
        let again = spare_map(2);
        assert!(again.is_empty());
        assert_eq!(again.capacity(), capacity);
        let mut big = HeaderMap::with_capacity(SPARE_MAP_CAPACITY * 2);
        big.insert(header::HOST, HeaderValue::from_static("a"));
        recycle(&mut big);
        assert!(SPARES.with_borrow(Vec::is_empty));
        // A map that never had room (a raw head's) is left as it is.
        recycle(&mut HeaderMap::new());
        assert!(SPARES.with_borrow(Vec::is_empty));
        // A fresh map when none is spare.
        assert!(spare_map(3).capacity() >= 3);
    }

    #[test]
    fn generated_ids_are_unique() {
        let a = new_request_id();
        let b = new_request_id();
        assert_ne!(a, b);
        assert!(is_sane_request_id(a.as_bytes()));
        let (prefix, counter) = a.to_str().unwrap().split_once('-').unwrap();
        assert_eq!(prefix.len(), 16);
        let next = u64::from_str_radix(counter, 16).unwrap() + 1;
        assert_eq!(b.to_str().unwrap(), format!("{prefix}-{next:x}"));
        let mut digits = [0u8; 4];
        put_hex(&mut digits, 0xbeef);
        assert_eq!(&digits, b"beef");
    }

    #[test]
    fn messages_without_hop_by_hop_headers_are_left_alone() {
        let mut headers = HeaderMap::new();
        headers.insert(header::HOST, "a".parse().unwrap());
        headers.insert("x-keep", "1".parse().unwrap());
        strip_hop_by_hop(&mut headers);
        assert_eq!(headers.len(), 2);
        headers.insert("proxy-connection", "keep-alive".parse().unwrap());
        strip_hop_by_hop(&mut headers);
        assert_eq!(headers.len(), 2);
    }

    #[test]
    fn over_tls_the_forwarded_element_names_the_client() {
        let v6 = OverTls::new("2001:db8::1".parse().unwrap());
        assert_eq!(v6.forwarded, r#"for="[2001:db8::1]";proto=https"#);
        let mapped = OverTls::new("::ffff:192.0.2.7".parse().unwrap());
        assert_eq!(mapped.forwarded, "for=192.0.2.7;proto=https");
    }

    #[test]
    fn idempotent_methods() {
        assert!(is_idempotent(&http::Method::GET));
        assert!(is_idempotent(&http::Method::PUT));
        assert!(is_idempotent(&http::Method::DELETE));
        assert!(!is_idempotent(&http::Method::POST));
        assert!(!is_idempotent(&http::Method::PATCH));
    }

    #[test]
    fn head_size_counts_target_and_headers() {
        let uri: http::Uri = "/abc?d=1".parse().unwrap();
        let mut headers = HeaderMap::new();
        headers.insert("x-a", "12345".parse().unwrap());
        assert_eq!(head_size(&uri, &headers), 8 + 3 + 5 + 4);
    }
}
