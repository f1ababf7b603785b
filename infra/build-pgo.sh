#!/usr/bin/env bash
# Builds herd-gateway optimized with a profile of its own traffic (profile-guided optimization,
# PGO): about a quarter fewer instructions and 0.85x the CPU per request of the plain release
# build (docs/performance.md, section 24). Takes two release builds of the gateway and a minute
# of training traffic; the result is target/pgo/herd-gateway, which the herd CLI uses with
#
#   HERD_BIN_DIR=target/pgo ./infra/herd up        (also with --inventory; herd bench proxy, ...)
#
# Steps: an instrumented build (`-Cprofile-generate`, in target/pgo/instrumented), the traffic of
# infra/bench/pgo-train.sh through it (HTTP/1.1, HTTP/2, HTTPS, session reads, request bodies),
# `llvm-profdata merge`, the optimized build (`-Cprofile-use`, in target/pgo/optimized), and the
# same traffic, smaller, through the result as a smoke test. `--target` is passed so that
# RUSTFLAGS reach the gateway and its dependencies but not build scripts and proc macros.
# Installs what it needs when missing: rustup's llvm-tools component (llvm-profdata matching
# rustc's LLVM; else Debian's llvm-N of the same major version), and as root on Debian h2load,
# redis-server, curl, openssl, python3.
# REQUESTS scales the training traffic (default 20000; see pgo-train.sh); WORKER_BINARY is the
# herd-worker it goes to (default: a release build, made first).
set -euo pipefail
root=$(cd "$(dirname "$0")/.." && pwd)
cd "$root"
target_dir=${CARGO_TARGET_DIR:-$root/target}
pgo=$target_dir/pgo
host=$(rustc -vV | awk '/^host:/ {print $2}')

missing=()
command -v h2load >/dev/null || missing+=(nghttp2-client)
command -v redis-server >/dev/null || missing+=(redis-server)
command -v curl >/dev/null || missing+=(curl)
command -v openssl >/dev/null || missing+=(openssl)
command -v python3 >/dev/null || missing+=(python3)
if [ ${#missing[@]} -gt 0 ]; then
  if [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null; then
    echo "installing: ${missing[*]}"
    apt-get update -qq
    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "${missing[@]}" >/dev/null
  else
    echo "build-pgo needs: ${missing[*]}; install with: sudo apt-get install -y ${missing[*]}" >&2
    exit 1
  fi
fi
profdata=$(rustc --print sysroot)/lib/rustlib/$host/bin/llvm-profdata
if [ ! -x "$profdata" ]; then
  echo "installing rustup's llvm-tools (llvm-profdata)"
  rustup component add llvm-tools || true
fi
if [ ! -x "$profdata" ]; then
  # Else Debian's llvm-profdata of rustc's LLVM major version, which reads what rustc's
  # instrumentation writes.
  major=$(rustc -vV | awk '/^LLVM version:/ {split($3, v, "."); print v[1]}')
  if ! command -v "llvm-profdata-$major" >/dev/null && [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null; then
    apt-get update -qq
    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "llvm-$major" >/dev/null || true
  fi
  profdata=$(command -v "llvm-profdata-$major" || true)
  [ -n "$profdata" ] || {
    echo "build-pgo needs llvm-profdata of LLVM $major: rustup component add llvm-tools, or apt-get install llvm-$major" >&2
    exit 1
  }
fi

# The worker the training traffic goes to (its speed does not matter to the profile).
worker=${WORKER_BINARY:-}
if [ -z "$worker" ]; then
  echo "== herd-worker (release build), for the training traffic"
  cargo build --release --bin herd-worker -q
  worker=$target_dir/release/herd-worker
fi

# Thin LTO over four codegen units for both builds, not the release profile's fat LTO: with the
# profile, fat LTO gave the same instructions per request (docs/performance.md section 33), and
# each of the two builds took longer.
export CARGO_PROFILE_RELEASE_LTO=thin CARGO_PROFILE_RELEASE_CODEGEN_UNITS=4

echo "== instrumented gateway"
rm -rf "$pgo/profiles"
mkdir -p "$pgo/profiles"
RUSTFLAGS="${RUSTFLAGS:-} -Cprofile-generate=$pgo/profiles" \
  cargo build --release -q --target "$host" --target-dir "$pgo/instrumented" --bin herd-gateway

echo "== training"
LLVM_PROFILE_FILE="$pgo/profiles/gateway-%p-%m.profraw" \
  WORKER_BINARY="$worker" \
  infra/bench/pgo-train.sh "$pgo/instrumented/$host/release/herd-gateway"
"$profdata" merge -o "$pgo/gateway.profdata" "$pgo/profiles"

echo "== optimized gateway"
# From scratch: cargo does not see a new profile under the same path as a reason to rebuild.
rm -rf "$pgo/optimized"
RUSTFLAGS="${RUSTFLAGS:-} -Cprofile-use=$pgo/gateway.profdata" \
  cargo build --release -q --target "$host" --target-dir "$pgo/optimized" --bin herd-gateway
# Renamed into place: a gateway running the previous build keeps its file (and a copy over a
# running executable fails).
cp "$pgo/optimized/$host/release/herd-gateway" "$pgo/herd-gateway.new"
mv -f "$pgo/herd-gateway.new" "$pgo/herd-gateway"

echo "== smoke test of the optimized gateway"
REQUESTS=1000 WORKER_BINARY="$worker" \
  infra/bench/pgo-train.sh "$pgo/herd-gateway"
echo "built $pgo/herd-gateway; use it with HERD_BIN_DIR=$pgo"
