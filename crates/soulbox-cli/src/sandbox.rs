//! `soulbox sandbox …`: talks to a running server like the E2B SDKs do.

use std::collections::BTreeMap;

use anyhow::{Context, bail};
use soulbox_client::rest::{ListFilter, RestClient};
use soulbox_wire::rest::{AutoResume, NewSandbox, SandboxState};

#[derive(clap::Args)]
pub struct SandboxArgs {
    #[command(flatten)]
    pub server: crate::server_args::ServerArgs,
    #[command(subcommand)]
    pub command: SandboxCommand,
}

#[derive(clap::Subcommand)]
pub enum SandboxCommand {
    /// Create a sandbox and print its ID.
    Create(CreateArgs),
    /// List sandboxes.
    List(ListArgs),
    /// Show one sandbox as JSON.
    Info {
        /// Sandbox ID.
        id: String,
    },
    /// Kill a sandbox (running or paused; a paused one's kept state goes too).
    Kill {
        /// Sandbox ID.
        id: String,
    },
    /// Pause a sandbox: `full` freezes its processes with their memory, `filesystem` ends
    /// them and keeps only its files (docs/persistence.md).
    Pause {
        /// Sandbox ID.
        id: String,
        #[arg(long, value_enum, default_value = "full")]
        mode: PauseModeArg,
    },
    /// Make a snapshot (a template of the sandbox's files) and print its ID, which
    /// `create -t` takes.
    Snapshot {
        /// Sandbox ID.
        id: String,
        /// Name of the snapshot template (a new build of it if it exists).
        #[arg(long)]
        name: Option<String>,
    },
    /// Resume a paused sandbox (or extend a running one's timeout) and print its ID.
    Resume {
        /// Sandbox ID.
        id: String,
        /// Seconds until it expires again.
        #[arg(long)]
        timeout: Option<i64>,
        /// Boot it again from its files even if its memory was kept.
        #[arg(long)]
        reboot: bool,
    },
    /// Run a command in a sandbox, streaming its output.
    Exec(crate::sandbox_exec::ExecArgs),
    /// Open an interactive terminal (PTY) in a sandbox.
    Shell(crate::sandbox_exec::ShellArgs),
    /// Print the address of a port of a sandbox, as the SDKs' `get_host(port)` makes it:
    /// `https://<port>-<id>.<domain>` in domain mode, else the gateway's URL (and, on stderr,
    /// the routing headers to send with it).
    Url(UrlArgs),
}

#[derive(Clone, Copy, clap::ValueEnum)]
pub enum PauseModeArg {
    Full,
    Filesystem,
}

#[derive(clap::Args)]
pub struct UrlArgs {
    /// Sandbox ID.
    pub id: String,
    /// Port of a server in the sandbox.
    #[arg(value_parser = clap::value_parser!(u16).range(1..))]
    pub port: u16,
    /// Sandbox-traffic URL of the server (URL mode).
    #[arg(long, env = "E2B_SANDBOX_URL", default_value = "http://127.0.0.1:3001")]
    pub sandbox_url: String,
}

#[derive(clap::Args)]
pub struct CreateArgs {
    /// Template name.
    #[arg(long, short, default_value = "base")]
    pub template: String,
    /// Seconds until the sandbox expires.
    #[arg(long, default_value_t = 300)]
    pub timeout: i64,
    /// Metadata `KEY=VALUE` (repeatable).
    #[arg(long = "metadata", short, value_parser = key_value)]
    pub metadata: Vec<(String, String)>,
    /// Environment variable `KEY=VALUE` for every process in the sandbox (repeatable).
    #[arg(long = "env", short, value_parser = key_value)]
    pub env: Vec<(String, String)>,
    /// What a timeout does: kill the sandbox, or pause it (full) so that `resume` brings
    /// it back.
    #[arg(long, value_enum, default_value = "kill")]
    pub on_timeout: OnTimeoutArg,
    /// Traffic to the paused sandbox resumes it (needs `--on-timeout pause`).
    #[arg(long)]
    pub auto_resume: bool,
    /// Print the whole create response as JSON.
    #[arg(long)]
    pub json: bool,
}

#[derive(Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum OnTimeoutArg {
    Kill,
    Pause,
}

#[derive(clap::Args)]
pub struct ListArgs {
    /// Only sandboxes with this metadata `KEY=VALUE` (repeatable; all must match).
    #[arg(long = "metadata", short, value_parser = key_value)]
    pub metadata: Vec<(String, String)>,
    /// Only sandboxes in this state (`running`, `paused`; repeatable).
    #[arg(long = "state", value_parser = state)]
    pub states: Vec<SandboxState>,
    /// Print JSON instead of a table.
    #[arg(long)]
    pub json: bool,
}

pub fn run(args: SandboxArgs) -> anyhow::Result<()> {
    let api = (args.server.api_url, args.server.api_key);
    match args.command {
        SandboxCommand::Create(a) => rest(api, |c| async move { create(&c, a).await }),
        SandboxCommand::List(a) => rest(api, |c| async move { list(&c, a).await }),
        SandboxCommand::Info { id } => rest(api, |c| async move { info(&c, &id).await }),
        SandboxCommand::Kill { id } => rest(api, |c| async move { kill(&c, &id).await }),
        SandboxCommand::Pause { id, mode } => rest(api, |c| async move {
            let memory = matches!(mode, PauseModeArg::Filesystem).then_some(false);
            let paused = c
                .pause(&id, memory)
                .await
                .with_context(|| format!("pausing {id}"))?;
            println!(
                "{}",
                if paused {
                    format!("paused {id}")
                } else {
                    format!("{id} was paused already")
                }
            );
            Ok(())
        }),
        SandboxCommand::Snapshot { id, name } => rest(api, |c| async move {
            let snap = c
                .create_snapshot(&id, name)
                .await
                .with_context(|| format!("snapshotting {id}"))?;
            println!("{}", snap.snapshot_id);
            Ok(())
        }),
        SandboxCommand::Resume {
            id,
            timeout,
            reboot,
        } => rest(api, |c| async move {
            let sandbox = c
                .connect(&id, timeout, reboot.then_some(false))
                .await
                .with_context(|| format!("resuming {id}"))?;
            println!("{}", sandbox.sandbox_id);
            Ok(())
        }),
        SandboxCommand::Exec(a) => crate::sandbox_exec::exec(a, api),
        SandboxCommand::Shell(a) => crate::sandbox_exec::shell(a, api),
        SandboxCommand::Url(a) => rest(api, |c| async move { url(&c, a).await }),
    }
}

/// Runs one control-plane command with a client for `(url, key)`.
pub(crate) fn rest<F, Fut>((url, key): (String, Option<String>), command: F) -> anyhow::Result<()>
where
    F: FnOnce(RestClient) -> Fut,
    Fut: std::future::Future<Output = anyhow::Result<()>>,
{
    let client = crate::server_args::client(&url, key.as_deref())?;
    crate::async_runtime(false)?.block_on(command(client))
}

async fn create(client: &RestClient, a: CreateArgs) -> anyhow::Result<()> {
    let sandbox = client
        .create(&NewSandbox {
            template_id: a.template,
            timeout: Some(a.timeout),
            metadata: Some(a.metadata.into_iter().collect()),
            env_vars: Some(a.env.into_iter().collect()),
            auto_pause: Some(a.on_timeout == OnTimeoutArg::Pause),
            auto_resume: a.auto_resume.then_some(AutoResume { enabled: true }),
            ..NewSandbox::default()
        })
        .await
        .context("creating the sandbox")?;
    if a.json {
        println!("{}", serde_json::to_string_pretty(&sandbox)?);
    } else {
        println!("{}", sandbox.sandbox_id);
    }
    Ok(())
}

async fn list(client: &RestClient, a: ListArgs) -> anyhow::Result<()> {
    let mut filter = ListFilter {
        metadata: a.metadata.into_iter().collect::<BTreeMap<_, _>>(),
        states: a.states,
        limit: Some(100),
        next_token: None,
    };
    let mut all = Vec::new();
    loop {
        let (page, next) = client.list(&filter).await.context("listing sandboxes")?;
        all.extend(page);
        match next {
            Some(token) => filter.next_token = Some(token),
            None => break,
        }
    }
    if a.json {
        println!("{}", serde_json::to_string_pretty(&all)?);
        return Ok(());
    }
    println!(
        "{:<20}  {:<12}  {:<8}  {:<20}  {:<20}  METADATA",
        "ID", "TEMPLATE", "STATE", "STARTED", "ENDS"
    );
    for s in all {
        let metadata: Vec<String> = s.metadata.iter().map(|(k, v)| format!("{k}={v}")).collect();
        println!(
            "{:<20}  {:<12}  {:<8}  {:<20}  {:<20}  {}",
            s.sandbox_id,
            s.alias.as_deref().unwrap_or(&s.template_id),
            s.state.as_str(),
            s.started_at.format("%Y-%m-%d %H:%M:%S"),
            s.end_at.format("%Y-%m-%d %H:%M:%S"),
            metadata.join(",")
        );
    }
    Ok(())
}

async fn info(client: &RestClient, id: &str) -> anyhow::Result<()> {
    let detail = client
        .get(id)
        .await
        .with_context(|| format!("sandbox {id}"))?;
    println!("{}", serde_json::to_string_pretty(&detail)?);
    Ok(())
}

async fn kill(client: &RestClient, id: &str) -> anyhow::Result<()> {
    match client.kill(id).await {
        Ok(()) => {
            println!("killed {id}");
            Ok(())
        }
        Err(e) if e.status() == Some(http::StatusCode::NOT_FOUND) => {
            bail!("sandbox {id} not found")
        }
        Err(e) => Err(e).with_context(|| format!("killing {id}")),
    }
}

async fn url(client: &RestClient, a: UrlArgs) -> anyhow::Result<()> {
    let detail = client
        .get(&a.id)
        .await
        .with_context(|| format!("sandbox {}", a.id))?;
    match detail.domain {
        Some(domain) => println!("https://{}-{}.{domain}", a.port, a.id),
        None => {
            println!("{}", a.sandbox_url);
            eprintln!(
                "# the server has no domain mode (soulbox serve --domain): send these headers \
                 with every request\n\
                 #   E2b-Sandbox-Id: {id}\n#   E2b-Sandbox-Port: {port}\n\
                 # e.g. curl -H 'E2b-Sandbox-Id: {id}' -H 'E2b-Sandbox-Port: {port}' {url}/",
                id = a.id,
                port = a.port,
                url = a.sandbox_url.trim_end_matches('/'),
            );
        }
    }
    Ok(())
}

fn key_value(s: &str) -> Result<(String, String), String> {
    s.split_once('=')
        .map(|(k, v)| (k.to_owned(), v.to_owned()))
        .ok_or_else(|| format!("expected KEY=VALUE, got '{s}'"))
}

fn state(s: &str) -> Result<SandboxState, String> {
    SandboxState::parse(s).ok_or_else(|| format!("expected running or paused, got '{s}'"))
}
