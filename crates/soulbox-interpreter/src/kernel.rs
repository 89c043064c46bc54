//! One running Jupyter kernel: the process, its ZeroMQ channels and the message router.
//!
//! The kernel runs as a child of this service in its own process group (so an interrupt or a
//! kill reaches the subprocesses it started, as with `jupyter_client`) with `PR_SET_PDEATHSIG`
//! so it cannot outlive the service. It listens on 127.0.0.1 TCP ports named in a connection
//! file written 0600 in a private 0700 directory; messages are HMAC-SHA256 signed with a
//! per-kernel random key (connections, signing and message types come from the
//! `jupyter-zmq-client` / `jupyter-protocol` crates).
//!
//! Replies are read raw (`serde_json::Value`) rather than through the crate's typed message
//! enum, so MIME bundles reach the client exactly as the kernel produced them and one odd
//! message cannot fail a whole execution.
//!
//! Sandbox note: code in the sandbox runs as the same user as the kernels and can do anything a
//! kernel can, so reaching the kernel ports gains it nothing; the HMAC key keeps other local
//! users (on a shared development host) from driving a kernel.

use std::io::Write as _;
use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::os::unix::fs::OpenOptionsExt as _;
use std::os::unix::process::ExitStatusExt as _;
use std::path::Path;
use std::process::Stdio;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex as StdMutex};
use std::time::Duration;

use jupyter_protocol::{
    ConnectionInfo, ExecuteRequest, InterruptRequest, JupyterMessage, KernelInfoRequest, Transport,
};
use jupyter_zmq_client::{
    ClientIoPubConnection, Connection, DealerRecvConnection, DealerSendConnection, RawMessage,
    create_client_control_connection, create_client_iopub_connection,
    create_client_shell_connection_with_identity, peek_ports_with_listeners,
    peer_identity_for_session,
};
use rand::RngCore as _;
use rustix::process::{Pid, Signal};
use serde_json::Value;
use tokio::io::AsyncReadExt as _;
use tokio::sync::{mpsc, watch};
use tokio::task::JoinHandle;
use tokio::time::{Instant, sleep, timeout};
use zeromq::SocketRecv as _;

use crate::kernelspec::{InterruptMode, KernelSpec};
use crate::lock;

/// How long a kernel may take from spawn to answering `kernel_info_request`.
const START_TIMEOUT: Duration = Duration::from_secs(60);
/// How often `kernel_info_request` is repeated until IOPub delivers (ZeroMQ's slow joiner).
const HANDSHAKE_RETRY: Duration = Duration::from_millis(500);
/// Bytes of kernel stderr kept for error messages.
const STDERR_TAIL: usize = 4096;
/// Messages buffered between the router and a slow HTTP client before IOPub is back-pressured.
const ROUTE_BUFFER: usize = 16;

#[derive(Debug, thiserror::Error)]
pub enum KernelError {
    #[error("cannot start kernel `{kernel}`: {source}")]
    Spawn {
        kernel: String,
        source: std::io::Error,
    },
    #[error("kernel `{kernel}` exited while starting ({status}){stderr}")]
    ExitedDuringStart {
        kernel: String,
        status: String,
        stderr: String,
    },
    #[error("kernel `{kernel}` did not become ready within {}s{stderr}", START_TIMEOUT.as_secs())]
    StartTimeout { kernel: String, stderr: String },
    #[error("kernel channel error: {0}")]
    Channel(#[from] jupyter_zmq_client::RuntimeError),
    #[error("kernel exited ({0})")]
    Exited(String),
}

/// Which socket a message arrived on.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Channel {
    IoPub,
    Shell,
}

/// A kernel message reduced to what the service reads.
#[derive(Debug, Clone)]
pub struct KernelMessage {
    pub channel: Channel,
    pub msg_type: String,
    /// `header.date` verbatim: the timestamp the SDKs receive with stream output.
    pub date: Option<String>,
    pub content: Value,
}

/// What a running request yields next.
pub enum Next {
    Message(KernelMessage),
    Exited(String),
}

/// The request whose replies are currently wanted; everything else is dropped.
struct Route {
    msg_id: String,
    tx: mpsc::Sender<KernelMessage>,
}

type RouteSlot = Arc<StdMutex<Option<Route>>>;

/// A started kernel. Dropping it kills the kernel's process group.
pub struct Kernel {
    spec: KernelSpec,
    pgid: Option<Pid>,
    shell: tokio::sync::Mutex<DealerSendConnection>,
    control: tokio::sync::Mutex<DealerSendConnection>,
    route: RouteSlot,
    exit: watch::Receiver<Option<String>>,
    reader: JoinHandle<()>,
    stderr_tail: Arc<StdMutex<Vec<u8>>>,
    /// Set once someone has told a client that this kernel exited.
    exit_reported: Arc<AtomicBool>,
    /// `implementation` from `kernel_info_reply`, e.g. `ipython`.
    implementation: String,
    _connection_file: tempfile::TempPath,
}

impl Kernel {
    /// Spawns the kernel in `cwd` and waits until it answers on shell and IOPub.
    pub async fn start(
        spec: &KernelSpec,
        cwd: &Path,
        runtime_dir: &Path,
    ) -> Result<Kernel, KernelError> {
        let kernel = spec.name.clone();
        let spawn_err = |source| KernelError::Spawn {
            kernel: kernel.clone(),
            source,
        };
        let localhost = IpAddr::V4(Ipv4Addr::LOCALHOST);
        let (ports, listeners) = peek_ports_with_listeners(localhost, 5)
            .await
            .map_err(|e| spawn_err(std::io::Error::other(e)))?;
        let [shell_port, iopub_port, stdin_port, control_port, hb_port] = ports[..] else {
            return Err(spawn_err(std::io::Error::other("could not reserve ports")));
        };
        let mut key = [0u8; 32];
        rand::rng().fill_bytes(&mut key);
        let info = ConnectionInfo {
            ip: "127.0.0.1".to_owned(),
            transport: Transport::TCP,
            shell_port,
            iopub_port,
            stdin_port,
            control_port,
            hb_port,
            key: hex::encode(key),
            signature_scheme: "hmac-sha256".to_owned(),
            kernel_name: Some(spec.name.clone()),
        };
        let connection_file = write_connection_file(runtime_dir, &info).map_err(spawn_err)?;

        let mut child = command(spec, &connection_file, cwd)
            .spawn()
            .map_err(spawn_err)?;
        // The kernel binds the reserved ports as it starts; holding them until the spawn
        // closes the window in which another process could take them.
        drop(listeners);
        let pgid = child
            .id()
            .and_then(|id| i32::try_from(id).ok())
            .and_then(Pid::from_raw);

        let stderr_tail = Arc::new(StdMutex::new(Vec::new()));
        if let Some(stderr) = child.stderr.take() {
            tokio::spawn(collect_stderr(
                stderr,
                stderr_tail.clone(),
                spec.name.clone(),
            ));
        }
        let (exit_tx, mut exit) = watch::channel(None);
        tokio::spawn(async move {
            let status = match child.wait().await {
                Ok(status) => describe_exit(status),
                Err(err) => format!("wait failed: {err}"),
            };
            // Nobody listening just means the kernel was already dropped.
            let _ = exit_tx.send(Some(status));
        });

        let guard = KillOnDrop(pgid);
        let connected = timeout(
            START_TIMEOUT,
            connect_and_handshake(&info, &mut exit, &stderr_tail, &spec.name),
        )
        .await;
        let (channels, implementation) = match connected {
            Ok(Ok(ok)) => ok,
            Ok(Err(err)) => return Err(err),
            Err(_) => {
                return Err(KernelError::StartTimeout {
                    kernel: spec.name.clone(),
                    stderr: tail_suffix(&stderr_tail),
                });
            }
        };
        std::mem::forget(guard);
        // From now on the tail holds only what the kernel wrote after start-up (a crash).
        lock(&stderr_tail).clear();

        let route: RouteSlot = Arc::new(StdMutex::new(None));
        let reader = tokio::spawn(read_loop(
            channels.iopub,
            channels.shell_rx,
            channels.control_rx,
            route.clone(),
            exit.clone(),
        ));
        Ok(Kernel {
            spec: spec.clone(),
            pgid,
            shell: tokio::sync::Mutex::new(channels.shell_tx),
            control: tokio::sync::Mutex::new(channels.control_tx),
            route,
            exit,
            reader,
            stderr_tail,
            exit_reported: Arc::new(AtomicBool::new(false)),
            implementation,
            _connection_file: connection_file,
        })
    }

    /// `implementation` from the kernel's `kernel_info_reply`.
    pub fn implementation(&self) -> &str {
        &self.implementation
    }

    /// Why the kernel process ended, once it has.
    pub fn exit_status(&self) -> Option<String> {
        self.exit.borrow().clone()
    }

    /// Resolves when the kernel process has ended, with a description of how. Does not
    /// borrow the kernel, so a supervisor can wait without keeping it alive.
    pub fn exit_signal(&self) -> impl std::future::Future<Output = String> + Send + 'static {
        let mut exit = self.exit.clone();
        async move {
            match exit.wait_for(Option::is_some).await {
                Ok(status) => status.clone().unwrap_or_default(),
                Err(_) => "exit status unknown".to_owned(),
            }
        }
    }

    /// Marks this kernel's exit as reported; true for the first caller only.
    pub fn claim_exit_report(&self) -> bool {
        !self.exit_reported.swap(true, Ordering::SeqCst)
    }

    /// The flag behind [`Kernel::claim_exit_report`], for whoever reports the exit later.
    pub fn exit_report_flag(&self) -> Arc<AtomicBool> {
        self.exit_reported.clone()
    }

    /// What the kernel wrote to stderr since it started (its own logs, not user output).
    pub fn stderr_tail(&self) -> String {
        tail_suffix(&self.stderr_tail)
    }

    /// Sends an `execute_request`; replies to it are read from the returned handle.
    pub async fn execute(&self, code: &str, silent: bool) -> Result<Request<'_>, KernelError> {
        if let Some(status) = self.exit_status() {
            return Err(KernelError::Exited(status));
        }
        let request = ExecuteRequest {
            code: code.to_owned(),
            silent,
            store_history: !silent,
            user_expressions: None,
            allow_stdin: false,
            // Requests are serialised per context, so there is never a queue to abort; turning
            // it off avoids spurious "aborted" replies to the env-var clean-up after an error.
            stop_on_error: false,
        };
        let message = JupyterMessage::new(request, None);
        let msg_id = message.header.msg_id.clone();
        let (tx, rx) = mpsc::channel(ROUTE_BUFFER);
        set_route(
            &self.route,
            Some(Route {
                msg_id: msg_id.clone(),
                tx,
            }),
        );
        let pending = Request {
            kernel: self,
            msg_id,
            rx,
        };
        self.shell.lock().await.send(message).await?;
        Ok(pending)
    }

    /// Interrupts the running execution the way the kernelspec asks for.
    pub async fn interrupt(&self) {
        match self.spec.interrupt_mode {
            InterruptMode::Signal => self.signal(Signal::INT),
            InterruptMode::Message => {
                let message = JupyterMessage::new(InterruptRequest {}, None);
                if let Err(err) = self.control.lock().await.send(message).await {
                    tracing::warn!(%err, "interrupt_request failed");
                }
            }
        }
    }

    /// Kills the kernel and everything in its process group.
    pub fn kill(&self) {
        self.signal(Signal::KILL);
    }

    fn signal(&self, signal: Signal) {
        if let Some(pgid) = self.pgid {
            if self.exit_status().is_some() && signal != Signal::KILL {
                return;
            }
            // ESRCH (already gone) is the only expected failure.
            let _ = rustix::process::kill_process_group(pgid, signal);
        }
    }
}

impl Drop for Kernel {
    fn drop(&mut self) {
        self.reader.abort();
        self.kill();
    }
}

/// Replies to one `execute_request`.
pub struct Request<'k> {
    kernel: &'k Kernel,
    msg_id: String,
    rx: mpsc::Receiver<KernelMessage>,
}

impl Request<'_> {
    /// The next reply, or the kernel's exit. Replies already received are delivered first.
    pub async fn next(&mut self) -> Next {
        let mut exit = self.kernel.exit.clone();
        tokio::select! {
            biased;
            message = self.rx.recv() => match message {
                Some(message) => Next::Message(message),
                None => Next::Exited("kernel channels closed".to_owned()),
            },
            status = exit.wait_for(Option::is_some) => Next::Exited(match status {
                Ok(status) => status.clone().unwrap_or_default(),
                Err(_) => "exit status unknown".to_owned(),
            }),
        }
    }
}

impl Drop for Request<'_> {
    fn drop(&mut self) {
        let mut slot = lock(&self.kernel.route);
        if slot.as_ref().is_some_and(|r| r.msg_id == self.msg_id) {
            *slot = None;
        }
    }
}

/// Kills a process group on drop unless forgotten: cleans up a kernel that failed to start.
struct KillOnDrop(Option<Pid>);

impl Drop for KillOnDrop {
    fn drop(&mut self) {
        if let Some(pgid) = self.0 {
            let _ = rustix::process::kill_process_group(pgid, Signal::KILL);
        }
    }
}

struct Channels {
    iopub: ClientIoPubConnection,
    shell_tx: DealerSendConnection,
    shell_rx: DealerRecvConnection,
    control_tx: DealerSendConnection,
    control_rx: DealerRecvConnection,
}

fn command(spec: &KernelSpec, connection_file: &Path, cwd: &Path) -> tokio::process::Command {
    let connection_file = connection_file.to_string_lossy();
    let resource_dir = spec.resource_dir.to_string_lossy();
    let argv: Vec<String> = spec
        .argv
        .iter()
        .map(|arg| {
            arg.replace("{connection_file}", &connection_file)
                .replace("{resource_dir}", &resource_dir)
        })
        .collect();
    let mut cmd = tokio::process::Command::new(&argv[0]);
    cmd.args(&argv[1..])
        .envs(&spec.env)
        .current_dir(cwd)
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .process_group(0);
    // SAFETY: the closure runs in the forked child before exec and only makes the
    // async-signal-safe prctl(PR_SET_PDEATHSIG) syscall. The parent-death signal fires when
    // the forking *thread* exits; the service runs on a current-thread runtime, so that thread
    // is the main thread and lives as long as the service.
    unsafe {
        cmd.pre_exec(|| {
            rustix::process::set_parent_process_death_signal(Some(Signal::KILL))
                .map_err(std::io::Error::from)
        });
    }
    cmd
}

fn write_connection_file(
    runtime_dir: &Path,
    info: &ConnectionInfo,
) -> std::io::Result<tempfile::TempPath> {
    let path = runtime_dir.join(format!("kernel-{}.json", uuid::Uuid::new_v4()));
    let mut file = std::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(0o600)
        .open(&path)?;
    let temp_path = tempfile::TempPath::try_from_path(&path)?;
    file.write_all(&serde_json::to_vec(info).map_err(std::io::Error::other)?)?;
    Ok(temp_path)
}

/// Waits for the kernel's sockets, connects, and repeats `kernel_info_request` until both the
/// reply (shell) and some IOPub message have arrived, so no output of the first execution is
/// lost to a not-yet-subscribed IOPub socket.
async fn connect_and_handshake(
    info: &ConnectionInfo,
    exit: &mut watch::Receiver<Option<String>>,
    stderr_tail: &Arc<StdMutex<Vec<u8>>>,
    kernel: &str,
) -> Result<(Channels, String), KernelError> {
    let exited = |status: String| KernelError::ExitedDuringStart {
        kernel: kernel.to_owned(),
        status,
        stderr: tail_suffix(stderr_tail),
    };
    for port in [info.shell_port, info.iopub_port, info.control_port] {
        tokio::select! {
            () = wait_listening(port) => {}
            status = exit.wait_for(Option::is_some) => {
                return Err(exited(status.map(|s| s.clone().unwrap_or_default()).unwrap_or_default()));
            }
        }
    }
    let session = uuid::Uuid::new_v4().to_string();
    let iopub = create_client_iopub_connection(info, "", &session).await?;
    let shell = create_client_shell_connection_with_identity(
        info,
        &session,
        peer_identity_for_session(&session)?,
    )
    .await?;
    let control = create_client_control_connection(info, &session).await?;
    let (mut shell_tx, mut shell_rx) = shell.split();
    let (control_tx, control_rx) = control.split();
    let mut iopub = iopub;

    let mut sent: Vec<String> = Vec::new();
    let mut implementation: Option<String> = None;
    let mut iopub_seen = false;
    loop {
        let request = JupyterMessage::new(KernelInfoRequest {}, None);
        sent.push(request.header.msg_id.clone());
        shell_tx.send(request).await?;
        let round = Instant::now() + HANDSHAKE_RETRY;
        loop {
            tokio::select! {
                message = iopub.socket.recv() => {
                    if message.is_ok() {
                        iopub_seen = true;
                    }
                }
                message = shell_rx.socket.recv() => {
                    if let Ok(message) = message
                        && let Some(reply) = parse(message, &shell_rx, Channel::Shell)
                        && reply.0.msg_type == "kernel_info_reply"
                        && sent.iter().any(|id| Some(id.as_str()) == reply.1.as_deref())
                    {
                        implementation = Some(
                            reply.0.content["implementation"].as_str().unwrap_or_default().to_owned(),
                        );
                    }
                }
                status = exit.wait_for(Option::is_some) => {
                    return Err(exited(status.map(|s| s.clone().unwrap_or_default()).unwrap_or_default()));
                }
                () = tokio::time::sleep_until(round) => break,
            }
            if let (Some(implementation), true) = (&implementation, iopub_seen) {
                let channels = Channels {
                    iopub,
                    shell_tx,
                    shell_rx,
                    control_tx,
                    control_rx,
                };
                return Ok((channels, implementation.clone()));
            }
        }
    }
}

async fn wait_listening(port: u16) {
    let addr = SocketAddr::from((Ipv4Addr::LOCALHOST, port));
    while tokio::net::TcpStream::connect(addr).await.is_err() {
        sleep(Duration::from_millis(10)).await;
    }
}

/// Routes shell and IOPub messages to the request they answer until the kernel exits.
async fn read_loop(
    mut iopub: ClientIoPubConnection,
    mut shell: DealerRecvConnection,
    mut control: DealerRecvConnection,
    route: RouteSlot,
    mut exit: watch::Receiver<Option<String>>,
) {
    loop {
        let (received, channel) = tokio::select! {
            m = iopub.socket.recv() => (m, Some(Channel::IoPub)),
            m = shell.socket.recv() => (m, Some(Channel::Shell)),
            // Control replies (interrupt_reply) are read only so they do not pile up.
            m = control.socket.recv() => (m, None),
            _ = exit.wait_for(Option::is_some) => return,
        };
        let message = match received {
            Ok(message) => message,
            Err(err) => {
                // A peer that went away reports errors until the exit is noticed; don't spin.
                tracing::debug!(%err, "kernel socket error");
                sleep(Duration::from_millis(50)).await;
                continue;
            }
        };
        let parsed = match channel {
            Some(Channel::IoPub) => parse(message, &iopub, Channel::IoPub),
            Some(Channel::Shell) => parse(message, &shell, Channel::Shell),
            None => None,
        };
        let Some((message, parent)) = parsed else {
            continue;
        };
        let tx = {
            let slot = lock(&route);
            match slot.as_ref() {
                Some(r) if Some(r.msg_id.as_str()) == parent.as_deref() => Some(r.tx.clone()),
                _ => None,
            }
        };
        if let Some(tx) = tx {
            // Waits while the HTTP client is slow: output is back-pressured, not buffered whole.
            let _ = tx.send(message).await;
        }
    }
}

/// Verifies and decodes a multipart message; returns it with its parent `msg_id`.
fn parse<S>(
    message: zeromq::ZmqMessage,
    connection: &Connection<S>,
    channel: Channel,
) -> Option<(KernelMessage, Option<String>)> {
    let raw = match RawMessage::from_multipart(message, &connection.mac) {
        Ok(raw) => raw,
        Err(err) => {
            tracing::warn!(%err, "dropping malformed kernel message");
            return None;
        }
    };
    let header: Value = serde_json::from_slice(raw.jparts.first()?).ok()?;
    let parent: Value = serde_json::from_slice(raw.jparts.get(1)?).unwrap_or(Value::Null);
    let content: Value = serde_json::from_slice(raw.jparts.get(3)?).ok()?;
    let message = KernelMessage {
        channel,
        msg_type: header["msg_type"].as_str()?.to_owned(),
        date: header["date"].as_str().map(str::to_owned),
        content,
    };
    Some((message, parent["msg_id"].as_str().map(str::to_owned)))
}

async fn collect_stderr(
    mut stderr: tokio::process::ChildStderr,
    tail: Arc<StdMutex<Vec<u8>>>,
    kernel: String,
) {
    let mut buf = [0u8; 4096];
    while let Ok(n) = stderr.read(&mut buf).await {
        if n == 0 {
            break;
        }
        tracing::debug!(%kernel, stderr = %String::from_utf8_lossy(&buf[..n]).trim_end());
        let mut tail = lock(&tail);
        tail.extend_from_slice(&buf[..n]);
        if tail.len() > STDERR_TAIL {
            let excess = tail.len() - STDERR_TAIL;
            tail.drain(..excess);
        }
    }
}

/// `": <stderr>"` for error messages, or nothing when the kernel wrote nothing.
fn tail_suffix(tail: &Arc<StdMutex<Vec<u8>>>) -> String {
    let tail = lock(tail);
    let text = String::from_utf8_lossy(&tail);
    let text = text.trim();
    if text.is_empty() {
        String::new()
    } else {
        format!(": {text}")
    }
}

fn describe_exit(status: std::process::ExitStatus) -> String {
    match (status.code(), status.signal()) {
        (Some(code), _) => format!("exit status {code}"),
        (None, Some(signal)) => format!("killed by signal {signal}"),
        _ => "exit status unknown".to_owned(),
    }
}

fn set_route(route: &RouteSlot, value: Option<Route>) {
    *lock(route) = value;
}
