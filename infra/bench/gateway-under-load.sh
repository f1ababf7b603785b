# Sourced by per-request.sh and flamegraph.sh: starts `herd bench proxy --targets herd` in the
# background with GATEWAY_BINARY as its gateway, and sets `pid` to that gateway's process.
#
#   start_gateway_under_load WORK_DIR GATEWAY_BINARY SCENARIO DURATION THREADS
#
# WORK_DIR gets the binaries' links and the bench's output (bench.out); `bench` is set to the
# bench's pid for the caller's cleanup. Returns 1 (with the bench's last lines) if no gateway
# appeared within 10 s.
start_gateway_under_load() {
  local work=$1 gateway=$2 scenario=$3 duration=$4 threads=$5
  local root
  root=$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)
  ln -sf "$gateway" "$work/herd-gateway"
  ln -sf "$root/target/release/herd-worker" "$work/herd-worker"
  HERD_BIN_DIR=$work HERD_GATEWAY_THREADS=$threads "$root/target/release/herd" bench proxy \
    --scenarios "$scenario" --targets herd --rounds 1 --duration "$duration" --concurrency 64 \
    --warmup 0s --log-format json >"$work/bench.out" 2>&1 &
  bench=$!
  pid=
  for _ in $(seq 100); do
    pid=$(pgrep -f -n "^$work/herd-gateway" || true)
    [ -n "$pid" ] && return 0
    sleep 0.1
  done
  echo "the gateway did not start:" >&2
  tail -n 5 "$work/bench.out" >&2
  return 1
}
