//! Watching the lab from its `client` host: is the pair serving, what did users see while a fault
//! was injected, and did every session survive.

use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use serde::Serialize;
use serde_json::Value;

use super::{ADMIN_PORT, GATEWAYS, Lab};
use crate::probe::{self, FaultSummary, ProbeSpec};

/// The header that names the gateway that answered (herd sets it; the HAProxy config too).
pub const SERVED_BY: &str = "x-herd-gateway";

/// What users saw while a fault was injected.
#[derive(Debug, Clone, Serialize)]
pub struct FaultRun {
    /// The prober's figures around the fault.
    pub summary: FaultSummary,
    /// The most gateway hosts seen holding the floating address at one moment.
    pub max_holders: usize,
    /// How often the client's ARP entry for the floating address changed to another MAC (a
    /// takeover moves it once; more means announcements pulled clients back and forth).
    pub arp_moves: usize,
}

fn client() -> reqwest::Client {
    reqwest::Client::builder()
        .no_proxy()
        .pool_max_idle_per_host(0)
        .timeout(Duration::from_secs(2))
        .build()
        .expect("client builds")
}

fn unix_now() -> f64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_secs_f64())
        .unwrap_or(0.0)
}

impl Lab {
    /// Waits (up to `timeout`) until a request through the floating address is answered by a
    /// worker via gateway `by`. Returns whether it happened.
    pub fn wait_serving(&self, by: &'static str, timeout: Duration) -> bool {
        let target = self.public_addr();
        self.topology()
            .run_in("client", move || async move {
                let client = client();
                let deadline = Instant::now() + timeout;
                while Instant::now() < deadline {
                    if let Ok(response) = client
                        .get(format!("http://{target}/work?ms=0"))
                        .send()
                        .await
                    {
                        let gateway = response
                            .headers()
                            .get(SERVED_BY)
                            .and_then(|v| v.to_str().ok())
                            .unwrap_or_default()
                            .to_string();
                        if response.status() == 200 && gateway == by {
                            return true;
                        }
                    }
                    tokio::time::sleep(Duration::from_millis(50)).await;
                }
                false
            })
            .unwrap_or(false)
    }

    /// Logs `count` users in through the floating address, each adding `item-{n}` to the cart;
    /// returns their session cookies (`name=value`).
    pub fn log_users_in(&self, count: usize) -> Result<Vec<String>, String> {
        let target = self.public_addr();
        self.topology()
            .run_in("client", move || async move {
                let client = client();
                let mut cookies = Vec::new();
                for n in 0..count {
                    let (user, item) = (format!("user-{n}"), format!("item-{n}"));
                    let cookie =
                        crate::demo_user::log_in_with_item(&client, target, &user, &item).await?;
                    cookies.push(cookie);
                }
                Ok(cookies)
            })
            .map_err(|e| e.to_string())?
    }

    /// Checks every session of [`log_users_in`](Self::log_users_in); returns how many lost
    /// their cart.
    pub fn sessions_lost(&self, cookies: &[String]) -> usize {
        let target = self.public_addr();
        let total = cookies.len();
        let cookies = cookies.to_vec();
        self.topology()
            .run_in("client", move || async move {
                let client = client();
                let mut lost = 0;
                for (n, cookie) in cookies.iter().enumerate() {
                    let cart: Option<Value> = async {
                        let response = client
                            .get(format!("http://{target}/cart"))
                            .header("cookie", cookie)
                            .send()
                            .await
                            .ok()?;
                        response.json().await.ok()
                    }
                    .await;
                    let expected = format!("item-{n}");
                    let intact = cart.is_some_and(|cart| {
                        cart["items"].as_array().is_some_and(|items| {
                            items.iter().any(|item| item["item"] == expected.as_str())
                        })
                    });
                    if !intact {
                        lost += 1;
                    }
                }
                lost
            })
            // The client host couldn't be entered: nothing could be checked, count all as lost.
            .unwrap_or(total)
    }

    /// Gateway `index`'s failover status from its admin API (`GET /api/failover`).
    pub fn failover_status(&self, index: usize) -> Option<Value> {
        self.topology()
            .run_in(GATEWAYS[index], || async {
                let response = client()
                    .get(format!("http://127.0.0.1:{ADMIN_PORT}/api/failover"))
                    .bearer_auth(super::ADMIN_TOKEN)
                    .send()
                    .await
                    .ok()?;
                response.json::<Value>().await.ok()
            })
            .ok()
            .flatten()
    }

    /// Role changes of gateway `index` since it started (0 when it can't be asked).
    pub fn transitions(&self, index: usize) -> u64 {
        self.failover_status(index)
            .and_then(|status| status["transitions"].as_u64())
            .unwrap_or(0)
    }

    /// Probes the floating address (a new connection every 10 ms, 1 s deadline each) for
    /// `duration`, injects `fault` after `fault_after`, and samples the address holders and the
    /// client's ARP entry for the address every 20 ms meanwhile.
    pub fn probe_through(
        &self,
        duration: Duration,
        fault_after: Duration,
        fault: impl FnOnce(&Lab),
    ) -> FaultRun {
        let spec = ProbeSpec {
            target: self.public_addr(),
            path: "/work?ms=0".into(),
            interval: Duration::from_millis(10),
            duration,
            timeout: Duration::from_secs(1),
            served_by_header: SERVED_BY.into(),
        };
        let done = AtomicBool::new(false);
        let (samples, sampled, fault_at) = std::thread::scope(|scope| {
            let prober = scope.spawn(|| {
                let samples = self
                    .topology()
                    .run_in("client", move || async move { probe::run(&spec).await })
                    .unwrap_or_default();
                done.store(true, Ordering::SeqCst);
                samples
            });
            let sampler = scope.spawn(|| {
                let mut max = 0;
                let mut moves = 0;
                let mut mac = None;
                while !done.load(Ordering::SeqCst) {
                    max = max.max(self.address_holders().len());
                    if let Ok(Some(now)) = self.topology().neighbour("client", self.floating_ip()) {
                        if mac.as_ref().is_some_and(|before| *before != now) {
                            moves += 1;
                        }
                        mac = Some(now);
                    }
                    std::thread::sleep(Duration::from_millis(20));
                }
                (max, moves)
            });
            std::thread::sleep(fault_after);
            let fault_at = unix_now();
            fault(self);
            let samples = prober.join().unwrap_or_default();
            (samples, sampler.join().unwrap_or((0, 0)), fault_at)
        });
        let (max_holders, arp_moves) = sampled;
        FaultRun {
            summary: probe::summarize(&samples, fault_at),
            max_holders,
            arp_moves,
        }
    }
}
