//! Directory watches on inotify: the `WatchDir` stream and the polling trio
//! `CreateWatcher` / `GetWatcherEvents` / `RemoveWatcher`. Event mapping follows fsnotify,
//! which upstream envd uses: create and moved-to → CREATE, modify → WRITE, delete → REMOVE,
//! moved-from → RENAME, attrib → CHMOD. Recursive watches add a watch for every directory,
//! including ones created later (symlinked directories are not followed).

use std::collections::HashMap;
use std::path::PathBuf;
use std::sync::{Arc, Mutex};

use futures::StreamExt;
use http::{Request, Response};
use hyper::body::Incoming;
use inotify::{EventMask, EventStream, Inotify, WatchDescriptor, WatchMask};
use soulbox_wire::connect::{Code, ConnectError, EndStream};
use soulbox_wire::envd::filesystem::{self as pb, EventType, FilesystemEvent, watch_dir_response};

use crate::Agent;
use crate::http::Body;
use crate::rpc::{self, Call, Kind};

/// Events a polling watcher keeps between two `GetWatcherEvents`; older ones are dropped.
const MAX_PENDING_EVENTS: usize = 10_000;
/// Polling watchers per agent, each holding an inotify instance.
const MAX_WATCHERS: usize = 256;

fn mask() -> WatchMask {
    WatchMask::CREATE
        | WatchMask::MODIFY
        | WatchMask::DELETE
        | WatchMask::MOVED_FROM
        | WatchMask::MOVED_TO
        | WatchMask::ATTRIB
        | WatchMask::DONT_FOLLOW
}

/// Filesystem types that need `allow_network_mounts`.
const NETWORK_FS_MAGIC: [i64; 5] = [0x6969, 0x517B, 0xFF53_4D42, 0xFE53_4D42, 0x6573_5546];

struct Watch {
    events: EventStream<Vec<u8>>,
    /// Watched directory of each descriptor, relative to the root ("" for the root).
    dirs: HashMap<WatchDescriptor, PathBuf>,
    root: PathBuf,
    recursive: bool,
    include_entry: bool,
    users: crate::users::UserDb,
}

impl Watch {
    fn new(
        agent: &Agent,
        root: PathBuf,
        recursive: bool,
        include_entry: bool,
        allow_network: bool,
    ) -> Result<Watch, ConnectError> {
        let meta = std::fs::metadata(&root).map_err(|e| crate::fs::fs_error(&root, &e))?;
        if !meta.is_dir() {
            return Err(ConnectError::new(
                Code::InvalidArgument,
                format!("path '{}' is not a directory", root.display()),
            ));
        }
        if !allow_network
            && let Ok(st) = nix::sys::statfs::statfs(&root)
            && NETWORK_FS_MAGIC.contains(&st.filesystem_type().0)
        {
            return Err(ConnectError::new(
                Code::InvalidArgument,
                format!(
                    "path '{}' is on a network mount; set allow_network_mounts",
                    root.display()
                ),
            ));
        }
        let failed = |e: std::io::Error| {
            let code = if e.raw_os_error() == Some(libc::EMFILE)
                || e.raw_os_error() == Some(libc::ENOSPC)
            {
                Code::ResourceExhausted
            } else {
                Code::Internal
            };
            ConnectError::new(code, format!("cannot watch '{}': {e}", root.display()))
        };
        let inotify = Inotify::init().map_err(failed)?;
        let events = inotify
            .into_event_stream(vec![0u8; 16 * 1024])
            .map_err(failed)?;
        let mut w = Watch {
            events,
            dirs: HashMap::new(),
            root: root.clone(),
            recursive,
            include_entry,
            users: agent.users.clone(),
        };
        w.add(PathBuf::new()).map_err(failed)?;
        Ok(w)
    }

    /// Watches `rel` (and, when recursive, every real directory below it).
    fn add(&mut self, rel: PathBuf) -> std::io::Result<()> {
        let wd = self.events.watches().add(self.root.join(&rel), mask())?;
        self.dirs.insert(wd, rel.clone());
        if self.recursive
            && let Ok(rd) = std::fs::read_dir(self.root.join(&rel))
        {
            for child in rd.flatten() {
                if child.file_type().is_ok_and(|t| t.is_dir()) {
                    // A subdirectory that vanished meanwhile is simply not watched.
                    let _ = self.add(rel.join(child.file_name()));
                }
            }
        }
        Ok(())
    }

    /// The next mapped event; `None` when the root is gone or the watch failed.
    async fn next(&mut self) -> Option<FilesystemEvent> {
        loop {
            let ev = self.events.next().await?.ok()?;
            if ev.mask.contains(EventMask::IGNORED) {
                let was_root = self
                    .dirs
                    .remove(&ev.wd)
                    .is_some_and(|r| r.as_os_str().is_empty());
                if was_root {
                    return None;
                }
                continue;
            }
            let (Some(dir), Some(name)) = (self.dirs.get(&ev.wd), ev.name) else {
                continue;
            };
            let rel = dir.join(&name);
            let ty = if ev.mask.intersects(EventMask::CREATE | EventMask::MOVED_TO) {
                EventType::Create
            } else if ev.mask.contains(EventMask::MODIFY) {
                EventType::Write
            } else if ev.mask.contains(EventMask::DELETE) {
                EventType::Remove
            } else if ev.mask.contains(EventMask::MOVED_FROM) {
                EventType::Rename
            } else if ev.mask.contains(EventMask::ATTRIB) {
                EventType::Chmod
            } else {
                continue;
            };
            if self.recursive && ty == EventType::Create && ev.mask.contains(EventMask::ISDIR) {
                let _ = self.add(rel.clone());
            }
            let entry = (self.include_entry
                && matches!(ty, EventType::Create | EventType::Write | EventType::Chmod))
            .then(|| crate::fs::entry_info(&self.root.join(&rel), &self.users.names()).ok())
            .flatten();
            return Some(FilesystemEvent {
                name: rel.to_string_lossy().into_owned(),
                r#type: ty as i32,
                entry,
            });
        }
    }
}

fn root_for(agent: &Agent, headers: &http::HeaderMap, path: &str) -> Result<PathBuf, ConnectError> {
    let user = agent.rpc_user(headers)?;
    Ok(agent.resolve(&user, path))
}

pub(crate) async fn watch_dir(agent: Arc<Agent>, req: Request<Incoming>) -> Response<Body> {
    let mut call = match Call::new(req, Kind::ServerStream) {
        Ok(c) => c,
        Err(r) => return *r,
    };
    let codec = call.codec;
    let keepalive = call.keepalive();
    let watch = async {
        let r: pb::WatchDirRequest = call.single_message().await?;
        let root = root_for(&agent, &call.headers, &r.path)?;
        Watch::new(
            &agent,
            root,
            r.recursive,
            r.include_entry,
            r.allow_network_mounts,
        )
    }
    .await;
    let watch = match watch {
        Ok(w) => w,
        Err(e) => return rpc::stream_error(codec, e),
    };
    let envelope = move |e: watch_dir_response::Event| {
        codec.envelope(&pb::WatchDirResponse { event: Some(e) })
    };
    let first = envelope(watch_dir_response::Event::Start(
        watch_dir_response::StartEvent {},
    ));
    let events = futures::stream::unfold(Some(watch), move |state| async move {
        let mut watch = state?;
        match tokio::time::timeout(keepalive, watch.next()).await {
            Err(_idle) => Some((
                envelope(watch_dir_response::Event::Keepalive(
                    watch_dir_response::KeepAlive {},
                )),
                Some(watch),
            )),
            Ok(Some(ev)) => Some((
                envelope(watch_dir_response::Event::Filesystem(ev)),
                Some(watch),
            )),
            Ok(None) => Some((EndStream::envelope(Ok(())), None)),
        }
    });
    rpc::stream_response(codec, futures::stream::iter([first]).chain(events))
}

/// Polling watchers by id.
#[derive(Default)]
pub(crate) struct Watchers {
    inner: Mutex<HashMap<String, Poller>>,
}

struct Poller {
    events: Arc<Mutex<Vec<FilesystemEvent>>>,
    task: tokio::task::JoinHandle<()>,
}

impl Drop for Poller {
    fn drop(&mut self) {
        self.task.abort();
    }
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}

fn not_found(id: &str) -> ConnectError {
    ConnectError::new(Code::NotFound, format!("watcher with id '{id}' not found"))
}

pub(crate) async fn polling(
    agent: Arc<Agent>,
    method: &str,
    req: Request<Incoming>,
) -> Response<Body> {
    match method {
        "CreateWatcher" => {
            rpc::handle_unary(req, |h, r: pb::CreateWatcherRequest| async move {
                let root = root_for(&agent, &h, &r.path)?;
                if lock(&agent.watchers.inner).len() >= MAX_WATCHERS {
                    return Err(ConnectError::new(
                        Code::ResourceExhausted,
                        format!("at most {MAX_WATCHERS} watchers; remove some first"),
                    ));
                }
                let mut watch = Watch::new(
                    &agent,
                    root,
                    r.recursive,
                    r.include_entry,
                    r.allow_network_mounts,
                )?;
                let events = Arc::new(Mutex::new(Vec::new()));
                let sink = events.clone();
                let task = tokio::spawn(async move {
                    while let Some(ev) = watch.next().await {
                        let mut pending = lock(&sink);
                        if pending.len() >= MAX_PENDING_EVENTS {
                            pending.remove(0);
                        }
                        pending.push(ev);
                    }
                });
                let id = watcher_id();
                lock(&agent.watchers.inner).insert(id.clone(), Poller { events, task });
                Ok(pb::CreateWatcherResponse { watcher_id: id })
            })
            .await
        }
        "GetWatcherEvents" => {
            rpc::handle_unary(req, |_, r: pb::GetWatcherEventsRequest| async move {
                let watchers = lock(&agent.watchers.inner);
                let w = watchers
                    .get(&r.watcher_id)
                    .ok_or_else(|| not_found(&r.watcher_id))?;
                let events = std::mem::take(&mut *lock(&w.events));
                Ok(pb::GetWatcherEventsResponse { events })
            })
            .await
        }
        _ => {
            rpc::handle_unary(req, |_, r: pb::RemoveWatcherRequest| async move {
                lock(&agent.watchers.inner)
                    .remove(&r.watcher_id)
                    .map(|_| pb::RemoveWatcherResponse {})
                    .ok_or_else(|| not_found(&r.watcher_id))
            })
            .await
        }
    }
}

/// Random, unguessable ids (another client's watcher cannot be drained by guessing).
fn watcher_id() -> String {
    use rand::Rng;
    let mut rng = rand::rng();
    (0..20)
        .map(|_| {
            let n = rng.random_range(0..36u8);
            char::from(if n < 10 { b'0' + n } else { b'a' + n - 10 })
        })
        .collect()
}
