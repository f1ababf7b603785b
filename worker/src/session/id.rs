//! Session ids: 192 bits from the operating system's CSPRNG-seeded generator, as lowercase hex.
//!
//! Ids are opaque. A cookie value that is not exactly this shape is ignored (the request gets a
//! fresh session), so a malformed or oversized cookie never reaches Redis.

use herd_shared::keys::SESSION_TAG_LEN;
use rand::RngCore;

/// Random bytes in an id (192 bits; the floor is 128).
const ID_BYTES: usize = 24;
/// Length of an id in characters.
pub(crate) const ID_LEN: usize = ID_BYTES * 2;

/// A new random session id.
pub(crate) fn generate() -> String {
    let mut bytes = [0u8; ID_BYTES];
    // ThreadRng is a CSPRNG (ChaCha12) seeded and periodically reseeded from the OS.
    rand::rng().fill_bytes(&mut bytes);
    let mut id = String::with_capacity(ID_LEN);
    for byte in bytes {
        id.push(char::from(HEX[usize::from(byte >> 4)]));
        id.push(char::from(HEX[usize::from(byte & 0x0f)]));
    }
    id
}

/// A new id for a session moving away from `old` (login): fresh random characters after the
/// first [`SESSION_TAG_LEN`] of `old`, its Redis Cluster hash tag, so the new key and the alias
/// at the old one live in one slot (one script moves the session). 176 bits stay random.
pub(crate) fn regenerate(old: &str) -> String {
    let fresh = generate();
    match (old.get(..SESSION_TAG_LEN), fresh.get(SESSION_TAG_LEN..)) {
        (Some(tag), Some(rest)) => format!("{tag}{rest}"),
        _ => fresh,
    }
}

// A regenerated id keeps the tag: the rest must still be at least 128 random bits.
const _: () = assert!((ID_LEN - SESSION_TAG_LEN) * 4 >= 128);

const HEX: &[u8; 16] = b"0123456789abcdef";

/// Whether `value` has the shape of an id this module generates.
pub(crate) fn is_well_formed(value: &str) -> bool {
    value.len() == ID_LEN
        && value
            .bytes()
            .all(|b| matches!(b, b'0'..=b'9' | b'a'..=b'f'))
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::HashSet;

    #[test]
    fn a_regenerated_id_keeps_the_tag_and_nothing_else() {
        let old = generate();
        let new = regenerate(&old);
        assert!(is_well_formed(&new), "{new}");
        assert_eq!(new[..SESSION_TAG_LEN], old[..SESSION_TAG_LEN]);
        assert_ne!(new[SESSION_TAG_LEN..], old[SESSION_TAG_LEN..]);
    }

    #[test]
    fn ids_are_long_hex_and_unique() {
        let ids: HashSet<String> = (0..10_000).map(|_| generate()).collect();
        assert_eq!(ids.len(), 10_000);
        for id in ids.iter().take(100) {
            assert!(is_well_formed(id), "{id}");
            assert!(id.len() * 4 >= 128);
        }
    }

    #[test]
    fn ids_use_all_bits() {
        // Every hex digit shows up in every position across many ids: no constant nibbles.
        let ids: Vec<String> = (0..2_000).map(|_| generate()).collect();
        for position in 0..ID_LEN {
            let digits: HashSet<u8> = ids.iter().map(|id| id.as_bytes()[position]).collect();
            assert_eq!(digits.len(), 16, "position {position}");
        }
    }

    #[test]
    fn malformed_values_are_rejected() {
        let good = generate();
        assert!(is_well_formed(&good));
        for bad in [
            String::new(),
            good[1..].to_string(),
            format!("{good}0"),
            good.to_uppercase(),
            format!("{}g", &good[1..]),
            "../../etc/passwd".into(),
            format!("{}*", &good[1..]),
        ] {
            assert!(!is_well_formed(&bad), "{bad:?}");
        }
    }
}
