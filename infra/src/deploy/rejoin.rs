//! How a Redis data node of a Sentinel group starts: through [`SCRIPT`], which makes a node
//! that *restarts* (it crashed, was killed, its machine rebooted) rejoin as a replica of the
//! master the sentinels name instead of coming back as the master it was.
//!
//! Why: a master killed under load and restarted by its supervisor used to come back as a
//! master (its config file says so) after a fixed delay. When Sentinel's failover took longer
//! than that delay (a busy machine), the replicas re-attached to it, workers (still told "r1" by
//! the sentinels) wrote to it, and the promotion a moment later discarded what it had
//! acknowledged: one acknowledged cart write lost in CI, 3.5 s after the kill.
//!
//! The script, before it `exec`s redis-server:
//! - at the first start (`herd up` removed [`STARTED`]): starts as planned;
//! - at a restart: asks the sentinels for the master every 200 ms,
//!   - another node named: starts as its replica (`--replicaof`), so it never takes a write;
//!   - this node named, or no sentinel answers, for longer than `HERD_REDIS_REJOIN_WAIT`
//!     seconds (three failover timeouts: a failover that can succeed has done so by then; one
//!     that cannot, with every replica down or no majority of sentinels, has been given up):
//!     starts as configured, and says so in its log. Such a master still refuses writes until
//!     a replica links (`min-replicas-to-write 1`).
//!
//! The same rule as Bitnami's Sentinel start script (ask the sentinels, follow who they name),
//! plus the wait: while the sentinels still name the dead node, a failover may be under way,
//! and a node that answered as master then is exactly the window above. Nothing shortens the
//! wait: a review found that "the sentinels know no replica to promote" is not a safe sign
//! (mid-failover, the promoted replica's flags read `slave,promoted` or `slave,disconnected`),
//! and a master started early gains nothing but reads (without a linked replica it refuses
//! writes).

use crate::inventory::Unit;

/// The script, installed as [`SCRIPT_FILE`] in every machine's directory. Arguments:
/// redis-server's. Environment: `HERD_REDIS_SERVER` (the executable), `HERD_REDIS_SENTINELS`
/// (`ip:port,...`), `HERD_REDIS_SENTINEL_MASTER` (the master's name), `HERD_REDIS_SELF`
/// (`ip:port`), `HERD_REDIS_REJOIN_WAIT` (seconds). Started in the machine's directory.
pub const SCRIPT: &str = r#"#!/bin/sh
# herd's start script for a Redis data node watched by Sentinel (infra/src/deploy/rejoin.rs).
say() { echo "herd-redis-node: $(date -u +%H:%M:%S) $*" >&2; }
# The master the first sentinel that answers names, as "ip port" (empty: none answers). An
# error reply (redis-cli --raw prints it and exits 0) is not two lines with a port: skipped.
named_master() {
  for addr in $(echo "$HERD_REDIS_SENTINELS" | tr ',' ' '); do
    answer=$(timeout 1 redis-cli --raw -h "${addr%:*}" -p "${addr##*:}" \
      SENTINEL get-master-addr-by-name "$HERD_REDIS_SENTINEL_MASTER" 2>/dev/null | tr '\n' ' ')
    set -- $answer
    if [ $# -eq 2 ] && [ "$2" -gt 0 ] 2>/dev/null; then echo "$1 $2"; return; fi
  done
}
if [ -e run/redis.started ]; then
  self="${HERD_REDIS_SELF%:*} ${HERD_REDIS_SELF##*:}"
  deadline=$(( $(date +%s) + ${HERD_REDIS_REJOIN_WAIT:-30} ))
  waited=
  while :; do
    master=$(named_master)
    if [ -n "$master" ] && [ "$master" != "$self" ]; then
      say "restarted; the sentinels name $master as the master: rejoining as its replica"
      exec "$HERD_REDIS_SERVER" "$@" --replicaof $master
    fi
    if [ "$(date +%s)" -ge "$deadline" ]; then
      say "restarted; no failover within ${HERD_REDIS_REJOIN_WAIT:-30} s (the sentinels name ${master:-nothing: none answers}): starting as configured"
      break
    fi
    [ -z "$waited" ] && say "restarted; the sentinels name ${master:-nothing (none answers)}: waiting for them to name another master"
    waited=1
    sleep 0.2
  done
fi
touch run/redis.started
exec "$HERD_REDIS_SERVER" "$@"
"#;

/// Where [`SCRIPT`] goes in a machine's directory.
pub const SCRIPT_FILE: &str = "herd-redis-node.sh";

/// The marker a data node leaves at its first start (relative to its machine's directory);
/// `herd up` removes it, so that only later starts are restarts.
pub const STARTED: &str = "run/redis.started";

/// The environment key that marks a unit as started through [`SCRIPT`].
pub const SENTINELS_ENV: &str = "HERD_REDIS_SENTINELS";

/// Whether `unit` starts through [`SCRIPT`] (a data node of a Sentinel group).
pub fn wraps(unit: &Unit) -> bool {
    unit.env.iter().any(|(key, _)| key == SENTINELS_ENV)
}
