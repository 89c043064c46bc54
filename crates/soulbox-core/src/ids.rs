//! Sandbox ids and access tokens, from the OS-seeded thread RNG.

use rand::Rng;

const ID_ALPHABET: &[u8; 36] = b"abcdefghijklmnopqrstuvwxyz0123456789";
const ID_LEN: usize = 20;

/// 20 characters of `[a-z0-9]` (what upstream issues; host routing splits on `-` and `.`).
pub fn new_sandbox_id() -> String {
    let mut rng = rand::rng();
    (0..ID_LEN)
        .map(|_| char::from(ID_ALPHABET[rng.random_range(0..ID_ALPHABET.len())]))
        .collect()
}

/// A 256-bit random envd access token, hex.
pub fn new_access_token() -> String {
    let mut bytes = [0u8; 32];
    rand::rng().fill(&mut bytes);
    hex::encode(bytes)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ids_have_the_upstream_shape() {
        for _ in 0..100 {
            let id = new_sandbox_id();
            assert_eq!(id.len(), 20);
            assert!(
                id.bytes()
                    .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit()),
                "{id}"
            );
        }
        assert_ne!(new_sandbox_id(), new_sandbox_id());
    }

    #[test]
    fn tokens_are_long_and_distinct() {
        let t = new_access_token();
        assert_eq!(t.len(), 64);
        assert_ne!(t, new_access_token());
    }
}
