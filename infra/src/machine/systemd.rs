//! systemd units for `ssh` machines, the product path: herd writes `herd-redis.service`,
//! `herd-gateway.service` and the template `herd-worker@.service` (one instance per worker id)
//! to `/etc/systemd/system/`, then enables and starts, stops and disables, and asks them with
//! `systemctl`.
//!
//! Every unit restarts on failure (`RestartSec`, with `StartLimitBurst` in
//! `StartLimitIntervalSec` turning a crash loop into a failed unit that `systemctl status` and
//! `herd status` report), gets `TimeoutStopSec` long enough for the drain, and writes stdout and
//! stderr to the same files as herd's fallback supervisor. The gateway keeps only
//! `CAP_NET_ADMIN` (to add and drop the floating address), `CAP_NET_RAW` (gratuitous ARP) and
//! `CAP_NET_BIND_SERVICE` (a public port below 1024, e.g. 80); workers and Redis keep no
//! capability.

use super::{Launch, Machine, MachineError, Stopped, quote};
use crate::inventory::Kind;

/// Where unit files go.
pub const UNIT_DIR: &str = "/etc/systemd/system";

/// How long a worker gets to drain after SIGTERM: its `drain.max` (30 s) plus
/// `drain.in_flight_timeout` margin.
pub const WORKER_STOP_SECS: u32 = 45;
/// How long a gateway gets: it first hands the role to the standby (a few hundred ms), then
/// drains its connections.
pub const GATEWAY_STOP_SECS: u32 = 20;
/// How long Redis gets to flush its append-only file.
pub const REDIS_STOP_SECS: u32 = 20;

/// The systemd unit name of `launch` (`herd-worker@demo-m1-1.service`).
pub fn unit_name(launch: &Launch) -> String {
    match launch.kind {
        Kind::Worker => format!("herd-worker@{}.service", launch.id),
        Kind::Gateway => "herd-gateway.service".into(),
        // `herd-redis.service`, and with Sentinel also `herd-redis-sentinel.service`.
        Kind::Redis => format!("herd-{}.service", launch.name),
    }
}

/// The unit file (its file name and text) that runs units of `kind` from herd directory `dir`.
/// Workers share one template; `%i` is the worker id and the unit is `worker-%i`.
pub fn unit_file(kind: Kind, dir: &str, unit: &str) -> (String, String) {
    let (file, description, name, stop, extra) = match kind {
        Kind::Worker => (
            "herd-worker@.service".to_string(),
            "herd worker %i",
            "worker-%i".to_string(),
            WORKER_STOP_SECS,
            "CapabilityBoundingSet=\nNoNewPrivileges=yes\n",
        ),
        Kind::Gateway => (
            "herd-gateway.service".into(),
            "herd gateway (one of the active / standby pair)",
            unit.to_string(),
            GATEWAY_STOP_SECS,
            "AmbientCapabilities=CAP_NET_ADMIN CAP_NET_RAW CAP_NET_BIND_SERVICE\nCapabilityBoundingSet=CAP_NET_ADMIN CAP_NET_RAW CAP_NET_BIND_SERVICE\n",
        ),
        Kind::Redis => (
            format!("herd-{unit}.service"),
            "Redis for herd (sessions, registry, the gateway lease)",
            unit.to_string(),
            REDIS_STOP_SECS,
            "CapabilityBoundingSet=\nNoNewPrivileges=yes\n",
        ),
    };
    let text = format!(
        "# Written by `herd up --inventory`; `herd down --inventory` removes it.\n\
[Unit]\n\
Description={description}\n\
After=network-online.target\n\
Wants=network-online.target\n\
# More than 5 starts in 2 minutes is a crash loop: the unit fails and stays failed.\n\
StartLimitIntervalSec=120\n\
StartLimitBurst=5\n\
\n\
[Service]\n\
Type=simple\n\
EnvironmentFile={dir}/etc/{name}.env\n\
ExecStart={dir}/link/{name} $HERD_ARGS\n\
WorkingDirectory={dir}\n\
Restart=on-failure\n\
RestartSec=2s\n\
KillSignal=SIGTERM\n\
TimeoutStopSec={stop}s\n\
StandardOutput=append:{dir}/log/{name}.out\n\
StandardError=append:{dir}/log/{name}.log\n\
{extra}\
\n\
[Install]\n\
WantedBy=multi-user.target\n"
    );
    (file, text)
}

fn run_systemctl<M: Machine + ?Sized>(machine: &M, args: &str) -> Result<String, MachineError> {
    machine.run(&format!("systemctl {args}"))
}

/// Installs `launch`'s unit file and starts it.
pub fn start<M: Machine + ?Sized>(machine: &M, launch: &Launch) -> Result<(), MachineError> {
    let (file, text) = unit_file(launch.kind, machine.dir(), &launch.name);
    let path = format!("{UNIT_DIR}/{file}");
    machine.run(&format!(
        "printf '%s' {} > {}.tmp && mv {}.tmp {} && systemctl daemon-reload",
        quote(&text),
        quote(&path),
        quote(&path),
        quote(&path)
    ))?;
    // Enabled as well as started: a rebooted machine brings its units back by itself.
    run_systemctl(
        machine,
        &format!("enable --now {}", quote(&unit_name(launch))),
    )
    .map(drop)
}

/// Stops `launch`'s unit (systemd waits up to `TimeoutStopSec`, then SIGKILLs) and removes its
/// unit file once no instance needs it.
pub fn stop<M: Machine + ?Sized>(machine: &M, launch: &Launch) -> Result<Stopped, MachineError> {
    let unit = quote(&unit_name(launch));
    let (file, _) = unit_file(launch.kind, machine.dir(), &launch.name);
    let path = quote(&format!("{UNIT_DIR}/{file}"));
    let answer = machine.run(&format!(
        "if systemctl is-active --quiet {unit}; then systemctl stop {unit}; echo exited; else echo absent; fi; \
         systemctl disable {unit} 2>/dev/null; systemctl reset-failed {unit} 2>/dev/null; \
         if [ -z \"$(systemctl list-units --no-legend {glob} 2>/dev/null)\" ]; then rm -f {path}; systemctl daemon-reload; fi",
        glob = quote(&match launch.kind {
            Kind::Worker => "herd-worker@*".to_string(),
            _ => unit_name(launch),
        }),
    ))?;
    Ok(if answer.contains("exited") {
        Stopped::Exited
    } else {
        Stopped::Absent
    })
}

/// Whether `launch`'s unit is active.
pub fn alive<M: Machine + ?Sized>(machine: &M, launch: &Launch) -> Result<bool, MachineError> {
    let unit = quote(&unit_name(launch));
    let answer = run_systemctl(machine, &format!("is-active {unit} || true"))?;
    Ok(answer.trim() == "active")
}

#[cfg(test)]
mod tests {
    use std::path::Path;
    use std::sync::Mutex;

    use super::super::Supervisor;
    use super::*;

    /// A machine that records the scripts it is given and answers each with `answer`.
    #[derive(Debug)]
    struct Recorder {
        scripts: Mutex<Vec<String>>,
        answer: String,
    }

    impl Machine for Recorder {
        fn name(&self) -> &str {
            "rec"
        }
        fn dir(&self) -> &str {
            "/opt/herd/t"
        }
        fn run(&self, script: &str) -> Result<String, MachineError> {
            self.scripts.lock().unwrap().push(script.to_string());
            Ok(self.answer.clone())
        }
        fn copy(&self, _: &Path, _: &str) -> Result<(), MachineError> {
            Ok(())
        }
        fn supervisor(&self) -> Supervisor {
            Supervisor::Systemd
        }
    }

    fn recorder(answer: &str) -> Recorder {
        Recorder {
            scripts: Mutex::new(Vec::new()),
            answer: answer.into(),
        }
    }

    #[test]
    fn a_systemd_machine_installs_enables_stops_and_disables_the_units() {
        let launch = Launch {
            name: "worker-demo-m1-1".into(),
            kind: Kind::Worker,
            id: "demo-m1-1".into(),
        };
        let machine = recorder("");
        machine.start(&launch).unwrap();
        let scripts = machine.scripts.lock().unwrap().clone();
        assert_eq!(scripts.len(), 2, "{scripts:?}");
        assert!(scripts[0].contains("/etc/systemd/system/herd-worker@.service"));
        assert!(scripts[0].contains("ExecStart=/opt/herd/t/link/worker-%i $HERD_ARGS"));
        assert!(scripts[0].ends_with("systemctl daemon-reload"));
        assert_eq!(
            scripts[1],
            "systemctl enable --now 'herd-worker@demo-m1-1.service'"
        );

        let machine = recorder("exited\n");
        let stopped = machine
            .stop(&launch, std::time::Duration::from_secs(1))
            .unwrap();
        assert_eq!(stopped, Stopped::Exited);
        let scripts = machine.scripts.lock().unwrap().clone();
        let last = scripts.last().unwrap();
        assert!(
            last.contains("systemctl stop 'herd-worker@demo-m1-1.service'"),
            "{last}"
        );
        assert!(
            last.contains("systemctl disable 'herd-worker@demo-m1-1.service'"),
            "{last}"
        );
        assert!(
            last.contains("rm -f '/etc/systemd/system/herd-worker@.service'"),
            "{last}"
        );

        assert!(recorder("active\n").alive(&launch).unwrap());
        assert!(!recorder("failed\n").alive(&launch).unwrap());
    }

    #[test]
    fn units_carry_the_restart_policy_drain_timeout_and_capabilities() {
        let (file, worker) = unit_file(Kind::Worker, "/opt/herd/lab", "worker-demo-m1-1");
        assert_eq!(file, "herd-worker@.service");
        assert!(worker.contains("ExecStart=/opt/herd/lab/link/worker-%i $HERD_ARGS\n"));
        assert!(worker.contains("EnvironmentFile=/opt/herd/lab/etc/worker-%i.env\n"));
        assert!(worker.contains("Restart=on-failure\n"));
        assert!(worker.contains("TimeoutStopSec=45s\n"));
        assert!(worker.contains("StartLimitBurst=5\n"));
        assert!(!worker.contains("CAP_NET_ADMIN"));
        let (file, gateway) = unit_file(Kind::Gateway, "/opt/herd/lab", "gateway-gw1");
        assert_eq!(file, "herd-gateway.service");
        assert!(
            gateway
                .contains("AmbientCapabilities=CAP_NET_ADMIN CAP_NET_RAW CAP_NET_BIND_SERVICE\n")
        );
        assert!(gateway.contains("ExecStart=/opt/herd/lab/link/gateway-gw1 $HERD_ARGS\n"));
        let launch = Launch {
            name: "worker-demo-m1-1".into(),
            kind: Kind::Worker,
            id: "demo-m1-1".into(),
        };
        assert_eq!(unit_name(&launch), "herd-worker@demo-m1-1.service");
    }

    #[test]
    fn each_redis_unit_of_a_machine_has_its_own_unit_file() {
        for (name, expected) in [
            ("redis", "herd-redis.service"),
            ("redis-sentinel", "herd-redis-sentinel.service"),
        ] {
            let launch = Launch {
                name: name.into(),
                kind: Kind::Redis,
                id: name.into(),
            };
            assert_eq!(unit_name(&launch), expected);
            let (file, text) = unit_file(Kind::Redis, "/opt/herd/lab", name);
            assert_eq!(file, expected);
            assert!(text.contains(&format!("ExecStart=/opt/herd/lab/link/{name} $HERD_ARGS\n")));
        }
    }
}
