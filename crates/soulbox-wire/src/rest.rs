//! E2B control-plane REST bodies (protocol doc §3) and the gateway's error bodies (§2.6).
//!
//! Request types accept and ignore fields SoulBox does not act on yet (the SDKs send `mcp`,
//! `iam`, `network`, …); response types carry exactly the keys the SDK parsers read.

use std::collections::BTreeMap;

use chrono::{DateTime, Utc};
use serde::{Deserialize, Serialize};

/// `POST /sandboxes` (v1) and `POST /v2/sandboxes` bodies. v2 has no `secure` (always secured);
/// the server ignores it on that route.
#[derive(Debug, Clone, Default, Serialize, Deserialize, PartialEq)]
#[serde(rename_all = "camelCase")]
pub struct NewSandbox {
    #[serde(rename = "templateID")]
    pub template_id: String,
    /// Seconds until the sandbox expires; must be > 0. Signed so that a negative value reaches
    /// validation (and gets the E2B message) instead of failing deserialisation.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub timeout: Option<i64>,
    /// On timeout: pause (true) instead of kill.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub auto_pause: Option<bool>,
    /// What that pause keeps: memory too (true, the default) or only files.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub auto_pause_memory: Option<bool>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub auto_resume: Option<AutoResume>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub secure: Option<bool>,
    #[serde(
        default,
        rename = "allow_internet_access",
        skip_serializing_if = "Option::is_none"
    )]
    pub allow_internet_access: Option<bool>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub network: Option<SandboxNetworkConfig>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub metadata: Option<BTreeMap<String, String>>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub env_vars: Option<BTreeMap<String, String>>,
    /// Volumes mounted into the sandbox (by name; `crate::volumes`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub volume_mounts: Option<Vec<crate::volumes::SandboxVolumeMount>>,
}

/// `autoResume` of a create body: traffic to the sandbox while paused resumes it.
#[derive(Debug, Clone, Copy, Default, Serialize, Deserialize, PartialEq, Eq)]
pub struct AutoResume {
    #[serde(default)]
    pub enabled: bool,
}

/// `POST /sandboxes/{id}/pause` (`SandboxPauseRequest`); an empty body is all defaults.
#[derive(Debug, Clone, Default, Serialize, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "camelCase")]
pub struct PauseRequest {
    /// Keep memory too (`mode: "full"`, the default) or only files (`"filesystem"`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub memory: Option<bool>,
    /// Refuse (503) when the agent does not answer (`strict=True` in the SDKs).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub require_healthy_guest: Option<bool>,
}

/// `POST /sandboxes/{id}/resume` (`ResumedSandbox`, legacy).
#[derive(Debug, Clone, Default, Serialize, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "camelCase")]
pub struct ResumeRequest {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub timeout: Option<i64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub auto_pause: Option<bool>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub memory: Option<bool>,
}

/// `POST /sandboxes/{id}/refreshes`: keep-alive for `duration` seconds.
#[derive(Debug, Clone, Default, Serialize, Deserialize, PartialEq, Eq)]
pub struct RefreshRequest {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub duration: Option<i64>,
}

/// `POST /sandboxes/{id}/snapshots` (`SandboxSnapshotRequest`); an empty body is all
/// defaults.
#[derive(Debug, Clone, Default, Serialize, Deserialize, PartialEq, Eq)]
pub struct SnapshotRequest {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub name: Option<String>,
    /// Accepted; a SoulBox snapshot keeps files only (docs/persistence.md).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub memory: Option<bool>,
}

/// One snapshot (`SnapshotInfo`): what `Sandbox.create` takes, and the template's names.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
pub struct SnapshotInfo {
    #[serde(rename = "snapshotID")]
    pub snapshot_id: String,
    pub names: Vec<String>,
}

/// `lifecycle` of `SandboxDetail`.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "camelCase")]
pub struct SandboxLifecycle {
    pub auto_resume: bool,
    /// `kill` or `pause`.
    pub on_timeout: String,
}

/// `network` of a create body and of `SandboxDetail` (`SandboxNetworkConfig`). Only the egress
/// lists are acted on; `dnsServers`, `allowPublicTraffic`, `maskRequestHost` and `httpsPorts`
/// are accepted and ignored (the sandbox's DNS always goes to SoulBox's resolver), and
/// `egressProxy`/`rules` are kept so that the server can refuse them.
#[derive(Debug, Clone, Default, Serialize, Deserialize, PartialEq)]
#[serde(rename_all = "camelCase")]
pub struct SandboxNetworkConfig {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub allow_out: Option<Vec<String>>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub deny_out: Option<Vec<String>>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub egress_proxy: Option<serde_json::Value>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub rules: Option<serde_json::Value>,
}

/// `PUT /sandboxes/{id}/network` (`SandboxNetworkUpdateConfig`): replaces the whole egress
/// configuration; an omitted field is cleared (`allow_internet_access` back to true).
#[derive(Debug, Clone, Default, Serialize, Deserialize, PartialEq)]
#[serde(rename_all = "camelCase")]
pub struct SandboxNetworkUpdate {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub allow_out: Option<Vec<String>>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub deny_out: Option<Vec<String>>,
    #[serde(
        default,
        rename = "allow_internet_access",
        skip_serializing_if = "Option::is_none"
    )]
    pub allow_internet_access: Option<bool>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub egress_proxy: Option<serde_json::Value>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub rules: Option<serde_json::Value>,
}

/// Response of create and connect (`Sandbox` in E2B's OpenAPI spec).
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(rename_all = "camelCase")]
pub struct Sandbox {
    #[serde(rename = "templateID")]
    pub template_id: String,
    #[serde(rename = "sandboxID")]
    pub sandbox_id: String,
    #[serde(rename = "clientID")]
    pub client_id: String,
    pub envd_version: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub alias: Option<String>,
    /// Present ⇒ the SDK sends `X-Access-Token` and signs file URLs.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub envd_access_token: Option<String>,
    /// Always serialised (null ⇒ no traffic token).
    #[serde(default)]
    pub traffic_access_token: Option<String>,
    /// Always serialised (null ⇒ the client's `E2B_DOMAIN` applies).
    #[serde(default)]
    pub domain: Option<String>,
}

/// Sandbox states the SDK parsers accept; any other value breaks them.
#[derive(Debug, Clone, Copy, Serialize, Deserialize, PartialEq, Eq, Hash)]
#[serde(rename_all = "lowercase")]
pub enum SandboxState {
    Running,
    Paused,
}

impl SandboxState {
    pub fn as_str(self) -> &'static str {
        match self {
            SandboxState::Running => "running",
            SandboxState::Paused => "paused",
        }
    }

    /// Parses the query-string spelling (`running`, `paused`).
    pub fn parse(s: &str) -> Option<SandboxState> {
        match s {
            "running" => Some(SandboxState::Running),
            "paused" => Some(SandboxState::Paused),
            _ => None,
        }
    }
}

/// `GET /sandboxes/{id}` (`SandboxDetail`).
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(rename_all = "camelCase")]
pub struct SandboxDetail {
    #[serde(rename = "templateID")]
    pub template_id: String,
    #[serde(rename = "sandboxID")]
    pub sandbox_id: String,
    #[serde(rename = "clientID")]
    pub client_id: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub alias: Option<String>,
    pub started_at: DateTime<Utc>,
    pub end_at: DateTime<Utc>,
    pub envd_version: String,
    pub cpu_count: u32,
    #[serde(rename = "memoryMB")]
    pub memory_mb: u64,
    #[serde(rename = "diskSizeMB")]
    pub disk_size_mb: u64,
    pub state: SandboxState,
    #[serde(default)]
    pub metadata: BTreeMap<String, String>,
    /// Old SDKs' `connect` reads the token from here.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub envd_access_token: Option<String>,
    #[serde(default)]
    pub domain: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub allow_internet_access: Option<bool>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub network: Option<SandboxNetworkConfig>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub lifecycle: Option<SandboxLifecycle>,
    /// What the latest pause saved (`full` or `filesystem`), while paused.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub pause_mode: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub envd_unresponsive_at_pause: Option<bool>,
    /// The volumes it mounts (by name; `crate::volumes`).
    #[serde(default)]
    pub volume_mounts: Vec<crate::volumes::SandboxVolumeMount>,
}

/// One entry of `GET /sandboxes` and `GET /v2/sandboxes` (`ListedSandbox`).
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(rename_all = "camelCase")]
pub struct ListedSandbox {
    #[serde(rename = "templateID")]
    pub template_id: String,
    #[serde(rename = "sandboxID")]
    pub sandbox_id: String,
    #[serde(rename = "clientID")]
    pub client_id: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub alias: Option<String>,
    pub started_at: DateTime<Utc>,
    pub end_at: DateTime<Utc>,
    pub cpu_count: u32,
    #[serde(rename = "memoryMB")]
    pub memory_mb: u64,
    #[serde(rename = "diskSizeMB")]
    pub disk_size_mb: u64,
    pub state: SandboxState,
    pub envd_version: String,
    #[serde(default)]
    pub metadata: BTreeMap<String, String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub envd_unresponsive_at_pause: Option<bool>,
}

/// `POST /sandboxes/{id}/timeout` and v1 `POST /sandboxes/{id}/connect`: seconds from now.
#[derive(Debug, Clone, Copy, Serialize, Deserialize, PartialEq, Eq)]
pub struct TimeoutRequest {
    pub timeout: i64,
}

/// v1 `POST /sandboxes/{id}/connect` (`ConnectSandbox`): `timeout` is required; `memory:
/// false` boots a paused sandbox again from its files (`on_resume="reboot"`).
#[derive(Debug, Clone, Copy, Serialize, Deserialize, PartialEq, Eq)]
pub struct ConnectSandbox {
    pub timeout: i64,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub memory: Option<bool>,
}

/// `POST /v2/sandboxes/{id}/connect`: the body is optional, `timeout` defaults to 300 s.
#[derive(Debug, Clone, Copy, Default, Serialize, Deserialize, PartialEq, Eq)]
pub struct ConnectSandboxV2 {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub timeout: Option<i64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub memory: Option<bool>,
}

/// Error body of every control-plane error: `code` equals the HTTP status (the JS SDK keys
/// on the body's `code`, not the status line).
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
pub struct ApiError {
    pub code: u16,
    pub message: String,
}

/// Message the SDKs key on (`was not found` ⇒ `SandboxNotRunningException`).
pub const SANDBOX_NOT_FOUND_MESSAGE: &str = "The sandbox was not found";
/// Message the SDKs key on (`port is not open` ⇒ `SandboxUnreachableException`).
pub const PORT_NOT_OPEN_MESSAGE: &str = "The sandbox is running but port is not open";

/// The gateway's 502 body (protocol doc §2.6).
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "camelCase")]
pub struct GatewayError {
    pub sandbox_id: String,
    pub message: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub port: Option<u16>,
    pub code: u16,
}

/// Path of SoulBox's own (not E2B's) warm-pool report: `GET` → `[WarmPool]`.
pub const POOLS_PATH: &str = "/soulbox/pools";

/// One warm pool: what it holds and how it served creates (diagnostics, leak checks and the
/// benchmark; members are never listed as sandboxes).
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "camelCase")]
pub struct WarmPool {
    /// The template reference the pool keeps warm (as clients name it).
    pub template: String,
    #[serde(rename = "templateID")]
    pub template_id: String,
    #[serde(rename = "buildID")]
    pub build_id: Option<String>,
    /// Ids of the idle members.
    pub idle: Vec<String>,
    /// Members being made.
    pub starting: usize,
    /// Idle members it aims for now (between `min` and `max`, following the create rate).
    pub target: usize,
    pub min: usize,
    pub max: usize,
    /// Creates served by a member, and creates that found none (made cold).
    pub hits: u64,
    pub misses: u64,
    /// Members that died while idle or failed their claim.
    pub lost: u64,
    /// Consecutive failed births.
    pub failures: u32,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn new_sandbox_accepts_sdk_body_with_unknown_fields() {
        let body = r#"{"templateID":"base","timeout":10,"autoPause":true,"autoResume":{"enabled":true},
            "allow_internet_access":false,"network":{"allowOut":["1.1.1.1"]},"metadata":{"a":"b"},"envVars":{}}"#;
        let parsed: NewSandbox = serde_json::from_str(body).expect("valid body");
        assert_eq!(parsed.template_id, "base");
        assert_eq!(parsed.timeout, Some(10));
        assert_eq!(parsed.allow_internet_access, Some(false));
        assert_eq!(
            parsed
                .metadata
                .as_ref()
                .and_then(|m| m.get("a"))
                .map(String::as_str),
            Some("b")
        );
    }

    #[test]
    fn new_sandbox_rejects_wrong_types() {
        assert!(
            serde_json::from_str::<NewSandbox>(r#"{"templateID":"base","timeout":"x"}"#).is_err()
        );
        assert!(serde_json::from_str::<NewSandbox>(r#"{"timeout":5}"#).is_err());
        assert!(
            serde_json::from_str::<NewSandbox>(r#"{"templateID":"b","metadata":{"k":1}}"#).is_err()
        );
    }

    #[test]
    fn sandbox_serialises_null_domain_and_omits_missing_token() {
        let s = Sandbox {
            template_id: "base".into(),
            sandbox_id: "abc".into(),
            client_id: "soulbox".into(),
            envd_version: "0.6.4".into(),
            alias: None,
            envd_access_token: None,
            traffic_access_token: None,
            domain: None,
        };
        let v = serde_json::to_value(&s).expect("serialise");
        assert_eq!(v["domain"], serde_json::Value::Null);
        assert!(v.get("envdAccessToken").is_none());
        assert_eq!(v["sandboxID"], "abc");
    }

    #[test]
    fn detail_uses_e2b_key_spelling() {
        let t = DateTime::from_timestamp_millis(1_700_000_000_123).expect("valid ts");
        let d = SandboxDetail {
            template_id: "base".into(),
            sandbox_id: "abc".into(),
            client_id: "soulbox".into(),
            alias: Some("base".into()),
            started_at: t,
            end_at: t,
            envd_version: "0.6.4".into(),
            cpu_count: 2,
            memory_mb: 512,
            disk_size_mb: 1024,
            state: SandboxState::Running,
            metadata: BTreeMap::new(),
            envd_access_token: Some("tok".into()),
            domain: None,
            allow_internet_access: Some(false),
            network: Some(SandboxNetworkConfig {
                allow_out: Some(vec!["1.1.1.1".into()]),
                deny_out: Some(vec!["0.0.0.0/0".into()]),
                ..SandboxNetworkConfig::default()
            }),
            volume_mounts: Vec::new(),
            lifecycle: Some(SandboxLifecycle {
                auto_resume: false,
                on_timeout: "pause".into(),
            }),
            pause_mode: Some("full".into()),
            envd_unresponsive_at_pause: None,
        };
        let v = serde_json::to_value(&d).expect("serialise");
        assert_eq!(v["lifecycle"]["onTimeout"], "pause");
        assert_eq!(v["lifecycle"]["autoResume"], false);
        assert_eq!(v["pauseMode"], "full");
        assert!(v.get("envdUnresponsiveAtPause").is_none());
        assert_eq!(v["memoryMB"], 512);
        assert_eq!(v["diskSizeMB"], 1024);
        assert_eq!(v["state"], "running");
        assert_eq!(v["startedAt"], "2023-11-14T22:13:20.123Z");
        assert_eq!(v["envdAccessToken"], "tok");
        assert_eq!(v["allowInternetAccess"], false);
        assert_eq!(v["network"]["allowOut"][0], "1.1.1.1");
        assert_eq!(v["network"]["denyOut"][0], "0.0.0.0/0");
        assert!(v["network"].get("egressProxy").is_none());
    }

    #[test]
    fn network_bodies_parse_as_the_sdk_sends_them() {
        let body = r#"{"templateID":"base","allow_internet_access":false,
            "network":{"allowOut":["1.1.1.1","example.com"],"denyOut":["0.0.0.0/0"],"dnsServers":[],"allowPublicTraffic":true}}"#;
        let parsed: NewSandbox = serde_json::from_str(body).expect("valid body");
        let net = parsed.network.expect("network");
        assert_eq!(
            net.allow_out,
            Some(vec!["1.1.1.1".into(), "example.com".into()])
        );
        assert_eq!(net.deny_out, Some(vec!["0.0.0.0/0".into()]));
        assert!(net.egress_proxy.is_none());
        let update: SandboxNetworkUpdate =
            serde_json::from_str(r#"{"allowOut":["8.8.8.8"],"allow_internet_access":false}"#)
                .expect("valid update");
        assert_eq!(update.allow_out, Some(vec!["8.8.8.8".into()]));
        assert_eq!(update.allow_internet_access, Some(false));
        assert!(update.deny_out.is_none());
        let empty: SandboxNetworkUpdate = serde_json::from_str("{}").expect("empty update");
        assert_eq!(empty, SandboxNetworkUpdate::default());
    }
}

// ---- Templates (protocol doc §3.7): the bodies of E2B's `Template.build()` flow and the
// template management routes. Build ids are UUIDs (the SDK parses them as such).

/// `POST /v3/templates`.
#[derive(Debug, Clone, Default, Serialize, Deserialize, PartialEq)]
#[serde(rename_all = "camelCase")]
pub struct TemplateBuildRequestV3 {
    /// `name` or `name:tag`.
    #[serde(default)]
    pub name: Option<String>,
    /// Deprecated spelling of `name`.
    #[serde(default)]
    pub alias: Option<String>,
    #[serde(default)]
    pub tags: Option<Vec<String>>,
    #[serde(default)]
    pub cpu_count: Option<u32>,
    #[serde(default, rename = "memoryMB")]
    pub memory_mb: Option<u64>,
}

/// Answer of `POST /v3/templates` (202).
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(rename_all = "camelCase")]
pub struct TemplateRequestResponseV3 {
    #[serde(rename = "templateID")]
    pub template_id: String,
    #[serde(rename = "buildID")]
    pub build_id: String,
    pub public: bool,
    pub names: Vec<String>,
    pub tags: Vec<String>,
    pub aliases: Vec<String>,
}

/// Answer of `GET /templates/{id}/files/{hash}` (201): upload the tar.gz with a `PUT` to
/// `url` unless `present`.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct TemplateBuildFileUpload {
    pub present: bool,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub url: Option<String>,
}

/// One step of `POST /v2/templates/{id}/builds/{build}`.
#[derive(Debug, Clone, Default, Serialize, Deserialize, PartialEq)]
#[serde(rename_all = "camelCase")]
pub struct TemplateStep {
    #[serde(rename = "type")]
    pub kind: String,
    #[serde(default)]
    pub args: Vec<String>,
    #[serde(default)]
    pub files_hash: Option<String>,
    #[serde(default)]
    pub force: Option<bool>,
}

/// `POST /v2/templates/{id}/builds/{build}` (E2B's `TemplateBuildStartV2`), plus SoulBox's
/// `dockerfile` + `dockerfileFiles` (COPY line → files hash) so `soulbox template build` can
/// send a Dockerfile whose variables the server expands with the parent template's env.
#[derive(Debug, Clone, Default, Serialize, Deserialize, PartialEq)]
#[serde(rename_all = "camelCase")]
pub struct TemplateBuildStartV2 {
    #[serde(default)]
    pub from_image: Option<String>,
    #[serde(default)]
    pub from_template: Option<String>,
    /// Registry credentials: SoulBox pulls from no registry, so any value is refused.
    #[serde(default)]
    pub from_image_registry: Option<serde_json::Value>,
    #[serde(default)]
    pub force: Option<bool>,
    #[serde(default)]
    pub steps: Vec<TemplateStep>,
    #[serde(default)]
    pub start_cmd: Option<String>,
    #[serde(default)]
    pub ready_cmd: Option<String>,
    #[serde(default)]
    pub dockerfile: Option<String>,
    #[serde(default)]
    pub dockerfile_files: BTreeMap<usize, String>,
}

/// One build log line.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct BuildLogEntry {
    pub timestamp: DateTime<Utc>,
    /// `debug`, `info`, `warn` or `error`.
    pub level: String,
    pub message: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub step: Option<String>,
}

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(rename_all = "camelCase")]
pub struct BuildStatusReason {
    pub message: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub step: Option<String>,
    #[serde(default)]
    pub log_entries: Vec<BuildLogEntry>,
}

/// `GET /templates/{id}/builds/{build}/status` (`TemplateBuildInfo`).
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(rename_all = "camelCase")]
pub struct TemplateBuildInfo {
    #[serde(rename = "templateID")]
    pub template_id: String,
    #[serde(rename = "buildID")]
    pub build_id: String,
    /// `building`, `waiting`, `ready` or `error`.
    pub status: String,
    pub log_entries: Vec<BuildLogEntry>,
    /// Always empty (E2B's removed v1 log format).
    pub logs: Vec<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub reason: Option<BuildStatusReason>,
}

/// `GET /templates/aliases/{alias}`.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct TemplateAliasResponse {
    #[serde(rename = "templateID")]
    pub template_id: String,
    pub public: bool,
}

/// `POST /templates/tags`: `target` is `name:tag` (the build to tag).
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct AssignTemplateTagsRequest {
    pub target: String,
    pub tags: Vec<String>,
}

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct AssignedTemplateTags {
    pub tags: Vec<String>,
    #[serde(rename = "buildID")]
    pub build_id: String,
}

/// `DELETE /templates/tags`.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct DeleteTemplateTagsRequest {
    pub name: String,
    pub tags: Vec<String>,
}

/// One entry of `GET /templates/{id}/tags`.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(rename_all = "camelCase")]
pub struct TemplateTag {
    pub tag: String,
    #[serde(rename = "buildID")]
    pub build_id: String,
    pub created_at: DateTime<Utc>,
}

/// One entry of `GET /templates` (E2B's `Template`).
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(rename_all = "camelCase")]
pub struct TemplateListing {
    #[serde(rename = "templateID")]
    pub template_id: String,
    #[serde(rename = "buildID")]
    pub build_id: String,
    pub cpu_count: u32,
    #[serde(rename = "memoryMB")]
    pub memory_mb: u64,
    #[serde(rename = "diskSizeMB")]
    pub disk_size_mb: u64,
    pub public: bool,
    pub aliases: Vec<String>,
    pub names: Vec<String>,
    pub created_at: DateTime<Utc>,
    pub updated_at: DateTime<Utc>,
    pub created_by: Option<serde_json::Value>,
    pub last_spawned_at: Option<DateTime<Utc>>,
    pub spawn_count: u64,
    pub build_count: u64,
    pub envd_version: String,
    pub build_status: String,
}
