//! The operators' assets under infra/observability/ stay true to the gateway (issue 13, item 5):
//! - every metric the Grafana dashboard and the alerting rules name is one the gateway exports
//!   (names taken from a rendered `/metrics` with every family populated, not from a list);
//! - the dashboard JSON is a well-formed Grafana dashboard (ids, grid, data source, targets);
//! - `promtool check rules` accepts the rules and every dashboard expression (written out as
//!   recording rules), and `promtool test rules` passes the rules' unit tests;
//! - docs/observability.md says what to do for every alert.
//!
//! promtool comes from Debian's `prometheus` package (infra/test.sh installs it when missing).

use std::collections::BTreeSet;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, AtomicUsize};

use herd_gateway::GatewayConfig;
use herd_gateway::balancer::Balancer;
use herd_gateway::failover::{FailoverStatus, PeerStatus, Role, Transition};
use herd_gateway::metrics::Metrics;
use serde_json::Value;

fn repo() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .expect("workspace root")
        .to_path_buf()
}

fn read(relative: &str) -> String {
    let path = repo().join(relative);
    std::fs::read_to_string(&path).unwrap_or_else(|e| panic!("cannot read {}: {e}", path.display()))
}

/// The metric names a gateway exports, from `/metrics` rendered with every family populated
/// (a worker, the failover pair, the registry, a retry, a refusal, an error, …).
fn exported() -> BTreeSet<String> {
    let metrics = Arc::new(Metrics::new());
    let balancer = Balancer::new(
        &GatewayConfig::default(),
        metrics.clone(),
        Box::new(|_, _| {}),
    );
    balancer.watch_metrics(&metrics);
    balancer.add(balancer.static_spec("127.0.0.1:1")).unwrap();
    balancer
        .notifier()
        .events()
        .registry_redis(true, "answered");
    let (_keep, status) = tokio::sync::watch::channel(FailoverStatus {
        id: "gw1".into(),
        role: Role::Active,
        epoch: 1,
        holds_address: true,
        redis_reachable: true,
        peer: PeerStatus::default(),
        transitions: 1,
        last_transition: Some(Transition {
            from: Role::Standby,
            to: Role::Active,
            reason: "test".into(),
            epoch: 1,
            at_unix_ms: 1,
        }),
    });
    metrics.watch_failover(status);
    metrics.watch_client_connections(Arc::from(vec![AtomicUsize::new(0)]));
    metrics.watch_hedge_delay(Arc::new(AtomicU64::new(0)));
    metrics.retry("connect");
    metrics.retry_refused("budget");
    metrics.error("no_worker_available");
    metrics.health_check(true);
    metrics.state_change("127.0.0.1:1", "down", "active");
    metrics.connections_refused.inc();
    metrics.connections_refused_per_client.inc();
    // TLS families (certificate expiry, handshakes, reloads) exist only with [tls] on.
    let certs = tempfile::tempdir().unwrap();
    let mut tls = herd_gateway::tls::TlsConfig {
        enabled: true,
        cert: certs.path().join("c.pem"),
        key: certs.path().join("k.pem"),
        ..Default::default()
    };
    let key = rcgen::KeyPair::generate().unwrap();
    let cert = rcgen::CertificateParams::new(vec!["gw.test".to_string()])
        .unwrap()
        .self_signed(&key)
        .unwrap();
    std::fs::write(&tls.cert, cert.pem()).unwrap();
    std::fs::write(&tls.key, key.serialize_pem()).unwrap();
    tls.listen = "127.0.0.1:0".parse().unwrap();
    let terminator = herd_gateway::tls::Terminator::new(&tls).expect("the test certificate loads");
    metrics.register_collector(terminator.collector());
    metrics
        .render()
        .lines()
        .filter(|line| !line.starts_with('#') && !line.is_empty())
        .map(|line| {
            line.split(['{', ' '])
                .next()
                .unwrap_or_default()
                .to_string()
        })
        .collect()
}

/// Every `herd_gateway_…` name in `text`.
fn names_in(text: &str) -> BTreeSet<String> {
    text.match_indices("herd_gateway_")
        .map(|(start, _)| {
            text[start..]
                .chars()
                .take_while(|c| c.is_ascii_alphanumeric() || *c == '_')
                .collect()
        })
        .collect()
}

/// The names in `text` the gateway does not export.
fn unknown(text: &str, exported: &BTreeSet<String>) -> Vec<String> {
    names_in(text)
        .into_iter()
        .filter(|name| !exported.contains(name))
        .collect()
}

fn dashboard() -> Value {
    serde_json::from_str(&read("infra/observability/grafana-dashboard.json"))
        .expect("grafana-dashboard.json is JSON")
}

/// Every target expression of the dashboard.
fn expressions(dashboard: &Value) -> Vec<String> {
    dashboard["panels"]
        .as_array()
        .expect("panels")
        .iter()
        .flat_map(|p| p["targets"].as_array().cloned().unwrap_or_default())
        .map(|t| {
            t["expr"]
                .as_str()
                .expect("every target has an expr")
                .to_string()
        })
        .collect()
}

#[test]
fn the_name_check_catches_a_metric_the_gateway_does_not_export() {
    let exported = exported();
    assert!(
        exported.contains("herd_gateway_worker_state"),
        "{exported:?}"
    );
    assert!(exported.contains("herd_gateway_request_duration_seconds_bucket"));
    assert!(exported.contains("herd_gateway_registry_redis_reachable"));
    assert!(exported.contains("herd_gateway_tls_certificate_expiry_timestamp_seconds"));
    assert_eq!(
        unknown(
            "rate(herd_gateway_retries_total[5m]) / herd_gateway_requests_total",
            &exported
        ),
        ["herd_gateway_requests_total"]
    );
}

#[test]
fn dashboard_and_rules_name_only_exported_metrics() {
    let exported = exported();
    let rules = read("infra/observability/alerts.yml");
    assert!(
        rules
            .contains("herd_gateway_tls_certificate_expiry_timestamp_seconds - time() < 3 * 86400"),
        "the certificate expiry alerts"
    );
    assert_eq!(
        unknown(&rules, &exported),
        Vec::<String>::new(),
        "alerts.yml"
    );
    let tests = read("infra/observability/alerts_test.yml");
    assert_eq!(
        unknown(&tests, &exported),
        Vec::<String>::new(),
        "alerts_test.yml"
    );
    let dashboard = dashboard();
    let expressions = expressions(&dashboard);
    assert!(expressions.len() >= 20, "{}", expressions.len());
    for expr in &expressions {
        assert_eq!(unknown(expr, &exported), Vec::<String>::new(), "{expr}");
        assert!(!names_in(expr).is_empty(), "no gateway metric in {expr}");
    }
    // Every gateway family is on the dashboard somewhere (histogram parts count as one).
    let shown: BTreeSet<String> = expressions.iter().flat_map(|e| names_in(e)).collect();
    let missing: Vec<&String> = exported
        .iter()
        .filter(|name| {
            let family = name
                .trim_end_matches("_bucket")
                .trim_end_matches("_sum")
                .trim_end_matches("_count");
            !shown.iter().any(|s| s.starts_with(family))
                && !name.ends_with("_last_transition_timestamp_seconds")
        })
        .collect();
    assert!(missing.is_empty(), "not on the dashboard: {missing:?}");
}

#[test]
fn the_dashboard_is_a_well_formed_grafana_dashboard() {
    let dashboard = dashboard();
    assert_eq!(dashboard["uid"], "herd-gateway");
    assert!(dashboard["title"].is_string());
    assert!(dashboard["schemaVersion"].as_u64().unwrap() >= 36);
    let variables: Vec<&str> = dashboard["templating"]["list"]
        .as_array()
        .unwrap()
        .iter()
        .map(|v| v["name"].as_str().unwrap())
        .collect();
    assert_eq!(variables, ["datasource", "instance"]);
    let mut ids = BTreeSet::new();
    for panel in dashboard["panels"].as_array().unwrap() {
        let title = panel["title"].as_str().expect("every panel has a title");
        assert!(
            ids.insert(panel["id"].as_u64().unwrap()),
            "duplicate id at {title}"
        );
        let grid = &panel["gridPos"];
        let (x, w) = (grid["x"].as_u64().unwrap(), grid["w"].as_u64().unwrap());
        assert!(
            x + w <= 24 && grid["h"].as_u64().unwrap() > 0,
            "{title}: {grid}"
        );
        let kind = panel["type"].as_str().unwrap();
        if kind == "row" {
            continue;
        }
        assert!(matches!(kind, "stat" | "timeseries"), "{title}: {kind}");
        assert_eq!(panel["datasource"]["uid"], "${datasource}", "{title}");
        let targets = panel["targets"].as_array().unwrap();
        assert!(!targets.is_empty(), "{title} has no query");
        let refs: BTreeSet<&str> = targets
            .iter()
            .map(|t| t["refId"].as_str().unwrap())
            .collect();
        assert_eq!(refs.len(), targets.len(), "{title}: refIds repeat");
        for target in targets {
            let expr = target["expr"].as_str().unwrap();
            assert!(expr.contains("instance=~\"$instance\""), "{title}: {expr}");
        }
    }
}

fn promtool() -> PathBuf {
    for dir in std::env::split_paths(&std::env::var_os("PATH").unwrap_or_default()) {
        let candidate = dir.join("promtool");
        if candidate.is_file() {
            return candidate;
        }
    }
    panic!("promtool is needed for this test: apt-get install prometheus (infra/test.sh does)");
}

fn run(command: &mut Command) {
    let output = command.output().expect("promtool runs");
    assert!(
        output.status.success(),
        "{command:?} failed:\n{}\n{}",
        String::from_utf8_lossy(&output.stdout),
        String::from_utf8_lossy(&output.stderr)
    );
}

#[test]
fn promtool_accepts_the_rules_and_the_dashboard_queries() {
    let promtool = promtool();
    let dir = repo().join("infra/observability");
    run(Command::new(&promtool)
        .arg("check")
        .arg("rules")
        .arg(dir.join("alerts.yml")));
    run(Command::new(&promtool)
        .current_dir(&dir)
        .args(["test", "rules", "alerts_test.yml"]));

    // The dashboard's queries as recording rules, Grafana's variables filled in: promtool
    // parses each one.
    let temp = tempfile::tempdir().unwrap();
    let mut rules = String::from("groups:\n  - name: dashboard\n    rules:\n");
    for (n, expr) in expressions(&dashboard()).iter().enumerate() {
        let expr = expr
            .replace("$__rate_interval", "1m")
            .replace("$instance", ".*");
        rules.push_str(&format!(
            "      - record: dashboard:query{n}\n        expr: {}\n",
            serde_json::to_string(&expr).unwrap()
        ));
    }
    let path = temp.path().join("dashboard-queries.yml");
    std::fs::write(&path, rules).unwrap();
    run(Command::new(&promtool).arg("check").arg("rules").arg(&path));
}

#[test]
fn every_alert_has_a_runbook_in_the_docs() {
    let rules = read("infra/observability/alerts.yml");
    let docs = read("docs/observability.md");
    let alerts: Vec<&str> = rules
        .lines()
        .filter_map(|line| line.trim().strip_prefix("- alert: "))
        .collect();
    assert!(alerts.len() >= 6, "{alerts:?}");
    for alert in alerts {
        assert!(
            docs.contains(&format!("### {alert}")),
            "docs/observability.md has no section for {alert}"
        );
    }
}
