//! Sessions with real workers and a real Redis: no lost updates across workers, ids regenerated
//! on login with a short grace for the old one, fresh sessions for unknown or garbage cookies,
//! idle and absolute timeouts, a size limit that leaves the stored session untouched, and logouts
//! that stay logged out.

use std::collections::{BTreeSet, HashMap};
use std::time::{Duration, Instant};

use herd_shared::keys::Keys;
use herd_tests::gateway::{GatewayOptions, TestGateway};
use herd_tests::redis::TestRedis;
use herd_tests::session_calls::{add_item, get_json, item_names, login};
use herd_tests::worker::{TestWorker, WorkerOptions};
use herd_tests::worker_support::{cookie, plain_client, set_cookie_header, set_session_cookie};
use herd_tests::{temp_dir, unique_prefix};
use redis::AsyncCommands;
use serde_json::{Value, json};

/// Redis, `n` workers sharing it (unregistered: the tests talk to them directly), and the prefix.
struct Setup {
    workers: Vec<TestWorker>,
    redis: TestRedis,
    prefix: String,
    _dir: tempfile::TempDir,
}

fn setup(n: usize, env: &[(&str, &str)]) -> Setup {
    let dir = temp_dir();
    let redis = TestRedis::start();
    let prefix = unique_prefix();
    let workers = (1..=n)
        .map(|i| {
            let mut options = WorkerOptions::new(format!("w{i}"), redis.url(), &prefix);
            options.registry = false;
            for (key, value) in env {
                options = options.env(*key, *value);
            }
            TestWorker::start(&options, dir.path())
        })
        .collect();
    Setup {
        workers,
        redis,
        prefix,
        _dir: dir,
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn concurrent_cart_additions_over_three_workers_are_all_kept() {
    const ADDITIONS: usize = 240;
    const IN_FLIGHT: usize = 60;
    let setup = setup(3, &[]);
    let client = plain_client();
    let id = login(&client, &setup.workers[0], "ann", None).await;

    let started = Instant::now();
    let workers: Vec<String> = setup.workers.iter().map(|w| w.url("/cart/items")).collect();
    let semaphore = std::sync::Arc::new(tokio::sync::Semaphore::new(IN_FLIGHT));
    let mut tasks = Vec::new();
    for n in 0..ADDITIONS {
        let permit = semaphore.clone().acquire_owned().await.unwrap();
        let client = client.clone();
        let url = workers[n % workers.len()].clone();
        let id = id.clone();
        tasks.push(tokio::spawn(async move {
            let response = client
                .post(url)
                .header("cookie", cookie(&id))
                .json(&json!({ "item": format!("item-{n}"), "qty": 1 }))
                .send()
                .await
                .unwrap();
            drop(permit);
            let worker = response.headers()["x-herd-worker"]
                .to_str()
                .unwrap()
                .to_string();
            (response.status().as_u16(), worker)
        }));
    }
    let mut served_by = BTreeSet::new();
    for task in tasks {
        let (status, worker) = task.await.unwrap();
        assert_eq!(status, 200);
        served_by.insert(worker);
    }
    assert_eq!(served_by.len(), 3, "{served_by:?}");
    let (status, cart) = get_json(&client, &setup.workers[1], "/cart", &id).await;
    assert_eq!(status, 200);
    let names: BTreeSet<String> = item_names(&cart).into_iter().collect();
    let expected: BTreeSet<String> = (0..ADDITIONS).map(|n| format!("item-{n}")).collect();
    assert_eq!(
        names.len(),
        ADDITIONS,
        "missing: {:?}",
        expected.difference(&names).collect::<Vec<_>>()
    );
    assert_eq!(names, expected);
    eprintln!(
        "{ADDITIONS} concurrent additions over 3 workers in {:?}",
        started.elapsed()
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn login_regenerates_the_id_keeps_the_data_and_the_old_id_dies_after_the_grace() {
    let setup = setup(2, &[("HERD_WORKER_SESSION__REGENERATE_GRACE", "2s")]);
    let (w1, w2) = (&setup.workers[0], &setup.workers[1]);
    let client = plain_client();
    let first = login(&client, w1, "ann", None).await;
    assert_eq!(add_item(&client, w2, &first, "apple").await.0, 200);

    let second = login(&client, w2, "ann", Some(&first)).await;
    assert_ne!(second, first, "login gives a new id");
    let (status, cart) = get_json(&client, w1, "/cart", &second).await;
    assert_eq!(
        (status, item_names(&cart)),
        (200, vec!["apple".to_string()]),
        "data kept"
    );
    // Within the grace, the old id still works (a request of the same user already in flight).
    let (status, me) = get_json(&client, w1, "/me", &first).await;
    assert_eq!((status, me["user"].as_str()), (200, Some("ann")));
    // …and a change made through it lands in the new session, not lost, without handing the
    // new id to whoever holds the old one.
    let response = client
        .post(w2.url("/cart/items"))
        .header("cookie", cookie(&first))
        .json(&json!({ "item": "pear" }))
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), 200);
    assert_eq!(
        set_session_cookie(&response),
        None,
        "no cookie for an alias"
    );
    let (_, cart) = get_json(&client, w1, "/cart", &second).await;
    assert_eq!(item_names(&cart), vec!["apple", "pear"]);

    // After the grace the old id is dead: it gets a fresh, empty session.
    // (measured from the regeneration, which came before the checks above)
    tokio::time::sleep(Duration::from_millis(2_300)).await;
    let (status, body) = get_json(&client, w2, "/me", &first).await;
    assert_eq!(
        (status, body["error"].as_str()),
        (401, Some("not_logged_in"))
    );
    let mut con = setup.redis.connection().await;
    let exists: bool = con
        .exists(Keys::new(&setup.prefix).session(&first))
        .await
        .unwrap();
    assert!(!exists);
    let (status, _) = get_json(&client, w2, "/me", &second).await;
    assert_eq!(status, 200, "the new id lives on");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn unknown_expired_or_garbage_cookies_get_a_fresh_session_never_the_chosen_id() {
    let setup = setup(1, &[]);
    let worker = &setup.workers[0];
    let client = plain_client();
    let chosen = "ab".repeat(24); // well-formed, but never issued
    for value in ["garbage", "", "../../x", &"z".repeat(4_000), &chosen] {
        let response = client
            .get(worker.url("/me"))
            .header("cookie", cookie(value))
            .send()
            .await
            .unwrap();
        assert_eq!(response.status(), 401, "cookie {value:.20}");
        let body: Value = response.json().await.unwrap();
        assert_eq!(body["error"], "not_logged_in");
    }
    // Logging in with a client-chosen id never stores a session under it.
    let id = login(&client, worker, "ann", Some(&chosen)).await;
    assert_ne!(id, chosen);
    assert_eq!(id.len(), 48, "192-bit hex id");
    let mut con = setup.redis.connection().await;
    let keys: Vec<String> = con
        .keys(format!("{}session:*", setup.prefix))
        .await
        .unwrap();
    assert_eq!(keys, vec![Keys::new(&setup.prefix).session(&id)]);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_cookie_is_http_only_lax_and_secure_behind_https() {
    let setup = setup(1, &[]);
    let worker = &setup.workers[0];
    let client = plain_client();
    let response = client
        .post(worker.url("/login"))
        .header("x-forwarded-proto", "https")
        .json(&json!({"user": "ann"}))
        .send()
        .await
        .unwrap();
    let header = set_cookie_header(&response).expect("cookie");
    for attribute in ["HttpOnly", "SameSite=Lax", "Path=/", "Secure"] {
        assert!(header.contains(attribute), "{header}");
    }
    let response = client
        .post(worker.url("/login"))
        .json(&json!({"user": "ann"}))
        .send()
        .await
        .unwrap();
    let header = set_cookie_header(&response).expect("cookie");
    assert!(!header.contains("Secure"), "plain http: {header}");
}

/// Through a gateway with TLS on: the worker learns the scheme from the gateway's
/// `X-Forwarded-Proto` and marks the cookie `Secure` over https only.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_cookie_is_secure_when_the_client_came_over_tls_to_the_gateway() {
    let setup = setup(1, &[]);
    let dir = temp_dir();
    let (cert, key) = (dir.path().join("cert.pem"), dir.path().join("key.pem"));
    let made = std::process::Command::new("openssl")
        .args([
            "req",
            "-x509",
            "-newkey",
            "ec",
            "-pkeyopt",
            "ec_paramgen_curve:prime256v1",
        ])
        .args(["-nodes", "-days", "2", "-subj", "/CN=shop.test", "-keyout"])
        .arg(&key)
        .arg("-out")
        .arg(&cert)
        .output()
        .unwrap();
    assert!(made.status.success(), "{made:?}");
    let options = GatewayOptions {
        workers: vec![setup.workers[0].addr],
        ..GatewayOptions::default()
    }
    .env("HERD_GATEWAY_TLS__ENABLED", "true")
    .env("HERD_GATEWAY_TLS__LISTEN", "127.0.0.1:0")
    .env("HERD_GATEWAY_TLS__CERT", cert.display().to_string())
    .env("HERD_GATEWAY_TLS__KEY", key.display().to_string());
    let gateway = TestGateway::start(&options, dir.path());
    let tls = gateway.tls.expect("TLS listener");
    let login = |url: String| {
        let output = std::process::Command::new("curl")
            .args(["-sk", "-i", "--max-time", "5", "-X", "POST"])
            .args([
                "-H",
                "content-type: application/json",
                "-d",
                r#"{"user":"ann"}"#,
            ])
            .arg(url)
            .output()
            .unwrap();
        String::from_utf8_lossy(&output.stdout).to_string()
    };
    // The gateway answers once its health check found the worker.
    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    let over_tls = loop {
        let answer = login(format!("https://{tls}/login"));
        if answer.to_ascii_lowercase().contains("set-cookie") {
            break answer;
        }
        assert!(std::time::Instant::now() < deadline, "{answer}");
        tokio::time::sleep(Duration::from_millis(100)).await;
    };
    let cookie_line = |answer: &str| {
        answer
            .lines()
            .find(|l| l.to_ascii_lowercase().starts_with("set-cookie"))
            .unwrap_or_default()
            .to_string()
    };
    assert!(cookie_line(&over_tls).contains("; Secure"), "{over_tls}");
    let plain = login(gateway.url("/login"));
    let line = cookie_line(&plain);
    assert!(!line.is_empty() && !line.contains("Secure"), "{plain}");
}

/// Calls of `command` Redis has counted (`INFO commandstats`).
async fn calls(con: &mut redis::aio::MultiplexedConnection, command: &str) -> u64 {
    let info: String = redis::cmd("INFO")
        .arg("commandstats")
        .query_async(con)
        .await
        .unwrap();
    info.lines()
        .find_map(|line| line.strip_prefix(&format!("cmdstat_{command}:calls=")))
        .and_then(|rest| rest.split(',').next()?.parse().ok())
        .unwrap_or(0)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_live_session_is_read_without_the_script_until_its_touch_is_due() {
    let setup = setup(1, &[("HERD_WORKER_SESSION__TOUCH_INTERVAL", "1s")]);
    let worker = &setup.workers[0];
    let client = plain_client();
    let id = login(&client, worker, "ann", None).await;
    let mut con = setup.redis.connection().await;
    let key = Keys::new(&setup.prefix).session(&id);
    let seen: String = con.hget(&key, "seen").await.unwrap();

    // Reads within the touch interval: TIME and HMGET, no script, nothing written.
    let (scripts, reads) = (
        calls(&mut con, "evalsha").await,
        calls(&mut con, "hmget").await,
    );
    for _ in 0..5 {
        let (status, body) = get_json(&client, worker, "/me", &id).await;
        assert_eq!((status, body["user"].as_str()), (200, Some("ann")));
    }
    assert_eq!(
        calls(&mut con, "evalsha").await,
        scripts,
        "no script for a live session"
    );
    assert_eq!(calls(&mut con, "hmget").await, reads + 5);
    let after: String = con.hget(&key, "seen").await.unwrap();
    assert_eq!(after, seen, "a read before the touch is due writes nothing");

    // Once the touch is due, the read goes through the script, which refreshes `seen`.
    tokio::time::sleep(Duration::from_millis(1_100)).await;
    assert_eq!(get_json(&client, worker, "/me", &id).await.0, 200);
    // (Twice when it is the script's first use on this Redis: `NOSCRIPT`, then loaded and sent
    // again.)
    assert!(
        calls(&mut con, "evalsha").await > scripts,
        "the touch ran the script"
    );
    let touched: String = con.hget(&key, "seen").await.unwrap();
    assert!(touched.parse::<u64>().unwrap() > seen.parse::<u64>().unwrap());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn idle_and_absolute_timeouts_end_sessions() {
    let setup = setup(
        1,
        &[
            ("HERD_WORKER_SESSION__IDLE_TIMEOUT", "1500ms"),
            ("HERD_WORKER_SESSION__TOUCH_INTERVAL", "200ms"),
            ("HERD_WORKER_SESSION__ABSOLUTE_TIMEOUT", "3s"),
        ],
    );
    let worker = &setup.workers[0];
    let client = plain_client();

    // Idle: untouched for longer than the idle timeout → gone.
    let idle = login(&client, worker, "ann", None).await;
    // Sliding: reads every 400 ms keep the other session alive past its idle timeout…
    let busy = login(&client, worker, "bob", None).await;
    let started = Instant::now();
    while started.elapsed() < Duration::from_millis(2_400) {
        assert_eq!(
            get_json(&client, worker, "/me", &busy).await.0,
            200,
            "at {:?}",
            started.elapsed()
        );
        tokio::time::sleep(Duration::from_millis(400)).await;
    }
    assert_eq!(
        get_json(&client, worker, "/me", &idle).await.0,
        401,
        "idle session expired"
    );
    // …but not past the absolute timeout.
    while started.elapsed() < Duration::from_millis(3_300) {
        tokio::time::sleep(Duration::from_millis(400)).await;
        let _ = get_json(&client, worker, "/me", &busy).await;
    }
    assert_eq!(
        get_json(&client, worker, "/me", &busy).await.0,
        401,
        "absolute timeout"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_change_over_the_size_limit_is_a_413_and_leaves_the_session_untouched() {
    let setup = setup(1, &[("HERD_WORKER_SESSION__MAX_BYTES", "600")]);
    let worker = &setup.workers[0];
    let client = plain_client();
    let id = login(&client, worker, "ann", None).await;
    let key = Keys::new(&setup.prefix).session(&id);
    let mut con = setup.redis.connection().await;
    let mut added = Vec::new();
    let (status, body) = loop {
        assert!(added.len() < 100, "the limit must bite before 100 items");
        let item = format!("a-rather-long-item-name-{:03}", added.len());
        let before: HashMap<String, String> = con.hgetall(&key).await.unwrap();
        let (status, body) = add_item(&client, worker, &id, &item).await;
        if status != 200 {
            let after: HashMap<String, String> = con.hgetall(&key).await.unwrap();
            assert_eq!(after["v"], before["v"], "version untouched");
            assert_eq!(after["data"], before["data"], "data untouched");
            break (status, body);
        }
        added.push(item);
    };
    assert_eq!(status, 413);
    assert_eq!(body["error"], "session_too_large");
    assert!(!added.is_empty());
    let (status, cart) = get_json(&client, worker, "/cart", &id).await;
    assert_eq!(status, 200, "the session still works");
    assert_eq!(item_names(&cart), added);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn logout_is_not_undone_by_concurrent_saves() {
    let setup = setup(2, &[]);
    let client = plain_client();
    for round in 0..5 {
        let id = login(&client, &setup.workers[0], "ann", None).await;
        let mut tasks = Vec::new();
        for n in 0..20 {
            let client = client.clone();
            let url = setup.workers[n % 2].url("/cart/items");
            let id = id.clone();
            tasks.push(tokio::spawn(async move {
                client
                    .post(url)
                    .header("cookie", cookie(&id))
                    .json(&json!({ "item": format!("i{n}") }))
                    .send()
                    .await
                    .unwrap()
                    .status()
                    .as_u16()
            }));
        }
        tokio::time::sleep(Duration::from_millis(5)).await;
        let response = client
            .post(setup.workers[1].url("/logout"))
            .header("cookie", cookie(&id))
            .send()
            .await
            .unwrap();
        assert_eq!(response.status(), 200);
        assert_eq!(
            set_session_cookie(&response).as_deref(),
            Some(""),
            "cookie cleared"
        );
        for task in tasks {
            let status = task.await.unwrap();
            // Before the logout: 200; after it: 401 (no session) or 409 (ended meanwhile).
            assert!(matches!(status, 200 | 401 | 409), "round {round}: {status}");
        }
        let mut con = setup.redis.connection().await;
        let exists: bool = con
            .exists(Keys::new(&setup.prefix).session(&id))
            .await
            .unwrap();
        assert!(
            !exists,
            "round {round}: a save after the logout resurrected the session"
        );
        assert_eq!(
            get_json(&client, &setup.workers[0], "/me", &id).await.0,
            401
        );
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn logout_everywhere_ends_every_session_of_the_user() {
    let setup = setup(2, &[]);
    let client = plain_client();
    let phone = login(&client, &setup.workers[0], "ann", None).await;
    let laptop = login(&client, &setup.workers[1], "ann", None).await;
    let other = login(&client, &setup.workers[1], "bob", None).await;
    let mut con = setup.redis.connection().await;
    let index = Keys::new(&setup.prefix).user_sessions("ann");
    let members: BTreeSet<String> = con.zrange(&index, 0, -1).await.unwrap();
    assert_eq!(members, BTreeSet::from([phone.clone(), laptop.clone()]));

    let response = client
        .post(setup.workers[0].url("/logout-everywhere"))
        .header("cookie", cookie(&laptop))
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), 200);
    for id in [&phone, &laptop] {
        assert_eq!(get_json(&client, &setup.workers[1], "/me", id).await.0, 401);
    }
    assert_eq!(
        get_json(&client, &setup.workers[1], "/me", &other).await.0,
        200,
        "bob unaffected"
    );
    let exists: bool = con.exists(&index).await.unwrap();
    assert!(!exists, "index removed");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn reads_refresh_the_idle_ttl_at_most_once_per_touch_interval() {
    let setup = setup(
        1,
        &[
            ("HERD_WORKER_SESSION__IDLE_TIMEOUT", "2h"),
            ("HERD_WORKER_SESSION__TOUCH_INTERVAL", "1h"),
        ],
    );
    let worker = &setup.workers[0];
    let client = plain_client();
    let id = login(&client, worker, "ann", None).await;
    let key = Keys::new(&setup.prefix).session(&id);
    let mut con = setup.redis.connection().await;
    let seen: String = con.hget(&key, "seen").await.unwrap();
    let ttl_before: i64 = con.pttl(&key).await.unwrap();
    assert!(
        ttl_before > 7_000_000 && ttl_before <= 7_200_000,
        "idle TTL set: {ttl_before}"
    );
    tokio::time::sleep(Duration::from_millis(50)).await;
    for _ in 0..5 {
        assert_eq!(get_json(&client, worker, "/me", &id).await.0, 200);
    }
    let seen_after: String = con.hget(&key, "seen").await.unwrap();
    let ttl_after: i64 = con.pttl(&key).await.unwrap();
    assert_eq!(
        seen_after, seen,
        "reads within the touch interval write nothing"
    );
    assert!(
        ttl_after < ttl_before,
        "TTL not refreshed: {ttl_before} -> {ttl_after}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_login_through_the_old_id_during_its_grace_never_gets_a_new_id() {
    let setup = setup(2, &[("HERD_WORKER_SESSION__REGENERATE_GRACE", "10s")]);
    let (w1, w2) = (&setup.workers[0], &setup.workers[1]);
    let client = plain_client();
    // Whoever planted or kept the pre-login id…
    let planted = login(&client, w1, "ann", None).await;
    assert_eq!(add_item(&client, w1, &planted, "apple").await.0, 200);
    // …sees the user log in: the session moves to a new id, the old one is an alias for a while.
    let current = login(&client, w2, "ann", Some(&planted)).await;
    assert_ne!(current, planted);

    // A login through the alias must not mint an id for the session it points to.
    let response = client
        .post(w1.url("/login"))
        .header("cookie", cookie(&planted))
        .json(&json!({ "user": "mallory" }))
        .send()
        .await
        .unwrap();
    let status = response.status().as_u16();
    let set = set_session_cookie(&response);
    let body: Value = response.json().await.unwrap_or(Value::Null);
    assert_eq!(
        (status, body["error"].as_str(), set),
        (409, Some("session_ended"), None),
        "{body}"
    );
    // The user's session stays where it is, untouched.
    let mut con = setup.redis.connection().await;
    let fields: HashMap<String, String> = con
        .hgetall(Keys::new(&setup.prefix).session(&current))
        .await
        .unwrap();
    assert!(!fields.contains_key("moved_to"), "{fields:?}");
    let (status, me) = get_json(&client, w2, "/me", &current).await;
    assert_eq!((status, me["user"].as_str()), (200, Some("ann")));
    let (_, cart) = get_json(&client, w2, "/cart", &current).await;
    assert_eq!(item_names(&cart), vec!["apple"]);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn logging_in_as_another_user_does_not_inherit_the_previous_users_data() {
    let setup = setup(1, &[]);
    let worker = &setup.workers[0];
    let client = plain_client();
    let bob = login(&client, worker, "bob", None).await;
    assert_eq!(add_item(&client, worker, &bob, "beer").await.0, 200);
    // Same browser, no logout, ann logs in: she gets a session of her own, not bob's cart.
    let ann = login(&client, worker, "ann", Some(&bob)).await;
    let (status, cart) = get_json(&client, worker, "/cart", &ann).await;
    assert_eq!((status, item_names(&cart)), (200, Vec::<String>::new()));
    // Logging in again as the same user keeps the data.
    assert_eq!(add_item(&client, worker, &ann, "tea").await.0, 200);
    let again = login(&client, worker, "ann", Some(&ann)).await;
    let (_, cart) = get_json(&client, worker, "/cart", &again).await;
    assert_eq!(item_names(&cart), vec!["tea"]);
}

/// Sessions written by the release before the hash-tag layout (`{prefix}session:{id}`, user
/// index a plain set) are read, moved to the new key, and still end with "log out everywhere":
/// an upgrade loses no session.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sessions_of_the_old_key_layout_survive_the_upgrade() {
    let setup = setup(1, &[]);
    let worker = &setup.workers[0];
    let client = plain_client();
    let keys = Keys::new(&setup.prefix);
    let mut con = setup.redis.connection().await;
    // Written as the old SAVE script wrote them.
    let now_ms: u64 = 1_000
        * std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .unwrap()
            .as_secs();
    let old = |n: u8| format!("{:02x}", n).repeat(24);
    for (n, user) in [(1u8, "ann"), (2, "ann"), (3, "")] {
        let key = keys.legacy_session(&old(n));
        let name = if user.is_empty() { "guest" } else { user };
        let data = json!({
            "user": name,
            "cart": { "items": [{ "item": format!("old-{n}"), "qty": 1 }] },
        });
        let mut fields = vec![
            ("v", "3".to_string()),
            ("data", data.to_string()),
            ("created", now_ms.to_string()),
            ("deadline", (now_ms + 3_600_000).to_string()),
            ("seen", now_ms.to_string()),
        ];
        if !user.is_empty() {
            fields.push(("user", user.to_string()));
            let _: i64 = con
                .sadd(keys.legacy_user_sessions(user), old(n))
                .await
                .unwrap();
        }
        let _: () = con.hset_multiple(&key, &fields).await.unwrap();
        let _: bool = con.pexpire(&key, 3_600_000).await.unwrap();
    }
    // An old-layout alias left by a login just before the upgrade points at session 1.
    let alias = "0a".repeat(24);
    let _: () = con
        .hset(keys.legacy_session(&alias), "moved_to", old(1))
        .await
        .unwrap();

    // Read with the new layout: every session is there, through the alias too.
    for n in [1u8, 2, 3] {
        let (status, cart) = get_json(&client, worker, "/cart", &old(n)).await;
        assert_eq!(status, 200, "session {n}: {cart}");
        assert_eq!(item_names(&cart), vec![format!("old-{n}")]);
    }
    let (_, cart) = get_json(&client, worker, "/cart", &alias).await;
    assert_eq!(item_names(&cart), vec!["old-1"], "old alias followed");
    // Moved to the new keys, TTL kept; a write lands there.
    let moved: bool = con.exists(keys.session(&old(1))).await.unwrap();
    let left: bool = con.exists(keys.legacy_session(&old(1))).await.unwrap();
    assert!(moved && !left);
    let ttl: i64 = con.pttl(keys.session(&old(1))).await.unwrap();
    assert!(ttl > 0, "TTL kept: {ttl}");
    let (status, _) = add_item(&client, worker, &old(3), "new").await;
    assert_eq!(status, 200);
    let (_, cart) = get_json(&client, worker, "/cart", &old(3)).await;
    assert_eq!(item_names(&cart), vec!["old-3", "new"]);

    // "Log out everywhere" still finds ann's old sessions through the old index.
    let response = client
        .post(worker.url("/logout-everywhere"))
        .header("cookie", cookie(&old(2)))
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), 200);
    for n in [1u8, 2] {
        assert_eq!(get_json(&client, worker, "/me", &old(n)).await.0, 401);
    }
    let index: bool = con.exists(keys.legacy_user_sessions("ann")).await.unwrap();
    assert!(!index, "old index removed");
    assert_eq!(get_json(&client, worker, "/cart", &old(3)).await.0, 200);
}

/// Redis's `CLIENT LIST`: a line per connection, with the last command each ran (`cmd=`).
async fn client_list(redis: &mut redis::aio::MultiplexedConnection) -> String {
    redis::cmd("CLIENT")
        .arg("LIST")
        .query_async(redis)
        .await
        .unwrap()
}

/// Session reads and writes pipelined on a shared connection (the default) and each on a
/// pooled connection (`session.pipelined = false`) serve the same sessions, many at once; only
/// the pipelined way keeps to one connection per serving thread.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn session_reads_and_writes_are_the_same_pipelined_or_each_on_its_own_connection() {
    const READS: usize = 200;
    /// Cart additions per session, all at once (a save that loses a race to another is
    /// retried, up to `session.max_retries`).
    const WRITES: usize = 4;
    for pipelined in ["true", "false"] {
        let setup = setup(
            1,
            &[
                ("HERD_WORKER_SESSION__PIPELINED", pipelined),
                ("HERD_WORKER_THREADS", "1"),
            ],
        );
        let client = plain_client();
        let worker = &setup.workers[0];
        let mut sessions = Vec::new();
        for n in 0..8 {
            let user = format!("u{n}");
            let id = login(&client, worker, &user, None).await;
            sessions.push((user, id));
        }
        let mut tasks = Vec::new();
        for n in 0..READS {
            let (user, id) = sessions[n % sessions.len()].clone();
            let (client, url) = (client.clone(), worker.url("/me"));
            tasks.push(tokio::spawn(async move {
                let response = client
                    .get(url)
                    .header("cookie", cookie(&id))
                    .send()
                    .await
                    .unwrap();
                let status = response.status().as_u16();
                (user, status, response.json::<Value>().await.unwrap())
            }));
        }
        for task in tasks {
            let (user, status, body) = task.await.unwrap();
            assert_eq!(status, 200, "pipelined={pipelined}: {body}");
            assert_eq!(body, json!({ "user": user }), "pipelined={pipelined}");
        }
        // The worker's connections whose last command was a session read's HMGET: its one
        // line (one serving thread) when pipelined, the several pooled connections the reads
        // in flight took when not.
        let mut redis = setup.redis.connection().await;
        let connections = |clients: &str, command: &str| {
            clients
                .lines()
                .filter(|l| l.contains(&format!(" cmd={command} ")))
                .count()
        };
        let clients = client_list(&mut redis).await;
        let reading = connections(&clients, "hmget");
        if pipelined == "true" {
            assert_eq!(reading, 1, "{clients}");
        } else {
            assert!(reading > 1, "{clients}");
        }

        // Writes (the save script), all at once: every one acknowledged is in its own
        // session's cart, and no other.
        let mut tasks = Vec::new();
        for n in 0..sessions.len() * WRITES {
            let (user, id) = sessions[n % sessions.len()].clone();
            let (client, url) = (client.clone(), worker.url("/cart/items"));
            tasks.push(tokio::spawn(async move {
                let response = client
                    .post(url)
                    .header("cookie", cookie(&id))
                    .json(&json!({ "item": user, "qty": 1 }))
                    .send()
                    .await
                    .unwrap();
                response.status().as_u16()
            }));
        }
        for task in tasks {
            assert_eq!(task.await.unwrap(), 200, "pipelined={pipelined}");
        }
        for (user, id) in &sessions {
            let (status, cart) = get_json(&client, worker, "/cart", id).await;
            assert_eq!(status, 200);
            assert_eq!(
                cart,
                json!({ "items": [{ "item": user, "qty": WRITES }] }),
                "pipelined={pipelined}"
            );
        }
        let clients = client_list(&mut redis).await;
        // The last session command on each of the worker's connections: the cart reads' HMGET,
        // or a save's EVALSHA; all on the one line when pipelined.
        let used = connections(&clients, "hmget") + connections(&clients, "evalsha");
        if pipelined == "true" {
            assert_eq!(used, 1, "{clients}");
        } else {
            assert!(used > 1, "{clients}");
        }
    }
}
