# Sourced by the bench scripts (ab-gateways.sh, copies.sh, instructions.sh, pgo-train.sh,
# session-upstream.sh): what more than one of them needs to set up a run.

# `start_scratch` makes a temp dir, `$work`, and a list of process ids, `$pids`, for the script to
# add the processes it starts to: on exit (or Ctrl-C) they are killed and the dir removed.
start_scratch() {
  work=$(mktemp -d)
  pids=()
  trap scratch_cleanup EXIT INT TERM
}

scratch_cleanup() {
  for pid in "${pids[@]}"; do kill "$pid" 2>/dev/null || true; done
  wait 2>/dev/null || true
  rm -rf "$work"
}

# `announced OUT ROLE` prints the address a herd process announced in its
# `{"event":"listening","role":ROLE,"addr":...}` line of OUT (its stdout file), waiting up to
# 30 s; returns 1 with the tail of OUT and OUT.err if none came.
announced() {
  local out=$1 role=$2
  for _ in $(seq 300); do
    local addr
    addr=$(grep -o "\"role\":\"$role\",\"addr\":\"[^\"]*\"" "$out" 2>/dev/null | head -n1 | sed 's/.*"addr":"\(.*\)"/\1/')
    [ -n "$addr" ] && { echo "$addr"; return 0; }
    sleep 0.1
  done
  echo "no $role address announced; its log:" >&2
  tail -n 5 "$out" "$out.err" >&2
  return 1
}

# `login_cookie BASE_URL BODY` logs in to the demo app (`POST BASE_URL/login` with the JSON BODY,
# or `@FILE`) and prints the session cookie it set (`name=value`); returns 1 if it set none.
login_cookie() {
  local cookie
  cookie=$(curl -s -D - -o /dev/null -H 'content-type: application/json' --data-binary "$2" \
    "$1/login" | awk -F'[ ;]' 'tolower($1) == "set-cookie:" {print $2; exit}')
  [ -n "$cookie" ] || { echo "logging in at $1/login set no cookie" >&2; return 1; }
  echo "$cookie"
}

# `nginx_conf DIR PORT H2PORT UPSTREAM...` prints the bench's nginx configuration
# (infra/bench/nginx.conf.in, as `herd bench proxy` fills it in) for those listeners and
# upstreams (host:port), its files under DIR.
# NGINX_TLS: a server block (one line) put in place of {TLS}, e.g. an HTTPS listener.
nginx_conf() {
  local dir=$1 port=$2 h2port=$3 servers; shift 3
  servers=$(printf '        server %s max_fails=1 fail_timeout=10s;\\n' "$@")
  sed -e "s|{DIR}|$dir|g" -e "s|{PORT}|$port|" -e "s|{H2PORT}|$h2port|" \
    -e "s|{SERVERS}|${servers%\\n}|" -e "s|{TLS}|${NGINX_TLS:-}|" "$(dirname "${BASH_SOURCE[0]}")/nginx.conf.in"
}
