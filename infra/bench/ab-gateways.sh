#!/usr/bin/env bash
# A/B of herd-gateway builds against a peer proxy, interleaved, on the same two workers.
#
#   infra/bench/ab-gateways.sh ROUNDS DURATION CONNECTIONS GATEWAY_BINARY...
#   infra/bench/ab-gateways.sh 4 5s 64 /tmp/gw-before target/release/herd-gateway
#   SCENARIO=session PEER=nginx infra/bench/ab-gateways.sh 8 5s 256 target/pgo/herd-gateway
#
# For comparing two builds of the gateway (a change against its parent) when `herd bench proxy`
# (one gateway, all scenarios) is too coarse. Each round loads the peer and then each gateway in
# turn for DURATION with CONNECTIONS, and prints req/s, p99, the target's CPU µs per request
# (utime + stime of all its processes from /proc, and each apart; 10 ms ticks) and its context
# switches per request (voluntary and not), and where the rest of the machine's CPU went: the
# upstream side's (workers, and Redis on the session route) and the load generator's, per
# request. At the end, each later gateway against the first and each gateway against the peer,
# round by round and the median of those ratios; each target's CPU per request split over the
# machine (medians), with the CPUs busy; and for each gateway the CPU per request at which it
# would serve 1.2x the peer's req/s (docs/performance.md, section 26).
#
# SCENARIO, as in `herd bench proxy`: hello (default; `wrk -t2`, `GET /` to two hello workers),
# session (`wrk -t2`, `GET /me` with a logged-in session cookie to two demo-app workers, which
# read it from a redis-server started here) or h2 (h2c to the hello workers: `h2load -t2`,
# CONNECTIONS/8 connections of 8 streams each; p99 from h2load's request log) or tls (HTTPS/1.1
# keep-alive with `wrk -t2` to the hello workers; one ECDSA P-256 certificate made with openssl,
# served by the peer and every gateway, session resumption on).
# PEER: haproxy (default; infra/bench/haproxy.cfg.in) or nginx (infra/bench/nginx.conf.in).
# UPSTREAM=node (hello, h2, tls): the two upstreams are infra/bench/node-hello.js (Node.js's http
# server, `Connection: keep-alive` and `Keep-Alive` on every answer) instead of herd-worker;
# RESPONSE_BYTES=N makes every answer N bytes long, CHUNKED=1 streams it chunked (a long body;
# docs/performance.md, section 36).
# HEADERS='Name: value|Name: value' adds those request headers to every request (split at `|`):
# what a proxy in front sends, e.g. a cloud load balancer's X-Forwarded-For, X-Forwarded-Proto
# and X-Forwarded-Port (docs/performance.md, section 32). BODY=FILE makes every request a POST
# with that file as its body (an API's JSON; section 35).
# RATE=N offers N requests per second in all (h2load `--rps`, spread over the connections, which
# send in step: bursts; h2load for HTTP/1.1 too) instead of as many as the targets take: every
# target then serves the same load, below what saturates the box (docs/performance.md, section 25).
# CPUS=C (0.1 to 1) starts the peer and each gateway inside a cgroup of its own with a quota of C
# CPUs (cgroup v2 `cpu.max` or v1 `cpu.cfs_quota_us`, period 10 ms), as `herd bench proxy
# --proxy-cpus` does: the proxy alone is then the bound (docs/performance.md, section 27). One
# event loop each: HAProxy gets `nbthread 1`, herd-gateway picks one thread from the quota.
# Uses loopback ports 18081-18082 (workers), 18079 (Redis), 18090-18092 (the peer), 18100+
# (gateways); everything it starts is stopped on exit. Needs wrk (h2: h2load), the peer, bc,
# curl (session: redis-server; tls: openssl) and herd-worker (WORKER_BINARY, default a release
# build).
set -euo pipefail
# `times` and awk read and write numbers with a decimal point.
export LC_ALL=C
[ $# -ge 4 ] || { sed -n 2,6p "$0" >&2; exit 2; }
rounds=$1 duration=$2 connections=$3; shift 3
[[ $rounds =~ ^[1-9][0-9]{0,2}$ ]] || { echo "ROUNDS: a whole number from 1 to 999, not $rounds" >&2; exit 2; }
[[ $duration =~ ^[1-9][0-9]{0,3}s$ ]] || { echo "DURATION: whole seconds with an s (5s), not $duration" >&2; exit 2; }
[[ $connections =~ ^[1-9][0-9]{0,4}$ ]] || { echo "CONNECTIONS: a whole number from 1, not $connections" >&2; exit 2; }
scenario=${SCENARIO:-hello} peer=${PEER:-haproxy} rate=${RATE:-}
case $scenario in hello | session | h2 | tls) ;; *) echo "SCENARIO: hello, session, h2 or tls, not $scenario" >&2; exit 2 ;; esac
case $peer in haproxy | nginx) ;; *) echo "PEER: haproxy or nginx, not $peer" >&2; exit 2 ;; esac
upstream=${UPSTREAM:-herd-worker}
case $upstream in herd-worker | node) ;; *) echo "UPSTREAM: herd-worker or node, not $upstream" >&2; exit 2 ;; esac
if [ "$upstream" = node ]; then
  [ "$scenario" != session ] || { echo "UPSTREAM=node serves hello only: no session scenario" >&2; exit 2; }
  command -v node >/dev/null || { echo "UPSTREAM=node needs node (apt-get install nodejs)" >&2; exit 2; }
fi
cpus=${CPUS:-}
[[ -z $cpus || $cpus =~ ^(0\.[1-9][0-9]*|1(\.0*)?)$ ]] || { echo "CPUS: a share of one CPU from 0.1 to 1, not $cpus" >&2; exit 2; }
[[ -z $rate || $rate =~ ^[1-9][0-9]{0,6}$ ]] || { echo "RATE: requests per second, a whole number from 1, not $rate" >&2; exit 2; }
for gateway in "$@"; do
  [ -x "$gateway" ] || { echo "no executable at $gateway" >&2; exit 2; }
done
root=$(cd "$(dirname "$0")/../.." && pwd)
source "$root/infra/bench/common.sh"
worker=${WORKER_BINARY:-$root/target/release/herd-worker}
[ -x "$worker" ] || { echo "no executable at $worker (WORKER_BINARY)" >&2; exit 2; }
dir=$(mktemp -d)
pids=() cgroups=()
cleanup() {
  for pid in "${pids[@]}"; do kill "$pid" 2>/dev/null || true; done
  wait 2>/dev/null || true
  for cgroup in "${cgroups[@]}"; do rmdir "$cgroup" 2>/dev/null || true; done
  rm -rf "$dir"
}
trap cleanup EXIT
trap 'exit 130' INT TERM

# `new_budget` makes a cgroup with CPUS' quota (per 10 ms) for the next `budgeted` command, or
# none without CPUS; says why and exits when it cannot. Not redirected, unlike the command.
new_budget() {
  budget=
  [ -n "$cpus" ] || return 0
  local quota base
  quota=$(awk -v c="$cpus" 'BEGIN {printf "%d", c * 10000 + 0.5}')
  fail() { echo "CPUS: cannot $1 (needs root and the cgroup cpu controller)" >&2; exit 1; }
  if grep -qw cpu /sys/fs/cgroup/cgroup.controllers 2>/dev/null; then
    echo +cpu >/sys/fs/cgroup/cgroup.subtree_control || fail "enable cpu in /sys/fs/cgroup"
    budget=/sys/fs/cgroup/herd-ab-$$-${#cgroups[@]}
    mkdir "$budget" || fail "create $budget"
    cgroups+=("$budget")
    echo "$quota 10000" >"$budget/cpu.max" || fail "write $budget/cpu.max"
  else
    for base in /sys/fs/cgroup/cpu /sys/fs/cgroup/cpu,cpuacct none; do
      [ -f "$base/cpu.cfs_quota_us" ] && break
    done
    [ "$base" != none ] || fail "find a cgroup v2 with cpu or a v1 cpu hierarchy"
    budget=$base/herd-ab-$$-${#cgroups[@]}
    mkdir "$budget" || fail "create $budget"
    cgroups+=("$budget")
    { echo 10000 >"$budget/cpu.cfs_period_us" && echo "$quota" >"$budget/cpu.cfs_quota_us"; } ||
      fail "write the quota of $budget"
  fi
}

# `budgeted COMMAND...` runs COMMAND in the background, inside the cgroup `new_budget` made.
budgeted() {
  if [ -z "$budget" ]; then
    "$@" &
    return
  fi
  sh -c 'echo $$ >"$0/cgroup.procs" && exec "$@"' "$budget" "$@" &
}

app=(HERD_WORKER_APP=hello)
path=/
if [ "$scenario" = session ]; then
  redis-server --port 18079 --bind 127.0.0.1 --save '' --appendonly no >"$dir/redis.log" 2>&1 &
  pids+=($!) upstream_side=($!)
  app=(HERD_WORKER_APP=demo HERD_WORKER_REDIS__URL=redis://127.0.0.1:18079 HERD_WORKER_REDIS__PREFIX=ab)
  path=/me
fi
# tls: the certificate every proxy serves, and their HTTPS listeners (the peer's on 18092, each
# gateway's two ports above its cleartext one).
haproxy_tls='' gateway_tls=()
if [ "$scenario" = tls ]; then
  openssl req -x509 -newkey ec -pkeyopt ec_paramgen_curve:prime256v1 -nodes -days 2 \
    -subj /CN=bench.test -keyout "$dir/tls-key.pem" -out "$dir/tls-cert.pem" 2>/dev/null
  cat "$dir/tls-cert.pem" "$dir/tls-key.pem" >"$dir/tls-combined.pem"
  haproxy_tls="    bind 127.0.0.1:18092 ssl crt $dir/tls-combined.pem alpn h2,http/1.1 ssl-min-ver TLSv1.2 backlog 4096"
  # One line: common.sh puts it in place of {TLS} with sed.
  export NGINX_TLS="server { listen 127.0.0.1:18092 ssl backlog=4096; ssl_certificate $dir/tls-cert.pem; ssl_certificate_key $dir/tls-key.pem; ssl_protocols TLSv1.2 TLSv1.3; ssl_session_cache shared:SSL:10m; location / { proxy_pass http://backends; proxy_http_version 1.1; proxy_set_header Connection \"\"; } }"
  gateway_tls=(HERD_GATEWAY_TLS__ENABLED=true "HERD_GATEWAY_TLS__CERT=$dir/tls-cert.pem"
    "HERD_GATEWAY_TLS__KEY=$dir/tls-key.pem" HERD_GATEWAY_TLS__MAX_HANDSHAKES=1024)
fi
for port in 18081 18082; do
  if [ "$upstream" = node ]; then
    PORT=$port node "$root/infra/bench/node-hello.js" >"$dir/w$port.log" 2>&1 &
  else
    env "${app[@]}" HERD_WORKER_LISTEN=127.0.0.1:$port HERD_WORKER_ID=w$port HERD_WORKER_MACHINE=ab \
      HERD_WORKER_REGISTRY__ENABLED=false HERD_LOG=warn \
      "$worker" >"$dir/w$port.log" 2>&1 &
  fi
  pids+=($!) upstream_side+=($!)
done
if [ "$peer" = haproxy ]; then
  servers='    server w1 127.0.0.1:18081 check inter 500ms\n    server w2 127.0.0.1:18082 check inter 500ms'
  sed -e "s|{PID}|$dir/haproxy.pid|" -e "s|{PORT}|18090|" -e "s|{H2PORT}|18091|" \
    -e "s|{SERVERS}|$servers|" -e "s|{TLS}|$haproxy_tls|" "$root/infra/bench/haproxy.cfg.in" >"$dir/haproxy.cfg"
  [ -n "$cpus" ] && sed -i 's/nbthread 2/nbthread 1/' "$dir/haproxy.cfg"
  new_budget
  budgeted haproxy -f "$dir/haproxy.cfg" -db >"$dir/haproxy.log" 2>&1
else
  nginx_conf "$dir" 18090 18091 127.0.0.1:18081 127.0.0.1:18082 >"$dir/nginx.conf"
  new_budget
  budgeted nginx -c "$dir/nginx.conf" -p "$dir" >"$dir/nginx.log" 2>&1
fi
pids+=($!)
peer_port=18090
[ "$scenario" = h2 ] && peer_port=18091
[ "$scenario" = tls ] && peer_port=18092
names=("$peer") ports=("$peer_port") targets=($!)
port=18100
for gateway in "$@"; do
  new_budget
  tls_listen=()
  [ "$scenario" = tls ] && tls_listen=("HERD_GATEWAY_TLS__LISTEN=127.0.0.1:$((port + 2))")
  budgeted env "${gateway_tls[@]}" "${tls_listen[@]}" \
    HERD_GATEWAY_LISTEN=127.0.0.1:$port HERD_GATEWAY_ADMIN__LISTEN=127.0.0.1:$((port + 1)) \
    HERD_GATEWAY_WORKERS=127.0.0.1:18081,127.0.0.1:18082 HERD_GATEWAY_REGISTRY__ENABLED=false \
    HERD_LOG=warn "$gateway" >"$dir/gw$port.log" 2>&1
  pids+=($!)
  names+=("$gateway") targets+=($!)
  ports+=($([ "$scenario" = tls ] && echo $((port + 2)) || echo "$port"))
  port=$((port + 10))
done
sleep 2
for pid in "${pids[@]}"; do
  kill -0 "$pid" 2>/dev/null || { echo "a process did not start; logs in $dir:" >&2; tail -n 3 "$dir"/*.log >&2; exit 1; }
done
headers=()
if [ "$scenario" = session ]; then
  # A logged-in session (the demo app's `POST /login`); every request then reads it from Redis.
  cookie=$(login_cookie http://127.0.0.1:18081 '{"user":"bench"}')
  headers=(-H "Cookie: $cookie")
fi
if [ -n "${HEADERS:-}" ]; then
  IFS='|' read -ra extra <<<"$HEADERS"
  for line in "${extra[@]}"; do headers+=(-H "$line"); done
fi
# BODY: every request a POST with that file as its body (wrk through a script, h2load -d).
body_wrk=() body_h2load=()
if [ -n "${BODY:-}" ]; then
  [ -f "$BODY" ] || { echo "BODY: a file to send, not $BODY" >&2; exit 2; }
  { echo 'wrk.method = "POST"'; printf 'wrk.body = [==[%s]==]\n' "$(cat "$BODY")"; } >"$dir/body.lua"
  body_wrk=(-s "$dir/body.lua") body_h2load=(-d "$BODY")
fi

# "utime stime switches" summed over the processes given and their children (nginx's worker):
# CPU in 10 ms ticks (the process's, which keeps its exited threads' too), context switches
# voluntary and not, of each thread.
usage() {
  local user=0 system=0 switches=0 fields pid task
  for pid in "$@" $(for parent in "$@"; do pgrep -P "$parent" || true; done); do
    read -ra fields <"/proc/$pid/stat" 2>/dev/null || continue
    user=$((user + fields[13])) system=$((system + fields[14]))
    for task in /proc/"$pid"/task/*; do
      switches=$((switches + $(awk '/^(non)?voluntary_ctxt_switches:/ {s += $2} END {print s + 0}' "$task/status" 2>/dev/null || echo 0)))
    done
  done
  echo "$user $system $switches"
}
bound=$((${duration%s} + 20))
# The CPU milliseconds (user + system) of this shell's finished children in `times`' output
# saved in file $1 (its second line). `times` runs in this shell, right before and after the load
# generator, so that only the generator finishes between the two.
children_ms() {
  awk 'NR == 2 {
    for (i = 1; i <= 2; i++) { split($i, t, /[ms]/); ms += (t[1] * 60 + t[2]) * 1000 }
    printf "%d", ms
  }' "$1"
}
# One load of DURATION on port $1; sets rps, requests, p99, errors, out (the tool's report) and
# load_ms (the load generator's CPU).
load() {
  local url=http://127.0.0.1:$1$path
  [ "$scenario" = tls ] && url=https://127.0.0.1:$1$path
  if [ "$scenario" = h2 ] || [ -n "$rate" ]; then
    local clients=$connections mode=(--h1 -m1)
    if [ "$scenario" = h2 ]; then
      clients=$((connections / 8 > 0 ? connections / 8 : 1)) mode=(-m8)
    fi
    [ -n "$rate" ] && mode+=(--rps="$(echo "scale=3; $rate / $clients" | bc)")
    times >"$dir/times.before"
    out=$(timeout "$bound" h2load -t2 -c"$clients" "${mode[@]}" "${headers[@]}" "${body_h2load[@]}" \
      -D"${duration%s}" -T5 --log-file "$dir/requests" "$url")
    times >"$dir/times.after"
    rps=$(awk '/^finished in/ {print $4}' <<<"$out")
    requests=$(awk '/^requests:/ {print $8}' <<<"$out")
    # The log's third column: each request's time in µs.
    p99=$(sort -n -k3,3 "$dir/requests" | awk '{t[NR] = $3} END {printf "%.2fms", t[int(NR * 0.99)] / 1000}')
    errors=$(awk '/^requests:/ && ($10 + $12 + $14) > 0 {print "failed/errored/timeout " $10 "/" $12 "/" $14}' <<<"$out")
  else
    times >"$dir/times.before"
    out=$(timeout "$bound" wrk -t2 -c"$connections" -d"$duration" --latency "${headers[@]}" "${body_wrk[@]}" "$url")
    times >"$dir/times.after"
    rps=$(awk '/Requests\/sec/ {print $2}' <<<"$out")
    requests=$(awk '/requests in/ {print $1}' <<<"$out")
    p99=$(awk '$1 == "99%" {print $2}' <<<"$out")
    errors=$(grep -E 'Non-2xx|Socket errors' <<<"$out" | tr -s ' \n' ' ' || true)
  fi
  load_ms=$(($(children_ms "$dir/times.after") - $(children_ms "$dir/times.before")))
}
for i in "${!names[@]}"; do (duration=1s; load "${ports[$i]}") >/dev/null; done
for round in $(seq "$rounds"); do
  for i in "${!names[@]}"; do
    read -r user system switched <<<"$(usage "${targets[$i]}")"
    read -r upstream_user upstream_system _ <<<"$(usage "${upstream_side[@]}")"
    load "${ports[$i]}"
    read -r user_after system_after switched_after <<<"$(usage "${targets[$i]}")"
    read -r upstream_user_after upstream_system_after _ <<<"$(usage "${upstream_side[@]}")"
    if [ "${requests:-0}" -eq 0 ]; then
      echo "round $round: ${names[$i]} served no request:" >&2
      tail -n 20 <<<"$out" >&2
      exit 1
    fi
    switched=$((switched_after - switched))
    # Ticks of 10 ms: µs per request.
    user=$(echo "scale=1; ($user_after - $user) * 10000 / $requests" | bc)
    system=$(echo "scale=1; ($system_after - $system) * 10000 / $requests" | bc)
    us=$(echo "$user + $system" | bc)
    per=$(echo "scale=3; $switched / $requests" | bc)
    upstream=$(echo "scale=1; ($upstream_user_after + $upstream_system_after - $upstream_user - $upstream_system) * 10000 / $requests" | bc)
    load_us=$(echo "scale=1; $load_ms * 1000 / $requests" | bc)
    echo "round $round  ${names[$i]}  req/s $rps  p99 $p99  CPU µs/req $us (user $user, system $system)  switches/req $per  upstream side µs/req $upstream  load generator µs/req $load_us  $errors"
    echo "$round $i $rps $us $upstream $load_us $system" >>"$dir/results"
  done
done
# Against the first gateway, round by round (the VM's speed drifts between rounds; a ratio
# within one round does not), then the median of those ratios.
awk -v n="${#names[@]}" -v names="${names[*]}" -v cpus="$(nproc)" -v budget="$cpus" '
  { rps[$1, $2] = $3; us[$1, $2] = $4; up[$1, $2] = $5; tool[$1, $2] = $6; sys[$1, $2] = $7
    if ($1 > rounds) rounds = $1 }
  function median(a, k,   i, j, t) {
    for (i = 1; i <= k; i++) for (j = i + 1; j <= k; j++) if (a[j] < a[i]) { t = a[i]; a[i] = a[j]; a[j] = t }
    return k % 2 ? a[(k + 1) / 2] : (a[k / 2] + a[k / 2 + 1]) / 2
  }
  function against(g, first,   r, line) {
    line = ""
    for (r = 1; r <= rounds; r++) {
      speed[r] = rps[r, g] / rps[r, first]; cost[r] = us[r, g] / us[r, first]
      line = line sprintf(" %.2f/%.2f", speed[r], cost[r])
    }
    printf "%s / %s per round (req/s / CPU per request):%s\n", name[g + 1], name[first + 1], line
    printf "  median: req/s %.3f×, CPU per request %.3f×\n", median(speed, rounds), median(cost, rounds)
  }
  # Medians over the rounds of what one request cost each part of the box with target g.
  function split_of(g,   r, a, b, c, d, e) {
    for (r = 1; r <= rounds; r++) { a[r] = us[r, g]; b[r] = sys[r, g]; c[r] = up[r, g]; d[r] = tool[r, g]; e[r] = rps[r, g] }
    proxy[g] = median(a, rounds); kernel[g] = median(b, rounds); rest[g] = median(c, rounds) + median(d, rounds)
    served[g] = median(e, rounds)
    printf "%s: proxy %.1f (kernel %.1f) + upstream side %.1f + load generator %.1f = %.1f µs per request at %.0f req/s: %.2f of %d CPUs busy",
      name[g + 1], proxy[g], kernel[g], median(c, rounds), median(d, rounds), proxy[g] + rest[g], served[g],
      (proxy[g] + rest[g]) * served[g] / 1e6, cpus
    if (budget != "") {
      used = 100 * proxy[g] * served[g] / 1e6 / budget
      printf "; proxy budget used %.0f %%%s", used, used < 90 ? " (not bound by its budget: the figure below does not hold)" : ""
    }
    printf "\n"
  }
  END {
    split(names, name, " ")
    for (g = 2; g < n; g++) against(g, 1)
    # Each gateway against the peer too.
    for (g = 1; g < n; g++) against(g, 0)
    print "CPU per request over the machine, medians of the rounds:"
    for (g = 0; g < n; g++) split_of(g)
    # req/s is the CPUs busy over the sum per request: 1.2x the req/s of the peer, with as many
    # CPUs busy and the rest of the machine costing what it did, leaves the gateway this much.
    for (g = 1; g < n; g++) {
      if (served[g] >= 1.2 * served[0]) {
        printf "%s: 1.2x %s'"'"'s req/s met (%.2fx)\n", name[g + 1], name[1], served[g] / served[0]
        continue
      }
      if (budget != "") {
        # Under a budget the proxy is the bound: req/s is the budget over its CPU per request.
        printf "%s: 1.2x %s'"'"'s req/s would need the proxy at %.1f µs per request on its %s CPUs (its kernel part now: %.1f)\n",
          name[g + 1], name[1], budget * 1e6 / (1.2 * served[0]), budget, kernel[g]
        continue
      }
      need = (proxy[g] + rest[g]) * served[g] / (1.2 * served[0]) - rest[g]
      if (need <= 0)
        printf "%s: 1.2x %s'"'"'s req/s would need the proxy at no CPU at all (the rest of the machine alone takes more)\n", name[g + 1], name[1]
      else
        printf "%s: 1.2x %s'"'"'s req/s would need the proxy at %.1f µs per request (its kernel part alone: %.1f)\n",
          name[g + 1], name[1], need, kernel[g]
    }
  }' "$dir/results"
