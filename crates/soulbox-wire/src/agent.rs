//! Host ↔ agent messages: the agent's internal `/_soulbox/` endpoints, which the gateway never
//! forwards.

use std::collections::HashMap;

use serde::{Deserialize, Serialize};

/// Path of the init endpoint.
pub const INIT_PATH: &str = "/_soulbox/init";

/// `POST /_soulbox/init` → 204: sent once by core right after a sandbox is created. The agent
/// writes `/run/e2b/.E2B_SANDBOX*`, sets the global environment every process gets (§4.6:
/// `envVars` plus `E2B_SANDBOX=true`, `E2B_SANDBOX_ID`, `E2B_TEMPLATE_ID`) and the defaults for
/// requests that name no user or working directory.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct InitRequest {
    pub sandbox_id: String,
    pub template_id: String,
    #[serde(default)]
    pub env_vars: HashMap<String, String>,
    /// User for requests without Basic auth / `username`; the agent's default is `root`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub default_user: Option<String>,
    /// Working directory for processes started without `cwd` and for empty paths; the
    /// default is the user's home.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub default_workdir: Option<String>,
    /// Written to `/etc/resolv.conf` when present: a resumed sandbox may get another network
    /// slot (and resolver address), and the host never writes into a tree the sandbox owns.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub resolv_conf: Option<String>,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn init_request_json() -> Result<(), serde_json::Error> {
        let body = r#"{"sandboxId":"abc","templateId":"base","envVars":{"A":"1"},"defaultUser":"user","defaultWorkdir":"/home/user"}"#;
        let r: InitRequest = serde_json::from_str(body)?;
        assert_eq!(r.sandbox_id, "abc");
        assert_eq!(r.env_vars.get("A").map(String::as_str), Some("1"));
        assert_eq!(r.default_user.as_deref(), Some("user"));
        let back: serde_json::Value = serde_json::to_value(&r)?;
        assert_eq!(back, serde_json::from_str::<serde_json::Value>(body)?);
        let minimal: InitRequest = serde_json::from_str(r#"{"sandboxId":"a","templateId":"t"}"#)?;
        assert!(minimal.env_vars.is_empty() && minimal.default_user.is_none());
        Ok(())
    }
}
