//! `soulbox template …`: build templates from Dockerfiles on a running server (through the same
//! API the E2B SDK's `Template.build()` uses), list, tag and remove them; and `copy-in`, which
//! the server runs inside build sandboxes for `COPY` steps.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::time::Duration;

use anyhow::{Context, bail};
use http::Method;
use soulbox_client::rest::RestClient;
use soulbox_templates::copy;
use soulbox_templates::dockerfile::{self, InstructionKind};
use soulbox_wire::rest::{
    TemplateBuildFileUpload, TemplateBuildInfo, TemplateBuildRequestV3, TemplateBuildStartV2,
    TemplateListing, TemplateRequestResponseV3, TemplateTag,
};

#[derive(clap::Args)]
pub struct TemplateArgs {
    #[command(flatten)]
    pub server: crate::server_args::ServerArgs,
    #[command(subcommand)]
    pub command: TemplateCommand,
}

#[derive(clap::Subcommand)]
pub enum TemplateCommand {
    /// Build a template from a Dockerfile (DIR is the build context), or a shipped template
    /// by name (`base`, `code-interpreter-v1`).
    Build(BuildArgs),
    /// List templates.
    List {
        /// Print JSON.
        #[arg(long)]
        json: bool,
    },
    /// Remove a template (its layers go once no sandbox uses them).
    Rm {
        /// Template name or id.
        name: String,
    },
    /// Show a template's tags, or point tags at the build `NAME:TAG` names.
    Tags {
        /// Template name (or `name:tag` with --add).
        name: String,
        /// Tags to point at the build NAME names.
        #[arg(long = "add")]
        add: Vec<String>,
        /// Tags to remove.
        #[arg(long = "remove")]
        remove: Vec<String>,
    },
    /// (internal) Copies staged build files into place; run inside build sandboxes.
    #[command(hide = true)]
    CopyIn(CopyInArgs),
}

#[derive(clap::Args)]
pub struct BuildArgs {
    /// Build context directory, or the name of a shipped template.
    pub dir: String,
    /// Dockerfile (default: DIR/Dockerfile).
    #[arg(long, short = 'f')]
    pub file: Option<PathBuf>,
    /// Template name, optionally `name:tag` (default: the directory's name).
    #[arg(long, short)]
    pub name: Option<String>,
    /// CPUs of sandboxes made from it.
    #[arg(long)]
    pub cpu: Option<u32>,
    /// Memory of sandboxes made from it (MiB).
    #[arg(long)]
    pub memory_mb: Option<u64>,
    /// Command started in every new sandbox (overrides CMD/ENTRYPOINT).
    #[arg(long)]
    pub start_cmd: Option<String>,
    /// Command that must succeed before a new sandbox is handed out.
    #[arg(long)]
    pub ready_cmd: Option<String>,
    /// Rebuild every step, ignoring the cache.
    #[arg(long)]
    pub no_cache: bool,
}

#[derive(clap::Args)]
pub struct CopyInArgs {
    #[arg(long)]
    pub staged: PathBuf,
    #[arg(long)]
    pub dest: String,
    #[arg(long)]
    pub chown: Option<String>,
    #[arg(long)]
    pub chmod: Option<String>,
    #[arg(last = true, required = true)]
    pub sources: Vec<String>,
}

pub fn run(args: TemplateArgs) -> anyhow::Result<()> {
    if let TemplateCommand::CopyIn(a) = args.command {
        return copy::apply(&copy::CopyIn {
            staged: a.staged,
            sources: a.sources,
            dest: a.dest,
            chown: a.chown,
            chmod: a.chmod,
        })
        .map_err(Into::into);
    }
    let client = args.server.client()?;
    let rt = crate::async_runtime(false)?;
    rt.block_on(async move {
        match args.command {
            TemplateCommand::Build(a) => build(&client, a).await,
            TemplateCommand::List { json } => list(&client, json).await,
            TemplateCommand::Rm { name } => {
                client
                    .call(
                        Method::DELETE,
                        &format!("/templates/{}", segment(&name)),
                        None,
                    )
                    .await
                    .with_context(|| format!("removing template {name}"))?;
                println!("removed {name}");
                Ok(())
            }
            TemplateCommand::Tags { name, add, remove } => tags(&client, &name, add, remove).await,
            TemplateCommand::CopyIn(_) => Ok(()),
        }
    })
}

fn segment(s: &str) -> String {
    s.bytes()
        .map(|b| {
            if b.is_ascii_alphanumeric() || matches!(b, b'-' | b'.' | b'_') {
                (b as char).to_string()
            } else {
                format!("%{b:02X}")
            }
        })
        .collect()
}

async fn build(client: &RestClient, a: BuildArgs) -> anyhow::Result<()> {
    let shipped =
        soulbox_templates::shipped::shipped(&a.dir).filter(|_| !Path::new(&a.dir).is_dir());
    let (text, context, default_name) = match shipped {
        Some(s) => (s.dockerfile.to_owned(), None, s.name.to_owned()),
        None => {
            let dir = PathBuf::from(&a.dir);
            let file = a.file.clone().unwrap_or_else(|| dir.join("Dockerfile"));
            let text = std::fs::read_to_string(&file)
                .with_context(|| format!("reading {}", file.display()))?;
            let canonical = dir
                .canonicalize()
                .with_context(|| format!("build context {}", dir.display()))?;
            let name = canonical
                .file_name()
                .map(|n| n.to_string_lossy().to_lowercase())
                .unwrap_or_else(|| "template".into());
            (text, Some(canonical), name)
        }
    };
    let name = a.name.clone().unwrap_or(default_name);
    let parsed = dockerfile::parse(&text)?;
    // Archive every COPY's files now: a missing file fails before anything is sent.
    let mut archives = Vec::new();
    for i in &parsed.instructions {
        if let InstructionKind::Copy { srcs, .. } = &i.kind {
            let ctx = context
                .as_deref()
                .with_context(|| format!("line {}: COPY needs a build context", i.line))?;
            let archive = copy::archive(ctx, srcs)
                .map_err(|e| anyhow::anyhow!("Dockerfile line {}: {e}", i.line))?;
            archives.push((i.line, archive));
        }
    }
    let requested: TemplateRequestResponseV3 = client
        .call_json(
            Method::POST,
            "/v3/templates",
            Some(&TemplateBuildRequestV3 {
                name: Some(name.clone()),
                cpu_count: a.cpu,
                memory_mb: a.memory_mb,
                ..TemplateBuildRequestV3::default()
            }),
        )
        .await
        .with_context(|| format!("requesting a build of {name}"))?;
    let id = requested.template_id.clone();
    let mut files = BTreeMap::new();
    for (line, archive) in archives {
        let link: TemplateBuildFileUpload = client
            .call_json::<(), _>(
                Method::GET,
                &format!("/templates/{}/files/{}", segment(&id), archive.hash),
                None,
            )
            .await?;
        if let (false, Some(url)) = (link.present, link.url) {
            client
                .put_url(&url, archive.tar_gz)
                .await
                .with_context(|| format!("uploading the files of line {line}"))?;
        }
        files.insert(line, archive.hash);
    }
    client
        .call(
            Method::POST,
            &format!(
                "/v2/templates/{}/builds/{}",
                segment(&id),
                requested.build_id
            ),
            Some(serde_json::to_vec(&TemplateBuildStartV2 {
                dockerfile: Some(text),
                dockerfile_files: files,
                start_cmd: a.start_cmd,
                ready_cmd: a.ready_cmd,
                force: Some(a.no_cache),
                ..TemplateBuildStartV2::default()
            })?),
        )
        .await
        .context("starting the build")?;
    follow(
        client,
        &id,
        &requested.build_id,
        &name,
        parsed.instructions.len(),
    )
    .await
}

/// A progress bar of a build's steps (on stderr) with its log printed above it. Without a
/// terminal the log lines go to stdout (`template build`) or to the server's log (`serve`,
/// whose stdout carries the `export` lines).
pub(crate) struct BuildProgress {
    bar: indicatif::ProgressBar,
    plain_to_log: bool,
}

impl BuildProgress {
    /// A bar for `steps` Dockerfile instructions (plus the `FROM`).
    pub(crate) fn new(name: &str, steps: usize, plain_to_log: bool) -> BuildProgress {
        let bar = indicatif::ProgressBar::new(steps as u64 + 1);
        bar.set_style(
            indicatif::ProgressStyle::with_template(
                "{spinner} template {prefix} [{bar:30}] step {pos}/{len} {elapsed} {wide_msg}",
            )
            .unwrap_or_else(|_| indicatif::ProgressStyle::default_bar())
            .progress_chars("=> "),
        );
        bar.set_prefix(name.to_owned());
        bar.enable_steady_tick(Duration::from_millis(120));
        BuildProgress { bar, plain_to_log }
    }

    /// One build log line: `#<step> <message>`; `[i/n]` lines move the bar.
    pub(crate) fn line(&self, step: Option<&str>, message: &str) {
        if let Some(pos) = step_of(message) {
            self.bar.set_position(pos);
            self.bar.set_message(message.to_owned());
        }
        let line = match step {
            Some(s) => format!("#{s} {message}"),
            None => message.to_owned(),
        };
        // A hidden bar (no terminal) prints nothing.
        if self.bar.is_hidden() && self.plain_to_log {
            tracing::info!(target: "soulbox::template", "{line}");
        } else if self.bar.is_hidden() {
            println!("{line}");
        } else {
            self.bar.println(line);
        }
    }

    pub(crate) fn finish(&self) {
        self.bar.finish_and_clear();
    }

    pub(crate) fn abandon(&self) {
        self.bar.abandon();
    }
}

/// Polls the build, printing its log lines above a progress bar of its steps.
async fn follow(
    client: &RestClient,
    id: &str,
    build: &str,
    name: &str,
    steps: usize,
) -> anyhow::Result<()> {
    let progress = BuildProgress::new(name, steps, false);
    let mut offset = 0;
    loop {
        let info: TemplateBuildInfo = client
            .call_json::<(), _>(
                Method::GET,
                &format!(
                    "/templates/{}/builds/{build}/status?logsOffset={offset}&limit=1000",
                    segment(id)
                ),
                None,
            )
            .await?;
        offset += info.log_entries.len();
        for e in &info.log_entries {
            progress.line(e.step.as_deref(), &e.message);
        }
        match info.status.as_str() {
            "ready" if info.log_entries.is_empty() => {
                progress.finish();
                println!("template {name} is ready (id {id}, build {build})");
                return Ok(());
            }
            "error" if info.log_entries.is_empty() => {
                progress.abandon();
                let reason = info.reason.map(|r| r.message).unwrap_or_default();
                bail!("building template {name} failed: {reason}");
            }
            _ => {
                if info.log_entries.is_empty() {
                    tokio::time::sleep(Duration::from_millis(250)).await;
                }
            }
        }
    }
}

/// The step number of a `[i/n] …` log line.
fn step_of(message: &str) -> Option<u64> {
    let rest = message.strip_prefix('[')?;
    let (i, _) = rest.split_once('/')?;
    i.parse().ok()
}

async fn list(client: &RestClient, json: bool) -> anyhow::Result<()> {
    let list: Vec<TemplateListing> = client
        .call_json::<(), _>(Method::GET, "/templates", None)
        .await?;
    if json {
        println!("{}", serde_json::to_string_pretty(&list)?);
        return Ok(());
    }
    println!(
        "{:<28} {:<20} {:<9} {:>4} {:>7} {:>6}  BUILT",
        "NAME", "ID", "STATUS", "CPU", "MEM MB", "BUILDS"
    );
    for t in list {
        println!(
            "{:<28} {:<20} {:<9} {:>4} {:>7} {:>6}  {}",
            t.names.first().cloned().unwrap_or_default(),
            t.template_id,
            t.build_status,
            t.cpu_count,
            t.memory_mb,
            t.build_count,
            t.updated_at.format("%Y-%m-%d %H:%M:%S")
        );
    }
    Ok(())
}

async fn tags(
    client: &RestClient,
    name: &str,
    add: Vec<String>,
    remove: Vec<String>,
) -> anyhow::Result<()> {
    if !add.is_empty() {
        client
            .call(
                Method::POST,
                "/templates/tags",
                Some(serde_json::to_vec(
                    &serde_json::json!({"target": name, "tags": add}),
                )?),
            )
            .await?;
    }
    let (base, _) = soulbox_core::split_name_tag(name);
    if !remove.is_empty() {
        client
            .call(
                Method::DELETE,
                "/templates/tags",
                Some(serde_json::to_vec(
                    &serde_json::json!({"name": base, "tags": remove}),
                )?),
            )
            .await?;
    }
    let tags: Vec<TemplateTag> = client
        .call_json::<(), _>(
            Method::GET,
            &format!("/templates/{}/tags", segment(base)),
            None,
        )
        .await?;
    for t in tags {
        println!(
            "{:<20} {}  {}",
            t.tag,
            t.build_id,
            t.created_at.format("%Y-%m-%d %H:%M:%S")
        );
    }
    Ok(())
}
