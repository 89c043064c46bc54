//! `soulbox volume …`: volumes on a running server, through the same calls as the SDKs'
//! `Volume` class (docs/volumes.md).

use anyhow::{Context, bail};
use soulbox_client::rest::RestClient;
use soulbox_client::volumes::VolumeContentClient;
use soulbox_wire::volumes::{VolumeAndToken, VolumeEntryType};

#[derive(clap::Args)]
pub struct VolumeArgs {
    #[command(flatten)]
    pub server: crate::server_args::ServerArgs,
    /// Volume content API URL (SoulBox serves it on the control plane: the default).
    #[arg(long, global = true, env = "E2B_VOLUME_API_URL")]
    pub volume_api_url: Option<String>,
    #[command(subcommand)]
    pub command: VolumeCommand,
}

#[derive(clap::Subcommand)]
pub enum VolumeCommand {
    /// Create a volume and print its ID.
    Create {
        /// Volume name (letters, digits, '.', '_', '-').
        name: String,
        /// Print the whole answer (with the content token) as JSON.
        #[arg(long)]
        json: bool,
    },
    /// List volumes.
    List {
        #[arg(long)]
        json: bool,
    },
    /// Delete a volume and its files (refused while a sandbox mounts it).
    Rm {
        /// Volume ID or name.
        volume: String,
    },
    /// List a directory of a volume.
    Ls {
        /// Volume ID or name.
        volume: String,
        /// Directory within the volume.
        #[arg(default_value = "/")]
        path: String,
        /// Levels to list (1: the directory's entries).
        #[arg(long, default_value_t = 1)]
        depth: u32,
        #[arg(long)]
        json: bool,
    },
    /// Copy a file into or out of a volume: `cp LOCAL VOLUME:/path` or `cp VOLUME:/path LOCAL`
    /// (`-` is stdin or stdout).
    Cp { from: String, to: String },
}

pub fn run(args: VolumeArgs) -> anyhow::Result<()> {
    let client = args.server.client()?;
    let content_url = args.volume_api_url.unwrap_or(args.server.api_url);
    crate::async_runtime(false)?.block_on(async move {
        match args.command {
            VolumeCommand::Create { name, json } => {
                let v = client.create_volume(&name).await?;
                if json {
                    println!("{}", serde_json::to_string_pretty(&v)?);
                } else {
                    println!("{}", v.volume_id);
                }
            }
            VolumeCommand::List { json } => {
                let all = client.list_volumes().await?;
                if json {
                    println!("{}", serde_json::to_string_pretty(&all)?);
                } else {
                    println!("{:<22} NAME", "VOLUME ID");
                    for v in all {
                        println!("{:<22} {}", v.volume_id, v.name);
                    }
                }
            }
            VolumeCommand::Rm { volume } => {
                let v = find(&client, &volume).await?;
                client.delete_volume(&v.volume_id).await?;
                println!("deleted {} ({})", v.name, v.volume_id);
            }
            VolumeCommand::Ls {
                volume,
                path,
                depth,
                json,
            } => {
                let v = find(&client, &volume).await?;
                let c = VolumeContentClient::new(&content_url, &v.volume_id, &v.token)?;
                let entries = c.list(&path, depth).await?;
                if json {
                    println!("{}", serde_json::to_string_pretty(&entries)?);
                } else {
                    for e in entries {
                        let kind = match e.kind {
                            VolumeEntryType::Directory => 'd',
                            VolumeEntryType::Symlink => 'l',
                            VolumeEntryType::File => '-',
                            VolumeEntryType::Unknown => '?',
                        };
                        let link = e.target.map(|t| format!(" -> {t}")).unwrap_or_default();
                        println!(
                            "{kind}{:04o} {:>5} {:>5} {:>12} {}{link}",
                            e.mode, e.uid, e.gid, e.size, e.path
                        );
                    }
                }
            }
            VolumeCommand::Cp { from, to } => copy(&client, &content_url, &from, &to).await?,
        }
        Ok(())
    })
}

/// A volume by ID or name, with its token.
async fn find(client: &RestClient, volume: &str) -> anyhow::Result<VolumeAndToken> {
    let all = client.list_volumes().await?;
    let Some(v) = all
        .iter()
        .find(|v| v.volume_id == volume)
        .or_else(|| all.iter().find(|v| v.name == volume))
    else {
        bail!("no volume with ID or name {volume:?}");
    };
    Ok(client.get_volume(&v.volume_id).await?)
}

/// `VOLUME:/path` → (volume, path); anything else is local.
fn remote(spec: &str) -> Option<(&str, &str)> {
    let (volume, path) = spec.split_once(':')?;
    (!volume.is_empty() && !volume.contains('/')).then_some((volume, path))
}

async fn copy(client: &RestClient, url: &str, from: &str, to: &str) -> anyhow::Result<()> {
    match (remote(from), remote(to)) {
        (None, Some((volume, path))) => {
            let data = if from == "-" {
                let mut buf = Vec::new();
                tokio::io::AsyncReadExt::read_to_end(&mut tokio::io::stdin(), &mut buf).await?;
                buf
            } else {
                tokio::fs::read(from)
                    .await
                    .with_context(|| format!("reading {from}"))?
            };
            let v = find(client, volume).await?;
            let c = VolumeContentClient::new(url, &v.volume_id, &v.token)?;
            let st = c.write(path, data).await?;
            eprintln!("wrote {} bytes to {}:{}", st.size, v.name, st.path);
        }
        (Some((volume, path)), None) => {
            let v = find(client, volume).await?;
            let c = VolumeContentClient::new(url, &v.volume_id, &v.token)?;
            if to == "-" {
                c.read_into(path, &mut tokio::io::stdout()).await?;
            } else {
                let mut file = tokio::fs::File::create(to)
                    .await
                    .with_context(|| format!("creating {to}"))?;
                let n = c.read_into(path, &mut file).await?;
                eprintln!("wrote {n} bytes to {to}");
            }
        }
        _ => bail!("exactly one of the two must be VOLUME:/path"),
    }
    Ok(())
}
