//! Several "machines" on one Linux box, for multi-host tests and drills: each host is a network
//! namespace with one interface (`eth0`) plugged into a bridge that lives in a namespace of its
//! own, so the segment is isolated from the box's real network (no routes out, nothing to leak).
//!
//! A [`Topology`] is removed when dropped (every namespace, and with them every veth and the
//! bridge), also when a test panics. Processes are started inside a host with
//! [`Topology::spec_in`], which wraps a [`Spec`] in `ip netns exec`. Faults: [`Topology::link_down`]
//! (the machine vanishes from the network) and [`Topology::partition`] (two hosts stop seeing each
//! other while both still see everyone else). Needs root and `ip` (iproute2).

use std::net::Ipv4Addr;
use std::process::{Command, Stdio};
use std::sync::atomic::{AtomicU32, Ordering};

use crate::process::Spec;

/// One host of a topology to build.
#[derive(Debug, Clone)]
pub struct HostSpec {
    /// Short name, e.g. `gw1` (namespace names are prefixed to keep topologies apart).
    pub name: String,
    /// Last octet of its address on the segment's /24.
    pub octet: u8,
    /// Let processes bind addresses the host doesn't hold yet (a standby gateway's floating
    /// address).
    pub nonlocal_bind: bool,
}

impl HostSpec {
    /// A host `name` at `.octet`.
    pub fn new(name: impl Into<String>, octet: u8) -> Self {
        HostSpec {
            name: name.into(),
            octet,
            nonlocal_bind: false,
        }
    }

    /// Allows binding non-local addresses on this host.
    pub fn nonlocal_bind(mut self) -> Self {
        self.nonlocal_bind = true;
        self
    }
}

/// A built host.
#[derive(Debug, Clone)]
pub struct Host {
    /// Its short name.
    pub name: String,
    /// Its network namespace.
    pub netns: String,
    /// Its address on the segment.
    pub addr: Ipv4Addr,
}

/// Why a topology could not be built or changed.
#[derive(Debug, thiserror::Error)]
pub enum NetnsError {
    /// An `ip` command failed.
    #[error("`ip {args}` failed: {stderr}")]
    Ip {
        /// Its arguments.
        args: String,
        /// What it printed.
        stderr: String,
    },
    /// `ip` could not be run at all.
    #[error("cannot run `ip` (install iproute2; network namespaces also need root): {0}")]
    Spawn(std::io::Error),
    /// The calling thread could not enter a host's namespace.
    #[error("cannot enter the host's network namespace: {0}")]
    Enter(std::io::Error),
    /// No such host in this topology.
    #[error("no host named {0} in this topology")]
    UnknownHost(String),
}

/// An isolated L2 segment with hosts on it; removed on drop.
#[derive(Debug)]
pub struct Topology {
    bridge_netns: String,
    subnet: [u8; 3],
    hosts: Vec<Host>,
    /// Set by [`Topology::keep`]: the namespaces outlive this handle.
    kept: bool,
}

impl Topology {
    /// Builds the segment `{subnet}.0/24` with `hosts` on it. Namespace names are
    /// `herd{pid}x{n}-{host}`, unique per process and topology.
    pub fn create(subnet: [u8; 3], hosts: &[HostSpec]) -> Result<Topology, NetnsError> {
        static NEXT: AtomicU32 = AtomicU32::new(0);
        let tag = format!(
            "herd{}x{}",
            std::process::id(),
            NEXT.fetch_add(1, Ordering::Relaxed)
        );
        Topology::create_named(&tag, subnet, hosts)
    }

    /// Like [`create`](Self::create), with namespace names `{tag}-{host}` and `{tag}-br`
    /// chosen by the caller — for a topology that [`keep`](Self::keep) leaves in place and a
    /// later process removes with [`remove_named`](Self::remove_named) (`herd down`).
    pub fn create_named(
        tag: &str,
        subnet: [u8; 3],
        hosts: &[HostSpec],
    ) -> Result<Topology, NetnsError> {
        let mut topology = Topology {
            bridge_netns: format!("{tag}-br"),
            subnet,
            hosts: Vec::new(),
            kept: false,
        };
        // From here on, a failure drops `topology`, which removes whatever was built.
        let br = topology.bridge_netns.clone();
        ip(&["netns", "add", &br])?;
        ip(&["-n", &br, "link", "set", "lo", "up"])?;
        ip(&["-n", &br, "link", "add", "br0", "type", "bridge"])?;
        ip(&["-n", &br, "link", "set", "br0", "up"])?;
        for (index, spec) in hosts.iter().enumerate() {
            let host = Host {
                name: spec.name.clone(),
                netns: format!("{tag}-{}", spec.name),
                addr: Ipv4Addr::new(subnet[0], subnet[1], subnet[2], spec.octet),
            };
            ip(&["netns", "add", &host.netns])?;
            topology.hosts.push(host.clone());
            let ns = host.netns.as_str();
            // The bridge end's name only has to be unique inside the bridge namespace.
            let port = format!("p{index}");
            ip(&["-n", ns, "link", "set", "lo", "up"])?;
            ip(&[
                "-n", ns, "link", "add", "eth0", "type", "veth", "peer", "name", &port,
            ])?;
            ip(&["-n", ns, "link", "set", &port, "netns", &br])?;
            ip(&["-n", &br, "link", "set", &port, "master", "br0"])?;
            ip(&["-n", &br, "link", "set", &port, "up"])?;
            ip(&[
                "-n",
                ns,
                "addr",
                "add",
                &format!("{}/24", host.addr),
                "dev",
                "eth0",
            ])?;
            ip(&["-n", ns, "link", "set", "eth0", "up"])?;
            if spec.nonlocal_bind {
                sysctl(ns, "net.ipv4.ip_nonlocal_bind=1")?;
            }
        }
        Ok(topology)
    }

    /// The host named `name`.
    pub fn host(&self, name: &str) -> Result<&Host, NetnsError> {
        self.hosts
            .iter()
            .find(|host| host.name == name)
            .ok_or_else(|| NetnsError::UnknownHost(name.to_string()))
    }

    /// Every host.
    pub fn hosts(&self) -> &[Host] {
        &self.hosts
    }

    /// An address on the segment that no host holds (e.g. a floating address).
    pub fn address(&self, octet: u8) -> Ipv4Addr {
        Ipv4Addr::new(self.subnet[0], self.subnet[1], self.subnet[2], octet)
    }

    /// `spec`, run inside host `name` (wrapped in `ip netns exec`).
    pub fn spec_in(&self, name: &str, spec: Spec) -> Result<Spec, NetnsError> {
        Ok(spec.in_netns(&self.host(name)?.netns))
    }

    /// A command to run inside host `name`.
    pub fn command(&self, name: &str, program: &str) -> Result<Command, NetnsError> {
        let host = self.host(name)?;
        let mut command = Command::new("ip");
        command.args(["netns", "exec", &host.netns, program]);
        Ok(command)
    }

    /// Runs `work` inside host `name`: on a thread of its own that has entered the host's network
    /// namespace, with a single-threaded tokio runtime, so every socket it opens belongs to that
    /// host. Blocks until `work` finishes and returns its output.
    pub fn run_in<F, Fut, T>(&self, name: &str, work: F) -> Result<T, NetnsError>
    where
        F: FnOnce() -> Fut + Send + 'static,
        Fut: std::future::Future<Output = T>,
        T: Send + 'static,
    {
        run_in_netns(&self.host(name)?.netns, work)
    }

    /// Takes host `name`'s link down: to everyone else the machine is gone.
    pub fn link_down(&self, name: &str) -> Result<(), NetnsError> {
        let host = self.host(name)?;
        ip(&["-n", &host.netns, "link", "set", "eth0", "down"])
    }

    /// Brings host `name`'s link back up.
    pub fn link_up(&self, name: &str) -> Result<(), NetnsError> {
        let host = self.host(name)?;
        ip(&["-n", &host.netns, "link", "set", "eth0", "up"])
    }

    /// Hosts `a` and `b` stop reaching each other (blackhole routes on both), while both still
    /// reach every other host.
    pub fn partition(&self, a: &str, b: &str) -> Result<(), NetnsError> {
        self.blackhole("add", a, b)?;
        self.blackhole("add", b, a)
    }

    /// Undoes [`partition`](Self::partition).
    pub fn heal(&self, a: &str, b: &str) -> Result<(), NetnsError> {
        self.blackhole("del", a, b)?;
        self.blackhole("del", b, a)
    }

    /// Adds or deletes (`action`) a blackhole route on host `from` towards host `to`.
    fn blackhole(&self, action: &str, from: &str, to: &str) -> Result<(), NetnsError> {
        let (from, to) = (self.host(from)?, self.host(to)?);
        let target = format!("{}/32", to.addr);
        ip(&["-n", &from.netns, "route", action, "blackhole", &target])
    }

    /// Whether host `name` holds `addr` on its interface right now.
    pub fn holds(&self, name: &str, addr: Ipv4Addr) -> Result<bool, NetnsError> {
        let host = self.host(name)?;
        let output = ip_output(&["-n", &host.netns, "-4", "-o", "addr", "show", "dev", "eth0"])?;
        let needle = format!(" {addr}/");
        Ok(output.contains(&needle))
    }

    /// The MAC address host `name` sends to for `addr` (its neighbour entry), if it has one.
    pub fn neighbour(&self, name: &str, addr: Ipv4Addr) -> Result<Option<String>, NetnsError> {
        let host = self.host(name)?;
        let output = ip_output(&["-n", &host.netns, "neigh", "show", &addr.to_string()])?;
        Ok(output
            .split_whitespace()
            .skip_while(|word| *word != "lladdr")
            .nth(1)
            .map(str::to_string))
    }
}

impl Topology {
    /// Leaves every namespace in place when this handle goes (`herd up --inventory` returns
    /// while the cluster runs on).
    pub fn keep(mut self) {
        self.kept = true;
    }

    /// Removes the namespaces of the topology `tag` with hosts `hosts` that exist; returns the
    /// names removed.
    pub fn remove_named(tag: &str, hosts: &[&str]) -> Result<Vec<String>, NetnsError> {
        let existing = ip_output(&["netns", "list"])?;
        let existing: Vec<&str> = existing
            .lines()
            .filter_map(|line| line.split_whitespace().next())
            .collect();
        let mut removed = Vec::new();
        let names = hosts
            .iter()
            .map(|host| format!("{tag}-{host}"))
            .chain([format!("{tag}-br")]);
        for name in names {
            if existing.contains(&name.as_str()) {
                ip(&["netns", "del", &name])?;
                removed.push(name);
            }
        }
        Ok(removed)
    }
}

/// Runs `work` inside network namespace `netns` (see [`Topology::run_in`]), for namespaces
/// made elsewhere (`herd up --inventory`).
pub fn run_in_netns<F, Fut, T>(netns: &str, work: F) -> Result<T, NetnsError>
where
    F: FnOnce() -> Fut + Send + 'static,
    Fut: std::future::Future<Output = T>,
    T: Send + 'static,
{
    let path = format!("/var/run/netns/{netns}");
    let thread = std::thread::spawn(move || -> Result<T, NetnsError> {
        let namespace = std::fs::File::open(&path).map_err(NetnsError::Enter)?;
        nix::sched::setns(&namespace, nix::sched::CloneFlags::CLONE_NEWNET)
            .map_err(|errno| NetnsError::Enter(errno.into()))?;
        let runtime = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .map_err(NetnsError::Enter)?;
        Ok(runtime.block_on(work()))
    });
    match thread.join() {
        Ok(result) => result,
        Err(panic) => std::panic::resume_unwind(panic),
    }
}

/// Whether network namespace `name` exists.
pub fn exists(name: &str) -> bool {
    ip_output(&["netns", "list"])
        .unwrap_or_default()
        .lines()
        .any(|line| line.split_whitespace().next() == Some(name))
}

impl Drop for Topology {
    fn drop(&mut self) {
        if self.kept {
            return;
        }
        // Deleting a namespace deletes its interfaces; the veth pairs go with either end.
        for host in &self.hosts {
            let _ = ip(&["netns", "del", &host.netns]);
        }
        let _ = ip(&["netns", "del", &self.bridge_netns]);
    }
}

fn ip(args: &[&str]) -> Result<(), NetnsError> {
    ip_output(args).map(drop)
}

fn ip_output(args: &[&str]) -> Result<String, NetnsError> {
    let output = Command::new("ip")
        .args(args)
        .stdin(Stdio::null())
        .output()
        .map_err(NetnsError::Spawn)?;
    if !output.status.success() {
        return Err(NetnsError::Ip {
            args: args.join(" "),
            stderr: String::from_utf8_lossy(&output.stderr).trim().to_string(),
        });
    }
    Ok(String::from_utf8_lossy(&output.stdout).into_owned())
}

fn sysctl(netns: &str, setting: &str) -> Result<(), NetnsError> {
    let output = Command::new("ip")
        .args(["netns", "exec", netns, "sysctl", "-qw", setting])
        .output()
        .map_err(NetnsError::Spawn)?;
    if !output.status.success() {
        return Err(NetnsError::Ip {
            args: format!("netns exec {netns} sysctl -qw {setting}"),
            stderr: String::from_utf8_lossy(&output.stderr).trim().to_string(),
        });
    }
    Ok(())
}

/// Namespaces whose names say a herd topology made them (`herd{pid}x{n}-…`).
pub fn leftover_namespaces() -> Vec<String> {
    ip_output(&["netns", "list"])
        .unwrap_or_default()
        .lines()
        .filter_map(|line| line.split_whitespace().next())
        .filter(|name| name.starts_with("herd") && name.contains('x') && name.contains('-'))
        .map(str::to_string)
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ping(topology: &Topology, from: &str, to: Ipv4Addr) -> bool {
        topology
            .command(from, "ping")
            .unwrap()
            .args(["-c1", "-W1", &to.to_string()])
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .status()
            .map(|s| s.success())
            .unwrap_or(false)
    }

    #[test]
    fn hosts_reach_each_other_until_cut_and_everything_is_removed() {
        if !crate::deps::is_root() {
            panic!("network namespace tests need root (run the suite as root, as CI does)");
        }
        let topology = Topology::create(
            [10, 231, 0],
            &[
                HostSpec::new("a", 1),
                HostSpec::new("b", 2),
                HostSpec::new("c", 3),
            ],
        )
        .unwrap();
        let (a, b, c) = (
            topology.host("a").unwrap().addr,
            topology.host("b").unwrap().addr,
            topology.host("c").unwrap().addr,
        );
        let names: Vec<String> = topology.hosts().iter().map(|h| h.netns.clone()).collect();
        assert!(ping(&topology, "a", b));
        topology.partition("a", "b").unwrap();
        assert!(
            !ping(&topology, "a", b),
            "partitioned hosts don't see each other"
        );
        assert!(ping(&topology, "a", c), "but still see the rest");
        topology.heal("a", "b").unwrap();
        assert!(ping(&topology, "b", a));
        topology.link_down("c").unwrap();
        assert!(!ping(&topology, "a", c), "a downed host is gone");
        assert!(topology.holds("a", a).unwrap());
        assert!(!topology.holds("a", topology.address(10)).unwrap());
        let b_port = topology
            .run_in("b", || async {
                let listener = tokio::net::TcpListener::bind("0.0.0.0:0").await.unwrap();
                listener.local_addr().unwrap().port()
            })
            .unwrap();
        assert!(b_port > 0);
        // A socket made inside host a reaches host b's address, which the root namespace can't.
        let reached = topology
            .run_in("a", move || async move {
                tokio::net::TcpStream::connect((b, 1))
                    .await
                    .err()
                    .map(|e| e.kind())
            })
            .unwrap();
        assert_eq!(
            reached,
            Some(std::io::ErrorKind::ConnectionRefused),
            "b answered (RST) from inside a"
        );
        drop(topology);
        let left = ip_output(&["netns", "list"]).unwrap();
        for name in names {
            assert!(!left.contains(&name), "{name} was removed");
        }
    }
}
