//! Taking the public address over: a floating IPv4 address on a Linux interface, announced with
//! gratuitous ARP, and/or operator hook commands (cloud API, DNS…).
//!
//! The address is added with a short kernel lifetime (`valid_lft`) that the active keeps
//! refreshing. A holder killed with -9 never removes its address; with a lifetime, the kernel
//! removes it a few seconds later, so a dead host can't keep answering ARP for it (a race seen
//! with keepalived in the team's lab).

use std::time::Duration;

use tokio::process::Command;
use tracing::{info, warn};

use super::config::FloatingAddressConfig;

/// When gratuitous ARP is sent after claiming, from the claim: once at once, then again in case
/// the first was lost or a neighbour re-resolved in between.
const ANNOUNCE_AT: [Duration; 4] = [
    Duration::ZERO,
    Duration::from_millis(100),
    Duration::from_millis(500),
    Duration::from_secs(2),
];

/// The program that sends gratuitous ARP (iputils' `arping`: `-U`, `-I`).
const ARPING: &str = "arping";

/// The longest an `ip` command may take. It runs inside the failover loop, so a hung one (the
/// kernel's RTNL lock held, say) must not stop lease renewals and heartbeats for long.
const IP_TIMEOUT: Duration = Duration::from_secs(1);

/// The gratuitous ARP announcements of one claim; dropping it stops them (and kills a running
/// `arping`).
#[derive(Debug)]
pub struct Announcement(tokio::task::AbortHandle);

impl Drop for Announcement {
    fn drop(&mut self) {
        self.0.abort();
    }
}

/// Puts the floating address on this host and takes it away.
#[derive(Debug, Clone)]
pub struct FloatingAddress {
    config: FloatingAddressConfig,
}

impl FloatingAddress {
    /// The address of `config`.
    pub fn new(config: FloatingAddressConfig) -> Self {
        FloatingAddress { config }
    }

    fn cidr(&self) -> String {
        format!("{}/{}", self.config.ip, self.config.prefix_len)
    }

    /// Makes this host's ARP requests on the interface name its own primary address as sender,
    /// never the floating one (`arp_announce = 2`).
    ///
    /// Without it, a gateway that handed the address over and still finishes a connection on
    /// it may ask for the client's MAC *from the floating address* (the kernel takes the
    /// packet's source by default); the client takes that as news that the address moved back,
    /// and sends its next connections to a host about to drop the address. LVS and keepalived
    /// setups recommend the same setting for the same reason.
    pub fn prepare_host(&self) {
        let path = format!(
            "/proc/sys/net/ipv4/conf/{}/arp_announce",
            self.config.interface
        );
        let current = std::fs::read_to_string(&path).unwrap_or_default();
        if current.trim() == "2" {
            return;
        }
        match std::fs::write(&path, "2") {
            Ok(()) => info!(
                interface = %self.config.interface,
                "set arp_announce=2: ARP requests never name the floating address as sender"
            ),
            Err(error) => warn!(
                %error,
                path,
                "cannot set arp_announce=2; a gateway handing the address over may pull clients back with its ARP requests (set it with sysctl)"
            ),
        }
    }

    /// Checks that this host can announce the address: on an interface that resolves neighbours
    /// with ARP, iputils' `arping` must be on the PATH. Without it a takeover moves the address
    /// but not the clients, which keep sending to the old holder until their ARP entries expire
    /// (on a fresh Debian box without it, every request through the lab's pair timed out for
    /// 16 s after a graceful stop). Checked at start, so the gap shows before the first failover.
    pub async fn check_host(&self) -> Result<(), String> {
        check_announcer(&self.config.interface, ARPING).await
    }

    /// Adds the address (or renews its lifetime) and starts announcing it with gratuitous ARP
    /// (at the `ANNOUNCE_AT` times). The announcing stops when the returned [`Announcement`]
    /// is dropped: a gateway that gives the address up must stop announcing it at once, or a
    /// late announcement pulls clients back from the new holder (seen in the failback drill: an
    /// announcement 3 s after the claim, just after the hand-over, reset a request).
    pub async fn claim(&self) -> Result<Announcement, String> {
        self.refresh().await?;
        let interface = self.config.interface.clone();
        let ip = self.config.ip.to_string();
        let task = tokio::spawn(async move {
            let started = tokio::time::Instant::now();
            // Each `arping` waits a second before it exits: start each on its own schedule and
            // keep the children (killed on drop) until the last is done.
            let mut running = Vec::with_capacity(ANNOUNCE_AT.len());
            for at in ANNOUNCE_AT {
                tokio::time::sleep_until(started + at).await;
                match Command::new(ARPING)
                    .args(["-q", "-U", "-c", "1", "-w", "1", "-I", &interface, &ip])
                    .kill_on_drop(true)
                    .spawn()
                {
                    Ok(child) => running.push(child),
                    Err(error) => {
                        warn!(%error, "gratuitous ARP failed (is iputils-arping installed?)");
                        return;
                    }
                }
            }
            for mut child in running {
                let _ = child.wait().await;
            }
        });
        Ok(Announcement(task.abort_handle()))
    }

    /// Renews the address's lifetime (adding it if it is gone).
    pub async fn refresh(&self) -> Result<(), String> {
        let lifetime = self.config.lifetime_secs.to_string();
        run_ip(&[
            "addr",
            "replace",
            &self.cidr(),
            "dev",
            &self.config.interface,
            "valid_lft",
            &lifetime,
            "preferred_lft",
            &lifetime,
        ])
        .await
    }

    /// Removes the address; not holding it is fine.
    pub async fn release(&self) -> Result<(), String> {
        match run_ip(&["addr", "del", &self.cidr(), "dev", &self.config.interface]).await {
            Err(error) if error.contains("Cannot assign") || error.contains("not found") => Ok(()),
            other => other,
        }
    }
}

async fn run_ip(args: &[&str]) -> Result<(), String> {
    run_bounded("ip", args, IP_TIMEOUT).await
}

/// Runs `program` with `args`, killed (`kill_on_drop`) if it takes longer than `limit`.
async fn run_bounded(program: &str, args: &[&str], limit: Duration) -> Result<(), String> {
    let output = Command::new(program).args(args).kill_on_drop(true).output();
    let output = tokio::time::timeout(limit, output)
        .await
        .map_err(|_| format!("{program} {}: no answer within {limit:?}", args.join(" ")))?
        .map_err(|error| format!("cannot run {program}: {error}"))?;
    if output.status.success() {
        Ok(())
    } else {
        Err(format!(
            "{program} {}: {}",
            args.join(" "),
            String::from_utf8_lossy(&output.stderr).trim()
        ))
    }
}

/// Runs an operator hook with `sh -c` in the background (see [`run_hook_bounded`]).
pub fn run_hook(command: &str, role: &str, epoch: u64, gateway_id: &str, limit: Duration) {
    let command = command.to_string();
    let role = role.to_string();
    let gateway_id = gateway_id.to_string();
    tokio::spawn(async move { run_hook_bounded(&command, &role, epoch, &gateway_id, limit).await });
}

/// How a hook ended.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum HookOutcome {
    /// It exited 0.
    Succeeded,
    /// It exited otherwise (the status, as text).
    Failed(String),
    /// It ran longer than its limit and was killed with its process group.
    TimedOut,
    /// It could not be started.
    NotStarted(String),
}

/// Runs an operator hook with `sh -c` (with `HERD_ROLE`, `HERD_EPOCH`, `HERD_GATEWAY_ID`) in a
/// process group of its own; past `limit` the whole group is killed, so a hung cloud CLI or
/// whatever it started can't pile up with every role change. Logs how it ended.
pub async fn run_hook_bounded(
    command: &str,
    role: &str,
    epoch: u64,
    gateway_id: &str,
    limit: Duration,
) -> HookOutcome {
    let spawned = Command::new("sh")
        .args(["-c", command])
        .env("HERD_ROLE", role)
        .env("HERD_EPOCH", epoch.to_string())
        .env("HERD_GATEWAY_ID", gateway_id)
        .process_group(0)
        .kill_on_drop(true)
        .spawn();
    let mut child = match spawned {
        Ok(child) => child,
        Err(error) => {
            warn!(role, hook = command, %error, "failover hook could not run");
            return HookOutcome::NotStarted(error.to_string());
        }
    };
    match tokio::time::timeout(limit, child.wait()).await {
        Ok(Ok(status)) if status.success() => {
            info!(role, hook = command, "failover hook ran");
            HookOutcome::Succeeded
        }
        Ok(Ok(status)) => {
            warn!(role, hook = command, %status, "failover hook failed");
            HookOutcome::Failed(status.to_string())
        }
        Ok(Err(error)) => {
            warn!(role, hook = command, %error, "failover hook could not be waited for");
            HookOutcome::Failed(error.to_string())
        }
        Err(_) => {
            if let Some(pid) = child.id().and_then(|id| i32::try_from(id).ok()) {
                let _ = nix::sys::signal::killpg(
                    nix::unistd::Pid::from_raw(pid),
                    nix::sys::signal::Signal::SIGKILL,
                );
            }
            let _ = child.wait().await;
            warn!(role, hook = command, limit = ?limit, "failover hook ran too long; killed (failover.hook_timeout)");
            HookOutcome::TimedOut
        }
    }
}

/// `Err` naming the key when `interface` resolves neighbours with ARP and `program` is not
/// iputils' arping (missing, or the other Debian `arping`, whose flags differ).
async fn check_announcer(interface: &str, program: &str) -> Result<(), String> {
    if !uses_arp(interface) {
        return Ok(());
    }
    let iputils = Command::new(program)
        .arg("-V")
        .output()
        .await
        .is_ok_and(|output| {
            String::from_utf8_lossy(&output.stdout).contains("iputils")
                || String::from_utf8_lossy(&output.stderr).contains("iputils")
        });
    if iputils {
        Ok(())
    } else {
        Err(format!(
            "failover.address: announcing the address on {interface} needs iputils' arping on \
             the PATH, and `{program} -V` did not answer as it (Debian: apt-get install \
             iputils-arping); without it a takeover moves the address but not the clients"
        ))
    }
}

/// Whether `interface` resolves neighbours with ARP: not loopback, not flagged `NOARP`. One
/// this process can't see (not there yet, or another network namespace's sysfs) counts as one.
fn uses_arp(interface: &str) -> bool {
    const IFF_LOOPBACK: u32 = 0x8;
    const IFF_NOARP: u32 = 0x80;
    let Ok(text) = std::fs::read_to_string(format!("/sys/class/net/{interface}/flags")) else {
        return true;
    };
    let flags = u32::from_str_radix(text.trim().trim_start_matches("0x"), 16).unwrap_or(0);
    flags & (IFF_LOOPBACK | IFF_NOARP) == 0
}

#[cfg(test)]
mod tests {
    #[tokio::test]
    async fn an_arp_interface_without_iputils_arping_is_refused_naming_the_key() {
        let error = check_announcer("eth-herd-test0", "/nonexistent/arping")
            .await
            .unwrap_err();
        assert!(error.starts_with("failover.address:"), "{error}");
        assert!(error.contains("apt-get install iputils-arping"), "{error}");
        // `true -V` answers, but not as iputils' arping.
        assert!(check_announcer("eth-herd-test0", "true").await.is_err());
    }

    #[tokio::test]
    async fn loopback_needs_no_arp() {
        assert!(!uses_arp("lo"));
        assert!(check_announcer("lo", "/nonexistent/arping").await.is_ok());
    }
    use super::*;

    #[tokio::test]
    async fn a_hung_command_is_cut_off() {
        let started = std::time::Instant::now();
        let result = run_bounded("sleep", &["10"], Duration::from_millis(200)).await;
        assert!(result.is_err(), "{result:?}");
        assert!(started.elapsed() < Duration::from_secs(2));
        assert_eq!(
            run_bounded("true", &[], Duration::from_secs(5)).await,
            Ok(())
        );
    }

    #[tokio::test]
    async fn a_hook_gets_its_environment_and_its_exit_status_counts() {
        let dir = tempfile::tempdir().unwrap();
        let out = dir.path().join("env");
        let command = format!(
            "echo \"$HERD_ROLE $HERD_EPOCH $HERD_GATEWAY_ID\" > {}",
            out.display()
        );
        let limit = Duration::from_secs(5);
        assert_eq!(
            run_hook_bounded(&command, "active", 7, "gw1", limit).await,
            HookOutcome::Succeeded
        );
        assert_eq!(
            std::fs::read_to_string(&out).unwrap().trim(),
            "active 7 gw1"
        );
        assert!(matches!(
            run_hook_bounded("exit 3", "standby", 7, "gw1", limit).await,
            HookOutcome::Failed(_)
        ));
    }

    #[tokio::test]
    async fn a_hung_hook_is_killed_with_what_it_started() {
        // A marker no other process on the box has in its command line.
        let marker = format!(
            "{}.{}",
            40 + std::process::id() % 50,
            std::process::id() % 997
        );
        let command = format!("sleep {marker} & sleep {marker}; wait");
        let started = std::time::Instant::now();
        let outcome =
            run_hook_bounded(&command, "active", 1, "gw1", Duration::from_millis(300)).await;
        assert_eq!(outcome, HookOutcome::TimedOut);
        assert!(started.elapsed() < Duration::from_secs(5));
        // The background sleep was in the hook's process group: gone too.
        let running = |needle: &str| {
            std::fs::read_dir("/proc")
                .into_iter()
                .flatten()
                .flatten()
                .filter_map(|entry| std::fs::read(entry.path().join("cmdline")).ok())
                .any(|cmdline| {
                    String::from_utf8_lossy(&cmdline).replace('\0', " ").trim() == needle
                })
        };
        let needle = format!("sleep {marker}");
        let mut left = true;
        for _ in 0..20 {
            left = running(&needle);
            if !left {
                break;
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        assert!(!left, "left running: {needle}");
    }
}
