//! `herd up|status|down --inventory` end to end, through the real `herd` binary, on several
//! "machines" on this box:
//! - the shipped 6-host netns example (2 gateway hosts, 3 worker machines, a Redis host, plus a
//!   client host): up, requests through the floating address served by workers on different
//!   machines, status, down — and nothing left (no namespace, no process);
//! - a failed `up` (a worker that can't start) stops what it started and removes the
//!   namespaces;
//! - the ssh transport against real sshd (Debian `openssh-server`) in netns hosts, with keys
//!   generated here: binaries copied, processes started under the fallback supervisor (no
//!   systemd in a namespace), status sees them, `scale --on` adds a worker over ssh, down
//!   removes them all; the systemd units herd
//!   writes pass `systemd-analyze verify`;
//! - a bad inventory is refused with exit 2 and one line.
//!
//! Needs root (network namespaces), like CI. Every namespace, sshd and process is removed also
//! when a test fails ([`Cleanup`]). The heavy tests run one at a time.

use herd_tests::inventory::{Cleanup, alive, herd_in, namespaces_with, recorded_pids};
use std::collections::BTreeSet;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::Mutex;
use std::time::{Duration, Instant};

use herd::binaries;
use herd::netns::{HostSpec, Topology};
use herd::process::{Process, Spec};
use serde_json::Value;

static SERIAL: Mutex<()> = Mutex::new(());

fn serial() -> std::sync::MutexGuard<'static, ()> {
    SERIAL.lock().unwrap_or_else(|p| p.into_inner())
}

fn require_root() {
    assert!(
        herd::deps::is_root(),
        "inventory tests need root for network namespaces (run the suite as root, as CI does)"
    );
}

fn examples() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../infra/examples")
}

/// A short unique inventory name (namespace names follow from it).
fn unique_name(prefix: &str) -> String {
    format!("{prefix}{}", std::process::id() % 1_000_000)
}

/// `count` GETs through `url` from inside `netns`; the `x-herd-machine` of each answer (an
/// error text for a failed request).
fn requests_from(netns: &str, url: String, count: usize) -> Vec<Result<String, String>> {
    herd::netns::run_in_netns(netns, move || async move {
        let client = herd_tests::client();
        let mut seen = Vec::new();
        for _ in 0..count {
            let answer = match client.get(&url).send().await {
                Ok(r) if r.status().is_success() => Ok(r
                    .headers()
                    .get("x-herd-machine")
                    .and_then(|v| v.to_str().ok())
                    .unwrap_or("")
                    .to_string()),
                Ok(r) => Err(format!("status {}", r.status())),
                Err(e) => Err(e.to_string()),
            };
            seen.push(answer);
        }
        seen
    })
    .expect("enter the client namespace")
}

#[test]
fn the_six_host_netns_inventory_comes_up_serves_from_every_machine_and_goes_away() {
    let _serial = serial();
    require_root();
    let dir = herd_tests::temp_dir();
    let name = unique_name("n");
    let text = std::fs::read_to_string(examples().join("netns-6.toml"))
        .unwrap()
        .replace("name = \"lab6\"", &format!("name = \"{name}\""));
    let file = dir.path().join("inventory.toml");
    std::fs::write(&file, text).unwrap();
    let state = dir.path().join("state");
    let (file, state) = (file.to_str().unwrap(), state.to_str().unwrap());
    let prefix = format!("herdinv-{name}-");
    let mut cleanup = Cleanup {
        netns: None,
        down: ["down", "--inventory", file, "--state-dir", state]
            .map(String::from)
            .to_vec(),
        roots: vec![Path::new(state).join(format!("inventory-{name}"))],
        pids: BTreeSet::new(),
        prefix: prefix.clone(),
    };

    let started = Instant::now();
    let up = herd_in(None, &["up", "--inventory", file, "--state-dir", state]);
    let took = started.elapsed();
    cleanup.remember();
    assert!(up.status.success(), "herd up failed");
    println!(
        "up of the 6-host netns inventory took {:.2} s",
        took.as_secs_f64()
    );
    let stdout = String::from_utf8_lossy(&up.stdout);
    assert!(
        stdout.contains(
            "herd is up: http://10.211.0.10:8080  (active gateway on gw1, 6 workers healthy"
        ),
        "{stdout}"
    );
    assert_eq!(namespaces_with(&prefix).len(), 8, "7 hosts and the bridge");

    let answers = requests_from(
        &format!("{prefix}client"),
        "http://10.211.0.10:8080/work?ms=1".into(),
        60,
    );
    let failed: Vec<_> = answers.iter().filter(|a| a.is_err()).collect();
    assert!(failed.is_empty(), "failed requests: {failed:?}");
    let machines: BTreeSet<String> = answers.into_iter().map(Result::unwrap).collect();
    assert!(
        machines.len() >= 2
            && machines
                .iter()
                .all(|m| ["m1", "m2", "m3"].contains(&m.as_str())),
        "served by {machines:?}"
    );

    let status = herd_in(
        None,
        &[
            "status",
            "--inventory",
            file,
            "--state-dir",
            state,
            "--json",
        ],
    );
    assert_eq!(status.status.code(), Some(0), "status says healthy");
    let json: Value = serde_json::from_slice(&status.stdout).unwrap();
    assert_eq!(json["active"], "gw1");
    assert_eq!(json["workers"].as_array().unwrap().len(), 6);
    assert!(
        json["machines"]
            .as_array()
            .unwrap()
            .iter()
            .all(|m| m["reachable"] == true)
    );
    let table = herd_in(None, &["status", "--inventory", file, "--state-dir", state]);
    assert!(String::from_utf8_lossy(&table.stdout).contains("gw2             standby"));

    let pids = recorded_pids(&cleanup.roots[0]);
    assert_eq!(
        pids.len(),
        2 * 9,
        "a supervisor and a child for each of 9 units"
    );
    assert!(pids.iter().all(|p| alive(*p)));
    let down = herd_in(None, &["down", "--inventory", file, "--state-dir", state]);
    assert!(down.status.success(), "herd down failed");
    let left: Vec<_> = pids.iter().filter(|p| alive(**p)).collect();
    assert!(left.is_empty(), "still running after down: {left:?}");
    assert_eq!(
        namespaces_with(&prefix),
        Vec::<String>::new(),
        "namespaces left"
    );
    let after = herd_in(None, &["status", "--inventory", file, "--state-dir", state]);
    assert_eq!(after.status.code(), Some(3), "nothing runs");
}

#[test]
fn a_failed_up_stops_what_it_started_and_removes_the_namespaces() {
    let _serial = serial();
    require_root();
    let dir = herd_tests::temp_dir();
    let name = unique_name("f");
    // The second image's workers refuse their config (weight 0) and exit at once.
    let text = format!(
        r#"
name = "{name}"
[[machines]]
name = "g1"
address = "10.213.0.11"
transport = "netns"
[[machines]]
name = "g2"
address = "10.213.0.12"
transport = "netns"
[[machines]]
name = "m1"
address = "10.213.0.21"
transport = "netns"
[redis]
machine = "m1"
[gateways]
machines = ["g1", "g2"]
floating_address = "10.213.0.10"
[[images]]
name = "good"
per_machine = 1
machines = ["m1"]
[[images]]
name = "bad"
per_machine = 1
port = 8090
machines = ["m1"]
env = {{ HERD_WORKER_WEIGHT = "0" }}
"#
    );
    let file = dir.path().join("inventory.toml");
    std::fs::write(&file, text).unwrap();
    let state = dir.path().join("state");
    let (file, state) = (file.to_str().unwrap(), state.to_str().unwrap());
    let prefix = format!("herdinv-{name}-");
    let root = Path::new(state).join(format!("inventory-{name}"));
    let mut cleanup = Cleanup {
        netns: None,
        down: ["down", "--inventory", file, "--state-dir", state]
            .map(String::from)
            .to_vec(),
        roots: vec![root.clone()],
        pids: BTreeSet::new(),
        prefix: prefix.clone(),
    };
    // Note every process while `up` runs, to check afterwards that none is left.
    let up = std::thread::scope(|scope| {
        let watcher = scope.spawn(|| {
            let mut seen = BTreeSet::new();
            let stop = Instant::now() + Duration::from_secs(120);
            while Instant::now() < stop && namespaces_with(&prefix).is_empty() {
                std::thread::sleep(Duration::from_millis(20));
            }
            while Instant::now() < stop && !namespaces_with(&prefix).is_empty() {
                seen.extend(recorded_pids(&root));
                std::thread::sleep(Duration::from_millis(20));
            }
            seen
        });
        let up = herd_in(None, &["up", "--inventory", file, "--state-dir", state]);
        (up, watcher.join().unwrap())
    });
    let (up, seen) = up;
    cleanup.pids.extend(&seen);
    assert_eq!(up.status.code(), Some(1));
    let stderr = String::from_utf8_lossy(&up.stderr);
    assert!(
        stderr.contains("worker-bad-m1-1"),
        "names the unit: {stderr}"
    );
    assert!(stderr.contains("weight"), "shows its log: {stderr}");
    assert!(stderr.contains("stopped redis on m1"), "{stderr}");
    assert!(!seen.is_empty(), "processes were started");
    let left: Vec<_> = seen.iter().filter(|p| alive(**p)).collect();
    assert!(left.is_empty(), "still running: {left:?}");
    assert_eq!(
        namespaces_with(&prefix),
        Vec::<String>::new(),
        "namespaces left"
    );
}

#[test]
fn a_bad_inventory_is_refused_with_exit_2_and_one_line_before_anything_starts() {
    let dir = herd_tests::temp_dir();
    let file = dir.path().join("bad.toml");
    let text = std::fs::read_to_string(examples().join("netns-6.toml"))
        .unwrap()
        .replace(
            "machines = [\"m1\", \"m2\", \"m3\"]",
            "machines = [\"m1\", \"m2\", \"m4\"]",
        );
    std::fs::write(&file, text).unwrap();
    let state = dir.path().join("state");
    for command in ["up", "status", "down"] {
        let out = herd_in(
            None,
            &[
                command,
                "--inventory",
                file.to_str().unwrap(),
                "--state-dir",
                state.to_str().unwrap(),
            ],
        );
        assert_eq!(out.status.code(), Some(2), "{command}");
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert_eq!(stderr.lines().count(), 1, "{stderr}");
        assert!(
            stderr.contains(
                "bad.toml: images.demo: machine `m4` is not in the inventory's [[machines]]"
            ),
            "{stderr}"
        );
    }
    assert!(!state.exists(), "nothing was started or written");
    assert!(namespaces_with("herdinv-lab6-").is_empty());
}

/// Runs `program args`, panicking with its stderr when it fails.
fn run(program: &str, args: &[&str]) {
    let out = Command::new(program)
        .args(args)
        .output()
        .unwrap_or_else(|e| panic!("{program}: {e}"));
    assert!(
        out.status.success(),
        "{program} {args:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
}

/// Starts sshd inside `host` of `topology`, on port 22 of its address, with host key and
/// authorized keys from `dir`.
fn start_sshd(topology: &Topology, host: &str, dir: &Path) -> Process {
    let addr = topology.host(host).unwrap().addr;
    let config = dir.join(format!("sshd_config-{host}"));
    std::fs::write(
        &config,
        format!(
            "Port 22\nListenAddress {addr}\nHostKey {d}/host_key\nPidFile {d}/sshd-{host}.pid\n\
             AuthorizedKeysFile {d}/authorized_keys\nPermitRootLogin prohibit-password\n\
             PasswordAuthentication no\nKbdInteractiveAuthentication no\nUsePAM no\n\
             StrictModes no\nSubsystem sftp internal-sftp\nLogLevel ERROR\n",
            d = dir.display()
        ),
    )
    .unwrap();
    // Privilege separation needs this directory (the package's service would create it).
    std::fs::create_dir_all("/run/sshd").unwrap();
    let spec = Spec::new(format!("sshd-{host}"), "/usr/sbin/sshd", dir)
        .args_from(["-D", "-e", "-f"])
        .arg(config.display().to_string());
    Process::spawn(&topology.spec_in(host, spec).unwrap()).expect("start sshd")
}

#[test]
fn the_ssh_transport_deploys_to_real_sshd_hosts_and_removes_everything() {
    let _serial = serial();
    require_root();
    assert!(
        Path::new("/usr/sbin/sshd").exists(),
        "sshd is missing: apt-get install openssh-server (infra/test.sh does)"
    );
    let dir = herd_tests::temp_dir();
    let d = dir.path();
    run(
        "ssh-keygen",
        &[
            "-q",
            "-t",
            "ed25519",
            "-N",
            "",
            "-f",
            d.join("id").to_str().unwrap(),
        ],
    );
    run(
        "ssh-keygen",
        &[
            "-q",
            "-t",
            "ed25519",
            "-N",
            "",
            "-f",
            d.join("host_key").to_str().unwrap(),
        ],
    );
    std::fs::copy(d.join("id.pub"), d.join("authorized_keys")).unwrap();
    let ssh_config = d.join("ssh_config");
    std::fs::write(
        &ssh_config,
        format!(
            "Host *\n  User root\n  IdentityFile {}\n  IdentitiesOnly yes\n  StrictHostKeyChecking no\n  \
             UserKnownHostsFile /dev/null\n  LogLevel ERROR\n",
            d.join("id").display()
        ),
    )
    .unwrap();
    // Drop order is the reverse: cleanup (herd down over ssh), then sshd, then the namespaces.
    let topology = Topology::create(
        [10, 212, 0],
        &[
            HostSpec::new("ctl", 100),
            HostSpec::new("s1", 11),
            HostSpec::new("s2", 12),
        ],
    )
    .expect("namespaces");
    let _sshd = [
        start_sshd(&topology, "s1", d),
        start_sshd(&topology, "s2", d),
    ];
    let ctl = topology.host("ctl").unwrap().netns.clone();
    for host in ["s1", "s2"] {
        let addr = topology.host(host).unwrap().addr;
        let listening = herd::netns::run_in_netns(&ctl, move || async move {
            for _ in 0..100 {
                if tokio::net::TcpStream::connect((addr, 22)).await.is_ok() {
                    return true;
                }
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
            false
        })
        .unwrap();
        assert!(listening, "sshd on {host} never listened");
    }

    let name = unique_name("s");
    let remote = |host: &str| d.join(format!("remote-{host}"));
    let inventory = format!(
        r#"
name = "{name}"
[ssh]
config_file = "{config}"
[[machines]]
name = "s1"
address = "10.212.0.11"
transport = "ssh"
dir = "{r1}"
[[machines]]
name = "s2"
address = "10.212.0.12"
transport = "ssh"
ssh_host = "root@10.212.0.12"
dir = "{r2}"
[redis]
machine = "s1"
[gateways]
machines = ["s1", "s2"]
floating_address = "10.212.0.10"
[[images]]
name = "demo"
per_machine = 1
machines = ["s1", "s2"]
"#,
        config = ssh_config.display(),
        r1 = remote("s1").display(),
        r2 = remote("s2").display(),
    );
    let file = d.join("inventory.toml");
    std::fs::write(&file, inventory).unwrap();
    let state = d.join("state");
    let (file, state) = (file.to_str().unwrap(), state.to_str().unwrap());
    let mut cleanup = Cleanup {
        netns: Some(ctl.clone()),
        down: ["down", "--inventory", file, "--state-dir", state]
            .map(String::from)
            .to_vec(),
        roots: vec![remote("s1").parent().unwrap().to_path_buf()],
        pids: BTreeSet::new(),
        prefix: format!("herdinv-{name}-"),
    };
    // The machine directories are remote-s1 and remote-s2 side by side in the temp dir.
    cleanup.roots = vec![d.to_path_buf()];

    let up = herd_in(
        Some(&ctl),
        &["up", "--inventory", file, "--state-dir", state],
    );
    cleanup.remember();
    assert!(up.status.success(), "herd up over ssh failed");
    assert!(
        String::from_utf8_lossy(&up.stdout).contains("herd is up: http://10.212.0.10:8080"),
        "{}",
        String::from_utf8_lossy(&up.stdout)
    );
    // The binaries were copied (real files of the same size, not links to this box's build).
    for (host, binary) in [
        ("s1", "herd-worker"),
        ("s1", "herd-gateway"),
        ("s2", "herd-worker"),
    ] {
        let copied = remote(host).join("bin").join(binary);
        let meta = std::fs::symlink_metadata(&copied).unwrap_or_else(|e| panic!("{copied:?}: {e}"));
        assert!(meta.is_file(), "{copied:?} is a copied file");
        let local = binaries::locate(binary).unwrap();
        assert_eq!(
            meta.len(),
            std::fs::metadata(local).unwrap().len(),
            "{copied:?}"
        );
    }
    let answers = requests_from(&ctl, "http://10.212.0.10:8080/work?ms=1".into(), 20);
    assert!(answers.iter().all(Result::is_ok), "{answers:?}");

    let status = herd_in(
        Some(&ctl),
        &[
            "status",
            "--inventory",
            file,
            "--state-dir",
            state,
            "--json",
        ],
    );
    assert_eq!(status.status.code(), Some(0), "status says healthy");
    let json: Value = serde_json::from_slice(&status.stdout).unwrap();
    for machine in json["machines"].as_array().unwrap() {
        assert_eq!(machine["reachable"], true, "{machine}");
        assert_eq!(
            machine["supervisor"], "fallback",
            "no systemd in a namespace"
        );
    }
    let units = json["units"].as_array().unwrap();
    assert_eq!(units.len(), 5, "redis, 2 workers, 2 gateways");
    assert!(units.iter().all(|u| u["running"] == true), "{units:?}");
    let workers: BTreeSet<&str> = json["workers"]
        .as_array()
        .unwrap()
        .iter()
        .map(|w| w["id"].as_str().unwrap())
        .collect();
    assert_eq!(workers, BTreeSet::from(["demo-s1-1", "demo-s2-1"]));

    // `herd scale --on` over ssh: the worker copy up made is reused, the record is on s2.
    let scale = herd_in(
        Some(&ctl),
        &[
            "scale",
            "3",
            "--on",
            "s2",
            "--inventory",
            file,
            "--state-dir",
            state,
        ],
    );
    cleanup.remember();
    assert!(scale.status.success(), "herd scale over ssh failed");
    assert!(remote("s2").join("etc/workers.json").is_file());
    let status = herd_in(
        Some(&ctl),
        &[
            "status",
            "--inventory",
            file,
            "--state-dir",
            state,
            "--json",
        ],
    );
    assert_eq!(status.status.code(), Some(0), "healthy after scale");
    let json: Value = serde_json::from_slice(&status.stdout).unwrap();
    let workers: BTreeSet<&str> = json["workers"]
        .as_array()
        .unwrap()
        .iter()
        .map(|w| w["id"].as_str().unwrap())
        .collect();
    assert_eq!(
        workers,
        BTreeSet::from(["demo-s1-1", "demo-s2-1", "demo-s2-2"])
    );

    let pids = recorded_pids(d);
    assert_eq!(pids.len(), 2 * 6, "a supervisor and a child per unit");
    let down = herd_in(
        Some(&ctl),
        &["down", "--inventory", file, "--state-dir", state],
    );
    assert!(down.status.success(), "herd down over ssh failed");
    let left: Vec<_> = pids.iter().filter(|p| alive(**p)).collect();
    assert!(left.is_empty(), "still running after down: {left:?}");
    assert!(
        !remote("s2").join("etc/workers.json").exists(),
        "down forgets the record"
    );
    let after = herd_in(
        Some(&ctl),
        &["status", "--inventory", file, "--state-dir", state],
    );
    assert_eq!(after.status.code(), Some(3), "nothing runs");
}

#[test]
fn the_systemd_units_pass_systemd_analyze_verify() {
    use herd::inventory::Kind;
    use herd::machine::systemd::unit_file;
    let verify = Command::new("systemd-analyze").arg("--version").output();
    if !verify.is_ok_and(|o| o.status.success()) {
        println!(
            "SKIPPED: systemd-analyze is not installed (infra/test.sh installs the systemd package)"
        );
        return;
    }
    let dir = herd_tests::temp_dir();
    let d = dir.path();
    let base = d.display().to_string();
    for sub in ["etc", "link", "log"] {
        std::fs::create_dir_all(d.join(sub)).unwrap();
    }
    // Each unit as an instance file next to the links and environment files it names.
    let cases = [
        (
            Kind::Worker,
            "worker-demo-m1-1",
            "herd-worker@demo-m1-1.service",
            binaries::WORKER,
        ),
        (
            Kind::Gateway,
            "gateway-gw1",
            "herd-gateway.service",
            binaries::GATEWAY,
        ),
        (Kind::Redis, "redis", "herd-redis.service", binaries::WORKER),
    ];
    let units = d.join("units");
    std::fs::create_dir_all(&units).unwrap();
    let mut paths = Vec::new();
    for (kind, unit, file, binary) in cases {
        let (template, text) = unit_file(kind, &base, unit);
        assert!(template.ends_with(".service"));
        std::os::unix::fs::symlink(binaries::locate(binary).unwrap(), d.join("link").join(unit))
            .unwrap();
        std::fs::write(d.join("etc").join(format!("{unit}.env")), "HERD_ARGS=''\n").unwrap();
        let path = units.join(file);
        std::fs::write(&path, text).unwrap();
        paths.push(path);
    }
    let out = Command::new("systemd-analyze")
        .arg("verify")
        .args(&paths)
        .env("SYSTEMD_LOG_LEVEL", "warning")
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    if stderr.contains("Failed to initialize manager") || stderr.contains("Failed to setup") {
        println!("SKIPPED: systemd-analyze verify cannot run in this container: {stderr}");
        return;
    }
    assert!(out.status.success(), "verify failed: {stderr}");
    // Unknown keys and bad values are only warnings: any line is a failure here.
    assert_eq!(stderr.trim(), "", "verify warned");
}

#[test]
fn two_local_machines_on_loopback_run_a_gateway_pair_without_root() {
    let _serial = serial();
    let dir = herd_tests::temp_dir();
    let name = unique_name("l");
    // Fixed ports would clash with other tests: every listener gets a free one; machine a's
    // two workers take `worker` and `worker + 1`, so both must be free.
    let port = || herd::ports::free_port().unwrap();
    let two_ports = || {
        (0..100)
            .find_map(|_| {
                let first = port();
                let next = first.checked_add(1)?;
                std::net::TcpListener::bind(("127.0.0.1", next))
                    .ok()
                    .map(|_| first)
            })
            .expect("two free ports in a row")
    };
    let text = format!(
        r#"
name = "{name}"
[[machines]]
name = "a"
address = "127.0.0.1"
transport = "local"
[[machines]]
name = "b"
address = "127.0.0.2"
transport = "local"
[redis]
machine = "a"
port = {redis}
[gateways]
machines = ["a", "b"]
preferred = "b"
on_active = "echo active"
port = {public}
admin_port = {admin}
peer_port = {peer}
[[images]]
name = "demo"
total = 3
port = {worker}
machines = ["a", "b"]
"#,
        redis = port(),
        public = port(),
        admin = port(),
        peer = port(),
        worker = two_ports(),
    );
    let file = dir.path().join("inventory.toml");
    std::fs::write(&file, text).unwrap();
    let state = dir.path().join("state");
    let (file, state) = (file.to_str().unwrap(), state.to_str().unwrap());
    let mut cleanup = Cleanup {
        netns: None,
        down: ["down", "--inventory", file, "--state-dir", state]
            .map(String::from)
            .to_vec(),
        roots: vec![Path::new(state).join(format!("inventory-{name}"))],
        pids: BTreeSet::new(),
        prefix: format!("herdinv-{name}-"),
    };
    let up = herd_in(None, &["up", "--inventory", file, "--state-dir", state]);
    cleanup.remember();
    assert!(up.status.success(), "herd up failed");
    let stdout = String::from_utf8_lossy(&up.stdout);
    // The preferred gateway is active; with no floating address users reach its own address.
    let url = stdout
        .split_whitespace()
        .find(|w| w.starts_with("http://127.0.0.2:"))
        .unwrap_or_else(|| panic!("no URL on b: {stdout}"))
        .to_string();
    assert!(
        stdout.contains("active gateway on b, 3 workers healthy"),
        "{stdout}"
    );
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    let machines: BTreeSet<String> = runtime.block_on(async {
        let client = herd_tests::client();
        let mut seen = BTreeSet::new();
        // New workers start with a small share (slow start): ask until both machines answered.
        for _ in 0..200 {
            let response = client.get(format!("{url}/work?ms=1")).send().await.unwrap();
            assert!(response.status().is_success());
            seen.insert(
                response.headers()["x-herd-machine"]
                    .to_str()
                    .unwrap()
                    .to_string(),
            );
            if seen.len() == 2 {
                break;
            }
        }
        seen
    });
    assert_eq!(machines, BTreeSet::from(["a".to_string(), "b".to_string()]));
    let pids = recorded_pids(&cleanup.roots[0]);
    assert_eq!(pids.len(), 2 * 6, "redis, 3 workers, 2 gateways");
    let down = herd_in(None, &["down", "--inventory", file, "--state-dir", state]);
    assert!(down.status.success());
    let left: Vec<_> = pids.iter().filter(|p| alive(**p)).collect();
    assert!(left.is_empty(), "still running after down: {left:?}");
}
