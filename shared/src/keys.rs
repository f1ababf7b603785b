//! The Redis key schema, in one place so that workers and gateways agree on it.
//!
//! Every key starts with a configurable prefix (default `herd:`), so several clusters or test runs
//! can share one Redis without meeting.

/// Builds herd's Redis keys under one prefix.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Keys {
    prefix: String,
}

impl Keys {
    /// Keys under `prefix` (e.g. `herd:`).
    pub fn new(prefix: impl Into<String>) -> Self {
        Keys {
            prefix: prefix.into(),
        }
    }

    /// The prefix itself.
    pub fn prefix(&self) -> &str {
        &self.prefix
    }

    /// `{prefix}session:{id}`: one session's data, with a TTL equal to the idle timeout.
    pub fn session(&self, id: &str) -> String {
        format!("{}session:{id}", self.prefix)
    }

    /// `{prefix}user-sessions:{user}`: the set of a user's session ids ("log out everywhere").
    pub fn user_sessions(&self, user: &str) -> String {
        format!("{}user-sessions:{user}", self.prefix)
    }

    /// `{prefix}worker:{id}`: a worker's registry entry, with a TTL of about three heartbeats.
    pub fn worker(&self, id: &str) -> String {
        format!("{}worker:{id}", self.prefix)
    }

    /// Pattern matching every registry entry, for `SCAN`.
    pub fn worker_pattern(&self) -> String {
        format!("{}worker:*", self.prefix)
    }

    /// `{prefix}events`: the pub/sub channel of join / leave / drain notices.
    pub fn events(&self) -> String {
        format!("{}events", self.prefix)
    }

    /// `{prefix}gateway:lease`: `{gateway_id}:{epoch}` of the active gateway, with a PX TTL.
    pub fn gateway_lease(&self) -> String {
        format!("{}gateway:lease", self.prefix)
    }

    /// `{prefix}gateway:epoch`: the fencing epoch, incremented on every takeover.
    pub fn gateway_epoch(&self) -> String {
        format!("{}gateway:epoch", self.prefix)
    }
}

impl Default for Keys {
    fn default() -> Self {
        Keys::new("herd:")
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn keys_follow_the_documented_schema() {
        let keys = Keys::default();
        assert_eq!(keys.session("abc"), "herd:session:abc");
        assert_eq!(keys.user_sessions("ann"), "herd:user-sessions:ann");
        assert_eq!(keys.worker("w1"), "herd:worker:w1");
        assert_eq!(keys.worker_pattern(), "herd:worker:*");
        assert_eq!(keys.events(), "herd:events");
        assert_eq!(keys.gateway_lease(), "herd:gateway:lease");
        assert_eq!(keys.gateway_epoch(), "herd:gateway:epoch");
        assert_eq!(Keys::new("t1:").session("x"), "t1:session:x");
    }
}
