//! Volumes: the control plane's `/volumes` (API key) and the volume content API
//! `/volumecontent/{volumeID}/…` (the volume's bearer token), served on the same listener, so
//! `E2B_VOLUME_API_URL` is the control plane's URL (the SDKs put `/volumecontent/…` after it).
//!
//! Content requests never resolve a path with the host's rules (`soulbox_runtime::volumes`):
//! a symlink anywhere in a path is refused, never followed.

use axum::Router;
use axum::body::{Body, Bytes};
use axum::extract::{Path, Query, Request, State};
use axum::http::{HeaderMap, HeaderValue, StatusCode, header};
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use chrono::{DateTime, Utc};
use http_body_util::BodyExt;
use serde::Deserialize;
use soulbox_core::{
    Manager, VolumeAttrs, VolumeDir, VolumeEntry, VolumeEntryKind, VolumeFsError, VolumePath,
    check_volume_attrs,
};
use soulbox_wire::volumes::{
    NewVolume, Volume, VolumeAndToken, VolumeEntryStat, VolumeEntryType, VolumeMetadataPatch,
};
use std::io::Write;

use crate::{ApiError, parse_json};

/// `/volumes`: behind the API key.
pub(crate) fn authenticated() -> Router<Manager> {
    Router::new()
        .route("/volumes", get(list).post(create))
        .route("/volumes/{id}", get(info).delete(delete))
}

/// `/volumecontent/…`: each request carries the volume's token.
pub(crate) fn content() -> Router<Manager> {
    Router::new()
        .route("/volumecontent/{id}/dir", get(list_dir).post(make_dir))
        .route("/volumecontent/{id}/file", get(read_file).put(write_file))
        .route(
            "/volumecontent/{id}/path",
            get(stat).delete(remove).patch(patch),
        )
}

async fn create(
    State(m): State<Manager>,
    body: Bytes,
) -> Result<(StatusCode, axum::Json<VolumeAndToken>), ApiError> {
    let req: NewVolume = parse_json(&body)?;
    let rec = m.create_volume(&req.name).await?;
    Ok((
        StatusCode::CREATED,
        axum::Json(VolumeAndToken {
            volume_id: rec.id,
            name: rec.name,
            token: rec.token,
            domain: None,
        }),
    ))
}

async fn list(State(m): State<Manager>) -> Result<axum::Json<Vec<Volume>>, ApiError> {
    let all = m.list_volumes().await?;
    Ok(axum::Json(
        all.into_iter()
            .map(|v| Volume {
                volume_id: v.id,
                name: v.name,
            })
            .collect(),
    ))
}

async fn info(
    State(m): State<Manager>,
    Path(id): Path<String>,
) -> Result<axum::Json<VolumeAndToken>, ApiError> {
    let rec = m.get_volume(&id).await?;
    Ok(axum::Json(VolumeAndToken {
        volume_id: rec.id,
        name: rec.name,
        token: rec.token,
        domain: None,
    }))
}

async fn delete(State(m): State<Manager>, Path(id): Path<String>) -> Result<StatusCode, ApiError> {
    m.delete_volume(&id).await?;
    Ok(StatusCode::NO_CONTENT)
}

/// The query of every content request.
#[derive(Debug, Deserialize)]
struct ContentQuery {
    path: String,
    depth: Option<usize>,
    uid: Option<u32>,
    gid: Option<u32>,
    mode: Option<u32>,
    force: Option<bool>,
}

impl ContentQuery {
    fn attrs(&self) -> VolumeAttrs {
        VolumeAttrs {
            uid: self.uid,
            gid: self.gid,
            mode: self.mode,
        }
    }
}

fn bearer(headers: &HeaderMap) -> Result<&str, ApiError> {
    headers
        .get(header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.strip_prefix("Bearer "))
        .map(str::trim)
        .ok_or_else(|| ApiError::unauthorized("missing volume token: send Authorization: Bearer"))
}

/// The volume (token checked) and the request's path, parsed.
async fn open(
    m: &Manager,
    id: &str,
    headers: &HeaderMap,
    q: &ContentQuery,
) -> Result<(VolumeDir, VolumePath), ApiError> {
    // Authenticated first: without the token nothing about the request is looked at.
    let token = bearer(headers)?;
    let dir = m.volume_content(id, token).await?;
    let path = VolumePath::parse(&q.path).map_err(fs_error)?;
    check_volume_attrs(&path, q.attrs()).map_err(fs_error)?;
    Ok((dir, path))
}

/// Runs file system work on the blocking pool.
async fn blocking<T: Send + 'static>(
    f: impl FnOnce() -> Result<T, VolumeFsError> + Send + 'static,
) -> Result<T, ApiError> {
    tokio::task::spawn_blocking(f)
        .await
        .map_err(|e| ApiError::new(StatusCode::INTERNAL_SERVER_ERROR, e.to_string()))?
        .map_err(fs_error)
}

fn fs_error(e: VolumeFsError) -> ApiError {
    let status = match &e {
        VolumeFsError::InvalidPath { .. } | VolumeFsError::Refused { .. } => {
            StatusCode::BAD_REQUEST
        }
        VolumeFsError::Io { .. } => match e.errno() {
            Some(libc_errno::ENOENT) => StatusCode::NOT_FOUND,
            Some(libc_errno::EEXIST | libc_errno::ENOTEMPTY) => StatusCode::CONFLICT,
            Some(libc_errno::EACCES | libc_errno::EPERM) => StatusCode::FORBIDDEN,
            Some(libc_errno::EDQUOT | libc_errno::ENOSPC | libc_errno::EFBIG) => {
                StatusCode::INSUFFICIENT_STORAGE
            }
            Some(
                libc_errno::ELOOP
                | libc_errno::EXDEV
                | libc_errno::ENOTDIR
                | libc_errno::EISDIR
                | libc_errno::ENAMETOOLONG
                | libc_errno::EINVAL,
            ) => StatusCode::BAD_REQUEST,
            _ => StatusCode::INTERNAL_SERVER_ERROR,
        },
    };
    let message = match e.errno() {
        Some(libc_errno::ELOOP) => format!("{e} (symlinks are not followed)"),
        _ => e.to_string(),
    };
    if status.is_server_error() {
        tracing::error!(error = %e, "volume content request failed");
    }
    ApiError::new(status, message)
}

/// The errno values the content API tells apart (Linux, all architectures SoulBox runs on).
mod libc_errno {
    pub const EPERM: i32 = 1;
    pub const ENOENT: i32 = 2;
    pub const EACCES: i32 = 13;
    pub const EEXIST: i32 = 17;
    pub const EXDEV: i32 = 18;
    pub const ENOTDIR: i32 = 20;
    pub const EISDIR: i32 = 21;
    pub const EINVAL: i32 = 22;
    pub const EFBIG: i32 = 27;
    pub const ENOSPC: i32 = 28;
    pub const ENAMETOOLONG: i32 = 36;
    pub const ENOTEMPTY: i32 = 39;
    pub const ELOOP: i32 = 40;
    pub const EDQUOT: i32 = 122;
}

fn time(t: (i64, u32)) -> DateTime<Utc> {
    DateTime::from_timestamp(t.0, t.1).unwrap_or_default()
}

fn stat_body(e: VolumeEntry) -> VolumeEntryStat {
    VolumeEntryStat {
        name: e.name,
        kind: match e.kind {
            VolumeEntryKind::Directory => VolumeEntryType::Directory,
            VolumeEntryKind::File => VolumeEntryType::File,
            VolumeEntryKind::Symlink => VolumeEntryType::Symlink,
            VolumeEntryKind::Other => VolumeEntryType::Unknown,
        },
        path: e.path,
        size: e.size,
        mode: e.mode,
        uid: e.uid,
        gid: e.gid,
        atime: time(e.atime),
        mtime: time(e.mtime),
        ctime: time(e.ctime),
        target: e.target,
    }
}

async fn list_dir(
    State(m): State<Manager>,
    Path(id): Path<String>,
    Query(q): Query<ContentQuery>,
    headers: HeaderMap,
) -> Result<axum::Json<Vec<VolumeEntryStat>>, ApiError> {
    let (dir, path) = open(&m, &id, &headers, &q).await?;
    let depth = q.depth.unwrap_or(1);
    let entries = blocking(move || dir.list(&path, depth)).await?;
    Ok(axum::Json(entries.into_iter().map(stat_body).collect()))
}

async fn make_dir(
    State(m): State<Manager>,
    Path(id): Path<String>,
    Query(q): Query<ContentQuery>,
    headers: HeaderMap,
) -> Result<(StatusCode, axum::Json<VolumeEntryStat>), ApiError> {
    let (dir, path) = open(&m, &id, &headers, &q).await?;
    let (attrs, force) = (q.attrs(), q.force.unwrap_or(false));
    let made = blocking(move || dir.make_dir(&path, attrs, force)).await?;
    Ok((StatusCode::CREATED, axum::Json(stat_body(made))))
}

async fn stat(
    State(m): State<Manager>,
    Path(id): Path<String>,
    Query(q): Query<ContentQuery>,
    headers: HeaderMap,
) -> Result<axum::Json<VolumeEntryStat>, ApiError> {
    let (dir, path) = open(&m, &id, &headers, &q).await?;
    let entry = blocking(move || dir.stat(&path)).await?;
    Ok(axum::Json(stat_body(entry)))
}

async fn remove(
    State(m): State<Manager>,
    Path(id): Path<String>,
    Query(q): Query<ContentQuery>,
    headers: HeaderMap,
) -> Result<StatusCode, ApiError> {
    let (dir, path) = open(&m, &id, &headers, &q).await?;
    blocking(move || dir.remove(&path)).await?;
    Ok(StatusCode::NO_CONTENT)
}

async fn patch(
    State(m): State<Manager>,
    Path(id): Path<String>,
    Query(q): Query<ContentQuery>,
    headers: HeaderMap,
    body: Bytes,
) -> Result<axum::Json<VolumeEntryStat>, ApiError> {
    let (dir, path) = open(&m, &id, &headers, &q).await?;
    let req: VolumeMetadataPatch = if body.iter().all(u8::is_ascii_whitespace) {
        VolumeMetadataPatch::default()
    } else {
        parse_json(&body)?
    };
    let attrs = VolumeAttrs {
        uid: req.uid,
        gid: req.gid,
        mode: req.mode,
    };
    let entry = blocking(move || dir.set_metadata(&path, attrs)).await?;
    Ok(axum::Json(stat_body(entry)))
}

async fn read_file(
    State(m): State<Manager>,
    Path(id): Path<String>,
    Query(q): Query<ContentQuery>,
    headers: HeaderMap,
) -> Result<Response, ApiError> {
    let (dir, path) = open(&m, &id, &headers, &q).await?;
    let file = blocking(move || dir.open_read(&path)).await?;
    let len = file.metadata().map(|md| md.len()).ok();
    let stream = tokio_util::io::ReaderStream::new(tokio::fs::File::from_std(file));
    let mut response = Body::from_stream(stream).into_response();
    let headers = response.headers_mut();
    headers.insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("application/octet-stream"),
    );
    if let Some(len) = len {
        headers.insert(header::CONTENT_LENGTH, HeaderValue::from(len));
    }
    Ok(response)
}

/// How much of an upload is buffered before it goes to the file.
const WRITE_CHUNK: usize = 1 << 20;

/// Streams the body into the file (never more than the volume's size: 413 past it).
async fn write_file(
    State(m): State<Manager>,
    Path(id): Path<String>,
    Query(q): Query<ContentQuery>,
    headers: HeaderMap,
    request: Request,
) -> Result<(StatusCode, axum::Json<VolumeEntryStat>), ApiError> {
    let (dir, path) = open(&m, &id, &headers, &q).await?;
    let max = dir.max_bytes();
    let too_big = || {
        ApiError::new(
            StatusCode::PAYLOAD_TOO_LARGE,
            format!("the file is larger than the volume ({max} bytes)"),
        )
    };
    if let Some(len) = headers
        .get(header::CONTENT_LENGTH)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.parse::<u64>().ok())
        && len > max
    {
        return Err(too_big());
    }
    let (attrs, force) = (q.attrs(), q.force.unwrap_or(false));
    let (dir, path, mut file) = blocking(move || {
        let file = dir.open_write(&path, attrs, force)?;
        Ok((dir, path, file))
    })
    .await?;
    let mut body = request.into_body();
    let mut written: u64 = 0;
    let mut pending: Vec<u8> = Vec::with_capacity(WRITE_CHUNK);
    loop {
        let frame = body.frame().await;
        let done = frame.is_none();
        if let Some(frame) = frame {
            let frame = frame
                .map_err(|e| ApiError::bad_request(format!("reading the request body: {e}")))?;
            if let Ok(chunk) = frame.into_data() {
                written = written.saturating_add(chunk.len() as u64);
                if written > max {
                    return Err(too_big());
                }
                pending.extend_from_slice(&chunk);
            }
        }
        if pending.len() >= WRITE_CHUNK || (done && !pending.is_empty()) {
            let shown = path.display();
            let data = std::mem::take(&mut pending);
            let (f, mut data) = blocking(move || {
                file.write_all(&data).map_err(|source| VolumeFsError::Io {
                    path: shown,
                    source,
                })?;
                Ok((file, data))
            })
            .await?;
            file = f;
            data.clear();
            pending = data;
        }
        if done {
            break;
        }
    }
    let entry = blocking(move || dir.stat_file(&path, &file)).await?;
    Ok((StatusCode::CREATED, axum::Json(stat_body(entry))))
}
