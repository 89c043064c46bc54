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

    /// Whether the request carries a signature that `token` made for `operation`, expired or
    /// not.
    pub fn signed_by(&self, operation: &str, token: &str) -> bool {
        let Some(sig) = &self.signature else {
            return false;
        };
        let expected = signature(
            &self.path,
            operation,
            &self.username,
            token,
            self.expiration.as_deref(),
        );
        ct_eq(expected.as_bytes(), sig.as_bytes())
    }

    /// Whether the request carries a signature that `token` made for `operation` and that has
    /// not expired at `now` (unix seconds). Checked in envd's order: the signature, then its
    /// expiry (valid through the second it names).
    pub fn verify(&self, operation: &str, token: &str, now: i64) -> Result<(), SignatureError> {
        if self.signature.is_none() {
            return Err(SignatureError::Missing);
        }
        if !self.signed_by(operation, token) {
            return Err(SignatureError::Invalid);
        }
        match self.expiration.as_deref().map(str::parse::<i64>) {
            None => Ok(()),
            Some(Ok(exp)) if exp >= now => Ok(()),
            Some(Ok(_)) => Err(SignatureError::Expired),
            Some(Err(_)) => Err(SignatureError::Invalid),
        }
    }
}

/// Why a signature does not authorise a `/files` request: envd's 401s, whose messages the
/// SDKs' users (and E2B's tests) see in `{"code": 401, "message": …}`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum SignatureError {
    #[error("missing signature query parameter")]
    Missing,
    #[error("invalid signature")]
    Invalid,
    #[error("signature is already expired")]
    Expired,
}

impl SignatureError {
    /// The message of envd's error body.
    pub fn message(self) -> &'static str {
        match self {
            SignatureError::Missing => "missing signature query parameter",
            SignatureError::Invalid => "invalid signature",
            SignatureError::Expired => "signature is already expired",
        }
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
        assert_eq!(p.verify("write", "envd-tok", 1_699_999_999), Ok(()));
        assert_eq!(p.verify("write", "envd-tok", 1_700_000_000), Ok(()));
        assert_eq!(
            p.verify("write", "envd-tok", 1_700_000_001),
            Err(SignatureError::Expired)
        );
        assert!(
            p.signed_by("write", "envd-tok"),
            "expired, but still its signature"
        );
        // The signature is checked before the expiry, as envd does.
        let invalid = Err(SignatureError::Invalid);
        assert_eq!(p.verify("read", "envd-tok", 1_800_000_000), invalid);
        assert_eq!(p.verify("write", "other-tok", 0), invalid, "other sandbox");
        assert_eq!(
            SignedParams::from_query(Some("path=/a")).verify("read", "t", 0),
            Err(SignatureError::Missing)
        );
        let garbage_exp = SignedParams {
            signature: Some(signature("/a", "read", "", "t", Some("soon"))),
            path: "/a".into(),
            expiration: Some("soon".into()),
            ..SignedParams::default()
        };
        assert_eq!(garbage_exp.verify("read", "t", 0), invalid);
        for e in [
            SignatureError::Missing,
            SignatureError::Invalid,
            SignatureError::Expired,
        ] {
            assert_eq!(e.message(), e.to_string());
        }
    }

    #[test]
    fn ct_eq_basics() {
        assert!(ct_eq(b"abc", b"abc"));
        assert!(!ct_eq(b"abc", b"abd"));
        assert!(!ct_eq(b"abc", b"ab"));
    }
}
