//! The Redis key schema, in one place so that workers and gateways agree on it.
//!
//! Every key starts with a configurable prefix (default `herd:`), so several clusters or test runs
//! can share one Redis without meeting.
//!
//! Keys that one script touches together carry the same Redis Cluster hash tag (`{…}`), so they
//! live in one slot and the script runs on a cluster as on one Redis:
//! - a session, its write lease and the alias left behind by a regeneration are tagged with the
//!   session's *home* tag, the first [`SESSION_TAG_LEN`] characters of its id; a regenerated id
//!   keeps those characters (see the worker's `session::id`), so the alias and the new key share
//!   the slot;
//! - a user's session index is tagged with the user name (sessions of one user may live in other
//!   slots: "log out everywhere" visits them one by one, see docs/sessions.md);
//! - the gateway lease and epoch share the tag `{gateway}`.
//!
//! The layout is the same on one Redis. Sessions written before it (`{prefix}session:{id}`,
//! [`Keys::legacy_session`]) are read and moved to the new key on first access.

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

    /// `{prefix}session:{tag}:{id}` (braces literal around the tag, the id's first
    /// [`SESSION_TAG_LEN`] characters): one session's data, with a TTL equal to the idle timeout.
    pub fn session(&self, id: &str) -> String {
        // Built by hand: `format!` took 1 800 instructions per key (section 49).
        let tag = session_tag(id);
        let mut key = String::with_capacity(self.prefix.len() + 12 + tag.len() + id.len());
        for part in [self.prefix.as_str(), "session:{", tag, "}:", id] {
            key.push_str(part);
        }
        key
    }

    /// What every session key starts with (`{prefix}session:`); the scripts build an alias'
    /// target key from it the same way [`Keys::session`] does.
    pub fn session_prefix(&self) -> String {
        format!("{}session:", self.prefix)
    }

    /// The session's write lease, in the session's slot.
    pub fn session_lease(&self, id: &str) -> String {
        format!("{}:lease", self.session(id))
    }

    /// `{prefix}session:{id}` without a hash tag: where sessions were stored before the cluster
    /// layout (read once and moved, on one Redis only).
    pub fn legacy_session(&self, id: &str) -> String {
        format!("{}session:{id}", self.prefix)
    }

    /// `{prefix}user-sessions:{user}` (braces literal: the user is the hash tag): the set of a
    /// user's session ids ("log out everywhere").
    pub fn user_sessions(&self, user: &str) -> String {
        format!("{}user-sessions:{{{user}}}", self.prefix)
    }

    /// The index before the cluster layout, still read by "log out everywhere" on one Redis.
    pub fn legacy_user_sessions(&self, user: &str) -> String {
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

    /// `{prefix}{gateway}:lease`: `{gateway_id}:{epoch}` of the active gateway, with a PX TTL.
    /// Same slot as the epoch (one script changes both).
    pub fn gateway_lease(&self) -> String {
        format!("{}{{gateway}}:lease", self.prefix)
    }

    /// `{prefix}{gateway}:epoch`: the fencing epoch, incremented on every takeover.
    pub fn gateway_epoch(&self) -> String {
        format!("{}{{gateway}}:epoch", self.prefix)
    }
}

/// Characters of a session id that form its hash tag (16 bits of hex: 65 536 tags spread the
/// sessions over all 16 384 slots).
pub const SESSION_TAG_LEN: usize = 4;

/// The hash tag of session `id`: its first [`SESSION_TAG_LEN`] characters.
pub fn session_tag(id: &str) -> &str {
    id.get(..SESSION_TAG_LEN).unwrap_or(id)
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
        assert_eq!(keys.session("abcdef"), "herd:session:{abcd}:abcdef");
        assert_eq!(
            keys.session_lease("abcdef"),
            "herd:session:{abcd}:abcdef:lease"
        );
        assert_eq!(keys.session("ab"), "herd:session:{ab}:ab");
        assert_eq!(keys.legacy_session("abc"), "herd:session:abc");
        assert_eq!(keys.user_sessions("ann"), "herd:user-sessions:{ann}");
        assert_eq!(keys.legacy_user_sessions("ann"), "herd:user-sessions:ann");
        assert_eq!(keys.worker("w1"), "herd:worker:w1");
        assert_eq!(keys.worker_pattern(), "herd:worker:*");
        assert_eq!(keys.events(), "herd:events");
        assert_eq!(keys.gateway_lease(), "herd:{gateway}:lease");
        assert_eq!(keys.gateway_epoch(), "herd:{gateway}:epoch");
        assert_eq!(Keys::new("t1:").session("x"), "t1:session:{x}:x");
    }
}
