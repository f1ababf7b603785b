//! The gateway's live dashboard in a real headless Chromium (issue 13, item 4): real redis-server,
//! four herd-worker processes on two machines, one herd-gateway, light load through it.
//! - the page loads (the token in the address becomes a session cookie) and shows every worker
//!   by machine, with its state, and the recent events;
//! - when a worker is killed (SIGKILL), the page shows it out of service, without a reload.
//!
//! Chromium runs with `--dump-dom` (the DOM after the page's scripts ran, under a virtual-time
//! budget long enough for a few polls) and `--screenshot`, each run bounded by a timeout. Every
//! host name but 127.0.0.1 resolves to nothing, so the browser makes no other traffic.
//!
//! `HERD_DASHBOARD_SCREENSHOT=path` saves the final screenshot there (docs/dashboard.png is made
//! this way); otherwise it goes to a temp dir and is only checked to be a PNG.

use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use herd::load::{self, Plan};
use herd_tests::gateway::{ADMIN_TOKEN, GatewayOptions, TestGateway};
use herd_tests::redis::TestRedis;
use herd_tests::worker::{TestWorker, WorkerOptions};
use herd_tests::{client, temp_dir, unique_prefix, wait_until};
use serde_json::Value;

/// Longest a single Chromium run may take (a cold start on a loaded 2-core box is slow).
const CHROMIUM_TIMEOUT: Duration = Duration::from_secs(60);

/// The Chromium binary: `HERD_CHROMIUM`, or `chromium` / `chromium-browser` on the PATH.
fn chromium() -> PathBuf {
    if let Some(path) = std::env::var_os("HERD_CHROMIUM") {
        return path.into();
    }
    for name in ["chromium", "chromium-browser", "google-chrome"] {
        for dir in std::env::split_paths(&std::env::var_os("PATH").unwrap_or_default()) {
            let candidate = dir.join(name);
            if candidate.is_file() {
                return candidate;
            }
        }
    }
    panic!(
        "headless Chromium is needed for this test: apt-get install chromium (infra/test.sh does), or set HERD_CHROMIUM"
    );
}

/// Runs headless Chromium on `url` with `mode` (`--dump-dom` or `--screenshot=…`), giving the
/// page's scripts `budget_ms` of virtual time; returns stdout.
async fn run_chromium(profile: &Path, url: &str, mode: &str, budget_ms: u32) -> String {
    let mut command = tokio::process::Command::new(chromium());
    command
        .args([
            "--headless",
            "--no-sandbox",
            "--disable-gpu",
            "--disable-dev-shm-usage",
            "--no-first-run",
            "--no-default-browser-check",
            "--disable-background-networking",
            "--disable-component-update",
            "--disable-sync",
            "--disable-extensions",
            "--disable-default-apps",
            "--no-proxy-server",
            "--hide-scrollbars",
            "--window-size=1400,1100",
            "--host-resolver-rules=MAP * ~NOTFOUND , EXCLUDE 127.0.0.1",
        ])
        .arg(format!("--user-data-dir={}", profile.display()))
        .arg(format!("--virtual-time-budget={budget_ms}"))
        .arg(mode)
        .arg(url)
        .stdin(std::process::Stdio::null())
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .kill_on_drop(true);
    let output = tokio::time::timeout(CHROMIUM_TIMEOUT, command.output())
        .await
        .unwrap_or_else(|_| panic!("chromium took longer than {CHROMIUM_TIMEOUT:?} on {url}"))
        .unwrap_or_else(|error| panic!("cannot run chromium: {error}"));
    assert!(
        output.status.success(),
        "chromium failed ({}): {}",
        output.status,
        String::from_utf8_lossy(&output.stderr)
    );
    String::from_utf8_lossy(&output.stdout).into_owned()
}

/// The `data-state` of worker `id`'s row in a dumped DOM, if the row is there.
fn state_in_dom(dom: &str, id: &str) -> Option<String> {
    let start = dom.find(&format!("data-worker=\"{id}\""))?;
    let row = &dom[start..dom[start..].find('>').map_or(dom.len(), |end| start + end)];
    let state = row.split("data-state=\"").nth(1)?;
    Some(state.split('"').next()?.to_string())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_dashboard_shows_workers_and_a_killed_one_in_chromium() {
    let browser = chromium();
    let dir = temp_dir();
    let profile = temp_dir();
    let redis = TestRedis::start();
    let prefix = unique_prefix();
    let mut workers: Vec<TestWorker> = [("w1", "m1"), ("w2", "m1"), ("w3", "m2"), ("w4", "m2")]
        .iter()
        .map(|(id, machine)| {
            let mut options = WorkerOptions::new(*id, redis.url(), &prefix);
            options.machine = machine.to_string();
            TestWorker::start(&options, dir.path())
        })
        .collect();
    let gateway = TestGateway::start(
        &GatewayOptions {
            registry: Some((redis.url(), prefix.clone())),
            ..GatewayOptions::default()
        },
        dir.path(),
    );
    let http = client();
    let api = gateway.admin_url("/api/workers");
    wait_until(
        Duration::from_secs(15),
        "the gateway knows all four workers",
        || {
            let request = http.get(&api).bearer_auth(ADMIN_TOKEN).send();
            async move {
                let Ok(response) = request.await else {
                    return false;
                };
                let list: Value = response.json().await.unwrap_or_default();
                list.as_array().is_some_and(|l| l.len() == 4)
            }
        },
    )
    .await;

    // Light load, so rates and latencies have something to show (bounded: 60 req/s, 40 s at
    // most; stopped when the test ends).
    let plan = Plan {
        rate: 60,
        duration: Duration::from_secs(40),
        concurrency: 4,
        timeout: Duration::from_secs(5),
    };
    let public = gateway.url("/work?ms=2");
    let load = tokio::spawn(async move {
        load::run(&plan, &client(), move |c: &reqwest::Client, _| {
            c.get(&public)
        })
        .await
    });

    // The page, logged in through the token in its address.
    let url = gateway.admin_url(&format!("/dashboard?token={ADMIN_TOKEN}"));
    let started = Instant::now();
    let dom = run_chromium(profile.path(), &url, "--dump-dom", 4000).await;
    println!("chromium --dump-dom took {:?}", started.elapsed());
    for id in ["w1", "w2", "w3", "w4"] {
        let state = state_in_dom(&dom, id).unwrap_or_else(|| panic!("no row for {id} in {dom}"));
        assert!(
            matches!(state.as_str(), "healthy" | "slow_start"),
            "{id} is {state}"
        );
    }
    assert!(dom.contains("data-machine=\"m1\""), "{dom}");
    assert!(dom.contains("data-machine=\"m2\""), "{dom}");
    assert!(dom.contains("data-ready=\"true\""), "{dom}");
    assert!(dom.contains("single gateway (failover off)"), "{dom}");
    assert!(
        dom.contains("<td>added</td>"),
        "the join events show: {dom}"
    );

    // Without the token: the sign-in form, no worker.
    let anonymous = temp_dir();
    let dom = run_chromium(
        anonymous.path(),
        &gateway.admin_url("/dashboard"),
        "--dump-dom",
        1000,
    )
    .await;
    assert!(dom.contains("id=\"login\""), "{dom}");
    assert!(!dom.contains("data-worker"), "{dom}");

    // Kill one; the page shows it out of service (one page load, several polls: it changes
    // without a reload).
    workers[1].kill9();
    let deadline = Instant::now() + Duration::from_secs(45);
    let dom = loop {
        let dom = run_chromium(profile.path(), &url, "--dump-dom", 4000).await;
        let state = state_in_dom(&dom, "w2");
        if matches!(
            state.as_deref(),
            Some("unreachable" | "down" | "ejected") | None
        ) && dom.contains("data-worker=\"w1\"")
        {
            println!("w2 shown as {state:?}");
            break dom;
        }
        assert!(
            Instant::now() < deadline,
            "w2 still shown as {state:?} 45 s after kill -9: {dom}"
        );
    };
    for id in ["w1", "w3", "w4"] {
        let state = state_in_dom(&dom, id);
        assert!(
            matches!(state.as_deref(), Some("healthy" | "slow_start")),
            "{id} is {state:?}"
        );
    }

    // A screenshot of the page as it is now (4 s of polls: rates filled in).
    let shot = std::env::var_os("HERD_DASHBOARD_SCREENSHOT")
        .map(PathBuf::from)
        .unwrap_or_else(|| dir.path().join("dashboard.png"));
    run_chromium(
        profile.path(),
        &url,
        &format!("--screenshot={}", shot.display()),
        4000,
    )
    .await;
    let png = std::fs::read(&shot).expect("chromium wrote the screenshot");
    assert!(png.starts_with(b"\x89PNG"), "not a PNG");
    assert!(png.len() > 20_000, "a blank page? {} bytes", png.len());
    println!("screenshot: {} ({} bytes)", shot.display(), png.len());

    load.abort();
    drop(browser);
    drop(workers);
}
