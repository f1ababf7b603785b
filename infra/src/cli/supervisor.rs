//! The local cluster's supervisor: restarts a worker or gateway that dies, with exponential
//! backoff, and reports a crash loop instead of hiding it.
//!
//! It works from the state file alone (the processes it watches may have been started by
//! `herd up`, `herd scale` or `herd rollout`, which record how to start each one again), so the
//! same loop runs inside a foreground `herd up` and as the background `herd supervise` that
//! `herd up --detach` leaves. A member taken out of the state file (scale down, rollout) is no
//! longer watched: that is how the other commands stop a process without it coming back.
//!
//! Policy ([`Backoff`]): the first restart 0.5 s after the death, doubling up to 30 s; a member
//! that has run for [`STABLE_AFTER`] starts again from 0.5 s. [`CRASH_LOOP_RESTARTS`] restarts
//! within [`CRASH_LOOP_WINDOW`] make a crash loop: one log line with the tail of the member's
//! log, the `crash_loop` flag in the state file (which `herd status` shows), and restarts go on
//! at the backoff's pace, since a loop caused by something outside (Redis down, a port taken)
//! heals by itself once that is fixed.

use std::collections::{HashMap, VecDeque};
use std::time::{Duration, Instant};

use nix::sys::wait::{WaitPidFlag, WaitStatus, waitpid};
use nix::unistd::Pid;

use super::CliError;
use super::signals::StopSignal;
use crate::pid::ProcessId;
use crate::process::Process;
use crate::state::{Kind, StateDir};

/// First restart delay.
pub(crate) const FIRST_DELAY: Duration = Duration::from_millis(500);
/// Longest restart delay.
pub(crate) const MAX_DELAY: Duration = Duration::from_secs(30);
/// A member that ran this long counts as healthy again: its next restart waits [`FIRST_DELAY`].
pub(crate) const STABLE_AFTER: Duration = Duration::from_secs(10);
/// Restarts within [`CRASH_LOOP_WINDOW`] that make a crash loop.
pub(crate) const CRASH_LOOP_RESTARTS: usize = 3;
/// See [`CRASH_LOOP_RESTARTS`].
pub(crate) const CRASH_LOOP_WINDOW: Duration = Duration::from_secs(60);
/// How often the supervisor looks at its members.
const TICK: Duration = Duration::from_millis(200);
/// How long the supervisor goes on without a state file before it exits.
const ORPHAN_AFTER: Duration = Duration::from_secs(5);
/// Log lines quoted when a crash loop is reported.
const TAIL_LINES: usize = 10;

/// The restart schedule of one member: a pure state machine fed with observations and the time,
/// so the policy is tested without processes or clocks.
#[derive(Debug, Clone)]
pub(crate) struct Backoff {
    /// Delay before the next restart.
    delay: Duration,
    /// When the member was last seen dead for the first time (`None` while it runs).
    down_since: Option<Instant>,
    /// When it was last (re)started.
    started: Instant,
    /// Recent restarts, for the crash-loop window.
    recent: VecDeque<Instant>,
    /// Whether the current crash loop has been reported.
    in_loop: bool,
}

/// What [`Backoff::observe`] decides.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Decision {
    /// Nothing to do (running, or waiting out the delay).
    Wait,
    /// Start it again now.
    Restart,
}

impl Backoff {
    /// A member started at `now`.
    pub(crate) fn new(now: Instant) -> Self {
        Backoff {
            delay: FIRST_DELAY,
            down_since: None,
            started: now,
            recent: VecDeque::new(),
            in_loop: false,
        }
    }

    /// One look at the member at `now`.
    pub(crate) fn observe(&mut self, running: bool, now: Instant) -> Decision {
        if running {
            self.down_since = None;
            if now.duration_since(self.started) >= STABLE_AFTER {
                self.delay = FIRST_DELAY;
                self.in_loop = false;
            }
            return Decision::Wait;
        }
        let since = *self.down_since.get_or_insert(now);
        if now.duration_since(since) >= self.delay {
            Decision::Restart
        } else {
            Decision::Wait
        }
    }

    /// Records a restart at `now`; returns true when this restart starts a crash loop (reported
    /// once per loop).
    pub(crate) fn restarted(&mut self, now: Instant) -> bool {
        self.down_since = None;
        self.started = now;
        self.delay = (self.delay * 2).min(MAX_DELAY);
        self.recent.push_back(now);
        while self
            .recent
            .front()
            .is_some_and(|at| now.duration_since(*at) > CRASH_LOOP_WINDOW)
        {
            self.recent.pop_front();
        }
        if self.recent.len() >= CRASH_LOOP_RESTARTS && !self.in_loop {
            self.in_loop = true;
            return true;
        }
        false
    }

    /// Whether the member is in a crash loop now.
    pub(crate) fn in_loop(&self) -> bool {
        self.in_loop
    }

    /// The delay before the next restart.
    pub(crate) fn delay(&self) -> Duration {
        self.delay
    }
}

/// Watches the members recorded in a state directory and restarts the ones that die.
#[derive(Debug)]
pub(crate) struct Supervisor {
    dir: StateDir,
    schedules: HashMap<String, Backoff>,
    redis_reported: bool,
}

impl Supervisor {
    /// A supervisor of the cluster recorded in `dir`.
    pub(crate) fn new(dir: StateDir) -> Self {
        Supervisor {
            dir,
            schedules: HashMap::new(),
            redis_reported: false,
        }
    }

    /// Supervises until a stop signal arrives, or the state file has been gone for
    /// [`ORPHAN_AFTER`] (its cluster was stopped or never recorded: nothing left to watch);
    /// returns why it stopped.
    pub(crate) async fn run(&mut self, stop: &mut StopSignal) -> &'static str {
        let mut tick = tokio::time::interval(TICK);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        let mut missing_since: Option<Instant> = None;
        loop {
            tokio::select! {
                signal = stop.wait() => return signal,
                _ = tick.tick() => {
                    let now = Instant::now();
                    if !self.dir.state_file().exists() {
                        if now.duration_since(*missing_since.get_or_insert(now)) >= ORPHAN_AFTER {
                            return "the state file's removal";
                        }
                        continue;
                    }
                    missing_since = None;
                    if let Err(error) = self.check(now) {
                        super::warn(format!("herd: supervisor: {error}"));
                    }
                }
            }
        }
    }

    /// One round: reap children, restart what is due, report what needs saying.
    pub(crate) fn check(&mut self, now: Instant) -> Result<(), CliError> {
        reap_children();
        let mut lines = Vec::new();
        let schedules = &mut self.schedules;
        let redis_reported = &mut self.redis_reported;
        self.dir.update(|state| {
            schedules.retain(|name, _| state.members.iter().any(|m| &m.name == name));
            for member in &mut state.members {
                match member.kind {
                    Kind::Worker | Kind::Gateway => {}
                    Kind::Redis => {
                        if !member.process.is_running() && !*redis_reported {
                            *redis_reported = true;
                            lines.push(format!(
                                "redis (pid {}) exited; the workers and gateways keep running without it (sessions and the registry are unavailable); see {}",
                                member.process.pid,
                                member.log.as_ref().map(|l| l.display().to_string()).unwrap_or_default()
                            ));
                        }
                        continue;
                    }
                    Kind::Supervisor => continue,
                }
                let Some(spec) = member.spec.clone() else {
                    continue;
                };
                let schedule = schedules
                    .entry(member.name.clone())
                    .or_insert_with(|| Backoff::new(now));
                let running = member.process.is_running();
                let decision = schedule.observe(running, now);
                if running {
                    member.supervision.crash_loop = schedule.in_loop();
                    continue;
                }
                if decision == Decision::Wait {
                    continue;
                }
                let dead = member.process.pid;
                match Process::spawn_appending(&spec) {
                    Ok(process) => {
                        let pid = process.detach();
                        member.process = ProcessId::of(pid);
                        member.supervision.restarts += 1;
                        member.supervision.last_restart_at = Some(crate::state::now_unix());
                        let looping = schedule.restarted(now);
                        member.supervision.crash_loop = schedule.in_loop();
                        tracing::info!(member = %member.name, old_pid = dead, pid, "restarted");
                        lines.push(format!(
                            "{} (pid {dead}) had exited; restarted it as pid {pid} (restart {}; next one waits {})",
                            member.name,
                            member.supervision.restarts,
                            humantime::format_duration(schedule.delay())
                        ));
                        if looping {
                            lines.push(format!(
                                "{} is crash-looping: {} restarts within {}; it is restarted every {} at most; last lines of {}:\n{}",
                                member.name,
                                CRASH_LOOP_RESTARTS,
                                humantime::format_duration(CRASH_LOOP_WINDOW),
                                humantime::format_duration(MAX_DELAY),
                                member.log.as_ref().map(|l| l.display().to_string()).unwrap_or_default(),
                                member.log.as_ref().map(|l| tail(l)).unwrap_or_default()
                            ));
                        }
                    }
                    Err(error) => {
                        schedule.restarted(now);
                        lines.push(format!("{}: restart failed: {error}", member.name));
                    }
                }
            }
        })?;
        for line in lines {
            super::warn(format!("herd: {line}"));
        }
        Ok(())
    }
}

/// Reaps every child that has exited (restarted members are this process's children; nobody
/// else waits for them), so they don't linger as zombies.
fn reap_children() {
    for _ in 0..1024 {
        match waitpid(Pid::from_raw(-1), Some(WaitPidFlag::WNOHANG)) {
            Ok(WaitStatus::StillAlive) | Err(_) => return,
            Ok(_) => {}
        }
    }
}

fn tail(path: &std::path::Path) -> String {
    let text = std::fs::read_to_string(path).unwrap_or_default();
    let lines: Vec<&str> = text.lines().collect();
    lines[lines.len().saturating_sub(TAIL_LINES)..].join("\n")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn restarts_back_off_exponentially_up_to_the_cap() {
        let start = Instant::now();
        let mut backoff = Backoff::new(start);
        let mut now = start + Duration::from_secs(1);
        let mut delays = Vec::new();
        for _ in 0..10 {
            // Seen dead now: waits the delay, then restarts.
            assert_eq!(
                backoff.observe(false, now),
                Decision::Wait.max_if(backoff.delay())
            );
            let delay = backoff.delay();
            delays.push(delay);
            assert_eq!(
                backoff.observe(false, now + delay - Duration::from_millis(1)),
                Decision::Wait
            );
            now += delay;
            assert_eq!(backoff.observe(false, now), Decision::Restart);
            backoff.restarted(now);
            now += Duration::from_millis(100);
        }
        let ms: Vec<u128> = delays.iter().map(Duration::as_millis).collect();
        assert_eq!(
            ms,
            [
                500, 1000, 2000, 4000, 8000, 16000, 30000, 30000, 30000, 30000
            ]
        );
    }

    #[test]
    fn a_crash_loop_is_reported_once_and_clears_after_a_stable_run() {
        let start = Instant::now();
        let mut backoff = Backoff::new(start);
        let mut now = start;
        let mut reports = 0;
        for _ in 0..5 {
            now += Duration::from_secs(1);
            if backoff.restarted(now) {
                reports += 1;
            }
        }
        assert_eq!(reports, 1);
        assert!(backoff.in_loop());
        // Running for long enough ends the loop and resets the delay.
        assert_eq!(backoff.observe(true, now + STABLE_AFTER), Decision::Wait);
        assert!(!backoff.in_loop());
        assert_eq!(backoff.delay(), FIRST_DELAY);
    }

    #[test]
    fn restarts_spread_beyond_the_window_are_no_loop() {
        let start = Instant::now();
        let mut backoff = Backoff::new(start);
        let mut now = start;
        for _ in 0..5 {
            now += CRASH_LOOP_WINDOW;
            assert!(!backoff.restarted(now));
        }
        assert!(!backoff.in_loop());
    }

    impl Decision {
        /// The first look at a dead member restarts it only with a zero delay.
        fn max_if(self, delay: Duration) -> Decision {
            if delay.is_zero() {
                Decision::Restart
            } else {
                self
            }
        }
    }
}
