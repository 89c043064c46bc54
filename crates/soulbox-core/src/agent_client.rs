//! The host's client for a sandbox agent's internal endpoints, over its unix socket.
//!
//! Nothing the agent says is trusted: only the status is used, and error bodies are read up to
//! [`MAX_ERROR_BODY`] bytes for the log.

use std::path::Path;
use std::time::Duration;

use bytes::Bytes;
use http::{Method, Request, StatusCode, header};
use http_body_util::{BodyExt, Full, Limited};
use hyper_util::rt::TokioIo;
use soulbox_wire::agent::{INIT_PATH, InitRequest};
use tokio::net::UnixStream;

/// How much of an agent's error body is kept.
const MAX_ERROR_BODY: usize = 4096;

#[derive(Debug, thiserror::Error)]
pub enum AgentError {
    #[error("connecting to {path}: {source}")]
    Connect {
        path: String,
        source: std::io::Error,
    },
    #[error("HTTP to the agent: {0}")]
    Http(#[from] hyper::Error),
    #[error("building the request: {0}")]
    Request(#[from] http::Error),
    #[error("encoding the request: {0}")]
    Encode(#[from] serde_json::Error),
    #[error("agent answered {status}: {body}")]
    Status { status: StatusCode, body: String },
    #[error("agent did not answer within {0:?}")]
    Timeout(Duration),
}

/// Sends `POST /_soulbox/init` and waits for a 2xx.
pub async fn init(socket: &Path, req: &InitRequest, timeout: Duration) -> Result<(), AgentError> {
    let body = Bytes::from(serde_json::to_vec(req)?);
    tokio::time::timeout(timeout, send(socket, Method::POST, INIT_PATH, body))
        .await
        .map_err(|_| AgentError::Timeout(timeout))?
}

/// Whether the agent answers `GET /health` with a 2xx within `timeout`.
pub async fn healthy(socket: &Path, timeout: Duration) -> bool {
    tokio::time::timeout(timeout, send(socket, Method::GET, "/health", Bytes::new()))
        .await
        .is_ok_and(|r| r.is_ok())
}

async fn send(socket: &Path, method: Method, path: &str, body: Bytes) -> Result<(), AgentError> {
    let stream = UnixStream::connect(socket)
        .await
        .map_err(|source| AgentError::Connect {
            path: socket.display().to_string(),
            source,
        })?;
    let (mut sender, conn) = hyper::client::conn::http1::handshake(TokioIo::new(stream)).await?;
    let driver = tokio::spawn(async move {
        if let Err(e) = conn.await {
            tracing::debug!(error = %e, "agent connection closed");
        }
    });
    let request = Request::builder()
        .method(method)
        .uri(path)
        .header(header::HOST, "agent")
        .header(header::CONTENT_TYPE, "application/json")
        .body(Full::new(body))?;
    let result = async {
        let response = sender.send_request(request).await?;
        let status = response.status();
        if status.is_success() {
            return Ok(());
        }
        let body = match Limited::new(response.into_body(), MAX_ERROR_BODY)
            .collect()
            .await
        {
            Ok(collected) => String::from_utf8_lossy(&collected.to_bytes()).into_owned(),
            Err(e) => format!("(unreadable body: {e})"),
        };
        Err(AgentError::Status { status, body })
    }
    .await;
    driver.abort();
    result
}
