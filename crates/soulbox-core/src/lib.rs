//! Sandbox lifecycle manager: ties runtime, store, templates and agents together.
//!
//! The [`Manager`] owns every sandbox from create to kill: it asks the runtime for the sandbox,
//! initialises its agent, records it, and keeps one watcher task per live sandbox that reaps it
//! when its PID 1 dies or its `end_at` passes. The database is the source of truth for what
//! exists; the in-memory table of live sandboxes is what the gateway routes by.
//!
//! What sandboxed code can do with this: only make its own agent answer `/_soulbox/init`
//! wrongly or slowly (create then fails within [`ManagerConfig::agent_timeout`] and the sandbox
//! is destroyed), or exit its PID 1 (the sandbox is reaped). It never reaches the database, and
//! an access token is checked by the gateway, never by code inside the sandbox.

#![forbid(unsafe_code)]

mod agent_client;
mod ids;
mod network;
mod pause;
mod pool;
mod snapshots;
mod template_exec;
mod templates;
mod volumes;

use std::collections::{BTreeMap, HashMap, HashSet};
use std::path::PathBuf;
use std::sync::{Arc, RwLock};
use std::time::Duration;

use chrono::{DateTime, Utc};
use soulbox_runtime::{Limits, Runtime, RuntimeError, SandboxHandle, SandboxSpec};
use soulbox_store::{Cursor, Order, SandboxQuery, SandboxRecord, Store, StoreError};
use soulbox_wire::agent::InitRequest;
use soulbox_wire::rest::SandboxState;
use tokio::sync::watch;

pub use agent_client::AgentError;
pub use ids::{new_access_token, new_sandbox_id};
pub use pause::{DEFAULT_RESUME_TIMEOUT, Lifecycle, PauseMode, Resumed};
pub use pool::{DEMAND_WINDOW, HostReserve, PoolConfig, PoolSize};
pub use snapshots::Snapshot;
pub use soulbox_net::EgressConfig;
pub use templates::{
    BuildConfig, BuildLogLine, BuildSource, BuildSpec, BuildView, DEFAULT_TAG, READY_TIMEOUT,
    SdkStep, TemplateView, split_name_tag, valid_template_name,
};
pub use volumes::{
    DEFAULT_VOLUME_SIZE_MB, VolumeAttrs, VolumeDir, VolumeEntry, VolumeEntryKind, VolumeFsError,
    VolumePath, check_volume_attrs, valid_volume_name,
};

/// The envd version reported to the SDKs; it gates SDK features (protocol doc §4.8).
pub const ENVD_VERSION: &str = "0.6.4";
/// `clientID` of every sandbox (deprecated field the SDK parsers still require).
pub const CLIENT_ID: &str = "soulbox";
/// Longest timeout a sandbox may be given (E2B's Pro-tier limit).
pub const MAX_TIMEOUT: Duration = Duration::from_secs(24 * 3600);

#[derive(Debug, thiserror::Error)]
pub enum CoreError {
    #[error("sandbox {0} not found")]
    NotFound(String),
    #[error("volume {0} not found")]
    VolumeNotFound(String),
    /// A credential that does not hold (401), e.g. a volume token.
    #[error("{0}")]
    Unauthorized(String),
    #[error("template '{0}' not found")]
    TemplateNotFound(String),
    /// A shipped template that has not been built on this server yet.
    #[error("template '{0}' is not built yet; build it with `soulbox template build {0}`")]
    TemplateNotBuilt(String),
    /// The request clashes with existing state (409).
    #[error("{0}")]
    Conflict(String),
    #[error("{0}")]
    InvalidArgument(String),
    /// The host cannot take another sandbox right now (503: clients may retry).
    #[error("no capacity for another sandbox: {0}")]
    Capacity(String),
    /// The sandbox cannot do this right now (503: clients may retry).
    #[error("{0}")]
    Unavailable(String),
    #[error("runtime: {0}")]
    Runtime(#[from] RuntimeError),
    #[error("store: {0}")]
    Store(#[from] StoreError),
    #[error("sandbox agent: {0}")]
    Agent(#[from] AgentError),
    #[error("internal: {0}")]
    Internal(String),
}

/// Settings of the manager.
#[derive(Debug, Clone)]
pub struct ManagerConfig {
    /// Returned to clients as the sandbox `domain` (`<port>-<id>.<domain>` host routing).
    pub domain: Option<String>,
    /// How long a new sandbox's agent may take to answer its init request.
    pub agent_timeout: Duration,
    /// The data directory: template layers (`layers/`) and uploaded build files
    /// (`template-files/`) live there. `None`: no templates can be built or used from the
    /// layer store (only templates registered by path).
    pub data_dir: Option<PathBuf>,
    /// Sandbox networking (slots, egress policy); `None`: loopback-only sandboxes.
    pub network: Option<soulbox_net::Network>,
    /// A PEM bundle that template build steps (`RUN`) trust, pointed at by `SSL_CERT_FILE`,
    /// `PIP_CERT`, `NODE_EXTRA_CA_CERTS` and the like: the host's own, so builds work behind
    /// a TLS-intercepting proxy the host trusts. Never part of a template's layers.
    pub build_ca_bundle: Option<PathBuf>,
    /// Warm pools and the host reserve that refuses creates (see the `pool` module).
    pub pool: PoolConfig,
    /// Where volumes keep their files (`$DATA/sandboxes/volumes`); `None`: no volumes.
    pub volumes_dir: Option<PathBuf>,
    /// Size limit of new volumes in MiB (0: [`DEFAULT_VOLUME_SIZE_MB`]).
    pub volume_size_mb: u64,
}

impl Default for ManagerConfig {
    fn default() -> Self {
        ManagerConfig {
            domain: None,
            agent_timeout: Duration::from_secs(10),
            data_dir: None,
            network: None,
            build_ca_bundle: None,
            pool: PoolConfig::default(),
            volumes_dir: None,
            volume_size_mb: 0,
        }
    }
}

/// What to create.
#[derive(Debug, Clone)]
pub struct CreateRequest {
    pub template: String,
    pub timeout: Duration,
    /// Whether the sandbox gets an envd access token.
    pub secure: bool,
    pub metadata: BTreeMap<String, String>,
    pub env_vars: BTreeMap<String, String>,
    /// Egress policy (`allow_internet_access`, `network.allowOut`/`denyOut`).
    pub network: EgressConfig,
    /// What happens on timeout and on traffic while paused.
    pub lifecycle: Lifecycle,
    /// Volumes to mount (by name); a create with any never takes a warm pool member.
    pub volume_mounts: Vec<soulbox_wire::volumes::SandboxVolumeMount>,
}

/// A sandbox as clients see it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SandboxInfo {
    pub id: String,
    pub template_id: String,
    pub alias: Option<String>,
    pub metadata: BTreeMap<String, String>,
    pub access_token: Option<String>,
    pub started_at: DateTime<Utc>,
    pub end_at: DateTime<Utc>,
    pub cpu_count: u32,
    pub memory_mb: u64,
    pub disk_mb: u64,
    pub state: SandboxState,
    /// Its egress configuration (`None` when the server has no networking; not filled in
    /// by `list`).
    pub network: Option<EgressConfig>,
    pub lifecycle: Lifecycle,
    /// What its pause kept, while paused.
    pub pause_mode: Option<PauseMode>,
    /// Paused while its agent did not answer (E2B `envdUnresponsiveAtPause`).
    pub envd_unresponsive_at_pause: bool,
}

/// A page of [`Manager::list`].
#[derive(Debug, Clone, Default)]
pub struct ListRequest {
    pub metadata: Vec<(String, String)>,
    /// Allowed states; empty = any.
    pub states: Vec<SandboxState>,
    pub template: Option<String>,
    pub started_after: Option<DateTime<Utc>>,
    pub order: Order,
    /// Page size; `None` = everything.
    pub limit: Option<u32>,
    /// Token from the previous page.
    pub next_token: Option<String>,
}

#[derive(Debug, Clone)]
pub struct ListPage {
    pub sandboxes: Vec<SandboxInfo>,
    /// Present when more sandboxes follow.
    pub next_token: Option<String>,
}

/// Where the gateway sends a sandbox's traffic and what it must check first.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Route {
    pub sandbox_id: String,
    pub socket_path: PathBuf,
    pub access_token: Option<String>,
    /// Required on requests to the sandbox's ports other than envd's when set
    /// (`network.allowPublicTraffic=false`).
    pub traffic_token: Option<String>,
}

/// A live sandbox: its route, its handle, and the sender that moves its watcher's deadline
/// (dropping it stops the watcher).
struct Live {
    route: Arc<Route>,
    handle: SandboxHandle,
    end_at: watch::Sender<DateTime<Utc>>,
}

struct Inner {
    cfg: ManagerConfig,
    store: Store,
    runtime: Runtime,
    live: RwLock<HashMap<String, Live>>,
    templates: Option<templates::State>,
    pools: pool::Pools,
    transitions: pause::Transitions,
    volumes: Option<volumes::Volumes>,
}

/// The sandbox lifecycle. Cheap to clone; clones share state.
#[derive(Clone)]
pub struct Manager {
    inner: Arc<Inner>,
}

impl Manager {
    /// Starts the manager: re-adopts the sandboxes of the database whose PID 1 is still the
    /// same live process, destroys the rest (and any traces of unknown sandboxes), and arms
    /// expiry and death detection for the adopted ones.
    pub async fn start(
        cfg: ManagerConfig,
        store: Store,
        runtime: Runtime,
    ) -> Result<Manager, CoreError> {
        let templates = cfg
            .data_dir
            .as_deref()
            .map(templates::State::open)
            .transpose()?;
        let pools = pool::Pools::new(cfg.pool.clone());
        let volumes = cfg
            .volumes_dir
            .as_deref()
            .map(|dir| volumes::Volumes::open(dir, cfg.volume_size_mb))
            .transpose()?;
        let manager = Manager {
            inner: Arc::new(Inner {
                cfg,
                store,
                runtime,
                live: RwLock::new(HashMap::new()),
                templates,
                pools,
                transitions: pause::Transitions::default(),
                volumes,
            }),
        };
        // Ids whose state directories stay, and those of them that keep a network lease.
        let mut keep = HashSet::new();
        let mut keep_net = HashSet::new();
        for rec in manager.inner.store.all_sandboxes().await? {
            let handle = match stored_handle(&rec) {
                Ok(h) => h,
                Err(e) => {
                    // Its traces are removed by reap_orphans below (its id is not kept).
                    tracing::error!(id = %rec.id, error = %e, "unreadable sandbox handle; dropping the row");
                    manager.inner.store.delete_sandbox(&rec.id).await?;
                    continue;
                }
            };
            if rec.state == SandboxState::Paused {
                // Never dropped: its files are what the pause promised to keep.
                keep.insert(rec.id.clone());
                match manager.adopt_paused(&rec, &handle).await {
                    Ok(true) => {
                        keep_net.insert(rec.id.clone());
                    }
                    Ok(false) => {}
                    Err(e) => {
                        tracing::error!(id = %rec.id, error = %e, "adopting a paused sandbox");
                        keep_net.insert(rec.id.clone());
                    }
                }
                continue;
            }
            if manager.inner.runtime.adopt(&handle) {
                tracing::info!(id = %rec.id, pid = handle.pid, "re-adopted sandbox");
                keep.insert(rec.id.clone());
                keep_net.insert(rec.id.clone());
                manager.track(&rec, handle)?;
            } else {
                tracing::info!(id = %rec.id, "sandbox died while the server was down; reaping");
                match manager.inner.runtime.destroy(&handle).await {
                    Ok(()) => {
                        manager.release_network(&rec.id).await;
                        manager.inner.store.delete_sandbox(&rec.id).await?;
                    }
                    Err(e) => {
                        tracing::error!(id = %rec.id, error = %e, "destroying dead sandbox failed; keeping its row for a retry");
                        keep.insert(rec.id.clone());
                        keep_net.insert(rec.id.clone());
                    }
                }
            }
        }
        // A leftover that cannot be removed now must not keep the server from starting; the
        // next start tries again.
        match manager.inner.runtime.reap_orphans(&keep).await {
            Ok(0) => {}
            Ok(n) => tracing::info!(count = n, "removed leftovers of unknown sandboxes"),
            Err(e) => tracing::error!(error = %e, "removing leftovers of unknown sandboxes"),
        }
        if let Some(net) = manager.network() {
            let released = net.retain(&keep_net).await;
            if released > 0 {
                tracing::info!(
                    count = released,
                    "released network slots of sandboxes that are gone"
                );
            }
        }
        manager.recover_templates().await?;
        manager.prune_volume_mounts().await?;
        manager.start_pools();
        Ok(manager)
    }

    pub fn domain(&self) -> Option<&str> {
        self.inner.cfg.domain.as_deref()
    }

    pub fn store(&self) -> &Store {
        &self.inner.store
    }

    /// Creates a sandbox. Runs to completion even if the caller goes away; any failure
    /// leaves nothing behind.
    pub async fn create(&self, req: CreateRequest) -> Result<SandboxInfo, CoreError> {
        let this = self.clone();
        tokio::spawn(async move { this.create_inner(req).await })
            .await
            .map_err(|e| CoreError::Internal(format!("create task: {e}")))?
    }

    async fn create_inner(&self, req: CreateRequest) -> Result<SandboxInfo, CoreError> {
        validate_timeout_duration(req.timeout)?;
        validate_env_vars(&req.env_vars)?;
        let template = self.resolve_template(&req.template).await?;
        let mounts = self.resolve_volume_mounts(&req.volume_mounts).await?;
        // A pool member was made without the volumes: only cold creates mount them.
        if mounts.runtime.is_empty()
            && let Some(info) = self.create_from_pool(&template, &req).await?
        {
            return Ok(info);
        }
        self.check_host_capacity()?;
        let id = self.unused_id().await?;
        self.record_volume_mounts(&id, &mounts).await?;
        let t0 = std::time::Instant::now();
        let handle = self
            .prepare_mounted(
                &id,
                &template,
                &req.env_vars,
                &req.network,
                mounts.runtime.clone(),
            )
            .await?;
        let t_ready = t0.elapsed();
        let created = self.finish_create(&handle, &template, &req).await;
        match &created {
            Ok(_) => tracing::debug!(
                %id,
                ready_ms = t_ready.as_secs_f64() * 1e3,
                store_ms = (t0.elapsed() - t_ready).as_secs_f64() * 1e3,
                "created sandbox cold"
            ),
            Err(_) => self.discard(&id, &handle).await,
        }
        created
    }

    /// Makes a sandbox of `template` ready to be handed out: runtime create in a network slot
    /// with `network`, agent init with the template's environment plus `env_vars`, the
    /// template's start command and ready check. Used by cold creates and for pool members.
    /// A failure leaves nothing behind.
    pub(crate) async fn prepare(
        &self,
        id: &str,
        template: &templates::Resolved,
        env_vars: &BTreeMap<String, String>,
        network: &EgressConfig,
    ) -> Result<SandboxHandle, CoreError> {
        self.prepare_mounted(id, template, env_vars, network, Vec::new())
            .await
    }

    /// [`Manager::prepare`] with volumes mounted into the sandbox.
    pub(crate) async fn prepare_mounted(
        &self,
        id: &str,
        template: &templates::Resolved,
        env_vars: &BTreeMap<String, String>,
        network: &EgressConfig,
        volumes: Vec<soulbox_runtime::VolumeMount>,
    ) -> Result<SandboxHandle, CoreError> {
        let spec = SandboxSpec {
            id: id.to_owned(),
            layers: template.layers.clone(),
            limits: Limits {
                cpu_count: template.config.cpu_count,
                memory_mb: template.config.memory_mb,
                disk_mb: template.config.disk_mb,
                ..Limits::default()
            },
            volumes,
        };
        let handle = self.create_in_network(&spec, network).await?;
        let setup = async {
            let init = self.init_request(id, template, env_vars);
            agent_client::init(&handle.socket_path, &init, self.inner.cfg.agent_timeout).await?;
            self.start_template_processes(&handle, template).await
        }
        .await;
        match setup {
            Ok(()) => Ok(handle),
            Err(e) => {
                self.discard(id, &handle).await;
                Err(e)
            }
        }
    }

    /// The agent init of a sandbox of `template`: the template's ENV overridden by `env_vars`.
    pub(crate) fn init_request(
        &self,
        id: &str,
        template: &templates::Resolved,
        env_vars: &BTreeMap<String, String>,
    ) -> InitRequest {
        let mut env = template.config.env.clone();
        env.extend(env_vars.clone());
        InitRequest {
            sandbox_id: id.to_owned(),
            template_id: template.name.clone(),
            env_vars: env.into_iter().collect(),
            default_user: Some(template.config.user.clone()),
            default_workdir: Some(template.config.workdir.clone()),
            resolv_conf: None,
        }
    }

    /// Records a ready sandbox as `req`'s (row with metadata, access token and timeout) and
    /// makes it live (route and watcher). On failure the caller destroys it.
    pub(crate) async fn finish_create(
        &self,
        handle: &SandboxHandle,
        template: &templates::Resolved,
        req: &CreateRequest,
    ) -> Result<SandboxInfo, CoreError> {
        let inner = &self.inner;
        let id = &handle.id;
        let started_at = now_millis();
        let end_at = started_at + to_chrono(req.timeout)?;
        let rec = SandboxRecord {
            id: id.clone(),
            template_id: template.name.clone(),
            alias: template.alias.clone(),
            metadata: req.metadata.clone(),
            env_vars: req.env_vars.clone(),
            access_token: req.secure.then(new_access_token),
            started_at,
            end_at,
            cpu_count: template.config.cpu_count,
            memory_mb: template.config.memory_mb,
            disk_mb: template.config.disk_mb,
            handle: serde_json::to_string(handle)
                .map_err(|e| CoreError::Internal(format!("encoding handle: {e}")))?,
            state: SandboxState::Running,
            lifecycle: serde_json::to_string(&Lifecycle {
                timeout_ms: u64::try_from(req.timeout.as_millis()).unwrap_or(u64::MAX),
                ..req.lifecycle
            })
            .map_err(|e| CoreError::Internal(format!("encoding lifecycle: {e}")))?,
            pause: None,
        };
        inner.store.insert_sandbox(&rec).await?;
        if let Some(build) = &template.build_id
            && let Err(e) = inner.store.set_sandbox_build(id, build).await
        {
            inner.store.delete_sandbox(id).await?;
            return Err(e.into());
        }
        if let Err(e) = self.track(&rec, handle.clone()) {
            inner.store.delete_sandbox(id).await?;
            return Err(e);
        }
        let mut info = info_from(rec);
        info.network = self.network_config(id);
        Ok(info)
    }

    /// Destroys a sandbox that never became (or stopped being) a client's: route, processes,
    /// runtime state, network slot. Failures are logged.
    pub(crate) async fn discard(&self, id: &str, handle: &SandboxHandle) {
        self.untrack(id);
        if let Err(e) = self.inner.runtime.destroy(handle).await {
            tracing::error!(%id, error = %e, "destroying a sandbox whose create failed");
        }
        self.release_network(id).await;
    }

    /// A fresh id that no sandbox (live, recorded or pool member) has.
    async fn unused_id(&self) -> Result<String, CoreError> {
        loop {
            let id = new_sandbox_id();
            let live = self.read_live().contains_key(&id) || self.inner.pools.has_id(&id);
            if !live && self.inner.store.get_sandbox(&id).await?.is_none() {
                return Ok(id);
            }
        }
    }

    /// The sandbox's row, running or paused; [`CoreError::NotFound`] when there is none.
    pub(crate) async fn record(&self, id: &str) -> Result<SandboxRecord, CoreError> {
        self.inner
            .store
            .get_sandbox(id)
            .await?
            .ok_or_else(|| CoreError::NotFound(id.to_owned()))
    }

    pub async fn get(&self, id: &str) -> Result<SandboxInfo, CoreError> {
        let rec = self.record(id).await?;
        let egress = rec
            .pause
            .is_some()
            .then(|| pause::Paused::parse(&rec).ok().and_then(|p| p.egress))
            .flatten();
        let mut info = info_from(rec);
        info.network = self.network_config(id).or(egress);
        Ok(info)
    }

    pub async fn list(&self, req: ListRequest) -> Result<ListPage, CoreError> {
        let after = req.next_token.as_deref().map(decode_token).transpose()?;
        let mut rows = self
            .inner
            .store
            .list_sandboxes(&SandboxQuery {
                metadata: req.metadata,
                states: req.states,
                template: req.template,
                started_after: req.started_after,
                order: req.order,
                after,
                // One more than asked, to know whether another page follows.
                limit: req.limit.map(|l| l.saturating_add(1)),
            })
            .await?;
        let mut next_token = None;
        if let Some(limit) = req.limit {
            let limit = usize::try_from(limit).unwrap_or(usize::MAX);
            if rows.len() > limit {
                rows.truncate(limit);
                next_token = rows.last().map(encode_token);
            }
        }
        Ok(ListPage {
            sandboxes: rows.into_iter().map(info_from).collect(),
            next_token,
        })
    }

    /// Kills the sandbox and reclaims everything it had. Runs to completion even if the
    /// caller goes away.
    pub async fn kill(&self, id: &str) -> Result<(), CoreError> {
        let this = self.clone();
        let id = id.to_owned();
        tokio::spawn(async move { this.kill_inner(&id).await })
            .await
            .map_err(|e| CoreError::Internal(format!("kill task: {e}")))?
    }

    async fn kill_inner(&self, id: &str) -> Result<(), CoreError> {
        let handle = match self.untrack(id) {
            Some(live) => live.handle,
            None => {
                // Not live: a row left by a failed destroy, or nothing at all.
                let rec = self.record(id).await?;
                stored_handle(&rec)?
            }
        };
        self.inner.runtime.destroy(&handle).await?;
        self.release_network(id).await;
        self.inner.store.delete_sandbox(id).await?;
        Ok(())
    }

    /// Sets the sandbox to expire `timeout` from now (may shorten or extend). Zero expires it
    /// now: its watcher reaps it right away, as E2B's API does for `{"timeout": 0}` (the SDKs'
    /// `set_timeout(0)`, which E2B's own tests use to end a sandbox's life at once).
    pub async fn set_timeout(&self, id: &str, timeout: Duration) -> Result<(), CoreError> {
        if !timeout.is_zero() {
            validate_timeout_duration(timeout)?;
        }
        let end_at = now_millis() + to_chrono(timeout)?;
        self.move_deadline(id, end_at).await
    }

    /// Connects to a running sandbox: extends its expiry to `timeout` from now, never
    /// shortening it.
    pub async fn connect(&self, id: &str, timeout: Duration) -> Result<SandboxInfo, CoreError> {
        validate_timeout_duration(timeout)?;
        let wanted = now_millis() + to_chrono(timeout)?;
        let current = self.get(id).await?;
        if wanted > current.end_at {
            self.move_deadline(id, wanted).await?;
        }
        self.get(id).await
    }

    async fn move_deadline(&self, id: &str, end_at: DateTime<Utc>) -> Result<(), CoreError> {
        if !self.inner.store.set_end_at(id, end_at).await? {
            return Err(CoreError::NotFound(id.to_owned()));
        }
        if let Some(live) = self.read_live().get(id) {
            live.end_at.send_replace(end_at);
        }
        Ok(())
    }

    /// Where to send traffic for a live sandbox.
    pub fn route(&self, id: &str) -> Option<Arc<Route>> {
        self.read_live().get(id).map(|l| l.route.clone())
    }

    /// The first live sandbox whose route satisfies `pred` (used to find the sandbox a signed
    /// URL without a sandbox id belongs to). The predicate runs outside the table's lock.
    pub fn find_route(&self, pred: impl Fn(&Route) -> bool) -> Option<Arc<Route>> {
        let routes: Vec<Arc<Route>> = self.read_live().values().map(|l| l.route.clone()).collect();
        routes.into_iter().find(|r| pred(r))
    }

    /// Number of live sandboxes.
    pub fn live_count(&self) -> usize {
        self.read_live().len()
    }

    /// Adds a live sandbox and starts its watcher.
    fn track(&self, rec: &SandboxRecord, handle: SandboxHandle) -> Result<(), CoreError> {
        let route = Arc::new(Route {
            sandbox_id: rec.id.clone(),
            socket_path: handle.socket_path.clone(),
            access_token: rec.access_token.clone(),
            traffic_token: None,
        });
        let (end_tx, end_rx) = watch::channel(rec.end_at);
        {
            let mut live = self
                .inner
                .live
                .write()
                .map_err(|_| CoreError::Internal("live table lock poisoned".into()))?;
            live.insert(
                rec.id.clone(),
                Live {
                    route,
                    handle: handle.clone(),
                    end_at: end_tx,
                },
            );
        }
        let this = self.clone();
        let id = rec.id.clone();
        tokio::spawn(async move { this.watch(id, handle, end_rx).await });
        Ok(())
    }

    /// Removes a live sandbox from the table (stopping its watcher); returns it if it was live.
    fn untrack(&self, id: &str) -> Option<Live> {
        match self.inner.live.write() {
            Ok(mut live) => live.remove(id),
            Err(poisoned) => poisoned.into_inner().remove(id),
        }
    }

    fn read_live(&self) -> std::sync::RwLockReadGuard<'_, HashMap<String, Live>> {
        match self.inner.live.read() {
            Ok(guard) => guard,
            // Nothing panics while holding the lock; recover the data if something ever does.
            Err(poisoned) => poisoned.into_inner(),
        }
    }

    /// One per live sandbox: reaps it when its PID 1 exits or its deadline passes; ends
    /// quietly when the sandbox is untracked (its sender dropped).
    async fn watch(
        self,
        id: String,
        handle: SandboxHandle,
        mut end_rx: watch::Receiver<DateTime<Utc>>,
    ) {
        let exited = self.inner.runtime.exited(&handle);
        tokio::pin!(exited);
        let (reason, expired) = loop {
            let end_at = *end_rx.borrow_and_update();
            let left = (end_at - Utc::now()).to_std().unwrap_or(Duration::ZERO);
            tokio::select! {
                () = &mut exited => break ("its PID 1 exited", false),
                () = tokio::time::sleep(left) => break ("it expired", true),
                changed = end_rx.changed() => {
                    if changed.is_err() {
                        return; // killed by someone else
                    }
                }
            }
        };
        if expired
            && let Ok(Some(rec)) = self.inner.store.get_sandbox(&id).await
            && rec.state == SandboxState::Running
        {
            let lifecycle = pause::parse_lifecycle(&rec);
            if lifecycle.auto_pause {
                // Its own task: the pause untracks the sandbox, which ends this watcher.
                let this = self.clone();
                tokio::spawn(async move { this.auto_pause(&id, lifecycle).await });
                return;
            }
        }
        // Only the watcher of a sandbox that is still tracked reaps it.
        if self.untrack(&id).is_none() {
            return;
        }
        tracing::info!(%id, "reaping sandbox: {reason}");
        if let Err(e) = self.inner.runtime.destroy(&handle).await {
            tracing::error!(%id, error = %e, "destroying sandbox failed; keeping its row for a retry");
            return;
        }
        self.release_network(&id).await;
        if let Err(e) = self.inner.store.delete_sandbox(&id).await {
            tracing::error!(%id, error = %e, "deleting sandbox row");
        }
    }
}

/// Checks a client-supplied timeout in seconds: > 0 and at most [`MAX_TIMEOUT`].
pub fn validate_timeout(seconds: i64) -> Result<Duration, CoreError> {
    if seconds <= 0 {
        return Err(CoreError::InvalidArgument(
            "Timeout must be greater than 0".into(),
        ));
    }
    let d = Duration::from_secs(seconds.unsigned_abs());
    validate_timeout_duration(d)?;
    Ok(d)
}

/// Checks the seconds of `POST /sandboxes/{id}/timeout`: unlike a create's or connect's
/// timeout, 0 is valid there and means "expire now" (E2B's schema: `minimum: 0`); at most
/// [`MAX_TIMEOUT`].
pub fn validate_new_timeout(seconds: i64) -> Result<Duration, CoreError> {
    match seconds {
        0 => Ok(Duration::ZERO),
        ..0 => Err(CoreError::InvalidArgument(
            "Timeout must be greater than or equal to 0".into(),
        )),
        _ => validate_timeout(seconds),
    }
}

/// Environment variable names must be non-empty without `=` or NUL, values without NUL:
/// anything else cannot be passed to a process.
fn validate_env_vars(env: &BTreeMap<String, String>) -> Result<(), CoreError> {
    for (k, v) in env {
        if k.is_empty() || k.contains(['=', '\0']) {
            return Err(CoreError::InvalidArgument(format!(
                "invalid environment variable name {k:?}"
            )));
        }
        if v.contains('\0') {
            return Err(CoreError::InvalidArgument(format!(
                "environment variable {k} contains a NUL byte"
            )));
        }
    }
    Ok(())
}

fn validate_timeout_duration(d: Duration) -> Result<(), CoreError> {
    if d.is_zero() {
        return Err(CoreError::InvalidArgument(
            "Timeout must be greater than 0".into(),
        ));
    }
    if d > MAX_TIMEOUT {
        return Err(CoreError::InvalidArgument(format!(
            "Timeout cannot be greater than {} hours",
            MAX_TIMEOUT.as_secs() / 3600
        )));
    }
    Ok(())
}

fn to_chrono(d: Duration) -> Result<chrono::Duration, CoreError> {
    chrono::Duration::from_std(d).map_err(|e| CoreError::InvalidArgument(format!("timeout: {e}")))
}

/// Now, truncated to milliseconds (what the database keeps).
fn now_millis() -> DateTime<Utc> {
    let now = Utc::now();
    DateTime::from_timestamp_millis(now.timestamp_millis()).unwrap_or(now)
}

/// The runtime handle a row keeps.
fn stored_handle(rec: &SandboxRecord) -> Result<SandboxHandle, CoreError> {
    serde_json::from_str(&rec.handle)
        .map_err(|e| CoreError::Internal(format!("stored handle of {}: {e}", rec.id)))
}

fn info_from(r: SandboxRecord) -> SandboxInfo {
    let paused = r
        .pause
        .is_some()
        .then(|| pause::Paused::parse(&r).ok())
        .flatten();
    SandboxInfo {
        lifecycle: pause::parse_lifecycle(&r),
        pause_mode: paused.as_ref().map(|p| p.mode),
        envd_unresponsive_at_pause: paused.is_some_and(|p| p.envd_unresponsive),
        id: r.id,
        template_id: r.template_id,
        alias: r.alias,
        metadata: r.metadata,
        access_token: r.access_token,
        started_at: r.started_at,
        end_at: r.end_at,
        cpu_count: r.cpu_count,
        memory_mb: r.memory_mb,
        disk_mb: r.disk_mb,
        state: r.state,
        network: None,
    }
}

/// Page token: hex of `<started_at ms>_<id>` (opaque to clients).
fn encode_token(r: &SandboxRecord) -> String {
    hex::encode(format!("{}_{}", r.started_at.timestamp_millis(), r.id))
}

fn decode_token(token: &str) -> Result<Cursor, CoreError> {
    let invalid = || CoreError::InvalidArgument(format!("invalid next token '{token}'"));
    let raw = hex::decode(token).map_err(|_| invalid())?;
    let raw = String::from_utf8(raw).map_err(|_| invalid())?;
    let (ms, id) = raw.split_once('_').ok_or_else(invalid)?;
    let ms: i64 = ms.parse().map_err(|_| invalid())?;
    Ok(Cursor {
        started_at: DateTime::from_timestamp_millis(ms).ok_or_else(invalid)?,
        id: id.to_owned(),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn timeouts_are_validated() {
        assert!(validate_timeout(0).is_err());
        assert!(validate_timeout(-5).is_err());
        assert!(validate_timeout(24 * 3600 + 1).is_err());
        assert_eq!(validate_timeout(300).ok(), Some(Duration::from_secs(300)));
        assert_eq!(validate_new_timeout(0).ok(), Some(Duration::ZERO));
        assert_eq!(
            validate_new_timeout(300).ok(),
            Some(Duration::from_secs(300))
        );
        assert!(validate_new_timeout(-1).is_err());
        assert!(validate_new_timeout(24 * 3600 + 1).is_err());
    }

    #[test]
    fn env_vars_are_validated() {
        let ok = BTreeMap::from([("PATH_X".to_owned(), "a=b c".to_owned())]);
        assert!(validate_env_vars(&ok).is_ok());
        for (k, v) in [("", "x"), ("A=B", "x"), ("A\0", "x"), ("A", "x\0y")] {
            let bad = BTreeMap::from([(k.to_owned(), v.to_owned())]);
            assert!(validate_env_vars(&bad).is_err(), "{k:?}={v:?}");
        }
    }

    #[test]
    fn page_tokens_roundtrip_and_reject_garbage() {
        let rec = SandboxRecord {
            id: "abc".into(),
            template_id: "base".into(),
            alias: None,
            metadata: BTreeMap::new(),
            env_vars: BTreeMap::new(),
            access_token: None,
            started_at: DateTime::from_timestamp_millis(1234).unwrap_or_default(),
            end_at: DateTime::from_timestamp_millis(5678).unwrap_or_default(),
            cpu_count: 1,
            memory_mb: 1,
            disk_mb: 1,
            handle: String::new(),
            state: SandboxState::Running,
            lifecycle: "{}".into(),
            pause: None,
        };
        let cursor = decode_token(&encode_token(&rec)).expect("roundtrip");
        assert_eq!(cursor.id, "abc");
        assert_eq!(cursor.started_at.timestamp_millis(), 1234);
        for bad in [
            "",
            "zz",
            &hex::encode("nounderscore"),
            &hex::encode("x_abc"),
        ] {
            assert!(decode_token(bad).is_err(), "{bad}");
        }
    }
}
