#!/usr/bin/env bash
# What herd-gateway does per request, counted rather than timed: allocations, clock reads,
# system calls and event-loop sleeps, under the load of `herd bench proxy`.
#
#   infra/bench/per-request.sh [SCENARIO] [GATEWAY_BINARY]
#   infra/bench/per-request.sh session /tmp/gw-before
#
# SCENARIO: hello (default), session or h2; GATEWAY_BINARY: default target/release/herd-gateway;
# THREADS: the gateway's serving threads (default 1).
# Runs `herd bench proxy --targets herd` for 8 s at c=64 (one serving thread unless THREADS), and counts over
# 3 s of it with uprobes on glibc (`perf probe`: malloc, realloc, free, clock_gettime) and syscall
# tracepoints. Requests are counted as reads over two: one from the client and one from the worker
# each (`recvfrom`; a keep-alive request arrives in one read at this load). Uprobes slow the
# gateway several-fold, so the run's req/s and µs mean nothing here; the counts per request are
# exact, and stable where timings on a shared VM are not (docs/performance.md, section 9).
# Needs root, perf and release builds (`cargo build --release --bins`).
set -euo pipefail
scenario=${1:-hello}
root=$(cd "$(dirname "$0")/../.." && pwd)
gateway=$(realpath "${2:-$root/target/release/herd-gateway}")
libc=$(ldd "$gateway" | awk '/libc\.so\.6/ {print $3}')
bin=$(mktemp -d)
group=herdreq$$
cleanup() {
  perf probe -q -d "$group:*" 2>/dev/null || true
  [ -n "${bench:-}" ] && kill "$bench" 2>/dev/null || true
  wait 2>/dev/null || true
  rm -rf "$bin"
}
trap cleanup EXIT INT TERM
for function in malloc realloc free clock_gettime; do
  perf probe -q -x "$libc" -a "$group:$function=$function"
done
source "$root/infra/bench/gateway-under-load.sh"
start_gateway_under_load "$bin" "$gateway" "$scenario" 8s "${THREADS:-1}"
sleep 3
events="$group:malloc,$group:realloc,$group:free,$group:clock_gettime"
events+=",syscalls:sys_enter_sendto,syscalls:sys_enter_recvfrom,syscalls:sys_enter_writev"
events+=",syscalls:sys_enter_epoll_wait,context-switches"
perf stat -x, -e "$events" -p "$pid" -- sleep 3 2>"$bin/stat.csv" >/dev/null || { cat "$bin/stat.csv" >&2; exit 1; }
wait "$bench" || true
bench=
awk -F, -v scenario="$scenario" -v gateway="$gateway" '
  { gsub(/^[a-z0-9]+:/, "", $3); gsub(/^sys_enter_/, "", $3); count[$3] = $1; order[n++] = $3 }
  END {
    requests = count["recvfrom"] / 2
    if (requests == 0) { print "no request reached a worker while counting (see the bench output)" > "/dev/stderr"; exit 1 }
    printf "%s, %s: %d requests counted\n", gateway, scenario, requests
    for (i = 0; i < n; i++) printf "  %-16s %6.2f per request\n", order[i], count[order[i]] / requests
  }' "$bin/stat.csv"
