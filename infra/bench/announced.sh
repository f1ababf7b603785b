# Sourced by instructions.sh and pgo-train.sh: `announced OUT ROLE` prints the address a herd
# process announced in its `{"event":"listening","role":ROLE,"addr":...}` line of OUT (its
# stdout file), waiting up to 30 s; returns 1 with the tail of OUT and OUT.err if none came.
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
