//! Hedging (issue 14, item 3), in-process against small upstreams: a worker that hangs costs an
//! idempotent request the hedge delay, not `timeouts.response_header`; POSTs are never hedged;
//! hedges spend the retry budget.

mod support;

use std::sync::atomic::Ordering;
use std::time::{Duration, Instant};

use bytes::Bytes;
use support::{Gateway, Upstream, client, get, send};

const DELAY: Duration = Duration::from_millis(100);

async fn hedge_count(gw: &Gateway) -> u64 {
    let text = get(&client(), &gw.admin_url("/metrics")).await;
    String::from_utf8(text.body.to_vec())
        .unwrap()
        .lines()
        .find(|l| l.starts_with("herd_gateway_retries_total{reason=\"hedge\"}"))
        .and_then(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
        .map_or(0, |v| v as u64)
}

/// A gateway over `workers` where only hedging stands between users and a hung worker:
/// neither checks nor passive ejection take it out during a test, round robin reaches it, and
/// the retry budget allows the hedges; `hedging` sets the hedge delay (fixed or learnt).
async fn gateway_hedging_only(
    workers: &[&Upstream],
    hedging: impl FnOnce(&mut herd_gateway::config::HedgingConfig),
) -> Gateway {
    Gateway::start(workers, |c| {
        hedging(&mut c.hedging);
        c.timeouts.response_header = Duration::from_secs(5);
        c.health.interval = Duration::from_secs(60);
        c.health.passive.enabled = false;
        c.balancing.slow_start = Duration::ZERO;
        c.balancing.algorithm = herd_gateway::config::Algorithm::RoundRobin;
        c.retry.budget_min_per_sec = 1000;
    })
    .await
}

/// Sends `count` GETs one by one; each must succeed (and `check` its answer); the slowest wait.
async fn slowest_of(gw: &Gateway, count: usize, check: impl Fn(&support::Answer)) -> Duration {
    let c = client();
    let mut slowest = Duration::ZERO;
    for i in 0..count {
        let sent = Instant::now();
        let answer = get(&c, &gw.url("/")).await;
        slowest = slowest.max(sent.elapsed());
        assert_eq!(answer.status, 200, "GET {i}");
        check(&answer);
    }
    slowest
}

#[tokio::test]
async fn a_hung_worker_costs_a_get_the_hedge_delay_only() {
    let workers = [
        Upstream::start("w1").await,
        Upstream::start("w2").await,
        Upstream::start("w3").await,
    ];
    let gw = gateway_hedging_only(&[&workers[0], &workers[1], &workers[2]], |h| {
        h.delay = DELAY;
    })
    .await;
    slowest_of(&gw, 6, |_| {}).await;
    workers[1].behavior.hang.store(true, Ordering::SeqCst);
    let slowest = slowest_of(&gw, 30, |answer| assert_ne!(answer.worker(), "w2")).await;
    println!("slowest GET with a hung worker: {slowest:?}");
    assert!(slowest < DELAY + Duration::from_millis(400), "{slowest:?}");
    let hedges = hedge_count(&gw).await;
    assert!(
        hedges >= 5,
        "about a third of 30 met the hung worker: {hedges}"
    );

    // A POST is never sent twice: it waits for its worker (or its timeout).
    let before = workers[0].hits() + workers[2].hits();
    let posts: Vec<_> = (0..3)
        .map(|_| {
            let url = gw.url("/");
            tokio::spawn(async move {
                let c = client();
                tokio::time::timeout(
                    Duration::from_millis(700),
                    send(&c, "POST", &url, &[], Bytes::from_static(b"{}")),
                )
                .await
                .is_ok()
            })
        })
        .collect();
    let mut answered = 0;
    for post in posts {
        answered += post.await.unwrap() as u64;
    }
    assert_eq!(hedge_count(&gw).await, hedges, "no POST hedged");
    assert_eq!(
        workers[0].hits() + workers[2].hits() - before,
        answered,
        "each answered POST reached exactly one worker"
    );
    workers[1].behavior.hang.store(false, Ordering::SeqCst);
    gw.shutdown().await;
}

#[tokio::test]
async fn hedging_off_waits_for_the_worker() {
    let workers = [Upstream::start("w1").await, Upstream::start("w2").await];
    let gw = Gateway::start(&[&workers[0], &workers[1]], |c| {
        c.hedging.enabled = false;
        c.timeouts.response_header = Duration::from_millis(600);
        c.health.interval = Duration::from_secs(60);
        c.health.passive.enabled = false;
        c.balancing.slow_start = Duration::ZERO;
        c.balancing.algorithm = herd_gateway::config::Algorithm::RoundRobin;
    })
    .await;
    workers[0].behavior.hang.store(true, Ordering::SeqCst);
    let c = client();
    let mut slowest = Duration::ZERO;
    for _ in 0..4 {
        let sent = Instant::now();
        assert_eq!(get(&c, &gw.url("/")).await.status, 200);
        slowest = slowest.max(sent.elapsed());
    }
    // The hung worker's requests waited out response_header, then were retried.
    assert!(slowest >= Duration::from_millis(600), "{slowest:?}");
    assert_eq!(hedge_count(&gw).await, 0);
    workers[0].behavior.hang.store(false, Ordering::SeqCst);
    gw.shutdown().await;
}

#[tokio::test]
async fn a_fresh_gateway_learns_its_hedge_delay_from_its_first_answers() {
    let workers = [Upstream::start("w1").await, Upstream::start("w2").await];
    // The learnt delay (the default): `max_delay` until measured.
    let gw = gateway_hedging_only(&[&workers[0], &workers[1]], |_| {}).await;
    // A standby that just took over, or a gateway just started: 64 quick answers, well within
    // the first second.
    slowest_of(&gw, 64, |_| {}).await;
    workers[1].behavior.hang.store(true, Ordering::SeqCst);
    let slowest = slowest_of(&gw, 6, |_| {}).await;
    println!("slowest GET with a hung worker, 64 answers in: {slowest:?}");
    // `max_delay` (1 s) when the first window waited for its second and 256 answers: at least
    // 1 s then, so 900 ms leaves a busy box room and still tells the two apart.
    assert!(slowest < Duration::from_millis(900), "{slowest:?}");
    assert!(hedge_count(&gw).await >= 1);
    workers[1].behavior.hang.store(false, Ordering::SeqCst);
    gw.shutdown().await;
}

/// A worker that holds some requests past the hedge delay while it goes on answering others is
/// busy, not hung: the races those requests lose to another worker do not eject it (counted,
/// they ejected the workers of a saturated pool one after another). A worker that answers
/// nothing at all is still ejected by them.
#[tokio::test]
async fn lost_hedge_races_eject_a_hung_worker_not_a_busy_one() {
    let workers = [Upstream::start("w1").await, Upstream::start("w2").await];
    // The hedge delay leaves w1 300 ms to answer the quick GET of each round (a busy machine
    // must not make it look hung); its slow requests wait far longer.
    workers[0].behavior.slow_ms.store(1500, Ordering::SeqCst);
    let gw = Gateway::start(&[&workers[0], &workers[1]], |c| {
        c.hedging.delay = Duration::from_millis(300);
        c.timeouts.response_header = Duration::from_secs(5);
        c.health.interval = Duration::from_secs(60);
        c.health.passive.consecutive_failures = 2;
        c.balancing.slow_start = Duration::ZERO;
        c.balancing.algorithm = herd_gateway::config::Algorithm::RoundRobin;
        c.retry.budget_min_per_sec = 1000;
    })
    .await;
    let id = workers[0].addr.to_string();
    let c = client();
    for round in 0..4 {
        // Three of six go to w1 and wait there; w1 answers a quick GET meanwhile; at the hedge
        // delay w2 answers the three: three lost races in a row, each after w1's answer.
        let slow: Vec<_> = (0..6)
            .map(|_| {
                let (c, url) = (c.clone(), gw.url("/slow"));
                tokio::spawn(async move { get(&c, &url).await })
            })
            .collect();
        tokio::time::sleep(Duration::from_millis(15)).await;
        for _ in 0..2 {
            assert_eq!(get(&c, &gw.url("/")).await.status, 200, "round {round}");
        }
        for answer in slow {
            assert_eq!(answer.await.unwrap().status, 200, "round {round}");
        }
    }
    assert_eq!(
        support::worker_field(&gw, &id, "ejections").await,
        0,
        "busy, not hung"
    );
    assert!(
        hedge_count(&gw).await >= 8,
        "w1's slow requests were hedged"
    );

    workers[0].behavior.hang.store(true, Ordering::SeqCst);
    for _ in 0..8 {
        let answer = get(&c, &gw.url("/")).await;
        assert_eq!((answer.status, answer.worker()), (200, "w2".into()));
    }
    assert_eq!(
        support::worker_field(&gw, &id, "ejections").await,
        1,
        "hung: two lost races in a row"
    );
    workers[0].behavior.hang.store(false, Ordering::SeqCst);
    gw.shutdown().await;
}
