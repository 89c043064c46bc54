//! The gateway's own answers: E2B's proxy error bodies (protocol doc §2.6) and envd's.

use bytes::Bytes;
use http::header::{self, HeaderMap, HeaderName, HeaderValue};
use http::{Response, StatusCode};
use http_body_util::{BodyExt, Empty, Full};
use soulbox_wire::rest::{GatewayError, PORT_NOT_OPEN_MESSAGE, SANDBOX_NOT_FOUND_MESSAGE};

use crate::ResponseBody;

pub(crate) const UNAUTHORIZED_MESSAGE: &str =
    "unauthorized access, please provide a valid access token or method signing if supported";
pub(crate) const TRAFFIC_TOKEN_MESSAGE: &str = "The sandbox's ports are private: send its \
    traffic access token (trafficAccessToken) in the e2b-traffic-access-token header";
pub(crate) const TOO_MANY_TUNNELS_MESSAGE: &str =
    "Too many connections to the sandbox's ports; retry later";

pub(crate) fn full(data: impl Into<Bytes>) -> ResponseBody {
    Full::new(data.into())
        .map_err(|never| match never {})
        .boxed_unsync()
}

pub(crate) fn empty() -> ResponseBody {
    Empty::new().map_err(|never| match never {}).boxed_unsync()
}

/// 502 "was not found" (→ `SandboxNotRunningException`).
pub(crate) fn not_found(sandbox_id: &str) -> Response<ResponseBody> {
    gateway_error(
        StatusCode::BAD_GATEWAY,
        sandbox_id,
        SANDBOX_NOT_FOUND_MESSAGE,
        None,
    )
}

/// 502 "port is not open" with the port (→ `SandboxUnreachableException`).
pub(crate) fn port_not_open(sandbox_id: &str, port: u16) -> Response<ResponseBody> {
    gateway_error(
        StatusCode::BAD_GATEWAY,
        sandbox_id,
        PORT_NOT_OPEN_MESSAGE,
        Some(port),
    )
}

/// E2B's proxy error body: `{"sandboxId", "message", "port"?, "code"}`.
pub(crate) fn gateway_error(
    status: StatusCode,
    sandbox_id: &str,
    message: &str,
    port: Option<u16>,
) -> Response<ResponseBody> {
    let body = GatewayError {
        sandbox_id: sandbox_id.to_owned(),
        message: message.to_owned(),
        port,
        code: status.as_u16(),
    };
    json(status, serde_json::to_vec(&body).unwrap_or_default())
}

/// envd's error body: `{"code": status, "message": …}`.
pub(crate) fn envd_error(status: StatusCode, message: &str) -> Response<ResponseBody> {
    let body = serde_json::json!({ "code": status.as_u16(), "message": message });
    json(status, serde_json::to_vec(&body).unwrap_or_default())
}

pub(crate) fn json(status: StatusCode, body: Vec<u8>) -> Response<ResponseBody> {
    let mut r = Response::new(full(body));
    *r.status_mut() = status;
    r.headers_mut().insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("application/json"),
    );
    r
}

pub(crate) fn text(status: StatusCode, body: &'static str) -> Response<ResponseBody> {
    let mut r = Response::new(full(Bytes::from_static(body.as_bytes())));
    *r.status_mut() = status;
    r.headers_mut().insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("text/plain; charset=utf-8"),
    );
    r
}

/// Removes the headers that describe one connection, not the message (RFC 9110 §7.6.1).
pub(crate) fn strip_hop_by_hop(headers: &mut HeaderMap) {
    let listed: Vec<HeaderName> = headers
        .get_all(header::CONNECTION)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(','))
        .filter_map(|name| HeaderName::from_bytes(name.trim().as_bytes()).ok())
        .collect();
    for name in listed {
        headers.remove(name);
    }
    for name in [
        header::CONNECTION,
        HeaderName::from_static("keep-alive"),
        HeaderName::from_static("proxy-connection"),
        header::PROXY_AUTHENTICATE,
        header::PROXY_AUTHORIZATION,
        header::TE,
        header::TRAILER,
        header::TRANSFER_ENCODING,
        header::UPGRADE,
    ] {
        headers.remove(name);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn hop_by_hop_headers_are_removed_including_listed_ones() {
        let mut h = HeaderMap::new();
        h.insert(
            header::CONNECTION,
            HeaderValue::from_static("keep-alive, x-secret"),
        );
        h.insert("x-secret", HeaderValue::from_static("1"));
        h.insert(
            header::TRANSFER_ENCODING,
            HeaderValue::from_static("chunked"),
        );
        h.insert(
            header::CONTENT_TYPE,
            HeaderValue::from_static("application/json"),
        );
        strip_hop_by_hop(&mut h);
        assert_eq!(h.len(), 1);
        assert!(h.contains_key(header::CONTENT_TYPE));
    }
}
