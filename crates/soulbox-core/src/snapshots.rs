//! Snapshots (docs/persistence.md): a template made from a sandbox as it is now.
//!
//! A snapshot is a template like any other (a def, one ready build, the tag `default`) whose
//! layers are the sandbox's template's layers plus one more: a copy of the sandbox's writable
//! layer, taken while the sandbox is frozen (a running one runs on right after the copy), then
//! hashed into the layer store as a build step's is. Sandboxes created from it boot over those
//! files with the template's start command and the source's environment. Memory is not part
//! of it (no memory checkpoints yet: docs/persistence.md), whatever `memory` asks.
//!
//! What sandboxed code can do with this: put any files in the snapshot (its own files, which
//! is what a snapshot is); the copy never follows its symlinks and its owners are shifted out
//! of the sandbox's uid range exactly as a build step's upper layer is.

use chrono::Utc;
use soulbox_store::{BuildRecord, BuildStatus, TemplateDef};
use soulbox_wire::rest::SandboxState;

use crate::templates::{DEFAULT_TAG, SETUP_FILES, sha256_hex, upper_dir, valid_template_name};
use crate::{CoreError, Manager, new_sandbox_id, stored_handle};

/// A snapshot as the SDKs see it (`SnapshotInfo`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Snapshot {
    /// What `Sandbox.create` takes: `<name>:default`, or `<template id>:default` when unnamed.
    pub snapshot_id: String,
    /// `<name>:<tag>` of every tag.
    pub names: Vec<String>,
}

impl Manager {
    /// `POST /sandboxes/{id}/snapshots`: a template of the sandbox's files (running or
    /// paused; a running one is frozen only while its files are copied). `name` reuses the
    /// template of that name (a new build) or makes one.
    pub async fn create_snapshot(
        &self,
        id: &str,
        name: Option<String>,
    ) -> Result<Snapshot, CoreError> {
        if let Some(n) = &name
            && !valid_template_name(n)
        {
            return Err(CoreError::InvalidArgument(format!(
                "invalid snapshot name '{n}': use 1-128 of a-z, 0-9, '.', '_', '-', '/'"
            )));
        }
        let this = self.clone();
        let id = id.to_owned();
        tokio::spawn(async move { this.snapshot_inner(&id, name).await })
            .await
            .map_err(|e| CoreError::Internal(format!("snapshot task: {e}")))?
    }

    async fn snapshot_inner(&self, id: &str, name: Option<String>) -> Result<Snapshot, CoreError> {
        let layers = self.template_state()?.layers.clone();
        let _busy = self.begin(id)?;
        let store = &self.inner.store;
        let rec = self.record(id).await?;
        let handle = stored_handle(&rec)?;
        let template = self.resolve_sandbox_template(&rec).await?;
        let upper = upper_dir(&handle)?;
        // A paused sandbox is quiescent already (frozen, or without processes).
        let freeze = rec.state == SandboxState::Running;
        if freeze {
            self.inner.runtime.freeze(&handle, true).await?;
        }
        let t0 = std::time::Instant::now();
        let copy_store = layers.clone();
        let copied = tokio::task::spawn_blocking(move || copy_store.copy_in(&upper)).await;
        let frozen_for = t0.elapsed();
        if freeze && let Err(e) = self.inner.runtime.freeze(&handle, false).await {
            tracing::error!(%id, error = %e, "thawing a sandbox after its snapshot");
        }
        let copied = copied
            .map_err(|e| CoreError::Internal(format!("snapshot copy: {e}")))?
            .map_err(|e| CoreError::Internal(format!("snapshot copy: {e}")))?;
        let uid_base = handle.uid_base;
        let layer =
            tokio::task::spawn_blocking(move || layers.ingest(&copied, uid_base, SETUP_FILES))
                .await
                .map_err(|e| CoreError::Internal(format!("snapshot layer: {e}")))?
                .map_err(|e| CoreError::Internal(format!("snapshot layer: {e}")))?;

        let mut config = template.config.clone();
        config
            .layers
            .extend(layer.as_ref().map(|l| l.digest.clone()));
        config.env.extend(rec.env_vars.clone());
        config.cpu_count = rec.cpu_count;
        config.memory_mb = rec.memory_mb;
        config.disk_mb = rec.disk_mb;
        let build_id = uuid::Uuid::new_v4().to_string();
        config.cache_key = sha256_hex(&["snapshot", &build_id]);
        let def = self.snapshot_def(name.as_deref()).await?;
        let now = Utc::now();
        let mut build = BuildRecord {
            id: build_id,
            template_id: def.id.clone(),
            status: BuildStatus::Building,
            config: None,
            reason: None,
            reason_step: None,
            created_at: now,
            finished_at: None,
        };
        store.insert_build(&build).await?;
        build.status = BuildStatus::Ready;
        build.config = Some(
            serde_json::to_string(&config)
                .map_err(|e| CoreError::Internal(format!("encoding a build config: {e}")))?,
        );
        build.finished_at = Some(Utc::now());
        store
            .finish_build(&build, &[DEFAULT_TAG.to_owned()])
            .await?;
        store.insert_snapshot(&def.id, id, now).await?;
        tracing::info!(
            %id,
            template = %def.name,
            frozen_ms = frozen_for.as_secs_f64() * 1e3,
            layer_bytes = layer.map_or(0, |l| l.disk_bytes),
            "snapshot taken"
        );
        Ok(snapshot_of(&def, name.is_some()))
    }

    /// The template a snapshot goes to: the one named `name` (created if new), else a new
    /// one named by its id.
    async fn snapshot_def(&self, name: Option<&str>) -> Result<TemplateDef, CoreError> {
        let store = &self.inner.store;
        if let Some(name) = name {
            match store.find_template_def(name).await? {
                Some(def) if def.name == name => return Ok(def),
                Some(_) => {
                    return Err(CoreError::Conflict(format!(
                        "'{name}' is the id of another template"
                    )));
                }
                None => {}
            }
        }
        let id = new_sandbox_id();
        let def = TemplateDef {
            name: name.map_or_else(|| id.clone(), str::to_owned),
            id,
            cpu_count: None,
            memory_mb: None,
            created_at: Utc::now(),
        };
        if !store.insert_template_def(&def).await? {
            return Err(CoreError::Conflict(format!(
                "template '{}' was just created by another request",
                def.name
            )));
        }
        Ok(def)
    }

    /// `GET /snapshots`: newest first, of one sandbox and/or one name when given.
    pub async fn list_snapshots(
        &self,
        sandbox_id: Option<&str>,
        name: Option<&str>,
        offset: u32,
        limit: u32,
    ) -> Result<Vec<Snapshot>, CoreError> {
        let defs = self
            .inner
            .store
            .list_snapshots(sandbox_id, name, offset, limit)
            .await?;
        Ok(defs
            .iter()
            .map(|d| snapshot_of(d, d.name != d.id))
            .collect())
    }
}

fn snapshot_of(def: &TemplateDef, named: bool) -> Snapshot {
    let key = if named { &def.name } else { &def.id };
    Snapshot {
        snapshot_id: format!("{key}:{DEFAULT_TAG}"),
        names: vec![format!("{}:{DEFAULT_TAG}", def.name)],
    }
}
