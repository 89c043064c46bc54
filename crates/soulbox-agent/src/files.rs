//! `GET /files` (download) and `POST /files` (upload, multipart or raw octet-stream), streamed
//! in both directions: memory use does not depend on file size. Only regular files are read or
//! written: FIFOs, sockets and devices get a 400 and are never opened (opening one could block
//! or have side effects), checked again on the open descriptor.

use std::collections::{BTreeMap, HashSet};
use std::fs::OpenOptions;
use std::io::ErrorKind;
use std::os::unix::fs::OpenOptionsExt;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, SystemTime};

use bytes::Bytes;
use futures::{Stream, StreamExt, TryStreamExt};
use http::{HeaderMap, HeaderValue, Method, Request, Response, StatusCode, header};
use http_body_util::BodyExt;
use hyper::body::Incoming;
use tokio_util::io::{ReaderStream, StreamReader};

use crate::Agent;
use crate::fs::{METADATA_XATTR_PREFIX, create_dirs_owned, is_no_space};
use crate::http::{Body, error, json, streaming};
use crate::users::User;

/// Chunk size of streamed downloads.
const CHUNK: usize = 256 * 1024;
/// Limits on `X-Metadata-*` (protocol §4.3).
const MAX_METADATA_KEY: usize = 246;
const MAX_METADATA_TOTAL: usize = 4096;

/// An HTTP error of the `/files` endpoints (`{"code": status, "message": ...}`).
struct Failure(StatusCode, String);

impl Failure {
    fn response(self) -> Response<Body> {
        error(self.0, self.1)
    }

    fn io(path: &Path, e: &std::io::Error) -> Failure {
        let p = path.display();
        match e.kind() {
            ErrorKind::NotFound => {
                Failure(StatusCode::NOT_FOUND, format!("path '{p}' does not exist"))
            }
            ErrorKind::PermissionDenied => Failure(
                StatusCode::FORBIDDEN,
                format!("permission denied for '{p}': {e}"),
            ),
            _ if is_no_space(e) => Failure(
                StatusCode::INSUFFICIENT_STORAGE,
                format!("not enough disk space to write '{p}': {e}"),
            ),
            _ if e.raw_os_error() == Some(libc::ENOTDIR) => Failure(
                StatusCode::BAD_REQUEST,
                format!("a parent of '{p}' is not a directory"),
            ),
            _ => Failure(StatusCode::INTERNAL_SERVER_ERROR, format!("'{p}': {e}")),
        }
    }
}

impl From<crate::server::UserError> for Failure {
    fn from(e: crate::server::UserError) -> Self {
        match e {
            crate::server::UserError::Unknown(m) => Failure(StatusCode::UNAUTHORIZED, m),
            crate::server::UserError::Forbidden(m) => Failure(StatusCode::FORBIDDEN, m),
        }
    }
}

/// The `path` and `username` query parameters.
#[derive(Default)]
struct Query {
    path: Option<String>,
    username: Option<String>,
}

fn query(uri: &http::Uri) -> Query {
    let mut q = Query::default();
    for pair in uri.query().unwrap_or_default().split('&') {
        let (k, v) = pair.split_once('=').unwrap_or((pair, ""));
        let decode = |s: &str| {
            percent_encoding::percent_decode_str(&s.replace('+', " "))
                .decode_utf8_lossy()
                .into_owned()
        };
        match decode(k).as_str() {
            "path" => q.path = Some(decode(v)),
            "username" => q.username = Some(decode(v)),
            _ => {}
        }
    }
    q
}

fn not_regular(path: &Path, meta: &std::fs::Metadata) -> Option<Failure> {
    if meta.is_dir() {
        Some(Failure(
            StatusCode::BAD_REQUEST,
            format!("path '{}' is a directory", path.display()),
        ))
    } else if !meta.is_file() {
        Some(Failure(
            StatusCode::BAD_REQUEST,
            format!("path '{}' is not a regular file", path.display()),
        ))
    } else {
        None
    }
}

async fn blocking<T: Send + 'static>(
    f: impl FnOnce() -> Result<T, Failure> + Send + 'static,
) -> Result<T, Failure> {
    tokio::task::spawn_blocking(f).await.unwrap_or_else(|e| {
        Err(Failure(
            StatusCode::INTERNAL_SERVER_ERROR,
            format!("worker failed: {e}"),
        ))
    })
}

/// Opens a regular file for reading without ever blocking on a FIFO or device.
fn open_regular(path: &Path) -> Result<(std::fs::File, std::fs::Metadata), Failure> {
    let meta = std::fs::metadata(path).map_err(|e| Failure::io(path, &e))?;
    if let Some(f) = not_regular(path, &meta) {
        return Err(f);
    }
    let file = OpenOptions::new()
        .read(true)
        .custom_flags(libc::O_NONBLOCK | libc::O_NOCTTY)
        .open(path)
        .map_err(|e| Failure::io(path, &e))?;
    // The path may have been swapped between stat and open.
    let meta = file.metadata().map_err(|e| Failure::io(path, &e))?;
    if let Some(f) = not_regular(path, &meta) {
        return Err(f);
    }
    Ok((file, meta))
}

/// A byte range of a file of `size` bytes: `Ok(None)` = whole file, `Err` = unsatisfiable.
fn parse_range(header: Option<&HeaderValue>, size: u64) -> Result<Option<(u64, u64)>, ()> {
    let Some(spec) = header
        .and_then(|h| h.to_str().ok())
        .and_then(|h| h.trim().strip_prefix("bytes="))
    else {
        return Ok(None);
    };
    // Several ranges would need multipart/byteranges: serve the whole file instead.
    if spec.contains(',') {
        return Ok(None);
    }
    let (start, end) = spec.split_once('-').ok_or(())?;
    let (start, end) = (start.trim(), end.trim());
    let range = if start.is_empty() {
        let n: u64 = end.parse().map_err(|_| ())?;
        if n == 0 {
            return Err(());
        }
        (size.saturating_sub(n), size.checked_sub(1).ok_or(())?)
    } else {
        let s: u64 = start.parse().map_err(|_| ())?;
        let e = if end.is_empty() {
            size.checked_sub(1).ok_or(())?
        } else {
            end.parse::<u64>()
                .map_err(|_| ())?
                .min(size.saturating_sub(1))
        };
        (s, e)
    };
    if range.0 >= size || range.0 > range.1 {
        return Err(());
    }
    Ok(Some(range))
}

/// `Some(true)`: gzip, `Some(false)`: identity, `None`: nothing acceptable (406). Gzip only
/// when the client asks for it specifically (`files.read(gzip=True)` sends just `gzip`) or
/// refuses identity: clients that merely list it among defaults get the cheaper identity.
fn choose_encoding(headers: &HeaderMap) -> Option<bool> {
    let Some(accept) = headers
        .get(header::ACCEPT_ENCODING)
        .and_then(|v| v.to_str().ok())
    else {
        return Some(false);
    };
    let mut codings: BTreeMap<String, f32> = BTreeMap::new();
    for item in accept.split(',') {
        let mut parts = item.split(';');
        let name = parts.next().unwrap_or_default().trim().to_ascii_lowercase();
        if name.is_empty() {
            continue;
        }
        let q = parts
            .filter_map(|p| p.trim().strip_prefix("q="))
            .find_map(|q| q.trim().parse::<f32>().ok())
            .unwrap_or(1.0);
        codings.insert(name, q);
    }
    let q = |n: &str| codings.get(n).copied();
    let gzip_q = q("gzip").or(q("*")).unwrap_or(0.0);
    // identity is acceptable unless excluded explicitly (RFC 9110 §12.5.3).
    let identity_q = q("identity").or(q("*")).unwrap_or(1.0);
    let only_gzip_asked = codings.keys().all(|k| k == "gzip" || k == "identity");
    if identity_q <= 0.0 {
        return (gzip_q > 0.0).then_some(true);
    }
    Some(gzip_q > 0.0 && only_gzip_asked && gzip_q >= identity_q)
}

fn http_date(t: SystemTime) -> String {
    chrono::DateTime::<chrono::Utc>::from(t)
        .format("%a, %d %b %Y %H:%M:%S GMT")
        .to_string()
}

pub(crate) async fn download(agent: Arc<Agent>, req: Request<Incoming>) -> Response<Body> {
    match download_inner(&agent, &req).await {
        Ok(r) => r,
        Err(f) => f.response(),
    }
}

async fn download_inner(agent: &Agent, req: &Request<Incoming>) -> Result<Response<Body>, Failure> {
    let q = query(req.uri());
    let user = agent.user(q.username.as_deref()).map_err(Failure::from)?;
    let path = agent.resolve(&user, q.path.as_deref().unwrap_or_default());
    let p = path.clone();
    let (file, meta) = blocking(move || open_regular(&p)).await?;
    let size = meta.len();
    let mtime = meta.modified().ok();
    let headers = req.headers();

    let mut resp = Response::new(crate::http::empty());
    let h = resp.headers_mut();
    h.insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("application/octet-stream"),
    );
    h.insert(header::ACCEPT_RANGES, HeaderValue::from_static("bytes"));
    let name = path
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_default();
    let disposition = format!("inline; filename=\"{}\"", name.replace(['"', '\\'], "_"));
    if let Ok(v) = HeaderValue::from_str(&disposition) {
        h.insert(header::CONTENT_DISPOSITION, v);
    }
    if let Some(m) = mtime {
        if let Ok(v) = HeaderValue::from_str(&http_date(m)) {
            h.insert(header::LAST_MODIFIED, v);
        }
        let since = headers
            .get(header::IF_MODIFIED_SINCE)
            .and_then(|v| v.to_str().ok())
            .and_then(|v| chrono::DateTime::parse_from_rfc2822(v).ok());
        let secs = m
            .duration_since(SystemTime::UNIX_EPOCH)
            .unwrap_or(Duration::ZERO)
            .as_secs();
        if since.is_some_and(|s| u64::try_from(s.timestamp()).is_ok_and(|s| secs <= s)) {
            *resp.status_mut() = StatusCode::NOT_MODIFIED;
            return Ok(resp);
        }
    }

    let range = match parse_range(headers.get(header::RANGE), size) {
        Ok(r) => r,
        Err(()) => {
            let mut r = error(
                StatusCode::RANGE_NOT_SATISFIABLE,
                format!("range not satisfiable for a file of {size} bytes"),
            );
            if let Ok(v) = HeaderValue::from_str(&format!("bytes */{size}")) {
                r.headers_mut().insert(header::CONTENT_RANGE, v);
            }
            return Ok(r);
        }
    };
    let gzip = if range.is_some() {
        false
    } else {
        choose_encoding(headers).ok_or_else(|| {
            Failure(
                StatusCode::NOT_ACCEPTABLE,
                "no acceptable content encoding (identity or gzip)".into(),
            )
        })?
    };
    resp.headers_mut()
        .insert(header::VARY, HeaderValue::from_static("Accept-Encoding"));
    let (start, len) = match range {
        Some((s, e)) => {
            *resp.status_mut() = StatusCode::PARTIAL_CONTENT;
            if let Ok(v) = HeaderValue::from_str(&format!("bytes {s}-{e}/{size}")) {
                resp.headers_mut().insert(header::CONTENT_RANGE, v);
            }
            (s, e - s + 1)
        }
        None => (0, size),
    };
    if !gzip {
        resp.headers_mut()
            .insert(header::CONTENT_LENGTH, HeaderValue::from(len));
    }
    if req.method() == Method::HEAD {
        return Ok(resp);
    }
    let chunks = file_chunks(file, start, len);
    *resp.body_mut() = if gzip {
        resp.headers_mut()
            .insert(header::CONTENT_ENCODING, HeaderValue::from_static("gzip"));
        let enc = async_compression::tokio::bufread::GzipEncoder::with_quality(
            StreamReader::new(chunks),
            async_compression::Level::Fastest,
        );
        streaming(ReaderStream::with_capacity(enc, CHUNK))
    } else {
        streaming(chunks)
    };
    Ok(resp)
}

/// Reads `len` bytes of `file` from `start` on one blocking thread and hands them over in
/// chunks through a small bounded channel: one thread hop per transfer rather than per chunk,
/// and at most a few chunks in memory however large the file.
fn file_chunks(
    mut file: std::fs::File,
    start: u64,
    len: u64,
) -> impl Stream<Item = std::io::Result<Bytes>> + Send + 'static {
    let (tx, rx) = tokio::sync::mpsc::channel::<std::io::Result<Bytes>>(4);
    tokio::task::spawn_blocking(move || {
        use std::io::{Read, Seek};
        if start > 0
            && let Err(e) = file.seek(std::io::SeekFrom::Start(start))
        {
            let _ = tx.blocking_send(Err(e));
            return;
        }
        let mut left = len;
        while left > 0 {
            let want = usize::try_from(left).unwrap_or(CHUNK).min(CHUNK);
            let mut buf = bytes::BytesMut::zeroed(want);
            match file.read(&mut buf) {
                // Truncated meanwhile: the body ends short and the client sees it.
                Ok(0) => return,
                Ok(n) => {
                    buf.truncate(n);
                    left -= n as u64;
                    if tx.blocking_send(Ok(buf.freeze())).is_err() {
                        return;
                    }
                }
                Err(e) if e.kind() == ErrorKind::Interrupted => {}
                Err(e) => {
                    let _ = tx.blocking_send(Err(e));
                    return;
                }
            }
        }
    });
    futures::stream::unfold(rx, |mut rx| async move {
        rx.recv().await.map(|item| (item, rx))
    })
}

/// `X-Metadata-<key>` headers as `user.e2b.<key>` xattr values, validated.
fn metadata_from_headers(headers: &HeaderMap) -> Result<Option<BTreeMap<String, String>>, Failure> {
    let mut out = BTreeMap::new();
    let mut total = 0;
    for (name, value) in headers {
        let Some(key) = name.as_str().strip_prefix("x-metadata-") else {
            continue;
        };
        let bad = |why: &str| {
            Failure(
                StatusCode::BAD_REQUEST,
                format!("invalid metadata '{key}': {why}"),
            )
        };
        let value = value
            .to_str()
            .map_err(|_| bad("value must be printable ASCII"))?;
        if key.is_empty() || key.len() > MAX_METADATA_KEY {
            return Err(bad("key must be 1 to 246 bytes"));
        }
        if !value.bytes().all(|b| (0x20..0x7f).contains(&b)) {
            return Err(bad("value must be printable ASCII"));
        }
        total += key.len() + value.len();
        out.insert(key.to_string(), value.to_string());
    }
    if total > MAX_METADATA_TOTAL {
        return Err(Failure(
            StatusCode::BAD_REQUEST,
            format!("metadata exceeds {MAX_METADATA_TOTAL} bytes"),
        ));
    }
    Ok((!out.is_empty()).then_some(out))
}

/// Replaces the file's `user.e2b.*` xattrs with `metadata`.
fn write_metadata(path: &Path, metadata: &BTreeMap<String, String>) -> std::io::Result<()> {
    for name in xattr::list(path)? {
        if name
            .to_str()
            .is_some_and(|n| n.starts_with(METADATA_XATTR_PREFIX))
        {
            xattr::remove(path, &name)?;
        }
    }
    for (k, v) in metadata {
        xattr::set(path, format!("{METADATA_XATTR_PREFIX}{k}"), v.as_bytes())?;
    }
    Ok(())
}

/// One uploaded file, as the response lists it.
#[derive(serde::Serialize)]
struct Written {
    path: String,
    name: String,
    r#type: &'static str,
    #[serde(skip_serializing_if = "Option::is_none")]
    metadata: Option<BTreeMap<String, String>>,
}

/// Streams `data` into `path` as `user`: parents created and chowned, file truncated,
/// chowned, metadata replaced.
async fn write_file<S>(
    path: PathBuf,
    user: &User,
    metadata: Option<&BTreeMap<String, String>>,
    data: S,
) -> Result<Written, Failure>
where
    S: Stream<Item = std::io::Result<Bytes>>,
{
    let (p, u) = (path.clone(), user.clone());
    let file = blocking(move || {
        if let Some(parent) = p.parent() {
            create_dirs_owned(parent, &u).map_err(|e| Failure::io(parent, &e))?;
        }
        match std::fs::metadata(&p) {
            Ok(meta) => {
                if let Some(f) = not_regular(&p, &meta) {
                    return Err(f);
                }
            }
            Err(e) if e.kind() == ErrorKind::NotFound => {}
            Err(e) => return Err(Failure::io(&p, &e)),
        }
        let file = OpenOptions::new()
            .write(true)
            .create(true)
            .truncate(true)
            .mode(0o644)
            .custom_flags(libc::O_NONBLOCK | libc::O_NOCTTY)
            .open(&p)
            .map_err(|e| Failure::io(&p, &e))?;
        let meta = file.metadata().map_err(|e| Failure::io(&p, &e))?;
        if let Some(f) = not_regular(&p, &meta) {
            return Err(f);
        }
        std::os::unix::fs::fchown(&file, Some(u.uid), Some(u.gid))
            .map_err(|e| Failure::io(&p, &e))?;
        Ok(file)
    })
    .await?;
    // One blocking thread writes the whole upload; chunks reach it through a bounded channel.
    let (tx, mut rx) = tokio::sync::mpsc::channel::<Bytes>(8);
    let writer = tokio::task::spawn_blocking(move || -> std::io::Result<()> {
        use std::io::Write;
        let mut file = file;
        while let Some(chunk) = rx.blocking_recv() {
            file.write_all(&chunk)?;
        }
        file.flush()
    });
    let mut data = std::pin::pin!(data);
    let mut read_error = None;
    while let Some(chunk) = data.next().await {
        match chunk {
            Ok(chunk) => {
                if tx.send(chunk).await.is_err() {
                    // The writer failed (disk full, say): let the client finish sending so
                    // it reads our answer rather than a reset connection.
                    let _ = tokio::time::timeout(Duration::from_secs(30), async {
                        while data.next().await.is_some() {}
                    })
                    .await;
                    break;
                }
            }
            Err(e) => {
                read_error = Some(e);
                break;
            }
        }
    }
    drop(tx);
    let written = writer
        .await
        .unwrap_or_else(|e| Err(std::io::Error::other(e)));
    written.map_err(|e| Failure::io(&path, &e))?;
    if let Some(e) = read_error {
        return Err(Failure(
            StatusCode::BAD_REQUEST,
            format!("reading the upload failed: {e}"),
        ));
    }
    let (p, m) = (path.clone(), metadata.cloned());
    blocking(move || match &m {
        Some(m) => write_metadata(&p, m).map_err(|e| Failure::io(&p, &e)),
        None => write_metadata(&p, &BTreeMap::new()).map_err(|e| Failure::io(&p, &e)),
    })
    .await?;
    Ok(Written {
        name: path
            .file_name()
            .map(|n| n.to_string_lossy().into_owned())
            .unwrap_or_default(),
        path: path.to_string_lossy().into_owned(),
        r#type: "file",
        metadata: metadata.cloned(),
    })
}

pub(crate) async fn upload(agent: Arc<Agent>, req: Request<Incoming>) -> Response<Body> {
    let (parts, body) = req.into_parts();
    let mut body = body.into_data_stream().map_err(std::io::Error::other);
    match upload_inner(&agent, &parts, &mut body).await {
        Ok(written) => {
            drain(&mut body, EPILOGUE_MAX).await;
            json(
                StatusCode::OK,
                &serde_json::to_value(written).unwrap_or_default(),
            )
        }
        Err(f) => {
            // Clients (reqwest, the Python SDK's transport among them) that are still sending
            // when the answer comes see a broken pipe instead of it: take the rest first.
            drain(&mut body, FAILED_UPLOAD_DRAIN).await;
            f.response()
        }
    }
}

async fn upload_inner<S>(
    agent: &Agent,
    req: &http::request::Parts,
    body: &mut S,
) -> Result<Vec<Written>, Failure>
where
    S: Stream<Item = std::io::Result<Bytes>> + Send + Unpin,
{
    let q = query(&req.uri);
    let user = agent.user(q.username.as_deref()).map_err(Failure::from)?;
    let metadata = metadata_from_headers(&req.headers)?;
    let content_type = req
        .headers
        .get(header::CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .unwrap_or("application/octet-stream")
        .to_string();
    let gzipped = req
        .headers
        .get(header::CONTENT_ENCODING)
        .and_then(|v| v.to_str().ok())
        .map(|v| v.trim().to_ascii_lowercase());
    let gzipped = match gzipped.as_deref() {
        None | Some("identity") | Some("") => false,
        Some("gzip") => true,
        Some(other) => {
            return Err(Failure(
                StatusCode::BAD_REQUEST,
                format!("unsupported content encoding '{other}'"),
            ));
        }
    };
    let essence = content_type
        .split(';')
        .next()
        .unwrap_or_default()
        .trim()
        .to_ascii_lowercase();

    if essence == "multipart/form-data" {
        let boundary = multer::parse_boundary(&content_type).map_err(|e| {
            Failure(
                StatusCode::BAD_REQUEST,
                format!("invalid multipart request: {e}"),
            )
        })?;
        let mut multipart = multer::Multipart::new(&mut *body, boundary);
        let mut seen = HashSet::new();
        let mut written = Vec::new();
        loop {
            let field = multipart.next_field().await.map_err(|e| {
                Failure(
                    StatusCode::BAD_REQUEST,
                    format!("invalid multipart request: {e}"),
                )
            })?;
            let Some(field) = field else { break };
            if field.name() != Some("file") {
                continue;
            }
            // The SDKs put the full destination path in the filename; `path` wins when given.
            let target = q
                .path
                .clone()
                .or_else(|| field.file_name().map(str::to_string))
                .filter(|t| !t.is_empty())
                .ok_or_else(|| {
                    Failure(
                        StatusCode::BAD_REQUEST,
                        "a file part has no filename and no path was given".into(),
                    )
                })?;
            let path = agent.resolve(&user, &target);
            if !seen.insert(path.clone()) {
                return Err(Failure(
                    StatusCode::BAD_REQUEST,
                    format!("path '{}' is specified more than once", path.display()),
                ));
            }
            let data = field.map_err(std::io::Error::other);
            written.push(write_file(path, &user, metadata.as_ref(), data).await?);
        }
        return Ok(written);
    }
    if essence != "application/octet-stream" {
        return Err(Failure(
            StatusCode::BAD_REQUEST,
            format!("unsupported content type '{content_type}'"),
        ));
    }
    let target = q.path.filter(|p| !p.is_empty()).ok_or_else(|| {
        Failure(
            StatusCode::BAD_REQUEST,
            "the path query parameter is required for octet-stream uploads".into(),
        )
    })?;
    let path = agent.resolve(&user, &target);
    let written = if gzipped {
        let decoder =
            async_compression::tokio::bufread::GzipDecoder::new(StreamReader::new(&mut *body));
        write_file(
            path,
            &user,
            metadata.as_ref(),
            ReaderStream::with_capacity(decoder, CHUNK),
        )
        .await?
    } else {
        write_file(path, &user, metadata.as_ref(), &mut *body).await?
    };
    Ok(vec![written])
}

/// After a successful upload: more than any multipart epilogue (the CRLF after the closing
/// boundary, which some clients send in a write of its own).
const EPILOGUE_MAX: usize = 64 * 1024;
/// After a failed one (disk full, bad path): what is still read so that the client gets the
/// error; a larger upload gets the error and a closed connection.
const FAILED_UPLOAD_DRAIN: usize = 256 * 1024 * 1024;

/// Reads and drops what is left of a request body, up to `max` bytes (each chunk within 5 s).
/// Answering with request bytes unread makes hyper close the connection, and a client or proxy
/// still writing them then gets EPIPE instead of the answer.
async fn drain<S>(body: &mut S, max: usize)
where
    S: Stream<Item = std::io::Result<Bytes>> + Unpin,
{
    let mut read = 0;
    while let Ok(Some(Ok(chunk))) = tokio::time::timeout(Duration::from_secs(5), body.next()).await
    {
        read += chunk.len();
        if read > max {
            break;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ranges() {
        let h = |s: &str| HeaderValue::from_str(s).ok();
        assert_eq!(parse_range(None, 10), Ok(None));
        assert_eq!(parse_range(h("bytes=0-4").as_ref(), 10), Ok(Some((0, 4))));
        assert_eq!(parse_range(h("bytes=5-").as_ref(), 10), Ok(Some((5, 9))));
        assert_eq!(parse_range(h("bytes=-3").as_ref(), 10), Ok(Some((7, 9))));
        assert_eq!(parse_range(h("bytes=-30").as_ref(), 10), Ok(Some((0, 9))));
        assert_eq!(parse_range(h("bytes=8-100").as_ref(), 10), Ok(Some((8, 9))));
        assert_eq!(parse_range(h("bytes=10-").as_ref(), 10), Err(()));
        assert_eq!(parse_range(h("bytes=4-2").as_ref(), 10), Err(()));
        assert_eq!(parse_range(h("bytes=x-2").as_ref(), 10), Err(()));
        assert_eq!(parse_range(h("bytes=0-0").as_ref(), 0), Err(()));
        assert_eq!(parse_range(h("bytes=0-1,3-4").as_ref(), 10), Ok(None));
    }

    #[test]
    fn encodings() {
        let with = |v: &str| {
            let mut h = HeaderMap::new();
            if let Ok(v) = HeaderValue::from_str(v) {
                h.insert(header::ACCEPT_ENCODING, v);
            }
            choose_encoding(&h)
        };
        assert_eq!(choose_encoding(&HeaderMap::new()), Some(false));
        assert_eq!(with("gzip"), Some(true));
        assert_eq!(with("gzip, deflate"), Some(false));
        assert_eq!(with("zstd,gzip,br"), Some(false));
        assert_eq!(with("gzip, identity;q=0"), Some(true));
        assert_eq!(with("identity;q=0"), None);
        assert_eq!(with("br;q=1, identity;q=0"), None);
        assert_eq!(with("*;q=0"), None);
        assert_eq!(with("identity"), Some(false));
    }

    #[test]
    fn metadata_validation() {
        let mut h = HeaderMap::new();
        h.insert("x-metadata-owner", HeaderValue::from_static("alice"));
        h.insert("x-other", HeaderValue::from_static("x"));
        let m = metadata_from_headers(&h).ok().flatten().unwrap_or_default();
        assert_eq!(m.get("owner").map(String::as_str), Some("alice"));
        assert_eq!(m.len(), 1);
        let mut h = HeaderMap::new();
        if let Ok(v) = HeaderValue::from_str(&"v".repeat(5000)) {
            h.insert("x-metadata-big", v);
        }
        assert!(metadata_from_headers(&h).is_err());
        assert!(matches!(metadata_from_headers(&HeaderMap::new()), Ok(None)));
    }
}
