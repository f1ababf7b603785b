#!/usr/bin/env bash
# A flame graph of herd-gateway under the load of `herd bench proxy`.
#
#   infra/bench/flamegraph.sh SCENARIO OUT.svg [GATEWAY_BINARY] [THREADS]
#   infra/bench/flamegraph.sh session docs/flamegraphs/session.svg
#
# SCENARIO: hello, session or h2. Runs `herd bench proxy --targets herd` for 10 s at c=64 and
# records 4 s of it with `perf record --call-graph dwarf` (the release profile keeps debug info),
# folded and drawn by inferno (`cargo install inferno`). THREADS: serving threads (default 1, so
# one event loop's stacks are not split over two). Needs root, perf and release builds.
set -euo pipefail
[ $# -ge 2 ] || { sed -n 2,5p "$0" >&2; exit 2; }
scenario=$1 out=$2
root=$(cd "$(dirname "$0")/../.." && pwd)
gateway=$(realpath "${3:-$root/target/release/herd-gateway}")
threads=${4:-1}
command -v inferno-flamegraph >/dev/null || { echo "needs inferno: cargo install inferno" >&2; exit 2; }
work=$(mktemp -d)
cleanup() {
  [ -n "${bench:-}" ] && kill "$bench" 2>/dev/null || true
  wait 2>/dev/null || true
  rm -rf "$work"
}
trap cleanup EXIT INT TERM
source "$root/infra/bench/gateway-under-load.sh"
start_gateway_under_load "$work" "$gateway" "$scenario" 10s "$threads"
sleep 3
perf record -q -F 499 --call-graph dwarf,32768 -o "$work/perf.data" -p "$pid" -- sleep 4 >/dev/null 2>&1
wait "$bench" || true
bench=
perf script -i "$work/perf.data" 2>/dev/null | inferno-collapse-perf --all >"$work/folded"
inferno-flamegraph --minwidth 0.1 --title "herd-gateway, $scenario, c=64, threads=$threads" \
  <"$work/folded" >"$out"
echo "$out: $(wc -l <"$work/folded") distinct stacks"
