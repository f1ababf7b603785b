//! The herd operator library: what the `herd` CLI and the end-to-end tests share.
//!
//! Layout:
//! - [`bench`]: `herd bench proxy` (herd-gateway vs HAProxy vs nginx), `herd bench health` and
//!   `herd bench soak`.
//! - [`deploy`]: `herd up|down|status|scale|rollout --inventory`: an inventory's processes
//!   placed, started in order, waited for, stopped in order; workers added, drained and
//!   replaced on its machines.
//! - [`drill`]: `herd drill`, failover drills under load with a verdict.
//! - [`demo_user`]: a drill user's first steps with the demo app (log in, one cart item).
//! - [`deps`]: make sure outside programs (redis-server, haproxy…) are installed, or say how.
//! - [`binaries`]: find the `herd-gateway` and `herd-worker` executables.
//! - [`inventory`]: the inventory file (machines, images, gateway pair, Redis), its checks and
//!   where each process goes.
//! - [`process`]: start a herd process, wait for its "listening" line, signal it, stop it.
//! - [`redis_server`]: run a private `redis-server` on a free port.
//! - [`lab`]: the gateway pair's multi-host lab (client, gw1, gw2, redis, worker machines).
//! - [`machine`]: machines behind one trait (local, netns, ssh) and their supervisors (systemd
//!   units, or herd's fallback supervisor).
//! - [`load`]: a bounded request load that records what every request saw.
//! - [`netns`]: several "machines" on one box (network namespaces on a bridge), with faults.
//! - [`ports`]: pick free loopback ports.
//! - [`probe`]: the failover prober (a new connection per request, on a fixed schedule).
//! - [`pid`]: processes known only by pid (from an earlier `herd up`): alive? stop them.
//! - [`state`]: the state directory and state file of a local cluster.
//! - [`cli`]: the `herd` commands (`up`, `status`, `scale`, `rollout`, `down`, `lab`, `bench`)
//!   and the local supervisor.
//!
//! The CLI's flow starts in `main.rs`, which parses the command and calls [`cli::run`].

pub mod bench;
pub mod binaries;
pub mod cli;
pub mod demo_user;
pub mod deploy;
pub mod deps;
pub mod drill;
pub mod inventory;
pub mod lab;
pub mod load;
pub mod machine;
pub mod netns;
pub mod pid;
pub mod ports;
pub mod probe;
pub mod process;
pub mod redis_cluster;
pub mod redis_server;
pub mod state;
