//! Warm pools: sandboxes made ahead of demand, one pool per template build, handed out by
//! [`Manager::create`] in the time of an agent round trip and a database insert.
//!
//! A **member** is a sandbox made exactly as a cold create makes it (runtime create in a
//! network slot, agent init with the template's environment, start command run and ready check
//! passed, so a `code-interpreter-v1` member has its Python kernel up), under the id it keeps
//! for life: hostname, state dir, cgroup and network lease are keyed by it. Until it is claimed
//! it has no database row, no route and no watcher of the manager: it is not listed, not
//! reachable through the gateway, counts against no quota, and never expires. Claiming applies
//! what belongs to the request: the egress policy (only when it is not the default the member
//! was made with), the environment (a second agent init, which replaces the first, only when
//! the create has env vars), then the row (metadata, access token, timeout) and the route.
//!
//! Sizing: each pool keeps between `min` and `max` idle members; inside that range its target
//! is the most creates seen in any one second over the last [`DEMAND_WINDOW`], so a burst
//! makes the pool grow for the next one and a quiet minute shrinks it back. Templates named in
//! [`PoolConfig::templates`] are kept warm from server start; any other template a client
//! creates from gets an adaptive pool (`min` 0, `max` [`PoolConfig::others_max`]) that lasts as
//! long as it has demand. Births run in the background, a few at a time, and stop while the host
//! is short of memory or tasks ([`HostReserve`], the same check that refuses cold creates with
//! 503).
//!
//! Staleness and death: every tick re-resolves each pool's template reference; a rebuild (the
//! tag now names another build) or a deleted template drains the old members. Each idle member
//! has a task waiting on its PID 1: one that dies while idle is destroyed and replaced, never
//! handed out; a member that fails its claim (its agent does not answer the init of a create
//! with env vars, or its policy cannot be applied) is destroyed and the create falls back to a
//! cold create, as does a create that finds its pool empty.
//!
//! Semantics worth knowing (as E2B): the template's start command runs when the member is
//! made, so processes it started do not see the create's `envVars`; commands run after the
//! create do. A create with `envVars` on a template with a start command is therefore made cold,
//! so that its start command (and the code-interpreter kernels it starts) still sees them.
//!
//! Restart: members are not recorded in the database, so a restarted server reaps them like any
//! unknown sandbox (`reap_orphans`, network `retain`) and makes fresh ones; a stopping server
//! destroys its idle members ([`Manager::shutdown_pools`]).
//!
//! What sandboxed code can do with this: code in a member is the template's own start command,
//! made before any client is involved; the first client code reaches a member after its claim,
//! like any new sandbox. A member's agent can only fail its claim (the create then goes cold).

use std::collections::{HashMap, HashSet, VecDeque};
use std::str::FromStr;
use std::sync::{Arc, Mutex, MutexGuard, Weak};
use std::time::{Duration, Instant};

use soulbox_net::EgressConfig;
use soulbox_runtime::SandboxHandle;
use soulbox_wire::rest::WarmPool;
use tokio::sync::{Notify, Semaphore};
use tokio::task::AbortHandle;

use crate::template_exec::{self, Proc};
use crate::templates::Resolved;
use crate::{CoreError, CreateRequest, Inner, Manager, SandboxInfo, agent_client};

/// How far back the create rate that sizes adaptive pools looks.
pub const DEMAND_WINDOW: Duration = Duration::from_secs(60);
/// How often the pools are checked without a create waking them.
const TICK: Duration = Duration::from_secs(1);
/// How long a member's agent may take to answer its claim before the create goes cold.
const CLAIM_TIMEOUT: Duration = Duration::from_secs(2);
/// How long a new member's warm-up command may take.
const WARM_UP_TIMEOUT: Duration = Duration::from_secs(5);
/// Longest wait before retrying births of a pool whose births keep failing.
const MAX_BACKOFF: Duration = Duration::from_secs(60);

/// One template kept warm from server start: `TEMPLATE=MIN` or `TEMPLATE=MIN..MAX` (also
/// `MIN:MAX`); a bare `MIN` means a fixed size.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PoolSize {
    /// As a client names it: template id or name, optionally `:tag`.
    pub template: String,
    pub min: usize,
    pub max: usize,
}

impl FromStr for PoolSize {
    type Err = String;

    fn from_str(s: &str) -> Result<PoolSize, String> {
        let (template, sizes) = s
            .split_once('=')
            .ok_or_else(|| format!("expected TEMPLATE=MIN or TEMPLATE=MIN..MAX, got {s:?}"))?;
        let number = |n: &str| {
            n.trim()
                .parse::<usize>()
                .map_err(|_| format!("bad pool size {n:?} in {s:?}"))
        };
        let (min, max) = match sizes.split_once("..").or_else(|| sizes.split_once(':')) {
            Some((min, max)) => (number(min)?, number(max)?),
            None => {
                let n = number(sizes)?;
                (n, n)
            }
        };
        if template.is_empty() || max < min {
            return Err(format!(
                "bad pool size {s:?}: need a template and MIN ≤ MAX"
            ));
        }
        Ok(PoolSize {
            template: template.to_owned(),
            min,
            max,
        })
    }
}

/// What the host keeps for itself: below this, cold creates fail with
/// [`CoreError::Capacity`] (503) before anything is made, and pools make no members (they
/// stop at twice the reserve, so that creates get what is left).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct HostReserve {
    /// `MemAvailable` in MiB; `None`: the larger of 256 MiB and 1/32 of the host's memory.
    pub memory_mb: Option<u64>,
    /// Free task slots (the lower of `kernel.pid_max` and `kernel.threads-max` minus tasks).
    pub tasks: u64,
}

impl Default for HostReserve {
    fn default() -> Self {
        HostReserve {
            memory_mb: None,
            tasks: 1024,
        }
    }
}

/// Warm pool settings. The default has no pools (tests, embedders); `soulbox serve` sets its
/// own defaults from its flags.
#[derive(Debug, Clone)]
pub struct PoolConfig {
    /// Templates kept warm from start.
    pub templates: Vec<PoolSize>,
    /// Largest adaptive pool of any other template (0: other templates are always made cold).
    pub others_max: usize,
    /// Members being made at once, all pools together.
    pub max_births: usize,
    pub reserve: HostReserve,
}

impl Default for PoolConfig {
    fn default() -> Self {
        PoolConfig {
            templates: Vec::new(),
            others_max: 0,
            max_births: 2,
            reserve: HostReserve::default(),
        }
    }
}

/// Which build a pool's members are made of.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
struct Key {
    template: String,
    build: String,
}

impl Key {
    fn of(t: &Resolved) -> Key {
        Key {
            template: t.name.clone(),
            build: t
                .build_id
                .clone()
                .unwrap_or_else(|| t.config.cache_key.clone()),
        }
    }
}

struct Member {
    handle: SandboxHandle,
    /// The task that destroys the member if its PID 1 dies while idle.
    watcher: AbortHandle,
}

struct Pool {
    reference: String,
    template: Arc<Resolved>,
    min: usize,
    max: usize,
    configured: bool,
    idle: VecDeque<Member>,
    starting: usize,
    demand: Demand,
    hits: u64,
    misses: u64,
    lost: u64,
    failures: u32,
    retry_at: Option<Instant>,
}

impl Pool {
    fn new(
        reference: &str,
        template: Arc<Resolved>,
        min: usize,
        max: usize,
        configured: bool,
    ) -> Pool {
        Pool {
            reference: reference.to_owned(),
            template,
            min,
            max: max.max(min),
            configured,
            idle: VecDeque::new(),
            starting: 0,
            demand: Demand::default(),
            hits: 0,
            misses: 0,
            lost: 0,
            failures: 0,
            retry_at: None,
        }
    }

    fn target(&mut self, now: u64) -> usize {
        let peak = usize::try_from(self.demand.peak(now)).unwrap_or(usize::MAX);
        peak.clamp(self.min, self.max)
    }
}

/// Creates per second over the last [`DEMAND_WINDOW`]: one counter per second, in a ring.
#[derive(Debug)]
struct Demand {
    counts: [u32; DEMAND_SLOTS],
    /// The second each slot counts (slots of older seconds are stale).
    seconds: [u64; DEMAND_SLOTS],
}

const DEMAND_SLOTS: usize = 60;

impl Default for Demand {
    fn default() -> Self {
        Demand {
            counts: [0; DEMAND_SLOTS],
            seconds: [0; DEMAND_SLOTS],
        }
    }
}

impl Demand {
    fn record(&mut self, now: u64) {
        let i = slot(now);
        if self.seconds[i] != now {
            self.seconds[i] = now;
            self.counts[i] = 0;
        }
        self.counts[i] = self.counts[i].saturating_add(1);
    }

    /// The most creates seen in one second within the window.
    fn peak(&self, now: u64) -> u32 {
        let window = DEMAND_WINDOW.as_secs();
        self.counts
            .iter()
            .zip(self.seconds)
            .filter(|&(_, s)| s <= now && now - s < window)
            .map(|(&c, _)| c)
            .max()
            .unwrap_or(0)
    }
}

fn slot(second: u64) -> usize {
    usize::try_from(second % DEMAND_SLOTS as u64).unwrap_or(0)
}

/// The pools of one manager.
pub(crate) struct Pools {
    cfg: PoolConfig,
    epoch: Instant,
    state: Mutex<State>,
    wake: Arc<Notify>,
    births: Arc<Semaphore>,
}

#[derive(Default)]
struct State {
    pools: HashMap<Key, Pool>,
    /// Every member's id, idle or being made.
    ids: HashSet<String>,
    closed: bool,
}

impl Pools {
    pub(crate) fn new(cfg: PoolConfig) -> Pools {
        let births = Arc::new(Semaphore::new(cfg.max_births.max(1)));
        Pools {
            cfg,
            epoch: Instant::now(),
            state: Mutex::new(State::default()),
            wake: Arc::new(Notify::new()),
            births,
        }
    }

    fn enabled(&self) -> bool {
        self.cfg.others_max > 0 || self.cfg.templates.iter().any(|t| t.max > 0)
    }

    fn lock(&self) -> MutexGuard<'_, State> {
        // Nothing panics while holding the lock; recover the data if something ever does.
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }

    fn now(&self) -> u64 {
        self.epoch.elapsed().as_secs()
    }

    /// Whether `id` belongs to a member (so no new sandbox may take it).
    pub(crate) fn has_id(&self, id: &str) -> bool {
        self.lock().ids.contains(id)
    }

    /// Builds that members run on: garbage collection keeps their layers.
    pub(crate) fn builds(&self) -> HashSet<String> {
        self.lock()
            .pools
            .values()
            .filter(|p| !p.idle.is_empty() || p.starting > 0)
            .filter_map(|p| p.template.build_id.clone())
            .collect()
    }

    /// Takes an idle member of `t`'s build for a create, counting the create towards the
    /// pool's demand (and making an adaptive pool for a template that has none).
    fn take(&self, t: &Resolved, reference: &str) -> Option<SandboxHandle> {
        let key = Key::of(t);
        let now = self.now();
        let mut st = self.lock();
        if st.closed {
            return None;
        }
        let pool = match st.pools.entry(key) {
            std::collections::hash_map::Entry::Occupied(e) => e.into_mut(),
            std::collections::hash_map::Entry::Vacant(e) => {
                if self.cfg.others_max == 0 {
                    return None;
                }
                e.insert(Pool::new(
                    reference,
                    Arc::new(t.clone()),
                    0,
                    self.cfg.others_max,
                    false,
                ))
            }
        };
        pool.demand.record(now);
        let member = pool.idle.pop_back();
        match &member {
            Some(_) => pool.hits += 1,
            None => pool.misses += 1,
        }
        let handle = member.map(|m| {
            m.watcher.abort();
            m.handle
        });
        if let Some(h) = &handle {
            st.ids.remove(&h.id);
        }
        drop(st);
        self.wake.notify_one();
        handle
    }

    fn lost(&self, t: &Resolved) {
        if let Some(p) = self.lock().pools.get_mut(&Key::of(t)) {
            p.lost += 1;
        }
    }
}

/// Reads `MemAvailable` (KiB) and the number of tasks from /proc.
fn host_free() -> Option<(u64, u64, u64)> {
    let meminfo = std::fs::read_to_string("/proc/meminfo").ok()?;
    let field = |name: &str| -> Option<u64> {
        meminfo
            .lines()
            .find_map(|l| l.strip_prefix(name))?
            .split_whitespace()
            .next()?
            .parse()
            .ok()
    };
    let available_kib = field("MemAvailable:")?;
    let total_kib = field("MemTotal:")?;
    // 4th field of loadavg: running/total scheduling entities (tasks).
    let loadavg = std::fs::read_to_string("/proc/loadavg").ok()?;
    let tasks: u64 = loadavg
        .split_whitespace()
        .nth(3)?
        .split_once('/')?
        .1
        .parse()
        .ok()?;
    let limit = ["/proc/sys/kernel/pid_max", "/proc/sys/kernel/threads-max"]
        .iter()
        .filter_map(|p| std::fs::read_to_string(p).ok()?.trim().parse::<u64>().ok())
        .min()?;
    Some((available_kib, total_kib, limit.saturating_sub(tasks)))
}

impl HostReserve {
    /// Whether the host has `factor` times the reserve free; the reason when not.
    fn check(&self, factor: u64) -> Result<(), String> {
        // A host whose /proc cannot be read is not refused: the runtime still fails cleanly.
        let Some((available_kib, total_kib, free_tasks)) = host_free() else {
            return Ok(());
        };
        let reserve_mb = self
            .memory_mb
            .unwrap_or_else(|| ((total_kib >> 10) / 32).max(256));
        let available_mb = available_kib >> 10;
        if available_mb < reserve_mb.saturating_mul(factor) {
            return Err(format!(
                "the host has {available_mb} MiB of memory available, below its reserve of \
                 {} MiB",
                reserve_mb.saturating_mul(factor)
            ));
        }
        if free_tasks < self.tasks.saturating_mul(factor) {
            return Err(format!(
                "the host has {free_tasks} free process slots, below its reserve of {}",
                self.tasks.saturating_mul(factor)
            ));
        }
        Ok(())
    }
}

impl Manager {
    fn pools(&self) -> &Pools {
        &self.inner.pools
    }

    /// Refuses a new sandbox while the host is short of memory or tasks (503, nothing made).
    pub(crate) fn check_host_capacity(&self) -> Result<(), CoreError> {
        self.pools()
            .cfg
            .reserve
            .check(1)
            .map_err(CoreError::Capacity)
    }

    /// Starts the background task that keeps the pools filled (nothing without pools).
    pub(crate) fn start_pools(&self) {
        if !self.pools().enabled() {
            return;
        }
        let weak = Arc::downgrade(&self.inner);
        let wake = self.pools().wake.clone();
        tokio::spawn(async move { refill_loop(weak, wake).await });
    }

    /// The create path's warm half: hands out a member of the template's pool, personalised
    /// for `req`. `None`: no member (or none that answered), make it cold.
    pub(crate) async fn create_from_pool(
        &self,
        t: &Resolved,
        req: &CreateRequest,
    ) -> Result<Option<SandboxInfo>, CoreError> {
        if !req.env_vars.is_empty() && t.config.start_cmd.is_some() {
            return Ok(None);
        }
        // A request that cannot succeed must not cost a member.
        if self.network().is_some() {
            soulbox_net::Policy::compile(&req.network)
                .map_err(|e| CoreError::InvalidArgument(e.to_string()))?;
        }
        while let Some(handle) = self.pools().take(t, &req.template) {
            let t0 = Instant::now();
            match self.claim(&handle, t, req).await {
                Ok(info) => {
                    tracing::debug!(
                        id = %info.id,
                        claim_ms = t0.elapsed().as_secs_f64() * 1e3,
                        "created sandbox from the pool"
                    );
                    return Ok(Some(info));
                }
                Err(e) => {
                    tracing::warn!(id = %handle.id, error = %e, "a pool member failed its claim; destroying it");
                    self.pools().lost(t);
                    self.discard(&handle.id, &handle).await;
                    if matches!(e, CoreError::InvalidArgument(_) | CoreError::Store(_)) {
                        return Err(e);
                    }
                }
            }
        }
        Ok(None)
    }

    async fn claim(
        &self,
        handle: &SandboxHandle,
        t: &Resolved,
        req: &CreateRequest,
    ) -> Result<SandboxInfo, CoreError> {
        if let Some(net) = self.network()
            && net.config(&handle.id).as_ref() != Some(&req.network)
        {
            net.update(&handle.id, &req.network).await?;
        }
        // Members are initialised for their template and build without a create's env vars,
        // so only a create that has some needs a second init; skipping it for the others saves
        // the agent round trip that dominated claims in bursts (50 creates at once from a full
        // pool: the init took p50 11 ms, max 49 ms, on two cores).
        if !req.env_vars.is_empty() {
            let init = self.init_request(&handle.id, t, &req.env_vars);
            agent_client::init(
                &handle.socket_path,
                &init,
                CLAIM_TIMEOUT.min(self.inner.cfg.agent_timeout),
            )
            .await?;
        }
        self.finish_create(handle, t, req).await
    }

    /// Ids of every member and what each pool holds (diagnostics, leak checks, the bench).
    pub fn pool_status(&self) -> Vec<WarmPool> {
        let now = self.pools().now();
        let mut st = self.pools().lock();
        let mut out: Vec<WarmPool> = st
            .pools
            .values_mut()
            .map(|p| WarmPool {
                template: p.reference.clone(),
                template_id: p.template.name.clone(),
                build_id: p.template.build_id.clone(),
                idle: p.idle.iter().map(|m| m.handle.id.clone()).collect(),
                starting: p.starting,
                target: p.target(now),
                min: p.min,
                max: p.max,
                hits: p.hits,
                misses: p.misses,
                lost: p.lost,
                failures: p.failures,
            })
            .collect();
        out.sort_by(|a, b| a.template.cmp(&b.template));
        out
    }

    /// Stops making members and destroys the idle ones (server stop). Members still being
    /// made are destroyed when they are done, or reaped by the next start.
    pub async fn shutdown_pools(&self) {
        let members: Vec<Member> = {
            let mut st = self.pools().lock();
            st.closed = true;
            st.pools
                .values_mut()
                .flat_map(|p| p.idle.drain(..))
                .collect()
        };
        self.destroy_members(members).await;
    }

    async fn destroy_members(&self, members: Vec<Member>) {
        for m in members {
            m.watcher.abort();
            self.discard(&m.handle.id, &m.handle).await;
            self.pools().lock().ids.remove(&m.handle.id);
        }
    }

    /// One pass: follows template rebuilds and deletions, then starts the births each pool
    /// lacks and destroys the members it no longer needs.
    async fn pool_tick(&self) {
        let pools = self.pools();
        let references: Vec<(String, usize, usize, bool)> = {
            let st = pools.lock();
            if st.closed {
                return;
            }
            let mut refs: Vec<(String, usize, usize, bool)> = pools
                .cfg
                .templates
                .iter()
                .map(|t| (t.template.clone(), t.min, t.max, true))
                .collect();
            for p in st.pools.values().filter(|p| !p.configured) {
                if !refs.iter().any(|r| r.0 == p.reference) {
                    refs.push((p.reference.clone(), p.min, p.max, false));
                }
            }
            refs
        };
        let mut stale = Vec::new();
        for (reference, min, max, configured) in references {
            let resolved = self.resolve_template(&reference).await.ok();
            let mut st = pools.lock();
            let key = resolved.as_ref().map(Key::of);
            let old: Vec<Key> = st
                .pools
                .iter()
                .filter(|(k, p)| p.reference == reference && Some(*k) != key.as_ref())
                .map(|(k, _)| k.clone())
                .collect();
            for k in old {
                if let Some(mut p) = st.pools.remove(&k) {
                    tracing::info!(
                        template = %reference,
                        build = %k.build,
                        members = p.idle.len(),
                        "draining a pool: its template was rebuilt or removed"
                    );
                    stale.extend(p.idle.drain(..));
                }
            }
            if let (Some(t), Some(key)) = (resolved, key)
                && max > 0
            {
                let pool = st
                    .pools
                    .entry(key)
                    .or_insert_with(|| Pool::new(&reference, Arc::new(t), min, max, configured));
                // A create may have made it adaptive before this tick saw the template.
                if configured && !pool.configured {
                    (pool.min, pool.max, pool.configured) = (min, max.max(min), true);
                    pool.reference = reference;
                }
            }
        }
        self.destroy_members(stale).await;

        let now = pools.now();
        let room = pools.cfg.reserve.check(2);
        let mut births = Vec::new();
        let mut surplus = Vec::new();
        {
            let mut st = pools.lock();
            let mut empty = Vec::new();
            for (key, p) in st.pools.iter_mut() {
                let target = p.target(now);
                let have = p.idle.len() + p.starting;
                if have < target && p.retry_at.is_none_or(|at| Instant::now() >= at) {
                    if let Err(why) = &room {
                        tracing::debug!(template = %p.reference, "not refilling the pool: {why}");
                    } else {
                        for _ in have..target {
                            let Ok(permit) = pools.births.clone().try_acquire_owned() else {
                                break;
                            };
                            p.starting += 1;
                            births.push((key.clone(), p.template.clone(), permit));
                        }
                    }
                }
                // Shrink only what is idle beyond the target (oldest first).
                while p.idle.len() > target && p.starting == 0 {
                    if let Some(m) = p.idle.pop_front() {
                        surplus.push(m);
                    }
                }
                if !p.configured && target == 0 && p.idle.is_empty() && p.starting == 0 {
                    empty.push(key.clone());
                }
            }
            for k in empty {
                st.pools.remove(&k);
            }
        }
        for (key, template, permit) in births {
            let this = self.clone();
            tokio::spawn(async move {
                this.birth(key, template).await;
                drop(permit);
            });
        }
        self.destroy_members(surplus).await;
    }

    /// Makes one member of `template` for the pool `key`.
    async fn birth(&self, key: Key, template: Arc<Resolved>) {
        let pools = self.pools();
        let made = async {
            let id = self.unused_id().await?;
            pools.lock().ids.insert(id.clone());
            let made = self
                .prepare(
                    &id,
                    &template,
                    &Default::default(),
                    &EgressConfig::default(),
                )
                .await;
            match &made {
                Ok(handle) => self.warm_up(handle, &template).await,
                Err(_) => {
                    pools.lock().ids.remove(&id);
                }
            }
            made
        }
        .await;
        // Kept, or handed back to be destroyed (pool drained or closed meanwhile).
        let unwanted = {
            let mut st = pools.lock();
            let closed = st.closed;
            match (st.pools.get_mut(&key), made) {
                (Some(pool), Ok(handle)) => {
                    pool.starting = pool.starting.saturating_sub(1);
                    pool.failures = 0;
                    pool.retry_at = None;
                    if closed {
                        Some(handle)
                    } else {
                        let watcher = self.watch_member(key, handle.clone());
                        pool.idle.push_back(Member { handle, watcher });
                        None
                    }
                }
                (Some(pool), Err(e)) => {
                    pool.starting = pool.starting.saturating_sub(1);
                    pool.failures = pool.failures.saturating_add(1);
                    let backoff = Duration::from_secs(1 << pool.failures.min(6)).min(MAX_BACKOFF);
                    pool.retry_at = Some(Instant::now() + backoff);
                    tracing::warn!(
                        template = %pool.reference,
                        failures = pool.failures,
                        retry_in_s = backoff.as_secs(),
                        error = %e,
                        "making a pool member failed"
                    );
                    None
                }
                (None, made) => made.ok(),
            }
        };
        if let Some(h) = unwanted {
            self.discard(&h.id, &h).await;
            pools.lock().ids.remove(&h.id);
        }
    }

    /// Runs what the SDKs run first (a login shell, as the template's user) once in a new
    /// member. The first command in a sandbox costs about twice what later ones do (its
    /// overlay's first lookups of the shell's files, the agent's first spawn); a member pays
    /// that while it waits instead of its client. Only a warm-up: a failure is not one of
    /// the member (templates without bash, say).
    async fn warm_up(&self, handle: &SandboxHandle, t: &Resolved) {
        let p = Proc {
            cmd: "/bin/bash".into(),
            args: vec!["-l".into(), "-c".into(), "true".into()],
            envs: HashMap::new(),
            cwd: Some(t.config.workdir.clone()),
            user: t.config.user.clone(),
        };
        let ran = tokio::time::timeout(
            WARM_UP_TIMEOUT,
            template_exec::run(&handle.socket_path, &p, |_, _| {}),
        )
        .await;
        if !matches!(ran, Ok(Ok(0))) {
            tracing::debug!(id = %handle.id, "warming up a pool member did not work; it is kept cold");
        }
    }

    /// Destroys the member if its PID 1 exits while it is idle (a claim aborts this task).
    fn watch_member(&self, key: Key, handle: SandboxHandle) -> AbortHandle {
        let this = self.clone();
        tokio::spawn(async move {
            this.inner.runtime.exited(&handle).await;
            let found = {
                let mut st = this.pools().lock();
                let pool = st.pools.get_mut(&key);
                let found = pool.and_then(|p| {
                    let i = p.idle.iter().position(|m| m.handle.id == handle.id)?;
                    p.lost += 1;
                    p.idle.remove(i)
                });
                found.is_some()
            };
            if found {
                tracing::warn!(id = %handle.id, "a pool member died while idle; replacing it");
                this.discard(&handle.id, &handle).await;
                this.pools().lock().ids.remove(&handle.id);
                this.pools().wake.notify_one();
            }
        })
        .abort_handle()
    }
}

async fn refill_loop(weak: Weak<Inner>, wake: Arc<Notify>) {
    loop {
        {
            let Some(inner) = weak.upgrade() else {
                return;
            };
            let manager = Manager { inner };
            if manager.pools().lock().closed {
                return;
            }
            manager.pool_tick().await;
        }
        tokio::select! {
            () = wake.notified() => {}
            () = tokio::time::sleep(TICK) => {}
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn pool_sizes_parse() {
        let p: PoolSize = "base=2".parse().expect("fixed");
        assert_eq!((p.template.as_str(), p.min, p.max), ("base", 2, 2));
        let p: PoolSize = "code-interpreter-v1=1..4".parse().expect("range");
        assert_eq!(
            (p.template.as_str(), p.min, p.max),
            ("code-interpreter-v1", 1, 4)
        );
        let p: PoolSize = "mine:v2=0:8".parse().expect("tagged, colon range");
        assert_eq!((p.template.as_str(), p.min, p.max), ("mine:v2", 0, 8));
        for bad in [
            "base",
            "=2",
            "base=x",
            "base=4..2",
            "base=-1",
            "base=1..",
            "base=",
        ] {
            assert!(bad.parse::<PoolSize>().is_err(), "{bad}");
        }
    }

    #[test]
    fn demand_is_the_busiest_second_of_the_window() {
        let mut d = Demand::default();
        assert_eq!(d.peak(0), 0);
        for _ in 0..5 {
            d.record(10);
        }
        d.record(11);
        assert_eq!(d.peak(11), 5);
        assert_eq!(d.peak(69), 5);
        // Second 10 left the window; second 11 is still in it.
        assert_eq!(d.peak(70), 1);
        assert_eq!(d.peak(71), 0);
        // A slot reused a lap later starts from zero.
        d.record(70);
        assert_eq!(d.peak(70), 1);
    }

    #[test]
    fn targets_follow_demand_within_bounds() {
        let t = Arc::new(Resolved {
            name: "t".into(),
            alias: None,
            build_id: Some("b".into()),
            layers: Vec::new(),
            config: Default::default(),
        });
        let mut p = Pool::new("t", t, 2, 8, true);
        assert_eq!(p.target(0), 2);
        for _ in 0..5 {
            p.demand.record(3);
        }
        assert_eq!(p.target(3), 5);
        for _ in 0..50 {
            p.demand.record(4);
        }
        assert_eq!(p.target(4), 8);
        assert_eq!(p.target(100), 2);
    }

    #[test]
    fn host_reserve_refuses_an_impossible_reserve() {
        let generous = HostReserve {
            memory_mb: Some(0),
            tasks: 0,
        };
        assert!(generous.check(1).is_ok());
        let memory = HostReserve {
            memory_mb: Some(u64::MAX >> 20),
            tasks: 0,
        };
        assert!(memory.check(1).is_err_and(|e| e.contains("memory")));
        let tasks = HostReserve {
            memory_mb: Some(0),
            tasks: u64::MAX / 4,
        };
        assert!(tasks.check(1).is_err_and(|e| e.contains("process slots")));
    }
}
