//! The network parts of the API: `allow_internet_access` + `network` on create,
//! `allowInternetAccess` + `network` in `SandboxDetail`, and `PUT /sandboxes/{id}/network`.

use axum::body::Bytes;
use axum::extract::{Path, State};
use axum::http::StatusCode;
use serde_json::Value;
use soulbox_core::{EgressConfig, Manager};
use soulbox_wire::rest::{SandboxNetworkConfig, SandboxNetworkUpdate};

use crate::{ApiError, parse_json};

/// `egressProxy` and `rules` need a proxy that terminates the sandbox's TLS; SoulBox has none,
/// and ignoring them silently would drop credentials or tunnelling the caller relies on.
fn refuse_unsupported(egress_proxy: &Option<Value>, rules: &Option<Value>) -> Result<(), ApiError> {
    if egress_proxy.as_ref().is_some_and(|v| !v.is_null()) {
        return Err(ApiError::bad_request(
            "network.egressProxy is not supported by this server",
        ));
    }
    let has_rules = match rules {
        Some(Value::Object(m)) => !m.is_empty(),
        Some(Value::Null) | None => false,
        Some(_) => true,
    };
    if has_rules {
        return Err(ApiError::bad_request(
            "network.rules (egress header transforms) are not supported by this server",
        ));
    }
    Ok(())
}

/// The egress configuration of a create body (E2B: access on unless said otherwise).
pub(crate) fn create_config(
    allow_internet_access: Option<bool>,
    network: Option<&SandboxNetworkConfig>,
) -> Result<EgressConfig, ApiError> {
    if let Some(n) = network {
        refuse_unsupported(&n.egress_proxy, &n.rules)?;
    }
    Ok(EgressConfig {
        allow_internet_access: allow_internet_access.unwrap_or(true),
        allow_out: network
            .and_then(|n| n.allow_out.clone())
            .unwrap_or_default(),
        deny_out: network.and_then(|n| n.deny_out.clone()).unwrap_or_default(),
    })
}

/// `allowInternetAccess` and `network` of `SandboxDetail`.
pub(crate) fn detail(config: Option<EgressConfig>) -> (Option<bool>, Option<SandboxNetworkConfig>) {
    match config {
        None => (None, None),
        Some(c) => (
            Some(c.allow_internet_access),
            Some(SandboxNetworkConfig {
                allow_out: Some(c.allow_out),
                deny_out: Some(c.deny_out),
                ..SandboxNetworkConfig::default()
            }),
        ),
    }
}

/// `PUT /sandboxes/{id}/network`: 204; unknown id 404; bad entries 400.
pub(crate) async fn update(
    State(m): State<Manager>,
    Path(id): Path<String>,
    body: Bytes,
) -> Result<StatusCode, ApiError> {
    let req: SandboxNetworkUpdate = if body.iter().all(u8::is_ascii_whitespace) {
        SandboxNetworkUpdate::default()
    } else {
        parse_json(&body)?
    };
    refuse_unsupported(&req.egress_proxy, &req.rules)?;
    let config = EgressConfig {
        allow_internet_access: req.allow_internet_access.unwrap_or(true),
        allow_out: req.allow_out.unwrap_or_default(),
        deny_out: req.deny_out.unwrap_or_default(),
    };
    m.update_network(&id, &config).await?;
    Ok(StatusCode::NO_CONTENT)
}
