//! The Connect protocol's framing and errors (<https://connectrpc.com/docs/protocol>), as the
//! E2B SDKs speak it to envd: unary calls carry one bare message; streaming calls carry
//! envelopes (1 flag byte, 4-byte big-endian length, payload) ending with an end-of-stream
//! envelope whose JSON payload is `{}` or `{"error":{...},"metadata":{...}}`.

use std::collections::BTreeMap;
use std::fmt;

use bytes::{Buf, BufMut, Bytes, BytesMut};
use serde::de::DeserializeOwned;
use serde::{Deserialize, Serialize};

/// Envelope flag: the payload is compressed (never used by the SDKs; we refuse it).
pub const FLAG_COMPRESSED: u8 = 0x01;
/// Envelope flag: this is the end-of-stream envelope.
pub const FLAG_END_STREAM: u8 = 0x02;
/// Bytes before an envelope's payload.
pub const ENVELOPE_HEADER_LEN: usize = 5;

/// Request/response header: the protocol version (`1`).
pub const HEADER_PROTOCOL_VERSION: &str = "connect-protocol-version";
/// Request header: the client's deadline in milliseconds.
pub const HEADER_TIMEOUT_MS: &str = "connect-timeout-ms";
/// envd request header: seconds between keepalive events on server streams.
pub const HEADER_KEEPALIVE_PING_INTERVAL: &str = "keepalive-ping-interval";

/// Connect error codes (the `code` string of error bodies).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Code {
    Canceled,
    Unknown,
    InvalidArgument,
    DeadlineExceeded,
    NotFound,
    AlreadyExists,
    PermissionDenied,
    ResourceExhausted,
    FailedPrecondition,
    Aborted,
    OutOfRange,
    Unimplemented,
    Internal,
    Unavailable,
    DataLoss,
    Unauthenticated,
}

impl Code {
    /// Every code, for exhaustive tests and lookups.
    pub const ALL: [Code; 16] = [
        Code::Canceled,
        Code::Unknown,
        Code::InvalidArgument,
        Code::DeadlineExceeded,
        Code::NotFound,
        Code::AlreadyExists,
        Code::PermissionDenied,
        Code::ResourceExhausted,
        Code::FailedPrecondition,
        Code::Aborted,
        Code::OutOfRange,
        Code::Unimplemented,
        Code::Internal,
        Code::Unavailable,
        Code::DataLoss,
        Code::Unauthenticated,
    ];

    /// The wire name, e.g. `not_found`.
    pub fn as_str(self) -> &'static str {
        match self {
            Code::Canceled => "canceled",
            Code::Unknown => "unknown",
            Code::InvalidArgument => "invalid_argument",
            Code::DeadlineExceeded => "deadline_exceeded",
            Code::NotFound => "not_found",
            Code::AlreadyExists => "already_exists",
            Code::PermissionDenied => "permission_denied",
            Code::ResourceExhausted => "resource_exhausted",
            Code::FailedPrecondition => "failed_precondition",
            Code::Aborted => "aborted",
            Code::OutOfRange => "out_of_range",
            Code::Unimplemented => "unimplemented",
            Code::Internal => "internal",
            Code::Unavailable => "unavailable",
            Code::DataLoss => "data_loss",
            Code::Unauthenticated => "unauthenticated",
        }
    }

    /// Parses a wire name; `None` for anything that is not a Connect code.
    pub fn parse(s: &str) -> Option<Code> {
        Code::ALL.into_iter().find(|c| c.as_str() == s)
    }

    /// The HTTP status of a unary error response with this code.
    pub fn http_status(self) -> u16 {
        match self {
            Code::Canceled => 499,
            Code::Unknown | Code::Internal | Code::DataLoss => 500,
            Code::InvalidArgument | Code::FailedPrecondition | Code::OutOfRange => 400,
            Code::DeadlineExceeded => 504,
            Code::NotFound => 404,
            Code::AlreadyExists | Code::Aborted => 409,
            Code::PermissionDenied => 403,
            Code::ResourceExhausted => 429,
            Code::Unimplemented => 501,
            Code::Unavailable => 503,
            Code::Unauthenticated => 401,
        }
    }

    /// The code a client derives from the HTTP status of a response that is not a Connect error.
    pub fn from_http_status(status: u16) -> Code {
        match status {
            400 => Code::InvalidArgument,
            401 => Code::Unauthenticated,
            403 => Code::PermissionDenied,
            404 => Code::NotFound,
            409 => Code::AlreadyExists,
            413 | 429 => Code::ResourceExhausted,
            499 => Code::Canceled,
            500 => Code::Internal,
            501 | 505 => Code::Unimplemented,
            502 | 503 => Code::Unavailable,
            504 => Code::DeadlineExceeded,
            _ => Code::Unknown,
        }
    }
}

impl fmt::Display for Code {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// A Connect error: the body of a failed unary call and the `error` of an end-of-stream envelope.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, thiserror::Error)]
#[error("{code}: {message}")]
pub struct ConnectError {
    pub code: Code,
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub message: String,
}

impl ConnectError {
    pub fn new(code: Code, message: impl Into<String>) -> Self {
        ConnectError {
            code,
            message: message.into(),
        }
    }

    /// Body of a unary error response (served with [`Code::http_status`], `application/json`).
    pub fn to_unary_json(&self) -> Vec<u8> {
        serde_json::to_vec(self).unwrap_or_default()
    }

    /// Reads a unary error response. A body that is not a Connect error (a proxy's page, say)
    /// maps by HTTP status, using its JSON `message` when there is one, like the SDKs do.
    pub fn from_unary_response(status: u16, body: &[u8]) -> ConnectError {
        #[derive(Deserialize)]
        struct Loose {
            code: Option<serde_json::Value>,
            message: Option<String>,
        }
        let loose: Option<Loose> = serde_json::from_slice(body).ok();
        let message = loose
            .as_ref()
            .and_then(|l| l.message.clone())
            .unwrap_or_else(|| String::from_utf8_lossy(body).into_owned());
        let code = match loose.as_ref().and_then(|l| l.code.as_ref()) {
            Some(serde_json::Value::String(s)) => Code::parse(s),
            Some(serde_json::Value::Number(n)) => n
                .as_u64()
                .and_then(|n| u16::try_from(n).ok())
                .map(Code::from_http_status),
            _ => None,
        }
        .unwrap_or_else(|| Code::from_http_status(status));
        ConnectError { code, message }
    }
}

/// The JSON payload of an end-of-stream envelope.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct EndStream {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub error: Option<ConnectError>,
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub metadata: BTreeMap<String, Vec<String>>,
}

impl EndStream {
    /// The end-of-stream envelope (flags + length + JSON) for a stream that ended with `result`.
    pub fn envelope(result: Result<(), ConnectError>) -> Bytes {
        let end = EndStream {
            error: result.err(),
            metadata: BTreeMap::new(),
        };
        let payload = serde_json::to_vec(&end).unwrap_or_else(|_| b"{}".to_vec());
        encode_envelope(FLAG_END_STREAM, &payload)
    }

    /// Parses an end-of-stream payload into the stream's outcome.
    pub fn parse(payload: &[u8]) -> Result<(), ConnectError> {
        match serde_json::from_slice::<EndStream>(payload) {
            Ok(EndStream { error: None, .. }) => Ok(()),
            Ok(EndStream { error: Some(e), .. }) => Err(e),
            Err(e) => Err(ConnectError::new(
                Code::Internal,
                format!("malformed end-of-stream message: {e}"),
            )),
        }
    }
}

/// Frames one envelope.
pub fn encode_envelope(flags: u8, payload: &[u8]) -> Bytes {
    let mut out = BytesMut::with_capacity(ENVELOPE_HEADER_LEN + payload.len());
    out.put_u8(flags);
    // Payloads over 4 GiB cannot be framed; callers bound messages far below that.
    out.put_u32(u32::try_from(payload.len()).unwrap_or(u32::MAX));
    out.put_slice(payload);
    out.freeze()
}

/// One decoded envelope.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Envelope {
    pub flags: u8,
    pub payload: Bytes,
}

impl Envelope {
    pub fn is_end_stream(&self) -> bool {
        self.flags & FLAG_END_STREAM != 0
    }
}

/// Why a byte stream is not a valid envelope sequence.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum EnvelopeError {
    #[error("envelope of {len} bytes exceeds the limit of {limit} bytes")]
    TooLarge { len: usize, limit: usize },
    #[error("compressed envelopes are not supported")]
    Compressed,
    #[error("stream ended inside an envelope")]
    Truncated,
}

impl From<EnvelopeError> for ConnectError {
    fn from(e: EnvelopeError) -> Self {
        let code = match e {
            EnvelopeError::TooLarge { .. } => Code::ResourceExhausted,
            EnvelopeError::Compressed => Code::Unimplemented,
            EnvelopeError::Truncated => Code::InvalidArgument,
        };
        ConnectError::new(code, e.to_string())
    }
}

/// Incremental envelope parser: feed it bytes as they arrive, take envelopes out. It never
/// buffers more than one envelope of at most `max_len` payload bytes.
#[derive(Debug)]
pub struct EnvelopeDecoder {
    buf: BytesMut,
    max_len: usize,
}

impl EnvelopeDecoder {
    pub fn new(max_len: usize) -> Self {
        EnvelopeDecoder {
            buf: BytesMut::new(),
            max_len,
        }
    }

    pub fn push(&mut self, data: &[u8]) {
        self.buf.extend_from_slice(data);
    }

    /// The next complete envelope, `None` when more bytes are needed.
    pub fn next_envelope(&mut self) -> Result<Option<Envelope>, EnvelopeError> {
        if self.buf.len() < ENVELOPE_HEADER_LEN {
            return Ok(None);
        }
        let flags = self.buf[0];
        let len = u32::from_be_bytes([self.buf[1], self.buf[2], self.buf[3], self.buf[4]]) as usize;
        if len > self.max_len {
            return Err(EnvelopeError::TooLarge {
                len,
                limit: self.max_len,
            });
        }
        if flags & FLAG_COMPRESSED != 0 {
            return Err(EnvelopeError::Compressed);
        }
        if self.buf.len() < ENVELOPE_HEADER_LEN + len {
            self.buf.reserve(ENVELOPE_HEADER_LEN + len - self.buf.len());
            return Ok(None);
        }
        self.buf.advance(ENVELOPE_HEADER_LEN);
        let payload = self.buf.split_to(len).freeze();
        Ok(Some(Envelope { flags, payload }))
    }

    /// Call at end of input: an error if a partial envelope is left.
    pub fn finish(&self) -> Result<(), EnvelopeError> {
        if self.buf.is_empty() {
            Ok(())
        } else {
            Err(EnvelopeError::Truncated)
        }
    }
}

/// Message codec, chosen by the request's content type.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Codec {
    /// proto3 canonical JSON (what every E2B SDK sends).
    Json,
    /// protobuf binary.
    Proto,
}

/// Whether a call is unary or streaming, which decides the content type family.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Framing {
    /// `application/json` / `application/proto`: one bare message.
    Unary,
    /// `application/connect+json` / `application/connect+proto`: envelopes.
    Streaming,
}

impl Codec {
    /// Parses a request `Content-Type` (parameters such as `charset` are ignored).
    pub fn from_content_type(content_type: &str) -> Option<(Codec, Framing)> {
        let essence = content_type
            .split(';')
            .next()
            .unwrap_or_default()
            .trim()
            .to_ascii_lowercase();
        match essence.as_str() {
            "application/json" => Some((Codec::Json, Framing::Unary)),
            "application/proto" => Some((Codec::Proto, Framing::Unary)),
            "application/connect+json" => Some((Codec::Json, Framing::Streaming)),
            "application/connect+proto" => Some((Codec::Proto, Framing::Streaming)),
            _ => None,
        }
    }

    /// The response `Content-Type` for this codec and framing.
    pub fn content_type(self, framing: Framing) -> &'static str {
        match (self, framing) {
            (Codec::Json, Framing::Unary) => "application/json",
            (Codec::Proto, Framing::Unary) => "application/proto",
            (Codec::Json, Framing::Streaming) => "application/connect+json",
            (Codec::Proto, Framing::Streaming) => "application/connect+proto",
        }
    }

    pub fn encode<M: prost::Message + Serialize>(self, msg: &M) -> Vec<u8> {
        match self {
            // Serialising generated messages to a Vec cannot fail: no maps with non-string
            // keys, no I/O. An empty object is still a valid message if it ever did.
            Codec::Json => serde_json::to_vec(msg).unwrap_or_else(|_| b"{}".to_vec()),
            Codec::Proto => msg.encode_to_vec(),
        }
    }

    pub fn decode<M: prost::Message + Default + DeserializeOwned>(
        self,
        data: &[u8],
    ) -> Result<M, ConnectError> {
        match self {
            // An empty unary body is the empty message in both codecs.
            Codec::Json if data.iter().all(u8::is_ascii_whitespace) => Ok(M::default()),
            Codec::Json => serde_json::from_slice(data).map_err(|e| {
                ConnectError::new(Code::InvalidArgument, format!("invalid JSON message: {e}"))
            }),
            Codec::Proto => M::decode(data).map_err(|e| {
                ConnectError::new(
                    Code::InvalidArgument,
                    format!("invalid protobuf message: {e}"),
                )
            }),
        }
    }

    /// Frames `msg` as a data envelope.
    pub fn envelope<M: prost::Message + Serialize>(self, msg: &M) -> Bytes {
        encode_envelope(0, &self.encode(msg))
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    #[test]
    fn codes_round_trip_and_map_to_statuses() {
        for c in Code::ALL {
            assert_eq!(Code::parse(c.as_str()), Some(c));
            let json = serde_json::to_string(&c).unwrap_or_default();
            assert_eq!(json, format!("\"{}\"", c.as_str()));
        }
        assert_eq!(Code::NotFound.http_status(), 404);
        assert_eq!(Code::ResourceExhausted.http_status(), 429);
        assert_eq!(Code::Canceled.http_status(), 499);
        assert_eq!(Code::from_http_status(413), Code::ResourceExhausted);
        assert_eq!(Code::from_http_status(502), Code::Unavailable);
        assert_eq!(Code::from_http_status(418), Code::Unknown);
        assert_eq!(Code::parse("NOT_FOUND"), None);
    }

    #[test]
    fn unary_error_json() {
        let e = ConnectError::new(Code::NotFound, "process with pid 7 not found");
        let v: serde_json::Value = serde_json::from_slice(&e.to_unary_json()).unwrap_or_default();
        assert_eq!(
            v,
            serde_json::json!({"code": "not_found", "message": "process with pid 7 not found"})
        );
        assert_eq!(
            ConnectError::from_unary_response(404, &e.to_unary_json()),
            e
        );
    }

    #[test]
    fn non_connect_error_bodies_map_by_status() {
        let gw = br#"{"sandboxId":"x","message":"The sandbox was not found","code":502}"#;
        let e = ConnectError::from_unary_response(502, gw);
        assert_eq!(e.code, Code::Unavailable);
        assert_eq!(e.message, "The sandbox was not found");
        let e = ConnectError::from_unary_response(413, b"too big");
        assert_eq!(e.code, Code::ResourceExhausted);
        assert_eq!(e.message, "too big");
    }

    #[test]
    fn end_stream_payloads() {
        let ok = EndStream::envelope(Ok(()));
        assert_eq!(&ok[..], b"\x02\x00\x00\x00\x02{}");
        let err = EndStream::envelope(Err(ConnectError::new(Code::InvalidArgument, "bad cwd")));
        assert_eq!(err[0], FLAG_END_STREAM);
        let v: serde_json::Value = serde_json::from_slice(&err[5..]).unwrap_or_default();
        assert_eq!(
            v,
            serde_json::json!({"error": {"code": "invalid_argument", "message": "bad cwd"}})
        );
        assert_eq!(
            EndStream::parse(&err[5..]),
            Err(ConnectError::new(Code::InvalidArgument, "bad cwd"))
        );
        assert_eq!(EndStream::parse(b"{}"), Ok(()));
        let with_meta = br#"{"error":{"code":"not_found"},"metadata":{"x":["1"]}}"#;
        assert_eq!(
            EndStream::parse(with_meta),
            Err(ConnectError::new(Code::NotFound, ""))
        );
        assert_eq!(
            EndStream::parse(b"nope").map_err(|e| e.code),
            Err(Code::Internal)
        );
    }

    #[test]
    fn decoder_handles_split_and_joined_envelopes() {
        let mut wire = Vec::new();
        wire.extend_from_slice(&encode_envelope(0, b"{\"a\":1}"));
        wire.extend_from_slice(&encode_envelope(0, b""));
        wire.extend_from_slice(&encode_envelope(FLAG_END_STREAM, b"{}"));
        let mut got = Vec::new();
        let mut d = EnvelopeDecoder::new(1024);
        // Feed one byte at a time: every split point must work.
        for b in &wire {
            d.push(std::slice::from_ref(b));
            while let Ok(Some(env)) = d.next_envelope() {
                got.push(env);
            }
        }
        assert_eq!(d.finish(), Ok(()));
        assert_eq!(got.len(), 3);
        assert_eq!(&got[0].payload[..], b"{\"a\":1}");
        assert!(got[1].payload.is_empty());
        assert!(got[2].is_end_stream());
    }

    #[test]
    fn decoder_refuses_oversized_compressed_and_truncated() {
        let mut d = EnvelopeDecoder::new(4);
        d.push(&[0, 0, 0, 0, 5]);
        assert_eq!(
            d.next_envelope(),
            Err(EnvelopeError::TooLarge { len: 5, limit: 4 })
        );
        let mut d = EnvelopeDecoder::new(4);
        d.push(&[FLAG_COMPRESSED, 0, 0, 0, 1, 0]);
        assert_eq!(d.next_envelope(), Err(EnvelopeError::Compressed));
        let mut d = EnvelopeDecoder::new(4);
        d.push(&[0, 0, 0, 0, 3, b'a']);
        assert_eq!(d.next_envelope(), Ok(None));
        assert_eq!(d.finish(), Err(EnvelopeError::Truncated));
        let huge = [0u8, 0xff, 0xff, 0xff, 0xff];
        let mut d = EnvelopeDecoder::new(1 << 20);
        d.push(&huge);
        assert!(matches!(
            d.next_envelope(),
            Err(EnvelopeError::TooLarge { .. })
        ));
    }

    #[test]
    fn content_types() {
        assert_eq!(
            Codec::from_content_type("application/json; charset=utf-8"),
            Some((Codec::Json, Framing::Unary))
        );
        assert_eq!(
            Codec::from_content_type("Application/Connect+Proto"),
            Some((Codec::Proto, Framing::Streaming))
        );
        assert_eq!(Codec::from_content_type("text/plain"), None);
        assert_eq!(
            Codec::Json.content_type(Framing::Streaming),
            "application/connect+json"
        );
    }
}
