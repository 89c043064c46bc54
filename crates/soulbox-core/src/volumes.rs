//! Volumes: persistent directories that sandboxes mount by name (E2B's `/volumes` and its
//! content API; layout and security in `docs/volumes.md`).
//!
//! The database says which volumes exist (with their content-API tokens) and which sandbox
//! mounts which; the files live in the runtime's [`VolumeStore`]. A create with volume mounts
//! holds the volumes lock for reading until its mounts are recorded; a delete holds it for
//! writing, so it never removes a volume that a create is mounting.

use chrono::Utc;
pub use soulbox_runtime::VolumeDir;
use soulbox_runtime::{VolumeMount, VolumeStore, mount_path_components};
use soulbox_store::{VolumeMountRecord, VolumeRecord};
use soulbox_wire::volumes::SandboxVolumeMount;
use tokio::sync::{RwLock, RwLockReadGuard};

use crate::{CoreError, Manager, new_access_token, new_sandbox_id};

pub use soulbox_runtime::{
    Attrs as VolumeAttrs, Entry as VolumeEntry, EntryKind as VolumeEntryKind, VolumeFsError,
    VolumePath, check_attrs as check_volume_attrs,
};

/// Size limit of a new volume when the server sets none (MiB).
pub const DEFAULT_VOLUME_SIZE_MB: u64 = 10 * 1024;
/// Longest volume name (bytes).
pub const MAX_VOLUME_NAME: usize = 128;
/// Most volumes one sandbox may mount.
pub const MAX_MOUNTS: usize = 16;

/// The manager's volumes: where their files live and the lock between creates and deletes.
pub(crate) struct Volumes {
    store: VolumeStore,
    size_mb: u64,
    lock: RwLock<()>,
}

impl Volumes {
    pub(crate) fn open(dir: &std::path::Path, size_mb: u64) -> Result<Volumes, CoreError> {
        Ok(Volumes {
            store: VolumeStore::open(dir)?,
            size_mb: if size_mb == 0 {
                DEFAULT_VOLUME_SIZE_MB
            } else {
                size_mb
            },
            lock: RwLock::new(()),
        })
    }
}

/// A volume name: 1–128 characters of `[A-Za-z0-9._-]`, not starting with `.` (so no `/`,
/// `..`, NUL or control characters).
pub fn valid_volume_name(name: &str) -> Result<(), CoreError> {
    let shown: String = name.chars().take(64).collect();
    if name.is_empty() || name.len() > MAX_VOLUME_NAME {
        return Err(CoreError::InvalidArgument(format!(
            "volume name must be 1 to {MAX_VOLUME_NAME} characters"
        )));
    }
    let ok = !name.starts_with('.')
        && name
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'.' | b'_' | b'-'));
    if !ok {
        return Err(CoreError::InvalidArgument(format!(
            "invalid volume name {shown:?}: use letters, digits, '.', '_' and '-', not starting with '.'"
        )));
    }
    Ok(())
}

/// Compares two tokens in time independent of where they differ.
fn same_token(a: &str, b: &str) -> bool {
    a.len() == b.len()
        && a.bytes()
            .zip(b.bytes())
            .fold(0u8, |acc, (x, y)| acc | (x ^ y))
            == 0
}

/// A create's volumes, resolved: what to record and what the runtime mounts.
pub(crate) struct ResolvedMounts<'a> {
    pub(crate) runtime: Vec<VolumeMount>,
    volume_ids: Vec<(String, String)>,
    /// Held until the mounts are recorded (module doc).
    _guard: Option<RwLockReadGuard<'a, ()>>,
}

impl Manager {
    fn volumes(&self) -> Result<&Volumes, CoreError> {
        self.inner
            .volumes
            .as_ref()
            .ok_or_else(|| CoreError::InvalidArgument("this server has no volumes".into()))
    }

    /// Creates volume `name` (409 if the name is taken).
    pub async fn create_volume(&self, name: &str) -> Result<VolumeRecord, CoreError> {
        valid_volume_name(name)?;
        let volumes = self.volumes()?;
        let _guard = volumes.lock.write().await;
        let rec = VolumeRecord {
            id: new_sandbox_id(),
            name: name.to_owned(),
            token: new_access_token(),
            size_mb: volumes.size_mb,
            created_at: Utc::now(),
        };
        if !self.inner.store.insert_volume(&rec).await? {
            return Err(CoreError::Conflict(format!(
                "volume with name {name:?} already exists"
            )));
        }
        let (id, size) = (rec.id.clone(), rec.size_mb);
        let made = blocking(move |v: &Volumes| v.store.create(&id, size), self).await;
        if let Err(e) = made {
            if let Err(e) = self.inner.store.delete_volume(&rec.id).await {
                tracing::error!(volume = %rec.id, error = %e, "forgetting a volume whose create failed");
            }
            return Err(e);
        }
        Ok(rec)
    }

    pub async fn list_volumes(&self) -> Result<Vec<VolumeRecord>, CoreError> {
        self.volumes()?;
        Ok(self.inner.store.list_volumes().await?)
    }

    pub async fn get_volume(&self, id: &str) -> Result<VolumeRecord, CoreError> {
        self.volumes()?;
        self.inner
            .store
            .get_volume(id)
            .await?
            .ok_or_else(|| CoreError::VolumeNotFound(id.to_owned()))
    }

    /// Deletes the volume and its files; 409 while a sandbox mounts it.
    pub async fn delete_volume(&self, id: &str) -> Result<(), CoreError> {
        let volumes = self.volumes()?;
        let _guard = volumes.lock.write().await;
        match self.inner.store.delete_volume(id).await? {
            Ok(true) => {}
            Ok(false) => return Err(CoreError::VolumeNotFound(id.to_owned())),
            Err(users) => {
                return Err(CoreError::Conflict(format!(
                    "volume {id} is mounted by sandbox {}",
                    users.join(", ")
                )));
            }
        }
        let owned = id.to_owned();
        blocking(move |v: &Volumes| v.store.remove(&owned), self).await
    }

    /// The volume's files for the content API, if `token` is the volume's.
    pub async fn volume_content(&self, id: &str, token: &str) -> Result<VolumeDir, CoreError> {
        self.volumes()?;
        let rec = self
            .inner
            .store
            .get_volume(id)
            .await?
            .ok_or_else(|| CoreError::VolumeNotFound(id.to_owned()))?;
        if !same_token(&rec.token, token) {
            return Err(CoreError::Unauthorized("invalid volume token".into()));
        }
        let (id, size) = (rec.id, rec.size_mb);
        blocking(move |v: &Volumes| v.store.open_volume(&id, size), self).await
    }

    /// The volumes sandbox `id` mounts (`volumeMounts` of its detail), by name.
    pub async fn sandbox_volume_mounts(
        &self,
        id: &str,
    ) -> Result<Vec<SandboxVolumeMount>, CoreError> {
        if self.inner.volumes.is_none() {
            return Ok(Vec::new());
        }
        let mut out = Vec::new();
        for m in self.inner.store.sandbox_volume_mounts(id).await? {
            if let Some(v) = self.inner.store.get_volume(&m.volume_id).await? {
                out.push(SandboxVolumeMount {
                    name: v.name,
                    path: m.path,
                });
            }
        }
        Ok(out)
    }

    /// Checks a create's `volumeMounts` and finds the volumes (400 for an unknown name, a bad
    /// path or a path given twice).
    pub(crate) async fn resolve_volume_mounts(
        &self,
        mounts: &[SandboxVolumeMount],
    ) -> Result<ResolvedMounts<'_>, CoreError> {
        if mounts.is_empty() {
            return Ok(ResolvedMounts {
                runtime: Vec::new(),
                volume_ids: Vec::new(),
                _guard: None,
            });
        }
        let volumes = self.volumes()?;
        if mounts.len() > MAX_MOUNTS {
            return Err(CoreError::InvalidArgument(format!(
                "at most {MAX_MOUNTS} volume mounts"
            )));
        }
        let guard = volumes.lock.read().await;
        let mut seen = std::collections::HashSet::new();
        let mut runtime = Vec::new();
        let mut volume_ids = Vec::new();
        for m in mounts {
            let comps = mount_path_components(&m.path).map_err(CoreError::InvalidArgument)?;
            let path = format!("/{}", comps.join("/"));
            if !seen.insert(path.clone()) {
                return Err(CoreError::InvalidArgument(format!(
                    "volume mount path {path} is given twice"
                )));
            }
            if valid_volume_name(&m.name).is_err() {
                return Err(CoreError::InvalidArgument(format!(
                    "volume {:?} not found",
                    m.name.chars().take(64).collect::<String>()
                )));
            }
            let rec = self
                .inner
                .store
                .get_volume_by_name(&m.name)
                .await?
                .ok_or_else(|| {
                    CoreError::InvalidArgument(format!("volume {:?} not found", m.name))
                })?;
            runtime.push(VolumeMount {
                source: volumes.store.path(&rec.id),
                target: path.clone(),
            });
            volume_ids.push((rec.id, path));
        }
        // Nested mount points would hide one volume under another: refuse them.
        let mut paths: Vec<&String> = seen.iter().collect();
        paths.sort();
        for w in paths.windows(2) {
            if w[1].starts_with(&format!("{}/", w[0])) {
                return Err(CoreError::InvalidArgument(format!(
                    "volume mount paths {} and {} are nested",
                    w[0], w[1]
                )));
            }
        }
        Ok(ResolvedMounts {
            runtime,
            volume_ids,
            _guard: Some(guard),
        })
    }

    /// Records that sandbox `id` mounts the resolved volumes (before its runtime create: a
    /// failed create leaves rows that the next delete prunes, never a mount without a row).
    pub(crate) async fn record_volume_mounts(
        &self,
        id: &str,
        mounts: &ResolvedMounts<'_>,
    ) -> Result<(), CoreError> {
        if mounts.volume_ids.is_empty() {
            return Ok(());
        }
        let rows: Vec<VolumeMountRecord> = mounts
            .volume_ids
            .iter()
            .map(|(volume_id, path)| VolumeMountRecord {
                sandbox_id: id.to_owned(),
                volume_id: volume_id.clone(),
                path: path.clone(),
            })
            .collect();
        Ok(self.inner.store.insert_volume_mounts(&rows).await?)
    }

    /// The runtime mounts sandbox `id` was created with (a resume mounts them again).
    pub(crate) async fn recorded_volume_mounts(
        &self,
        id: &str,
    ) -> Result<Vec<VolumeMount>, CoreError> {
        let Some(volumes) = self.inner.volumes.as_ref() else {
            return Ok(Vec::new());
        };
        Ok(self
            .inner
            .store
            .sandbox_volume_mounts(id)
            .await?
            .into_iter()
            .map(|m| VolumeMount {
                source: volumes.store.path(&m.volume_id),
                target: m.path,
            })
            .collect())
    }

    /// At start: forgets mounts of sandboxes that are gone, and makes the volumes on disk match
    /// the rows. A create records the row before it makes the directory and a delete drops the
    /// row before the directory, so a server that died in between leaves a row without a
    /// directory (made again, empty: the create never answered) or a directory without a row
    /// (a deleted volume: removed).
    pub(crate) async fn prune_volume_mounts(&self) -> Result<(), CoreError> {
        if self.inner.volumes.is_none() {
            return Ok(());
        }
        let n = self.inner.store.prune_volume_mounts().await?;
        if n > 0 {
            tracing::info!(count = n, "forgot volume mounts of sandboxes that are gone");
        }
        let rows = self.inner.store.list_volumes().await?;
        let reconciled = blocking(
            move |v: &Volumes| {
                let on_disk = v.store.ids()?;
                for rec in &rows {
                    if !on_disk.contains(&rec.id) {
                        tracing::warn!(volume = %rec.id, name = %rec.name, "volume directory missing; making it again, empty");
                        v.store.create(&rec.id, rec.size_mb)?;
                    }
                }
                for id in on_disk.iter().filter(|id| !rows.iter().any(|r| &r.id == *id)) {
                    tracing::info!(volume = %id, "removing the files of a deleted volume");
                    v.store.remove(id)?;
                }
                Ok(())
            },
            self,
        )
        .await;
        // A volume that cannot be fixed now must not keep the server from starting.
        if let Err(e) = reconciled {
            tracing::error!(error = %e, "reconciling volumes with their rows");
        }
        Ok(())
    }
}

/// Runs `f` on the volumes on tokio's blocking pool (file system work).
async fn blocking<T: Send + 'static>(
    f: impl FnOnce(&Volumes) -> Result<T, soulbox_runtime::RuntimeError> + Send + 'static,
    m: &Manager,
) -> Result<T, CoreError> {
    let inner = m.inner.clone();
    tokio::task::spawn_blocking(move || match inner.volumes.as_ref() {
        Some(v) => f(v).map_err(CoreError::from),
        None => Err(CoreError::InvalidArgument(
            "this server has no volumes".into(),
        )),
    })
    .await
    .map_err(|e| CoreError::Internal(format!("volume task: {e}")))?
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names() {
        for ok in ["data", "my-vol_1.x", &"a".repeat(128)] {
            assert!(valid_volume_name(ok).is_ok(), "{ok}");
        }
        for bad in [
            "",
            "a/b",
            "..",
            ".hidden",
            "a\0b",
            "sp ace",
            &"a".repeat(129),
            &"a".repeat(10 * 1024),
        ] {
            assert!(valid_volume_name(bad).is_err(), "{bad:?}");
        }
    }

    #[test]
    fn tokens() {
        assert!(same_token("abc", "abc"));
        assert!(!same_token("abc", "abd"));
        assert!(!same_token("abc", "abcd"));
    }
}
