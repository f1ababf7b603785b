#!/usr/bin/env bash
# Proxy throughput and CPU per request: herd-gateway vs HAProxy vs nginx, same box, same run.
#
# Backends: one nginx process (1 worker) answering "ok" on two loopback ports. Load: wrk over
# keep-alive connections. For each proxy: requests/s from wrk and the proxy's own CPU time
# (utime+stime from /proc) divided by the requests it served.
#
#   cargo build --release -p herd-gateway
#   gateway/bench/throughput.sh [duration_s=10] [connections=64]
#
# Needs wrk, nginx, haproxy (Debian: apt-get install wrk nginx haproxy). Loopback only; every
# process it starts is stopped on exit.
set -euo pipefail

DURATION=${1:-10}
CONNS=${2:-64}
ROOT=$(cd "$(dirname "$0")/../.." && pwd)
GATEWAY=${HERD_BENCH_GATEWAY:-$ROOT/target/release/herd-gateway}
WORK=$(mktemp -d /tmp/herd-bench.XXXXXX)
PIDS=()
cleanup() {
  for pid in "${PIDS[@]}"; do kill "$pid" 2>/dev/null || true; done
  wait 2>/dev/null || true
  [ -n "${KEEP:-}" ] || rm -rf "$WORK"
}
trap cleanup EXIT

for tool in wrk nginx haproxy; do
  command -v "$tool" >/dev/null || { echo "missing: $tool (apt-get install $tool)" >&2; exit 1; }
done
[ -x "$GATEWAY" ] || { echo "missing $GATEWAY: cargo build --release -p herd-gateway" >&2; exit 1; }

free_port() { python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])'; }
wait_port() { for _ in $(seq 100); do (exec 3<>/dev/tcp/127.0.0.1/"$1") 2>/dev/null && return 0; sleep 0.05; done; echo "port $1 never opened" >&2; exit 1; }
cpu_ticks() { awk '{print $14+$15}' "/proc/$1/stat"; }
TICK=$(getconf CLK_TCK)

B1=$(free_port); B2=$(free_port)
mkdir -p "$WORK/ngx-be" "$WORK/ngx-px"
cat > "$WORK/backend.conf" <<CONF
daemon off; master_process off; worker_processes 1; pid $WORK/ngx-be/pid; error_log $WORK/ngx-be/error.log warn;
events { worker_connections 8192; }
http {
  access_log off; keepalive_requests 1000000;
  client_body_temp_path $WORK/ngx-be; proxy_temp_path $WORK/ngx-be; fastcgi_temp_path $WORK/ngx-be;
  uwsgi_temp_path $WORK/ngx-be; scgi_temp_path $WORK/ngx-be;
  server { listen 127.0.0.1:$B1 backlog=4096; listen 127.0.0.1:$B2 backlog=4096;
           location / { add_header x-herd-worker nginx; return 200 "ok\n"; } }
}
CONF
nginx -c "$WORK/backend.conf" -p "$WORK/ngx-be" & PIDS+=($!)
wait_port "$B1"; wait_port "$B2"

run() { # name pid port
  local name=$1 pid=$2 port=$3
  wrk -t1 -c"$CONNS" -d1s "http://127.0.0.1:$port/" >/dev/null   # warm-up (pools, caches)
  local before; before=$(cpu_ticks "$pid")
  local out; out=$(wrk -t2 -c"$CONNS" -d"${DURATION}s" "http://127.0.0.1:$port/")
  local after; after=$(cpu_ticks "$pid")
  local rps; rps=$(awk '/Requests\/sec/ {print $2}' <<<"$out")
  local total; total=$(awk '/requests in/ {print $1}' <<<"$out")
  local errors; errors=$(awk '/Non-2xx|Socket errors/ {print}' <<<"$out" | tr '\n' ' ')
  local p99; p99=$(awk '/Latency/ {print $2}' <<<"$out")
  local us; us=$(awk -v t=$((after - before)) -v hz="$TICK" -v n="$total" 'BEGIN { printf "%.1f", t / hz * 1e6 / n }')
  printf "| %s | %s | %s | %s | %s |\n" "$name" "$rps" "$us" "$p99" "${errors:-none}"
}

echo "| proxy | req/s | CPU µs/request (proxy) | mean latency | errors |"
echo "|---|---|---|---|---|"

# herd-gateway (defaults, health checks of the backends' /readyz = any 200).
GP=$(free_port)
HERD_GATEWAY_LISTEN=127.0.0.1:$GP HERD_GATEWAY_ADMIN__LISTEN=127.0.0.1:0 \
  HERD_GATEWAY_WORKERS=127.0.0.1:$B1,127.0.0.1:$B2 HERD_LOG=warn \
  "$GATEWAY" --log-format json >"$WORK/gw.out" 2>"$WORK/gw.log" & GPID=$!; PIDS+=($GPID)
wait_port "$GP"
run herd-gateway "$GPID" "$GP"

# HAProxy (anchor hapE: 2 threads, round robin, http-reuse always).
HP=$(free_port)
cat > "$WORK/haproxy.cfg" <<CONF
global
    nbthread 2
    maxconn 9000
defaults
    mode http
    timeout connect 2s
    timeout client 30s
    timeout server 30s
    timeout http-keep-alive 30s
    http-reuse always
frontend fe
    bind 127.0.0.1:$HP backlog 4096
    default_backend be
backend be
    balance roundrobin
    server b1 127.0.0.1:$B1
    server b2 127.0.0.1:$B2
CONF
haproxy -db -f "$WORK/haproxy.cfg" >"$WORK/haproxy.log" 2>&1 & HPID=$!; PIDS+=($HPID)
wait_port "$HP"
run haproxy "$HPID" "$HP"

# nginx as a proxy (anchor ngx1: 1 worker, upstream keepalive 64).
NP=$(free_port)
cat > "$WORK/proxy.conf" <<CONF
daemon off; master_process off; worker_processes 1; pid $WORK/ngx-px/pid;
error_log $WORK/ngx-px/error.log warn; worker_rlimit_nofile 20000;
events { worker_connections 8192; }
http {
  access_log off; keepalive_requests 100000; keepalive_timeout 65s;
  client_body_temp_path $WORK/ngx-px; proxy_temp_path $WORK/ngx-px; fastcgi_temp_path $WORK/ngx-px;
  uwsgi_temp_path $WORK/ngx-px; scgi_temp_path $WORK/ngx-px;
  upstream backends { server 127.0.0.1:$B1; server 127.0.0.1:$B2; keepalive 64; keepalive_requests 100000; }
  server { listen 127.0.0.1:$NP backlog=4096;
           location / { proxy_pass http://backends; proxy_http_version 1.1; proxy_set_header Connection ""; } }
}
CONF
nginx -c "$WORK/proxy.conf" -p "$WORK/ngx-px" & NPID=$!; PIDS+=($NPID)
wait_port "$NP"
run nginx "$NPID" "$NP"
