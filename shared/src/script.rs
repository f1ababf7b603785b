//! Lua scripts that herd packs itself: a call of one as `EVALSHA` bytes for the worker's shared
//! Redis line ([`crate::redis_line`]), whose calls are packed commands, or as redis-rs's
//! `ScriptInvocation` for a pooled or cluster connection.
//!
//! redis-rs's `Script` / `ScriptInvocation` keep their packed command to themselves (they run
//! only through a redis-rs connection); this is the same API (`key`, `arg`, the same SHA1) with
//! the arguments kept where both ways can take them.

use redis::ToRedisArgs;

use crate::resp;

/// A Lua script, called by its SHA1.
#[derive(Debug, Clone)]
pub struct Script {
    code: String,
    redis: redis::Script,
}

impl Script {
    /// The script `code`.
    pub fn new(code: &str) -> Self {
        Script {
            code: code.to_owned(),
            redis: redis::Script::new(code),
        }
    }

    /// The script's SHA1, as Redis names it (`EVALSHA`, `SCRIPT EXISTS`).
    pub fn hash(&self) -> &str {
        self.redis.get_hash()
    }

    /// A call of the script with `key` as its first key.
    pub fn key<T: ToRedisArgs>(&self, key: T) -> Invocation<'_> {
        let mut invocation = self.prepare_invoke();
        invocation.key(key);
        invocation
    }

    /// A call of the script with `arg` as its first argument.
    pub fn arg<T: ToRedisArgs>(&self, arg: T) -> Invocation<'_> {
        let mut invocation = self.prepare_invoke();
        invocation.arg(arg);
        invocation
    }

    /// A call of the script with no keys or arguments yet.
    pub fn prepare_invoke(&self) -> Invocation<'_> {
        Invocation {
            script: self,
            keys: Vec::new(),
            args: Vec::new(),
        }
    }
}

/// One call of a [`Script`]: its keys (`KEYS`) and arguments (`ARGV`).
#[derive(Clone)]
pub struct Invocation<'s> {
    script: &'s Script,
    keys: Vec<Vec<u8>>,
    args: Vec<Vec<u8>>,
}

impl std::fmt::Debug for Invocation<'_> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        // Keys and arguments may carry session data: only their counts, as redis-rs prints.
        f.debug_struct("Invocation")
            .field("script", &self.script.hash())
            .field("keys", &self.keys.len())
            .field("args", &self.args.len())
            .finish()
    }
}

impl<'s> Invocation<'s> {
    /// Adds a key (`KEYS[i]`).
    pub fn key<T: ToRedisArgs>(&mut self, key: T) -> &mut Self {
        key.write_redis_args(&mut self.keys);
        self
    }

    /// Adds an argument (`ARGV[i]`).
    pub fn arg<T: ToRedisArgs>(&mut self, arg: T) -> &mut Self {
        arg.write_redis_args(&mut self.args);
        self
    }

    /// The call packed as `EVALSHA sha1 numkeys key… arg…`: one command.
    pub fn pack_by_hash(&self) -> Vec<u8> {
        self.pack(b"EVALSHA", self.script.hash().as_bytes())
    }

    /// The call packed as `EVAL code numkeys key… arg…` (one command; Redis keeps the script
    /// for later `EVALSHA`s): for when Redis answered `NOSCRIPT` (it restarted, or its scripts
    /// were flushed).
    pub fn pack_with_code(&self) -> Vec<u8> {
        self.pack(b"EVAL", self.script.code.as_bytes())
    }

    /// redis-rs's invocation of the same call, for a connection the shared line does not
    /// serve (a pooled one, a cluster's): it sends `EVALSHA` and loads the script on
    /// `NOSCRIPT` itself.
    pub fn to_redis(&self) -> redis::ScriptInvocation<'s> {
        let mut invocation = self.script.redis.prepare_invoke();
        for key in &self.keys {
            invocation.key(key.as_slice());
        }
        for arg in &self.args {
            invocation.arg(arg.as_slice());
        }
        invocation
    }

    fn pack(&self, command: &[u8], script: &[u8]) -> Vec<u8> {
        let room = self
            .keys
            .iter()
            .chain(&self.args)
            .map(|part| part.len() + 16)
            .sum::<usize>()
            + script.len()
            + 48;
        let mut packed = Vec::with_capacity(room);
        let mut digits = itoa::Buffer::new();
        packed.push(b'*');
        let parts = 3 + self.keys.len() + self.args.len();
        packed.extend_from_slice(digits.format(parts).as_bytes());
        packed.extend_from_slice(b"\r\n");
        resp::pack_argument(&mut packed, command);
        resp::pack_argument(&mut packed, script);
        resp::pack_argument(&mut packed, digits.format(self.keys.len()).as_bytes());
        for part in self.keys.iter().chain(&self.args) {
            resp::pack_argument(&mut packed, part);
        }
        packed
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn packs_as_redis_rs_packs_the_same_call() {
        let script = Script::new("return {KEYS[1], ARGV[1], ARGV[2]}");
        let mut invocation = script.key("k:1");
        invocation.arg(42).arg(b"bin\r\nary".as_slice()).arg("");
        // redis-rs's packing of the same call, by `command` with `script` (its hash or code).
        let packed_by_redis = |command: &str, script: &str| {
            redis::cmd(command)
                .arg(script)
                .arg(1)
                .arg("k:1")
                .arg(42)
                .arg(b"bin\r\nary".as_slice())
                .arg("")
                .get_packed_command()
        };
        assert_eq!(
            invocation.pack_by_hash(),
            packed_by_redis("EVALSHA", script.hash())
        );
        assert_eq!(
            invocation.pack_with_code(),
            packed_by_redis("EVAL", "return {KEYS[1], ARGV[1], ARGV[2]}")
        );
        assert_eq!(resp::commands_in(&invocation.pack_by_hash()), Some(1));
        assert_eq!(
            script.hash(),
            redis::Script::new("return {KEYS[1], ARGV[1], ARGV[2]}").get_hash()
        );
    }

    #[test]
    fn a_call_without_keys_counts_none() {
        let script = Script::new("return 1");
        let packed = script.prepare_invoke().pack_by_hash();
        let expected = redis::cmd("EVALSHA")
            .arg(script.hash())
            .arg(0)
            .get_packed_command();
        assert_eq!(packed, expected);
    }
}
