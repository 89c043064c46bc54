//! HTTP routes of protocol doc §6.1 (axum).

use std::convert::Infallible;
use std::sync::Arc;
use std::time::Duration;

use axum::Json;
use axum::Router;
use axum::body::{Body, Bytes};
use axum::extract::{DefaultBodyLimit, Path, State};
use axum::http::{StatusCode, header};
use axum::response::{IntoResponse, Response};
use axum::routing::{delete, get, post};
use serde::de::DeserializeOwned;
use tokio::sync::{mpsc, watch};

use crate::context::{ContextError, Registry};
use crate::snippets::validate_env;
use crate::wire::{CreateContextRequest, ExecuteRequest, OutputEvent};

/// A keepalive line is written after this long without output, so a vanished client is
/// noticed (the write fails) even while the code is silent.
const KEEPALIVE: Duration = Duration::from_secs(5);
/// Output lines buffered per execution before the kernel side is back-pressured.
const OUTPUT_BUFFER: usize = 16;
/// Largest accepted request body: code cells can embed data, so well above axum's 2 MB.
const MAX_BODY: usize = 64 * 1024 * 1024;

/// Start-up state reported by `/health`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Health {
    /// The default Python context is still starting.
    Starting,
    Ready,
    /// The default Python context could not be started.
    Failed(String),
}

#[derive(Clone)]
pub struct AppState {
    pub registry: Arc<Registry>,
    pub health: watch::Receiver<Health>,
}

pub fn router(state: AppState) -> Router {
    Router::new()
        .route("/health", get(health))
        .route("/execute", post(execute))
        .route("/contexts", post(create_context).get(list_contexts))
        .route("/contexts/{id}/restart", post(restart_context))
        .route("/contexts/{id}", delete(remove_context))
        .layer(DefaultBodyLimit::max(MAX_BODY))
        .with_state(state)
}

async fn health(State(state): State<AppState>) -> Response {
    let health = state.health.borrow().clone();
    match health {
        Health::Ready => Json("OK").into_response(),
        Health::Starting => text(StatusCode::SERVICE_UNAVAILABLE, "starting".to_owned()),
        Health::Failed(err) => text(StatusCode::SERVICE_UNAVAILABLE, err),
    }
}

async fn execute(State(state): State<AppState>, body: Bytes) -> Response {
    let request: ExecuteRequest = match parse_json(&body) {
        Ok(request) => request,
        Err(response) => return *response,
    };
    let context_id = request.context_id.filter(|id| !id.trim().is_empty());
    let language = request.language.filter(|l| !l.trim().is_empty());
    let context = match (context_id, language) {
        (Some(_), Some(_)) => {
            return text(
                StatusCode::BAD_REQUEST,
                "Only one of context_id or language can be provided".to_owned(),
            );
        }
        (Some(id), None) => match state.registry.get(&id) {
            Some(context) => context,
            None => return error_response(ContextError::NotFound(id)),
        },
        (None, language) => match state.registry.default_for(language.as_deref()).await {
            Ok(context) => context,
            Err(err) => return error_response(err),
        },
    };
    let env = match request.env_vars.filter(|vars| !vars.is_empty()) {
        Some(vars) => match validate_env(context.language(), &vars) {
            Ok(flavour) => Some((flavour, vars)),
            Err(err) => return text(StatusCode::BAD_REQUEST, err.to_string()),
        },
        None => None,
    };
    let (tx, rx) = mpsc::channel(OUTPUT_BUFFER);
    tokio::spawn(context.execute(request.code, env, tx));
    Response::builder()
        .header(header::CONTENT_TYPE, "application/x-ndjson")
        .body(ndjson(rx))
        .unwrap_or_else(|_| StatusCode::INTERNAL_SERVER_ERROR.into_response())
}

/// The `/execute` body: one line per event as it happens, keepalives while quiet, and
/// `end_of_execution` last. Dropping the body (client gone) closes `rx`, which the execution
/// notices.
fn ndjson(rx: mpsc::Receiver<OutputEvent>) -> Body {
    let lines = futures::stream::unfold(Some(rx), |rx| async move {
        let mut rx = rx?;
        let (event, rx) = match tokio::time::timeout(KEEPALIVE, rx.recv()).await {
            Ok(Some(event)) => (event, Some(rx)),
            Ok(None) => (OutputEvent::EndOfExecution, None),
            Err(_) => (OutputEvent::Keepalive, Some(rx)),
        };
        Some((Ok::<_, Infallible>(Bytes::from(event.to_line())), rx))
    });
    Body::from_stream(lines)
}

async fn create_context(State(state): State<AppState>, body: Bytes) -> Response {
    let request: CreateContextRequest = if body.iter().all(u8::is_ascii_whitespace) {
        CreateContextRequest::default()
    } else {
        match parse_json(&body) {
            Ok(request) => request,
            Err(response) => return *response,
        }
    };
    match state
        .registry
        .create(request.language.as_deref(), request.cwd.as_deref())
        .await
    {
        Ok(context) => Json(context.info().clone()).into_response(),
        Err(err) => error_response(err),
    }
}

async fn list_contexts(State(state): State<AppState>) -> Response {
    Json(state.registry.list()).into_response()
}

async fn restart_context(State(state): State<AppState>, Path(id): Path<String>) -> Response {
    let Some(context) = state.registry.get(&id) else {
        return error_response(ContextError::NotFound(id));
    };
    match context.restart().await {
        Ok(()) => Json(()).into_response(),
        Err(err) => error_response(err),
    }
}

async fn remove_context(State(state): State<AppState>, Path(id): Path<String>) -> Response {
    match state.registry.remove(&id).await {
        Ok(()) => Json(()).into_response(),
        Err(err) => error_response(err),
    }
}

/// A JSON body, or the 400 response for it.
fn parse_json<T: DeserializeOwned>(body: &[u8]) -> Result<T, Box<Response>> {
    serde_json::from_slice(body).map_err(|err| {
        Box::new(text(
            StatusCode::BAD_REQUEST,
            format!("Invalid request body: {err}"),
        ))
    })
}

fn error_response(err: ContextError) -> Response {
    let status = match &err {
        ContextError::NotFound(_) => StatusCode::NOT_FOUND,
        ContextError::BadRequest(_) => StatusCode::BAD_REQUEST,
        ContextError::Kernel(_) => StatusCode::INTERNAL_SERVER_ERROR,
    };
    text(status, err.to_string())
}

fn text(status: StatusCode, body: String) -> Response {
    (
        status,
        [(header::CONTENT_TYPE, "text/plain; charset=utf-8")],
        body,
    )
        .into_response()
}
