#!/usr/bin/env bash
# The session route's upstream side alone, without a proxy: one herd-worker running the demo app
# and its own redis-server, loaded by `wrk -t1 -c16` with a logged-in session's `GET /me`
# straight at the worker. Prints per round the worker's req/s and the CPU µs per request of the
# worker and of Redis (utime + stime from /proc), then the worker's RSS, the session reads per
# write to Redis (the worker's /metrics) and Redis's commands per call (INFO commandstats): what
# a session request costs the app and Redis, and how many Redis commands it sends
# (docs/performance.md, sections 45 and 58).
#
#   infra/bench/session-upstream.sh [WORKER_BINARY]
#   ROUNDS=4 DUR=5 infra/bench/session-upstream.sh /tmp/herd-worker-before
#   ROUTE=cart infra/bench/session-upstream.sh
#
# ROUTE: `me` (default: `GET /me`, a session read) or `cart`: `POST /cart/items`, a read and a
# write (the save script) per request, spread over 64 logged-in sessions
# (infra/bench/cart-items.lua; docs/performance.md, section 59).
# WORKER_BINARY: default target/release/herd-worker. ROUNDS (default 3) rounds of DUR seconds
# (default 5) after a 2 s warm-up. Needs redis-server, redis-cli, wrk and curl. Run two builds
# one after the other, several times, to compare them (the VM's speed moves between runs).
set -euo pipefail
root=$(cd "$(dirname "$0")/../.." && pwd)
worker=$(realpath "${1:-$root/target/release/herd-worker}")
rounds=${ROUNDS:-3}
duration=${DUR:-5}
route=${ROUTE:-me}
[[ $route =~ ^(me|cart)$ ]] || { echo "ROUTE: me or cart, not $route" >&2; exit 2; }
for number in "$rounds" "$duration"; do
  [[ $number =~ ^[1-9][0-9]{0,3}$ ]] || { echo "ROUNDS and DUR: whole numbers from 1, not $number" >&2; exit 2; }
done
for tool in redis-server redis-cli wrk curl; do
  command -v "$tool" >/dev/null || { echo "needs $tool (apt-get install redis-server wrk curl)" >&2; exit 1; }
done
source "$root/infra/bench/common.sh"
start_scratch

port=$(python3 -c 'import socket; s = socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])')
redis-server --port "$port" --bind 127.0.0.1 --save '' --appendonly no >"$work/redis.out" 2>&1 &
redis=$!
pids+=("$redis")
for _ in $(seq 50); do redis-cli -p "$port" ping >/dev/null 2>&1 && break; sleep 0.1; done
env HERD_WORKER_APP=demo "HERD_WORKER_REDIS__URL=redis://127.0.0.1:$port" HERD_WORKER_REDIS__PREFIX=bench \
  HERD_WORKER_LISTEN=127.0.0.1:0 HERD_WORKER_ID=w1 HERD_WORKER_REGISTRY__ENABLED=false HERD_LOG=warn \
  "$worker" --log-format json >"$work/worker.out" 2>&1 &
app=$!
pids+=("$app")
addr=$(announced "$work/worker.out" public)
cookie=$(login_cookie "http://$addr" '{"user":"bench"}')
# The load, `wrk -t1 -c16 -d SECONDS` and what it sends.
if [ "$route" = cart ]; then
  for n in $(seq 64); do login_cookie "http://$addr" "{\"user\":\"bench$n\"}"; done >"$work/cookies.txt"
  load=(-s "$root/infra/bench/cart-items.lua" "http://$addr" -- "$work/cookies.txt")
else
  load=(-H "Cookie: $cookie" "http://$addr/me")
fi
wrk -t1 -c16 -d2s "${load[@]}" >/dev/null
redis-cli -p "$port" config resetstat >/dev/null
cpu() { awk '{print $14 + $15}' "/proc/$1/stat"; }
for round in $(seq "$rounds"); do
  w0=$(cpu "$app"); r0=$(cpu "$redis")
  wrk -t1 -c16 -d"${duration}s" "${load[@]}" >"$work/wrk.txt"
  w1=$(cpu "$app"); r1=$(cpu "$redis")
  if grep -q 'Non-2xx\|Socket errors' "$work/wrk.txt"; then cat "$work/wrk.txt" >&2; exit 1; fi
  n=$(awk '/requests in/ {print $1}' "$work/wrk.txt")
  # Clock ticks of 10 ms: µs per request = ticks × 10 000 / requests.
  awk -v r="$round" -v rps="$(awk '/Requests\/sec/ {print $2}' "$work/wrk.txt")" \
    -v w=$((w1 - w0)) -v d=$((r1 - r0)) -v n="$n" \
    'BEGIN { printf "round %d: %.0f req/s, worker %.1f µs, Redis %.1f µs per request\n", r, rps, w * 10000 / n, d * 10000 / n }'
done
echo "worker $(grep -E 'VmRSS|VmHWM' "/proc/$app/status" | tr -s ' \t' ' ' | tr '\n' ' ')"
# The worker's shared Redis lines (session.pipelined, docs/performance.md sections 58 and 59):
# how many session calls went to Redis in one write; nothing when the worker has none.
batch=$(curl -s "http://$addr/metrics" | awk '/redis_line_events_total[{]event="call"[}]/ {c = $2}
  /redis_line_events_total[{]event="write"[}]/ {w = $2} END { if (w > 0) printf "%.1f", c / w }')
[ -n "$batch" ] && echo "session calls per write to Redis: $batch"
echo "Redis commands: $(redis-cli -p "$port" info commandstats | tr -d '\r' | grep '^cmdstat' |
  sed 's/^cmdstat_\([^:]*\):calls=\([0-9]*\).*/\1 \2/' | tr '\n' ',' | sed 's/,$//')"
