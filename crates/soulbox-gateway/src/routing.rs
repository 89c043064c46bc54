//! Which sandbox and port a request is for: `E2b-Sandbox-Id` + `E2b-Sandbox-Port` headers
//! first, else a Host of the form `<port>-<id>.<domain>` (protocol doc §2.5).

use http::{HeaderMap, Uri};
use percent_encoding::percent_decode_str;
use soulbox_wire::tunnel::parse_port;

pub const SANDBOX_ID_HEADER: &str = "e2b-sandbox-id";
pub const SANDBOX_PORT_HEADER: &str = "e2b-sandbox-port";

/// Longest sandbox id a host or header may name (ours are 20 characters).
const MAX_ID_LEN: usize = 64;

/// A request's destination.
#[derive(Debug, PartialEq, Eq)]
pub struct Target {
    pub sandbox_id: String,
    pub port: u16,
}

/// Why the request's routing information cannot be used.
#[derive(Debug, PartialEq, Eq)]
pub enum RoutingError {
    MissingHeader(&'static str),
    BadPort(String),
    /// A host under the sandbox domain that is not `<port>-<sandbox id>.<domain>`.
    BadHost {
        host: String,
        domain: String,
    },
}

impl std::fmt::Display for RoutingError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            RoutingError::MissingHeader(h) => write!(f, "Missing header: {h}"),
            RoutingError::BadPort(p) => {
                write!(
                    f,
                    "invalid E2b-Sandbox-Port '{p}': expected a port in 1-65535"
                )
            }
            RoutingError::BadHost { host, domain } => write!(
                f,
                "invalid sandbox host '{host}': expected <port>-<sandbox id>.{domain}, \
                 with a port in 1-65535 and an id of lowercase letters and digits"
            ),
        }
    }
}

/// The target named by the request, `Ok(None)` when it names none. `host` is the request's
/// host name as [`host_name`] gives it; `domain` the sandbox domain, whose hosts must parse.
pub fn target(
    headers: &HeaderMap,
    host: Option<&str>,
    domain: Option<&str>,
) -> Result<Option<Target>, RoutingError> {
    let id = headers.get(SANDBOX_ID_HEADER);
    let port = headers.get(SANDBOX_PORT_HEADER);
    match (id, port) {
        (Some(id), Some(port)) => {
            let port_text = String::from_utf8_lossy(port.as_bytes()).into_owned();
            let port = parse_port(port_text.trim()).ok_or(RoutingError::BadPort(port_text))?;
            Ok(Some(Target {
                sandbox_id: String::from_utf8_lossy(id.as_bytes()).into_owned(),
                port,
            }))
        }
        (Some(_), None) => Err(RoutingError::MissingHeader("E2b-Sandbox-Port")),
        (None, Some(_)) => Err(RoutingError::MissingHeader("E2b-Sandbox-Id")),
        (None, None) => {
            let Some(host) = host else {
                return Ok(None);
            };
            match domain.and_then(|d| sandbox_label(host, d)) {
                Some(label) => match parse_label(label) {
                    Some(t) => Ok(Some(t)),
                    None => Err(RoutingError::BadHost {
                        host: host.to_owned(),
                        domain: domain.unwrap_or_default().to_owned(),
                    }),
                },
                // Another name (an address, `localhost`, a name of a proxy in front): parse
                // leniently, as upstream does.
                None => Ok(host
                    .split_once('.')
                    .and_then(|(label, _)| parse_label(label))),
            }
        }
    }
}

/// The request's host name, without a port, lower-cased (host names are case-insensitive),
/// without a trailing dot.
pub fn host_name(raw: &str) -> String {
    let raw = raw.trim();
    let name = if let Some(rest) = raw.strip_prefix('[') {
        // An IPv6 literal: `[::1]:3001`.
        rest.split_once(']').map_or(rest, |(addr, _)| addr)
    } else {
        match raw.rsplit_once(':') {
            Some((name, port)) if port.bytes().all(|b| b.is_ascii_digit()) => name,
            _ => raw,
        }
    };
    name.trim_end_matches('.').to_ascii_lowercase()
}

/// The part of `host` before `.<domain>` when `host` is under `domain`.
fn sandbox_label<'a>(host: &'a str, domain: &str) -> Option<&'a str> {
    host.strip_suffix(domain)?.strip_suffix('.')
}

/// `<port>-<id>`: a port in 1–65535 and an id of `[a-z0-9]`.
fn parse_label(label: &str) -> Option<Target> {
    let (port, id) = label.split_once('-')?;
    let valid_id = !id.is_empty()
        && id.len() <= MAX_ID_LEN
        && id
            .bytes()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit());
    if !valid_id {
        return None;
    }
    Some(Target {
        sandbox_id: id.to_owned(),
        port: parse_port(port)?,
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

/// The URI a request is forwarded with: `http://<authority>` and the client's path and query
/// (the upstream pools are keyed by authority). `None` when they do not make a valid URI, or
/// the target is not a path (`OPTIONS *`), which would otherwise run into the authority.
pub(crate) fn upstream_uri(authority: &str, uri: &Uri) -> Option<Uri> {
    let path = uri.path_and_query().map_or("/", |pq| pq.as_str());
    if !path.starts_with('/') {
        return None;
    }
    format!("http://{authority}{path}").parse().ok()
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
    fn upstream_uri_keeps_path_and_query_under_the_new_authority() {
        let uri: Uri = "http://client.example:3001/files?path=%2Fa&username=user"
            .parse()
            .expect("uri");
        let up = upstream_uri("abc123:8080", &uri).expect("valid");
        assert_eq!(
            up.to_string(),
            "http://abc123:8080/files?path=%2Fa&username=user"
        );
        let absolute: Uri = "http://h".parse().expect("no path");
        assert_eq!(
            upstream_uri("abc123", &absolute)
                .expect("valid")
                .to_string(),
            "http://abc123/"
        );
        let asterisk: Uri = "*".parse().expect("asterisk form");
        assert!(upstream_uri("abc123", &asterisk).is_none());
        assert!(upstream_uri("bad host", &uri).is_none());
    }

    fn t(id: &str, port: u16) -> Result<Option<Target>, RoutingError> {
        Ok(Some(Target {
            sandbox_id: id.into(),
            port,
        }))
    }

    #[test]
    fn headers_win_over_host() {
        let h = headers(&[("E2b-Sandbox-Id", "abc"), ("E2b-Sandbox-Port", "49983")]);
        assert_eq!(
            target(&h, Some("49999-other.example.com"), Some("example.com")),
            t("abc", 49983)
        );
        // Even over a host under the domain that does not parse.
        assert_eq!(
            target(&h, Some("junk.example.com"), Some("example.com")),
            t("abc", 49983)
        );
    }

    #[test]
    fn one_header_alone_or_a_bad_port_is_an_error() {
        let h = headers(&[("e2b-sandbox-id", "abc")]);
        assert_eq!(
            target(&h, None, None),
            Err(RoutingError::MissingHeader("E2b-Sandbox-Port"))
        );
        let h = headers(&[("e2b-sandbox-port", "49983")]);
        assert_eq!(
            target(&h, None, None),
            Err(RoutingError::MissingHeader("E2b-Sandbox-Id"))
        );
        for port in ["http", "0", "65536", "99999", "-1", "", "1e3"] {
            let mut h = headers(&[("e2b-sandbox-id", "abc")]);
            h.insert(
                SANDBOX_PORT_HEADER,
                HeaderValue::from_str(port).expect("value"),
            );
            assert!(
                matches!(target(&h, None, None), Err(RoutingError::BadPort(_))),
                "{port}"
            );
        }
        let h = headers(&[("e2b-sandbox-id", "abc"), ("e2b-sandbox-port", " 3000 ")]);
        assert_eq!(target(&h, None, None), t("abc", 3000));
    }

    #[test]
    fn host_routing_without_a_domain_is_lenient() {
        let none = HeaderMap::new();
        assert_eq!(
            target(&none, Some("49983-abc123.sb.example"), None),
            t("abc123", 49983)
        );
        for host in [
            "127.0.0.1",
            "localhost",
            "api.example.com",
            "x-abc.example.com",
            "49983-.example.com",
            "99999999-abc.example.com",
            "0-abc.example.com",
            "3000-a_b.example.com",
        ] {
            assert_eq!(target(&none, Some(host), None), Ok(None), "{host}");
        }
        assert_eq!(target(&none, None, None), Ok(None));
    }

    #[test]
    fn hosts_under_the_domain_must_parse() {
        let none = HeaderMap::new();
        let d = Some("sb.example");
        assert_eq!(
            target(&none, Some("3000-abc.sb.example"), d),
            t("abc", 3000)
        );
        assert_eq!(target(&none, Some("1-abc.sb.example"), d), t("abc", 1));
        assert_eq!(
            target(&none, Some("65535-abc.sb.example"), d),
            t("abc", 65535)
        );
        for host in [
            "abc.sb.example",
            "-abc.sb.example",
            "3000-.sb.example",
            "99999-abc.sb.example",
            "65536-abc.sb.example",
            "0-abc.sb.example",
            "03000-abc.sb.example",
            "3000-abc-def.sb.example",
            "3000-abc.x.sb.example",
            "x.3000-abc.sb.example",
            ".sb.example",
        ] {
            assert!(
                matches!(
                    target(&none, Some(host), d),
                    Err(RoutingError::BadHost { .. })
                ),
                "{host}"
            );
        }
        // Other names fall back to lenient parsing.
        assert_eq!(target(&none, Some("sb.example"), d), Ok(None));
        assert_eq!(target(&none, Some("localhost"), d), Ok(None));
        assert_eq!(
            target(&none, Some("3000-abc.other.example"), d),
            t("abc", 3000)
        );
    }

    #[test]
    fn host_names_lose_port_case_and_trailing_dot() {
        assert_eq!(host_name("3000-ABC.Sb.Example:3443"), "3000-abc.sb.example");
        assert_eq!(host_name("api.sb.example."), "api.sb.example");
        assert_eq!(host_name("[::1]:3001"), "::1");
        assert_eq!(host_name("127.0.0.1:3001"), "127.0.0.1");
        assert_eq!(host_name("localhost"), "localhost");
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
            "/_soulbox/tunnel/22",
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
