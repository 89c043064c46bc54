//! Volumes: the control plane's `/volumes` (through [`RestClient`]) and the volume content API
//! (`/volumecontent/{volumeID}/…`, with the volume's bearer token), as the E2B SDKs call them.

use bytes::Bytes;
use http::{Method, Request, Uri, header};
use http_body_util::{BodyExt, Full, Limited};
use hyper_util::client::legacy::Client;
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::rt::TokioExecutor;
use soulbox_wire::rest::ApiError;
use soulbox_wire::volumes::{NewVolume, Volume, VolumeAndToken, VolumeEntryStat};
use tokio::io::AsyncWriteExt;

use crate::rest::{RestClient, RestError, segment};

/// Largest JSON answer of the content API (a deep listing).
const MAX_JSON: usize = 64 * 1024 * 1024;

impl RestClient {
    /// `POST /volumes`.
    pub async fn create_volume(&self, name: &str) -> Result<VolumeAndToken, RestError> {
        self.call_json(
            Method::POST,
            "/volumes",
            Some(&NewVolume {
                name: name.to_owned(),
            }),
        )
        .await
    }

    /// `GET /volumes`.
    pub async fn list_volumes(&self) -> Result<Vec<Volume>, RestError> {
        self.call_json::<(), _>(Method::GET, "/volumes", None).await
    }

    /// `GET /volumes/{id}`: the volume with its content token.
    pub async fn get_volume(&self, id: &str) -> Result<VolumeAndToken, RestError> {
        self.call_json::<(), _>(Method::GET, &format!("/volumes/{}", segment(id)), None)
            .await
    }

    /// `DELETE /volumes/{id}`.
    pub async fn delete_volume(&self, id: &str) -> Result<(), RestError> {
        self.call(Method::DELETE, &format!("/volumes/{}", segment(id)), None)
            .await
    }
}

/// The content API of one volume.
#[derive(Clone)]
pub struct VolumeContentClient {
    base: String,
    volume_id: String,
    token: String,
    http: Client<HttpConnector, Full<Bytes>>,
}

impl VolumeContentClient {
    /// `base_url` is what `E2B_VOLUME_API_URL` holds (SoulBox: the control plane's URL).
    pub fn new(base_url: &str, volume_id: &str, token: &str) -> Result<Self, RestError> {
        let base = base_url.trim_end_matches('/').to_owned();
        let uri: Uri = base
            .parse()
            .map_err(|_| RestError::InvalidUrl(base_url.to_owned()))?;
        if uri.scheme_str() != Some("http") || uri.host().is_none() {
            return Err(RestError::InvalidUrl(base_url.to_owned()));
        }
        Ok(VolumeContentClient {
            base,
            volume_id: volume_id.to_owned(),
            token: token.to_owned(),
            http: Client::builder(TokioExecutor::new()).build(HttpConnector::new()),
        })
    }

    fn url(&self, what: &str, path: &str, extra: &str) -> String {
        format!(
            "{}/volumecontent/{}/{what}?path={}{extra}",
            self.base,
            segment(&self.volume_id),
            segment(path)
        )
    }

    async fn send(
        &self,
        method: Method,
        url: String,
        body: Option<Vec<u8>>,
    ) -> Result<hyper::Response<hyper::body::Incoming>, RestError> {
        let mut req = Request::builder()
            .method(method)
            .uri(&url)
            .header(header::AUTHORIZATION, format!("Bearer {}", self.token));
        if body.is_some() {
            req = req.header(header::CONTENT_TYPE, "application/octet-stream");
        }
        let req = req.body(Full::new(Bytes::from(body.unwrap_or_default())))?;
        let response = self
            .http
            .request(req)
            .await
            .map_err(|source| RestError::Transport { url, source })?;
        if response.status().is_success() {
            return Ok(response);
        }
        let status = response.status();
        let bytes = Limited::new(response.into_body(), 64 * 1024)
            .collect()
            .await
            .map_err(|e| RestError::Body(e.to_string()))?
            .to_bytes();
        let message = serde_json::from_slice::<ApiError>(&bytes)
            .map(|e| e.message)
            .unwrap_or_else(|_| String::from_utf8_lossy(&bytes).into_owned());
        Err(RestError::Api { status, message })
    }

    async fn json<T: serde::de::DeserializeOwned>(
        &self,
        method: Method,
        url: String,
        body: Option<Vec<u8>>,
    ) -> Result<T, RestError> {
        let response = self.send(method, url, body).await?;
        let bytes = Limited::new(response.into_body(), MAX_JSON)
            .collect()
            .await
            .map_err(|e| RestError::Body(e.to_string()))?
            .to_bytes();
        Ok(serde_json::from_slice(&bytes)?)
    }

    /// `GET …/dir`: the entries of directory `path`, `depth` levels deep.
    pub async fn list(&self, path: &str, depth: u32) -> Result<Vec<VolumeEntryStat>, RestError> {
        self.json(
            Method::GET,
            self.url("dir", path, &format!("&depth={depth}")),
            None,
        )
        .await
    }

    /// `GET …/path`.
    pub async fn stat(&self, path: &str) -> Result<VolumeEntryStat, RestError> {
        self.json(Method::GET, self.url("path", path, ""), None)
            .await
    }

    /// `POST …/dir` with `force` (parents made).
    pub async fn make_dir(&self, path: &str) -> Result<VolumeEntryStat, RestError> {
        self.json(Method::POST, self.url("dir", path, "&force=true"), None)
            .await
    }

    /// `PUT …/file` (parents made).
    pub async fn write(&self, path: &str, data: Vec<u8>) -> Result<VolumeEntryStat, RestError> {
        self.json(
            Method::PUT,
            self.url("file", path, "&force=true"),
            Some(data),
        )
        .await
    }

    /// `GET …/file`, streamed into `out`; returns the bytes written.
    pub async fn read_into<W: tokio::io::AsyncWrite + Unpin>(
        &self,
        path: &str,
        out: &mut W,
    ) -> Result<u64, RestError> {
        let response = self
            .send(Method::GET, self.url("file", path, ""), None)
            .await?;
        let mut body = response.into_body();
        let mut n = 0u64;
        while let Some(frame) = body.frame().await {
            let frame = frame.map_err(|e| RestError::Body(e.to_string()))?;
            if let Ok(data) = frame.into_data() {
                out.write_all(&data)
                    .await
                    .map_err(|e| RestError::Body(e.to_string()))?;
                n += data.len() as u64;
            }
        }
        out.flush()
            .await
            .map_err(|e| RestError::Body(e.to_string()))?;
        Ok(n)
    }

    /// `DELETE …/path`.
    pub async fn remove(&self, path: &str) -> Result<(), RestError> {
        self.send(Method::DELETE, self.url("path", path, ""), None)
            .await
            .map(drop)
    }
}
