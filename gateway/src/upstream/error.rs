//! What went wrong with one attempt at one worker, with the two facts every decision after it
//! needs as fields: did the request reach the worker, and whose fault was it. Decided here, in the
//! upstream client (`connection.rs`), where the bytes were written and read; the proxy only acts
//! on them (retry or not, blame or not) and [`crate::error`] turns them into responses.

/// What happened to one attempt.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum UpstreamErrorKind {
    /// TCP connect refused, or no route to the worker: nothing serves there.
    Refused,
    /// TCP connect timed out (or failed otherwise): the worker never saw the request.
    Connect,
    /// The connection broke (reset, closed) after the request may have been sent.
    Reset,
    /// A kept-alive connection was closed or reset before the first byte of an answer: most
    /// likely the worker closed it idle (or exited) as the request went out. It may have read
    /// the request, so only an idempotent one is sent again; the worker is not blamed.
    Closed,
    /// No response headers within `timeouts.response_header`.
    Timeout,
    /// The worker answered something that is not HTTP, or broke the protocol.
    Protocol,
    /// The client went away while its body was being streamed to the worker: its fault.
    ClientGone,
    /// The client's streamed body was broken (bad chunking, over the size limit): its fault.
    ClientBody,
}

/// One failed attempt at one worker.
#[derive(Debug, thiserror::Error)]
#[error("{kind:?} error from worker: {detail}")]
pub struct UpstreamError {
    /// What happened.
    pub kind: UpstreamErrorKind,
    /// Whether the request may have reached the worker (false only when provably not).
    pub reached: bool,
    /// The underlying error, in words (for logs).
    pub detail: String,
}

impl UpstreamError {
    /// The attempt ran out of time waiting for response headers.
    pub fn timeout() -> Self {
        UpstreamError {
            kind: UpstreamErrorKind::Timeout,
            reached: true,
            detail: "no response headers in time".into(),
        }
    }

    /// Whether another attempt elsewhere is safe: always when the worker never saw the request
    /// (unless the client broke off); for idempotent requests also after a reset (or a timeout,
    /// when `retry_timeouts`).
    pub fn retry_safe(&self, idempotent: bool, retry_timeouts: bool) -> bool {
        match self.kind {
            UpstreamErrorKind::ClientGone | UpstreamErrorKind::ClientBody => false,
            _ if !self.reached => true,
            UpstreamErrorKind::Reset | UpstreamErrorKind::Closed => idempotent,
            UpstreamErrorKind::Timeout => idempotent && retry_timeouts,
            UpstreamErrorKind::Refused
            | UpstreamErrorKind::Connect
            | UpstreamErrorKind::Protocol => false,
        }
    }

    /// Whether the failure counts against the worker's passive health. The client's faults never
    /// do; a refused connect doesn't either, it makes the worker unreachable at once instead.
    pub fn blames_worker(&self) -> bool {
        match self.kind {
            UpstreamErrorKind::Connect
            | UpstreamErrorKind::Reset
            | UpstreamErrorKind::Timeout
            | UpstreamErrorKind::Protocol => true,
            UpstreamErrorKind::Refused
            | UpstreamErrorKind::Closed
            | UpstreamErrorKind::ClientGone
            | UpstreamErrorKind::ClientBody => false,
        }
    }

    /// The retry reason label.
    pub fn reason(&self) -> &'static str {
        match self.kind {
            UpstreamErrorKind::Refused => "refused",
            UpstreamErrorKind::Connect => "connect",
            UpstreamErrorKind::Reset => "reset",
            UpstreamErrorKind::Closed => "stale_connection",
            UpstreamErrorKind::Timeout => "timeout",
            UpstreamErrorKind::Protocol => "protocol",
            UpstreamErrorKind::ClientGone | UpstreamErrorKind::ClientBody => "client",
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn err(kind: UpstreamErrorKind, reached: bool) -> UpstreamError {
        UpstreamError {
            kind,
            reached,
            detail: String::new(),
        }
    }

    #[test]
    fn retry_safety_depends_on_reach_and_method() {
        let connect = err(UpstreamErrorKind::Connect, false);
        assert!(
            connect.retry_safe(false, false),
            "never reached: any method"
        );
        let reset = err(UpstreamErrorKind::Reset, true);
        assert!(reset.retry_safe(true, false));
        assert!(
            !reset.retry_safe(false, true),
            "POST after a reset: not safe"
        );
        let timeout = UpstreamError::timeout();
        assert!(timeout.retry_safe(true, true));
        assert!(!timeout.retry_safe(true, false));
        assert!(!timeout.retry_safe(false, true));
        assert!(!err(UpstreamErrorKind::Protocol, true).retry_safe(true, true));
        let refused = err(UpstreamErrorKind::Refused, false);
        assert!(refused.retry_safe(false, false));
        assert!(
            !refused.blames_worker(),
            "refused: unreachable, not a streak"
        );
        // A client that broke off is never replayed, even before a byte went out.
        for kind in [UpstreamErrorKind::ClientGone, UpstreamErrorKind::ClientBody] {
            assert!(!err(kind, false).retry_safe(true, true));
            assert!(!err(kind, true).blames_worker());
        }
        assert!(err(UpstreamErrorKind::Timeout, true).blames_worker());
        let stale = err(UpstreamErrorKind::Closed, true);
        assert!(stale.retry_safe(true, false) && !stale.retry_safe(false, true));
        assert!(!stale.blames_worker(), "an idle close is no failure");
    }
}
