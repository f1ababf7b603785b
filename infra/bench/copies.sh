#!/usr/bin/env bash
# Which moves of the request path copy how many bytes: every `memcpy` herd-gateway makes while
# serving a few requests, caught with gdb, by size and by the line that made it.
#
#   infra/bench/copies.sh [GATEWAY_BINARY] [REQUESTS]
#   infra/bench/copies.sh /tmp/gw-before 10
#   H2=1 infra/bench/copies.sh          # HTTP/2 (h2c) requests instead of HTTP/1.1
#
# callgrind (instructions.sh) says how many instructions `memcpy` takes and from which function;
# this says what each call moved (a 1.8 KB future bound first and then awaited, a 264-byte
# response handed up one more layer), which is what to change. Starts two herd-worker hello
# upstreams and the gateway (one serving thread) on free loopback ports, warms up with 2000
# requests, then attaches gdb and sends REQUESTS (default 10) over one connection, one at a time
# (`H2=1`: as h2c streams, one at a time too). Prints the
# copies of 100 bytes or more that every request made (count a multiple of REQUESTS), largest
# total first: count, bytes, function, file:line. Slow (a breakpoint per copy): keep REQUESTS
# small. Needs gdb, h2load, python3 and release builds (`cargo build --release --bins`).
set -euo pipefail
root=$(cd "$(dirname "$0")/../.." && pwd)
gateway=$(realpath "${1:-$root/target/release/herd-gateway}")
requests=${2:-10}
[[ $requests =~ ^[1-9][0-9]{0,3}$ ]] || { echo "REQUESTS: a whole number from 1 to 9999, not $requests" >&2; exit 2; }
[ -x "$gateway" ] || { echo "no gateway binary at $gateway" >&2; exit 2; }
mode=(--h1)
[ -n "${H2:-}" ] && mode=(-m 1)
for tool in gdb h2load python3; do
  command -v "$tool" >/dev/null || { echo "needs $tool (apt-get install gdb nghttp2-client)" >&2; exit 1; }
done
source "$root/infra/bench/common.sh"
start_scratch

free_port() {
  python3 -c 'import socket; s = socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])'
}
wait_for() { # until something answers HTTP on $1
  for _ in $(seq 100); do
    curl -s -o /dev/null "http://$1/" && return 0
    sleep 0.1
  done
  echo "nothing answers on $1; logs in $work" >&2
  return 1
}

workers=()
for index in 1 2; do
  port=$(free_port)
  HERD_WORKER_LISTEN=127.0.0.1:$port HERD_WORKER_ID=up$index HERD_WORKER_APP=hello \
    HERD_WORKER_REGISTRY__ENABLED=false HERD_LOG=warn \
    "$root/target/release/herd-worker" >"$work/upstream-$index.log" 2>&1 &
  pids+=($!)
  workers+=("127.0.0.1:$port")
  wait_for "127.0.0.1:$port"
done
public=127.0.0.1:$(free_port)
HERD_GATEWAY_LISTEN=$public HERD_GATEWAY_ADMIN__LISTEN=127.0.0.1:0 \
  HERD_GATEWAY_WORKERS=$(IFS=,; echo "${workers[*]}") HERD_GATEWAY_REGISTRY__ENABLED=false \
  HERD_GATEWAY_THREADS=1 HERD_GATEWAY_HEALTH__INTERVAL=60s HERD_LOG=warn \
  "$gateway" >"$work/gateway.log" 2>&1 &
gateway_pid=$!
pids+=("$gateway_pid")
wait_for "$public"
h2load -n 2000 -c 4 -t 1 "${mode[@]}" "http://$public/" >"$work/warmup.txt"
grep -q "^status codes: 2000 2xx" "$work/warmup.txt" || { cat "$work/warmup.txt" >&2; exit 1; }

# A breakpoint on every vector variant of glibc's memcpy: which one `memcpy` resolves to depends
# on the CPU (AVX2 machines take `avx_unaligned_erms`, AVX-512 ones `avx512` or `evex`), and a
# breakpoint on the wrong one never hits. Each hit prints the size and the calling frame.
cat >"$work/gdb.cmds" <<'EOF'
set pagination off
python
import gdb

class Copy(gdb.Breakpoint):
    def stop(self):
        size = int(gdb.parse_and_eval("$rdx"))
        caller = gdb.newest_frame().older()
        name = (caller.name() if caller else None) or "?"
        sal = caller.find_sal() if caller else None
        where = f"{sal.symtab.filename}:{sal.line}" if sal and sal.symtab else "?"
        print(f"COPY {size}\t{name}\t{where}")
        return False

hooked = 0
for vector in ("avx512", "evex", "avx", "sse2"):
    for suffix in ("_unaligned_erms", "_unaligned", "_unaligned_erms_rtm", "_unaligned_rtm"):
        # A name this glibc lacks makes a pending breakpoint, not an error: drop those.
        try:
            copy = Copy(f"__memcpy_{vector}{suffix}", internal=True)
        except gdb.error:
            continue
        if copy.pending:
            copy.delete()
        else:
            hooked += 1
print(f"HOOKED {hooked}")
end
cont
EOF
# The load runs once gdb holds the process; gdb ends when the gateway does.
(
  sleep 2
  h2load -n "$requests" -c 1 -t 1 "${mode[@]}" "http://$public/" >"$work/load.txt"
  kill -TERM "$gateway_pid"
) &
pids+=($!)
timeout 300 gdb -p "$gateway_pid" -batch -x "$work/gdb.cmds" >"$work/gdb.out" 2>&1 || true
grep -q "^status codes: $requests 2xx" "$work/load.txt" || { cat "$work/load.txt" >&2; exit 1; }

grep -q "^HOOKED [1-9]" "$work/gdb.out" || { echo "gdb found no memcpy of glibc to watch; its output is in $work/gdb.out" >&2; exit 1; }
grep -q "^COPY " "$work/gdb.out" || { echo "no memcpy was caught: this CPU's variant may not be among those watched; gdb's output is in $work/gdb.out" >&2; exit 1; }

python3 - "$work/gdb.out" "$requests" <<'EOF'
import collections, re, sys
requests = int(sys.argv[2])
copies = collections.Counter()
for line in open(sys.argv[1]):
    m = re.match(r"COPY (\d+)\t(.*)\t(.*)$", line.rstrip("\n"))
    if not m:
        continue
    function = re.sub(r"<.*", "", m.group(2))
    where = m.group(3).split("/")[-1]
    copies[(int(m.group(1)), function, where)] += 1
rows = [(k, n) for k, n in copies.items() if k[0] >= 100 and n % requests == 0]
calls = sum(n for _, n in rows) // requests
moved = sum(k[0] * n for k, n in rows) // requests
print(f"per request: {calls} copies of 100 bytes or more, {moved} bytes")
for (size, function, where), n in sorted(rows, key=lambda r: -r[0][0] * r[1]):
    print(f"{n // requests:>3} x {size:>5}  {function}  {where}")
EOF
