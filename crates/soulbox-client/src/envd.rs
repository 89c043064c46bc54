//! envd client: Connect RPCs with the JSON codec over HTTP/1.1, sent the way the E2B SDKs send
//! them (`E2b-Sandbox-Id` / `E2b-Sandbox-Port` routing headers, `X-Access-Token`, Basic-auth
//! user, `Connect-Timeout-Ms`, `Keepalive-Ping-Interval`), plus `/health`. The base URL is
//! what `E2B_SANDBOX_URL` holds (a SoulBox gateway) or an agent's own address.

use std::time::Duration;

use base64::Engine;
use bytes::Bytes;
use http::{Method, Request, StatusCode, Uri, header};
use http_body_util::{BodyExt, Full, Limited};
use hyper::body::Incoming;
use hyper_util::client::legacy::Client;
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::rt::TokioExecutor;
use serde::Serialize;
use serde::de::DeserializeOwned;
use soulbox_wire::connect::{
    Code, Codec, ConnectError, EndStream, EnvelopeDecoder, Framing, HEADER_KEEPALIVE_PING_INTERVAL,
    HEADER_PROTOCOL_VERSION, HEADER_TIMEOUT_MS, encode_envelope,
};
use soulbox_wire::envd::process::{
    self as pb, ProcessInput, ProcessSelector, process_input, process_selector,
};

/// `/files` with its `path` and `username` query parameters.
fn files_path(path: &str, user: Option<&str>) -> String {
    let enc = |s: &str| percent_encoding::utf8_percent_encode(s, FILES_QUERY).to_string();
    let mut q = format!("/files?path={}", enc(path));
    if let Some(user) = user {
        q.push_str(&format!("&username={}", enc(user)));
    }
    q
}

/// What must be escaped in a query parameter value.
const FILES_QUERY: &percent_encoding::AsciiSet = &percent_encoding::NON_ALPHANUMERIC
    .remove(b'/')
    .remove(b'-')
    .remove(b'_')
    .remove(b'.')
    .remove(b'~');

/// envd's port, sent as `E2b-Sandbox-Port`.
pub const ENVD_PORT: u16 = 49983;
/// Largest unary response or stream message accepted.
const MAX_MESSAGE: usize = 16 << 20;

#[derive(Debug, thiserror::Error)]
pub enum EnvdError {
    #[error("invalid envd URL '{0}': expected http://host:port")]
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
    /// An error answered by envd (or by the gateway in its place).
    #[error(transparent)]
    Rpc(#[from] ConnectError),
    #[error("unexpected response: {0}")]
    Protocol(String),
}

impl EnvdError {
    /// The Connect code of an RPC error.
    pub fn code(&self) -> Option<Code> {
        match self {
            EnvdError::Rpc(e) => Some(e.code),
            _ => None,
        }
    }
}

/// Per-call options.
#[derive(Debug, Clone, Default)]
pub struct CallOptions {
    /// Linux user in the sandbox (`Authorization: Basic`); `None` = the sandbox's default.
    pub user: Option<String>,
    /// `Connect-Timeout-Ms`: for `Start` the process lifetime, otherwise the call deadline.
    pub timeout: Option<Duration>,
    /// `Keepalive-Ping-Interval` for server streams.
    pub keepalive: Option<Duration>,
}

/// A client for one sandbox's envd. Cheap to clone.
#[derive(Clone)]
pub struct EnvdClient {
    base: String,
    sandbox_id: Option<String>,
    access_token: Option<String>,
    http: Client<HttpConnector, Full<Bytes>>,
}

impl EnvdClient {
    /// `base_url` is `E2B_SANDBOX_URL` (with [`EnvdClient::sandbox`]) or an agent's address.
    pub fn new(base_url: &str) -> Result<EnvdClient, EnvdError> {
        let base = base_url.trim_end_matches('/').to_owned();
        let uri: Uri = base
            .parse()
            .map_err(|_| EnvdError::InvalidUrl(base_url.to_owned()))?;
        if uri.scheme_str() != Some("http") || uri.host().is_none() {
            return Err(EnvdError::InvalidUrl(base_url.to_owned()));
        }
        let mut connector = HttpConnector::new();
        connector.set_nodelay(true);
        Ok(EnvdClient {
            base,
            sandbox_id: None,
            access_token: None,
            http: Client::builder(TokioExecutor::new()).build(connector),
        })
    }

    /// Routes every request to this sandbox through a gateway (`E2b-Sandbox-Id`/`-Port`).
    pub fn sandbox(mut self, id: &str) -> EnvdClient {
        self.sandbox_id = Some(id.to_owned());
        self
    }

    /// The sandbox's `envdAccessToken`, sent as `X-Access-Token`.
    pub fn access_token(mut self, token: &str) -> EnvdClient {
        self.access_token = Some(token.to_owned());
        self
    }

    fn request(
        &self,
        method: Method,
        path: &str,
        opts: Option<&CallOptions>,
    ) -> http::request::Builder {
        let mut b = Request::builder()
            .method(method)
            .uri(format!("{}{}", self.base, path));
        if let Some(id) = &self.sandbox_id {
            b = b
                .header("E2b-Sandbox-Id", id)
                .header("E2b-Sandbox-Port", ENVD_PORT.to_string());
        }
        if let Some(token) = &self.access_token {
            b = b.header("X-Access-Token", token);
        }
        if let Some(opts) = opts {
            if let Some(user) = &opts.user {
                let basic = base64::engine::general_purpose::STANDARD.encode(format!("{user}:"));
                b = b.header(header::AUTHORIZATION, format!("Basic {basic}"));
            }
            if let Some(t) = opts.timeout {
                b = b.header(HEADER_TIMEOUT_MS, t.as_millis().max(1).to_string());
            }
            if let Some(k) = opts.keepalive {
                b = b.header(
                    HEADER_KEEPALIVE_PING_INTERVAL,
                    k.as_secs().max(1).to_string(),
                );
            }
            b = b.header(HEADER_PROTOCOL_VERSION, "1");
        }
        b
    }

    async fn send(&self, req: Request<Full<Bytes>>) -> Result<http::Response<Incoming>, EnvdError> {
        let url = req.uri().to_string();
        self.http
            .request(req)
            .await
            .map_err(|source| EnvdError::Transport { url, source })
    }

    /// `GET /health`: `Ok` when envd answers 2xx.
    pub async fn health(&self) -> Result<(), EnvdError> {
        let req = self
            .request(Method::GET, "/health", None)
            .body(Full::new(Bytes::new()))?;
        let resp = self.send(req).await?;
        let status = resp.status();
        if status.is_success() {
            return Ok(());
        }
        let body = read_limited(resp.into_body()).await?;
        Err(ConnectError::from_unary_response(status.as_u16(), &body).into())
    }

    /// `POST /files?path=…&username=…`: writes `data` to `path` as one multipart part named
    /// `file`, the way the SDKs' `files.write` does.
    pub async fn write_file(
        &self,
        path: &str,
        data: Bytes,
        user: Option<&str>,
    ) -> Result<(), EnvdError> {
        const BOUNDARY: &str = "soulbox-client-boundary-8d1e4f";
        let mut body = Vec::with_capacity(data.len() + 256);
        body.extend_from_slice(
            format!(
                "--{BOUNDARY}\r\nContent-Disposition: form-data; name=\"file\"; filename=\"file\"\r\n\
                 Content-Type: application/octet-stream\r\n\r\n"
            )
            .as_bytes(),
        );
        body.extend_from_slice(&data);
        body.extend_from_slice(format!("\r\n--{BOUNDARY}--\r\n").as_bytes());
        let req = self
            .request(Method::POST, &files_path(path, user), None)
            .header(
                header::CONTENT_TYPE,
                format!("multipart/form-data; boundary={BOUNDARY}"),
            )
            .body(Full::new(Bytes::from(body)))?;
        let resp = self.send(req).await?;
        let status = resp.status();
        let body = read_limited(resp.into_body()).await?;
        if !status.is_success() {
            return Err(ConnectError::from_unary_response(status.as_u16(), &body).into());
        }
        Ok(())
    }

    /// `GET /files?path=…&username=…`: the file's content.
    pub async fn read_file(&self, path: &str, user: Option<&str>) -> Result<Bytes, EnvdError> {
        let req = self
            .request(Method::GET, &files_path(path, user), None)
            .body(Full::new(Bytes::new()))?;
        let resp = self.send(req).await?;
        let status = resp.status();
        let body = read_limited(resp.into_body()).await?;
        if !status.is_success() {
            return Err(ConnectError::from_unary_response(status.as_u16(), &body).into());
        }
        Ok(body)
    }

    /// A unary RPC, e.g. `path` = `/process.Process/List`.
    pub async fn unary<Req, Resp>(
        &self,
        path: &str,
        msg: &Req,
        opts: &CallOptions,
    ) -> Result<Resp, EnvdError>
    where
        Req: prost::Message + Serialize,
        Resp: prost::Message + Default + DeserializeOwned,
    {
        let req = self
            .request(Method::POST, path, Some(opts))
            .header(
                header::CONTENT_TYPE,
                Codec::Json.content_type(Framing::Unary),
            )
            .body(Full::new(Bytes::from(Codec::Json.encode(msg))))?;
        let resp = self.send(req).await?;
        let status = resp.status();
        let body = read_limited(resp.into_body()).await?;
        if status != StatusCode::OK {
            return Err(ConnectError::from_unary_response(status.as_u16(), &body).into());
        }
        Ok(Codec::Json.decode(&body)?)
    }

    /// A server-streaming RPC; read the messages from the returned stream.
    pub async fn server_stream<Req, Resp>(
        &self,
        path: &str,
        msg: &Req,
        opts: &CallOptions,
    ) -> Result<MessageStream<Resp>, EnvdError>
    where
        Req: prost::Message + Serialize,
        Resp: prost::Message + Default + DeserializeOwned,
    {
        self.streaming_call(path, Codec::Json.envelope(msg), opts)
            .await
    }

    async fn streaming_call<Resp>(
        &self,
        path: &str,
        body: Bytes,
        opts: &CallOptions,
    ) -> Result<MessageStream<Resp>, EnvdError>
    where
        Resp: prost::Message + Default + DeserializeOwned,
    {
        let req = self
            .request(Method::POST, path, Some(opts))
            .header(
                header::CONTENT_TYPE,
                Codec::Json.content_type(Framing::Streaming),
            )
            .body(Full::new(body))?;
        let resp = self.send(req).await?;
        let status = resp.status();
        if status != StatusCode::OK {
            let body = read_limited(resp.into_body()).await?;
            return Err(ConnectError::from_unary_response(status.as_u16(), &body).into());
        }
        let streaming = resp
            .headers()
            .get(header::CONTENT_TYPE)
            .and_then(|v| v.to_str().ok())
            .and_then(Codec::from_content_type)
            == Some((Codec::Json, Framing::Streaming));
        if !streaming {
            return Err(EnvdError::Protocol(
                "a streaming call was not answered with application/connect+json".into(),
            ));
        }
        Ok(MessageStream {
            body: resp.into_body(),
            decoder: EnvelopeDecoder::new(MAX_MESSAGE),
            done: false,
            _message: std::marker::PhantomData,
        })
    }

    /// `process.Process/Start`: the stream's first event carries the pid.
    pub async fn start(
        &self,
        req: &pb::StartRequest,
        opts: &CallOptions,
    ) -> Result<MessageStream<pb::StartResponse>, EnvdError> {
        self.server_stream("/process.Process/Start", req, opts)
            .await
    }

    /// `process.Process/Connect` to a running (or just ended) process.
    pub async fn connect(
        &self,
        process: ProcessSelector,
        opts: &CallOptions,
    ) -> Result<MessageStream<pb::ConnectResponse>, EnvdError> {
        let req = pb::ConnectRequest {
            process: Some(process),
        };
        self.server_stream("/process.Process/Connect", &req, opts)
            .await
    }

    /// `process.Process/SendInput`.
    pub async fn send_input(&self, pid: u32, input: process_input::Input) -> Result<(), EnvdError> {
        let req = pb::SendInputRequest {
            process: Some(by_pid(pid)),
            input: Some(ProcessInput { input: Some(input) }),
        };
        let _: pb::SendInputResponse = self
            .unary("/process.Process/SendInput", &req, &CallOptions::default())
            .await?;
        Ok(())
    }

    /// `process.Process/StreamInput` with all `chunks` (client streaming).
    pub async fn stream_input(
        &self,
        pid: u32,
        chunks: impl IntoIterator<Item = process_input::Input>,
    ) -> Result<(), EnvdError> {
        use pb::stream_input_request::{DataEvent, Event, StartEvent};
        let mut body = Vec::new();
        let start = pb::StreamInputRequest {
            event: Some(Event::Start(StartEvent {
                process: Some(by_pid(pid)),
            })),
        };
        body.extend_from_slice(&Codec::Json.envelope(&start));
        for input in chunks {
            let data = pb::StreamInputRequest {
                event: Some(Event::Data(DataEvent {
                    input: Some(ProcessInput { input: Some(input) }),
                })),
            };
            body.extend_from_slice(&Codec::Json.envelope(&data));
        }
        body.extend_from_slice(&encode_envelope(
            soulbox_wire::connect::FLAG_END_STREAM,
            b"{}",
        ));
        let mut stream: MessageStream<pb::StreamInputResponse> = self
            .streaming_call(
                "/process.Process/StreamInput",
                Bytes::from(body),
                &CallOptions::default(),
            )
            .await?;
        while stream.next().await.transpose()?.is_some() {}
        Ok(())
    }

    /// `process.Process/SendSignal`.
    pub async fn send_signal(&self, pid: u32, signal: pb::Signal) -> Result<(), EnvdError> {
        let req = pb::SendSignalRequest {
            process: Some(by_pid(pid)),
            signal: signal as i32,
        };
        let _: pb::SendSignalResponse = self
            .unary("/process.Process/SendSignal", &req, &CallOptions::default())
            .await?;
        Ok(())
    }

    /// `process.Process/Update`: resizes the process's PTY.
    pub async fn resize(&self, pid: u32, cols: u32, rows: u32) -> Result<(), EnvdError> {
        let req = pb::UpdateRequest {
            process: Some(by_pid(pid)),
            pty: Some(pb::Pty {
                size: Some(pb::pty::Size { cols, rows }),
            }),
        };
        let _: pb::UpdateResponse = self
            .unary("/process.Process/Update", &req, &CallOptions::default())
            .await?;
        Ok(())
    }
}

/// A process selector by pid.
pub fn by_pid(pid: u32) -> ProcessSelector {
    ProcessSelector {
        selector: Some(process_selector::Selector::Pid(pid)),
    }
}

async fn read_limited(body: Incoming) -> Result<Bytes, EnvdError> {
    Limited::new(body, MAX_MESSAGE)
        .collect()
        .await
        .map(|c| c.to_bytes())
        .map_err(|e| EnvdError::Body(e.to_string()))
}

/// The messages of a server stream, decoded as they arrive. The end-of-stream envelope's
/// error, if any, is returned as the last item.
pub struct MessageStream<M> {
    body: Incoming,
    decoder: EnvelopeDecoder,
    done: bool,
    _message: std::marker::PhantomData<fn() -> M>,
}

impl<M: prost::Message + Default + DeserializeOwned> MessageStream<M> {
    /// The next message; `None` after a successful end of stream.
    pub async fn next(&mut self) -> Option<Result<M, EnvdError>> {
        while !self.done {
            match self.decoder.next_envelope() {
                Err(e) => {
                    self.done = true;
                    return Some(Err(ConnectError::from(e).into()));
                }
                Ok(Some(env)) if env.is_end_stream() => {
                    self.done = true;
                    return EndStream::parse(&env.payload).err().map(|e| Err(e.into()));
                }
                Ok(Some(env)) => return Some(Codec::Json.decode(&env.payload).map_err(Into::into)),
                Ok(None) => {}
            }
            match self.body.frame().await {
                Some(Ok(frame)) => {
                    if let Ok(data) = frame.into_data() {
                        self.decoder.push(&data);
                    }
                }
                Some(Err(e)) => {
                    self.done = true;
                    return Some(Err(EnvdError::Body(e.to_string())));
                }
                None => {
                    self.done = true;
                    return Some(Err(EnvdError::Protocol(
                        "the stream ended without an end-of-stream message".into(),
                    )));
                }
            }
        }
        None
    }
}
