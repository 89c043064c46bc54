//! Templates on the layer store: builds, the step cache, tags, resolution for sandbox create,
//! start and ready commands, deletion and layer garbage collection.
//!
//! A build runs each layer-making step (`RUN`, `COPY`, `WORKDIR`) in a build sandbox made by
//! the normal runtime with the layers so far as lowers; the sandbox's upper directory becomes
//! the step's layer ([`soulbox_templates::layers`]). Steps are cached by
//! sha256(parent key + concrete step), the concrete step including the environment, user and
//! working directory it runs with, so an unchanged rebuild is all cache hits and a change
//! rebuilds from the changed step on. A build registers nothing until its last step succeeds:
//! tags move to it atomically. Builds run one at a time; a server that dies mid-build marks the
//! build failed on restart, and its build sandboxes are reaped like any unknown sandbox.
//!
//! Deletion is deferred, never breaking sandboxes: deleting a template removes its name and
//! tags at once; a build that sandboxes still run on keeps its layers until garbage collection
//! finds no sandbox on it.
//!
//! What sandboxed code can do with this: a build step's code runs in a sandbox like any other
//! (same isolation; a network slot with the default egress policy, so it reaches the internet
//! but not the host, other sandboxes, metadata or private ranges); what it leaves in its upper
//! directory becomes a layer, handled as untrusted content (see the layer store). Start and
//! ready commands run inside the new sandbox as the template's user; a ready check that never
//! passes only makes that sandbox's create fail after [`READY_TIMEOUT`].

use std::collections::{BTreeMap, HashMap, HashSet};
use std::fmt::Write as _;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use bytes::Bytes;
use chrono::{DateTime, Utc};
use http_body_util::BodyExt;
use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};
use soulbox_runtime::{Limits, SandboxHandle, SandboxSpec};
use soulbox_store::{BuildRecord, BuildStatus, TemplateDef};
use soulbox_templates::copy::STAGING_DIR;
use soulbox_templates::dockerfile::{self, Base, Command, InstructionKind};
use soulbox_templates::layers::{LayerStore, is_digest};
use soulbox_wire::agent::InitRequest;
use tokio::io::AsyncWriteExt;
use tokio::sync::Semaphore;

use crate::template_exec::{self, Proc};
use crate::{CoreError, Manager, agent_client, new_sandbox_id};

/// Tag a name without `:tag` means.
pub const DEFAULT_TAG: &str = "default";
/// How long a sandbox's ready check may take before its create fails.
pub const READY_TIMEOUT: Duration = Duration::from_secs(120);
/// How long one build step may run.
const STEP_TIMEOUT: Duration = Duration::from_secs(3600);
/// Resources of build sandboxes (package installs need more than a default sandbox).
const BUILD_LIMITS: Limits = Limits {
    cpu_count: 2,
    memory_mb: 4096,
    pids_max: 8192,
    disk_mb: 0,
    open_files: 65536,
};
/// Log lines kept per build (the rest are counted, not kept) and bytes per line.
const MAX_LOG_LINES: usize = 50_000;
const MAX_LINE: usize = 8192;
/// Log lines of a failed step carried in the failure reason.
const REASON_TAIL: usize = 30;
/// Largest uploaded COPY archive.
const MAX_UPLOAD: u64 = 8 << 30;
const UPLOAD_TOKEN_TTL: Duration = Duration::from_secs(3600);
/// Defaults of a template whose parent sets none.
const DEFAULT_CPU: u32 = 2;
const DEFAULT_MEMORY_MB: u64 = 512;
const DEFAULT_DISK_MB: u64 = 10240;
const DEFAULT_PATH: &str = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin";
/// Files a build sandbox's own setup writes (the agent's init, the runtime's hostname):
/// never part of a layer, as in Docker, where they are mounts.
pub(crate) const SETUP_FILES: &[&str] = &[
    "run/e2b/.E2B_SANDBOX",
    "run/e2b/.E2B_SANDBOX_ID",
    "run/e2b/.E2B_TEMPLATE_ID",
    "etc/hosts",
    "etc/hostname",
    "etc/resolv.conf",
    BUILD_CA_DIR,
];
/// Where a `RUN` step finds the CA bundle of [`crate::ManagerConfig::build_ca_bundle`]: a
/// file in a read-only lower layer of its own, so never part of the step's layer.
const BUILD_CA_DIR: &str = ".soulbox-build";
const BUILD_CA_FILE: &str = "/.soulbox-build/ca-certificates.crt";
/// Variables that point TLS clients (OpenSSL, curl, pip/requests, Node.js/npm, git) at
/// [`BUILD_CA_FILE`] in `RUN` steps, unless the step's own environment sets them.
const BUILD_CA_ENV: &[&str] = &[
    "SSL_CERT_FILE",
    "CURL_CA_BUNDLE",
    "REQUESTS_CA_BUNDLE",
    "PIP_CERT",
    "NODE_EXTRA_CA_CERTS",
    "GIT_SSL_CAINFO",
];
/// Bumped when what a cached step produces changes meaning.
const CACHE_VERSION: &str = "soulbox-layer-cache-v1";

/// What a finished build is: stored as JSON in the build row.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct BuildConfig {
    /// Layer digests in the layer store (or absolute paths of rootfs directories registered
    /// directly), lowest first.
    pub layers: Vec<String>,
    pub env: BTreeMap<String, String>,
    pub user: String,
    pub workdir: String,
    pub start_cmd: Option<String>,
    pub ready_cmd: Option<String>,
    pub cpu_count: u32,
    pub memory_mb: u64,
    pub disk_mb: u64,
    /// Cache key of the final state; builds `FROM` this template chain off it.
    pub cache_key: String,
}

/// A template as sandbox create needs it.
#[derive(Debug, Clone)]
pub(crate) struct Resolved {
    /// The template id (E2B `templateID`).
    pub name: String,
    pub alias: Option<String>,
    pub build_id: Option<String>,
    pub layers: Vec<PathBuf>,
    pub config: BuildConfig,
}

/// One build log line.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BuildLogLine {
    pub timestamp: DateTime<Utc>,
    /// `debug`, `info`, `warn` or `error`.
    pub level: &'static str,
    pub message: String,
    /// The step it belongs to (E2B numbers steps from 1; `base` is the `FROM`).
    pub step: Option<String>,
}

/// A build's state as the status endpoint reports it.
#[derive(Debug, Clone)]
pub struct BuildView {
    pub template_id: String,
    pub build_id: String,
    pub status: BuildStatus,
    pub logs: Vec<BuildLogLine>,
    pub reason: Option<(String, Option<String>)>,
}

/// A template for listings.
#[derive(Debug, Clone)]
pub struct TemplateView {
    pub def: TemplateDef,
    /// The build the default tag points at (or the newest build).
    pub build: Option<BuildRecord>,
    pub config: Option<BuildConfig>,
    pub build_count: usize,
}

/// The source of a build.
#[derive(Debug, Clone)]
pub enum BuildSource {
    /// A Dockerfile; `files` maps each COPY/ADD line to the hash of its uploaded files.
    Dockerfile {
        text: String,
        files: BTreeMap<usize, String>,
    },
    /// E2B SDK steps after a base.
    Steps { from: Base, steps: Vec<SdkStep> },
}

/// One step as the E2B SDK sends it (`type`, `args`, `filesHash`, `force`).
#[derive(Debug, Clone, Default)]
pub struct SdkStep {
    pub kind: String,
    pub args: Vec<String>,
    pub files_hash: Option<String>,
    pub force: bool,
}

/// What to build.
#[derive(Debug, Clone)]
pub struct BuildSpec {
    pub source: BuildSource,
    pub start_cmd: Option<String>,
    pub ready_cmd: Option<String>,
    /// Rebuild every step (skip the cache).
    pub force: bool,
}

/// Template state kept by the manager.
pub(crate) struct State {
    pub(crate) layers: LayerStore,
    /// `$DATA/template-files`: uploaded COPY archives, `<hash>.tar.gz`.
    files: PathBuf,
    logs: Mutex<HashMap<String, Arc<BuildLog>>>,
    /// One build (or garbage collection) at a time.
    slot: Semaphore,
    upload_tokens: Mutex<HashMap<String, (String, Instant)>>,
    /// Tags a requested build gets when it is ready, until it starts.
    pending_tags: Mutex<HashMap<String, Vec<String>>>,
}

impl State {
    pub(crate) fn open(data_dir: &Path) -> Result<State, CoreError> {
        let layers = LayerStore::open(data_dir.join("layers")).map_err(internal)?;
        let files = data_dir.join("template-files");
        std::fs::create_dir_all(&files).map_err(internal)?;
        Ok(State {
            layers,
            files,
            logs: Mutex::new(HashMap::new()),
            slot: Semaphore::new(1),
            upload_tokens: Mutex::new(HashMap::new()),
            pending_tags: Mutex::new(HashMap::new()),
        })
    }
}

/// Log lines of one build; shared by the build task and status readers.
#[derive(Default)]
struct BuildLog {
    lines: Mutex<Vec<BuildLogLine>>,
    dropped: Mutex<usize>,
}

impl BuildLog {
    fn push(&self, level: &'static str, step: Option<&str>, message: impl Into<String>) {
        let mut message: String = message.into();
        if message.len() > MAX_LINE {
            let mut end = MAX_LINE;
            while !message.is_char_boundary(end) {
                end -= 1;
            }
            message.truncate(end);
        }
        let mut lines = lock(&self.lines);
        if lines.len() >= MAX_LOG_LINES {
            *lock(&self.dropped) += 1;
            return;
        }
        lines.push(BuildLogLine {
            timestamp: Utc::now(),
            level,
            message,
            step: step.map(str::to_owned),
        });
    }

    fn snapshot(&self, offset: usize, limit: usize) -> Vec<BuildLogLine> {
        let lines = lock(&self.lines);
        lines.iter().skip(offset).take(limit).cloned().collect()
    }

    fn tail_of(&self, step: &str, n: usize) -> Vec<BuildLogLine> {
        let lines = lock(&self.lines);
        let of_step: Vec<&BuildLogLine> = lines
            .iter()
            .filter(|l| l.step.as_deref() == Some(step))
            .collect();
        of_step[of_step.len().saturating_sub(n)..]
            .iter()
            .map(|l| (*l).clone())
            .collect()
    }
}

/// Splits output chunks into lines for the log.
struct LineSplitter<'a> {
    log: &'a BuildLog,
    step: String,
    partial: [Vec<u8>; 2],
}

impl LineSplitter<'_> {
    fn feed(&mut self, is_err: bool, data: &[u8]) {
        let buf = &mut self.partial[usize::from(is_err)];
        buf.extend_from_slice(data);
        while let Some(pos) = buf.iter().position(|&b| b == b'\n' || b == b'\r') {
            let line: Vec<u8> = buf.drain(..=pos).collect();
            let text = template_exec::text(&line[..line.len() - 1]);
            if !text.trim().is_empty() {
                self.log.push("info", Some(&self.step), text);
            }
        }
        if buf.len() > MAX_LINE {
            let text = template_exec::text(buf);
            buf.clear();
            self.log.push("info", Some(&self.step), text);
        }
    }

    fn finish(&mut self) {
        for buf in &mut self.partial {
            if !buf.is_empty() {
                let text = template_exec::text(buf);
                buf.clear();
                self.log.push("info", Some(&self.step), text);
            }
        }
    }
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    match m.lock() {
        Ok(g) => g,
        Err(poisoned) => poisoned.into_inner(),
    }
}

fn internal(e: impl std::fmt::Display) -> CoreError {
    CoreError::Internal(e.to_string())
}

pub(crate) fn sha256_hex(parts: &[&str]) -> String {
    let mut h = Sha256::new();
    for p in parts {
        h.update((p.len() as u64).to_le_bytes());
        h.update(p.as_bytes());
    }
    hex::encode(h.finalize())
}

/// Splits `name:tag` (the tag is after the last `:` unless that part contains a `/`).
pub fn split_name_tag(s: &str) -> (&str, Option<&str>) {
    match s.rsplit_once(':') {
        Some((name, tag)) if !tag.contains('/') && !name.is_empty() => (name, Some(tag)),
        _ => (s, None),
    }
}

/// Template names: 1–128 of `[a-z0-9._/-]`, starting with a letter or digit.
pub fn valid_template_name(name: &str) -> bool {
    (1..=128).contains(&name.len())
        && name
            .bytes()
            .next()
            .is_some_and(|b| b.is_ascii_lowercase() || b.is_ascii_digit())
        && name.bytes().all(|b| {
            b.is_ascii_lowercase() || b.is_ascii_digit() || matches!(b, b'.' | b'_' | b'-' | b'/')
        })
}

fn valid_tag(tag: &str) -> bool {
    (1..=128).contains(&tag.len())
        && tag
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'.' | b'_' | b'-'))
}

/// A step failure: the message, and the step it happened in.
struct StepError {
    message: String,
    step: Option<String>,
}

impl StepError {
    fn new(step: Option<&str>, message: impl Into<String>) -> StepError {
        StepError {
            message: message.into(),
            step: step.map(str::to_owned),
        }
    }
}

/// The build's evolving state.
struct Vars {
    layers: Vec<String>,
    env: BTreeMap<String, String>,
    args: BTreeMap<String, String>,
    user: String,
    workdir: String,
    key: String,
    labels: BTreeMap<String, String>,
    start_cmd: Option<String>,
    ready_cmd: Option<String>,
    cpu_count: Option<u32>,
    memory_mb: Option<u64>,
    disk_mb: Option<u64>,
}

/// One step with everything that decides its result (hashed into the cache key).
#[derive(Debug, Clone, Serialize)]
#[serde(tag = "kind", rename_all = "lowercase")]
enum Concrete {
    Run {
        argv: Vec<String>,
        user: String,
        workdir: String,
        env: BTreeMap<String, String>,
    },
    Copy {
        sources: Vec<String>,
        dest: String,
        chown: Option<String>,
        chmod: Option<String>,
        files: String,
    },
    Workdir {
        path: String,
    },
    Env {
        pairs: Vec<(String, String)>,
    },
    Arg {
        name: String,
        value: String,
    },
    User {
        user: String,
    },
    Label {
        pairs: Vec<(String, String)>,
    },
}

impl Concrete {
    fn makes_layer(&self) -> bool {
        matches!(
            self,
            Concrete::Run { .. } | Concrete::Copy { .. } | Concrete::Workdir { .. }
        )
    }

    fn describe(&self) -> String {
        match self {
            Concrete::Run { argv, user, .. } => {
                let cmd = if argv.len() == 3 && argv[0] == "/bin/sh" && argv[1] == "-c" {
                    argv[2].clone()
                } else {
                    Command::Exec(argv.clone()).to_shell()
                };
                format!("RUN {cmd} (as {user})")
            }
            Concrete::Copy { sources, dest, .. } => format!("COPY {} {dest}", sources.join(" ")),
            Concrete::Workdir { path } => format!("WORKDIR {path}"),
            Concrete::Env { pairs } => format!(
                "ENV {}",
                pairs
                    .iter()
                    .map(|(k, v)| format!("{k}={v}"))
                    .collect::<Vec<_>>()
                    .join(" ")
            ),
            Concrete::Arg { name, value } => format!("ARG {name}={value}"),
            Concrete::User { user } => format!("USER {user}"),
            Concrete::Label { pairs } => format!(
                "LABEL {}",
                pairs
                    .iter()
                    .map(|(k, v)| format!("{k}={v}"))
                    .collect::<Vec<_>>()
                    .join(" ")
            ),
        }
    }
}

/// Joins a (possibly relative) path onto the working directory.
fn join_path(workdir: &str, p: &str) -> String {
    let joined = if p.starts_with('/') {
        p.to_owned()
    } else {
        format!("{}/{p}", workdir.trim_end_matches('/'))
    };
    let trailing = joined.ends_with('/') && joined.len() > 1;
    let mut parts: Vec<&str> = Vec::new();
    for c in joined.split('/') {
        match c {
            "" | "." => {}
            ".." => {
                parts.pop();
            }
            c => parts.push(c),
        }
    }
    let mut out = format!("/{}", parts.join("/"));
    if trailing && out != "/" {
        out.push('/');
    }
    out
}

impl Manager {
    pub(crate) fn template_state(&self) -> Result<&State, CoreError> {
        self.inner.templates.as_ref().ok_or_else(|| {
            CoreError::InvalidArgument("this server has no template store (no data dir)".into())
        })
    }

    /// Resolves `key` (template id, name, or `name:tag`) to what a sandbox is made of.
    pub(crate) async fn resolve_template(&self, key: &str) -> Result<Resolved, CoreError> {
        let store = &self.inner.store;
        let (name, tag) = split_name_tag(key);
        for candidate in [Some((name, tag)), tag.map(|_| (key, None))]
            .into_iter()
            .flatten()
        {
            let (name, tag) = candidate;
            let Some(def) = store.find_template_def(name).await? else {
                continue;
            };
            let tag = tag.unwrap_or(DEFAULT_TAG);
            let build_id = store
                .tags_of(&def.id)
                .await?
                .into_iter()
                .find(|t| t.tag == tag)
                .map(|t| t.build_id)
                .ok_or_else(|| match soulbox_templates::shipped::shipped(&def.name) {
                    // Requested but never built (or its build failed).
                    Some(s) => CoreError::TemplateNotBuilt(s.name.to_owned()),
                    None => CoreError::TemplateNotFound(format!("{}:{tag}", def.name)),
                })?;
            let build = store
                .get_build(&build_id)
                .await?
                .ok_or_else(|| CoreError::TemplateNotFound(key.to_owned()))?;
            let config = build_config(&build)?;
            let layers = self.layer_paths(&config.layers)?;
            return Ok(Resolved {
                name: def.id.clone(),
                alias: Some(def.name.clone()),
                build_id: Some(build_id),
                layers,
                config,
            });
        }
        if let Some(t) = store.get_template(key).await? {
            let layers: Vec<String> = t
                .layers
                .iter()
                .map(|p| p.to_string_lossy().into_owned())
                .collect();
            let cache_key = sha256_hex(&[
                "registered rootfs",
                &layers.join("\n"),
                &t.created_at.timestamp_millis().to_string(),
            ]);
            return Ok(Resolved {
                name: t.name.clone(),
                alias: Some(t.name.clone()),
                build_id: None,
                layers: t.layers.clone(),
                config: BuildConfig {
                    layers,
                    env: BTreeMap::new(),
                    user: t.default_user,
                    workdir: t.default_workdir,
                    start_cmd: None,
                    ready_cmd: None,
                    cpu_count: t.cpu_count,
                    memory_mb: t.memory_mb,
                    disk_mb: t.disk_mb,
                    cache_key,
                },
            });
        }
        if let Some(s) = soulbox_templates::shipped::shipped(name) {
            return Err(CoreError::TemplateNotBuilt(s.name.to_owned()));
        }
        Err(CoreError::TemplateNotFound(key.to_owned()))
    }

    /// What an existing sandbox is made of: the build it was created on (kept while any
    /// sandbox row names it), or its template as registered by path.
    pub(crate) async fn resolve_sandbox_template(
        &self,
        rec: &soulbox_store::SandboxRecord,
    ) -> Result<Resolved, CoreError> {
        let store = &self.inner.store;
        let Some(build_id) = store.sandbox_build(&rec.id).await? else {
            return self.resolve_template(&rec.template_id).await;
        };
        let build = store
            .get_build(&build_id)
            .await?
            .ok_or_else(|| CoreError::TemplateNotFound(rec.template_id.clone()))?;
        let config = build_config(&build)?;
        let layers = self.layer_paths(&config.layers)?;
        Ok(Resolved {
            name: rec.template_id.clone(),
            alias: rec.alias.clone(),
            build_id: Some(build_id),
            layers,
            config,
        })
    }

    fn layer_paths(&self, layers: &[String]) -> Result<Vec<PathBuf>, CoreError> {
        layers
            .iter()
            .map(|l| {
                if l.starts_with('/') {
                    Ok(PathBuf::from(l))
                } else if is_digest(l) {
                    Ok(self.template_state()?.layers.path(l))
                } else {
                    Err(CoreError::Internal(format!("bad layer reference {l}")))
                }
            })
            .collect()
    }

    /// Runs the template's start command (detached) and waits for its ready check, in a
    /// sandbox just made and initialised.
    pub(crate) async fn start_template_processes(
        &self,
        handle: &SandboxHandle,
        t: &Resolved,
    ) -> Result<(), CoreError> {
        let c = &t.config;
        if let Some(start) = &c.start_cmd {
            let mut p = Proc::shell(start, &c.user);
            p.cwd = Some(c.workdir.clone());
            template_exec::spawn_detached(&handle.socket_path, &p)
                .await
                .map_err(|e| CoreError::InvalidArgument(format!("start command: {e}")))?;
        }
        let Some(ready) = &c.ready_cmd else {
            return Ok(());
        };
        let deadline = Instant::now() + READY_TIMEOUT;
        loop {
            let mut p = Proc::shell(ready, &c.user);
            p.cwd = Some(c.workdir.clone());
            let mut out = Vec::new();
            let code = template_exec::run(&handle.socket_path, &p, |_, b| {
                if out.len() < 4096 {
                    out.extend_from_slice(b);
                }
            })
            .await?;
            if code == 0 {
                return Ok(());
            }
            let last = format!("exit code {code}: {}", template_exec::text(&out).trim());
            if Instant::now() >= deadline {
                return Err(CoreError::Internal(format!(
                    "the template's ready check `{ready}` did not pass within {}s (last: {last})",
                    READY_TIMEOUT.as_secs()
                )));
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }

    /// `POST /v3/templates`: the template `name` (created if new) gets a new build in state
    /// `waiting`. Returns the template, the build id and the tags the build will get.
    pub async fn request_template_build(
        &self,
        name_tag: &str,
        extra_tags: &[String],
        cpu_count: Option<u32>,
        memory_mb: Option<u64>,
    ) -> Result<(TemplateDef, String, Vec<String>), CoreError> {
        self.template_state()?;
        let (name, tag) = split_name_tag(name_tag);
        if !valid_template_name(name) {
            return Err(CoreError::InvalidArgument(format!(
                "invalid template name '{name}': use 1-128 of a-z, 0-9, '.', '_', '-', '/'"
            )));
        }
        let mut tags: Vec<String> = tag.into_iter().map(str::to_owned).collect();
        tags.extend(extra_tags.iter().cloned());
        if tags.is_empty() {
            tags.push(DEFAULT_TAG.to_owned());
        }
        if let Some(bad) = tags.iter().find(|t| !valid_tag(t)) {
            return Err(CoreError::InvalidArgument(format!("invalid tag '{bad}'")));
        }
        tags.sort();
        tags.dedup();
        if matches!(cpu_count, Some(0)) || memory_mb.is_some_and(|m| m < 128) {
            return Err(CoreError::InvalidArgument(
                "cpuCount must be ≥ 1 and memoryMB ≥ 128".into(),
            ));
        }
        let store = &self.inner.store;
        let def = match store.find_template_def(name).await? {
            Some(def) if def.name == name => def,
            Some(_) => {
                return Err(CoreError::Conflict(format!(
                    "'{name}' is the id of another template"
                )));
            }
            None => {
                let def = TemplateDef {
                    id: new_sandbox_id(),
                    name: name.to_owned(),
                    cpu_count,
                    memory_mb,
                    created_at: Utc::now(),
                };
                if !store.insert_template_def(&def).await? {
                    return Err(CoreError::Conflict(format!(
                        "template '{name}' was just created by another request"
                    )));
                }
                def
            }
        };
        if cpu_count.is_some() || memory_mb.is_some() {
            store
                .set_template_resources(&def.id, cpu_count, memory_mb)
                .await?;
        }
        let running = store
            .builds_of(&def.id)
            .await?
            .into_iter()
            .any(|b| matches!(b.status, BuildStatus::Building));
        if running {
            return Err(CoreError::Conflict(format!(
                "a build of template '{name}' is already running"
            )));
        }
        let build_id = uuid::Uuid::new_v4().to_string();
        store
            .insert_build(&BuildRecord {
                id: build_id.clone(),
                template_id: def.id.clone(),
                status: BuildStatus::Waiting,
                config: None,
                reason: None,
                reason_step: None,
                created_at: Utc::now(),
                finished_at: None,
            })
            .await?;
        let def = store.find_template_def(&def.id).await?.unwrap_or(def);
        lock(&self.template_state()?.pending_tags).insert(build_id.clone(), tags.clone());
        Ok((def, build_id, tags))
    }

    /// `GET /templates/{id}/files/{hash}`: whether the files are already here, else a
    /// one-time upload token (valid an hour).
    pub fn template_file_link(&self, hash: &str) -> Result<(bool, Option<String>), CoreError> {
        let state = self.template_state()?;
        if !(1..=128).contains(&hash.len()) || !hash.bytes().all(|b| b.is_ascii_alphanumeric()) {
            return Err(CoreError::InvalidArgument(format!(
                "invalid files hash '{hash}'"
            )));
        }
        if state.files.join(format!("{hash}.tar.gz")).is_file() {
            return Ok((true, None));
        }
        let token = crate::new_access_token();
        let mut tokens = lock(&state.upload_tokens);
        tokens.retain(|_, (_, at)| at.elapsed() < UPLOAD_TOKEN_TTL);
        tokens.insert(token.clone(), (hash.to_owned(), Instant::now()));
        Ok((false, Some(token)))
    }

    /// Stores the body of an upload (`PUT` to the link's URL).
    pub async fn save_template_file<B>(&self, token: &str, mut body: B) -> Result<(), CoreError>
    where
        B: hyper::body::Body<Data = Bytes> + Unpin,
        B::Error: std::fmt::Display,
    {
        let state = self.template_state()?;
        let hash = {
            let mut tokens = lock(&state.upload_tokens);
            match tokens.remove(token) {
                Some((hash, at)) if at.elapsed() < UPLOAD_TOKEN_TTL => hash,
                _ => {
                    return Err(CoreError::NotFound(
                        "upload link (unknown or expired)".into(),
                    ));
                }
            }
        };
        let partial = state.files.join(format!(".part-{token}"));
        let result = async {
            let mut file = tokio::fs::File::create(&partial).await.map_err(internal)?;
            let mut total = 0u64;
            while let Some(frame) = body.frame().await {
                let frame = frame
                    .map_err(|e| CoreError::InvalidArgument(format!("reading the upload: {e}")))?;
                if let Ok(data) = frame.into_data() {
                    total += data.len() as u64;
                    if total > MAX_UPLOAD {
                        return Err(CoreError::InvalidArgument(format!(
                            "upload larger than {MAX_UPLOAD} bytes"
                        )));
                    }
                    file.write_all(&data).await.map_err(internal)?;
                }
            }
            file.sync_all().await.map_err(internal)?;
            tokio::fs::rename(&partial, state.files.join(format!("{hash}.tar.gz")))
                .await
                .map_err(internal)
        }
        .await;
        if result.is_err() {
            let _ = tokio::fs::remove_file(&partial).await;
        }
        result
    }

    /// Starts a requested build (in the background); see [`Manager::request_template_build`].
    pub async fn start_template_build(
        &self,
        template_id: &str,
        build_id: &str,
        spec: BuildSpec,
    ) -> Result<(), CoreError> {
        let tags = lock(&self.template_state()?.pending_tags)
            .get(build_id)
            .cloned()
            .unwrap_or_else(|| vec![DEFAULT_TAG.to_owned()]);
        let store = &self.inner.store;
        let def = store
            .find_template_def(template_id)
            .await?
            .filter(|d| d.id == template_id)
            .ok_or_else(|| CoreError::TemplateNotFound(template_id.to_owned()))?;
        let build = store
            .get_build(build_id)
            .await?
            .filter(|b| b.template_id == def.id)
            .ok_or_else(|| CoreError::NotFound(format!("build {build_id}")))?;
        if build.status != BuildStatus::Waiting {
            return Err(CoreError::Conflict(format!(
                "build {build_id} was already started"
            )));
        }
        if let Some(shipped) = soulbox_templates::shipped::shipped(&def.name) {
            let own = matches!(&spec.source, BuildSource::Dockerfile { text, .. } if text == shipped.dockerfile);
            if !own {
                return Err(CoreError::Conflict(format!(
                    "the name '{}' is reserved for the template shipped with SoulBox; \
                     build it with `soulbox template build {}` or pick another name",
                    def.name, def.name
                )));
            }
        }
        let log = Arc::new(BuildLog::default());
        {
            let state = self.template_state()?;
            let mut logs = lock(&state.logs);
            logs.insert(build_id.to_owned(), log.clone());
        }
        lock(&self.template_state()?.pending_tags).remove(build_id);
        let mut running = build.clone();
        running.status = BuildStatus::Building;
        store.finish_build(&running, &[]).await?;
        let this = self.clone();
        tokio::spawn(async move { this.run_build(def, running, spec, tags, log).await });
        Ok(())
    }

    async fn run_build(
        self,
        def: TemplateDef,
        mut build: BuildRecord,
        spec: BuildSpec,
        tags: Vec<String>,
        log: Arc<BuildLog>,
    ) {
        let Ok(state) = self.template_state() else {
            return;
        };
        log.push(
            "info",
            None,
            format!("Waiting for the build slot ({})", def.name),
        );
        let permit = state.slot.acquire().await;
        let started = Instant::now();
        log.push(
            "info",
            None,
            format!("Building template {} (build {})", def.name, build.id),
        );
        let result = self.execute(&def, &spec, &log).await;
        drop(permit);
        build.finished_at = Some(Utc::now());
        match result {
            Ok(config) => {
                build.status = BuildStatus::Ready;
                build.config = serde_json::to_string(&config).ok();
                log.push(
                    "info",
                    None,
                    format!(
                        "Build finished in {:.1}s: {} layer(s)",
                        started.elapsed().as_secs_f64(),
                        config.layers.len()
                    ),
                );
            }
            Err(e) => {
                let mut message = e.message.clone();
                if let Some(step) = &e.step {
                    let tail = log.tail_of(step, REASON_TAIL);
                    if !tail.is_empty() {
                        message.push_str("\nlast output:");
                        for l in tail {
                            let _ = write!(message, "\n{}", l.message);
                        }
                    }
                }
                log.push(
                    "error",
                    e.step.as_deref(),
                    format!("Build failed: {}", e.message),
                );
                build.status = BuildStatus::Error;
                build.reason = Some(message);
                build.reason_step = e.step;
            }
        }
        let tags = if build.status == BuildStatus::Ready {
            tags
        } else {
            Vec::new()
        };
        if let Err(e) = self.inner.store.finish_build(&build, &tags).await {
            tracing::error!(build = %build.id, error = %e, "recording a finished build");
        }
    }

    /// The steps, for real, with the build CA bundle staged for their duration.
    async fn execute(
        &self,
        def: &TemplateDef,
        spec: &BuildSpec,
        log: &BuildLog,
    ) -> Result<BuildConfig, StepError> {
        if self.network().is_none() {
            log.push(
                "warn",
                None,
                "this server runs without networking (serve --no-network): RUN steps have no \
                 internet access",
            );
        }
        let ca = self.stage_build_ca(log).await;
        let result = self.execute_steps(def, spec, log, ca.as_deref()).await;
        if let Some(dir) = ca {
            let _ =
                tokio::task::spawn_blocking(move || soulbox_templates::layers::remove_tree(&dir))
                    .await;
        }
        result
    }

    /// A lower layer holding a copy of the host's CA bundle at [`BUILD_CA_FILE`], when the
    /// server is configured with one (a missing or unreadable bundle is logged and skipped).
    async fn stage_build_ca(&self, log: &BuildLog) -> Option<PathBuf> {
        let bundle = self.inner.cfg.build_ca_bundle.clone()?;
        let state = self.template_state().ok()?;
        let dir = match state.layers.temp_dir() {
            Ok(d) => d,
            Err(e) => {
                log.push("warn", None, format!("staging the build CA bundle: {e}"));
                return None;
            }
        };
        let staged = tokio::task::spawn_blocking({
            let dir = dir.clone();
            move || -> std::io::Result<()> {
                let target = dir.join(BUILD_CA_FILE.trim_start_matches('/'));
                if let Some(parent) = target.parent() {
                    std::fs::create_dir_all(parent)?;
                }
                std::fs::copy(&bundle, &target)?;
                Ok(())
            }
        })
        .await;
        match staged {
            Ok(Ok(())) => Some(dir),
            Ok(Err(e)) => {
                log.push(
                    "warn",
                    None,
                    format!("build steps get no CA bundle from the host: {e}"),
                );
                let _ = tokio::task::spawn_blocking(move || {
                    soulbox_templates::layers::remove_tree(&dir)
                })
                .await;
                None
            }
            Err(e) => {
                log.push("warn", None, format!("staging the build CA bundle: {e}"));
                None
            }
        }
    }

    async fn execute_steps(
        &self,
        def: &TemplateDef,
        spec: &BuildSpec,
        log: &BuildLog,
        ca: Option<&Path>,
    ) -> Result<BuildConfig, StepError> {
        let (base, items) = match &spec.source {
            BuildSource::Dockerfile { text, files } => {
                let df =
                    dockerfile::parse(text).map_err(|e| StepError::new(None, e.to_string()))?;
                let items: Vec<Item> = df
                    .instructions
                    .into_iter()
                    .map(|i| Item::Docker(i, files.clone()))
                    .collect();
                let start = spec.start_cmd.clone().or(df.start_cmd);
                (df.base, (items, start))
            }
            BuildSource::Steps { from, steps } => (
                from.clone(),
                (
                    steps.iter().cloned().map(Item::Sdk).collect(),
                    spec.start_cmd.clone(),
                ),
            ),
        };
        let (items, start_cmd) = items;
        let mut v = self.start_from(&base, log).await?;
        if start_cmd.is_some() {
            v.start_cmd = start_cmd;
            v.ready_cmd = None;
        }
        if spec.ready_cmd.is_some() {
            v.ready_cmd = spec.ready_cmd.clone();
        }
        let total = items.len();
        let mut forced = spec.force;
        for (i, item) in items.into_iter().enumerate() {
            let step = (i + 1).to_string();
            let (concrete, force) = item
                .concretize(&v)
                .map_err(|m| StepError::new(Some(&step), m))?;
            forced |= force;
            v.key = sha256_hex(&[
                &v.key,
                &serde_json::to_string(&concrete).unwrap_or_default(),
            ]);
            log.push(
                "info",
                Some(&step),
                format!("[{}/{total}] {}", i + 1, concrete.describe()),
            );
            self.apply(&mut v, concrete, &step, forced, log, ca).await?;
        }
        if let Some(ready) = v.labels.get("soulbox.ready-cmd")
            && spec.ready_cmd.is_none()
        {
            v.ready_cmd = Some(ready.clone());
        }
        let label_num = |k: &str| v.labels.get(k).and_then(|s| s.parse::<u64>().ok());
        let config = BuildConfig {
            cpu_count: def
                .cpu_count
                .or(label_num("soulbox.cpu").and_then(|n| u32::try_from(n).ok()))
                .or(v.cpu_count)
                .unwrap_or(DEFAULT_CPU),
            memory_mb: def
                .memory_mb
                .or(label_num("soulbox.memory-mb"))
                .or(v.memory_mb)
                .unwrap_or(DEFAULT_MEMORY_MB),
            disk_mb: label_num("soulbox.disk-mb")
                .or(v.disk_mb)
                .unwrap_or(DEFAULT_DISK_MB),
            layers: v.layers,
            env: v.env,
            user: v.user,
            workdir: v.workdir,
            start_cmd: v.start_cmd,
            ready_cmd: v.ready_cmd,
            cache_key: v.key,
        };
        if config.start_cmd.is_some() || config.ready_cmd.is_some() {
            self.check_start(&config, log).await?;
        }
        Ok(config)
    }

    /// Makes a sandbox of the finished build as a create would (its resources, environment,
    /// user, start command and ready check), then destroys it: a template whose sandboxes
    /// could never become ready fails its build instead of every create.
    async fn check_start(&self, config: &BuildConfig, log: &BuildLog) -> Result<(), StepError> {
        const STEP: &str = "start";
        let fail = |m: String| StepError::new(Some(STEP), m);
        log.push(
            "info",
            Some(STEP),
            "Checking the start command and ready check in a sandbox of the new template",
        );
        let template = Resolved {
            name: "build".into(),
            alias: None,
            build_id: None,
            layers: self
                .layer_paths(&config.layers)
                .map_err(|e| fail(e.to_string()))?,
            config: config.clone(),
        };
        let spec = SandboxSpec {
            id: new_sandbox_id(),
            layers: template.layers.clone(),
            limits: Limits {
                cpu_count: config.cpu_count,
                memory_mb: config.memory_mb,
                disk_mb: config.disk_mb,
                ..Limits::default()
            },
            volumes: Vec::new(),
        };
        let started = Instant::now();
        let handle = self.create_build_sandbox(&spec).await.map_err(fail)?;
        let outcome = async {
            let init = InitRequest {
                sandbox_id: spec.id.clone(),
                template_id: template.name.clone(),
                env_vars: config.env.clone().into_iter().collect(),
                default_user: Some(config.user.clone()),
                default_workdir: Some(config.workdir.clone()),
                resolv_conf: None,
            };
            agent_client::init(&handle.socket_path, &init, self.inner.cfg.agent_timeout)
                .await
                .map_err(|e| fail(format!("sandbox agent: {e}")))?;
            self.start_template_processes(&handle, &template)
                .await
                .map_err(|e| fail(format!("a sandbox of the new template does not start: {e}")))
        }
        .await;
        self.destroy_build_sandbox(&spec.id, &handle).await;
        if outcome.is_ok() {
            log.push(
                "info",
                Some(STEP),
                format!("ready after {:.1}s", started.elapsed().as_secs_f64()),
            );
        }
        outcome
    }

    /// A sandbox for a build step or check, in a network slot with the default egress policy:
    /// the internet, not the host, other sandboxes, metadata or private ranges
    /// (docs/networking.md), so `RUN` can fetch packages. A failure leaves nothing behind.
    async fn create_build_sandbox(&self, spec: &SandboxSpec) -> Result<SandboxHandle, String> {
        let attach = self
            .attach_network(&spec.id, &soulbox_net::EgressConfig::default())
            .await
            .map_err(|e| format!("build sandbox network: {e}"))?;
        match self.inner.runtime.create_with_network(spec, attach).await {
            Ok(h) => Ok(h),
            Err(e) => {
                self.release_network(&spec.id).await;
                Err(format!("build sandbox: {e}"))
            }
        }
    }

    /// Destroys a sandbox of [`Manager::create_build_sandbox`] and releases its slot.
    async fn destroy_build_sandbox(&self, id: &str, handle: &SandboxHandle) {
        if let Err(e) = self.inner.runtime.destroy(handle).await {
            tracing::error!(%id, error = %e, "destroying a build sandbox");
        }
        self.release_network(id).await;
    }

    async fn start_from(&self, base: &Base, log: &BuildLog) -> Result<Vars, StepError> {
        let step = Some("base");
        let fresh = |key: String, layers: Vec<String>| Vars {
            layers,
            env: BTreeMap::from([("PATH".to_owned(), DEFAULT_PATH.to_owned())]),
            args: BTreeMap::new(),
            user: "root".into(),
            workdir: "/".into(),
            key,
            labels: BTreeMap::new(),
            start_cmd: None,
            ready_cmd: None,
            cpu_count: None,
            memory_mb: None,
            disk_mb: None,
        };
        match base {
            Base::Scratch => {
                log.push("info", step, "FROM scratch");
                Ok(fresh(sha256_hex(&[CACHE_VERSION, "scratch"]), Vec::new()))
            }
            Base::Debian(suite) => {
                log.push("info", step, format!("FROM debian:{suite}"));
                let key = sha256_hex(&[CACHE_VERSION, "debian", suite, "minbase"]);
                let layer = self
                    .cached_or(&key, false, log, step, async {
                        self.bootstrap(suite, log).await
                    })
                    .await?;
                Ok(fresh(key, layer.into_iter().collect()))
            }
            Base::Template(name) => {
                log.push("info", step, format!("FROM {name}"));
                let parent = self.resolve_template(name).await.map_err(|e| {
                    let hint = match e {
                        CoreError::TemplateNotFound(_) => format!(
                            "no template '{name}', and images from registries cannot be \
                             pulled here (FROM accepts debian:bookworm, debian:trixie, \
                             scratch, or a SoulBox template)"
                        ),
                        other => other.to_string(),
                    };
                    StepError::new(step, hint)
                })?;
                let c = parent.config;
                Ok(Vars {
                    layers: c.layers,
                    env: c.env,
                    args: BTreeMap::new(),
                    user: c.user,
                    workdir: c.workdir,
                    key: c.cache_key,
                    labels: BTreeMap::new(),
                    start_cmd: c.start_cmd,
                    ready_cmd: c.ready_cmd,
                    cpu_count: Some(c.cpu_count),
                    memory_mb: Some(c.memory_mb),
                    disk_mb: Some(c.disk_mb),
                })
            }
        }
    }

    /// The cached layer of `key`, else the result of `make` (then cached).
    async fn cached_or(
        &self,
        key: &str,
        force: bool,
        log: &BuildLog,
        step: Option<&str>,
        make: impl Future<Output = Result<Option<String>, StepError>>,
    ) -> Result<Option<String>, StepError> {
        let store = &self.inner.store;
        if !force
            && let Some(cached) = store
                .cached_layer(key)
                .await
                .map_err(|e| StepError::new(step, e.to_string()))?
        {
            let usable = match &cached {
                Some(l) => self.template_state().is_ok_and(|s| s.layers.exists(l)),
                None => true,
            };
            if usable {
                log.push("info", step, "CACHED");
                return Ok(cached);
            }
        }
        let layer = make.await?;
        store
            .cache_layer(key, layer.as_deref())
            .await
            .map_err(|e| StepError::new(step, e.to_string()))?;
        Ok(layer)
    }

    async fn bootstrap(&self, suite: &str, log: &BuildLog) -> Result<Option<String>, StepError> {
        let step = Some("base");
        let fail = |e: &dyn std::fmt::Display| StepError::new(step, e.to_string());
        let state = self.template_state().map_err(|e| fail(&e))?;
        let dir = state.layers.temp_dir().map_err(|e| fail(&e))?;
        log.push(
            "info",
            step,
            format!("Bootstrapping Debian {suite} from Debian's archive (mmdebstrap)"),
        );
        // mmdebstrap reports to a progress bar; its messages become log lines.
        let bar = indicatif::ProgressBar::hidden();
        let result = {
            let run = soulbox_templates::bootstrap_debian(suite, &dir, &bar);
            tokio::pin!(run);
            let mut tick = tokio::time::interval(Duration::from_secs(2));
            let mut last = String::new();
            loop {
                tokio::select! {
                    r = &mut run => break r,
                    _ = tick.tick() => {
                        let msg = bar.message();
                        if !msg.is_empty() && msg != last {
                            log.push("info", step, format!("mmdebstrap: {msg}"));
                            last = msg;
                        }
                    }
                }
            }
        };
        result.map_err(|e| fail(&e))?;
        let layers = state.layers.clone();
        let layer = tokio::task::spawn_blocking(move || layers.ingest(&dir, 0, &[]))
            .await
            .map_err(|e| fail(&e))?
            .map_err(|e| fail(&e))?;
        Ok(layer.map(|l| l.digest))
    }

    async fn apply(
        &self,
        v: &mut Vars,
        c: Concrete,
        step: &str,
        force: bool,
        log: &BuildLog,
        ca: Option<&Path>,
    ) -> Result<(), StepError> {
        if !c.makes_layer() {
            match c {
                Concrete::Env { pairs } => v.env.extend(pairs),
                Concrete::Arg { name, value } => {
                    v.args.insert(name, value);
                }
                Concrete::User { user } => v.user = user,
                Concrete::Label { pairs } => v.labels.extend(pairs),
                Concrete::Run { .. } | Concrete::Copy { .. } | Concrete::Workdir { .. } => {}
            }
            return Ok(());
        }
        let key = v.key.clone();
        let layers = v.layers.clone();
        let layer = self
            .cached_or(&key, force, log, Some(step), async {
                self.run_step(&layers, &c, step, log, ca).await
            })
            .await?;
        if let Concrete::Workdir { path } = &c {
            v.workdir = path.trim_end_matches('/').to_owned();
            if v.workdir.is_empty() {
                v.workdir = "/".into();
            }
        }
        v.layers.extend(layer);
        Ok(())
    }

    /// Runs one layer-making step in a build sandbox; returns the new layer (if any). `ca`
    /// is the staged CA bundle layer that `RUN` steps get on top.
    async fn run_step(
        &self,
        layers: &[String],
        c: &Concrete,
        step: &str,
        log: &BuildLog,
        ca: Option<&Path>,
    ) -> Result<Option<String>, StepError> {
        let fail = |m: String| StepError::new(Some(step), m);
        let state = self.template_state().map_err(|e| fail(e.to_string()))?;
        let mut paths = self.layer_paths(layers).map_err(|e| fail(e.to_string()))?;
        let mut staging = None;
        let procs = match c {
            Concrete::Run {
                argv,
                user,
                workdir,
                env,
            } => {
                let (cmd, args) = argv.split_first().ok_or_else(|| fail("empty RUN".into()))?;
                let mkdir = Proc {
                    cmd: "/bin/mkdir".into(),
                    args: vec!["-p".into(), workdir.clone()],
                    envs: HashMap::new(),
                    cwd: Some("/".into()),
                    user: "root".into(),
                };
                let mut envs: HashMap<String, String> = env.clone().into_iter().collect();
                if let Some(dir) = ca {
                    paths.push(dir.to_owned());
                    for var in BUILD_CA_ENV {
                        envs.entry((*var).to_owned())
                            .or_insert_with(|| BUILD_CA_FILE.to_owned());
                    }
                }
                let run = Proc {
                    cmd: cmd.clone(),
                    args: args.to_vec(),
                    envs,
                    cwd: Some(workdir.clone()),
                    user: user.clone(),
                };
                vec![mkdir, run]
            }
            Concrete::Workdir { path } => vec![Proc {
                cmd: "/bin/mkdir".into(),
                args: vec!["-p".into(), path.clone()],
                envs: HashMap::new(),
                cwd: Some("/".into()),
                user: "root".into(),
            }],
            Concrete::Copy {
                sources,
                dest,
                chown,
                chmod,
                files,
            } => {
                let archive = state.files.join(format!("{files}.tar.gz"));
                if !archive.is_file() {
                    return Err(fail(format!(
                        "the files of COPY {} were not uploaded (hash {files})",
                        sources.join(" ")
                    )));
                }
                let dir = state.layers.temp_dir().map_err(|e| fail(e.to_string()))?;
                let staged = dir.join(STAGING_DIR.trim_start_matches('/'));
                let unpacked = tokio::task::spawn_blocking({
                    let staged = staged.clone();
                    move || {
                        std::fs::create_dir_all(&staged)
                            .map_err(|e| e.to_string())
                            .and_then(|()| {
                                soulbox_templates::copy::unpack(&archive, &staged)
                                    .map_err(|e| e.to_string())
                            })
                    }
                })
                .await
                .map_err(|e| fail(e.to_string()))?;
                if let Err(e) = unpacked {
                    let _ = soulbox_templates::layers::remove_tree(&dir);
                    return Err(fail(e));
                }
                paths.push(dir.clone());
                staging = Some(dir);
                let mut args = vec![
                    "template".into(),
                    "copy-in".into(),
                    "--staged".into(),
                    STAGING_DIR.into(),
                    "--dest".into(),
                    dest.clone(),
                ];
                if let Some(o) = chown {
                    args.extend(["--chown".into(), o.clone()]);
                }
                if let Some(m) = chmod {
                    args.extend(["--chmod".into(), m.clone()]);
                }
                args.push("--".into());
                args.extend(sources.iter().cloned());
                vec![Proc {
                    cmd: "/.soulbox/bin/soulbox".into(),
                    args,
                    envs: HashMap::new(),
                    cwd: Some("/".into()),
                    user: "root".into(),
                }]
            }
            _ => return Ok(None),
        };
        if paths.is_empty() {
            return Err(fail(
                "FROM scratch has no files to run a build step in: a build sandbox needs a \
                 C library and /bin/sh; start FROM debian:bookworm or a template"
                    .into(),
            ));
        }
        let result = self.in_build_sandbox(&paths, &procs, step, log).await;
        if let Some(dir) = staging {
            let _ =
                tokio::task::spawn_blocking(move || soulbox_templates::layers::remove_tree(&dir))
                    .await;
        }
        result
    }

    async fn in_build_sandbox(
        &self,
        layers: &[PathBuf],
        procs: &[Proc],
        step: &str,
        log: &BuildLog,
    ) -> Result<Option<String>, StepError> {
        let fail = |m: String| StepError::new(Some(step), m);
        let runtime = &self.inner.runtime;
        let spec = SandboxSpec {
            id: new_sandbox_id(),
            layers: layers.to_vec(),
            limits: BUILD_LIMITS,
            volumes: Vec::new(),
        };
        let handle = self.create_build_sandbox(&spec).await.map_err(fail)?;
        let outcome = async {
            let init = InitRequest {
                sandbox_id: spec.id.clone(),
                template_id: "build".into(),
                env_vars: HashMap::new(),
                default_user: Some("root".into()),
                default_workdir: Some("/".into()),
                resolv_conf: None,
            };
            agent_client::init(&handle.socket_path, &init, self.inner.cfg.agent_timeout)
                .await
                .map_err(|e| fail(format!("build sandbox agent: {e}")))?;
            for p in procs {
                let mut lines = LineSplitter {
                    log,
                    step: step.to_owned(),
                    partial: [Vec::new(), Vec::new()],
                };
                let run =
                    template_exec::run(&handle.socket_path, p, |is_err, b| lines.feed(is_err, b));
                let code = tokio::time::timeout(STEP_TIMEOUT, run)
                    .await
                    .map_err(|_| fail(format!("timed out after {}s", STEP_TIMEOUT.as_secs())))?
                    .map_err(|e| fail(format!("{e}")))?;
                lines.finish();
                if code != 0 {
                    return Err(fail(format!(
                        "step {step} failed: `{}` exited with code {code}",
                        Command::Exec(
                            std::iter::once(p.cmd.clone())
                                .chain(p.args.iter().cloned())
                                .collect()
                        )
                        .to_shell()
                    )));
                }
            }
            // Its processes end and its files are synced; the upper directory is then
            // quiescent.
            runtime
                .stop(&handle)
                .await
                .map_err(|e| fail(e.to_string()))?;
            let upper = upper_dir(&handle).map_err(|e| fail(e.to_string()))?;
            let store = self
                .template_state()
                .map_err(|e| fail(e.to_string()))?
                .layers
                .clone();
            let uid_base = handle.uid_base;
            let layer =
                tokio::task::spawn_blocking(move || store.ingest(&upper, uid_base, SETUP_FILES))
                    .await
                    .map_err(|e| fail(e.to_string()))?
                    .map_err(|e| fail(e.to_string()))?;
            if let Some(l) = &layer {
                log.push(
                    "info",
                    Some(step),
                    format!(
                        "layer {} ({:.1} MiB)",
                        &l.digest[..12],
                        l.disk_bytes as f64 / 1048576.0
                    ),
                );
            }
            Ok(layer.map(|l| l.digest))
        }
        .await;
        self.destroy_build_sandbox(&spec.id, &handle).await;
        outcome
    }

    /// A build's status, with log lines from `offset` (at most `limit`).
    pub async fn template_build_status(
        &self,
        template_id: &str,
        build_id: &str,
        offset: usize,
        limit: usize,
    ) -> Result<BuildView, CoreError> {
        let state = self.template_state()?;
        let build = self
            .inner
            .store
            .get_build(build_id)
            .await?
            .filter(|b| b.template_id == template_id)
            .ok_or_else(|| CoreError::NotFound(format!("build {build_id}")))?;
        let log = lock(&state.logs).get(build_id).cloned();
        let logs = log.map(|l| l.snapshot(offset, limit)).unwrap_or_default();
        let reason = build.reason.clone().map(|r| (r, build.reason_step.clone()));
        Ok(BuildView {
            template_id: build.template_id,
            build_id: build.id,
            status: build.status,
            logs,
            reason,
        })
    }

    /// Every template built on the layer store.
    pub async fn list_templates(&self) -> Result<Vec<TemplateView>, CoreError> {
        let store = &self.inner.store;
        let mut out = Vec::new();
        for def in store.list_template_defs().await? {
            let builds = store.builds_of(&def.id).await?;
            let tags = store.tags_of(&def.id).await?;
            let current = tags
                .iter()
                .find(|t| t.tag == DEFAULT_TAG)
                .or(tags.first())
                .and_then(|t| builds.iter().find(|b| b.id == t.build_id))
                .or(builds.first())
                .cloned();
            let config = current.as_ref().and_then(|b| build_config(b).ok());
            out.push(TemplateView {
                build_count: builds.len(),
                def,
                build: current,
                config,
            });
        }
        Ok(out)
    }

    /// The template whose id or name is `key` (a `:tag` is ignored).
    pub async fn find_template(&self, key: &str) -> Result<TemplateDef, CoreError> {
        let (name, _) = split_name_tag(key);
        for k in [key, name] {
            if let Some(d) = self.inner.store.find_template_def(k).await? {
                return Ok(d);
            }
        }
        Err(CoreError::TemplateNotFound(key.to_owned()))
    }

    /// Tags of a template.
    pub async fn template_tags(
        &self,
        key: &str,
    ) -> Result<Vec<soulbox_store::TagRecord>, CoreError> {
        let def = self.find_template(key).await?;
        Ok(self.inner.store.tags_of(&def.id).await?)
    }

    /// Points `tags` at the build `target` (`name:tag`) names; returns the build id.
    pub async fn assign_template_tags(
        &self,
        target: &str,
        tags: &[String],
    ) -> Result<String, CoreError> {
        let (name, tag) = split_name_tag(target);
        let def = self.find_template(name).await?;
        let tag = tag.unwrap_or(DEFAULT_TAG);
        let build_id = self
            .inner
            .store
            .tags_of(&def.id)
            .await?
            .into_iter()
            .find(|t| t.tag == tag)
            .map(|t| t.build_id)
            .ok_or_else(|| CoreError::TemplateNotFound(format!("{name}:{tag}")))?;
        if let Some(bad) = tags.iter().find(|t| !valid_tag(t)) {
            return Err(CoreError::InvalidArgument(format!("invalid tag '{bad}'")));
        }
        for t in tags {
            self.inner.store.set_tag(&def.id, t, &build_id).await?;
        }
        Ok(build_id)
    }

    /// Removes tags from a template (the builds stay until garbage collection).
    pub async fn remove_template_tags(&self, name: &str, tags: &[String]) -> Result<(), CoreError> {
        let def = self.find_template(name).await?;
        for t in tags {
            if !self.inner.store.delete_tag(&def.id, t).await? {
                return Err(CoreError::NotFound(format!("tag '{t}' of {}", def.name)));
            }
        }
        self.collect_garbage().await?;
        Ok(())
    }

    /// Deletes a template: its name and tags at once; its layers once no sandbox runs on
    /// them. Returns the ids of sandboxes that still use it.
    pub async fn delete_template(&self, key: &str) -> Result<Vec<String>, CoreError> {
        let def = self.find_template(key).await?;
        let in_use = self.inner.store.sandboxes_on_template(&def.id).await?;
        self.inner.store.delete_template_def(&def.id).await?;
        self.collect_garbage().await?;
        Ok(in_use)
    }

    /// Removes builds no tag or sandbox needs, then layers no remaining build needs, and the
    /// cache entries naming them. Returns (layers removed, bytes freed).
    pub async fn collect_garbage(&self) -> Result<(usize, u64), CoreError> {
        let state = self.template_state()?;
        let _slot = state.slot.acquire().await.map_err(internal)?;
        let store = &self.inner.store;
        let tagged: HashSet<String> = store.tagged_builds().await?.into_iter().collect();
        let mut in_use: HashSet<String> = store.builds_in_use().await?.into_iter().collect();
        // Pool members run on builds no sandbox row names yet.
        in_use.extend(self.inner.pools.builds());
        let mut keep = HashSet::new();
        for b in store.all_builds().await? {
            if b.status != BuildStatus::Ready {
                continue;
            }
            if tagged.contains(&b.id) || in_use.contains(&b.id) {
                if let Ok(c) = build_config(&b) {
                    keep.extend(c.layers.into_iter().filter(|l| is_digest(l)));
                }
            } else {
                store.delete_build(&b.id).await?;
            }
        }
        let layers = state.layers.clone();
        let keep_list: Vec<String> = keep.iter().cloned().collect();
        let (removed, freed) = tokio::task::spawn_blocking(move || layers.gc(&keep))
            .await
            .map_err(internal)?
            .map_err(internal)?;
        store.prune_layer_cache(&keep_list).await?;
        if removed > 0 {
            tracing::info!(
                layers = removed,
                bytes = freed,
                "removed unused template layers"
            );
        }
        Ok((removed, freed))
    }

    /// Server start: builds interrupted by a stop are failed, garbage collected.
    pub(crate) async fn recover_templates(&self) -> Result<(), CoreError> {
        if self.inner.templates.is_none() {
            return Ok(());
        }
        let failed = self
            .inner
            .store
            .fail_unfinished_builds("the server stopped during the build; start it again")
            .await?;
        if !failed.is_empty() {
            tracing::warn!(builds = ?failed, "marked interrupted template builds as failed");
        }
        self.collect_garbage().await?;
        Ok(())
    }

    /// Whether sandboxes can be made from `key` (a ready build, or a rootfs registered by
    /// path).
    pub async fn template_exists(&self, key: &str) -> bool {
        self.resolve_template(key).await.is_ok()
    }

    /// Builds a shipped template unless a ready build of it exists, reporting log lines to
    /// `on_log` (used by `soulbox serve` for `base`).
    pub async fn ensure_shipped_template(
        &self,
        name: &str,
        mut on_log: impl FnMut(&BuildLogLine),
    ) -> Result<(), CoreError> {
        let shipped = soulbox_templates::shipped::shipped(name)
            .ok_or_else(|| CoreError::TemplateNotFound(name.to_owned()))?;
        if self.resolve_template(name).await.is_ok() {
            return Ok(());
        }
        let (def, build_id, _) = self.request_template_build(name, &[], None, None).await?;
        self.start_template_build(
            &def.id,
            &build_id,
            BuildSpec {
                source: BuildSource::Dockerfile {
                    text: shipped.dockerfile.to_owned(),
                    files: BTreeMap::new(),
                },
                start_cmd: None,
                ready_cmd: None,
                force: false,
            },
        )
        .await?;
        let mut offset = 0;
        loop {
            let view = self
                .template_build_status(&def.id, &build_id, offset, 1000)
                .await?;
            offset += view.logs.len();
            for l in &view.logs {
                on_log(l);
            }
            match view.status {
                BuildStatus::Ready if view.logs.is_empty() => return Ok(()),
                BuildStatus::Error if view.logs.is_empty() => {
                    let (reason, _) = view.reason.unwrap_or_default();
                    return Err(CoreError::Internal(format!(
                        "building template {name} failed: {reason}"
                    )));
                }
                _ => tokio::time::sleep(Duration::from_millis(200)).await,
            }
        }
    }
}

/// A Dockerfile instruction or an SDK step, not yet made concrete.
enum Item {
    Docker(dockerfile::Instruction, BTreeMap<usize, String>),
    Sdk(SdkStep),
}

impl Item {
    /// The concrete step under the build's current state, and whether it skips the cache.
    fn concretize(self, v: &Vars) -> Result<(Concrete, bool), String> {
        let mut vars = v.args.clone();
        vars.extend(v.env.clone());
        let run_env = || {
            let mut env = v.args.clone();
            env.extend(v.env.clone());
            env
        };
        match self {
            Item::Docker(i, files) => {
                let exp = |s: &str| dockerfile::expand(s, &vars, '\\');
                let c = match i.kind {
                    InstructionKind::Run(cmd) => Concrete::Run {
                        argv: match cmd {
                            Command::Shell(s) => vec!["/bin/sh".into(), "-c".into(), s],
                            Command::Exec(words) => words,
                        },
                        user: v.user.clone(),
                        workdir: v.workdir.clone(),
                        env: run_env(),
                    },
                    InstructionKind::Copy {
                        add: _,
                        srcs,
                        dest,
                        chown,
                        chmod,
                    } => {
                        let files = files.get(&i.line).cloned().ok_or_else(|| {
                            format!("line {}: the files of this COPY were not uploaded", i.line)
                        })?;
                        Concrete::Copy {
                            sources: srcs.iter().map(|s| exp(s)).collect::<Result<_, _>>()?,
                            dest: join_path(&v.workdir, &exp(&dest)?),
                            chown: chown.as_deref().map(exp).transpose()?,
                            chmod: chmod.as_deref().map(exp).transpose()?,
                            files,
                        }
                    }
                    InstructionKind::Env(pairs) => Concrete::Env {
                        pairs: pairs
                            .iter()
                            .map(|(k, val)| Ok((k.clone(), exp(val)?)))
                            .collect::<Result<_, String>>()?,
                    },
                    InstructionKind::Arg(name, default) => {
                        let value = match (v.args.get(&name), default) {
                            (Some(existing), _) => existing.clone(),
                            (None, Some(d)) => exp(&d)?,
                            (None, None) => String::new(),
                        };
                        Concrete::Arg { name, value }
                    }
                    InstructionKind::Workdir(p) => Concrete::Workdir {
                        path: join_path(&v.workdir, &exp(&p)?),
                    },
                    InstructionKind::User(u) => Concrete::User { user: exp(&u)? },
                    InstructionKind::Label(pairs) => Concrete::Label {
                        pairs: pairs
                            .iter()
                            .map(|(k, val)| Ok((exp(k)?, exp(val)?)))
                            .collect::<Result<_, String>>()?,
                    },
                };
                Ok((c, false))
            }
            Item::Sdk(s) => {
                let arg = |i: usize| s.args.get(i).cloned().unwrap_or_default();
                let c = match s.kind.to_ascii_uppercase().as_str() {
                    "RUN" => Concrete::Run {
                        argv: vec!["/bin/sh".into(), "-c".into(), arg(0)],
                        user: Some(arg(1))
                            .filter(|u| !u.is_empty())
                            .unwrap_or(v.user.clone()),
                        workdir: v.workdir.clone(),
                        env: run_env(),
                    },
                    "COPY" => Concrete::Copy {
                        sources: vec![arg(0)],
                        dest: join_path(&v.workdir, &arg(1)),
                        chown: Some(arg(2)).filter(|u| !u.is_empty()),
                        chmod: Some(arg(3)).filter(|m| !m.is_empty()),
                        files: s
                            .files_hash
                            .clone()
                            .ok_or_else(|| "COPY step without filesHash".to_owned())?,
                    },
                    "ENV" => {
                        if s.args.len() % 2 != 0 {
                            return Err("ENV needs name/value pairs".into());
                        }
                        Concrete::Env {
                            pairs: s
                                .args
                                .chunks(2)
                                .map(|kv| (kv[0].clone(), kv[1].clone()))
                                .collect(),
                        }
                    }
                    "WORKDIR" => Concrete::Workdir {
                        path: join_path(&v.workdir, &arg(0)),
                    },
                    "USER" => Concrete::User { user: arg(0) },
                    "ARG" => Concrete::Arg {
                        name: arg(0),
                        value: arg(1),
                    },
                    "LABEL" => Concrete::Label {
                        pairs: vec![(arg(0), arg(1))],
                    },
                    other => return Err(format!("unsupported step type {other}")),
                };
                Ok((c, s.force))
            }
        }
    }
}

fn build_config(b: &BuildRecord) -> Result<BuildConfig, CoreError> {
    let text = b
        .config
        .as_deref()
        .ok_or_else(|| CoreError::Internal(format!("build {} has no config", b.id)))?;
    serde_json::from_str(text)
        .map_err(|e| CoreError::Internal(format!("build {} config: {e}", b.id)))
}

/// The host path of a sandbox's writable layer (`upper/` beside its agent socket in its state
/// directory): only read by the host while the sandbox is stopped or frozen.
pub(crate) fn upper_dir(h: &SandboxHandle) -> Result<PathBuf, CoreError> {
    h.socket_path
        .parent()
        .map(|d| d.join("upper"))
        .ok_or_else(|| CoreError::Internal(format!("no state directory for sandbox {}", h.id)))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_tags_and_paths() {
        assert_eq!(split_name_tag("my-t:v1"), ("my-t", Some("v1")));
        assert_eq!(split_name_tag("team/my-t"), ("team/my-t", None));
        assert_eq!(split_name_tag("my-t"), ("my-t", None));
        assert!(valid_template_name("code-interpreter-v1"));
        assert!(!valid_template_name("Bad Name"));
        assert!(!valid_template_name(""));
        assert_eq!(join_path("/home/user", "app/"), "/home/user/app/");
        assert_eq!(join_path("/a", "../b/./c"), "/b/c");
        assert_eq!(join_path("/", "/x"), "/x");
    }
}
