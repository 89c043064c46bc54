//! The flags of every command that talks to a running server (`sandbox`, `template`,
//! `snapshot`, `volume`), flattened into each.

#[derive(clap::Args)]
pub struct ServerArgs {
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
}

impl ServerArgs {
    /// A control-plane client for these flags.
    pub fn client(&self) -> anyhow::Result<soulbox_client::rest::RestClient> {
        client(&self.api_url, self.api_key.as_deref())
    }
}

/// A control-plane client for `api_url` with `api_key`, which must be given.
pub fn client(
    api_url: &str,
    api_key: Option<&str>,
) -> anyhow::Result<soulbox_client::rest::RestClient> {
    use anyhow::Context;
    let key = api_key.context("no API key: pass --api-key or set E2B_API_KEY")?;
    Ok(soulbox_client::rest::RestClient::new(api_url, key)?)
}
