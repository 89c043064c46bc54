//! Pause and resume (docs/persistence.md).
//!
//! Two kinds of pause, as E2B's SDKs name them:
//!
//! * **full**: every process of the sandbox is frozen in its cgroup (cgroup2 `cgroup.freeze`,
//!   else the v1 freezer). Memory, PIDs, open files, sockets, PTYs and the network slot stay as
//!   they are; resume thaws them in milliseconds. The frozen processes are not children of the
//!   server, so a full pause survives `kill -9` of the server and a restart. A host reboot
//!   ends them: the sandbox then stays paused with its files, and resumes by booting again over
//!   them (its pause is marked as having lost its memory).
//! * **filesystem**: the processes end and the cgroups and network slot go back; the state
//!   directory (the writable layer, the uid range) stays. Resume boots the sandbox again over
//!   its files in a new slot with the egress configuration it had, and reruns the template's
//!   start command.
//!
//! Crash safety: a pause records the row as paused *before* it stops anything, and a resume
//! records it running only once the sandbox answers, so a server killed in between finds a
//! paused row on restart and finishes the job (`Manager::adopt_paused`): nothing is lost and
//! nothing runs twice.
//!
//! What sandboxed code can do with this: nothing new. A frozen sandbox cannot run; a thawed
//! or rebooted one is the same sandbox with the same limits, uid range and policy. Its agent
//! can refuse to answer the health check a strict pause makes (the pause is then refused) or
//! the init of a reboot (the resume fails and the sandbox stays paused).

use std::collections::HashSet;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use chrono::Utc;
use serde::{Deserialize, Serialize};
use soulbox_net::EgressConfig;
use soulbox_runtime::{RuntimeError, SandboxHandle, SandboxSpec};
use soulbox_store::SandboxRecord;
use soulbox_wire::rest::SandboxState;

use crate::{
    CoreError, Manager, SandboxInfo, agent_client, info_from, now_millis, stored_handle, to_chrono,
    validate_timeout_duration,
};

/// How long a pause waits for the agent's health answer before calling it unresponsive.
const HEALTH_TIMEOUT: Duration = Duration::from_secs(2);
/// Timeout of a sandbox resumed without one (E2B's default sandbox timeout).
pub const DEFAULT_RESUME_TIMEOUT: Duration = Duration::from_secs(300);
/// How long an auto-pause that failed waits before it tries again.
const AUTO_PAUSE_RETRY: Duration = Duration::from_secs(30);

/// What a pause keeps (E2B `mode`, `memory: true|false`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, Default)]
#[serde(rename_all = "lowercase")]
pub enum PauseMode {
    /// Memory and files: the sandbox goes on where it stopped.
    #[default]
    Full,
    /// Files only: the sandbox boots again over them.
    Filesystem,
}

impl PauseMode {
    pub fn as_str(self) -> &'static str {
        match self {
            PauseMode::Full => "full",
            PauseMode::Filesystem => "filesystem",
        }
    }

    /// E2B's `memory` flag: `None` is the API's default, a full pause.
    pub fn from_memory(memory: Option<bool>) -> PauseMode {
        if memory == Some(false) {
            PauseMode::Filesystem
        } else {
            PauseMode::Full
        }
    }
}

/// What a create asked for on timeout and on traffic (E2B `autoPause`, `autoPauseMemory`,
/// `autoResume`), kept with the sandbox.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, Default)]
#[serde(rename_all = "camelCase")]
pub struct Lifecycle {
    /// On timeout: pause instead of kill.
    #[serde(default)]
    pub auto_pause: bool,
    /// What that pause keeps.
    #[serde(default)]
    pub auto_pause_mode: PauseMode,
    /// Traffic to a paused sandbox (envd or a port) resumes it.
    #[serde(default)]
    pub auto_resume: bool,
    /// The create's timeout in milliseconds: what an auto-resume gives the sandbox again.
    #[serde(default)]
    pub timeout_ms: u64,
}

/// What a pause kept: the row's `pause` column.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub(crate) struct Paused {
    pub mode: PauseMode,
    /// A full pause whose processes are gone (the host restarted): it resumes by booting
    /// again over its files.
    #[serde(default)]
    pub memory_lost: bool,
    /// The agent did not answer the health check at pause time (E2B
    /// `envd_unresponsive_at_pause`): a plain resume is refused, a reboot is not.
    #[serde(default)]
    pub envd_unresponsive: bool,
    /// The egress configuration of a sandbox whose network slot went back.
    #[serde(default)]
    pub egress: Option<EgressConfig>,
    pub paused_at_ms: i64,
}

impl Paused {
    pub(crate) fn parse(rec: &SandboxRecord) -> Result<Paused, CoreError> {
        let text = rec.pause.as_deref().unwrap_or_default();
        serde_json::from_str(text)
            .map_err(|e| CoreError::Internal(format!("stored pause of {}: {e}", rec.id)))
    }

    /// Whether resuming boots the sandbox again (no memory to go back to).
    fn cold(&self) -> bool {
        self.mode == PauseMode::Filesystem || self.memory_lost
    }
}

pub(crate) fn parse_lifecycle(rec: &SandboxRecord) -> Lifecycle {
    serde_json::from_str(&rec.lifecycle).unwrap_or_default()
}

/// Sandboxes with a pause, resume or snapshot under way: a second one is refused, not
/// interleaved.
#[derive(Default)]
pub(crate) struct Transitions(Mutex<HashSet<String>>);

/// Holds a sandbox's place in [`Transitions`] until dropped.
pub(crate) struct Transition {
    set: Arc<crate::Inner>,
    id: String,
}

impl Drop for Transition {
    fn drop(&mut self) {
        self.set
            .transitions
            .0
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .remove(&self.id);
    }
}

/// How a resume went.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Resumed {
    /// It was running: only its timeout may have moved.
    WasRunning,
    /// It was paused and runs again.
    Resumed,
}

impl Manager {
    pub(crate) fn begin(&self, id: &str) -> Result<Transition, CoreError> {
        let mut set = self
            .inner
            .transitions
            .0
            .lock()
            .unwrap_or_else(|e| e.into_inner());
        if !set.insert(id.to_owned()) {
            return Err(CoreError::Conflict(format!(
                "sandbox {id} is being paused, resumed or snapshotted"
            )));
        }
        Ok(Transition {
            set: self.inner.clone(),
            id: id.to_owned(),
        })
    }

    /// `POST /sandboxes/{id}/pause`. Runs to completion even if the caller goes away.
    /// [`CoreError::Conflict`] when it is paused already; with `strict`, an agent that does
    /// not answer refuses the pause ([`CoreError::Unavailable`]) and the sandbox keeps
    /// running. A failure leaves it running.
    pub async fn pause(&self, id: &str, mode: PauseMode, strict: bool) -> Result<(), CoreError> {
        let this = self.clone();
        let id = id.to_owned();
        tokio::spawn(async move { this.pause_inner(&id, mode, strict).await })
            .await
            .map_err(|e| CoreError::Internal(format!("pause task: {e}")))?
    }

    pub(crate) async fn pause_inner(
        &self,
        id: &str,
        mode: PauseMode,
        strict: bool,
    ) -> Result<(), CoreError> {
        let _busy = self.begin(id)?;
        let rec = self.record(id).await?;
        if rec.state == SandboxState::Paused {
            return Err(CoreError::Conflict(format!(
                "sandbox {id} is already paused"
            )));
        }
        let Some(live) = self.untrack(id) else {
            return Err(CoreError::NotFound(id.to_owned()));
        };
        let handle = live.handle;
        let healthy = agent_client::healthy(&handle.socket_path, HEALTH_TIMEOUT).await;
        if !healthy && (strict || mode == PauseMode::Filesystem) {
            self.track(&rec, handle)?;
            return Err(CoreError::Unavailable(format!(
                "the agent of sandbox {id} does not respond; it was not paused"
            )));
        }
        let paused = Paused {
            mode,
            memory_lost: false,
            envd_unresponsive: !healthy,
            egress: self.network_config(id),
            paused_at_ms: Utc::now().timestamp_millis(),
        };
        let text = serde_json::to_string(&paused)
            .map_err(|e| CoreError::Internal(format!("encoding a pause: {e}")))?;
        // Recorded first: a server that dies from here on finds the row paused and finishes
        // the pause on restart.
        if !self.inner.store.set_paused(id, &text).await? {
            self.track(&rec, handle)?;
            return Err(CoreError::Conflict(format!(
                "sandbox {id} is already paused"
            )));
        }
        let t0 = std::time::Instant::now();
        let stopped = match mode {
            PauseMode::Full => self.inner.runtime.freeze(&handle, true).await,
            PauseMode::Filesystem => self.inner.runtime.stop(&handle).await,
        };
        if let Err(e) = stopped {
            tracing::error!(%id, error = %e, "pausing failed; the sandbox keeps running");
            self.undo_pause(&rec, handle, mode).await?;
            return Err(e.into());
        }
        if mode == PauseMode::Filesystem {
            self.release_network(id).await;
        }
        tracing::info!(%id, mode = mode.as_str(), ms = t0.elapsed().as_secs_f64() * 1e3, "paused sandbox");
        Ok(())
    }

    /// A pause that failed after the row said paused: the sandbox runs on as before (thawed;
    /// after a failed stop, whatever still runs is ended and it boots again on resume).
    async fn undo_pause(
        &self,
        rec: &SandboxRecord,
        handle: SandboxHandle,
        mode: PauseMode,
    ) -> Result<(), CoreError> {
        if mode == PauseMode::Full {
            if let Err(e) = self.inner.runtime.freeze(&handle, false).await {
                tracing::error!(id = %rec.id, error = %e, "thawing after a failed pause");
            }
            let text = serde_json::to_string(&handle)
                .map_err(|e| CoreError::Internal(format!("encoding handle: {e}")))?;
            self.inner
                .store
                .set_resumed(&rec.id, &text, rec.end_at)
                .await?;
            return self.track(rec, handle);
        }
        // A stop that failed half-way: the sandbox cannot be trusted to run on; it stays
        // paused (filesystem) and boots again from its files on resume.
        Ok(())
    }

    /// Resume through `connect` (v1 and v2) and the legacy `resume`: a running sandbox gets
    /// its timeout extended to `timeout` from now, never shortened; a paused one runs again
    /// with that timeout (`None`: [`DEFAULT_RESUME_TIMEOUT`]). `memory: Some(false)` (E2B's
    /// `on_resume="reboot"`) boots a fully paused sandbox again over its files instead.
    pub async fn resume(
        &self,
        id: &str,
        timeout: Option<Duration>,
        memory: Option<bool>,
    ) -> Result<(SandboxInfo, Resumed), CoreError> {
        if let Some(t) = timeout {
            validate_timeout_duration(t)?;
        }
        let this = self.clone();
        let id = id.to_owned();
        tokio::spawn(async move { this.resume_inner(&id, timeout, memory).await })
            .await
            .map_err(|e| CoreError::Internal(format!("resume task: {e}")))?
    }

    async fn resume_inner(
        &self,
        id: &str,
        timeout: Option<Duration>,
        memory: Option<bool>,
    ) -> Result<(SandboxInfo, Resumed), CoreError> {
        let rec = self.record(id).await?;
        let timeout = timeout.unwrap_or(DEFAULT_RESUME_TIMEOUT);
        if rec.state == SandboxState::Running {
            return Ok((self.connect(id, timeout).await?, Resumed::WasRunning));
        }
        let _busy = self.begin(id)?;
        // Read again under the transition: a pause or resume may have just finished.
        let rec = self.record(id).await?;
        if rec.state == SandboxState::Running {
            drop(_busy);
            return Ok((self.connect(id, timeout).await?, Resumed::WasRunning));
        }
        let paused = Paused::parse(&rec)?;
        if paused.envd_unresponsive && !paused.cold() && memory != Some(false) {
            return Err(CoreError::Conflict(format!(
                "sandbox {id} was paused while its agent did not respond; resume it with \
                 memory: false (on_resume=\"reboot\") to boot it from its files"
            )));
        }
        let end_at = now_millis() + to_chrono(timeout)?;
        let handle = stored_handle(&rec)?;
        let t0 = std::time::Instant::now();
        let handle = if !paused.cold() && memory != Some(false) && self.inner.runtime.adopt(&handle)
        {
            self.inner.runtime.freeze(&handle, false).await?;
            handle
        } else {
            self.reboot(&rec, &paused, &handle).await?
        };
        let text = serde_json::to_string(&handle)
            .map_err(|e| CoreError::Internal(format!("encoding handle: {e}")))?;
        if !self.inner.store.set_resumed(id, &text, end_at).await? {
            // Killed meanwhile (kill does not wait for transitions): end what we started.
            self.discard(id, &handle).await;
            return Err(CoreError::NotFound(id.to_owned()));
        }
        let mut rec = rec;
        rec.state = SandboxState::Running;
        rec.pause = None;
        rec.end_at = end_at;
        rec.handle = text;
        self.track(&rec, handle)?;
        tracing::info!(%id, cold = paused.cold() || memory == Some(false), ms = t0.elapsed().as_secs_f64() * 1e3, "resumed sandbox");
        let mut info = info_from(rec);
        info.network = self.network_config(id);
        Ok((info, Resumed::Resumed))
    }

    /// Boots a paused sandbox again over its kept files: processes left from a full pause
    /// end, then a new PID 1 in a new network slot (with the egress it had), agent init with
    /// the template's and the create's environment, and the template's start command. A
    /// failure leaves it paused (filesystem), its files untouched.
    async fn reboot(
        &self,
        rec: &SandboxRecord,
        paused: &Paused,
        old: &SandboxHandle,
    ) -> Result<SandboxHandle, CoreError> {
        let id = &rec.id;
        let egress = paused
            .egress
            .clone()
            .or_else(|| self.network_config(id))
            .unwrap_or_default();
        if paused.mode == PauseMode::Full && !paused.memory_lost {
            // Its memory is given up: record that first, so a crash here is still resumable.
            let lost = Paused {
                memory_lost: true,
                egress: Some(egress.clone()),
                ..paused.clone()
            };
            self.record_pause(id, &lost).await?;
        }
        self.inner.runtime.stop(old).await?;
        self.release_network(id).await;
        let template = self.resolve_sandbox_template(rec).await?;
        let spec = SandboxSpec {
            id: id.clone(),
            layers: template.layers.clone(),
            limits: soulbox_runtime::Limits {
                cpu_count: rec.cpu_count,
                memory_mb: rec.memory_mb,
                disk_mb: rec.disk_mb,
                ..soulbox_runtime::Limits::default()
            },
            volumes: self.recorded_volume_mounts(id).await?,
        };
        let attach = self.attach_network(id, &egress).await?;
        let resolv_conf = attach.as_ref().map(|a| a.resolv_conf.clone());
        let handle = match self.inner.runtime.resume_with_network(&spec, attach).await {
            Ok(h) => h,
            Err(e) => {
                self.release_network(id).await;
                return Err(match e {
                    RuntimeError::NoUidRange => CoreError::Capacity(e.to_string()),
                    e => e.into(),
                });
            }
        };
        let setup = async {
            let mut init = self.init_request(id, &template, &rec.env_vars);
            init.resolv_conf = resolv_conf;
            agent_client::init(&handle.socket_path, &init, self.inner.cfg.agent_timeout).await?;
            self.start_template_processes(&handle, &template).await
        }
        .await;
        if let Err(e) = setup {
            if let Err(e) = self.inner.runtime.stop(&handle).await {
                tracing::error!(%id, error = %e, "stopping a sandbox whose reboot failed");
            }
            self.release_network(id).await;
            return Err(e);
        }
        Ok(handle)
    }

    async fn record_pause(&self, id: &str, paused: &Paused) -> Result<(), CoreError> {
        let text = serde_json::to_string(paused)
            .map_err(|e| CoreError::Internal(format!("encoding a pause: {e}")))?;
        if !self.inner.store.update_pause(id, &text).await? {
            return Err(CoreError::NotFound(id.to_owned()));
        }
        Ok(())
    }

    /// Traffic for a sandbox that is not live: resumes it when it is paused with
    /// `autoResume` and its memory (a filesystem pause resumes only explicitly, as E2B's).
    /// `may_wake` gets the sandbox's access token (if it has one) and says whether the
    /// request may wake it (the gateway checks the request's token). `true` when it runs now.
    pub async fn resume_on_traffic(
        &self,
        id: &str,
        may_wake: impl FnOnce(Option<&str>) -> bool,
    ) -> bool {
        let Ok(Some(rec)) = self.inner.store.get_sandbox(id).await else {
            return false;
        };
        let lifecycle = parse_lifecycle(&rec);
        if rec.state != SandboxState::Paused || !lifecycle.auto_resume {
            return false;
        }
        if !may_wake(rec.access_token.as_deref()) {
            return false;
        }
        if Paused::parse(&rec).is_ok_and(|p| p.mode == PauseMode::Filesystem) {
            return false;
        }
        let timeout = (lifecycle.timeout_ms > 0)
            .then(|| Duration::from_millis(lifecycle.timeout_ms))
            .filter(|t| validate_timeout_duration(*t).is_ok());
        match self.resume(id, timeout, None).await {
            Ok(_) => true,
            Err(e) => {
                tracing::warn!(%id, error = %e, "auto-resume on traffic failed");
                false
            }
        }
    }

    /// The watcher's timeout for a sandbox created with `autoPause`: pauses it; if that
    /// fails, it runs on and is tried again a little later (a timeout never loses it).
    pub(crate) async fn auto_pause(&self, id: &str, lifecycle: Lifecycle) {
        match self.pause_inner(id, lifecycle.auto_pause_mode, false).await {
            Ok(()) => {}
            Err(CoreError::NotFound(_)) => {}
            Err(e) => {
                tracing::error!(%id, error = %e, "auto-pause failed; trying again later");
                let retry =
                    now_millis() + chrono::Duration::seconds(AUTO_PAUSE_RETRY.as_secs() as i64);
                if let Err(e) = self.move_deadline(id, retry).await {
                    tracing::error!(%id, error = %e, "moving the deadline of a failed auto-pause");
                }
            }
        }
    }

    /// At start, for a paused row: a full pause whose processes are still there stays frozen
    /// (frozen again, if the server died mid-pause); one whose processes are gone has lost
    /// its memory and will boot again; a filesystem pause has its leftovers ended. Returns
    /// whether it keeps its network lease.
    pub(crate) async fn adopt_paused(
        &self,
        rec: &SandboxRecord,
        handle: &SandboxHandle,
    ) -> Result<bool, CoreError> {
        let id = &rec.id;
        let mut paused = Paused::parse(rec)?;
        if paused.mode == PauseMode::Full && !paused.memory_lost {
            if self.inner.runtime.adopt(handle) {
                self.inner.runtime.freeze(handle, true).await?;
                tracing::info!(%id, "re-adopted paused sandbox (frozen)");
                return Ok(true);
            }
            tracing::warn!(%id, "the processes of a paused sandbox are gone (host restart?); it resumes from its files");
            paused.memory_lost = true;
            if paused.egress.is_none() {
                paused.egress = self.network_config(id);
            }
            self.record_pause(id, &paused).await?;
        }
        self.inner.runtime.stop(handle).await?;
        Ok(false)
    }
}
