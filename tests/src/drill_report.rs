//! Reading `herd drill --json` reports in tests.

use serde_json::Value;

/// Whether a `gateway-stop` report failed only for the one loss a floating address's move can
/// cause (docs/failover.md, "Graceful stop"): a client whose connection was opening to the old
/// active just as the standby's gratuitous ARP moved it sends its request to the new holder,
/// which knows no such connection and resets it. No gateway can prevent that at layer 2; it
/// takes one request sent at the move, about 1 run in 30 on a busy box. Anything else (two
/// failures, a timeout or 5xx, a failure away from the move, a lost session) is a real failure.
///
/// The reset comes in two shapes: after the request was sent (kind `other`), or, when the new
/// holder's reset beat the client's look at its fresh connection, as a connect error (kind
/// `refused`, "tcp connect error: Connection reset by peer"; a CI run on 2026-12-06 failed on
/// one such GET, 292 ms after the SIGTERM, when only `other` was accepted). A real refusal says
/// "Connection refused", not "reset". The move is when the standby took the role over
/// (`took_over_ms`, from its own metrics), or, in reports without it, the first answer through
/// it (`first_success_ms`).
pub fn one_reset_at_the_move(report: &Value) -> bool {
    let failed = report["failed_requests"]
        .as_array()
        .cloned()
        .unwrap_or_default();
    let [only] = failed.as_slice() else {
        return false;
    };
    let sent = only["sent_from_fault_ms"].as_f64().unwrap_or(f64::MAX);
    let near = |moment: &Value| moment.as_f64().is_some_and(|at| (sent - at).abs() <= 100.0);
    let detail = only["detail"].as_str().unwrap_or_default();
    report["requests"]["failed"] == 1
        && report["sessions"]["lost"] == 0
        && (only["kind"] == "other" || only["kind"] == "refused")
        && detail.contains("reset")
        && (near(&report["took_over_ms"]) || near(&report["first_success_ms"]))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_one_reset_at_the_move_is_accepted_from_gateway_stop() {
        let report = |failed: Value, count: u64, lost: u64| {
            serde_json::json!({
                "first_success_ms": 408.5,
                "requests": {"failed": count},
                "sessions": {"lost": lost},
                "failed_requests": failed,
            })
        };
        let reset = |sent: f64, kind: &str| {
            serde_json::json!({
                "sent_from_fault_ms": sent,
                "kind": kind,
                "detail": "error sending request: client error (SendRequest): connection error: Connection reset by peer (os error 104)",
            })
        };
        assert!(one_reset_at_the_move(&report(
            serde_json::json!([reset(386.3, "other")]),
            1,
            0
        )));
        // Away from the move, of another kind, two of them, or a session lost: a real failure.
        assert!(!one_reset_at_the_move(&report(
            serde_json::json!([reset(100.0, "other")]),
            1,
            0
        )));
        assert!(!one_reset_at_the_move(&report(
            serde_json::json!([reset(386.3, "timeout")]),
            1,
            0
        )));
        // Far from the first answer through the new active, but at the takeover.
        let mut at_takeover = report(serde_json::json!([reset(292.0, "other")]), 1, 0);
        assert!(!one_reset_at_the_move(&at_takeover));
        at_takeover["took_over_ms"] = serde_json::json!(281.4);
        assert!(one_reset_at_the_move(&at_takeover));
        at_takeover["took_over_ms"] = serde_json::json!(150.0);
        assert!(!one_reset_at_the_move(&at_takeover));
        // A connection reset as it opened: a connect error.
        let connect_reset = |sent: f64, detail: &str| {
            serde_json::json!([{
                "sent_from_fault_ms": sent,
                "kind": "refused",
                "detail": detail,
            }])
        };
        let reset_at_open = "error sending request: client error (Connect): tcp connect error: \
                             Connection reset by peer (os error 104)";
        assert!(one_reset_at_the_move(&report(
            connect_reset(390.0, reset_at_open),
            1,
            0
        )));
        assert!(!one_reset_at_the_move(&report(
            connect_reset(
                390.0,
                "tcp connect error: Connection refused (os error 111)"
            ),
            1,
            0
        )));
        let two = serde_json::json!([reset(386.3, "other"), reset(390.0, "other")]);
        assert!(!one_reset_at_the_move(&report(two, 2, 0)));
        assert!(!one_reset_at_the_move(&report(
            serde_json::json!([reset(386.3, "other")]),
            1,
            1
        )));
    }
}
