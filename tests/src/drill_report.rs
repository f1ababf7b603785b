//! Reading `herd drill --json` reports in tests.

use serde_json::Value;

/// Whether a `gateway-stop` report failed only for the one loss a floating address's move can
/// cause (docs/failover.md, "Graceful stop"): a client whose connection was opening to the old
/// active just as the standby's gratuitous ARP moved it sends its request to the new holder,
/// which knows no such connection and resets it. No gateway can prevent that at layer 2; it
/// takes one request sent at the move, about 1 run in 30 on a busy box. Anything else (two
/// failures, a timeout or 5xx, a failure away from the move, a lost session) is a real failure.
///
/// The reset comes in two shapes: after the request was sent, or, when the new holder's reset
/// beat the client's look at its fresh connection, as a connect error ("tcp connect error:
/// Connection reset by peer"). Both are kind `other`; until 2026-12-06 the drill counted the
/// second as `refused`, and a CI run failed on one such GET, 292 ms after the SIGTERM.
///
/// The move is when the standby took the role over (`took_over_ms`, from its own metrics), or,
/// in reports without it, the first answer through it (`first_success_ms`). The new active
/// stamps its takeover just after claiming the address, so a reset at the move is sent at most
/// a few milliseconds before that stamp: one sent well before it came from the old active, a
/// real failure.
///
/// The drill must have failed for that request alone: a GET (a failed POST does not fail a
/// drill by itself, so a failed drill with one failed POST failed for something else), and a
/// verdict naming nothing else.
pub fn one_reset_at_the_move(report: &Value) -> bool {
    let failed = report["failed_requests"]
        .as_array()
        .cloned()
        .unwrap_or_default();
    let [only] = failed.as_slice() else {
        return false;
    };
    let sent = only["sent_from_fault_ms"].as_f64().unwrap_or(f64::MAX);
    let at_the_move = match (
        report["took_over_ms"].as_f64(),
        report["first_success_ms"].as_f64(),
    ) {
        (Some(took_over), _) => (-30.0..=100.0).contains(&(sent - took_over)),
        (None, Some(first_success)) => (sent - first_success).abs() <= 100.0,
        (None, None) => false,
    };
    let detail = only["detail"].as_str().unwrap_or_default();
    let reason = report["reason"].as_str().unwrap_or_default();
    report["requests"]["failed"] == 1
        && report["sessions"]["lost"] == 0
        && only["method"] == "GET"
        && reason.starts_with("1 idempotent requests failed")
        && !reason.contains("; ")
        && only["kind"] == "other"
        && detail.contains("reset")
        && at_the_move
}

#[cfg(test)]
mod tests {
    use super::*;

    const RESET_AFTER_SENDING: &str = "error sending request: client error (SendRequest): \
        connection error: Connection reset by peer (os error 104)";
    const RESET_AS_IT_OPENED: &str = "error sending request: client error (Connect): tcp \
        connect error: Connection reset by peer (os error 104)";

    fn failed(sent: f64, method: &str, kind: &str, detail: &str) -> Value {
        serde_json::json!({
            "sent_from_fault_ms": sent,
            "method": method,
            "kind": kind,
            "detail": detail,
        })
    }

    /// A failed gateway-stop report with `requests` failed, as the drill writes it.
    fn report(requests: &[Value], lost: u64) -> Value {
        serde_json::json!({
            "first_success_ms": 408.5,
            "requests": {"failed": requests.len()},
            "sessions": {"lost": lost},
            "failed_requests": requests,
            "reason": format!("{} idempotent requests failed (other {}) (target 0)", requests.len(), requests.len()),
        })
    }

    fn get_reset(sent: f64) -> Value {
        failed(sent, "GET", "other", RESET_AFTER_SENDING)
    }

    #[test]
    fn one_reset_get_at_the_move_is_accepted_from_gateway_stop() {
        assert!(one_reset_at_the_move(&report(&[get_reset(386.3)], 0)));
        // A connection the new holder reset as it opened: a connect error.
        assert!(one_reset_at_the_move(&report(
            &[failed(390.0, "GET", "other", RESET_AS_IT_OPENED)],
            0
        )));
    }

    #[test]
    fn the_move_is_the_takeover_when_the_report_has_it() {
        // 116 ms before the first answer through the new active, 11 ms after its takeover.
        let mut at_takeover = report(&[get_reset(292.0)], 0);
        assert!(!one_reset_at_the_move(&at_takeover));
        at_takeover["took_over_ms"] = serde_json::json!(281.4);
        assert!(one_reset_at_the_move(&at_takeover));
        // Sent well before the takeover: the old active reset it, a real failure.
        at_takeover["took_over_ms"] = serde_json::json!(350.0);
        assert!(!one_reset_at_the_move(&at_takeover));
        // And long after it.
        at_takeover["took_over_ms"] = serde_json::json!(150.0);
        assert!(!one_reset_at_the_move(&at_takeover));
    }

    #[test]
    fn anything_else_is_a_real_failure() {
        // Away from the move; a timeout; a true refusal; two failures; a session lost.
        assert!(!one_reset_at_the_move(&report(&[get_reset(100.0)], 0)));
        assert!(!one_reset_at_the_move(&report(
            &[failed(386.3, "GET", "timeout", "operation timed out")],
            0
        )));
        assert!(!one_reset_at_the_move(&report(
            &[failed(
                386.3,
                "GET",
                "refused",
                "tcp connect error: Connection refused (os error 111)"
            )],
            0
        )));
        assert!(!one_reset_at_the_move(&report(
            &[get_reset(386.3), get_reset(390.0)],
            0
        )));
        assert!(!one_reset_at_the_move(&report(&[get_reset(386.3)], 1)));
        // A failed POST does not fail a drill: with one, the drill failed for something else.
        let mut post = report(&[failed(386.3, "POST", "other", RESET_AFTER_SENDING)], 0);
        post["reason"] = serde_json::json!(
            "a request waited 16000 ms, longer than the gateway's request timeout (15000 ms)"
        );
        assert!(!one_reset_at_the_move(&post));
        // The reset at the move and another missed target.
        let mut more = report(&[get_reset(386.3)], 0);
        more["reason"] = serde_json::json!(
            "1 idempotent requests failed (other 1) (target 0); requests were still failing when the load ended (no success sent after the last failure)"
        );
        assert!(!one_reset_at_the_move(&more));
    }
}
