//! Control-plane client: the E2B REST calls the CLI needs, sent the way the SDKs send them
//! (v2 routes, `X-API-Key`, the SDKs' metadata filter encoding).

use std::collections::BTreeMap;

use bytes::Bytes;
use http::{Method, Request, StatusCode, Uri, header};
use http_body_util::{BodyExt, Full, Limited};
use hyper_util::client::legacy::Client;
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::rt::TokioExecutor;
use percent_encoding::{NON_ALPHANUMERIC, utf8_percent_encode};
use serde::Serialize;
use serde::de::DeserializeOwned;
use soulbox_wire::rest::{
    ApiError, ConnectSandboxV2, ListedSandbox, NewSandbox, PauseRequest, Sandbox, SandboxDetail,
    SandboxState, SnapshotInfo, SnapshotRequest, TimeoutRequest,
};

/// Largest response body accepted from the server.
const MAX_RESPONSE: usize = 16 * 1024 * 1024;

#[derive(Debug, thiserror::Error)]
pub enum RestError {
    #[error("invalid API URL '{0}': expected http://host:port")]
    InvalidUrl(String),
    #[error("request to {url}: {source}")]
    Transport {
        url: String,
        source: hyper_util::client::legacy::Error,
    },
    #[error("building the request: {0}")]
    Request(#[from] http::Error),
    #[error("reading the response: {0}")]
    Body(String),
    #[error("{status}: {message}")]
    Api { status: StatusCode, message: String },
    #[error("unexpected response body: {0}")]
    Decode(#[from] serde_json::Error),
}

impl RestError {
    /// The HTTP status of an error answer from the server.
    pub fn status(&self) -> Option<StatusCode> {
        match self {
            RestError::Api { status, .. } => Some(*status),
            _ => None,
        }
    }
}

/// Filters of [`RestClient::list`].
#[derive(Debug, Clone, Default)]
pub struct ListFilter {
    pub metadata: BTreeMap<String, String>,
    pub states: Vec<SandboxState>,
    pub limit: Option<u32>,
    pub next_token: Option<String>,
}

/// A client for one server and API key. Cheap to clone.
#[derive(Clone)]
pub struct RestClient {
    base: String,
    api_key: String,
    http: Client<HttpConnector, Full<Bytes>>,
}

impl RestClient {
    /// `base_url` is what `E2B_API_URL` holds, e.g. `http://127.0.0.1:3000`.
    pub fn new(base_url: &str, api_key: &str) -> Result<RestClient, RestError> {
        let base = base_url.trim_end_matches('/').to_owned();
        let uri: Uri = base
            .parse()
            .map_err(|_| RestError::InvalidUrl(base_url.to_owned()))?;
        if uri.scheme_str() != Some("http") || uri.host().is_none() {
            return Err(RestError::InvalidUrl(base_url.to_owned()));
        }
        let mut connector = HttpConnector::new();
        connector.set_nodelay(true);
        Ok(RestClient {
            base,
            api_key: api_key.to_owned(),
            http: Client::builder(TokioExecutor::new()).build(connector),
        })
    }

    /// `POST /v2/sandboxes`.
    pub async fn create(&self, req: &NewSandbox) -> Result<Sandbox, RestError> {
        self.json(Method::POST, "/v2/sandboxes", Some(req)).await
    }

    /// `GET /v2/sandboxes`: one page and the token of the next.
    pub async fn list(
        &self,
        filter: &ListFilter,
    ) -> Result<(Vec<ListedSandbox>, Option<String>), RestError> {
        let mut query: Vec<String> = Vec::new();
        if !filter.metadata.is_empty() {
            query.push(format!(
                "metadata={}",
                query_value(&encode_metadata(&filter.metadata))
            ));
        }
        if !filter.states.is_empty() {
            let states: Vec<&str> = filter.states.iter().map(|s| s.as_str()).collect();
            query.push(format!("state={}", query_value(&states.join(","))));
        }
        if let Some(limit) = filter.limit {
            query.push(format!("limit={limit}"));
        }
        if let Some(token) = &filter.next_token {
            query.push(format!("nextToken={}", query_value(token)));
        }
        let path = if query.is_empty() {
            "/v2/sandboxes".to_owned()
        } else {
            format!("/v2/sandboxes?{}", query.join("&"))
        };
        let (headers, body) = self.send(Method::GET, &path, None).await?;
        let next = headers
            .get("x-next-token")
            .and_then(|v| v.to_str().ok())
            .map(str::to_owned);
        Ok((serde_json::from_slice(&body)?, next))
    }

    /// `GET /sandboxes/{id}`.
    pub async fn get(&self, id: &str) -> Result<SandboxDetail, RestError> {
        self.json::<(), _>(Method::GET, &format!("/sandboxes/{}", segment(id)), None)
            .await
    }

    /// `DELETE /sandboxes/{id}`.
    pub async fn kill(&self, id: &str) -> Result<(), RestError> {
        self.send(Method::DELETE, &format!("/sandboxes/{}", segment(id)), None)
            .await
            .map(drop)
    }

    /// `POST /sandboxes/{id}/timeout`.
    pub async fn set_timeout(&self, id: &str, seconds: i64) -> Result<(), RestError> {
        let body = serde_json::to_vec(&TimeoutRequest { timeout: seconds })?;
        self.send(
            Method::POST,
            &format!("/sandboxes/{}/timeout", segment(id)),
            Some(body),
        )
        .await
        .map(drop)
    }

    /// `POST /sandboxes/{id}/pause`: `memory: Some(false)` keeps files only. `Ok(false)` when
    /// it was paused already (409).
    pub async fn pause(&self, id: &str, memory: Option<bool>) -> Result<bool, RestError> {
        let body = serde_json::to_vec(&PauseRequest {
            memory,
            require_healthy_guest: None,
        })?;
        match self
            .send(
                Method::POST,
                &format!("/sandboxes/{}/pause", segment(id)),
                Some(body),
            )
            .await
        {
            Ok(_) => Ok(true),
            Err(e) if e.status() == Some(StatusCode::CONFLICT) => Ok(false),
            Err(e) => Err(e),
        }
    }

    /// `POST /v2/sandboxes/{id}/connect`: resumes a paused sandbox (`memory: Some(false)`
    /// boots it again from its files), or extends a running one's timeout.
    pub async fn connect(
        &self,
        id: &str,
        timeout: Option<i64>,
        memory: Option<bool>,
    ) -> Result<Sandbox, RestError> {
        self.json(
            Method::POST,
            &format!("/v2/sandboxes/{}/connect", segment(id)),
            Some(&ConnectSandboxV2 { timeout, memory }),
        )
        .await
    }

    /// `POST /sandboxes/{id}/snapshots`: a template of the sandbox's files.
    pub async fn create_snapshot(
        &self,
        id: &str,
        name: Option<String>,
    ) -> Result<SnapshotInfo, RestError> {
        self.json(
            Method::POST,
            &format!("/sandboxes/{}/snapshots", segment(id)),
            Some(&SnapshotRequest { name, memory: None }),
        )
        .await
    }

    /// `GET /snapshots` (every page), of one sandbox when given.
    pub async fn list_snapshots(
        &self,
        sandbox_id: Option<&str>,
    ) -> Result<Vec<SnapshotInfo>, RestError> {
        let mut all = Vec::new();
        let mut next: Option<String> = None;
        loop {
            let mut path = "/snapshots?limit=1000".to_owned();
            if let Some(id) = sandbox_id {
                path.push_str(&format!("&sandboxID={}", segment(id)));
            }
            if let Some(t) = &next {
                path.push_str(&format!("&nextToken={}", segment(t)));
            }
            let (headers, body) = self.send(Method::GET, &path, None).await?;
            let page: Vec<SnapshotInfo> = serde_json::from_slice(&body)?;
            all.extend(page);
            next = headers
                .get("x-next-token")
                .and_then(|v| v.to_str().ok())
                .map(str::to_owned);
            if next.is_none() {
                return Ok(all);
            }
        }
    }

    /// Deletes a snapshot (it is a template: `DELETE /templates/{id}`, as the SDKs do).
    pub async fn delete_snapshot(&self, snapshot_id: &str) -> Result<(), RestError> {
        self.send(
            Method::DELETE,
            &format!("/templates/{}", segment(snapshot_id)),
            None,
        )
        .await
        .map(drop)
    }

    /// A JSON call to any control-plane route (those without a typed method here, such as
    /// the template routes); `path` must be percent-encoded already.
    pub async fn call_json<B: Serialize, T: DeserializeOwned>(
        &self,
        method: Method,
        path: &str,
        body: Option<&B>,
    ) -> Result<T, RestError> {
        self.json(method, path, body).await
    }

    /// A call whose answer body is not needed.
    pub async fn call(
        &self,
        method: Method,
        path: &str,
        body: Option<Vec<u8>>,
    ) -> Result<(), RestError> {
        self.send(method, path, body).await.map(drop)
    }

    /// `PUT`s `body` to an absolute URL (a template file upload link), without the API key.
    pub async fn put_url(&self, url: &str, body: Vec<u8>) -> Result<(), RestError> {
        let req = Request::builder()
            .method(Method::PUT)
            .uri(url)
            .body(Full::new(Bytes::from(body)))?;
        let response = self
            .http
            .request(req)
            .await
            .map_err(|source| RestError::Transport {
                url: url.to_owned(),
                source,
            })?;
        let status = response.status();
        if !status.is_success() {
            let bytes = Limited::new(response.into_body(), MAX_RESPONSE)
                .collect()
                .await
                .map_err(|e| RestError::Body(e.to_string()))?
                .to_bytes();
            return Err(RestError::Api {
                status,
                message: String::from_utf8_lossy(&bytes).into_owned(),
            });
        }
        Ok(())
    }

    async fn json<B: Serialize, T: DeserializeOwned>(
        &self,
        method: Method,
        path: &str,
        body: Option<&B>,
    ) -> Result<T, RestError> {
        let body = body.map(serde_json::to_vec).transpose()?;
        let (_, bytes) = self.send(method, path, body).await?;
        Ok(serde_json::from_slice(&bytes)?)
    }

    async fn send(
        &self,
        method: Method,
        path: &str,
        body: Option<Vec<u8>>,
    ) -> Result<(http::HeaderMap, Bytes), RestError> {
        let url = format!("{}{path}", self.base);
        let mut req = Request::builder()
            .method(method)
            .uri(&url)
            .header("x-api-key", &self.api_key);
        if body.is_some() {
            req = req.header(header::CONTENT_TYPE, "application/json");
        }
        let req = req.body(Full::new(Bytes::from(body.unwrap_or_default())))?;
        let response = self
            .http
            .request(req)
            .await
            .map_err(|source| RestError::Transport {
                url: url.clone(),
                source,
            })?;
        let (parts, body) = response.into_parts();
        let bytes = Limited::new(body, MAX_RESPONSE)
            .collect()
            .await
            .map_err(|e| RestError::Body(e.to_string()))?
            .to_bytes();
        if !parts.status.is_success() {
            let message = serde_json::from_slice::<ApiError>(&bytes)
                .map(|e| e.message)
                .unwrap_or_else(|_| String::from_utf8_lossy(&bytes).into_owned());
            return Err(RestError::Api {
                status: parts.status,
                message,
            });
        }
        Ok((parts.headers, bytes))
    }
}

/// The SDKs' metadata filter: each key and value percent-encoded, joined as `k=v&…`, and that
/// string encoded again (protocol doc §3.5); [`query_value`] adds the final query encoding.
fn encode_metadata(metadata: &BTreeMap<String, String>) -> String {
    metadata
        .iter()
        .map(|(k, v)| {
            let k = utf8_percent_encode(k, NON_ALPHANUMERIC).to_string();
            let v = utf8_percent_encode(v, NON_ALPHANUMERIC).to_string();
            format!("{}={}", query_value(&k), query_value(&v))
        })
        .collect::<Vec<_>>()
        .join("&")
}

fn query_value(s: &str) -> String {
    utf8_percent_encode(s, NON_ALPHANUMERIC).to_string()
}

/// A sandbox id as one path segment (ids are `[a-z0-9]`, but the CLI takes any input).
pub(crate) fn segment(id: &str) -> String {
    utf8_percent_encode(id, NON_ALPHANUMERIC).to_string()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn metadata_filter_is_encoded_like_the_python_sdk() {
        // Python e2b 2.63 sends `{"k": "v w"}` as `metadata=k%3Dv%252520w`.
        let m = BTreeMap::from([("k".to_owned(), "v w".to_owned())]);
        assert_eq!(query_value(&encode_metadata(&m)), "k%3Dv%252520w");
    }

    #[test]
    fn base_url_must_be_http() {
        assert!(RestClient::new("http://127.0.0.1:3000/", "k").is_ok());
        assert!(RestClient::new("https://api.example.com", "k").is_err());
        assert!(RestClient::new("not a url", "k").is_err());
    }
}
