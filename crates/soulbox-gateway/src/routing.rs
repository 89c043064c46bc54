//! Which sandbox and port a request is for: `E2b-Sandbox-Id` + `E2b-Sandbox-Port` headers
//! first, else a Host of the form `<port>-<id>.<domain>` (protocol doc §2.5).

use http::HeaderMap;
use percent_encoding::percent_decode_str;

pub const SANDBOX_ID_HEADER: &str = "e2b-sandbox-id";
pub const SANDBOX_PORT_HEADER: &str = "e2b-sandbox-port";

/// A request's destination.
#[derive(Debug, PartialEq, Eq)]
pub struct Target {
    pub sandbox_id: String,
    pub port: u16,
}

/// Why the routing headers could not be used.
#[derive(Debug, PartialEq, Eq)]
pub enum RoutingError {
    MissingHeader(&'static str),
    BadPort(String),
}

impl std::fmt::Display for RoutingError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            RoutingError::MissingHeader(h) => write!(f, "Missing header: {h}"),
            RoutingError::BadPort(p) => write!(f, "invalid E2b-Sandbox-Port '{p}'"),
        }
    }
}

/// The target named by the request, `Ok(None)` when it names none.
pub fn target(headers: &HeaderMap, host: Option<&str>) -> Result<Option<Target>, RoutingError> {
    let id = headers.get(SANDBOX_ID_HEADER);
    let port = headers.get(SANDBOX_PORT_HEADER);
    match (id, port) {
        (Some(id), Some(port)) => {
            let port_text = String::from_utf8_lossy(port.as_bytes()).into_owned();
            let port: u16 = port_text
                .trim()
                .parse()
                .map_err(|_| RoutingError::BadPort(port_text))?;
            Ok(Some(Target {
                sandbox_id: String::from_utf8_lossy(id.as_bytes()).into_owned(),
                port,
            }))
        }
        (Some(_), None) => Err(RoutingError::MissingHeader("E2b-Sandbox-Port")),
        (None, Some(_)) => Err(RoutingError::MissingHeader("E2b-Sandbox-Id")),
        (None, None) => Ok(host.and_then(from_host)),
    }
}

/// Parses `<port>-<id>.<domain>[:<listen port>]` as upstream does: the left-most label, split
/// on the first `-`.
fn from_host(host: &str) -> Option<Target> {
    let label = host.split('.').next()?;
    if label.len() == host.len() {
        return None; // no domain part: `localhost`, `127:…` and the like
    }
    let (port, id) = label.split_once('-')?;
    if id.is_empty() || !port.bytes().all(|b| b.is_ascii_digit()) {
        return None;
    }
    Some(Target {
        sandbox_id: id.to_owned(),
        port: port.parse().ok()?,
    })
}

/// Whether `path` reaches the agent's internal `/_soulbox/` endpoints after the decoding and
/// normalisation any HTTP server might apply (percent escapes, `//`, `.`, `..`).
pub fn is_internal(path: &str) -> bool {
    let decoded = percent_decode_str(path).decode_utf8_lossy();
    let mut segments: Vec<&str> = Vec::new();
    for seg in decoded.split(['/', '\\']) {
        match seg {
            "" | "." => {}
            ".." => {
                segments.pop();
            }
            s => segments.push(s),
        }
    }
    segments
        .first()
        .is_some_and(|s| s.eq_ignore_ascii_case("_soulbox"))
}

#[cfg(test)]
mod tests {
    use super::*;
    use http::HeaderValue;

    fn headers(pairs: &[(&'static str, &'static str)]) -> HeaderMap {
        let mut h = HeaderMap::new();
        for (k, v) in pairs {
            h.insert(*k, HeaderValue::from_static(v));
        }
        h
    }

    #[test]
    fn headers_win_over_host() {
        let h = headers(&[("E2b-Sandbox-Id", "abc"), ("E2b-Sandbox-Port", "49983")]);
        assert_eq!(
            target(&h, Some("49999-other.example.com")),
            Ok(Some(Target {
                sandbox_id: "abc".into(),
                port: 49983
            }))
        );
    }

    #[test]
    fn one_header_alone_is_an_error() {
        let h = headers(&[("e2b-sandbox-id", "abc")]);
        assert_eq!(
            target(&h, None),
            Err(RoutingError::MissingHeader("E2b-Sandbox-Port"))
        );
        let h = headers(&[("e2b-sandbox-port", "49983")]);
        assert_eq!(
            target(&h, None),
            Err(RoutingError::MissingHeader("E2b-Sandbox-Id"))
        );
        let h = headers(&[("e2b-sandbox-id", "abc"), ("e2b-sandbox-port", "http")]);
        assert!(matches!(target(&h, None), Err(RoutingError::BadPort(_))));
    }

    #[test]
    fn host_routing() {
        let none = HeaderMap::new();
        assert_eq!(
            target(&none, Some("49983-abc123.sb.example:3001")),
            Ok(Some(Target {
                sandbox_id: "abc123".into(),
                port: 49983
            }))
        );
        for host in [
            "127.0.0.1:3001",
            "localhost:3001",
            "localhost",
            "api.example.com",
            "x-abc.example.com",
            "49983-.example.com",
            "99999999-abc.example.com",
        ] {
            assert_eq!(target(&none, Some(host)), Ok(None), "{host}");
        }
        assert_eq!(target(&none, None), Ok(None));
    }

    #[test]
    fn internal_paths_are_recognised_however_spelled() {
        for p in [
            "/_soulbox/init",
            "//_soulbox/init",
            "/%5Fsoulbox/init",
            "/%5fsoulbox/init",
            "/./_soulbox/init",
            "/files/../_soulbox/init",
            "/_SOULBOX/init",
            "/_soulbox",
        ] {
            assert!(is_internal(p), "{p}");
        }
        for p in [
            "/files",
            "/health",
            "/process.Process/Start",
            "/files/_soulbox",
        ] {
            assert!(!is_internal(p), "{p}");
        }
    }
}
