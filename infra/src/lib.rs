//! The herd operator library: what the `herd` CLI and the end-to-end tests share.
//!
//! Layout:
//! - [`deps`]: make sure outside programs (redis-server, haproxy…) are installed, or say how.
//! - [`binaries`]: find the `herd-gateway` and `herd-worker` executables.
//! - [`process`]: start a herd process, wait for its "listening" line, signal it, stop it.
//! - [`redis_server`]: run a private `redis-server` on a free port.
//! - [`load`]: a bounded request load that records what every request saw.
//! - [`netns`]: several "machines" on one box (network namespaces on a bridge), with faults.
//! - [`ports`]: pick free loopback ports.
//!
//! The CLI's flow starts in `main.rs`, which parses the command and calls into `cli`.

pub mod binaries;
pub mod deps;
pub mod load;
pub mod netns;
pub mod ports;
pub mod process;
pub mod redis_server;
