//! API keys: `e2b_` + 40 lowercase hex, the only shape some SDK releases accept before sending a
//! request. Only their sha256 is stored.

use rand::RngCore;
use sha2::{Digest, Sha256};

const PREFIX: &str = "e2b_";
const HEX_LEN: usize = 40;

/// Whether `key` has the E2B API key shape.
pub fn is_api_key_format(key: &str) -> bool {
    key.strip_prefix(PREFIX).is_some_and(|hex| {
        hex.len() == HEX_LEN && hex.bytes().all(|b| matches!(b, b'0'..=b'9' | b'a'..=b'f'))
    })
}

/// A fresh random API key (160 bits from the OS RNG).
pub fn generate_api_key() -> String {
    let mut bytes = [0u8; HEX_LEN / 2];
    rand::rng().fill_bytes(&mut bytes);
    format!("{PREFIX}{}", hex::encode(bytes))
}

/// sha256 of the key, lowercase hex: what the database stores.
pub fn hash_api_key(key: &str) -> String {
    hex::encode(Sha256::digest(key.as_bytes()))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn generated_keys_have_the_sdk_shape_and_differ() {
        let a = generate_api_key();
        let b = generate_api_key();
        assert!(is_api_key_format(&a), "{a}");
        assert_ne!(a, b);
    }

    #[test]
    fn format_check_rejects_near_misses() {
        let good = format!("e2b_{}", "a1".repeat(20));
        assert!(is_api_key_format(&good));
        assert!(!is_api_key_format(&good.to_uppercase()));
        assert!(!is_api_key_format(&format!("e2b_{}", "a".repeat(39))));
        assert!(!is_api_key_format(&format!("e2b_{}", "a".repeat(41))));
        assert!(!is_api_key_format(&format!("e2b_{}g", "a".repeat(39))));
        assert!(!is_api_key_format(&format!("sk_{}", "a".repeat(40))));
    }

    #[test]
    fn hash_is_sha256_hex() {
        assert_eq!(
            hash_api_key("abc"),
            "ba7816bf8f01cfea414140de5dae2223b00361a396177a9cb410ff61f20015ad"
        );
    }
}
