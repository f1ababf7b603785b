//! `[gateways.tls]` on the machines: the certificate and key files copied to both gateway
//! machines (`{dir}/tls/`, the directory 0700 and every key 0600), the gateway's `[tls]`
//! section written to `{dir}/etc/{unit}.toml` and passed as `--config`, so both gateways serve
//! the same certificates.
//!
//! A renewal ([`push`], `herd tls push --inventory FILE`) is the same copy again followed by
//! SIGHUP to both gateways: the gateway reloads its certificates on SIGHUP (and by itself when
//! it sees the files change, every `tls.reload_interval`), without dropping a connection, and
//! keeps the old ones if the new files are refused. The new files replace the old ones by
//! rename, cert and key in one command, so the gateway never reads half a file.

use std::time::{Duration, Instant};

use super::{DeployError, Machines, Options, admin, connect, launch};
use crate::inventory::{GatewayTls, Inventory, Kind, Unit, plan};
use crate::machine::{Machine, MachineError, Supervisor, quote, systemd};

/// How long [`push`] waits for a gateway to report the reload.
const RELOADED: Duration = Duration::from_secs(10);

/// The machine's directory for the copies.
fn tls_dir(machine: &dyn Machine) -> String {
    format!("{}/tls", machine.dir())
}

/// Copies the certificate and key files into `{dir}/tls/` on `machine`: each under a temporary
/// name first, then all renamed at once.
pub fn copy_files(machine: &dyn Machine, tls: &GatewayTls) -> Result<(), DeployError> {
    let dir = tls_dir(machine);
    // 0700 before any key lands in it: a key is never readable by others, not even between
    // the copy and its chmod.
    machine.run(&format!("mkdir -p {d} && chmod 700 {d}", d = quote(&dir)))?;
    let files = tls.files();
    let mut finish = String::from("set -e\n");
    for file in &files {
        let target = format!("{dir}/{}", file.name);
        machine.copy(&file.local, &format!("{target}.new"))?;
        let mode = if file.private { "600" } else { "644" };
        finish.push_str(&format!("chmod {mode} {}.new\n", quote(&target)));
    }
    for file in &files {
        let target = quote(&format!("{dir}/{}", file.name));
        finish.push_str(&format!("mv -f {target}.new {target}\n"));
    }
    machine.run(&finish)?;
    Ok(())
}

/// Puts gateway `unit`'s certificates and `[tls]` section on its machine; returns the
/// arguments that make the gateway read the section (`--config FILE`).
pub fn install(
    machine: &dyn Machine,
    tls: &GatewayTls,
    unit: &Unit,
) -> Result<[String; 2], DeployError> {
    copy_files(machine, tls)?;
    let config = format!("{}/etc/{}.toml", machine.dir(), unit.name);
    let text = tls.gateway_config(unit.listen, &tls_dir(machine));
    machine.run(&format!(
        "printf '%s' {} > {}",
        quote(&text),
        quote(&config)
    ))?;
    Ok(["--config".into(), config])
}

/// Sends SIGHUP to gateway `unit`'s process (not to the fallback supervisor, for which a
/// SIGHUP means stop).
fn hangup(machine: &dyn Machine, unit: &Unit) -> Result<(), MachineError> {
    let script = match machine.supervisor() {
        Supervisor::Systemd => format!(
            "systemctl kill --signal=HUP --kill-who=main {}",
            quote(&systemd::unit_name(&launch(unit)))
        ),
        Supervisor::Fallback => format!(
            "child=$(cat {}) && kill -HUP \"$child\"",
            quote(&format!("{}/run/{}.child", machine.dir(), unit.name))
        ),
    };
    machine.run(&script).map(drop)
}

/// `herd_gateway_tls_reloads_total` by result, from `/metrics`: `(ok, refused)`.
fn reloads(machine: &dyn Machine, unit: &Unit) -> Result<(u64, u64), String> {
    let text = admin::get(machine, unit, "/metrics")?;
    let count = |result: &str| {
        let prefix = format!("herd_gateway_tls_reloads_total{{result=\"{result}\"}} ");
        text.lines()
            .find_map(|line| line.strip_prefix(&prefix))
            .and_then(|value| value.trim().parse::<f64>().ok())
            .map(|value| value as u64)
    };
    match (count("ok"), count("refused")) {
        (Some(ok), Some(refused)) => Ok((ok, refused)),
        _ => Err("its /metrics has no herd_gateway_tls_reloads_total: is [tls] on?".into()),
    }
}

/// Why the gateway refused the files, from its last log line about it: `key: problem` (the
/// gateways log JSON lines), or the line itself.
fn refusal(machine: &dyn Machine, unit: &Unit) -> String {
    let log = quote(&format!("{}/log/{}.log", machine.dir(), unit.name));
    let line = machine
        .run(&format!(
            "grep -F 'certificate refused' {log} 2>/dev/null | tail -n 1"
        ))
        .unwrap_or_default();
    let line = line.trim();
    match serde_json::from_str::<serde_json::Value>(line) {
        Ok(entry) if entry["problem"].is_string() => format!(
            "{}: {}",
            entry["key"].as_str().unwrap_or("tls"),
            entry["problem"].as_str().unwrap_or_default()
        ),
        _ => line.to_string(),
    }
}

/// How one gateway took a push.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Pushed {
    /// The new files are copied and the gateway reloaded them.
    Reloaded,
    /// The files are copied but the gateway refused them (it keeps serving the old ones; its
    /// log says why).
    Refused,
    /// The files are copied; the gateway does not run, and reads them when it starts.
    NotRunning,
}

/// `herd tls push --inventory FILE`: copies the inventory's certificate files to both gateway
/// machines again and has both gateways reload them (SIGHUP), waiting until each reports the
/// reload. Every reachable gateway gets the files even when the other fails.
pub fn push(
    inventory: &Inventory,
    options: &Options,
    say: &mut dyn FnMut(String),
) -> Result<Vec<(String, Pushed)>, DeployError> {
    let Some(tls) = &inventory.gateways.tls else {
        return Err(DeployError::TlsPush(
            "the inventory has no [gateways.tls]: nothing to push".into(),
        ));
    };
    let machines: Machines = connect(inventory, options);
    let mut outcomes = Vec::new();
    for unit in plan(inventory, "")
        .into_iter()
        .filter(|u| u.kind == Kind::Gateway)
    {
        let Some(machine) = machines.get(&unit.machine) else {
            return Err(DeployError::TlsPush(format!(
                "machine {}: its network namespace does not exist (is the cluster up?)",
                unit.machine
            )));
        };
        if !machine.alive(&launch(&unit))? {
            copy_files(machine, tls)?;
            say(format!(
                "{}: files copied; the gateway does not run (it reads them when it starts)",
                unit.machine
            ));
            outcomes.push((unit.machine.clone(), Pushed::NotRunning));
            continue;
        }
        // Counted before the copy: a reload the gateway's own file watch makes between the
        // copy and the SIGHUP counts too.
        let before = reloads(machine, &unit).map_err(|last| DeployError::Unit {
            what: format!("gateway {} did not report its reloads ({last})", unit.name),
            machine: unit.machine.clone(),
            tail: machine.log_tail(&unit.name, super::TAIL),
        })?;
        copy_files(machine, tls)?;
        hangup(machine, &unit)?;
        let deadline = Instant::now() + RELOADED;
        let outcome = loop {
            match reloads(machine, &unit) {
                Ok((ok, _)) if ok > before.0 => break Pushed::Reloaded,
                Ok((_, refused)) if refused > before.1 => break Pushed::Refused,
                _ if Instant::now() > deadline => {
                    return Err(DeployError::Unit {
                        what: format!(
                            "gateway {} did not report a reload within {RELOADED:?} of SIGHUP",
                            unit.name
                        ),
                        machine: unit.machine.clone(),
                        tail: machine.log_tail(&unit.name, super::TAIL),
                    });
                }
                _ => std::thread::sleep(Duration::from_millis(100)),
            }
        };
        say(match outcome {
            Pushed::Reloaded => format!("{}: files copied, certificates reloaded", unit.machine),
            _ => format!(
                "{}: files copied, but the gateway REFUSED them and keeps the old certificates: {}",
                unit.machine,
                refusal(machine, &unit)
            ),
        });
        outcomes.push((unit.machine.clone(), outcome));
    }
    Ok(outcomes)
}

#[cfg(test)]
mod tests {
    use std::path::PathBuf;

    use super::*;
    use crate::machine::local::Local;

    fn tls(dir: &std::path::Path) -> GatewayTls {
        for (file, text) in [
            ("c.pem", "-----BEGIN CERTIFICATE-----\nA\n"),
            ("k.pem", "-----BEGIN PRIVATE KEY-----\nB\n"),
        ] {
            std::fs::write(dir.join(file), text).unwrap();
        }
        GatewayTls {
            port: 8443,
            cert: dir.join("c.pem"),
            key: dir.join("k.pem"),
            sni: vec![crate::inventory::TlsSni {
                names: vec!["a.example".into()],
                cert: dir.join("c.pem"),
                key: dir.join("k.pem"),
            }],
            redirect_http: false,
            hsts: String::new(),
        }
    }

    /// A systemd machine that records its scripts.
    #[derive(Debug, Default)]
    struct Recorder(std::sync::Mutex<Vec<String>>);

    impl Machine for Recorder {
        fn name(&self) -> &str {
            "rec"
        }
        fn dir(&self) -> &str {
            "/opt/herd/t"
        }
        fn run(&self, script: &str) -> Result<String, MachineError> {
            self.0.lock().unwrap().push(script.to_string());
            Ok(String::new())
        }
        fn copy(&self, _: &std::path::Path, _: &str) -> Result<(), MachineError> {
            Ok(())
        }
        fn supervisor(&self) -> Supervisor {
            Supervisor::Systemd
        }
    }

    #[test]
    fn sighup_goes_to_the_gateway_process_not_its_supervisor() {
        let unit = Unit {
            name: "gateway-gw1".into(),
            entry: "gateways".into(),
            kind: Kind::Gateway,
            machine: "gw1".into(),
            id: "gw1".into(),
            listen: "0.0.0.0:8080".parse().unwrap(),
            admin: None,
            peer: None,
            binary: "herd-gateway".into(),
            args: Vec::new(),
            env: Vec::new(),
            config: None,
        };
        let systemd = Recorder::default();
        hangup(&systemd, &unit).unwrap();
        assert_eq!(
            systemd.0.lock().unwrap()[0],
            "systemctl kill --signal=HUP --kill-who=main 'herd-gateway.service'"
        );
        // The fallback supervisor treats SIGHUP as stop: the signal goes to the child.
        let here = tempfile::tempdir().unwrap();
        std::fs::create_dir(here.path().join("run")).unwrap();
        let got = here.path().join("got-hup");
        let ready = here.path().join("ready");
        // Perl, not a shell trap: a shell cannot trap a signal that was ignored when it started,
        // and a test run under `nohup` (as CI scripts may be) ignores SIGHUP; Perl's handler is
        // installed whatever the inherited disposition. (perl-base is essential on Debian.)
        let mut command = std::process::Command::new("perl");
        command
            .arg("-e")
            .arg(
                r#"$SIG{HUP} = sub { open(my $f, ">", $ARGV[0]); print $f "hup\n"; close $f; exit 0 };
                   open(my $r, ">", $ARGV[1]); close $r;
                   select(undef, undef, undef, 0.05) for 1 .. 200;"#,
            )
            .arg(&got)
            .arg(&ready);
        let mut child = command.spawn().unwrap();
        // The handler is set once perl has made `ready` (bounded: 10 s).
        for _ in 0..1000 {
            if ready.exists() {
                break;
            }
            std::thread::sleep(std::time::Duration::from_millis(10));
        }
        std::fs::write(
            here.path().join("run/gateway-gw1.child"),
            format!("{}\n", child.id()),
        )
        .unwrap();
        let local = Local::new("m", here.path().to_str().unwrap());
        hangup(&local, &unit).unwrap();
        let status = child.wait().unwrap();
        assert!(status.success(), "the child took SIGHUP: {status}");
        assert_eq!(std::fs::read_to_string(&got).unwrap(), "hup\n");
    }

    #[test]
    fn files_are_copied_with_private_keys_0600_in_a_0700_directory() {
        use std::os::unix::fs::PermissionsExt;
        let here = tempfile::tempdir().unwrap();
        let there = tempfile::tempdir().unwrap();
        let tls = tls(here.path());
        let machine = Local::new("m", there.path().to_str().unwrap());
        copy_files(&machine, &tls).unwrap();
        let mode = |name: &str| {
            std::fs::metadata(there.path().join("tls").join(name))
                .unwrap()
                .permissions()
                .mode()
                & 0o777
        };
        assert_eq!(mode(""), 0o700);
        assert_eq!(mode("default.key"), 0o600);
        assert_eq!(mode("sni-0.key"), 0o600);
        assert_eq!(mode("default.pem"), 0o644);
        let copied: PathBuf = there.path().join("tls/default.pem");
        assert_eq!(
            std::fs::read_to_string(copied).unwrap(),
            "-----BEGIN CERTIFICATE-----\nA\n"
        );
        let left: Vec<_> = std::fs::read_dir(there.path().join("tls"))
            .unwrap()
            .flatten()
            .map(|e| e.file_name().to_string_lossy().into_owned())
            .filter(|n| n.ends_with(".new"))
            .collect();
        assert!(left.is_empty(), "{left:?}");
    }
}
