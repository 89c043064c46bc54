//! Pause, resume, keep-alive and snapshots: `POST /sandboxes/{id}/pause`, `/resume`
//! (legacy), `/connect` (v1 and v2), `/refreshes`, `/snapshots`, `/fork`; `GET /snapshots`.
//! Semantics live in `soulbox_core::pause` and `soulbox_core::snapshots`.

use std::collections::HashMap;
use std::time::Duration;

use axum::body::Bytes;
use axum::extract::{Path, Query, State};
use axum::http::{HeaderValue, StatusCode};
use axum::response::{IntoResponse, Response};
use serde::de::DeserializeOwned;
use soulbox_core::{Manager, PauseMode, Resumed, validate_timeout};
use soulbox_wire::rest::{
    ConnectSandbox, ConnectSandboxV2, PauseRequest, RefreshRequest, ResumeRequest, Sandbox,
    SnapshotInfo, SnapshotRequest,
};

use crate::{ApiError, V2_DEFAULT_TIMEOUT_SECS, parse_json, sandbox_body};

/// Longest keep-alive of `/refreshes` (E2B's limit).
const MAX_REFRESH_SECS: i64 = 3600;

/// An optional body: empty (or whitespace) is the type's default.
fn optional_json<T: DeserializeOwned + Default>(body: &[u8]) -> Result<T, ApiError> {
    if body.iter().all(u8::is_ascii_whitespace) {
        Ok(T::default())
    } else {
        parse_json(body)
    }
}

/// 204 when paused; 409 when it was paused already (the SDKs' `pause()` then returns
/// false); 503 when `requireHealthyGuest` and the agent does not answer.
pub(crate) async fn pause(
    State(m): State<Manager>,
    Path(id): Path<String>,
    body: Bytes,
) -> Result<StatusCode, ApiError> {
    let req: PauseRequest = optional_json(&body)?;
    m.pause(
        &id,
        PauseMode::from_memory(req.memory),
        req.require_healthy_guest.unwrap_or(false),
    )
    .await?;
    Ok(StatusCode::NO_CONTENT)
}

/// Legacy resume: 201 with the `Sandbox` body; 409 when it is running.
pub(crate) async fn resume(
    State(m): State<Manager>,
    Path(id): Path<String>,
    body: Bytes,
) -> Result<(StatusCode, axum::Json<Sandbox>), ApiError> {
    let req: ResumeRequest = optional_json(&body)?;
    let timeout = req.timeout.map(validate_timeout).transpose()?;
    let info = m.get(&id).await?;
    if info.state == soulbox_wire::rest::SandboxState::Running {
        return Err(ApiError::new(
            StatusCode::CONFLICT,
            format!("sandbox {id} is already running"),
        ));
    }
    let (info, _) = m.resume(&id, timeout, req.memory).await?;
    Ok((StatusCode::CREATED, axum::Json(sandbox_body(&m, info))))
}

pub(crate) async fn connect_v1(
    State(m): State<Manager>,
    Path(id): Path<String>,
    body: Bytes,
) -> Result<(StatusCode, axum::Json<Sandbox>), ApiError> {
    let req: ConnectSandbox = parse_json(&body)?;
    connect(m, &id, req.timeout, req.memory).await
}

pub(crate) async fn connect_v2(
    State(m): State<Manager>,
    Path(id): Path<String>,
    body: Bytes,
) -> Result<(StatusCode, axum::Json<Sandbox>), ApiError> {
    let req: ConnectSandboxV2 = optional_json(&body)?;
    connect(
        m,
        &id,
        req.timeout.unwrap_or(V2_DEFAULT_TIMEOUT_SECS),
        req.memory,
    )
    .await
}

/// A running sandbox: 200, its timeout extended (never shortened). A paused one is resumed:
/// 201.
async fn connect(
    m: Manager,
    id: &str,
    timeout: i64,
    memory: Option<bool>,
) -> Result<(StatusCode, axum::Json<Sandbox>), ApiError> {
    let timeout: Duration = validate_timeout(timeout)?;
    let (info, how) = m.resume(id, Some(timeout), memory).await?;
    let status = match how {
        Resumed::WasRunning => StatusCode::OK,
        Resumed::Resumed => StatusCode::CREATED,
    };
    Ok((status, axum::Json(sandbox_body(&m, info))))
}

/// Keep-alive: the running sandbox lives at least `duration` seconds more (default 60).
pub(crate) async fn refresh(
    State(m): State<Manager>,
    Path(id): Path<String>,
    body: Bytes,
) -> Result<StatusCode, ApiError> {
    let req: RefreshRequest = optional_json(&body)?;
    let secs = req.duration.unwrap_or(60);
    if !(0..=MAX_REFRESH_SECS).contains(&secs) {
        return Err(ApiError::bad_request(format!(
            "duration must be between 0 and {MAX_REFRESH_SECS} seconds"
        )));
    }
    if secs > 0 {
        m.connect(&id, Duration::from_secs(secs.unsigned_abs()))
            .await?;
    } else {
        m.get(&id).await?;
    }
    Ok(StatusCode::NO_CONTENT)
}

/// `POST /sandboxes/{id}/fork`: E2B forks a sandbox's memory, which needs a memory checkpoint
/// this server cannot take yet (docs/persistence.md); 404 for an unknown sandbox, else 501.
pub(crate) async fn fork(
    State(m): State<Manager>,
    Path(id): Path<String>,
) -> Result<StatusCode, ApiError> {
    m.get(&id).await?;
    Err(ApiError::new(
        StatusCode::NOT_IMPLEMENTED,
        "fork copies a sandbox's memory, which needs memory checkpoints this server cannot \
         take yet (docs/persistence.md); pause(mode=\"filesystem\") or a template keep files",
    ))
}

/// `POST /sandboxes/{id}/snapshots`: 201 with the snapshot (a template of its files).
pub(crate) async fn create_snapshot(
    State(m): State<Manager>,
    Path(id): Path<String>,
    body: Bytes,
) -> Result<(StatusCode, axum::Json<SnapshotInfo>), ApiError> {
    let req: SnapshotRequest = optional_json(&body)?;
    let snap = m.create_snapshot(&id, req.name).await?;
    Ok((
        StatusCode::CREATED,
        axum::Json(SnapshotInfo {
            snapshot_id: snap.snapshot_id,
            names: snap.names,
        }),
    ))
}

/// Page size of `GET /snapshots` when the query names none, and the largest accepted.
const SNAPSHOT_PAGE: u32 = 100;
const MAX_SNAPSHOT_PAGE: u32 = 1000;

/// `GET /snapshots?sandboxID=&name=&limit=&nextToken=`: newest first; `x-next-token` when
/// more follow (the token is opaque to clients: the offset of the next page).
pub(crate) async fn list_snapshots(
    State(m): State<Manager>,
    Query(q): Query<HashMap<String, String>>,
) -> Result<Response, ApiError> {
    let limit = match q.get("limit") {
        Some(l) => l
            .parse::<u32>()
            .ok()
            .filter(|l| (1..=MAX_SNAPSHOT_PAGE).contains(l))
            .ok_or_else(|| {
                ApiError::bad_request(format!("limit must be 1..{MAX_SNAPSHOT_PAGE}"))
            })?,
        None => SNAPSHOT_PAGE,
    };
    let offset = match q.get("nextToken") {
        Some(t) => t
            .parse::<u32>()
            .map_err(|_| ApiError::bad_request(format!("invalid next token '{t}'")))?,
        None => 0,
    };
    let mut page = m
        .list_snapshots(
            q.get("sandboxID").map(String::as_str),
            q.get("name").map(String::as_str),
            offset,
            limit.saturating_add(1),
        )
        .await?;
    let more = page.len() > limit as usize;
    page.truncate(limit as usize);
    let body: Vec<SnapshotInfo> = page
        .into_iter()
        .map(|s| SnapshotInfo {
            snapshot_id: s.snapshot_id,
            names: s.names,
        })
        .collect();
    let mut response = axum::Json(body).into_response();
    if more {
        let token = (offset + limit).to_string();
        if let Ok(v) = HeaderValue::from_str(&token) {
            response.headers_mut().insert("x-next-token", v);
        }
    }
    Ok(response)
}
