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
# 3 s of it with uprobes (`perf probe`) on the allocator's entry points and glibc's clock_gettime,
# and syscall tracepoints. The allocator is mimalloc, linked into the gateway
# (`herd_shared::allocator`): its `mi_*` functions are probed in the binary, and `allocations`
# adds up the four that hand out a block; a gateway built without it (no `mi_malloc` symbol) is
# probed at glibc's malloc, realloc and free. Requests are counted as reads over two: one from
# the client and one from the worker each (`recvfrom`; a keep-alive request arrives in one read
# at this load). Not so on h2, where one read from a client brings several streams: there the
# count of requests is low and every figure per request high (for h2's allocations use
# instructions.sh's callgrind output, exact: 6.1 per request in section 56). Uprobes slow the
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
# Before section 56 of docs/performance.md this probed glibc's malloc only, which the gateway has
# not called for Rust's allocations since it moved to mimalloc (section 42): it read about 0.
# awk reads all of nm's output: `grep -q` would stop early and fail the pipe (pipefail).
if nm "$gateway" 2>/dev/null | awk '$3 == "mi_malloc" { found = 1 } END { exit !found }'; then
  allocator=$gateway
  alloc_functions=(mi_malloc mi_malloc_aligned mi_zalloc mi_zalloc_aligned mi_realloc mi_realloc_aligned mi_free)
else
  allocator=$libc
  alloc_functions=(malloc realloc free)
fi
for function in "${alloc_functions[@]}"; do
  perf probe -q -x "$allocator" -a "$group:$function=$function"
done
perf probe -q -x "$libc" -a "$group:clock_gettime=clock_gettime"
source "$root/infra/bench/gateway-under-load.sh"
start_gateway_under_load "$bin" "$gateway" "$scenario" 8s "${THREADS:-1}"
sleep 3
events=$(printf "$group:%s," "${alloc_functions[@]}")"$group:clock_gettime"
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
    for (i = 0; i < n; i++) printf "  %-18s %6.2f per request\n", order[i], count[order[i]] / requests
    blocks = count["malloc"] + count["mi_malloc"] + count["mi_malloc_aligned"] + count["mi_zalloc"] + count["mi_zalloc_aligned"]
    printf "  %-18s %6.2f per request\n", "allocations", blocks / requests
  }' "$bin/stat.csv"
