//! Running processes in a sandbox through its agent, for template builds and for start and
//! ready commands: `process.Process/Start` (Connect, JSON codec) over the agent's unix socket.
//!
//! Nothing the agent says is trusted: each stream message is bounded ([`MAX_MESSAGE`]), output
//! is only logged, and only the exit code decides anything.

use std::collections::HashMap;
use std::path::Path;

use base64::Engine;
use http::{Request, header};
use http_body_util::{BodyExt, Full};
use hyper::body::Incoming;
use hyper_util::rt::TokioIo;
use soulbox_wire::connect::{Codec, ConnectError, EndStream, EnvelopeDecoder, Framing};
use soulbox_wire::envd::process::process_event::{Event, data_event::Output};
use soulbox_wire::envd::process::{ProcessConfig, StartRequest, StartResponse};
use tokio::net::UnixStream;

use crate::AgentError;

const MAX_MESSAGE: usize = 4 << 20;

/// A process to run.
#[derive(Debug, Clone)]
pub(crate) struct Proc {
    pub cmd: String,
    pub args: Vec<String>,
    pub envs: HashMap<String, String>,
    pub cwd: Option<String>,
    pub user: String,
}

impl Proc {
    /// `/bin/sh -c <script>`.
    pub fn shell(script: &str, user: &str) -> Proc {
        Proc {
            cmd: "/bin/sh".into(),
            args: vec!["-c".into(), script.into()],
            envs: HashMap::new(),
            cwd: None,
            user: user.into(),
        }
    }
}

/// What a stream said.
pub(crate) enum ProcEvent {
    Started,
    Stdout(Vec<u8>),
    Stderr(Vec<u8>),
    /// Exit code (-1 when killed by a signal) and status text.
    Exited(i32, String),
}

/// A started process's event stream.
pub(crate) struct ProcStream {
    body: Incoming,
    decoder: EnvelopeDecoder,
    driver: tokio::task::JoinHandle<()>,
    done: bool,
}

impl Drop for ProcStream {
    fn drop(&mut self) {
        // Closing the connection detaches from the process; it keeps running.
        self.driver.abort();
    }
}

/// Starts `p` in the sandbox whose agent listens on `socket`.
pub(crate) async fn start(socket: &Path, p: &Proc) -> Result<ProcStream, AgentError> {
    let stream = UnixStream::connect(socket)
        .await
        .map_err(|source| AgentError::Connect {
            path: socket.display().to_string(),
            source,
        })?;
    let (mut sender, conn) = hyper::client::conn::http1::handshake(TokioIo::new(stream)).await?;
    let driver = tokio::spawn(async move {
        if let Err(e) = conn.await {
            tracing::debug!(error = %e, "agent process stream closed");
        }
    });
    let msg = StartRequest {
        process: Some(ProcessConfig {
            cmd: p.cmd.clone(),
            args: p.args.clone(),
            envs: p.envs.clone(),
            cwd: p.cwd.clone(),
        }),
        pty: None,
        tag: None,
        stdin: Some(false),
    };
    let basic = base64::engine::general_purpose::STANDARD.encode(format!("{}:", p.user));
    let request = Request::post("/process.Process/Start")
        .header(header::HOST, "agent")
        .header(
            header::CONTENT_TYPE,
            Codec::Json.content_type(Framing::Streaming),
        )
        .header(header::AUTHORIZATION, format!("Basic {basic}"))
        .header("connect-protocol-version", "1")
        .body(Full::new(Codec::Json.envelope(&msg)))?;
    let response = match sender.send_request(request).await {
        Ok(r) => r,
        Err(e) => {
            driver.abort();
            return Err(e.into());
        }
    };
    let status = response.status();
    if !status.is_success() {
        let body = response
            .into_body()
            .collect()
            .await
            .map(|c| c.to_bytes())
            .unwrap_or_default();
        driver.abort();
        let e = ConnectError::from_unary_response(status.as_u16(), &body[..body.len().min(4096)]);
        return Err(AgentError::Status {
            status,
            body: e.message,
        });
    }
    Ok(ProcStream {
        body: response.into_body(),
        decoder: EnvelopeDecoder::new(MAX_MESSAGE),
        driver,
        done: false,
    })
}

impl ProcStream {
    /// The next event; `None` when the stream has ended.
    pub async fn next(&mut self) -> Option<Result<ProcEvent, AgentError>> {
        while !self.done {
            match self.decoder.next_envelope() {
                Err(e) => {
                    self.done = true;
                    return Some(Err(protocol(format!("bad stream from the agent: {e:?}"))));
                }
                Ok(Some(env)) if env.is_end_stream() => {
                    self.done = true;
                    return EndStream::parse(&env.payload)
                        .err()
                        .map(|e| Err(protocol(format!("process failed: {}", e.message))));
                }
                Ok(Some(env)) => {
                    let msg: StartResponse = match Codec::Json.decode(&env.payload) {
                        Ok(m) => m,
                        Err(e) => return Some(Err(protocol(format!("bad message: {e:?}")))),
                    };
                    match msg.event.and_then(|e| e.event) {
                        Some(Event::Start(_)) => return Some(Ok(ProcEvent::Started)),
                        Some(Event::Data(d)) => match d.output {
                            Some(Output::Stdout(b) | Output::Pty(b)) => {
                                return Some(Ok(ProcEvent::Stdout(b)));
                            }
                            Some(Output::Stderr(b)) => return Some(Ok(ProcEvent::Stderr(b))),
                            None => {}
                        },
                        Some(Event::End(end)) => {
                            let code = if end.exited { end.exit_code } else { -1 };
                            let status = end.error.unwrap_or(end.status);
                            return Some(Ok(ProcEvent::Exited(code, status)));
                        }
                        Some(Event::Keepalive(_)) | None => {}
                    }
                    continue;
                }
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
                    return Some(Err(AgentError::Http(e)));
                }
                None => {
                    self.done = true;
                    return Some(Err(protocol(
                        "the agent closed the stream before the process ended".into(),
                    )));
                }
            }
        }
        None
    }
}

fn protocol(message: String) -> AgentError {
    AgentError::Status {
        status: http::StatusCode::BAD_GATEWAY,
        body: message,
    }
}

/// Runs `p` to its end, handing every output chunk to `on_output`; returns the exit code.
pub(crate) async fn run(
    socket: &Path,
    p: &Proc,
    mut on_output: impl FnMut(bool, &[u8]),
) -> Result<i32, AgentError> {
    let mut stream = start(socket, p).await?;
    while let Some(event) = stream.next().await {
        match event? {
            ProcEvent::Started => {}
            ProcEvent::Stdout(b) => on_output(false, &b),
            ProcEvent::Stderr(b) => on_output(true, &b),
            ProcEvent::Exited(code, _) => return Ok(code),
        }
    }
    Err(protocol("the process stream ended without an exit".into()))
}

/// Starts `p` and returns once it runs, leaving it running in the background.
pub(crate) async fn spawn_detached(socket: &Path, p: &Proc) -> Result<(), AgentError> {
    let mut stream = start(socket, p).await?;
    match stream.next().await {
        Some(Ok(ProcEvent::Started)) => Ok(()),
        Some(Ok(ProcEvent::Exited(code, status))) => Err(protocol(format!(
            "the start command ended at once (exit code {code}: {status})"
        ))),
        Some(Ok(_)) => Ok(()),
        Some(Err(e)) => Err(e),
        None => Err(protocol("no start event".into())),
    }
}

/// Bytes as text for logs.
pub(crate) fn text(b: &[u8]) -> String {
    String::from_utf8_lossy(b).into_owned()
}
