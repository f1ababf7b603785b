//! The lease in Redis that makes Redis the third voter of the gateway pair.
//!
//! `{prefix}gateway:lease` holds `{gateway_id}:{epoch}` with a PX TTL; `{prefix}gateway:epoch` is
//! a counter incremented on every acquisition (the fencing epoch), never below the highest epoch
//! the acquiring gateway has seen (so a Redis that lost its data doesn't restart it at 1). Every change is one Lua script,
//! so check-and-set is atomic: nobody takes a lease someone else holds, except that a gateway may
//! take over the exact lease value of a peer whose process it saw die.

use std::time::Duration;

use herd_shared::keys::Keys;
use herd_shared::redis::RedisPool as Pool;
use redis::Script;

/// A lease value: who holds it, under which epoch.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Lease {
    /// The holder's gateway id.
    pub holder: String,
    /// The fencing epoch it was acquired with.
    pub epoch: u64,
}

impl Lease {
    /// Parses `{id}:{epoch}`.
    pub fn parse(value: &str) -> Option<Lease> {
        let (holder, epoch) = value.rsplit_once(':')?;
        Some(Lease {
            holder: holder.to_string(),
            epoch: epoch.parse().ok()?,
        })
    }

    /// `{id}:{epoch}`, as stored.
    pub fn value(&self) -> String {
        format!("{}:{}", self.holder, self.epoch)
    }
}

/// What an acquisition or renewal found.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum LeaseOutcome {
    /// We hold it (newly acquired, or renewed).
    Held(Lease),
    /// Someone else holds it.
    HeldBy(Lease),
    /// Nobody holds it (renewal of a lease that expired).
    Free,
}

/// Why Redis could not answer.
#[derive(Debug, thiserror::Error)]
#[error("lease: {0}")]
pub struct LeaseError(String);

const ACQUIRE: &str = r"
local current = redis.call('GET', KEYS[1])
if current and current ~= ARGV[3] then
  return {0, current}
end
local epoch = redis.call('INCR', KEYS[2])
local known = tonumber(ARGV[4]) or 0
if epoch <= known then
  -- The counter went back (Redis lost its data): never hand out an epoch seen before.
  epoch = known + 1
  redis.call('SET', KEYS[2], epoch)
end
local value = ARGV[1] .. ':' .. epoch
redis.call('SET', KEYS[1], value, 'PX', ARGV[2])
return {1, value}
";

const RENEW: &str = r"
local current = redis.call('GET', KEYS[1])
if current == ARGV[1] then
  redis.call('PEXPIRE', KEYS[1], ARGV[2])
  return {1, current}
end
if current then
  return {0, current}
end
return {0, ''}
";

const RELEASE: &str = r"
if redis.call('GET', KEYS[1]) == ARGV[1] then
  return redis.call('DEL', KEYS[1])
end
return 0
";

/// Reads and changes the lease.
#[derive(Clone)]
pub struct LeaseStore {
    pool: Pool,
    lease_key: String,
    epoch_key: String,
    ttl: Duration,
    acquire: Script,
    renew: Script,
    release: Script,
}

impl std::fmt::Debug for LeaseStore {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("LeaseStore")
            .field("lease_key", &self.lease_key)
            .field("ttl", &self.ttl)
            .finish()
    }
}

impl LeaseStore {
    /// A store on `pool` under `keys`, with leases of `ttl`.
    pub fn new(pool: Pool, keys: &Keys, ttl: Duration) -> Self {
        LeaseStore {
            pool,
            lease_key: keys.gateway_lease(),
            epoch_key: keys.gateway_epoch(),
            ttl,
            acquire: Script::new(ACQUIRE),
            renew: Script::new(RENEW),
            release: Script::new(RELEASE),
        }
    }

    /// Takes the lease for `id` with a new epoch if it is free, or if it holds exactly
    /// `take_over` (the lease of a peer whose process was seen to die). The new epoch is above
    /// `known_epoch` (the highest this gateway has seen) even if Redis lost its counter.
    pub async fn acquire(
        &self,
        id: &str,
        take_over: Option<&Lease>,
        known_epoch: u64,
    ) -> Result<LeaseOutcome, LeaseError> {
        let steal = take_over.map(Lease::value).unwrap_or_default();
        let mut connection = self
            .pool
            .get()
            .await
            .map_err(|e| LeaseError(e.to_string()))?;
        let (won, value): (i64, String) = self
            .acquire
            .key(&self.lease_key)
            .key(&self.epoch_key)
            .arg(id)
            .arg(self.ttl_ms())
            .arg(steal)
            .arg(known_epoch)
            .invoke_async(&mut connection)
            .await
            .map_err(|e| LeaseError(e.to_string()))?;
        Ok(outcome(won == 1, &value))
    }

    /// Extends `lease` if we still hold it.
    pub async fn renew(&self, lease: &Lease) -> Result<LeaseOutcome, LeaseError> {
        let mut connection = self
            .pool
            .get()
            .await
            .map_err(|e| LeaseError(e.to_string()))?;
        let (held, value): (i64, String) = self
            .renew
            .key(&self.lease_key)
            .arg(lease.value())
            .arg(self.ttl_ms())
            .invoke_async(&mut connection)
            .await
            .map_err(|e| LeaseError(e.to_string()))?;
        Ok(outcome(held == 1, &value))
    }

    /// Gives `lease` up (on shutdown or hand-over), if we still hold it.
    pub async fn release(&self, lease: &Lease) -> Result<(), LeaseError> {
        let mut connection = self
            .pool
            .get()
            .await
            .map_err(|e| LeaseError(e.to_string()))?;
        let _: i64 = self
            .release
            .key(&self.lease_key)
            .arg(lease.value())
            .invoke_async(&mut connection)
            .await
            .map_err(|e| LeaseError(e.to_string()))?;
        Ok(())
    }

    fn ttl_ms(&self) -> u64 {
        u64::try_from(self.ttl.as_millis())
            .unwrap_or(u64::MAX)
            .max(1)
    }
}

fn outcome(ours: bool, value: &str) -> LeaseOutcome {
    match (ours, Lease::parse(value)) {
        (true, Some(lease)) => LeaseOutcome::Held(lease),
        (false, Some(lease)) => LeaseOutcome::HeldBy(lease),
        (_, None) => LeaseOutcome::Free,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn lease_values_round_trip() {
        let lease = Lease {
            holder: "gw-1".into(),
            epoch: 42,
        };
        assert_eq!(Lease::parse(&lease.value()), Some(lease));
        assert_eq!(Lease::parse("nope"), None);
        assert_eq!(Lease::parse("gw:x"), None);
    }
}
