//! Redis + N workers + one gateway, started in one call: the shape most end-to-end tests need.

use std::time::Duration;

use crate::gateway::{GatewayOptions, TestGateway};
use crate::redis::TestRedis;
use crate::worker::{TestWorker, WorkerOptions};

/// What to start.
#[derive(Debug, Clone)]
pub struct ClusterOptions {
    /// Number of workers (ids `w1`, `w2`, …).
    pub workers: usize,
    /// Whether workers are also listed statically in the gateway's config. When false, the
    /// gateway discovers them through the Redis registry only.
    pub static_workers: bool,
    /// Extra worker environment.
    pub worker_env: Vec<(String, String)>,
    /// Extra gateway environment.
    pub gateway_env: Vec<(String, String)>,
}

impl Default for ClusterOptions {
    fn default() -> Self {
        ClusterOptions {
            workers: 3,
            static_workers: true,
            worker_env: Vec::new(),
            gateway_env: Vec::new(),
        }
    }
}

/// A running cluster; everything is stopped when it is dropped (gateway first).
#[derive(Debug)]
pub struct Cluster {
    /// The gateway (dropped first).
    pub gateway: TestGateway,
    /// The workers.
    pub workers: Vec<TestWorker>,
    /// Redis.
    pub redis: TestRedis,
    /// The Redis key prefix of this cluster.
    pub prefix: String,
    /// Logs of every process (dropped last).
    pub dir: tempfile::TempDir,
}

impl Cluster {
    /// Starts Redis, the workers and the gateway, and waits until the gateway answers through
    /// every worker's readiness.
    pub async fn start(options: ClusterOptions) -> Cluster {
        let dir = crate::temp_dir();
        let redis = TestRedis::start();
        let prefix = crate::unique_prefix();
        let workers: Vec<TestWorker> = (1..=options.workers)
            .map(|n| {
                let mut worker_options = WorkerOptions::new(format!("w{n}"), redis.url(), &prefix);
                worker_options
                    .env
                    .extend(options.worker_env.iter().cloned());
                TestWorker::start(&worker_options, dir.path())
            })
            .collect();
        let gateway_options = GatewayOptions {
            workers: if options.static_workers {
                workers.iter().map(|w| w.addr).collect()
            } else {
                Vec::new()
            },
            registry: Some((redis.url(), prefix.clone())),
            env: options.gateway_env.clone(),
        };
        let gateway = TestGateway::start(&gateway_options, dir.path());
        let cluster = Cluster {
            gateway,
            workers,
            redis,
            prefix,
            dir,
        };
        cluster.wait_ready(Duration::from_secs(15)).await;
        cluster
    }

    /// Waits until the gateway's readiness says it can send to a worker.
    pub async fn wait_ready(&self, timeout: Duration) {
        let client = crate::client();
        let url = self.gateway.admin_url("/readyz");
        crate::wait_until(timeout, "the gateway is ready", || {
            let request = client.get(&url).send();
            async move { matches!(request.await, Ok(r) if r.status().is_success()) }
        })
        .await;
    }

    /// Starts one more worker with id `id` on this cluster's Redis and prefix.
    pub fn add_worker(&mut self, id: &str) -> &TestWorker {
        let options = WorkerOptions::new(id, self.redis.url(), &self.prefix);
        let worker = TestWorker::start(&options, self.dir.path());
        self.workers.push(worker);
        self.workers.last().expect("just pushed")
    }

    /// The worker with id `id`.
    pub fn worker(&mut self, id: &str) -> &mut TestWorker {
        self.workers
            .iter_mut()
            .find(|w| w.id == id)
            .unwrap_or_else(|| panic!("no worker {id}"))
    }
}
