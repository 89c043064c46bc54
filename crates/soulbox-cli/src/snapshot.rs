//! `soulbox snapshot …`: the snapshots of a running server (`soulbox sandbox snapshot <id>`
//! makes one).

use anyhow::Context;

#[derive(clap::Args)]
pub struct SnapshotArgs {
    /// Control-plane URL of the server.
    #[arg(
        long,
        global = true,
        env = "E2B_API_URL",
        default_value = "http://127.0.0.1:3000"
    )]
    pub api_url: String,
    /// API key (`e2b_…`).
    #[arg(long, global = true, env = "E2B_API_KEY", hide_env_values = true)]
    pub api_key: Option<String>,
    #[command(subcommand)]
    pub command: SnapshotCommand,
}

#[derive(clap::Subcommand)]
pub enum SnapshotCommand {
    /// List snapshots, newest first.
    List {
        /// Only snapshots of this sandbox.
        #[arg(long)]
        sandbox: Option<String>,
    },
    /// Delete a snapshot (sandboxes made from it keep running).
    Rm {
        /// Snapshot ID (`<name>:default` or `<template id>:default`).
        id: String,
    },
}

pub fn run(args: SnapshotArgs) -> anyhow::Result<()> {
    let api = (args.api_url, args.api_key);
    match args.command {
        SnapshotCommand::List { sandbox } => crate::sandbox::rest(api, |c| async move {
            for s in c
                .list_snapshots(sandbox.as_deref())
                .await
                .context("listing snapshots")?
            {
                println!("{}\t{}", s.snapshot_id, s.names.join(","));
            }
            Ok(())
        }),
        SnapshotCommand::Rm { id } => crate::sandbox::rest(api, |c| async move {
            c.delete_snapshot(&id)
                .await
                .with_context(|| format!("deleting snapshot {id}"))?;
            println!("deleted {id}");
            Ok(())
        }),
    }
}
