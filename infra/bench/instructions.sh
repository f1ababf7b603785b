#!/usr/bin/env bash
# How many instructions herd-gateway executes per request, counted exactly under valgrind's
# callgrind, and in which functions: the user-space work of one request, free of the timing noise
# of a shared VM (which has no hardware counters; docs/performance.md, section 11).
#
#   infra/bench/instructions.sh [SCENARIO] [GATEWAY_BINARY] [REQUESTS]
#   infra/bench/instructions.sh h1 /tmp/gw-before 20000
#
# SCENARIO: h1 (default; HTTP/1.1 keep-alive), close (HTTP/1.1 `Connection: close`, a new
# connection per request, loaded by wrk for REQUESTS seconds: the count is what it completed) or h2 (h2c, 8 streams per connection), both
# `GET /` through the gateway (one serving thread) to two herd-worker hello upstreams (set
# UPSTREAM=hyper for `herd bench upstream`, a plain hyper server, or UPSTREAM=node for
# infra/bench/node-hello.js, Node.js's http server with its `Connection: keep-alive` and
# `Keep-Alive` on every answer, RESPONSE_BYTES=N for answers N bytes long, CHUNKED=1 for chunked
# ones; needs node); or session: HTTP/1.1
# `GET /me` with a logged-in session cookie to two demo-app workers, which read the session
# from a redis-server the script starts (as `herd bench proxy`'s session scenario); tls and
# tls-h2: `GET /` over TLS (HTTP/1.1, or HTTP/2 with 8 streams per connection; an ECDSA P-256
# certificate made with openssl, TLS 1.3, herd-gateway only). GATEWAY_BINARY: default
# target/release/herd-gateway, or `nginx` for the peer of `herd bench proxy` (its
# infra/bench/nginx.conf.in, one worker, in one process), counted the same way. REQUESTS: default 20000, sent by h2load (-n: an exact count) over
# CONNECTIONS (default 16; 1 makes every request a wake-up of its own; STREAMS=1 with h2 and
# tls-h2, whose default is 8 per connection) after 2000 warm-up
# requests; HEADER adds one request header on h1 (`HEADER='Connection: keep-alive'`, as browsers
# send), HEADERS several, any scenario, split at `|` (what a cloud load balancer in front adds:
# `HEADERS='X-Forwarded-For: 203.0.113.7|X-Forwarded-Proto: https|X-Forwarded-Port: 443'`).
# BODY=FILE makes every request a POST with that file as its body (an API's JSON), any scenario.
# Counting starts after the warm-up
# (`callgrind_control --zero`) and ends with a dump right after the last answer; health checks
# are slowed to one a minute so they stay out of the count. Kernel work is not counted
# (valgrind sees user space only); per-request.sh counts system calls.
#
# Prints instructions per request in all, by crate, and the 25 functions with the most, inclusive
# of what they call and exclusive. Valgrind counts each iteration of `rep movsb` / `rep stosb` as
# an instruction: large copies and fills weigh more here than in cycles. Needs valgrind, h2load
# (session: also redis-server and curl) and release builds (`cargo build --release --bins`).
set -euo pipefail
scenario=${1:-h1}
root=$(cd "$(dirname "$0")/../.." && pwd)
gateway=${2:-$root/target/release/herd-gateway}
[ "$gateway" = nginx ] || gateway=$(realpath "$gateway")
requests=${3:-20000}
connections=${CONNECTIONS:-16}
upstream=${UPSTREAM:-herd-worker}
path=/
case $scenario in
  h1) h2load_mode=(--h1 -m 1 ${HEADER:+-H "$HEADER"}) ;;
  close) h2load_mode=() ;;
  h2) h2load_mode=(-m "${STREAMS:-8}") ;;
  session) h2load_mode=(--h1 -m 1); path=/me ;;
  tls) h2load_mode=(--h1 -m 1) ;;
  tls-h2) h2load_mode=(-m "${STREAMS:-8}" --npn-list=h2) ;;
  *) echo "scenario: h1, close, h2, session, tls or tls-h2, not $scenario" >&2; exit 2 ;;
esac
if [ -n "${HEADERS:-}" ]; then
  IFS='|' read -ra extra <<<"$HEADERS"
  for line in "${extra[@]}"; do h2load_mode+=(-H "$line"); done
fi
if [ -n "${BODY:-}" ]; then
  [ -f "$BODY" ] || { echo "BODY: a file to send, not $BODY" >&2; exit 2; }
  h2load_mode+=(-d "$BODY")
fi
scheme=http
case $scenario in tls*) scheme=https ;; esac
if [ "$scheme" = https ] && [ "$gateway" = nginx ]; then
  echo "the tls scenarios count herd-gateway only" >&2; exit 2
fi
for number in "$requests" "$connections"; do
  [[ $number =~ ^[1-9][0-9]{0,6}$ ]] || { echo "REQUESTS and CONNECTIONS: whole numbers from 1, not $number" >&2; exit 2; }
done
tools=(valgrind callgrind_control callgrind_annotate h2load)
[ "$scenario" = close ] && tools+=(wrk)
[ "$scenario" = session ] && tools+=(redis-server curl)
[ "$upstream" = node ] && tools+=(node)
[ "$gateway" = nginx ] && tools+=(nginx curl)
[ "$scheme" = https ] && tools+=(openssl)
for tool in "${tools[@]}"; do
  command -v "$tool" >/dev/null || { echo "needs $tool (apt-get install valgrind nghttp2-client)" >&2; exit 1; }
done
source "$root/infra/bench/common.sh"
start_scratch

app=(HERD_WORKER_APP=hello)
if [ "$scenario" = session ]; then
  redis_port=$(python3 -c 'import socket; s = socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])')
  redis-server --port "$redis_port" --bind 127.0.0.1 --save '' --appendonly no >"$work/redis.out" 2>&1 &
  pids+=($!)
  app=(HERD_WORKER_APP=demo "HERD_WORKER_REDIS__URL=redis://127.0.0.1:$redis_port" HERD_WORKER_REDIS__PREFIX=instr)
fi
workers=()
for index in 1 2; do
  out=$work/upstream-$index.out
  if [ "$upstream" = hyper ] && [ "$scenario" != session ]; then
    "$root/target/release/herd" bench upstream >"$out" 2>"$out.err" &
  elif [ "$upstream" = node ] && [ "$scenario" != session ]; then
    node "$root/infra/bench/node-hello.js" >"$out" 2>"$out.err" &
  else
    env "${app[@]}" HERD_WORKER_LISTEN=127.0.0.1:0 HERD_WORKER_ID=up$index \
      HERD_WORKER_REGISTRY__ENABLED=false HERD_LOG=warn \
      "$root/target/release/herd-worker" --log-format json >"$out" 2>"$out.err" &
  fi
  pids+=($!)
  workers+=("$(announced "$out" public)")
done

out=$work/gateway.out
callgrind=(valgrind --tool=callgrind ${CACHE:+--cache-sim=yes --LL=524288,8,64}
  --callgrind-out-file="$work/callgrind.out")
if [ "$gateway" = nginx ]; then
  # The peer of `herd bench proxy` (infra/bench/nginx.conf.in: one worker), in one process.
  read -r port h2port < <(python3 -c 'import socket
ports = []
for _ in range(2):
    s = socket.socket(); s.bind(("127.0.0.1", 0)); ports.append(s)
print(*(s.getsockname()[1] for s in ports))')
  public=127.0.0.1:$([ "$scenario" = h2 ] && echo "$h2port" || echo "$port")
  nginx_conf "$work" "$port" "$h2port" "${workers[@]}" |
    sed 's|master_process on;|master_process off;|' >"$work/nginx.conf"
  "${callgrind[@]}" nginx -c "$work/nginx.conf" -p "$work" >"$out" 2>"$out.err" &
  gateway_pid=$!
  pids+=("$gateway_pid")
  for _ in $(seq 100); do
    curl -s -o /dev/null "http://127.0.0.1:$port/" && break
    sleep 0.2
  done
else
  tls=()
  if [ "$scheme" = https ]; then
    openssl req -x509 -newkey ec -pkeyopt ec_paramgen_curve:prime256v1 -nodes -days 2 \
      -subj /CN=bench.test -keyout "$work/key.pem" -out "$work/cert.pem" 2>/dev/null
    tls=(HERD_GATEWAY_TLS__ENABLED=true HERD_GATEWAY_TLS__LISTEN=127.0.0.1:0
      "HERD_GATEWAY_TLS__CERT=$work/cert.pem" "HERD_GATEWAY_TLS__KEY=$work/key.pem")
  fi
  env "${tls[@]}" HERD_GATEWAY_LISTEN=127.0.0.1:0 HERD_GATEWAY_ADMIN__LISTEN=127.0.0.1:0 \
    HERD_GATEWAY_WORKERS=$(IFS=,; echo "${workers[*]}") HERD_GATEWAY_REGISTRY__ENABLED=false \
    HERD_GATEWAY_THREADS=1 HERD_GATEWAY_HEALTH__INTERVAL=60s HERD_LOG=warn \
    "${callgrind[@]}" "$gateway" --log-format json >"$out" 2>"$out.err" &
  gateway_pid=$!
  pids+=("$gateway_pid")
  public=$(announced "$out" public)
  [ "$scheme" = https ] && public=$(announced "$out" tls)
fi
if [ "$scenario" = session ]; then
  # A logged-in session (the demo app's `POST /login`); every request then reads it from Redis.
  for _ in $(seq 50); do
    curl -s -o /dev/null "http://${workers[0]}/readyz" && break
    sleep 0.1
  done
  cookie=$(login_cookie "http://${workers[0]}" '{"user":"bench"}')
  h2load_mode+=(-H "Cookie: $cookie")
fi
if [ "$scenario" = close ]; then
  # A new connection per request: wrk reconnects after each answer that closes its connection
  # (h2load cannot), for a time rather than a count; REQUESTS is then the seconds of load, and
  # the count is what wrk completed (exact but for the few in flight at the end).
  wrk -t 1 -c "$connections" -d 2s -H 'Connection: close' "$scheme://$public$path" >"$work/warmup.txt"
  callgrind_control --zero "$gateway_pid" >/dev/null 2>&1
  wrk -t 1 -c "$connections" -d "${requests}s" -H 'Connection: close' "$scheme://$public$path" >"$work/load.txt"
  callgrind_control --dump=measured "$gateway_pid" >/dev/null 2>&1
  requests=$(awk '/requests in/ {print $1}' "$work/load.txt")
  grep -q 'Non-2xx\|Socket errors' "$work/load.txt" && { cat "$work/load.txt" >&2; exit 1; }
  succeeded=$requests
else
  h2load -n 2000 -c "$connections" -t 1 "${h2load_mode[@]}" "$scheme://$public$path" >"$work/warmup.txt"
  callgrind_control --zero "$gateway_pid" >/dev/null 2>&1
  h2load -n "$requests" -c "$connections" -t 1 "${h2load_mode[@]}" "$scheme://$public$path" >"$work/load.txt"
  callgrind_control --dump=measured "$gateway_pid" >/dev/null 2>&1
  succeeded=$(awk '/^requests:/ {print $8}' "$work/load.txt")
fi
[ -n "${KEEP:-}" ] && cp "$work"/callgrind.out.* "$KEEP"
if [ "$succeeded" != "$requests" ]; then
  echo "only $succeeded of $requests requests succeeded:" >&2
  cat "$work/load.txt" >&2
  exit 1
fi
dump=$(ls "$work"/callgrind.out.* | head -n1)
total=$(awk '/^summary:|^totals:/ {print $2; exit}' "$dump")
printf '%s, %s via %s, %d connections: %d requests, %.0f instructions per request\n' \
  "$gateway" "$scenario" "$upstream" "$connections" "$requests" "$(echo "$total / $requests" | bc -l)"
if [ -n "${CACHE:-}" ]; then
  # The simulated caches' misses per request, by the names of callgrind's events line.
  awk -v requests="$requests" '
    /^events:/ { for (i = 2; i <= NF; i++) name[i] = $i }
    /^summary:|^totals:/ {
      for (i = 2; i <= NF; i++) count[name[i]] = $i
      printf "  cache misses per request: L1 data read %.1f, write %.1f; last level (512 KiB) data read %.1f, write %.1f; L1 instruction %.1f\n",
        count["D1mr"] / requests, count["D1mw"] / requests, count["DLmr"] / requests, count["DLmw"] / requests, count["I1mr"] / requests
      exit
    }' "$dump"
fi
# Lines of callgrind_annotate as "count<TAB>file:function [object]", minus the frames that hold
# every request (thread start, the event loop): at or above 90 % of the total.
functions() {
  callgrind_annotate "$1" --auto=no --threshold=100 "$dump" 2>/dev/null |
    awk -v total="$total" '
      /^ *[0-9,]+ \( *[0-9.]+%\)  / {
        count = $1; gsub(/,/, "", count); count += 0
        sub(/^ *[0-9,]+ \( *[0-9.]+%\) +/, "")
        if (count < 0.9 * total) printf "%s\t%s\n", count, $0
      }'
}
echo "  by crate of the function (exclusive), per request:"
functions --inclusive=no | awk -F'\t' -v requests="$requests" '
  {
    where = $2
    if (where ~ /libc\.so/) crate = "glibc (" (where ~ /mem(set|cpy|move)/ ? "memset/memcpy" : "malloc, other") ")"
    else {
      name = substr(where, index(where, ":") + 1)
      sub(/^</, "", name); sub(/::.*/, "", name); sub(/ .*/, "", name)
      crate = name
    }
    sum[crate] += $1
  }
  END { for (crate in sum) printf "    %8.0f  %s\n", sum[crate] / requests, crate }' | sort -rn | awk "NR <= 14"
for mode in inclusive exclusive; do
  echo "  the 25 functions with the most instructions per request ($mode):"
  functions --inclusive=$([ "$mode" = inclusive ] && echo yes || echo no) | awk "NR <= 25" |
    awk -F'\t' -v requests="$requests" '{ printf "    %8.0f  %s\n", $1 / requests, substr($2, 1, 120) }'
done
