//! The gateway's admin bearer token: a fresh random one for every cluster.

use std::fs::File;
use std::io::Read;

use super::CliError;

/// Random bytes in a token: 256 bits, as hard to guess as any key.
const TOKEN_BYTES: usize = 32;

/// A new token: 32 bytes from the kernel's CSPRNG, as 64 hex digits (safe in headers and
/// environment variables).
pub(crate) fn generate() -> Result<String, CliError> {
    let mut bytes = [0u8; TOKEN_BYTES];
    File::open("/dev/urandom")
        .and_then(|mut random| random.read_exact(&mut bytes))
        .map_err(|source| CliError::Os {
            what: "read random bytes from /dev/urandom for the admin token",
            source,
        })?;
    Ok(bytes.iter().map(|byte| format!("{byte:02x}")).collect())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tokens_are_long_hex_and_differ() {
        let first = generate().unwrap();
        let second = generate().unwrap();
        assert_eq!(first.len(), 64);
        assert!(first.bytes().all(|b| b.is_ascii_hexdigit()));
        assert_ne!(first, second);
    }
}
