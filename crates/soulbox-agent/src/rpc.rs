//! A small server side of the Connect protocol over hyper: unary, server-streaming and
//! client-streaming calls with the JSON and protobuf codecs. Bodies are size-limited before
//! they are buffered (a huge unary body gets 413 with `resource_exhausted`, an oversized
//! envelope ends the stream with `resource_exhausted`), so no request can exhaust memory.

use std::time::Duration;

use bytes::Bytes;
use futures::{Stream, StreamExt};
use http::{HeaderMap, HeaderValue, Method, Response, StatusCode, header};
use http_body_util::BodyExt;
use hyper::body::Incoming;
use serde::Serialize;
use serde::de::DeserializeOwned;
use soulbox_wire::connect::{
    Code, Codec, ConnectError, EndStream, EnvelopeDecoder, Framing, HEADER_KEEPALIVE_PING_INTERVAL,
    HEADER_TIMEOUT_MS,
};

use crate::http::{Body, full, streaming};

/// Largest message we accept in one body or envelope.
pub const MAX_MESSAGE_BYTES: usize = 16 << 20;

/// Keepalive interval when the client does not ask for one (upstream's default).
const DEFAULT_KEEPALIVE: Duration = Duration::from_secs(90);

/// The shape of an RPC.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Kind {
    Unary,
    ServerStream,
    ClientStream,
}

/// An incoming RPC whose content type fits its kind.
pub struct Call {
    pub codec: Codec,
    pub headers: HeaderMap,
    body: Incoming,
}

impl Call {
    /// Checks method and content type; the error response is ready to send.
    pub fn new(req: http::Request<Incoming>, kind: Kind) -> Result<Call, Box<Response<Body>>> {
        let (parts, body) = req.into_parts();
        if parts.method != Method::POST {
            let mut r = unary_error(&ConnectError::new(
                Code::Unimplemented,
                "Connect RPCs are served over POST only",
            ));
            *r.status_mut() = StatusCode::METHOD_NOT_ALLOWED;
            r.headers_mut()
                .insert(header::ALLOW, HeaderValue::from_static("POST"));
            return Err(Box::new(r));
        }
        let content_type = parts
            .headers
            .get(header::CONTENT_TYPE)
            .and_then(|v| v.to_str().ok())
            .unwrap_or_default();
        let want = if kind == Kind::Unary {
            Framing::Unary
        } else {
            Framing::Streaming
        };
        match Codec::from_content_type(content_type) {
            Some((codec, framing)) if framing == want => Ok(Call {
                codec,
                headers: parts.headers,
                body,
            }),
            _ => {
                let mut r = unary_error(&ConnectError::new(
                    Code::InvalidArgument,
                    format!("unsupported content type {content_type:?} for this method"),
                ));
                *r.status_mut() = StatusCode::UNSUPPORTED_MEDIA_TYPE;
                Err(Box::new(r))
            }
        }
    }

    /// `Connect-Timeout-Ms`, when present and valid.
    pub fn timeout(&self) -> Option<Duration> {
        let v = self.headers.get(HEADER_TIMEOUT_MS)?.to_str().ok()?;
        // The protocol allows at most 10 digits.
        if v.is_empty() || v.len() > 10 {
            return None;
        }
        v.parse::<u64>().ok().map(Duration::from_millis)
    }

    /// `Keepalive-Ping-Interval` (seconds), else upstream's default.
    pub fn keepalive(&self) -> Duration {
        self.headers
            .get(HEADER_KEEPALIVE_PING_INTERVAL)
            .and_then(|v| v.to_str().ok())
            .and_then(|v| v.trim().parse::<u64>().ok())
            .filter(|s| *s > 0)
            .map(|s| Duration::from_secs(s.min(24 * 3600)))
            .unwrap_or(DEFAULT_KEEPALIVE)
    }

    /// Reads a unary request. `Err` is the response to send (413 for oversized bodies).
    pub async fn unary<M>(self) -> Result<(Codec, HeaderMap, M), Response<Body>>
    where
        M: prost::Message + Default + DeserializeOwned,
    {
        let codec = self.codec;
        let declared = self
            .headers
            .get(header::CONTENT_LENGTH)
            .and_then(|v| v.to_str().ok())
            .and_then(|v| v.parse::<u64>().ok());
        if declared.is_some_and(|n| n > MAX_MESSAGE_BYTES as u64) {
            drain(self.body).await;
            return Err(too_large());
        }
        let mut body = self.body;
        let mut buf = bytes::BytesMut::new();
        loop {
            match body.frame().await {
                Some(Ok(frame)) => {
                    if let Ok(data) = frame.into_data() {
                        if buf.len() + data.len() > MAX_MESSAGE_BYTES {
                            drain(body).await;
                            return Err(too_large());
                        }
                        buf.extend_from_slice(&data);
                    }
                }
                Some(Err(e)) => {
                    return Err(unary_error(&ConnectError::new(
                        Code::Canceled,
                        format!("reading the request failed: {e}"),
                    )));
                }
                None => break,
            }
        }
        let bytes = buf.freeze();
        match codec.decode::<M>(&bytes) {
            Ok(m) => Ok((codec, self.headers, m)),
            Err(e) => Err(unary_error(&e)),
        }
    }

    /// The single message of a server-streaming request.
    pub async fn single_message<M>(&mut self) -> Result<M, ConnectError>
    where
        M: prost::Message + Default + DeserializeOwned,
    {
        let mut decoder = EnvelopeDecoder::new(MAX_MESSAGE_BYTES);
        loop {
            if let Some(env) = decoder.next_envelope()? {
                if env.is_end_stream() {
                    break;
                }
                // Read the body to its end (the chunked terminator usually follows the
                // envelope): hyper cannot reuse a connection whose request body was left
                // unread, and clients that pool connections would then fail their next call.
                let rest = &mut self.body;
                let _ = tokio::time::timeout(Duration::from_secs(10), async {
                    let mut seen = 0usize;
                    while let Some(Ok(frame)) = rest.frame().await {
                        seen += frame.data_ref().map_or(0, |d| d.len());
                        if seen > MAX_MESSAGE_BYTES {
                            break;
                        }
                    }
                })
                .await;
                return self.codec.decode(&env.payload);
            }
            match self.body.frame().await {
                Some(Ok(frame)) => {
                    if let Ok(data) = frame.into_data() {
                        decoder.push(&data);
                    }
                }
                Some(Err(e)) => {
                    return Err(ConnectError::new(
                        Code::Canceled,
                        format!("reading the request failed: {e}"),
                    ));
                }
                None => break,
            }
        }
        Err(ConnectError::new(
            Code::InvalidArgument,
            "the request stream carried no message",
        ))
    }

    /// The messages of a client-streaming request, decoded as they arrive.
    pub fn messages<M>(self) -> impl Stream<Item = Result<M, ConnectError>> + Send + 'static
    where
        M: prost::Message + Default + DeserializeOwned + Send + 'static,
    {
        let codec = self.codec;
        let state = Some((self.body, EnvelopeDecoder::new(MAX_MESSAGE_BYTES)));
        futures::stream::unfold(state, move |state| async move {
            let (mut body, mut decoder) = state?;
            loop {
                match decoder.next_envelope() {
                    Err(e) => return Some((Err(e.into()), None)),
                    Ok(Some(env)) if env.is_end_stream() => return None,
                    Ok(Some(env)) => {
                        return Some((codec.decode(&env.payload), Some((body, decoder))));
                    }
                    Ok(None) => {}
                }
                match body.frame().await {
                    Some(Ok(frame)) => {
                        if let Ok(data) = frame.into_data() {
                            decoder.push(&data);
                        }
                    }
                    Some(Err(e)) => {
                        let e = ConnectError::new(
                            Code::Canceled,
                            format!("reading the request failed: {e}"),
                        );
                        return Some((Err(e), None));
                    }
                    None => {
                        return match decoder.finish() {
                            Ok(()) => None,
                            Err(e) => Some((Err(e.into()), None)),
                        };
                    }
                }
            }
        })
    }
}

/// Reads and discards an oversized body (bounded in bytes and time) so the client, which is
/// still sending, gets to read our 413 instead of a reset connection.
async fn drain(mut body: Incoming) {
    const MAX_DRAIN: usize = 256 << 20;
    let mut seen = 0usize;
    let _ = tokio::time::timeout(Duration::from_secs(30), async {
        while let Some(Ok(frame)) = body.frame().await {
            if let Ok(data) = frame.into_data() {
                seen += data.len();
                if seen > MAX_DRAIN {
                    break;
                }
            }
        }
    })
    .await;
}

fn too_large() -> Response<Body> {
    let mut r = unary_error(&ConnectError::new(
        Code::ResourceExhausted,
        format!("request body exceeds {MAX_MESSAGE_BYTES} bytes"),
    ));
    *r.status_mut() = StatusCode::PAYLOAD_TOO_LARGE;
    r
}

/// A unary error: status from the code, JSON body (Connect errors are JSON in both codecs).
pub fn unary_error(e: &ConnectError) -> Response<Body> {
    let mut r = Response::new(full(e.to_unary_json()));
    *r.status_mut() =
        StatusCode::from_u16(e.code.http_status()).unwrap_or(StatusCode::INTERNAL_SERVER_ERROR);
    r.headers_mut().insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("application/json"),
    );
    r
}

/// A unary result as a response.
pub fn unary_response<M: prost::Message + Serialize>(
    codec: Codec,
    result: Result<M, ConnectError>,
) -> Response<Body> {
    match result {
        Ok(m) => {
            let mut r = Response::new(full(codec.encode(&m)));
            r.headers_mut().insert(
                header::CONTENT_TYPE,
                HeaderValue::from_static(codec.content_type(Framing::Unary)),
            );
            r
        }
        Err(e) => unary_error(&e),
    }
}

/// A streaming response from already-framed envelopes (the stream must end with an
/// end-of-stream envelope).
pub fn stream_response<S>(codec: Codec, envelopes: S) -> Response<Body>
where
    S: Stream<Item = Bytes> + Send + 'static,
{
    let mut r = Response::new(streaming(envelopes.map(Ok)));
    r.headers_mut().insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static(codec.content_type(Framing::Streaming)),
    );
    r
}

/// A streaming call that failed before producing messages: HTTP 200, end-of-stream with error.
pub fn stream_error(codec: Codec, e: ConnectError) -> Response<Body> {
    stream_response(codec, futures::stream::iter([EndStream::envelope(Err(e))]))
}

/// Serves a unary RPC: decode, run `f` with the request headers, encode.
pub async fn handle_unary<Req, Resp, F, Fut>(req: http::Request<Incoming>, f: F) -> Response<Body>
where
    Req: prost::Message + Default + DeserializeOwned,
    Resp: prost::Message + Serialize,
    F: FnOnce(HeaderMap, Req) -> Fut,
    Fut: std::future::Future<Output = Result<Resp, ConnectError>>,
{
    let call = match Call::new(req, Kind::Unary) {
        Ok(c) => c,
        Err(r) => return *r,
    };
    match call.unary::<Req>().await {
        Ok((codec, headers, msg)) => unary_response(codec, f(headers, msg).await),
        Err(r) => r,
    }
}
