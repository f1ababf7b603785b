#!/usr/bin/env bash
# The traffic a profile-guided build of herd-gateway learns from (infra/build-pgo.sh), and a
# smoke test of any gateway build: every request must succeed.
#
#   infra/bench/pgo-train.sh GATEWAY_BINARY
#   REQUESTS=1000 infra/bench/pgo-train.sh target/pgo/herd-gateway
#
# Starts a redis-server, two demo-app workers (WORKER_BINARY, default target/release/herd-worker)
# and GATEWAY_BINARY with a cleartext and a TLS listener (a throwaway self-signed certificate),
# then sends through the gateway, with h2load: small GETs (`/healthz`) and session reads (`GET
# /me` with a cookie) over HTTP/1.1, with and without a browser's `Connection: keep-alive`; the
# same over HTTP/2 cleartext; logins (`POST /login`, a JSON body) and a 32 KB answer (`GET /cart`
# of a 300-line cart) over both; and HTTPS over HTTP/1.1 and HTTP/2. REQUESTS (default 20000) scales every load. The gateway is stopped with
# SIGTERM and must exit cleanly: an instrumented build writes its profile then (to
# LLVM_PROFILE_FILE, passed through). Exits 1, with h2load's report, if any request failed.
# Loopback only; everything started is stopped on exit. Needs h2load, redis-server, curl,
# openssl, python3.
set -euo pipefail
[ $# -eq 1 ] || { sed -n 5,6p "$0" >&2; exit 2; }
root=$(cd "$(dirname "$0")/../.." && pwd)
gateway=$(realpath "$1")
worker=$(realpath "${WORKER_BINARY:-$root/target/release/herd-worker}")
requests=${REQUESTS:-20000}
for binary in "$gateway" "$worker"; do
  [ -x "$binary" ] && [ -f "$binary" ] || { echo "no executable at $binary" >&2; exit 2; }
done
# From 1000: the smallest loads (a tenth) keep at least one request per connection.
[[ $requests =~ ^[1-9][0-9]{3,6}$ ]] || { echo "REQUESTS: a whole number from 1000 to 9999999, not $requests" >&2; exit 2; }
for tool in h2load redis-server curl openssl python3; do
  command -v "$tool" >/dev/null || { echo "needs $tool (apt-get install nghttp2-client redis-server curl openssl python3)" >&2; exit 1; }
done
source "$root/infra/bench/common.sh"
start_scratch

redis_port=$(python3 -c 'import socket; s = socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])')
redis-server --port "$redis_port" --bind 127.0.0.1 --save '' --appendonly no >"$work/redis.out" 2>&1 &
pids+=($!)
workers=()
for index in 1 2; do
  out=$work/worker-$index.out
  HERD_WORKER_APP=demo HERD_WORKER_REDIS__URL=redis://127.0.0.1:$redis_port HERD_WORKER_REDIS__PREFIX=pgo \
    HERD_WORKER_LISTEN=127.0.0.1:0 HERD_WORKER_ID=train$index HERD_WORKER_REGISTRY__ENABLED=false \
    HERD_LOG=warn "$worker" --log-format json >"$out" 2>"$out.err" &
  pids+=($!)
  workers+=("$(announced "$out" public)")
done

openssl req -x509 -newkey ec -pkeyopt ec_paramgen_curve:prime256v1 -nodes -days 2 \
  -subj /CN=train.test -addext subjectAltName=DNS:train.test \
  -keyout "$work/key.pem" -out "$work/cert.pem" 2>/dev/null
out=$work/gateway.out
HERD_GATEWAY_LISTEN=127.0.0.1:0 HERD_GATEWAY_ADMIN__LISTEN=127.0.0.1:0 \
  HERD_GATEWAY_WORKERS=$(IFS=,; echo "${workers[*]}") HERD_GATEWAY_REGISTRY__ENABLED=false \
  HERD_GATEWAY_TLS__ENABLED=true HERD_GATEWAY_TLS__LISTEN=127.0.0.1:0 \
  HERD_GATEWAY_TLS__CERT="$work/cert.pem" HERD_GATEWAY_TLS__KEY="$work/key.pem" \
  HERD_GATEWAY_TLS__REDIRECT_HTTP=false HERD_LOG=warn \
  "$gateway" --log-format json >"$out" 2>"$out.err" &
gateway_pid=$!
pids+=("$gateway_pid")
public=$(announced "$out" public)
tls=$(announced "$out" tls)
for _ in $(seq 100); do
  [ "$(curl -s -o /dev/null -w '%{http_code}' "http://$public/healthz")" = 200 ] && break
  sleep 0.1
done
echo '{"user":"train"}' >"$work/login.json"
cookie=$(login_cookie "http://$public" @"$work/login.json")

# One load: NAME REQUESTS h2load-arguments...; every request must succeed (2xx or 3xx).
load() {
  local name=$1 count=$2; shift 2
  local report=$work/$name.txt
  timeout 300 h2load -n "$count" -t 1 "$@" >"$report" 2>&1 || true
  local succeeded
  succeeded=$(awk '/^requests:/ {print $8}' "$report")
  if [ "${succeeded:-0}" != "$count" ]; then
    echo "$name: ${succeeded:-0} of $count requests succeeded:" >&2
    cat "$report" >&2
    exit 1
  fi
  printf '  %-22s %7d requests\n' "$name" "$count"
}
# A second session with a cart of 300 lines: `GET /cart` answers about 32 KB, streamed.
big=$(login_cookie "http://$public" '{"user":"train-big"}')
python3 - "$public" "$big" <<'PY'
import http.client, json, sys
host, cookie = sys.argv[1], sys.argv[2]
connection = http.client.HTTPConnection(host, timeout=10)
for line in range(300):
    body = json.dumps({"item": f"item-{line:03d}-" + "x" * 80, "qty": 1})
    connection.request("POST", "/cart/items", body, {"Content-Type": "application/json", "Cookie": cookie})
    response = connection.getresponse()
    response.read()
    if response.status != 200:
        sys.exit(f"adding line {line} to the cart: status {response.status}")
PY
browser=(-H 'Connection: keep-alive' -H 'Accept: text/html,*/*;q=0.8' -H 'Accept-Language: en' -H 'User-Agent: Mozilla/5.0 (X11; Linux x86_64)')
echo "training through $gateway:"
load h1-small "$requests" -c 64 --h1 -m 1 "http://$public/healthz"
load h1-session "$requests" -c 64 --h1 -m 1 -H "Cookie: $cookie" "http://$public/me"
load h1-browser $((requests / 4)) -c 16 --h1 -m 1 "${browser[@]}" -H "Cookie: $cookie" "http://$public/me"
load h1-login $((requests / 10)) -c 16 --h1 -m 1 -d "$work/login.json" -H 'Content-Type: application/json' "http://$public/login"
load h2-small "$requests" -c 8 -m 8 "http://$public/healthz"
load h2-session $((requests / 2)) -c 8 -m 8 -H "Cookie: $cookie" "http://$public/me"
load h2-login $((requests / 10)) -c 4 -m 4 -d "$work/login.json" -H 'Content-Type: application/json' "http://$public/login"
load h1-large $((requests / 10)) -c 16 --h1 -m 1 -H "Cookie: $big" "http://$public/cart"
load h2-large $((requests / 10)) -c 4 -m 8 -H "Cookie: $big" "http://$public/cart"
load https-h1 $((requests / 4)) -c 16 --h1 -m 1 -H "Cookie: $cookie" "https://$tls/me"
load https-h2 $((requests / 4)) -c 4 -m 8 -H "Cookie: $cookie" "https://$tls/me"

kill -TERM "$gateway_pid"
status=0
wait "$gateway_pid" || status=$?
if [ "$status" != 0 ]; then
  echo "the gateway exited with status $status on SIGTERM; its log:" >&2
  tail -n 5 "$out.err" >&2
  exit 1
fi
echo "the gateway stopped cleanly"
