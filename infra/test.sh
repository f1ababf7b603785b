#!/usr/bin/env bash
# herd's whole test suite: installs what the tests need when it is missing (redis-server; and for
# the multi-host tests iproute2, iputils-ping, and iputils' arping, which the gateways use for
# gratuitous ARP; chromium for the dashboard test; nodejs for the Node.js upstream of the bench
# smoke test; prometheus for promtool; curl and openssl for
# the TLS tests; for the inventory tests openssh-server and openssh-client (real sshd in netns
# hosts), curl (herd asks the gateways' admin API from their machine) and systemd
# (`systemd-analyze verify` of the units herd writes)), builds the binaries the end-to-end tests
# start, runs every test in the workspace, and then makes the profile-guided build of the
# gateway. Extra arguments go to `cargo test` (e.g. a test name filter; the PGO build is then
# skipped).
set -euo pipefail
cd "$(dirname "$0")/.."

have() { command -v "$1" >/dev/null 2>&1 || [ -x "/usr/sbin/$1" ] || [ -x "/usr/bin/$1" ]; }

missing=()
have redis-server || missing+=(redis-server)
have ip || missing+=(iproute2)
have ping || missing+=(iputils-ping)
# The gateways call iputils' arping (-U -I); the other Debian `arping` takes other flags.
arping -V 2>&1 | grep -q iputils || missing+=(iputils-arping)
have wrk || missing+=(wrk)
have haproxy || missing+=(haproxy)
have nginx || missing+=(nginx)
have h2load || missing+=(nghttp2-client)
# `herd bench proxy --upstream node` runs Node.js's own http server as the upstream.
have node || missing+=(nodejs)
# The TLS tests drive real clients (gateway/tests/tls.rs); herd's inventory asks the gateways'
# admin API with curl.
have curl || missing+=(curl)
have openssl || missing+=(openssl)
# The dashboard test drives a real headless Chromium; promtool checks the alerting rules.
have chromium || have chromium-browser || missing+=(chromium)
have promtool || missing+=(prometheus)
# The inventory tests run real sshd in netns hosts and verify the systemd units herd writes.
have sshd || missing+=(openssh-server)
have ssh || missing+=(openssh-client)
have systemd-analyze || missing+=(systemd)
if [ ${#missing[@]} -gt 0 ]; then
  if [ "$(id -u)" = 0 ] && have apt-get; then
    echo "installing: ${missing[*]}"
    apt-get update -qq
    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "${missing[@]}" >/dev/null
  else
    echo "the tests need: ${missing[*]}; install with: sudo apt-get install -y ${missing[*]}" >&2
    exit 1
  fi
fi

# The end-to-end tests start the real binaries from target/debug; build them first.
cargo build --workspace --bins
# Every test binary runs even after one fails, so a run shows every failure (the exit status
# still says one failed).
cargo test --workspace --no-fail-fast "$@"

# The whole suite (no test filter) also makes the profile-guided build of the gateway
# (infra/build-pgo.sh: two release builds, its training traffic through the instrumented one,
# and a smoke test of the result), so that the build, its training routes and the result keep
# working. Training goes to the debug worker built above, with a smaller load.
if [ $# -eq 0 ]; then
  echo "== profile-guided build of the gateway (./infra/build-pgo.sh)"
  WORKER_BINARY="${CARGO_TARGET_DIR:-target}/debug/herd-worker" REQUESTS=5000 ./infra/build-pgo.sh
fi
