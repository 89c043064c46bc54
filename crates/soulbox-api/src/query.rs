//! Query strings of the list endpoints (protocol doc §3.5).

use std::borrow::Cow;

use chrono::{DateTime, Utc};
use percent_encoding::percent_decode_str;
use soulbox_store::Order;
use soulbox_wire::rest::SandboxState;

use crate::error::ApiError;

/// Largest page `GET /v2/sandboxes` returns (and the default).
pub const MAX_LIMIT: u32 = 100;

/// Parsed parameters of `GET /v2/sandboxes` (v1 uses only `metadata`).
#[derive(Debug, Default, PartialEq)]
pub struct ListParams {
    pub metadata: Vec<(String, String)>,
    pub states: Vec<SandboxState>,
    pub order: Order,
    pub started_after: Option<DateTime<Utc>>,
    pub template: Option<String>,
    pub limit: u32,
    pub next_token: Option<String>,
}

impl ListParams {
    /// Parses a raw query string; unknown parameters are ignored, bad values are a 400.
    pub fn parse(raw: Option<&str>) -> Result<ListParams, ApiError> {
        let mut p = ListParams {
            limit: MAX_LIMIT,
            ..ListParams::default()
        };
        for (key, value) in url::form_urlencoded::parse(raw.unwrap_or("").as_bytes()) {
            match key.as_ref() {
                "metadata" => p.metadata = parse_metadata(&value)?,
                "state" => p.states = parse_states(&value)?,
                "order" => {
                    p.order = value.parse().map_err(ApiError::bad_request)?;
                }
                "startedAfter" => {
                    let t = DateTime::parse_from_rfc3339(&value).map_err(|e| {
                        ApiError::bad_request(format!("invalid startedAfter '{value}': {e}"))
                    })?;
                    p.started_after = Some(t.with_timezone(&Utc));
                }
                "template" => p.template = Some(value.into_owned()),
                "limit" => p.limit = parse_limit(&value)?,
                "nextToken" => p.next_token = Some(value.into_owned()).filter(|t| !t.is_empty()),
                _ => {}
            }
        }
        Ok(p)
    }
}

fn parse_limit(value: &str) -> Result<u32, ApiError> {
    match value.parse::<u32>() {
        Ok(n) if (1..=MAX_LIMIT).contains(&n) => Ok(n),
        _ => Err(ApiError::bad_request(format!(
            "invalid limit '{value}': expected an integer from 1 to {MAX_LIMIT}"
        ))),
    }
}

fn parse_states(value: &str) -> Result<Vec<SandboxState>, ApiError> {
    value
        .split(',')
        .filter(|s| !s.is_empty())
        .map(|s| {
            SandboxState::parse(s).ok_or_else(|| {
                ApiError::bad_request(format!(
                    "invalid state '{s}': expected 'running' or 'paused'"
                ))
            })
        })
        .collect()
}

/// Decodes the `metadata` filter. The SDKs percent-encode each key and value, form-encode the
/// pairs, and then the HTTP client encodes that string as a query value: so after the query
/// decoding, the whole string is percent-decoded once more, split into `key=value` pairs, and
/// each key and value form-decoded (upstream's recipe).
pub fn parse_metadata(value: &str) -> Result<Vec<(String, String)>, ApiError> {
    let invalid = |why: &str| ApiError::bad_request(format!("invalid metadata '{value}': {why}"));
    let pairs = percent_decode_str(value)
        .decode_utf8()
        .map_err(|_| invalid("not UTF-8"))?;
    let mut out = Vec::new();
    for pair in pairs.split('&').filter(|p| !p.is_empty()) {
        let (k, v) = pair
            .split_once('=')
            .ok_or_else(|| invalid("expected key=value pairs"))?;
        out.push((form_decode(k), form_decode(v)));
    }
    Ok(out)
}

fn form_decode(s: &str) -> String {
    let plus_as_space: Cow<str> = if s.contains('+') {
        Cow::Owned(s.replace('+', " "))
    } else {
        Cow::Borrowed(s)
    };
    percent_decode_str(&plus_as_space)
        .decode_utf8_lossy()
        .into_owned()
}

#[cfg(test)]
mod tests {
    use super::*;

    /// What Python e2b 2.63 sends for `{"k": "v w"}` and `{"acc_note": "a b/c"}` (protocol doc).
    #[test]
    fn metadata_as_python_sends_it() {
        let p = ListParams::parse(Some("metadata=k%3Dv%252520w")).expect("parse");
        assert_eq!(p.metadata, vec![("k".into(), "v w".into())]);
        let p = ListParams::parse(Some("metadata=acc_note%3Da%252520b%252Fc")).expect("parse");
        assert_eq!(p.metadata, vec![("acc_note".into(), "a b/c".into())]);
    }

    /// Encodes like the SDKs: quote each part, urlencode the pairs, then encode as a query value.
    fn sdk_encode(pairs: &[(&str, &str)]) -> String {
        use percent_encoding::{NON_ALPHANUMERIC, utf8_percent_encode};
        let inner: Vec<String> = pairs
            .iter()
            .map(|(k, v)| {
                let k = utf8_percent_encode(k, NON_ALPHANUMERIC).to_string();
                let v = utf8_percent_encode(v, NON_ALPHANUMERIC).to_string();
                format!(
                    "{}={}",
                    utf8_percent_encode(&k, NON_ALPHANUMERIC),
                    utf8_percent_encode(&v, NON_ALPHANUMERIC)
                )
            })
            .collect();
        format!(
            "metadata={}",
            utf8_percent_encode(&inner.join("&"), NON_ALPHANUMERIC)
        )
    }

    #[test]
    fn metadata_with_tricky_values_roundtrips() {
        let values = [
            "plain",
            "with spaces in it",
            "slash/and/more",
            "percent%20not-an-escape%",
            "equals=sign==",
            "ünïcødé ✓ 日本",
            "amp & plus+",
        ];
        for v in values {
            let q = sdk_encode(&[("group", "g 1"), ("value", v)]);
            let p = ListParams::parse(Some(&q)).expect(v);
            assert_eq!(
                p.metadata,
                vec![("group".into(), "g 1".into()), ("value".into(), v.into())],
                "{q}"
            );
        }
    }

    #[test]
    fn metadata_pair_without_equals_is_rejected() {
        assert!(ListParams::parse(Some("metadata=novalue")).is_err());
    }

    #[test]
    fn other_parameters() {
        let p = ListParams::parse(Some(
            "state=running%2Cpaused&order=asc&limit=2&template=base&nextToken=abc\
             &startedAfter=2024-01-02T03%3A04%3A05.123456%2B01%3A00&unknown=1",
        ))
        .expect("parse");
        assert_eq!(p.states, vec![SandboxState::Running, SandboxState::Paused]);
        assert_eq!(p.order, Order::Asc);
        assert_eq!(p.limit, 2);
        assert_eq!(p.template.as_deref(), Some("base"));
        assert_eq!(p.next_token.as_deref(), Some("abc"));
        assert_eq!(
            p.started_after.map(|t| t.to_rfc3339()),
            Some("2024-01-02T02:04:05.123456+00:00".into())
        );
        let d = ListParams::parse(None).expect("defaults");
        assert_eq!(
            (d.limit, d.order, d.states.len()),
            (MAX_LIMIT, Order::Desc, 0)
        );
    }

    #[test]
    fn bad_values_are_rejected() {
        for q in [
            "state=sleeping",
            "order=sideways",
            "limit=0",
            "limit=101",
            "limit=-1",
            "limit=x",
            "startedAfter=yesterday",
        ] {
            let err = ListParams::parse(Some(q)).expect_err(q);
            assert_eq!(err.status, axum::http::StatusCode::BAD_REQUEST, "{q}");
        }
    }
}
