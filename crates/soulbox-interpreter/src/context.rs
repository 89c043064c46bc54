//! Contexts (one kernel each) and the registry of them.
//!
//! A context serialises its executions. Its kernel can be replaced underneath: by an explicit
//! restart, by the supervisor after the kernel died, or after a kernel ignored an interrupt.
//! Any execution still running on the old kernel sees it exit and reports why.

use std::collections::{BTreeMap, HashMap};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex as StdMutex, Weak};
use std::time::Duration;

use tokio::sync::mpsc;
use tokio::time::Instant;

use crate::kernel::{Kernel, KernelError, Next};
use crate::kernelspec::{KernelCatalog, KernelSpec, normalize_language};
use crate::lock;
use crate::output::ExecutionTracker;
use crate::snippets::{self, EnvFlavour};
use crate::wire::{ContextInfo, OutputEvent};

/// How long a kernel gets to stop after an interrupt before it is restarted.
const INTERRUPT_GRACE: Duration = Duration::from_secs(10);

/// Error name E2B uses when the kernel under an execution went away.
const CONTEXT_RESTARTING: &str = "ContextRestarting";

/// Errors of the context API, mapped to HTTP statuses by the server.
#[derive(Debug, thiserror::Error)]
pub enum ContextError {
    #[error("Context {0} not found")]
    NotFound(String),
    #[error("{0}")]
    BadRequest(String),
    #[error("{0}")]
    Kernel(#[from] KernelError),
}

/// Why a kernel was stopped on purpose; an exit without one is a crash.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum StopReason {
    Restarted,
    Deleted,
    Unresponsive,
}

impl StopReason {
    fn message(self) -> &'static str {
        match self {
            StopReason::Restarted => "Context was restarted",
            StopReason::Deleted => "Context was deleted",
            StopReason::Unresponsive => {
                "The kernel did not stop after an interrupt and was restarted; its state was lost"
            }
        }
    }
}

struct Notice {
    message: String,
    /// For a crash: whether an execution already reported it (then the notice is moot).
    reported: Option<Arc<AtomicBool>>,
}

pub struct Context {
    info: ContextInfo,
    spec: KernelSpec,
    cwd: PathBuf,
    runtime_dir: PathBuf,
    /// Held for the whole of an execution (env set-up, code, env restore).
    turn: tokio::sync::Mutex<()>,
    /// The current kernel; `None` while (re)starting failed or after deletion.
    slot: tokio::sync::Mutex<Option<Arc<Kernel>>>,
    /// Stop reasons by kernel, so an execution on a replaced kernel can say what happened.
    stopped: StdMutex<Vec<(Weak<Kernel>, StopReason)>>,
    /// Something the next execution must report instead of running: a crash outside any
    /// execution, or a restart after an ignored interrupt.
    notice: StdMutex<Option<Notice>>,
    deleted: AtomicBool,
}

impl Context {
    pub fn info(&self) -> &ContextInfo {
        &self.info
    }

    pub fn language(&self) -> &str {
        &self.info.language
    }

    /// Runs one `/execute` request, sending its output lines to `out`. A closed `out` (the
    /// client went away) interrupts the kernel; the execution is still drained to the end so
    /// the next one starts on an idle kernel.
    pub async fn execute(
        self: Arc<Self>,
        code: String,
        env: Option<(EnvFlavour, BTreeMap<String, String>)>,
        out: mpsc::Sender<OutputEvent>,
    ) {
        let _turn = self.turn.lock().await;
        let notice = lock(&self.notice).take();
        if let Some(notice) = notice
            && notice
                .reported
                .is_none_or(|reported| !reported.swap(true, Ordering::SeqCst))
        {
            let _ = out
                .send(OutputEvent::service_error(
                    CONTEXT_RESTARTING,
                    notice.message,
                ))
                .await;
            return;
        }
        let kernel = match self.kernel().await {
            Ok(kernel) => kernel,
            Err(err) => {
                let _ = out
                    .send(OutputEvent::service_error(
                        CONTEXT_RESTARTING,
                        err.to_string(),
                    ))
                    .await;
                return;
            }
        };
        let env = env.filter(|(_, vars)| !vars.is_empty());
        if let Some((flavour, vars)) = &env
            && let Err(err) = run_silent(&kernel, &snippets::set_env(*flavour, vars)).await
        {
            let _ = out
                .send(OutputEvent::service_error(
                    "EnvVarsError",
                    format!("could not set env_vars: {err}"),
                ))
                .await;
            return;
        }
        let completed = self.run_code(&kernel, &code, &out).await;
        if completed
            && let Some((flavour, vars)) = &env
            && let Err(err) = run_silent(&kernel, &snippets::restore_env(*flavour, vars)).await
        {
            tracing::warn!(context = %self.info.id, %err, "restoring env_vars failed");
        }
    }

    /// Streams one user execution; false when the kernel went away before it finished.
    async fn run_code(
        self: &Arc<Self>,
        kernel: &Arc<Kernel>,
        code: &str,
        out: &mpsc::Sender<OutputEvent>,
    ) -> bool {
        let mut request = match kernel.execute(code, false).await {
            Ok(request) => request,
            Err(err) => {
                let _ = out
                    .send(OutputEvent::service_error(
                        CONTEXT_RESTARTING,
                        err.to_string(),
                    ))
                    .await;
                return false;
            }
        };
        let mut tracker = ExecutionTracker::default();
        let mut abandoned_at: Option<Instant> = None;
        loop {
            let deadline = abandoned_at.map(|at| at + INTERRUPT_GRACE);
            tokio::select! {
                biased;
                next = request.next() => match next {
                    Next::Message(message) => {
                        if let Some(event) = tracker.observe(message)
                            && abandoned_at.is_none()
                            && out.send(event).await.is_err()
                        {
                            abandoned_at = Some(self.abandon(kernel).await);
                        }
                        if tracker.finished() {
                            return true;
                        }
                    }
                    Next::Exited(status) => {
                        kernel.claim_exit_report();
                        if abandoned_at.is_none() {
                            let message = match self.stop_reason(kernel) {
                                Some(reason) => reason.message().to_owned(),
                                None => crash_message(&status, &kernel.stderr_tail()),
                            };
                            let _ = out
                                .send(OutputEvent::service_error(CONTEXT_RESTARTING, message))
                                .await;
                        }
                        return false;
                    }
                },
                () = out.closed(), if abandoned_at.is_none() => {
                    abandoned_at = Some(self.abandon(kernel).await);
                }
                () = sleep_until_opt(deadline), if deadline.is_some() => {
                    tracing::warn!(context = %self.info.id, "kernel ignored the interrupt; restarting it");
                    drop(request);
                    if let Err(err) = self.replace_kernel(StopReason::Unresponsive).await {
                        tracing::warn!(context = %self.info.id, %err, "restart failed");
                    }
                    *lock(&self.notice) = Some(Notice {
                        message: StopReason::Unresponsive.message().to_owned(),
                        reported: None,
                    });
                    return false;
                }
            }
        }
    }

    /// The client went away: interrupt, and keep draining until the kernel is idle.
    async fn abandon(&self, kernel: &Kernel) -> Instant {
        tracing::info!(context = %self.info.id, "client disconnected; interrupting the kernel");
        kernel.interrupt().await;
        Instant::now()
    }

    /// The current kernel, starting one if the context has none (e.g. a failed restart).
    async fn kernel(self: &Arc<Self>) -> Result<Arc<Kernel>, ContextError> {
        let mut slot = self.slot.lock().await;
        if let Some(kernel) = slot.as_ref() {
            return Ok(kernel.clone());
        }
        if self.deleted.load(Ordering::SeqCst) {
            return Err(ContextError::NotFound(self.info.id.clone()));
        }
        let kernel = self.boot().await?;
        *slot = Some(kernel.clone());
        Ok(kernel)
    }

    /// Restarts the kernel: a fresh process with empty state, same id, language and cwd.
    pub async fn restart(self: &Arc<Self>) -> Result<(), ContextError> {
        self.replace_kernel(StopReason::Restarted).await
    }

    async fn replace_kernel(self: &Arc<Self>, reason: StopReason) -> Result<(), ContextError> {
        let mut slot = self.slot.lock().await;
        if let Some(old) = slot.take() {
            self.stop(&old, reason);
        }
        if self.deleted.load(Ordering::SeqCst) {
            return Err(ContextError::NotFound(self.info.id.clone()));
        }
        *slot = Some(self.boot().await?);
        Ok(())
    }

    /// Kills the kernel for good.
    pub async fn shut_down(&self) {
        self.deleted.store(true, Ordering::SeqCst);
        if let Some(kernel) = self.slot.lock().await.take() {
            self.stop(&kernel, StopReason::Deleted);
        }
    }

    fn stop(&self, kernel: &Arc<Kernel>, reason: StopReason) {
        let mut stopped = lock(&self.stopped);
        stopped.retain(|(k, _)| k.strong_count() > 0);
        stopped.push((Arc::downgrade(kernel), reason));
        drop(stopped);
        kernel.kill();
    }

    fn stop_reason(&self, kernel: &Arc<Kernel>) -> Option<StopReason> {
        lock(&self.stopped)
            .iter()
            .find(|(k, _)| std::ptr::eq(k.as_ptr(), Arc::as_ptr(kernel)))
            .map(|(_, reason)| *reason)
    }

    /// Starts and prepares a kernel and puts a supervisor on it.
    async fn boot(self: &Arc<Self>) -> Result<Arc<Kernel>, ContextError> {
        let kernel = Arc::new(Kernel::start(&self.spec, &self.cwd, &self.runtime_dir).await?);
        if kernel.implementation() == "ipython"
            && let Err(err) = run_silent(&kernel, snippets::IPYTHON_STARTUP).await
        {
            tracing::warn!(context = %self.info.id, %err, "IPython start-up code failed; rich output is limited");
        }
        self.supervise(&kernel);
        Ok(kernel)
    }

    /// Restarts the kernel if it dies on its own; a death outside any execution is reported
    /// by the next one, since the state it relied on is gone.
    fn supervise(self: &Arc<Self>, kernel: &Arc<Kernel>) {
        let context = Arc::downgrade(self);
        let watched = Arc::downgrade(kernel);
        let exited = kernel.exit_signal();
        tokio::spawn(async move {
            let status = exited.await;
            let (Some(context), Some(kernel)) = (context.upgrade(), watched.upgrade()) else {
                return;
            };
            if context.stop_reason(&kernel).is_some() || context.deleted.load(Ordering::SeqCst) {
                return;
            }
            let message = crash_message(&status, &kernel.stderr_tail());
            tracing::warn!(context = %context.info.id, %message);
            // An execution running on the kernel reports the crash itself and claims the flag.
            *lock(&context.notice) = Some(Notice {
                message,
                reported: Some(kernel.exit_report_flag()),
            });
            drop(kernel);
            let mut slot = context.slot.lock().await;
            let still_current = slot
                .as_ref()
                .is_some_and(|k| std::ptr::eq(Arc::as_ptr(k), watched.as_ptr()));
            if !still_current {
                return;
            }
            *slot = None;
            match context.boot().await {
                Ok(fresh) => *slot = Some(fresh),
                Err(err) => {
                    tracing::warn!(context = %context.info.id, %err, "kernel restart failed");
                }
            }
        });
    }
}

/// Runs service code in the kernel without output; an error in it is returned.
async fn run_silent(kernel: &Kernel, code: &str) -> Result<(), String> {
    let mut request = kernel
        .execute(code, true)
        .await
        .map_err(|e| e.to_string())?;
    let mut tracker = ExecutionTracker::default();
    let mut failure = None;
    loop {
        match request.next().await {
            Next::Message(message) => {
                if let Some(OutputEvent::Error { name, value, .. }) = tracker.observe(message) {
                    failure = Some(format!("{name}: {value}"));
                }
                if tracker.finished() {
                    return failure.map_or(Ok(()), Err);
                }
            }
            Next::Exited(status) => return Err(format!("kernel exited ({status})")),
        }
    }
}

fn crash_message(status: &str, stderr: &str) -> String {
    format!(
        "The kernel exited unexpectedly ({status}) and was restarted; its state was lost{stderr}"
    )
}

async fn sleep_until_opt(deadline: Option<Instant>) {
    match deadline {
        Some(deadline) => tokio::time::sleep_until(deadline).await,
        None => std::future::pending().await,
    }
}

/// All contexts of this service, in creation order, plus the default one per language.
pub struct Registry {
    catalog: StdMutex<KernelCatalog>,
    contexts: StdMutex<Vec<Arc<Context>>>,
    /// Language → id of its default context; the async lock makes concurrent first uses of a
    /// language share one kernel start.
    defaults: StdMutex<HashMap<String, Arc<tokio::sync::Mutex<Option<String>>>>>,
    default_cwd: PathBuf,
    runtime_dir: tempfile::TempDir,
}

impl Registry {
    /// `default_cwd` is where contexts start unless asked otherwise.
    pub fn new(catalog: KernelCatalog, default_cwd: PathBuf) -> std::io::Result<Registry> {
        // A private 0700 directory for the kernels' connection files.
        let runtime_dir = tempfile::Builder::new()
            .prefix("soulbox-interpreter-")
            .tempdir()?;
        Ok(Registry {
            catalog: StdMutex::new(catalog),
            contexts: StdMutex::new(Vec::new()),
            defaults: StdMutex::new(HashMap::new()),
            default_cwd,
            runtime_dir,
        })
    }

    /// Whether some kernel serves `language` (already normalised).
    pub fn supports(&self, language: &str) -> bool {
        self.spec_for(language).is_ok()
    }

    /// The kernel for a language; kernels installed after start-up are found by a rescan.
    fn spec_for(&self, language: &str) -> Result<KernelSpec, ContextError> {
        let mut catalog = lock(&self.catalog);
        if let Some(spec) = catalog.for_language(language) {
            return Ok(spec.clone());
        }
        *catalog = KernelCatalog::discover();
        catalog.for_language(language).cloned().ok_or_else(|| {
            ContextError::BadRequest(format!(
                "Unsupported language: {language:?}. Available languages: {}",
                catalog.languages().join(", ")
            ))
        })
    }

    /// Creates a context with its own kernel. A missing `cwd` is created.
    pub async fn create(
        &self,
        language: Option<&str>,
        cwd: Option<&str>,
    ) -> Result<Arc<Context>, ContextError> {
        let language = normalize_language(language);
        let spec = self.spec_for(&language)?;
        let cwd = match cwd.map(str::trim).filter(|c| !c.is_empty()) {
            Some(cwd) => PathBuf::from(cwd),
            None => self.default_cwd.clone(),
        };
        if !cwd.is_absolute() {
            return Err(ContextError::BadRequest(format!(
                "cwd must be an absolute path, got {:?}",
                cwd.display().to_string()
            )));
        }
        ensure_dir(&cwd).map_err(|err| {
            ContextError::BadRequest(format!(
                "cannot use {} as the working directory: {err}",
                cwd.display()
            ))
        })?;
        let context = Arc::new(Context {
            info: ContextInfo {
                id: uuid::Uuid::new_v4().to_string(),
                language,
                cwd: cwd.display().to_string(),
            },
            spec,
            cwd,
            runtime_dir: self.runtime_dir.path().to_owned(),
            turn: tokio::sync::Mutex::new(()),
            slot: tokio::sync::Mutex::new(None),
            stopped: StdMutex::new(Vec::new()),
            notice: StdMutex::new(None),
            deleted: AtomicBool::new(false),
        });
        context.kernel().await?;
        lock(&self.contexts).push(context.clone());
        Ok(context)
    }

    pub fn get(&self, id: &str) -> Option<Arc<Context>> {
        lock(&self.contexts)
            .iter()
            .find(|c| c.info.id == id)
            .cloned()
    }

    pub fn list(&self) -> Vec<ContextInfo> {
        lock(&self.contexts)
            .iter()
            .map(|c| c.info.clone())
            .collect()
    }

    /// The default context of a language, created on first use.
    pub async fn default_for(&self, language: Option<&str>) -> Result<Arc<Context>, ContextError> {
        let language = normalize_language(language);
        self.spec_for(&language)?;
        let slot = lock(&self.defaults)
            .entry(language.clone())
            .or_default()
            .clone();
        let mut id = slot.lock().await;
        if let Some(context) = id.as_deref().and_then(|id| self.get(id)) {
            return Ok(context);
        }
        let context = self.create(Some(&language), None).await?;
        *id = Some(context.info.id.clone());
        Ok(context)
    }

    pub async fn remove(&self, id: &str) -> Result<(), ContextError> {
        let context = {
            let mut contexts = lock(&self.contexts);
            let index = contexts
                .iter()
                .position(|c| c.info.id == id)
                .ok_or_else(|| ContextError::NotFound(id.to_owned()))?;
            contexts.remove(index)
        };
        context.shut_down().await;
        Ok(())
    }

    /// Kills every kernel (service shutdown).
    pub async fn shut_down(&self) {
        let contexts: Vec<Arc<Context>> = std::mem::take(&mut *lock(&self.contexts));
        for context in contexts {
            context.shut_down().await;
        }
    }
}

fn ensure_dir(path: &Path) -> std::io::Result<()> {
    std::fs::create_dir_all(path)?;
    if std::fs::metadata(path)?.is_dir() {
        Ok(())
    } else {
        Err(std::io::Error::other("not a directory"))
    }
}
