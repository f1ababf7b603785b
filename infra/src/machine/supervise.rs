//! herd's fallback supervisor, for machines without systemd (or where herd is not root): a
//! POSIX `sh` loop started with `setsid nohup`, one per unit, that runs the unit's executable,
//! restarts it when it exits on its own (1 s, doubling to 30 s; the delay resets after 10 s of
//! running; `HERD_RESTART_DELAY` in the unit's environment sets the first delay), and gives up after 5 quick exits in a row, writing "crash loop" to the unit's log
//! and `run/{unit}.state` — reported, not hidden. Its pid is in `run/{unit}.pid`, the running
//! child's in `run/{unit}.child`. SIGTERM to the loop is passed on to the child, whose drain it
//! then waits for.

use std::time::Duration;

use super::{Launch, Machine, MachineError, Stopped, quote};

/// The supervisor script, installed as `{dir}/herd-supervise.sh`.
pub const SCRIPT: &str = r#"#!/bin/sh
# herd's fallback supervisor (see infra/src/machine/supervise.rs): herd-supervise.sh DIR UNIT
dir=$1; unit=$2
set -a; . "$dir/etc/$unit.env"; set +a
echo $$ > "$dir/run/$unit.pid"
rm -f "$dir/run/$unit.state"
stop=; child=
trap 'stop=1; [ -n "$child" ] && kill -TERM "$child" 2>/dev/null' TERM INT HUP
first=${HERD_RESTART_DELAY:-1}; delay=$first; quick=0
while [ -z "$stop" ]; do
  started=$(date +%s)
  # HERD_ARGS is split into words on purpose (as systemd does with $HERD_ARGS).
  "$dir/link/$unit" $HERD_ARGS >>"$dir/log/$unit.out" 2>>"$dir/log/$unit.log" </dev/null &
  child=$!
  echo "$child" > "$dir/run/$unit.child"
  wait "$child"; status=$?
  [ -n "$stop" ] && break
  if [ $(( $(date +%s) - started )) -ge 10 ]; then delay=$first; quick=0; else quick=$((quick + 1)); fi
  if [ "$quick" -ge 5 ]; then
    echo "herd-supervise: $unit: crash loop: exited $quick times in a row within 10 s of starting (last status $status); not restarting" >>"$dir/log/$unit.log"
    echo "crash loop" > "$dir/run/$unit.state"
    rm -f "$dir/run/$unit.pid" "$dir/run/$unit.child"
    exit 1
  fi
  echo "herd-supervise: $unit exited with status $status; restarting in ${delay}s" >>"$dir/log/$unit.log"
  sleep "$delay" & wait $!
  delay=$((delay * 2)); [ "$delay" -gt 30 ] && delay=30
done
# The trap interrupted the first wait; this one lasts until the child has drained and exited.
wait "$child" 2>/dev/null
rm -f "$dir/run/$unit.pid" "$dir/run/$unit.child"
"#;

/// A shell function `alive PID`: the process exists and is not a zombie (an exited process
/// nobody reaped still answers `kill -0`).
const ALIVE_FN: &str = r#"alive() { [ -n "$1" ] && [ -r "/proc/$1/stat" ] && [ "$(sed 's/.*) //' "/proc/$1/stat" | cut -c1)" != Z ]; }"#;

/// Starts `launch` under the fallback supervisor (nothing happens if it runs already).
pub fn start<M: Machine + ?Sized>(machine: &M, launch: &Launch) -> Result<(), MachineError> {
    let dir = quote(machine.dir());
    let unit = quote(&launch.name);
    machine
        .run(&format!(
            r#"{ALIVE_FN}
cd {dir} || exit 1
mkdir -p run log
if alive "$(cat run/{unit}.pid 2>/dev/null)"; then exit 0; fi
rm -f run/{unit}.child run/{unit}.state
setsid nohup sh {dir}/herd-supervise.sh {dir} {unit} </dev/null >/dev/null 2>&1 &
# Started: it runs a child, or it already gave up on one that crash-looped at once (its state
# file and log say so, for `alive`, status and the caller's wait for health).
i=0
while [ ! -s run/{unit}.child ] && [ ! -s run/{unit}.state ] && [ $i -lt 100 ]; do sleep 0.05; i=$((i + 1)); done
[ -s run/{unit}.child ] || [ -s run/{unit}.state ] || {{ echo "the supervisor of {name} did not start" >&2; exit 1; }}"#,
            name = launch.name
        ))
        .map(drop)
}

/// Stops unit `name`: SIGTERM to its supervisor (which passes it on and waits for the drain),
/// SIGKILL to the whole process group after `grace`. An orphaned child (its supervisor was
/// killed) is stopped too.
pub fn stop<M: Machine + ?Sized>(
    machine: &M,
    name: &str,
    grace: Duration,
) -> Result<Stopped, MachineError> {
    let dir = quote(machine.dir());
    let unit = quote(name);
    let tenths = grace.as_millis() / 100;
    let answer = machine.run(&format!(
        r#"{ALIVE_FN}
cd {dir} 2>/dev/null || {{ echo absent; exit 0; }}
sup=$(cat run/{unit}.pid 2>/dev/null); child=$(cat run/{unit}.child 2>/dev/null)
alive "$sup" || sup=; alive "$child" || child=
if [ -z "$sup$child" ]; then rm -f run/{unit}.pid run/{unit}.child; echo absent; exit 0; fi
if [ -n "$sup" ]; then kill -TERM "$sup"; else kill -TERM "$child"; fi
i=0
while {{ alive "$sup" || alive "$child"; }} && [ $i -lt {tenths} ]; do sleep 0.1; i=$((i + 1)); done
if alive "$sup" || alive "$child"; then
  [ -n "$sup" ] && kill -KILL -- "-$sup" 2>/dev/null
  for p in $sup $child; do kill -KILL "$p" 2>/dev/null; done
  echo killed
else
  echo exited
fi
rm -f run/{unit}.pid run/{unit}.child"#
    ))?;
    Ok(match answer.trim() {
        "absent" => Stopped::Absent,
        "killed" => Stopped::Killed,
        _ => Stopped::Exited,
    })
}

/// Whether unit `name`'s process runs (its child, not only the loop).
pub fn alive<M: Machine + ?Sized>(machine: &M, name: &str) -> Result<bool, MachineError> {
    let dir = quote(machine.dir());
    let unit = quote(name);
    let answer = machine.run(&format!(
        r#"{ALIVE_FN}
cd {dir} 2>/dev/null || {{ echo no; exit 0; }}
if alive "$(cat run/{unit}.child 2>/dev/null)"; then echo yes; else echo no; fi"#
    ))?;
    Ok(answer.trim() == "yes")
}

#[cfg(test)]
mod tests {
    use super::super::local::Local;
    use super::super::{Launch, Machine, Stopped};
    use super::*;
    use crate::inventory::Kind;

    /// A machine dir with the supervisor installed and one unit whose executable is `program`.
    fn setup(program: &str) -> (tempfile::TempDir, Local, Launch) {
        let temp = tempfile::tempdir().unwrap();
        let dir = temp.path();
        for sub in ["etc", "link", "run", "log"] {
            std::fs::create_dir_all(dir.join(sub)).unwrap();
        }
        std::fs::write(dir.join("herd-supervise.sh"), SCRIPT).unwrap();
        std::fs::write(
            dir.join("etc/u.env"),
            "HERD_ARGS='-c x'\nGREETING='hi there'\n",
        )
        .unwrap();
        let script = dir.join("prog.sh");
        std::fs::write(&script, format!("#!/bin/sh\n{program}\n")).unwrap();
        use std::os::unix::fs::PermissionsExt;
        std::fs::set_permissions(&script, std::fs::Permissions::from_mode(0o755)).unwrap();
        std::os::unix::fs::symlink(&script, dir.join("link/u")).unwrap();
        let machine = Local::new("here", dir.to_str().unwrap());
        let launch = Launch {
            name: "u".into(),
            kind: Kind::Worker,
            id: "u".into(),
        };
        (temp, machine, launch)
    }

    #[test]
    fn runs_with_env_and_args_restarts_a_crash_and_stops_with_sigterm() {
        // Prints its environment and arguments, exits 3 on the first run, then waits.
        let (temp, machine, launch) = setup(
            "echo \"$GREETING $*\"; [ -e \"$0.ran\" ] || { touch \"$0.ran\"; exit 3; }; \
             trap 'echo drained; exit 0' TERM; while :; do sleep 0.1; done",
        );
        machine.start(&launch).unwrap();
        let out = temp.path().join("log/u.out");
        let restarted = (0..100).any(|_| {
            std::thread::sleep(Duration::from_millis(50));
            std::fs::read_to_string(&out)
                .unwrap_or_default()
                .lines()
                .count()
                >= 2
        });
        assert!(restarted, "restarted after exit 3");
        assert!(machine.alive(&launch).unwrap());
        let log = std::fs::read_to_string(temp.path().join("log/u.log")).unwrap();
        assert!(
            log.contains("u exited with status 3; restarting in 1s"),
            "{log}"
        );
        assert!(
            std::fs::read_to_string(&out)
                .unwrap()
                .starts_with("hi there -c x\n")
        );
        let stopped = machine.stop(&launch, Duration::from_secs(5)).unwrap();
        assert_eq!(stopped, Stopped::Exited);
        assert!(!machine.alive(&launch).unwrap());
        assert!(
            std::fs::read_to_string(&out)
                .unwrap()
                .ends_with("drained\n"),
            "SIGTERM passed on"
        );
        assert_eq!(
            machine.stop(&launch, Duration::from_secs(1)).unwrap(),
            Stopped::Absent
        );
    }

    #[test]
    fn a_crash_loop_is_given_up_and_reported() {
        let (temp, machine, launch) = setup("exit 4");
        let env = temp.path().join("etc/u.env");
        std::fs::write(&env, "HERD_RESTART_DELAY=0\n").unwrap();
        machine.start(&launch).unwrap();
        let state = temp.path().join("run/u.state");
        let gave_up = (0..100).any(|_| {
            std::thread::sleep(Duration::from_millis(50));
            state.exists()
        });
        assert!(gave_up, "the loop gave up");
        assert_eq!(std::fs::read_to_string(&state).unwrap(), "crash loop\n");
        let log = std::fs::read_to_string(temp.path().join("log/u.log")).unwrap();
        assert!(
            log.contains("u: crash loop: exited 5 times in a row"),
            "{log}"
        );
        assert!(!machine.alive(&launch).unwrap());
    }

    #[test]
    fn a_process_that_ignores_sigterm_is_killed_after_the_grace() {
        let (_temp, machine, launch) = setup("trap '' TERM; while :; do sleep 0.1; done");
        machine.start(&launch).unwrap();
        let stopped = machine.stop(&launch, Duration::from_millis(300)).unwrap();
        assert_eq!(stopped, Stopped::Killed);
        assert!(!machine.alive(&launch).unwrap());
    }
}
