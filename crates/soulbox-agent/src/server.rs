//! Listener, connection handling and routing.

use std::convert::Infallible;
use std::os::fd::AsRawFd;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

use base64::Engine;
use http::{HeaderMap, Method, Request, Response, StatusCode, header};
use http_body_util::{BodyExt, Limited};
use hyper::body::Incoming;
use hyper::service::service_fn;
use hyper_util::rt::{TokioIo, TokioTimer};
use soulbox_wire::agent::{INIT_PATH, InitRequest};
use soulbox_wire::connect::{Code, ConnectError};
use soulbox_wire::envd::{FILESYSTEM_SERVICE, PROCESS_SERVICE};
use soulbox_wire::tunnel::TUNNEL_PATH;
use tokio::io::{AsyncRead, AsyncWrite};

use crate::http::{Body, error, json, status};
use crate::users::User;
use crate::{Agent, Mode};

/// Where the agent listens.
#[derive(Debug)]
pub enum Listener {
    /// The listening unix socket the host created and passed in (`--fd`).
    Unix(std::os::unix::net::UnixListener),
    /// A TCP listener for development (`--listen`).
    Tcp(std::net::TcpListener),
}

impl Listener {
    /// Wraps an inherited listening socket. The fd is marked close-on-exec so that no process
    /// started in the sandbox inherits it (it could otherwise accept the host's connections).
    ///
    /// # Safety
    /// `fd` must be an open listening unix socket that nothing else owns.
    pub unsafe fn from_inherited_fd(fd: std::os::fd::RawFd) -> std::io::Result<Listener> {
        use std::os::fd::FromRawFd;
        // SAFETY: the caller guarantees `fd` is an open, otherwise unowned listening socket;
        // ownership moves into the UnixListener, which closes it on drop.
        let listener = unsafe { std::os::unix::net::UnixListener::from_raw_fd(fd) };
        let flags = nix::fcntl::fcntl(&listener, nix::fcntl::FcntlArg::F_GETFD)?;
        let flags = nix::fcntl::FdFlag::from_bits_retain(flags) | nix::fcntl::FdFlag::FD_CLOEXEC;
        nix::fcntl::fcntl(&listener, nix::fcntl::FcntlArg::F_SETFD(flags))?;
        // Fails unless it really is a socket.
        listener.local_addr()?;
        Ok(Listener::Unix(listener))
    }
}

pub(crate) async fn serve(listener: Listener, agent: Arc<Agent>) -> std::io::Result<()> {
    match listener {
        Listener::Unix(l) => {
            l.set_nonblocking(true)?;
            let l = tokio::net::UnixListener::from_std(l)?;
            tracing::info!(fd = l.as_raw_fd(), "agent serving on inherited unix socket");
            loop {
                match l.accept().await {
                    Ok((s, _)) => spawn_connection(s, agent.clone()),
                    Err(e) => accept_failed(e).await,
                }
            }
        }
        Listener::Tcp(l) => {
            l.set_nonblocking(true)?;
            let l = tokio::net::TcpListener::from_std(l)?;
            tracing::info!(addr = %l.local_addr()?, "agent serving on TCP");
            loop {
                match l.accept().await {
                    Ok((s, _)) => {
                        // Without it small requests stall ~40 ms on delayed ACKs.
                        let _ = s.set_nodelay(true);
                        spawn_connection(s, agent.clone());
                    }
                    Err(e) => accept_failed(e).await,
                }
            }
        }
    }
}

/// Out of fds or similar: back off instead of spinning, keep serving.
async fn accept_failed(e: std::io::Error) {
    tracing::warn!("accept failed: {e}");
    tokio::time::sleep(Duration::from_millis(100)).await;
}

fn spawn_connection<S>(stream: S, agent: Arc<Agent>)
where
    S: AsyncRead + AsyncWrite + Unpin + Send + 'static,
{
    static OPEN: AtomicUsize = AtomicUsize::new(0);
    OPEN.fetch_add(1, Ordering::Relaxed);
    tokio::spawn(async move {
        let service = service_fn(move |req| {
            let agent = agent.clone();
            async move { Ok::<_, Infallible>(route(agent, req).await) }
        });
        let conn = hyper::server::conn::http1::Builder::new()
            .timer(TokioTimer::new())
            // hyper's header timer also runs while a kept-alive connection waits for its next
            // request. Keep it above clients' idle pool timeouts (SDK 300 s, hyper 90 s) so
            // we never close a connection a client is about to reuse.
            .header_read_timeout(Duration::from_secs(600))
            .serve_connection(TokioIo::new(stream), service)
            // The port tunnel hands the connection over after its 101.
            .with_upgrades();
        if let Err(e) = conn.await {
            tracing::debug!("connection ended: {e}");
        }
        if OPEN.fetch_sub(1, Ordering::Relaxed) == 1 {
            // The agent just went idle: hand the memory that transfers used back to the
            // kernel, so an idle sandbox costs the same after a 1 GiB download as before.
            tokio::task::spawn_blocking(|| {
                // SAFETY: malloc_trim only releases free heap pages; it takes glibc's locks.
                unsafe { libc::malloc_trim(0) };
            });
        }
    });
}

async fn route(agent: Arc<Agent>, req: Request<Incoming>) -> Response<Body> {
    let path = req.uri().path().to_string();
    let method = req.method().clone();
    match (method, path.as_str()) {
        (Method::GET | Method::HEAD, "/health") => status(StatusCode::NO_CONTENT),
        (Method::POST, INIT_PATH) => init(&agent, req).await,
        (Method::GET, "/envs") => {
            let cfg = agent.config();
            json(StatusCode::OK, &serde_json::json!(cfg.env_vars))
        }
        (Method::GET | Method::HEAD, "/files") => crate::files::download(agent, req).await,
        (Method::POST, "/files") => crate::files::upload(agent, req).await,
        (_, "/files") => error(StatusCode::METHOD_NOT_ALLOWED, "method not allowed"),
        (Method::GET, p) if p.starts_with(TUNNEL_PATH) => crate::tunnel::open(req).await,
        _ => {
            if let Some(m) = rpc_method(&path, PROCESS_SERVICE) {
                crate::process::dispatch(agent, m, req).await
            } else if let Some(m) = rpc_method(&path, FILESYSTEM_SERVICE) {
                crate::fs::dispatch(agent, m, req).await
            } else {
                error(StatusCode::NOT_FOUND, format!("no route for {path}"))
            }
        }
    }
}

fn rpc_method<'a>(path: &'a str, service: &str) -> Option<&'a str> {
    path.strip_prefix('/')?
        .strip_prefix(service)?
        .strip_prefix('/')
}

/// `POST /_soulbox/init`: global environment and defaults, `/run/e2b/*` in a sandbox.
async fn init(agent: &Agent, req: Request<Incoming>) -> Response<Body> {
    let body = match Limited::new(req.into_body(), 1 << 20).collect().await {
        Ok(b) => b.to_bytes(),
        Err(e) => return error(StatusCode::PAYLOAD_TOO_LARGE, format!("bad init body: {e}")),
    };
    let init: InitRequest = match serde_json::from_slice(&body) {
        Ok(i) => i,
        Err(e) => return error(StatusCode::BAD_REQUEST, format!("bad init body: {e}")),
    };
    if agent.mode == Mode::Sandbox
        && let Err(e) = write_run_files(&init)
    {
        return error(
            StatusCode::INTERNAL_SERVER_ERROR,
            format!("writing /run/e2b failed: {e}"),
        );
    }
    let mut cfg = agent.config.write().unwrap_or_else(|e| e.into_inner());
    cfg.env_vars = init.env_vars.into_iter().collect();
    cfg.env_vars.insert("E2B_SANDBOX".into(), "true".into());
    cfg.env_vars
        .insert("E2B_SANDBOX_ID".into(), init.sandbox_id.clone());
    cfg.env_vars
        .insert("E2B_TEMPLATE_ID".into(), init.template_id.clone());
    cfg.default_user = init.default_user.filter(|u| !u.is_empty());
    cfg.default_workdir = init
        .default_workdir
        .filter(|w| w.starts_with('/'))
        .map(|w| crate::users::clean(std::path::Path::new(&w)));
    status(StatusCode::NO_CONTENT)
}

fn write_run_files(init: &InitRequest) -> std::io::Result<()> {
    let dir = std::path::Path::new("/run/e2b");
    // Init runs again when a sandbox resumes by booting over its own files: whatever its code
    // left at these paths (a symlink, a file for the directory) is replaced, never followed.
    if std::fs::symlink_metadata(dir).is_ok_and(|m| !m.is_dir()) {
        std::fs::remove_file(dir)?;
    }
    std::fs::create_dir_all(dir)?;
    replace_file(&dir.join(".E2B_SANDBOX"), "true")?;
    replace_file(&dir.join(".E2B_SANDBOX_ID"), &init.sandbox_id)?;
    replace_file(&dir.join(".E2B_TEMPLATE_ID"), &init.template_id)?;
    if let Some(resolv) = &init.resolv_conf {
        replace_file(std::path::Path::new("/etc/resolv.conf"), resolv)?;
    }
    name_host(std::path::Path::new("/etc"), &init.sandbox_id)
}

/// Writes `contents` (mode 0644) to a new file renamed over `path`: what was at `path` — a
/// symlink included — is replaced, not written through.
fn replace_file(path: &std::path::Path, contents: impl AsRef<[u8]>) -> std::io::Result<()> {
    use std::io::Write as _;
    use std::os::unix::fs::OpenOptionsExt as _;
    let name = path.file_name().unwrap_or_default().to_string_lossy();
    let tmp = path.with_file_name(format!(".{name}.soulbox-new"));
    match std::fs::remove_file(&tmp) {
        Err(e) if e.kind() != std::io::ErrorKind::NotFound => return Err(e),
        _ => {}
    }
    let mut f = std::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(0o644)
        .open(&tmp)?;
    f.write_all(contents.as_ref())?;
    drop(f);
    std::fs::rename(&tmp, path)
}

/// What `/etc/hosts` holds when the template has none (Debian's loopback lines).
const DEFAULT_HOSTS: &str = "127.0.0.1\tlocalhost\n\
    ::1\tlocalhost ip6-localhost ip6-loopback\n\
    ff02::1\tip6-allnodes\n\
    ff02::2\tip6-allrouters\n";

/// Writes the sandbox's hostname (its id, set by the runtime) to `etc/hostname` and maps it
/// to 127.0.0.1 in `etc/hosts`, keeping the template's other lines, so that `sudo` and
/// anything else resolving its own hostname finds it without DNS (sudo otherwise warns
/// "unable to resolve host" on every call), and the template's `/etc/hostname` (the name of
/// the machine that built it) does not show. Nothing for an id that is not a plain hostname
/// (it comes from the host, but must not be able to add lines).
fn name_host(etc: &std::path::Path, id: &str) -> std::io::Result<()> {
    if id.is_empty()
        || !id
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'.')
    {
        return Ok(());
    }
    replace_file(&etc.join("hostname"), format!("{id}\n"))?;
    let hosts = etc.join("hosts");
    let mut text = match std::fs::read_to_string(&hosts) {
        Ok(text) => text,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => DEFAULT_HOSTS.to_owned(),
        Err(e) => return Err(e),
    };
    let named = text.lines().any(|line| {
        let line = line.split('#').next().unwrap_or_default();
        line.split_whitespace().skip(1).any(|name| name == id)
    });
    if named {
        return Ok(());
    }
    if !text.is_empty() && !text.ends_with('\n') {
        text.push('\n');
    }
    text.push_str(&format!("127.0.0.1\t{id}\n"));
    replace_file(&hosts, text)
}

/// Why a request's user cannot be served.
pub(crate) enum UserError {
    Unknown(String),
    Forbidden(String),
}

impl From<UserError> for ConnectError {
    fn from(e: UserError) -> Self {
        match e {
            UserError::Unknown(m) => ConnectError::new(Code::Unauthenticated, m),
            UserError::Forbidden(m) => ConnectError::new(Code::PermissionDenied, m),
        }
    }
}

impl Agent {
    /// The user a request acts as: `name`, else the configured default, else `root` (or,
    /// unprivileged, ourselves).
    pub(crate) fn user(&self, name: Option<&str>) -> Result<User, UserError> {
        let cfg_default;
        let name = match name.filter(|n| !n.is_empty()) {
            Some(n) => n,
            None => {
                cfg_default = self.config().default_user.unwrap_or_else(|| {
                    if self.privileged {
                        "root".to_string()
                    } else {
                        self.users.user_name(self.our_uid)
                    }
                });
                &cfg_default
            }
        };
        let user = self
            .users
            .lookup(name)
            .ok_or_else(|| UserError::Unknown(format!("error looking up user '{name}'")))?;
        if !self.privileged && user.uid != self.our_uid {
            return Err(UserError::Forbidden(format!(
                "the agent runs unprivileged as uid {} and cannot act as user '{name}'",
                self.our_uid
            )));
        }
        Ok(user)
    }

    /// The user of an RPC, from `Authorization: Basic base64("<user>:")`.
    pub(crate) fn rpc_user(&self, headers: &HeaderMap) -> Result<User, ConnectError> {
        let Some(v) = headers.get(header::AUTHORIZATION) else {
            return Ok(self.user(None)?);
        };
        let bad = || ConnectError::new(Code::Unauthenticated, "invalid Authorization header");
        let v = v.to_str().map_err(|_| bad())?;
        let (scheme, b64) = v.trim().split_once(' ').ok_or_else(bad)?;
        if !scheme.eq_ignore_ascii_case("basic") {
            return Err(bad());
        }
        let decoded = base64::engine::general_purpose::STANDARD
            .decode(b64.trim())
            .map_err(|_| bad())?;
        let decoded = String::from_utf8(decoded).map_err(|_| bad())?;
        let name = decoded.split_once(':').map_or(decoded.as_str(), |(u, _)| u);
        Ok(self.user(Some(name))?)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn host_is_named_once_and_the_template_lines_stay() {
        let etc = tempfile::tempdir().expect("tempdir");
        let hosts = etc.path().join("hosts");
        std::fs::write(etc.path().join("hostname"), "build-machine\n").expect("write");
        name_host(etc.path(), "abc123").expect("name");
        let made = std::fs::read_to_string(&hosts).expect("read");
        assert!(made.starts_with(DEFAULT_HOSTS), "{made}");
        assert!(made.ends_with("127.0.0.1\tabc123\n"), "{made}");
        let hostname = std::fs::read_to_string(etc.path().join("hostname")).expect("read");
        assert_eq!(hostname, "abc123\n");
        name_host(etc.path(), "abc123").expect("again");
        assert_eq!(std::fs::read_to_string(&hosts).expect("read"), made);

        std::fs::write(&hosts, "10.0.0.1 db # abc123 in a comment").expect("write");
        name_host(etc.path(), "abc123").expect("name");
        assert_eq!(
            std::fs::read_to_string(&hosts).expect("read"),
            "10.0.0.1 db # abc123 in a comment\n127.0.0.1\tabc123\n"
        );
    }

    #[test]
    fn odd_names_are_not_written() {
        let etc = tempfile::tempdir().expect("tempdir");
        for id in ["", "a\n1.2.3.4 evil", "a b"] {
            name_host(etc.path(), id).expect("no error");
            assert!(!etc.path().join("hosts").exists(), "{id:?}");
            assert!(!etc.path().join("hostname").exists(), "{id:?}");
        }
    }
}
