//! [`ClusterHandle`] for the netns lab ([`crate::lab`]): users on the `client` host, the gateway
//! pair on gw1/gw2 behind the floating address, Redis on `redis`, workers on m1, m2. Machine
//! faults are real link faults (`ip link set eth0 down` inside the host's namespace).

use std::net::SocketAddr;
use std::path::Path;
use std::time::Duration;

use nix::sys::signal::Signal;

use super::target::{ClusterHandle, GatewayInfo, Stopped, TargetError, WorkerInfo};
use crate::lab::{ADMIN_PORT, GATEWAYS, Lab, LabError, LabOptions};

/// The gateways' whole-request timeout in the lab unless `--lab-gateway-env` sets one (their
/// default `timeouts.request`).
const REQUEST_TIMEOUT: Duration = Duration::from_secs(15);
/// How long an admin API call inside a gateway host may take.
const ADMIN_TIMEOUT: Duration = Duration::from_secs(1);

/// A lab that drills run against; dropping it tears the lab down.
#[derive(Debug)]
pub struct LabCluster {
    lab: Lab,
    /// The gateways' `timeouts.request`, as their environment sets it.
    request_timeout: Duration,
}

fn failed(what: impl std::fmt::Display) -> TargetError {
    TargetError::failed(what)
}

impl LabCluster {
    /// Builds the lab (2 worker machines × 2 workers, the herd gateway pair) with `gateway_env`
    /// for both gateways, logs under `log_dir`.
    pub fn start(
        log_dir: &Path,
        gateway_env: Vec<(String, String)>,
    ) -> Result<LabCluster, LabError> {
        // A value that does not parse stops the gateways at start (a config error), so the
        // default is only ever used when the variable is not set.
        let request_timeout = gateway_env
            .iter()
            .find(|(key, _)| key == "HERD_GATEWAY_TIMEOUTS__REQUEST")
            .and_then(|(_, value)| humantime::parse_duration(value).ok())
            .unwrap_or(REQUEST_TIMEOUT);
        let options = LabOptions {
            gateway_env,
            ..LabOptions::default()
        };
        Ok(LabCluster {
            lab: Lab::start(options, log_dir)?,
            request_timeout,
        })
    }

    fn index_of(&mut self, id: &str) -> Result<usize, TargetError> {
        (0..self.lab.workers().len())
            .find(|&i| self.lab.worker_identity(i).0 == id)
            .ok_or_else(|| failed(format!("no worker {id} in the lab")))
    }

    fn gateway_index(name: &str) -> Result<usize, TargetError> {
        GATEWAYS
            .iter()
            .position(|g| *g == name)
            .ok_or_else(|| failed(format!("no gateway {name} in the lab")))
    }

    /// `GET 127.0.0.1:{ADMIN_PORT}{path}` inside gateway host `host`.
    fn admin_get(&self, host: &str, path: &str) -> Option<String> {
        let url = format!("http://127.0.0.1:{ADMIN_PORT}{path}");
        self.lab
            .topology()
            .run_in(host, move || async move {
                let client = reqwest::Client::builder()
                    .no_proxy()
                    .timeout(ADMIN_TIMEOUT)
                    .build()
                    .ok()?;
                let response = client.get(url).send().await.ok()?;
                if !response.status().is_success() {
                    return None;
                }
                response.text().await.ok()
            })
            .ok()
            .flatten()
    }
}

impl ClusterHandle for LabCluster {
    fn describe(&self) -> String {
        "netns lab (client, gw1+gw2 pair, redis, m1, m2)".into()
    }

    fn public_addr(&self) -> SocketAddr {
        self.lab.public_addr()
    }

    fn client_netns(&self) -> Option<String> {
        self.lab
            .topology()
            .host("client")
            .ok()
            .map(|h| h.netns.clone())
    }

    fn request_timeout(&self) -> Duration {
        self.request_timeout
    }

    fn workers(&mut self) -> Vec<WorkerInfo> {
        (0..self.lab.workers().len())
            .map(|i| {
                let (id, machine) = self.lab.worker_identity(i);
                WorkerInfo {
                    id,
                    pid: self.lab.workers()[i].pid(),
                    machine,
                }
            })
            .collect()
    }

    fn signal_worker(&mut self, id: &str, signal: Signal) -> Result<(), TargetError> {
        let index = self.index_of(id)?;
        self.lab.workers()[index].signal(signal).map_err(failed)
    }

    fn restart_worker(&mut self, id: &str) -> Result<(), TargetError> {
        let index = self.index_of(id)?;
        self.lab.restart_worker(index).map_err(failed)
    }

    fn set_link(&mut self, machine: &str, up: bool) -> Result<(), TargetError> {
        let topology = self.lab.topology();
        if up {
            topology.link_up(machine).map_err(failed)
        } else {
            topology.link_down(machine).map_err(failed)
        }
    }

    fn gateways(&mut self) -> Vec<GatewayInfo> {
        let holders = self.lab.address_holders();
        GATEWAYS
            .iter()
            .map(|name| GatewayInfo {
                name: name.to_string(),
                machine: name.to_string(),
                // Only a sole holder is clearly the active one (two holders: a split moment).
                active: holders.len() == 1 && holders[0] == *name,
                metrics: self.admin_get(name, "/metrics"),
            })
            .collect()
    }

    fn signal_gateway(&mut self, name: &str, signal: Signal) -> Result<(), TargetError> {
        self.lab
            .signal_gateway(Self::gateway_index(name)?, signal)
            .map_err(failed)
    }

    fn restart_gateway(&mut self, name: &str) -> Result<(), TargetError> {
        self.lab
            .start_gateway(Self::gateway_index(name)?)
            .map_err(failed)
    }

    fn restart_redis(&mut self) -> Result<String, TargetError> {
        let redis = self.lab.redis();
        redis.stop();
        redis.start_again().map_err(failed)?;
        Ok(super::target::REDIS_RESTARTED.to_string())
    }

    fn ensure_redis(&mut self) -> Result<(), TargetError> {
        let redis = self.lab.redis();
        if redis.is_running() {
            return Ok(());
        }
        redis.start_again().map_err(failed)
    }

    fn add_worker(&mut self) -> Result<String, TargetError> {
        // The machine with the fewest workers.
        let workers = self.workers();
        let mut machines: Vec<String> = workers.iter().map(|w| w.machine.clone()).collect();
        machines.sort();
        machines.dedup();
        let machine = machines
            .into_iter()
            .min_by_key(|m| workers.iter().filter(|w| w.machine == *m).count())
            .ok_or_else(|| failed("the lab has no worker machine"))?;
        let index = self.lab.add_worker(&machine).map_err(failed)?;
        Ok(self.lab.worker_identity(index).0)
    }

    fn drain_worker(&mut self, id: &str, grace: Duration) -> Result<Stopped, TargetError> {
        let index = self.index_of(id)?;
        let (_, clean) = self.lab.workers()[index].terminate(grace);
        Ok(if clean {
            Stopped::Drained
        } else {
            Stopped::Killed
        })
    }

    fn remove_added_worker(&mut self, id: &str, grace: Duration) -> Result<Stopped, TargetError> {
        let stopped = self.drain_worker(id, grace)?;
        let index = self.index_of(id)?;
        self.lab.forget_worker(index);
        Ok(stopped)
    }

    fn all_healthy(&mut self) -> Result<(), String> {
        let holders = self.lab.address_holders();
        let [active] = holders.as_slice() else {
            return Err(format!("floating address held by {holders:?}"));
        };
        let body = self
            .admin_get(active, "/readyz")
            .ok_or_else(|| format!("{active}'s /readyz did not answer 200"))?;
        super::local::healthy(&body, self.workers().len())
    }
}
