//! A CPU budget for a proxy under test (`herd bench proxy --proxy-cpus`): its processes in a
//! cgroup of their own whose CPU quota is a share of one CPU.
//!
//! On one machine the load generator and the upstreams share the CPUs with the proxy, so a run
//! measures the machine's req/s, of which the proxy is a part (docs/performance.md, section
//! 26). Held to a budget the rest of the machine can outpace, the proxy alone bounds req/s: each
//! proxy then serves what that much CPU serves, as it would on a machine of its own. Whether a
//! run really was bound by the budget is read back ([`CpuBudget::throttling`], and the CPU the
//! proxy used over what it was given, in the report).
//!
//! The kernel enforces the quota per period ([`PERIOD`]): a proxy that has used its share waits
//! for the next period, so its latency includes those waits. Both cgroup layouts are handled:
//! v2 (`cpu.max` under a unified hierarchy with the `cpu` controller) and v1 (`cpu.cfs_quota_us`
//! in the `cpu` hierarchy). The cgroup is removed when the budget is dropped, after its
//! processes were stopped or moved back to the parent.

use std::fs;
use std::io;
use std::path::{Path, PathBuf};
use std::time::Duration;

use super::BenchError;
use crate::process::Spec;

/// The quota's period. Short, so that a proxy waits at most a few milliseconds for its next
/// share; 10 ms keeps the kernel's accounting per period negligible.
pub const PERIOD: Duration = Duration::from_millis(10);

/// Smallest and largest budget accepted, in CPUs. The kernel's smallest quota is 1 ms, a tenth
/// of [`PERIOD`]; above one CPU nginx's single worker process could not use its budget while
/// the multi-threaded proxies could.
pub const BUDGET_RANGE: std::ops::RangeInclusive<f64> = 0.1..=1.0;

/// Where the cgroup file systems are mounted.
const CGROUP_ROOT: &str = "/sys/fs/cgroup";

/// A cgroup holding processes to a CPU quota; removed on drop.
#[derive(Debug)]
pub struct CpuBudget {
    /// The cgroup's directory.
    dir: PathBuf,
    /// Its parent's, where processes go back before removal.
    parent: PathBuf,
    /// The budget, in CPUs.
    cpus: f64,
}

/// How often the quota held the processes back: periods with work, and of those, the ones
/// in which they used up their share and waited (`cpu.stat`).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Throttling {
    /// Periods in which the cgroup ran.
    pub periods: u64,
    /// Of those, periods in which it used its whole quota and was held back.
    pub throttled: u64,
}

impl Throttling {
    /// The share of the periods since `before` in which the processes were held back; `None`
    /// without a period since.
    pub fn share_since(&self, before: Throttling) -> Option<f64> {
        let periods = self.periods.checked_sub(before.periods)?;
        let throttled = self.throttled.checked_sub(before.throttled)?;
        (periods > 0).then(|| throttled as f64 / periods as f64)
    }
}

/// The cgroup layout found.
#[derive(Debug, Clone, PartialEq, Eq)]
enum Hierarchy {
    /// Unified (v2) hierarchy at this directory, with the `cpu` controller.
    V2(PathBuf),
    /// The v1 `cpu` hierarchy at this directory.
    V1(PathBuf),
}

/// Checks a budget against [`BUDGET_RANGE`]; the error names the flag and the rule.
pub fn check_cpus(cpus: f64) -> Result<(), String> {
    if BUDGET_RANGE.contains(&cpus) {
        return Ok(());
    }
    Err(format!(
        "--proxy-cpus must be from {} to {} CPUs (a share of one CPU), not {cpus}",
        BUDGET_RANGE.start(),
        BUDGET_RANGE.end()
    ))
}

impl CpuBudget {
    /// A new cgroup named `name` holding its processes to `cpus` CPUs.
    pub fn create(name: &str, cpus: f64) -> Result<CpuBudget, BenchError> {
        Self::create_in(Path::new(CGROUP_ROOT), name, cpus)
    }

    fn create_in(root: &Path, name: &str, cpus: f64) -> Result<CpuBudget, BenchError> {
        check_cpus(cpus).map_err(BenchError::Usage)?;
        let hierarchy = find_hierarchy(root).ok_or_else(|| {
            BenchError::Setup(format!(
                "--proxy-cpus needs the cgroup `cpu` controller (cgroup v2 with `cpu` in {root}/cgroup.controllers, or a v1 `cpu` hierarchy at {root}/cpu), writable by this user (root)",
                root = root.display()
            ))
        })?;
        let base = match &hierarchy {
            Hierarchy::V2(base) | Hierarchy::V1(base) => base,
        };
        remove_stale(base, Path::new("/proc"));
        let period = PERIOD.as_micros() as u64;
        let quota = (cpus * period as f64).round() as u64;
        let (parent, dir) = match &hierarchy {
            Hierarchy::V2(base) | Hierarchy::V1(base) => (base.clone(), base.join(name)),
        };
        if let Hierarchy::V2(base) = &hierarchy {
            // The controller must be on for the root's children; writing it again is harmless.
            write(&base.join("cgroup.subtree_control"), "+cpu")?;
        }
        fs::create_dir(&dir).map_err(|error| setup_error("create the cgroup", &dir, &error))?;
        let budget = CpuBudget { dir, parent, cpus };
        match hierarchy {
            Hierarchy::V2(_) => write(&budget.dir.join("cpu.max"), &format!("{quota} {period}"))?,
            Hierarchy::V1(_) => {
                write(&budget.dir.join("cpu.cfs_period_us"), &period.to_string())?;
                write(&budget.dir.join("cpu.cfs_quota_us"), &quota.to_string())?;
            }
        }
        Ok(budget)
    }

    /// The budget, in CPUs.
    pub fn cpus(&self) -> f64 {
        self.cpus
    }

    /// `spec`, started inside the cgroup ([`Spec::in_cgroup`]): the program starts as it
    /// would in a container with this CPU limit (herd-gateway then picks its serving threads
    /// for the budget, as for a container's).
    pub fn start_inside(&self, spec: Spec) -> Spec {
        spec.in_cgroup(&self.dir.join("cgroup.procs"))
    }

    /// The quota's effect so far; `None` where `cpu.stat` cannot be read.
    pub fn throttling(&self) -> Option<Throttling> {
        let stat = fs::read_to_string(self.dir.join("cpu.stat")).ok()?;
        parse_throttling(&stat)
    }
}

impl Drop for CpuBudget {
    fn drop(&mut self) {
        // A process killed just before may not have left yet: move what is left to the parent,
        // then remove the (then empty) cgroup, trying for a moment.
        for attempt in 0..50 {
            let procs = fs::read_to_string(self.dir.join("cgroup.procs")).unwrap_or_default();
            for pid in procs.split_whitespace() {
                let _ = fs::write(self.parent.join("cgroup.procs"), pid);
            }
            match fs::remove_dir(&self.dir) {
                Ok(()) => return,
                Err(error) if error.kind() == io::ErrorKind::NotFound => return,
                // Still has a task (EBUSY): a killed process on its way out.
                Err(error) if error.kind() == io::ErrorKind::ResourceBusy && attempt < 49 => {
                    std::thread::sleep(Duration::from_millis(20));
                }
                Err(error) => {
                    eprintln!(
                        "herd bench: cannot remove the cgroup {}: {error}",
                        self.dir.display()
                    );
                    return;
                }
            }
        }
    }
}

/// Names of the cgroups a bench makes: `herd-bench-PID-…` (this module's callers) and
/// `herd-ab-PID-…` (`infra/bench/ab-gateways.sh CPUS=`).
const OURS: [&str; 2] = ["herd-bench-", "herd-ab-"];

/// A cgroup of ours is only taken for a killed bench's once it is this old: a bench fills its
/// cgroups within a second of making them, and one in another PID namespace (a container sharing
/// this cgroup tree) has a PID that `proc` does not show, so its fresh, still empty cgroups must
/// not look abandoned.
const STALE_AFTER: Duration = Duration::from_secs(60);

/// Removes the empty cgroups under `base` left by benches that were killed before they could
/// (SIGKILL): ours by name, whose PID has no process in `proc` any more, made at least
/// [`STALE_AFTER`] ago. One whose PID is alive, a younger one, another's name, or one with
/// processes left is not touched.
fn remove_stale(base: &Path, proc: &Path) {
    let Ok(entries) = fs::read_dir(base) else {
        return;
    };
    for entry in entries.flatten() {
        let name = entry.file_name();
        let Some(pid) = name.to_str().and_then(|name| {
            let rest = OURS.iter().find_map(|prefix| name.strip_prefix(prefix))?;
            let pid = rest.split('-').next()?;
            pid.parse::<u32>().ok()
        }) else {
            continue;
        };
        if proc.join(pid.to_string()).exists() {
            continue;
        }
        let age = (entry.metadata().and_then(|meta| meta.modified()))
            .map(|made| made.elapsed().unwrap_or_default());
        if age.is_ok_and(|age| age < STALE_AFTER) {
            continue;
        }
        // `remove_dir` of a cgroup fails while it has processes (EBUSY): those stay.
        match fs::remove_dir(entry.path()) {
            Ok(()) => eprintln!(
                "herd bench: removed the cgroup {} left by an earlier bench",
                entry.path().display()
            ),
            Err(error) => eprintln!(
                "herd bench: cannot remove the cgroup {} left by an earlier bench: {error}",
                entry.path().display()
            ),
        }
    }
}

/// Whether this process can make a CPU budget here: a `cpu` hierarchy in which it may create a
/// cgroup (tried with an empty one); the error says why not. For tests that need the kernel.
pub fn can_be_made() -> Result<(), String> {
    let root = Path::new(CGROUP_ROOT);
    let base = match find_hierarchy(root) {
        Some(Hierarchy::V2(base)) => {
            // A budget turns the controller on for the root's children: try that too.
            let control = base.join("cgroup.subtree_control");
            fs::write(&control, "+cpu").map_err(|e| format!("{}: {e}", control.display()))?;
            base
        }
        Some(Hierarchy::V1(base)) => base,
        None => return Err(format!("no cgroup cpu controller under {CGROUP_ROOT}")),
    };
    let probe = base.join(format!("herd-probe-{}", std::process::id()));
    fs::create_dir(&probe)
        .and_then(|()| fs::remove_dir(&probe))
        .map_err(|error| format!("{}: {error}", probe.display()))
}

/// The cgroup layout under `root` that has the `cpu` controller, v2 first.
fn find_hierarchy(root: &Path) -> Option<Hierarchy> {
    let controllers = fs::read_to_string(root.join("cgroup.controllers")).unwrap_or_default();
    if controllers.split_whitespace().any(|c| c == "cpu") {
        return Some(Hierarchy::V2(root.to_path_buf()));
    }
    // v1: `cpu` on its own, or mounted together with `cpuacct`.
    ["cpu", "cpu,cpuacct", "cpuacct,cpu"]
        .iter()
        .map(|name| root.join(name))
        .find(|dir| dir.join("cpu.cfs_quota_us").exists())
        .map(Hierarchy::V1)
}

/// `nr_periods` and `nr_throttled` of a `cpu.stat` (the same keys in v1 and v2).
fn parse_throttling(stat: &str) -> Option<Throttling> {
    let value = |key: &str| {
        stat.lines()
            .find_map(|line| line.strip_prefix(key)?.strip_prefix(' '))
            .and_then(|value| value.trim().parse().ok())
    };
    Some(Throttling {
        periods: value("nr_periods")?,
        throttled: value("nr_throttled")?,
    })
}

fn write(path: &Path, value: &str) -> Result<(), BenchError> {
    fs::write(path, value).map_err(|error| setup_error("write", path, &error))
}

/// A cgroup that cannot be set up: what failed, and what `--proxy-cpus` needs.
fn setup_error(what: &str, path: &Path, error: &io::Error) -> BenchError {
    BenchError::Setup(format!(
        "--proxy-cpus: cannot {what} {}: {error} (needs root, and a cgroup hierarchy with the `cpu` controller in which this process may create children)",
        path.display()
    ))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn v2_layout_gets_cpu_max() {
        let root = tempfile::tempdir().unwrap();
        fs::write(
            root.path().join("cgroup.controllers"),
            "cpuset cpu io memory pids\n",
        )
        .unwrap();
        let budget = CpuBudget::create_in(root.path(), "bench-v2", 0.25).unwrap();
        let dir = root.path().join("bench-v2");
        assert_eq!(
            fs::read_to_string(dir.join("cpu.max")).unwrap(),
            "2500 10000"
        );
        assert_eq!(
            fs::read_to_string(root.path().join("cgroup.subtree_control")).unwrap(),
            "+cpu"
        );
        let spec = budget.start_inside(Spec::new("p", "/bin/true", root.path()).arg("x"));
        assert_eq!(spec.program, Path::new("sh"));
        assert_eq!(spec.args[2], dir.join("cgroup.procs").display().to_string());
        assert_eq!(&spec.args[3..], ["/bin/true", "x"]);
        assert_eq!(budget.cpus(), 0.25);
        // Not a cgroup: its files would stop the removal.
        std::mem::forget(budget);
    }

    #[test]
    fn v1_layout_gets_period_and_quota() {
        let root = tempfile::tempdir().unwrap();
        let cpu = root.path().join("cpu,cpuacct");
        fs::create_dir(&cpu).unwrap();
        fs::write(cpu.join("cpu.cfs_quota_us"), "-1").unwrap();
        let budget = CpuBudget::create_in(root.path(), "bench-v1", 0.1).unwrap();
        let dir = cpu.join("bench-v1");
        assert_eq!(
            fs::read_to_string(dir.join("cpu.cfs_period_us")).unwrap(),
            "10000"
        );
        // The kernel's smallest quota, 1 ms, is the smallest budget.
        assert_eq!(
            fs::read_to_string(dir.join("cpu.cfs_quota_us")).unwrap(),
            "1000"
        );
        std::mem::forget(budget);
    }

    #[test]
    fn cgroups_left_by_a_killed_bench_are_removed_and_no_others() {
        let root = tempfile::tempdir().unwrap();
        let proc = tempfile::tempdir().unwrap();
        fs::create_dir(proc.path().join("4242")).unwrap();
        let cpu = root.path().join("cpu");
        fs::create_dir(&cpu).unwrap();
        fs::write(cpu.join("cpu.cfs_quota_us"), "-1").unwrap();
        for name in [
            "herd-bench-777-herd",     // a dead bench's: removed
            "herd-ab-778-0",           // a dead ab-gateways.sh's: removed
            "herd-bench-4242-nginx",   // a running bench's: kept
            "someone-else-777",        // not ours: kept
            "herd-bench-notapid-herd", // not ours either: kept
        ] {
            fs::create_dir(cpu.join(name)).unwrap();
        }
        // A dead bench's cgroup that still holds something (a real cgroup with processes
        // refuses removal the same way): kept, and the sweep goes on.
        fs::create_dir(cpu.join("herd-bench-779-haproxy")).unwrap();
        fs::write(cpu.join("herd-bench-779-haproxy/cgroup.procs"), "1234").unwrap();
        // Everything above was made two minutes ago; one made just now, by a bench whose PID
        // this namespace does not show (another container's): kept.
        let earlier = std::time::SystemTime::now() - Duration::from_secs(120);
        for entry in fs::read_dir(&cpu).unwrap() {
            let path = entry.unwrap().path();
            if path.is_dir() {
                fs::File::open(&path)
                    .unwrap()
                    .set_modified(earlier)
                    .unwrap();
            }
        }
        fs::create_dir(cpu.join("herd-bench-780-herd")).unwrap();

        remove_stale(&cpu, proc.path());

        let mut left: Vec<String> = fs::read_dir(&cpu)
            .unwrap()
            .map(|entry| entry.unwrap().file_name().into_string().unwrap())
            .filter(|name| name != "cpu.cfs_quota_us")
            .collect();
        left.sort();
        assert_eq!(
            left,
            [
                "herd-bench-4242-nginx",
                "herd-bench-779-haproxy",
                "herd-bench-780-herd",
                "herd-bench-notapid-herd",
                "someone-else-777"
            ]
        );
    }

    #[test]
    fn no_cpu_controller_or_a_budget_out_of_range_is_a_clear_error() {
        let root = tempfile::tempdir().unwrap();
        fs::write(root.path().join("cgroup.controllers"), "memory pids\n").unwrap();
        let error = CpuBudget::create_in(root.path(), "x", 0.5).unwrap_err();
        assert!(
            error.to_string().contains("cgroup `cpu` controller"),
            "{error}"
        );
        for cpus in [0.0, 0.05, 0.099, 1.5, f64::NAN] {
            let error = CpuBudget::create_in(root.path(), "x", cpus).unwrap_err();
            assert!(
                error.to_string().contains("--proxy-cpus must be"),
                "{error}"
            );
        }
    }

    #[test]
    fn throttling_is_read_from_cpu_stat() {
        let v2 = "usage_usec 100\nuser_usec 60\nsystem_usec 40\nnr_periods 120\nnr_throttled 30\nthrottled_usec 9000\n";
        assert_eq!(
            parse_throttling(v2),
            Some(Throttling {
                periods: 120,
                throttled: 30
            })
        );
        let v1 = "nr_periods 7\nnr_throttled 0\nthrottled_time 0\nnr_bursts 0\n";
        assert_eq!(
            parse_throttling(v1),
            Some(Throttling {
                periods: 7,
                throttled: 0
            })
        );
        assert_eq!(parse_throttling("nr_periods_x 1\n"), None);
        let before = Throttling {
            periods: 100,
            throttled: 10,
        };
        let after = Throttling {
            periods: 300,
            throttled: 160,
        };
        assert_eq!(after.share_since(before), Some(0.75));
        assert_eq!(before.share_since(before), None);
        assert_eq!(before.share_since(after), None);
    }

    /// On this machine's real cgroups (skipped, saying why, where [`can_be_made`] says no): a
    /// spinning process held to a tenth of a CPU gets no more, and the cgroup is gone after the
    /// drop.
    #[test]
    fn the_kernel_holds_a_spinning_process_to_its_budget() {
        if let Err(why) = can_be_made() {
            eprintln!("SKIPPED: no CPU budget can be made here: {why}");
            return;
        }
        let name = format!("herd-test-{}", std::process::id());
        let dir = tempfile::tempdir().unwrap();
        let budget = CpuBudget::create(&name, 0.1).unwrap();
        let spinner = crate::process::Process::spawn(
            &budget.start_inside(
                Spec::new("spin", "sh", dir.path())
                    .arg("-c")
                    .arg("while :; do :; done"),
            ),
        )
        .unwrap();
        std::thread::sleep(Duration::from_millis(200));
        let held = fs::read_to_string(budget.dir.join("cgroup.procs")).unwrap();
        assert_eq!(
            held.trim(),
            spinner.pid().to_string(),
            "the program runs in the cgroup"
        );
        let before = super::super::sample::group_usage(spinner.pid()).cpu_seconds;
        let started = std::time::Instant::now();
        std::thread::sleep(Duration::from_secs(2));
        let used = super::super::sample::group_usage(spinner.pid()).cpu_seconds - before;
        let elapsed = started.elapsed().as_secs_f64();
        // Unheld it would take a whole CPU; held, a tenth (plus a tick of rounding either side).
        assert!(
            used <= 0.1 * elapsed + 0.05,
            "{used} s of CPU in {elapsed} s"
        );
        let throttling = budget.throttling().unwrap();
        assert!(throttling.throttled > 0, "{throttling:?}");
        let cgroup = budget.dir.clone();
        drop(spinner);
        drop(budget);
        assert!(!cgroup.exists(), "{} left behind", cgroup.display());
    }
}
