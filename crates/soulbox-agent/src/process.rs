//! The `process.Process` service: starting processes (pipes or a real PTY) as a sandbox user,
//! streaming their output to any number of subscribers, input, signals, resize.
//!
//! Each process has one pump task that reads its output and hands every chunk to the current
//! subscribers (the `Start` stream and any `Connect` streams) through bounded channels, so a
//! slow client slows the process down instead of growing memory. With no subscriber left the
//! output is read and dropped: a client that disconnects does not kill or block the process.
//! An ended process is kept for [`RETENTION`] so that `Connect` can still report its end.

use std::collections::{BTreeMap, HashMap};
use std::ffi::CString;
use std::os::fd::{AsFd, OwnedFd};
use std::os::unix::ffi::OsStrExt;
use std::os::unix::process::CommandExt;
use std::process::Stdio;
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Duration;

use bytes::Bytes;
use futures::{Stream, StreamExt};
use http::{Request, Response};
use hyper::body::Incoming;
use nix::sys::signal::{Signal as NixSignal, kill, killpg};
use nix::unistd::Pid;
use soulbox_wire::connect::{Code, Codec, ConnectError, EndStream};
use soulbox_wire::envd::process::{
    self as pb, ProcessConfig, ProcessEvent, ProcessSelector, process_event, process_input,
    process_selector, stream_input_request,
};
use tokio::io::unix::AsyncFd;
use tokio::sync::{mpsc, oneshot};

use crate::Agent;
use crate::http::Body;
use crate::reaper::{self, ExitStatus};
use crate::rpc::{self, Call, Kind};
use crate::users::{User, resolve_path};

/// How long an ended process stays visible to `Connect`.
const RETENTION: Duration = Duration::from_secs(30);
/// Output chunks buffered per subscriber before the process is slowed down.
const SUBSCRIBER_QUEUE: usize = 64;
/// Largest output chunk read at once.
const READ_CHUNK: usize = 32 * 1024;
/// `oom_score_adj` of user processes (upstream envd uses the same value).
const OOM_SCORE_ADJ: &[u8] = b"100";

type Output = process_event::data_event::Output;

#[derive(Clone)]
enum Event {
    Data(Output),
    End(process_event::EndEvent),
}

/// All processes the agent started.
#[derive(Default)]
pub(crate) struct Table {
    inner: Mutex<Inner>,
}

#[derive(Default)]
struct Inner {
    running: BTreeMap<u32, Arc<Proc>>,
    ended: HashMap<u32, Arc<Proc>>,
}

struct Proc {
    pid: u32,
    tag: Option<String>,
    config: ProcessConfig,
    /// The PTY master, for PTY processes.
    pty: Option<Arc<AsyncFd<OwnedFd>>>,
    /// Serialises writes to the PTY master.
    pty_write: tokio::sync::Mutex<()>,
    /// The stdin pipe while open (non-PTY processes started with stdin).
    stdin: tokio::sync::Mutex<Option<AsyncFd<OwnedFd>>>,
    shared: Mutex<Shared>,
}

#[derive(Default)]
struct Shared {
    next_id: u64,
    subscribers: Vec<(u64, mpsc::Sender<Event>)>,
    end: Option<process_event::EndEvent>,
}

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}

/// What a new stream gets: live events, or the end of an already-finished process.
enum Subscription {
    Live(mpsc::Receiver<Event>),
    Ended(process_event::EndEvent),
}

impl Proc {
    fn subscribe(&self) -> Subscription {
        let mut s = lock(&self.shared);
        if let Some(end) = &s.end {
            return Subscription::Ended(end.clone());
        }
        let (tx, rx) = mpsc::channel(SUBSCRIBER_QUEUE);
        s.next_id += 1;
        let id = s.next_id;
        s.subscribers.push((id, tx));
        Subscription::Live(rx)
    }

    /// Delivers to every subscriber, waiting for room; drops those that went away.
    async fn publish(&self, ev: Event) {
        let subs = lock(&self.shared).subscribers.clone();
        for (id, tx) in subs {
            if tx.send(ev.clone()).await.is_err() {
                lock(&self.shared).subscribers.retain(|(i, _)| *i != id);
            }
        }
    }

    fn signal(&self, sig: NixSignal) -> nix::Result<()> {
        let pid = Pid::from_raw(self.pid as i32);
        // Every process leads its own session and group: signal the whole group so pipelines
        // and shells' children go too; fall back to the process if the group is gone.
        killpg(pid, sig).or_else(|_| kill(pid, sig))
    }

    fn is_running(&self) -> bool {
        lock(&self.shared).end.is_none()
    }
}

impl Table {
    fn find(
        &self,
        sel: Option<&ProcessSelector>,
        include_ended: bool,
    ) -> Result<Arc<Proc>, ConnectError> {
        let inner = lock(&self.inner);
        let candidates = || {
            inner.running.values().chain(
                include_ended
                    .then_some(inner.ended.values())
                    .into_iter()
                    .flatten(),
            )
        };
        match sel.and_then(|s| s.selector.as_ref()) {
            Some(process_selector::Selector::Pid(pid)) => candidates()
                .find(|p| p.pid == *pid)
                .cloned()
                .ok_or_else(|| {
                    ConnectError::new(Code::NotFound, format!("process with pid {pid} not found"))
                }),
            Some(process_selector::Selector::Tag(tag)) => candidates()
                .find(|p| p.tag.as_deref() == Some(tag.as_str()))
                .cloned()
                .ok_or_else(|| {
                    ConnectError::new(
                        Code::NotFound,
                        format!("process with tag '{tag}' not found"),
                    )
                }),
            None => Err(ConnectError::new(
                Code::InvalidArgument,
                "a process selector (pid or tag) is required",
            )),
        }
    }

    fn finished(&self, proc: &Arc<Proc>) {
        let mut inner = lock(&self.inner);
        if inner
            .running
            .get(&proc.pid)
            .is_some_and(|p| Arc::ptr_eq(p, proc))
        {
            inner.running.remove(&proc.pid);
        }
        inner.ended.insert(proc.pid, proc.clone());
    }

    fn forget(&self, proc: &Arc<Proc>) {
        let mut inner = lock(&self.inner);
        if inner
            .ended
            .get(&proc.pid)
            .is_some_and(|p| Arc::ptr_eq(p, proc))
        {
            inner.ended.remove(&proc.pid);
        }
    }
}

pub(crate) async fn dispatch(
    agent: Arc<Agent>,
    method: &str,
    req: Request<Incoming>,
) -> Response<Body> {
    match method {
        "Start" => start(agent, req).await,
        "Connect" => connect(agent, req).await,
        "StreamInput" => stream_input(agent, req).await,
        "List" => {
            rpc::handle_unary(req, |_, _: pb::ListRequest| async move { Ok(list(&agent)) }).await
        }
        "SendInput" => {
            rpc::handle_unary(req, |_, r: pb::SendInputRequest| async move {
                let proc = agent.processes.find(r.process.as_ref(), false)?;
                write_input(&proc, r.input).await?;
                Ok(pb::SendInputResponse {})
            })
            .await
        }
        "SendSignal" => {
            rpc::handle_unary(req, |_, r: pb::SendSignalRequest| async move {
                send_signal(&agent, r)?;
                Ok(pb::SendSignalResponse {})
            })
            .await
        }
        "CloseStdin" => {
            rpc::handle_unary(req, |_, r: pb::CloseStdinRequest| async move {
                let proc = agent.processes.find(r.process.as_ref(), false)?;
                if proc.pty.is_some() {
                    return Err(ConnectError::new(
                        Code::FailedPrecondition,
                        "cannot close stdin of a PTY process",
                    ));
                }
                proc.stdin.lock().await.take();
                Ok(pb::CloseStdinResponse {})
            })
            .await
        }
        "Update" => {
            rpc::handle_unary(req, |_, r: pb::UpdateRequest| async move {
                let proc = agent.processes.find(r.process.as_ref(), false)?;
                let size = r.pty.and_then(|p| p.size).ok_or_else(|| {
                    ConnectError::new(Code::InvalidArgument, "pty.size is required")
                })?;
                let master = proc.pty.as_ref().ok_or_else(|| {
                    ConnectError::new(Code::FailedPrecondition, "the process has no PTY")
                })?;
                crate::pty::resize(master.get_ref(), clamp_u16(size.cols), clamp_u16(size.rows))
                    .map_err(|e| {
                        ConnectError::new(Code::Internal, format!("resize failed: {e}"))
                    })?;
                Ok(pb::UpdateResponse {})
            })
            .await
        }
        _ => rpc::unary_error(&ConnectError::new(
            Code::Unimplemented,
            format!("process.Process/{method} is not implemented"),
        )),
    }
}

fn clamp_u16(v: u32) -> u16 {
    u16::try_from(v).unwrap_or(u16::MAX)
}

fn list(agent: &Agent) -> pb::ListResponse {
    let inner = lock(&agent.processes.inner);
    pb::ListResponse {
        processes: inner
            .running
            .values()
            .filter(|p| p.is_running())
            .map(|p| pb::ProcessInfo {
                config: Some(p.config.clone()),
                pid: p.pid,
                tag: p.tag.clone(),
            })
            .collect(),
    }
}

fn send_signal(agent: &Agent, r: pb::SendSignalRequest) -> Result<(), ConnectError> {
    let proc = agent.processes.find(r.process.as_ref(), false)?;
    let sig = match pb::Signal::try_from(r.signal) {
        Ok(pb::Signal::Sigkill) => NixSignal::SIGKILL,
        Ok(pb::Signal::Sigterm) => NixSignal::SIGTERM,
        _ => {
            return Err(ConnectError::new(
                Code::Unimplemented,
                format!(
                    "signal {} is not supported (only SIGTERM and SIGKILL)",
                    r.signal
                ),
            ));
        }
    };
    proc.signal(sig).map_err(|e| match e {
        // Exited a moment ago; its end event is on its way.
        nix::errno::Errno::ESRCH => ConnectError::new(
            Code::NotFound,
            format!("process with pid {} not found", proc.pid),
        ),
        e => ConnectError::new(Code::Internal, format!("sending the signal failed: {e}")),
    })
}

async fn write_input(proc: &Proc, input: Option<pb::ProcessInput>) -> Result<(), ConnectError> {
    match input.and_then(|i| i.input) {
        Some(process_input::Input::Stdin(data)) => {
            if proc.pty.is_some() {
                return Err(ConnectError::new(
                    Code::FailedPrecondition,
                    "the process has a PTY: send pty input instead of stdin",
                ));
            }
            let guard = proc.stdin.lock().await;
            let fd = guard.as_ref().ok_or_else(|| {
                ConnectError::new(
                    Code::FailedPrecondition,
                    "stdin of the process is not open (started without stdin, or closed)",
                )
            })?;
            write_all(fd, &data).await
        }
        Some(process_input::Input::Pty(data)) => {
            let master = proc.pty.as_ref().ok_or_else(|| {
                ConnectError::new(
                    Code::FailedPrecondition,
                    "the process has no PTY: send stdin instead of pty input",
                )
            })?;
            let _order = proc.pty_write.lock().await;
            write_all(master, &data).await
        }
        None => Err(ConnectError::new(
            Code::InvalidArgument,
            "input is required",
        )),
    }
}

async fn write_all(fd: &AsyncFd<OwnedFd>, mut data: &[u8]) -> Result<(), ConnectError> {
    let failed =
        |e: std::io::Error| ConnectError::new(Code::Internal, format!("writing input failed: {e}"));
    while !data.is_empty() {
        let mut guard = fd.writable().await.map_err(failed)?;
        match guard
            .try_io(|inner| nix::unistd::write(inner.get_ref(), data).map_err(std::io::Error::from))
        {
            Ok(Ok(n)) => data = &data[n..],
            Ok(Err(e)) => return Err(failed(e)),
            Err(_would_block) => {}
        }
    }
    Ok(())
}

async fn start(agent: Arc<Agent>, req: Request<Incoming>) -> Response<Body> {
    let mut call = match Call::new(req, Kind::ServerStream) {
        Ok(c) => c,
        Err(r) => return *r,
    };
    let codec = call.codec;
    let msg: pb::StartRequest = match call.single_message().await {
        Ok(m) => m,
        Err(e) => return rpc::stream_error(codec, e),
    };
    let user = match agent.rpc_user(&call.headers) {
        Ok(u) => u,
        Err(e) => return rpc::stream_error(codec, e),
    };
    match spawn(&agent, &user, msg, call.timeout()) {
        Ok((proc, rx)) => rpc::stream_response(
            codec,
            event_stream(
                codec,
                proc.pid,
                Subscription::Live(rx),
                call.keepalive(),
                |event| pb::StartResponse { event: Some(event) },
            ),
        ),
        Err(e) => rpc::stream_error(codec, e),
    }
}

async fn connect(agent: Arc<Agent>, req: Request<Incoming>) -> Response<Body> {
    let mut call = match Call::new(req, Kind::ServerStream) {
        Ok(c) => c,
        Err(r) => return *r,
    };
    let codec = call.codec;
    let result = async {
        let msg: pb::ConnectRequest = call.single_message().await?;
        agent.processes.find(msg.process.as_ref(), true)
    }
    .await;
    match result {
        Ok(proc) => rpc::stream_response(
            codec,
            event_stream(
                codec,
                proc.pid,
                proc.subscribe(),
                call.keepalive(),
                |event| pb::ConnectResponse { event: Some(event) },
            ),
        ),
        Err(e) => rpc::stream_error(codec, e),
    }
}

async fn stream_input(agent: Arc<Agent>, req: Request<Incoming>) -> Response<Body> {
    let call = match Call::new(req, Kind::ClientStream) {
        Ok(c) => c,
        Err(r) => return *r,
    };
    let codec = call.codec;
    let mut messages = Box::pin(call.messages::<pb::StreamInputRequest>());
    let result = async {
        let mut proc: Option<Arc<Proc>> = None;
        while let Some(msg) = messages.next().await {
            match msg?.event {
                Some(stream_input_request::Event::Start(s)) => {
                    proc = Some(agent.processes.find(s.process.as_ref(), false)?);
                }
                Some(stream_input_request::Event::Data(d)) => {
                    let p = proc.as_ref().ok_or_else(|| {
                        ConnectError::new(
                            Code::FailedPrecondition,
                            "the first message must be start",
                        )
                    })?;
                    write_input(p, d.input).await?;
                }
                Some(stream_input_request::Event::Keepalive(_)) | None => {}
            }
        }
        Ok::<_, ConnectError>(())
    }
    .await;
    let envelopes = match result {
        Ok(()) => vec![
            codec.envelope(&pb::StreamInputResponse {}),
            EndStream::envelope(Ok(())),
        ],
        Err(e) => vec![EndStream::envelope(Err(e))],
    };
    rpc::stream_response(codec, futures::stream::iter(envelopes))
}

/// The event stream of `Start`/`Connect`: `start{pid}` first, then live events with
/// keepalives after `keepalive` of silence, then `end` and a successful end-of-stream.
fn event_stream<M>(
    codec: Codec,
    pid: u32,
    sub: Subscription,
    keepalive: Duration,
    wrap: fn(ProcessEvent) -> M,
) -> impl Stream<Item = Bytes> + Send + 'static
where
    M: prost::Message + serde::Serialize + 'static,
{
    enum Phase {
        Start(Subscription),
        Live(mpsc::Receiver<Event>),
        End(process_event::EndEvent),
        Close(Result<(), ConnectError>),
        Done,
    }
    let envelope =
        move |e: process_event::Event| codec.envelope(&wrap(ProcessEvent { event: Some(e) }));
    futures::stream::unfold(Phase::Start(sub), move |phase| async move {
        match phase {
            Phase::Start(sub) => {
                let start = envelope(process_event::Event::Start(process_event::StartEvent {
                    pid,
                }));
                let next = match sub {
                    Subscription::Live(rx) => Phase::Live(rx),
                    Subscription::Ended(end) => Phase::End(end),
                };
                Some((start, next))
            }
            Phase::Live(mut rx) => match tokio::time::timeout(keepalive, rx.recv()).await {
                Err(_idle) => Some((
                    envelope(process_event::Event::Keepalive(process_event::KeepAlive {})),
                    Phase::Live(rx),
                )),
                Ok(Some(Event::Data(out))) => Some((
                    envelope(process_event::Event::Data(process_event::DataEvent {
                        output: Some(out),
                    })),
                    Phase::Live(rx),
                )),
                Ok(Some(Event::End(end))) => Some((
                    envelope(process_event::Event::End(end)),
                    Phase::Close(Ok(())),
                )),
                Ok(None) => Some((
                    EndStream::envelope(Err(ConnectError::new(
                        Code::Internal,
                        "the process output stream closed unexpectedly",
                    ))),
                    Phase::Done,
                )),
            },
            Phase::End(end) => Some((
                envelope(process_event::Event::End(end)),
                Phase::Close(Ok(())),
            )),
            Phase::Close(result) => Some((EndStream::envelope(result), Phase::Done)),
            Phase::Done => None,
        }
    })
}

/// Where the output of a process comes from.
#[derive(Clone, Copy)]
enum Source {
    Stdout,
    Stderr,
    Pty,
}

impl Source {
    fn wrap(self, data: Vec<u8>) -> Output {
        match self {
            Source::Stdout => Output::Stdout(data),
            Source::Stderr => Output::Stderr(data),
            Source::Pty => Output::Pty(data),
        }
    }
}

fn io_to_connect(what: &str, e: &std::io::Error) -> ConnectError {
    let code = match e.kind() {
        std::io::ErrorKind::NotFound | std::io::ErrorKind::InvalidInput => Code::InvalidArgument,
        std::io::ErrorKind::PermissionDenied => Code::PermissionDenied,
        _ => Code::Internal,
    };
    ConnectError::new(code, format!("{what}: {e}"))
}

/// Starts a process and registers the caller's stream as its first subscriber.
fn spawn(
    agent: &Arc<Agent>,
    user: &User,
    msg: pb::StartRequest,
    lifetime: Option<Duration>,
) -> Result<(Arc<Proc>, mpsc::Receiver<Event>), ConnectError> {
    let config = msg
        .process
        .ok_or_else(|| ConnectError::new(Code::InvalidArgument, "process is required"))?;
    if config.cmd.is_empty() {
        return Err(ConnectError::new(
            Code::InvalidArgument,
            "process.cmd is required",
        ));
    }
    let settings = agent.config();
    let cwd = match config.cwd.as_deref().filter(|c| !c.is_empty()) {
        Some(c) => {
            let cwd = resolve_path(c, &user.home, &user.home);
            if !cwd.is_dir() {
                return Err(ConnectError::new(
                    Code::InvalidArgument,
                    format!("cwd '{}' does not exist", cwd.display()),
                ));
            }
            cwd
        }
        // A missing home or default workdir is not the caller's fault: start in `/`.
        None => settings
            .default_workdir
            .clone()
            .filter(|d| d.is_dir())
            .or_else(|| user.home.is_dir().then(|| user.home.clone()))
            .unwrap_or_else(|| "/".into()),
    };
    if let Some(tag) = &msg.tag {
        let inner = lock(&agent.processes.inner);
        if inner.running.values().any(|p| p.tag.as_ref() == Some(tag)) {
            return Err(ConnectError::new(
                Code::AlreadyExists,
                format!("a process with tag '{tag}' is already running"),
            ));
        }
    }

    // Environment per protocol §4.6: ours, then the global one, then the request's.
    let mut env: BTreeMap<String, String> = BTreeMap::new();
    env.insert("PATH".into(), agent.path_env.clone());
    env.insert("HOME".into(), user.home.to_string_lossy().into_owned());
    env.insert("USER".into(), user.name.clone());
    env.insert("LOGNAME".into(), user.name.clone());
    env.extend(settings.env_vars);
    env.extend(config.envs.iter().map(|(k, v)| (k.clone(), v.clone())));

    let pty_size = msg.pty.map(|p| p.size.unwrap_or_default()).map(|s| {
        let cols = if s.cols == 0 { 80 } else { clamp_u16(s.cols) };
        let rows = if s.rows == 0 { 24 } else { clamp_u16(s.rows) };
        (cols, rows)
    });
    let with_stdin = msg.stdin.unwrap_or(true);

    let mut cmd = std::process::Command::new(&config.cmd);
    cmd.args(&config.args).env_clear().envs(&env);
    let mut master = None;
    if let Some((cols, rows)) = pty_size {
        let (m, slave) = crate::pty::open_pair(cols, rows)
            .map_err(|e| io_to_connect("opening a PTY failed", &e))?;
        let dup = |fd: &OwnedFd| {
            fd.try_clone()
                .map_err(|e| io_to_connect("opening a PTY failed", &e))
        };
        cmd.stdin(Stdio::from(dup(&slave)?))
            .stdout(Stdio::from(dup(&slave)?))
            .stderr(Stdio::from(slave));
        master = Some(m);
    } else {
        cmd.stdin(if with_stdin {
            Stdio::piped()
        } else {
            Stdio::null()
        })
        .stdout(Stdio::piped())
        .stderr(Stdio::piped());
    }
    let cwd_c = CString::new(cwd.as_os_str().as_bytes())
        .map_err(|_| ConnectError::new(Code::InvalidArgument, "cwd contains a NUL byte"))?;
    let switch_user = agent
        .privileged
        .then(|| (user.uid, user.gid, user.groups.clone()));
    let is_pty = master.is_some();
    // SAFETY: the closure runs in the forked child before exec and only makes raw syscalls
    // (setsid, ioctl, open, write, close, setgroups, setgid, setuid, chdir) on data prepared
    // before the fork; it allocates nothing and takes no locks.
    unsafe {
        cmd.pre_exec(move || {
            if libc::setsid() < 0 {
                return Err(std::io::Error::last_os_error());
            }
            // Make user processes the OOM killer's first choice rather than the agent: if PID 1
            // dies the whole sandbox goes. Raising one's own score needs no privilege.
            let fd = libc::open(
                c"/proc/self/oom_score_adj".as_ptr(),
                libc::O_WRONLY | libc::O_CLOEXEC,
            );
            if fd >= 0 {
                libc::write(fd, OOM_SCORE_ADJ.as_ptr().cast(), OOM_SCORE_ADJ.len());
                libc::close(fd);
            }
            if is_pty && libc::ioctl(0, libc::TIOCSCTTY, 0) < 0 {
                return Err(std::io::Error::last_os_error());
            }
            if let Some((uid, gid, groups)) = &switch_user
                && (libc::setgroups(groups.len(), groups.as_ptr()) < 0
                    || libc::setgid(*gid) < 0
                    || libc::setuid(*uid) < 0)
            {
                return Err(std::io::Error::last_os_error());
            }
            // After dropping privileges, so the user must be able to enter it.
            if libc::chdir(cwd_c.as_ptr()) < 0 {
                return Err(std::io::Error::last_os_error());
            }
            Ok(())
        });
    }

    let (mut child, exit_rx) = reaper::spawn_registered(|| {
        let child = cmd.spawn()?;
        let pid = i32::try_from(child.id()).unwrap_or(i32::MAX);
        Ok((child, pid))
    })
    .map_err(|e| io_to_connect(&format!("starting '{}' failed", config.cmd), &e))?;
    drop(cmd);
    let pid = child.id();

    let mut sources = Vec::new();
    let mut stdin = None;
    let mut pty = None;
    let setup = (|| -> std::io::Result<()> {
        if let Some(m) = master {
            let m = Arc::new(crate::pty::async_fd(m)?);
            sources.push((Source::Pty, m.clone()));
            pty = Some(m);
        } else {
            if let Some(s) = child.stdin.take() {
                stdin = Some(crate::pty::async_fd(OwnedFd::from(s))?);
            }
            if let Some(s) = child.stdout.take() {
                sources.push((
                    Source::Stdout,
                    Arc::new(crate::pty::async_fd(OwnedFd::from(s))?),
                ));
            }
            if let Some(s) = child.stderr.take() {
                sources.push((
                    Source::Stderr,
                    Arc::new(crate::pty::async_fd(OwnedFd::from(s))?),
                ));
            }
        }
        Ok(())
    })();
    if let Err(e) = setup {
        let _ = killpg(Pid::from_raw(pid as i32), NixSignal::SIGKILL);
        return Err(io_to_connect("setting up process I/O failed", &e));
    }

    let proc = Arc::new(Proc {
        pid,
        tag: msg.tag,
        config,
        pty,
        pty_write: tokio::sync::Mutex::new(()),
        stdin: tokio::sync::Mutex::new(stdin),
        shared: Mutex::new(Shared::default()),
    });
    let Subscription::Live(rx) = proc.subscribe() else {
        return Err(ConnectError::new(
            Code::Internal,
            "process ended before it started",
        ));
    };
    {
        let mut inner = lock(&agent.processes.inner);
        inner.ended.remove(&pid);
        inner.running.insert(pid, proc.clone());
    }
    tokio::spawn(pump(agent.clone(), proc.clone(), sources, exit_rx));
    if let Some(lifetime) = lifetime {
        let p = proc.clone();
        tokio::spawn(async move {
            tokio::time::sleep(lifetime).await;
            if p.is_running() {
                let _ = p.signal(NixSignal::SIGKILL);
            }
        });
    }
    Ok((proc, rx))
}

/// Reads one chunk; `Ok(None)` at end of output (EOF, or EIO once a PTY's slave is closed).
async fn read_chunk(fd: &AsyncFd<OwnedFd>) -> std::io::Result<Option<Vec<u8>>> {
    loop {
        let mut guard = fd.readable().await?;
        match guard.try_io(|inner| read_now(inner.get_ref())) {
            Ok(r) => return r,
            Err(_would_block) => {}
        }
    }
}

/// One non-blocking read: `Err(WouldBlock)` when nothing is buffered.
fn read_now(fd: impl AsFd) -> std::io::Result<Option<Vec<u8>>> {
    let mut buf = vec![0u8; READ_CHUNK];
    match nix::unistd::read(fd, &mut buf) {
        Ok(0) | Err(nix::errno::Errno::EIO) => Ok(None),
        Ok(n) => {
            buf.truncate(n);
            Ok(Some(buf))
        }
        Err(e) => Err(e.into()),
    }
}

async fn pump(
    agent: Arc<Agent>,
    proc: Arc<Proc>,
    sources: Vec<(Source, Arc<AsyncFd<OwnedFd>>)>,
    exit_rx: oneshot::Receiver<ExitStatus>,
) {
    let mut open = sources;
    let mut exit_rx = exit_rx;
    let status = loop {
        let reads: Vec<_> = open
            .iter()
            .enumerate()
            .map(|(i, (src, fd))| {
                let (src, fd) = (*src, fd.clone());
                Box::pin(async move { (i, src, read_chunk(&fd).await) })
            })
            .collect();
        let read_any = async move {
            if reads.is_empty() {
                std::future::pending().await
            } else {
                futures::future::select_all(reads).await.0
            }
        };
        tokio::select! {
            status = &mut exit_rx => break status.ok(),
            (i, src, r) = read_any => match r {
                Ok(Some(data)) => proc.publish(Event::Data(src.wrap(data))).await,
                Ok(None) | Err(_) => { open.remove(i); }
            },
        }
    };
    // The process is gone: what it wrote is in the pipe/PTY buffers now. Take it, but do not
    // wait for background children that still hold the descriptors.
    for (src, fd) in &open {
        while let Ok(Some(data)) = read_now(fd.get_ref()) {
            proc.publish(Event::Data(src.wrap(data))).await;
        }
    }
    let end = match status {
        Some(s) => {
            let text = reaper::describe(s);
            let (exit_code, exited) = match s {
                ExitStatus::Exited(c) => (c, true),
                ExitStatus::Signaled { .. } => (-1, false),
            };
            process_event::EndEvent {
                exit_code,
                exited,
                error: (s != ExitStatus::Exited(0)).then(|| text.clone()),
                status: text,
            }
        }
        None => process_event::EndEvent {
            exit_code: -1,
            exited: false,
            status: "unknown".into(),
            error: Some("the exit status of the process was lost".into()),
        },
    };
    let subscribers = {
        let mut shared = lock(&proc.shared);
        shared.end = Some(end.clone());
        std::mem::take(&mut shared.subscribers)
    };
    agent.processes.finished(&proc);
    proc.stdin.lock().await.take();
    // Background children still holding the pipes get EOF/EPIPE now, not after the retention.
    drop(open);
    for (_, tx) in subscribers {
        let _ = tx.send(Event::End(end.clone())).await;
    }
    tokio::time::sleep(RETENTION).await;
    agent.processes.forget(&proc);
}
