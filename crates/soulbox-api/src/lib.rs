//! Control-plane REST API (E2B-compatible) on axum.
//!
//! Exactly the E2B paths the SDKs call for the sandbox lifecycle (protocol doc §3). Every call
//! but `GET /health` needs an API key (`X-API-Key`, any case, or `Authorization: Bearer`), and
//! every error, axum's own rejections included, answers `{"code": status, "message": …}`.

#![forbid(unsafe_code)]

mod error;
mod network;
mod pause;
pub mod query;
pub mod templates;
mod volumes;

use std::future::Future;

use axum::Router;
use axum::body::Bytes;
use axum::extract::{DefaultBodyLimit, Path, RawQuery, Request, State};
use axum::http::{HeaderMap, HeaderValue, StatusCode, header};
use axum::middleware::{self, Next};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post, put};
use axum::serve::ListenerExt;
use serde::de::DeserializeOwned;
use soulbox_core::{
    CLIENT_ID, CreateRequest, ENVD_VERSION, Lifecycle, ListRequest, Manager, PauseMode,
    SandboxInfo, validate_new_timeout, validate_timeout,
};
use soulbox_wire::rest::{
    ListedSandbox, NewSandbox, Sandbox, SandboxDetail, SandboxLifecycle, SandboxState,
    TimeoutRequest,
};
use tokio::net::TcpListener;

pub use error::ApiError;
use query::ListParams;

/// Default timeout of `POST /sandboxes` when the body has none (upstream's v1 default).
pub const V1_DEFAULT_TIMEOUT_SECS: i64 = 15;
/// Default timeout of `POST /v2/sandboxes` and `POST /v2/sandboxes/{id}/connect`.
pub const V2_DEFAULT_TIMEOUT_SECS: i64 = 300;
/// Largest request body accepted (create bodies are a few hundred bytes).
pub const MAX_BODY_BYTES: usize = 1024 * 1024;

/// The control-plane router.
pub fn router(manager: Manager) -> Router {
    let authenticated = Router::new()
        .route("/sandboxes", post(create_v1).get(list_v1))
        .route("/v2/sandboxes", post(create_v2).get(list_v2))
        .route("/sandboxes/{id}", get(get_sandbox).delete(kill))
        .route("/sandboxes/{id}/timeout", post(set_timeout))
        .route("/sandboxes/{id}/network", put(network::update))
        .route("/sandboxes/{id}/connect", post(pause::connect_v1))
        .route("/v2/sandboxes/{id}/connect", post(pause::connect_v2))
        .route("/sandboxes/{id}/pause", post(pause::pause))
        .route("/sandboxes/{id}/resume", post(pause::resume))
        .route("/sandboxes/{id}/refreshes", post(pause::refresh))
        .route("/sandboxes/{id}/fork", post(pause::fork))
        .route("/sandboxes/{id}/snapshots", post(pause::create_snapshot))
        .route("/snapshots", get(pause::list_snapshots))
        .route(soulbox_wire::rest::POOLS_PATH, get(pools))
        .merge(templates::authenticated())
        .merge(volumes::authenticated())
        .route_layer(middleware::from_fn_with_state(
            manager.clone(),
            authenticate,
        ));
    Router::new()
        .route("/health", get(health))
        .merge(templates::public())
        .merge(volumes::content())
        .merge(authenticated)
        .fallback(not_found)
        .method_not_allowed_fallback(method_not_allowed)
        .layer(DefaultBodyLimit::max(MAX_BODY_BYTES))
        .layer(middleware::map_response(error::normalize_errors))
        .with_state(manager)
}

/// Serves the API on `listener` (TCP_NODELAY on every connection) until `shutdown` resolves.
pub async fn serve(
    listener: TcpListener,
    manager: Manager,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> std::io::Result<()> {
    let listener = listener.tap_io(|tcp| {
        if let Err(e) = tcp.set_nodelay(true) {
            tracing::debug!(error = %e, "setting TCP_NODELAY");
        }
    });
    axum::serve(listener, router(manager))
        .with_graceful_shutdown(shutdown)
        .await
}

async fn authenticate(
    State(manager): State<Manager>,
    request: Request,
    next: Next,
) -> Result<Response, ApiError> {
    let key = api_key(request.headers())
        .ok_or_else(|| ApiError::unauthorized("missing API key: send it in X-API-Key"))?;
    let valid = soulbox_store::is_api_key_format(key)
        && manager
            .store()
            .api_key_valid(key)
            .await
            .map_err(soulbox_core::CoreError::Store)?;
    if !valid {
        return Err(ApiError::unauthorized("invalid API key"));
    }
    Ok(next.run(request).await)
}

/// `X-API-Key` (header names are case-insensitive), else `Authorization: Bearer <key>`.
fn api_key(headers: &HeaderMap) -> Option<&str> {
    if let Some(v) = headers.get("x-api-key") {
        return v.to_str().ok();
    }
    headers
        .get(header::AUTHORIZATION)?
        .to_str()
        .ok()?
        .strip_prefix("Bearer ")
        .map(str::trim)
}

async fn health() -> &'static str {
    "OK"
}

/// `GET /soulbox/pools`: the warm pools (SoulBox's own; no E2B SDK calls it).
async fn pools(State(manager): State<Manager>) -> Response {
    axum::Json(manager.pool_status()).into_response()
}

async fn not_found() -> ApiError {
    ApiError::new(StatusCode::NOT_FOUND, "no such endpoint")
}

async fn method_not_allowed() -> ApiError {
    ApiError::new(
        StatusCode::METHOD_NOT_ALLOWED,
        "method not allowed on this endpoint",
    )
}

/// Parses a JSON body whatever its content type (the SDKs always send JSON).
pub(crate) fn parse_json<T: DeserializeOwned>(body: &[u8]) -> Result<T, ApiError> {
    serde_json::from_slice(body)
        .map_err(|e| ApiError::bad_request(format!("invalid request body: {e}")))
}

async fn create_v1(
    State(m): State<Manager>,
    body: Bytes,
) -> Result<(StatusCode, axum::Json<Sandbox>), ApiError> {
    let req: NewSandbox = parse_json(&body)?;
    let secure = req.secure.unwrap_or(false);
    create(m, req, V1_DEFAULT_TIMEOUT_SECS, secure).await
}

async fn create_v2(
    State(m): State<Manager>,
    body: Bytes,
) -> Result<(StatusCode, axum::Json<Sandbox>), ApiError> {
    let req: NewSandbox = parse_json(&body)?;
    create(m, req, V2_DEFAULT_TIMEOUT_SECS, true).await
}

async fn create(
    m: Manager,
    req: NewSandbox,
    default_timeout: i64,
    secure: bool,
) -> Result<(StatusCode, axum::Json<Sandbox>), ApiError> {
    let timeout = validate_timeout(req.timeout.unwrap_or(default_timeout))?;
    let network = network::create_config(req.allow_internet_access, req.network.as_ref())?;
    let lifecycle = lifecycle(&req)?;
    let info = m
        .create(CreateRequest {
            template: req.template_id,
            timeout,
            secure,
            metadata: req.metadata.unwrap_or_default(),
            env_vars: req.env_vars.unwrap_or_default(),
            network,
            lifecycle,
            volume_mounts: req.volume_mounts.unwrap_or_default(),
        })
        .await?;
    Ok((StatusCode::CREATED, axum::Json(sandbox_body(&m, info))))
}

/// `autoPause`, `autoPauseMemory`, `autoResume` of a create body.
fn lifecycle(req: &NewSandbox) -> Result<Lifecycle, ApiError> {
    let auto_pause = req.auto_pause.unwrap_or(false);
    let auto_resume = req.auto_resume.is_some_and(|a| a.enabled);
    let mode = PauseMode::from_memory(req.auto_pause_memory);
    if auto_resume && !auto_pause {
        return Err(ApiError::bad_request(
            "autoResume needs autoPause: only a paused sandbox can be resumed",
        ));
    }
    if auto_resume && mode == PauseMode::Filesystem {
        return Err(ApiError::bad_request(
            "autoResume cannot be combined with autoPauseMemory=false: a filesystem-only \
             pause is resumed explicitly (connect)",
        ));
    }
    Ok(Lifecycle {
        auto_pause,
        auto_pause_mode: mode,
        auto_resume,
        timeout_ms: 0,
    })
}

async fn list_v1(
    State(m): State<Manager>,
    RawQuery(raw): RawQuery,
) -> Result<axum::Json<Vec<ListedSandbox>>, ApiError> {
    let params = ListParams::parse(raw.as_deref())?;
    let page = m
        .list(ListRequest {
            metadata: params.metadata,
            states: vec![SandboxState::Running],
            ..ListRequest::default()
        })
        .await?;
    Ok(axum::Json(page.sandboxes.into_iter().map(listed).collect()))
}

async fn list_v2(State(m): State<Manager>, RawQuery(raw): RawQuery) -> Result<Response, ApiError> {
    let params = ListParams::parse(raw.as_deref())?;
    let page = m
        .list(ListRequest {
            metadata: params.metadata,
            states: params.states,
            template: params.template,
            started_after: params.started_after,
            order: params.order,
            limit: Some(params.limit),
            next_token: params.next_token,
        })
        .await?;
    let body: Vec<ListedSandbox> = page.sandboxes.into_iter().map(listed).collect();
    let mut response = axum::Json(body).into_response();
    if let Some(token) = page.next_token {
        let value = HeaderValue::from_str(&token)
            .map_err(|e| ApiError::new(StatusCode::INTERNAL_SERVER_ERROR, e.to_string()))?;
        response.headers_mut().insert("x-next-token", value);
    }
    Ok(response)
}

async fn get_sandbox(
    State(m): State<Manager>,
    Path(id): Path<String>,
) -> Result<axum::Json<SandboxDetail>, ApiError> {
    let info = m.get(&id).await?;
    let volume_mounts = m.sandbox_volume_mounts(&info.id).await?;
    let (allow_internet_access, network) = network::detail(info.network);
    Ok(axum::Json(SandboxDetail {
        template_id: info.template_id,
        sandbox_id: info.id,
        client_id: CLIENT_ID.to_owned(),
        alias: info.alias,
        started_at: info.started_at,
        end_at: info.end_at,
        envd_version: ENVD_VERSION.to_owned(),
        cpu_count: info.cpu_count,
        memory_mb: info.memory_mb,
        disk_size_mb: info.disk_mb,
        state: info.state,
        metadata: info.metadata,
        envd_access_token: info.access_token,
        domain: m.domain().map(str::to_owned),
        allow_internet_access,
        network,
        lifecycle: Some(SandboxLifecycle {
            auto_resume: info.lifecycle.auto_resume,
            on_timeout: if info.lifecycle.auto_pause {
                "pause"
            } else {
                "kill"
            }
            .to_owned(),
        }),
        pause_mode: info.pause_mode.map(|p| p.as_str().to_owned()),
        envd_unresponsive_at_pause: info.envd_unresponsive_at_pause.then_some(true),
        volume_mounts,
    }))
}

async fn kill(State(m): State<Manager>, Path(id): Path<String>) -> Result<StatusCode, ApiError> {
    m.kill(&id).await?;
    Ok(StatusCode::NO_CONTENT)
}

async fn set_timeout(
    State(m): State<Manager>,
    Path(id): Path<String>,
    body: Bytes,
) -> Result<StatusCode, ApiError> {
    let req: TimeoutRequest = parse_json(&body)?;
    // 0 expires the sandbox now (E2B: 204, then the sandbox is gone).
    m.set_timeout(&id, validate_new_timeout(req.timeout)?)
        .await?;
    Ok(StatusCode::NO_CONTENT)
}

pub(crate) fn sandbox_body(m: &Manager, info: SandboxInfo) -> Sandbox {
    Sandbox {
        template_id: info.template_id,
        sandbox_id: info.id,
        client_id: CLIENT_ID.to_owned(),
        envd_version: ENVD_VERSION.to_owned(),
        alias: info.alias,
        envd_access_token: info.access_token,
        traffic_access_token: None,
        domain: m.domain().map(str::to_owned),
    }
}

fn listed(info: SandboxInfo) -> ListedSandbox {
    ListedSandbox {
        template_id: info.template_id,
        sandbox_id: info.id,
        client_id: CLIENT_ID.to_owned(),
        alias: info.alias,
        started_at: info.started_at,
        end_at: info.end_at,
        cpu_count: info.cpu_count,
        memory_mb: info.memory_mb,
        disk_size_mb: info.disk_mb,
        state: info.state,
        envd_version: ENVD_VERSION.to_owned(),
        metadata: info.metadata,
        envd_unresponsive_at_pause: info.envd_unresponsive_at_pause.then_some(true),
    }
}
