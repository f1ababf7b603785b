#!/usr/bin/env bash
# A/B of herd-gateway builds against HAProxy, interleaved, on the same two hello workers.
#
#   infra/bench/ab-gateways.sh ROUNDS DURATION CONNECTIONS GATEWAY_BINARY...
#   infra/bench/ab-gateways.sh 4 5s 64 /tmp/gw-before target/release/herd-gateway
#
# For comparing two builds of the gateway (a change against its parent) when `herd bench proxy`
# (one gateway, all scenarios) is too coarse. Each round runs `wrk -t2 -c CONNECTIONS -d DURATION`
# against HAProxy (infra/bench/haproxy.cfg.in) and then each gateway in turn, and prints req/s,
# wrk's p99 and the target's CPU µs per request (utime + stime of its threads from /proc); at the
# end, each later gateway against the first, round by round and as the median of those ratios.
# Uses loopback ports 18081-18082 (workers), 18090-18091 (HAProxy), 18100+ (gateways); everything
# it starts is stopped on exit. Needs wrk, haproxy, bc and a release build of herd-worker.
set -euo pipefail
[ $# -ge 4 ] || { sed -n 2,5p "$0" >&2; exit 2; }
rounds=$1 duration=$2 connections=$3; shift 3
root=$(cd "$(dirname "$0")/../.." && pwd)
worker=$root/target/release/herd-worker
dir=$(mktemp -d)
pids=()
cleanup() {
  for pid in "${pids[@]}"; do kill "$pid" 2>/dev/null || true; done
  wait 2>/dev/null || true
  rm -rf "$dir"
}
trap cleanup EXIT INT TERM

for port in 18081 18082; do
  HERD_WORKER_LISTEN=127.0.0.1:$port HERD_WORKER_ID=w$port HERD_WORKER_MACHINE=ab \
    HERD_WORKER_REGISTRY__ENABLED=false HERD_WORKER_APP=hello HERD_LOG=warn \
    "$worker" >"$dir/w$port.log" 2>&1 &
  pids+=($!)
done
servers='    server w1 127.0.0.1:18081 check inter 500ms\n    server w2 127.0.0.1:18082 check inter 500ms'
sed -e "s|{PID}|$dir/haproxy.pid|" -e "s|{PORT}|18090|" -e "s|{H2PORT}|18091|" \
  -e "s|{SERVERS}|$servers|" -e "s|{TLS}||" "$root/infra/bench/haproxy.cfg.in" >"$dir/haproxy.cfg"
haproxy -f "$dir/haproxy.cfg" -db >"$dir/haproxy.log" 2>&1 &
pids+=($!)
names=(haproxy) ports=(18090) targets=($!)
port=18100
for gateway in "$@"; do
  HERD_GATEWAY_LISTEN=127.0.0.1:$port HERD_GATEWAY_ADMIN__LISTEN=127.0.0.1:$((port + 1)) \
    HERD_GATEWAY_WORKERS=127.0.0.1:18081,127.0.0.1:18082 HERD_GATEWAY_REGISTRY__ENABLED=false \
    HERD_LOG=warn "$gateway" >"$dir/gw$port.log" 2>&1 &
  pids+=($!)
  names+=("$gateway") ports+=("$port") targets+=($!)
  port=$((port + 10))
done
sleep 2
for pid in "${pids[@]}"; do
  kill -0 "$pid" 2>/dev/null || { echo "a process did not start; logs in $dir:" >&2; tail -n 3 "$dir"/*.log >&2; exit 1; }
done

cpu_ticks() { # utime + stime of every thread of $1
  local sum=0 fields
  for stat in /proc/"$1"/task/*/stat; do
    read -ra fields <"$stat"
    sum=$((sum + fields[13] + fields[14]))
  done
  echo "$sum"
}
bound=$((${duration%s} + 20))
for i in "${!names[@]}"; do timeout 30 wrk -t2 -c"$connections" -d1s "http://127.0.0.1:${ports[$i]}/" >/dev/null; done
for round in $(seq "$rounds"); do
  for i in "${!names[@]}"; do
    before=$(cpu_ticks "${targets[$i]}")
    out=$(timeout "$bound" wrk -t2 -c"$connections" -d"$duration" --latency "http://127.0.0.1:${ports[$i]}/")
    after=$(cpu_ticks "${targets[$i]}")
    rps=$(awk '/Requests\/sec/ {print $2}' <<<"$out")
    requests=$(awk '/requests in/ {print $1}' <<<"$out")
    p99=$(awk '$1 == "99%" {print $2}' <<<"$out")
    us=$(echo "scale=1; ($after - $before) * 10000 / $requests" | bc)
    errors=$(grep -E 'Non-2xx|Socket errors' <<<"$out" | tr -s ' \n' ' ' || true)
    echo "round $round  ${names[$i]}  req/s $rps  p99 $p99  CPU µs/req $us  $errors"
    echo "$round $i $rps $us" >>"$dir/results"
  done
done
# Against the first gateway, round by round (the VM's speed drifts between rounds; a ratio
# within one round does not), then the median of those ratios.
awk -v first=1 -v n="${#names[@]}" -v names="${names[*]}" '
  { rps[$1, $2] = $3; us[$1, $2] = $4; if ($1 > rounds) rounds = $1 }
  function median(a, k,   i, j, t) {
    for (i = 1; i <= k; i++) for (j = i + 1; j <= k; j++) if (a[j] < a[i]) { t = a[i]; a[i] = a[j]; a[j] = t }
    return k % 2 ? a[(k + 1) / 2] : (a[k / 2] + a[k / 2 + 1]) / 2
  }
  END {
    split(names, name, " ")
    for (g = first + 1; g < n; g++) {
      line = ""
      for (r = 1; r <= rounds; r++) {
        speed[r] = rps[r, g] / rps[r, first]; cost[r] = us[r, g] / us[r, first]
        line = line sprintf(" %.2f/%.2f", speed[r], cost[r])
      }
      printf "%s / %s per round (req/s / CPU per request):%s\n", name[g + 1], name[first + 1], line
      printf "  median: req/s %.3f×, CPU per request %.3f×\n", median(speed, rounds), median(cost, rounds)
    }
  }' "$dir/results"
