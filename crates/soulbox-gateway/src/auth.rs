//! envd access control at the gateway (protocol doc §4.1, §4.4): the per-sandbox access token,
//! and the signed `/files` URLs that stand in for it.

use base64::Engine;
use base64::engine::general_purpose::STANDARD_NO_PAD;
use sha2::{Digest, Sha256};

/// `v1_` + base64(sha256("<path>:<operation>:<username>:<token>[:<expiration>]")), no padding.
pub fn signature(
    path: &str,
    operation: &str,
    username: &str,
    token: &str,
    expiration: Option<&str>,
) -> String {
    let mut h = Sha256::new();
    h.update(path.as_bytes());
    h.update(b":");
    h.update(operation.as_bytes());
    h.update(b":");
    h.update(username.as_bytes());
    h.update(b":");
    h.update(token.as_bytes());
    if let Some(exp) = expiration {
        h.update(b":");
        h.update(exp.as_bytes());
    }
    format!("v1_{}", STANDARD_NO_PAD.encode(h.finalize()))
}

/// Equality whose time does not depend on where the inputs differ.
pub fn ct_eq(a: &[u8], b: &[u8]) -> bool {
    if a.len() != b.len() {
        return false;
    }
    a.iter().zip(b).fold(0u8, |acc, (x, y)| acc | (x ^ y)) == 0
}

/// The signature parameters of a `/files` request.
#[derive(Debug, Default, PartialEq, Eq)]
pub struct SignedParams {
    pub path: String,
    pub username: String,
    pub signature: Option<String>,
    pub expiration: Option<String>,
}

impl SignedParams {
    pub fn from_query(query: Option<&str>) -> SignedParams {
        let mut p = SignedParams::default();
        for (k, v) in url::form_urlencoded::parse(query.unwrap_or("").as_bytes()) {
            match k.as_ref() {
                "path" => p.path = v.into_owned(),
                "username" => p.username = v.into_owned(),
                "signature" => p.signature = Some(v.into_owned()),
                "signature_expiration" => p.expiration = Some(v.into_owned()),
                _ => {}
            }
        }
        p
    }

    /// Whether the request carries a signature that `token` made for `operation` and that has
    /// not expired at `now` (unix seconds).
    pub fn verify(&self, operation: &str, token: &str, now: i64) -> bool {
        let Some(sig) = &self.signature else {
            return false;
        };
        if let Some(exp) = &self.expiration {
            match exp.parse::<i64>() {
                Ok(exp) if exp >= now => {}
                _ => return false,
            }
        }
        let expected = signature(
            &self.path,
            operation,
            &self.username,
            token,
            self.expiration.as_deref(),
        );
        ct_eq(expected.as_bytes(), sig.as_bytes())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Test vectors of the protocol doc §4.4.
    #[test]
    fn protocol_doc_vectors() {
        assert_eq!(
            signature("/home/user/a.txt", "read", "", "envd-tok", None),
            "v1_6dakjGnvKhNSfRNG/dQ2gy2NDm8AyH3/ElC5bYvpqt0"
        );
        assert_eq!(
            signature(
                "/home/user/a.txt",
                "write",
                "user",
                "envd-tok",
                Some("1700000000")
            ),
            "v1_EVXhonI4FXkRVacIEW8ENJNFSOAqeucb1cj8/KGjBkc"
        );
    }

    #[test]
    fn verify_checks_operation_token_and_expiry() {
        let q = "path=%2Fhome%2Fuser%2Fa.txt&username=user&signature=v1_EVXhonI4FXkRVacIEW8ENJNFSOAqeucb1cj8%2FKGjBkc&signature_expiration=1700000000";
        let p = SignedParams::from_query(Some(q));
        assert_eq!(p.path, "/home/user/a.txt");
        assert!(p.verify("write", "envd-tok", 1_699_999_999));
        assert!(p.verify("write", "envd-tok", 1_700_000_000));
        assert!(!p.verify("write", "envd-tok", 1_700_000_001), "expired");
        assert!(!p.verify("read", "envd-tok", 0), "other operation");
        assert!(!p.verify("write", "other-tok", 0), "other sandbox");
        assert!(!SignedParams::from_query(Some("path=/a")).verify("read", "t", 0));
        let garbage_exp = SignedParams {
            signature: Some(signature("/a", "read", "", "t", Some("soon"))),
            path: "/a".into(),
            expiration: Some("soon".into()),
            ..SignedParams::default()
        };
        assert!(!garbage_exp.verify("read", "t", 0));
    }

    #[test]
    fn ct_eq_basics() {
        assert!(ct_eq(b"abc", b"abc"));
        assert!(!ct_eq(b"abc", b"abd"));
        assert!(!ct_eq(b"abc", b"ab"));
    }
}
