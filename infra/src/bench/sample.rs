//! CPU time and memory of a process and everything it started, read from `/proc`.
//!
//! A measured program is every process in its process group (herd starts each program as the
//! leader of its own group): nginx's master and worker, HAProxy, the gateway. CPU time is the
//! run time the scheduler counted for each thread, in nanoseconds (the first field of
//! `/proc/PID/task/TID/schedstat`), summed over the group; the kernel's part of it (`stime`) only
//! exists in clock ticks (`/proc/PID/stat`, 10 ms), so it is read from there. `utime + stime` are
//! ticks too, and a tick is a real error at light load: 400 req/s for 10 s costs a proxy about
//! 0.2 s of CPU, so a tick is 5 % of it, where the scheduler's count is exact. Where a process's
//! threads cannot be read, its `utime + stime` stand in.
//! RSS is `VmRSS` of `/proc/PID/status`, and the peak `VmHWM`, each summed over the group.
//! A process or thread that exits between two samples takes its CPU time with it; the programs
//! measured here keep their processes and threads for the whole run. A load generator, which exits at the end of its
//! run, is measured once it has been waited for: the kernel then adds its CPU time (and its own
//! waited-for children's) to `cutime + cstime` of this process ([`reaped_children_seconds`]).
//! That reading is the generator's alone because nothing else herd started exits and is waited
//! for during a run (the proxies and upstreams run on; nginx's master waits for its workers).

use std::fs;

/// Clock ticks per second of `/proc/PID/stat` times. Linux reports them in USER_HZ, which is 100
/// on every architecture herd runs on (`getconf CLK_TCK`).
const TICKS_PER_SECOND: f64 = 100.0;

/// One reading of a process group.
#[derive(Debug, Clone, Copy, Default, PartialEq)]
pub struct Usage {
    /// User + system CPU seconds so far, summed over the group.
    pub cpu_seconds: f64,
    /// Of those, system (kernel) CPU seconds.
    pub system_seconds: f64,
    /// Resident memory now, KiB, summed over the group.
    pub rss_kib: u64,
    /// Peak resident memory, KiB, summed over the group (each process's own peak).
    pub peak_kib: u64,
    /// How many processes the group has.
    pub processes: usize,
}

/// Reads the usage of process group `group` (the pid of its leader).
pub fn group_usage(group: u32) -> Usage {
    groups_usage(&[group])[0]
}

/// Reads the usage of each of `groups` (the pids of their leaders), in one pass over `/proc`.
pub fn groups_usage(groups: &[u32]) -> Vec<Usage> {
    let mut usages = vec![Usage::default(); groups.len()];
    let Ok(entries) = fs::read_dir("/proc") else {
        return usages;
    };
    for entry in entries.flatten() {
        let Some(pid) = entry
            .file_name()
            .to_str()
            .and_then(|n| n.parse::<u32>().ok())
        else {
            continue;
        };
        let Ok(stat) = fs::read_to_string(format!("/proc/{pid}/stat")) else {
            continue;
        };
        let Some(fields) = parse_stat(&stat) else {
            continue;
        };
        let Some(index) = groups.iter().position(|&group| group == fields.pgrp) else {
            continue;
        };
        let usage = &mut usages[index];
        usage.processes += 1;
        usage.cpu_seconds +=
            threads_run_seconds(pid).unwrap_or(fields.ticks as f64 / TICKS_PER_SECOND);
        usage.system_seconds += fields.system_ticks as f64 / TICKS_PER_SECOND;
        if let Ok(status) = fs::read_to_string(format!("/proc/{pid}/status")) {
            usage.rss_kib += status_kib(&status, "VmRSS:").unwrap_or(0);
            usage.peak_kib += status_kib(&status, "VmHWM:").unwrap_or(0);
        }
    }
    usages
}

/// The run time of every thread of process `pid`, summed, in seconds: the scheduler's own count,
/// to the nanosecond. `None` where no thread could be read (the process is gone, or the kernel
/// has no `schedstat`).
fn threads_run_seconds(pid: u32) -> Option<f64> {
    let tasks = fs::read_dir(format!("/proc/{pid}/task")).ok()?;
    let mut nanoseconds = None;
    for task in tasks.flatten() {
        let Ok(schedstat) = fs::read_to_string(task.path().join("schedstat")) else {
            continue;
        };
        if let Some(run) = schedstat_run_nanoseconds(&schedstat) {
            *nanoseconds.get_or_insert(0u64) += run;
        }
    }
    nanoseconds.map(|ns| ns as f64 / 1e9)
}

/// The first field of a `schedstat` line (`run_ns wait_ns timeslices`): time spent running.
fn schedstat_run_nanoseconds(schedstat: &str) -> Option<u64> {
    schedstat.split_whitespace().next()?.parse().ok()
}

/// CPU seconds of this process's children that have exited and been waited for, so far.
/// `None` where `/proc/self/stat` cannot be read.
pub fn reaped_children_seconds() -> Option<f64> {
    let stat = fs::read_to_string("/proc/self/stat").ok()?;
    Some(parse_stat(&stat)?.children_ticks as f64 / TICKS_PER_SECOND)
}

/// The fields of `/proc/PID/stat` herd needs.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct StatFields {
    /// Process group id (field 5).
    pgrp: u32,
    /// utime + stime (fields 14 and 15), clock ticks.
    ticks: u64,
    /// stime (field 15), clock ticks.
    system_ticks: u64,
    /// cutime + cstime (fields 16 and 17): waited-for children's, clock ticks.
    children_ticks: u64,
}

/// Parses `/proc/PID/stat`. The command name (field 2) is in parentheses and may itself contain
/// spaces and parentheses, so fields are counted after its last `)`.
fn parse_stat(stat: &str) -> Option<StatFields> {
    let after = &stat[stat.rfind(')')? + 1..];
    // After the name: state (3), ppid (4), pgrp (5), …, utime (14), stime (15), cutime (16),
    // cstime (17).
    let fields: Vec<&str> = after.split_whitespace().collect();
    let field = |number: usize| fields.get(number - 3).and_then(|f| f.parse::<u64>().ok());
    Some(StatFields {
        pgrp: u32::try_from(field(5)?).ok()?,
        ticks: field(14)? + field(15)?,
        system_ticks: field(15)?,
        children_ticks: field(16)? + field(17)?,
    })
}

/// A `kB` line of `/proc/PID/status`, e.g. `VmRSS:   12345 kB` (a tab after the colon).
fn status_kib(status: &str, key: &str) -> Option<u64> {
    status
        .lines()
        .find_map(|line| line.strip_prefix(key))
        .and_then(|rest| rest.split_whitespace().next())
        .and_then(|number| number.parse().ok())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn stat_fields_survive_odd_command_names() {
        let stat = "4242 (nginx: worker (x) ) S 4241 4241 4241 0 -1 4194624 120 0 0 0 37 12 5 3 20 0 1 0 100 1000 50 18446744073709551615";
        assert_eq!(
            parse_stat(stat),
            Some(StatFields {
                pgrp: 4241,
                ticks: 49,
                system_ticks: 12,
                children_ticks: 8,
            })
        );
        assert_eq!(parse_stat("garbage"), None);
    }

    #[test]
    fn schedstat_gives_the_run_time() {
        assert_eq!(
            schedstat_run_nanoseconds("123456789 2000 37\n"),
            Some(123_456_789)
        );
        assert_eq!(schedstat_run_nanoseconds(""), None);
        assert_eq!(schedstat_run_nanoseconds("x 1 2"), None);
    }

    #[test]
    fn status_lines_in_kib() {
        let status = "Name:\tnginx\nVmHWM:\t    9000 kB\nVmRSS:\t    8123 kB\n";
        assert_eq!(status_kib(status, "VmRSS:"), Some(8123));
        assert_eq!(status_kib(status, "VmHWM:"), Some(9000));
        assert_eq!(status_kib(status, "VmSwap:"), None);
    }

    #[test]
    fn own_group_is_measured() {
        // The test runner is not necessarily a group leader; a child started in its own group is.
        let dir = tempfile::tempdir().unwrap();
        let process = crate::process::Process::spawn(
            &crate::process::Spec::new("spin", "sh", dir.path())
                .arg("-c")
                .arg("i=0; while [ $i -lt 200000 ]; do i=$((i+1)); done; sleep 5"),
        )
        .unwrap();
        std::thread::sleep(std::time::Duration::from_millis(300));
        let usage = group_usage(process.pid());
        assert!(usage.processes >= 1, "{usage:?}");
        // Counting to 200 000 in a shell takes tens of milliseconds of CPU, which the scheduler
        // counts to the nanosecond: not the whole ticks of `/proc/PID/stat`.
        let stat = std::fs::read_to_string(format!("/proc/{}/stat", process.pid())).unwrap();
        let ticks = parse_stat(&stat).unwrap().ticks as f64 / TICKS_PER_SECOND;
        assert!(usage.cpu_seconds > 0.005, "{usage:?}");
        assert!(
            (usage.cpu_seconds - ticks).abs() > 1e-9,
            "{usage:?} {ticks}"
        );
        assert!(usage.rss_kib > 0, "{usage:?}");
        assert!(usage.peak_kib >= usage.rss_kib, "{usage:?}");
    }

    #[test]
    fn a_waited_for_child_counts_in_reaped_children() {
        let dir = tempfile::tempdir().unwrap();
        let before = reaped_children_seconds().unwrap();
        let status = std::process::Command::new("sh")
            .arg("-c")
            .arg("i=0; while [ $i -lt 600000 ]; do i=$((i+1)); done")
            .current_dir(dir.path())
            .status()
            .unwrap();
        assert!(status.success());
        let spent = reaped_children_seconds().unwrap() - before;
        // A shell counting to 600 000 spends a fifth of a second or more of CPU (dash, 2026).
        assert!(spent >= 0.05, "{spent}");
    }
}
