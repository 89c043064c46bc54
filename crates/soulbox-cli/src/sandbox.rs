//! `soulbox sandbox …`: talks to a running server like the E2B SDKs do.

#[derive(clap::Args)]
pub struct SandboxArgs {
    #[command(subcommand)]
    pub command: SandboxCommand,
}

#[derive(clap::Subcommand)]
pub enum SandboxCommand {
    /// Run a command in a sandbox, streaming its output.
    Exec(crate::sandbox_exec::ExecArgs),
}

pub fn run(args: SandboxArgs) -> anyhow::Result<()> {
    match args.command {
        SandboxCommand::Exec(a) => crate::sandbox_exec::exec(a),
    }
}
