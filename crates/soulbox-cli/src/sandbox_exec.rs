//! `soulbox sandbox exec` and `soulbox sandbox shell`: envd process API clients.

#[derive(clap::Args)]
pub struct ExecArgs {
    /// Sandbox ID.
    pub id: String,
    /// Command line, run through `bash -l -c`.
    #[arg(trailing_var_arg = true, required = true)]
    pub cmd: Vec<String>,
}

pub fn exec(_args: ExecArgs) -> anyhow::Result<()> {
    anyhow::bail!("soulbox sandbox exec is not wired yet")
}
