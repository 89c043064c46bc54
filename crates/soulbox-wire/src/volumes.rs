//! E2B volume bodies: the control plane's `/volumes` (`NewVolume`, `Volume`, `VolumeAndToken`),
//! a create body's `volumeMounts` (`SandboxVolumeMount`) and the volume content API's
//! `/volumecontent/{volumeID}/…` (`VolumeEntryStat`, the metadata patch).

use chrono::{DateTime, Utc};
use serde::{Deserialize, Serialize};

/// `POST /volumes` body.
#[derive(Debug, Clone, Default, Serialize, Deserialize, PartialEq, Eq)]
pub struct NewVolume {
    pub name: String,
}

/// An entry of `GET /volumes`.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
pub struct Volume {
    #[serde(rename = "volumeID")]
    pub volume_id: String,
    pub name: String,
}

/// `POST /volumes` (201) and `GET /volumes/{volumeID}`: the volume with the bearer token of
/// its content API.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
pub struct VolumeAndToken {
    #[serde(rename = "volumeID")]
    pub volume_id: String,
    pub name: String,
    pub token: String,
    /// Only for BYOC clusters upstream; never sent by SoulBox.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub domain: Option<String>,
}

/// One of a create body's `volumeMounts`: the volume by name and where it appears.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
pub struct SandboxVolumeMount {
    pub name: String,
    pub path: String,
}

/// `type` of a [`VolumeEntryStat`].
#[derive(Debug, Clone, Copy, Serialize, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "lowercase")]
pub enum VolumeEntryType {
    Directory,
    File,
    Symlink,
    Unknown,
}

/// What the content API answers for an entry (`VolumeEntryStat`).
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
pub struct VolumeEntryStat {
    pub name: String,
    #[serde(rename = "type")]
    pub kind: VolumeEntryType,
    /// Absolute within the volume (`/dir/file`).
    pub path: String,
    pub size: u64,
    /// Permission bits (`st_mode & 0o7777`).
    pub mode: u32,
    pub uid: u32,
    pub gid: u32,
    pub atime: DateTime<Utc>,
    pub mtime: DateTime<Utc>,
    pub ctime: DateTime<Utc>,
    /// A symlink's target, as stored (never followed).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub target: Option<String>,
}

/// `PATCH /volumecontent/{volumeID}/path` body.
#[derive(Debug, Clone, Default, Serialize, Deserialize, PartialEq, Eq)]
pub struct VolumeMetadataPatch {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub uid: Option<u32>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub gid: Option<u32>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub mode: Option<u32>,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn shapes_match_the_sdk() {
        let v = VolumeAndToken {
            volume_id: "v1".into(),
            name: "data".into(),
            token: "t".into(),
            domain: None,
        };
        assert_eq!(
            serde_json::to_string(&v).expect("json"),
            r#"{"volumeID":"v1","name":"data","token":"t"}"#
        );
        let m: SandboxVolumeMount =
            serde_json::from_str(r#"{"name":"data","path":"/data"}"#).expect("json");
        assert_eq!(m.path, "/data");
        let t = serde_json::to_string(&VolumeEntryType::Directory).expect("json");
        assert_eq!(t, r#""directory""#);
    }
}
