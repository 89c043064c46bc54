//! `soulbox snapshot …`: the snapshots of a running server (`soulbox sandbox snapshot <id>`
//! makes one).

use anyhow::Context;

#[derive(clap::Args)]
pub struct SnapshotArgs {
    #[command(flatten)]
    pub server: crate::server_args::ServerArgs,
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
    let api = (args.server.api_url, args.server.api_key);
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
