//! Templates built into the layer store: template names and ids, builds, tags, the build step
//! cache and which build each sandbox runs on (migration `0002_template_builds.sql`).
//!
//! Build configs are opaque JSON here (core owns their shape).

use chrono::{DateTime, Utc};

use crate::{Store, StoreError, from_i64, from_millis};

/// A template: a unique name and its id.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TemplateDef {
    pub id: String,
    pub name: String,
    pub cpu_count: Option<u32>,
    pub memory_mb: Option<u64>,
    pub created_at: DateTime<Utc>,
}

/// Build states, as the E2B API names them.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum BuildStatus {
    Waiting,
    Building,
    Ready,
    Error,
}

impl BuildStatus {
    pub fn as_str(self) -> &'static str {
        match self {
            BuildStatus::Waiting => "waiting",
            BuildStatus::Building => "building",
            BuildStatus::Ready => "ready",
            BuildStatus::Error => "error",
        }
    }

    fn parse(s: &str) -> Option<BuildStatus> {
        Some(match s {
            "waiting" => BuildStatus::Waiting,
            "building" => BuildStatus::Building,
            "ready" => BuildStatus::Ready,
            "error" => BuildStatus::Error,
            _ => return None,
        })
    }
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BuildRecord {
    pub id: String,
    pub template_id: String,
    pub status: BuildStatus,
    /// Core's build config as JSON (present once ready).
    pub config: Option<String>,
    pub reason: Option<String>,
    pub reason_step: Option<String>,
    pub created_at: DateTime<Utc>,
    pub finished_at: Option<DateTime<Utc>>,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TagRecord {
    pub tag: String,
    pub build_id: String,
    pub created_at: DateTime<Utc>,
}

#[derive(sqlx::FromRow)]
struct DefRow {
    id: String,
    name: String,
    cpu_count: Option<i64>,
    memory_mb: Option<i64>,
    created_at: i64,
}

#[derive(sqlx::FromRow)]
struct BuildRow {
    id: String,
    template_id: String,
    status: String,
    config: Option<String>,
    reason: Option<String>,
    reason_step: Option<String>,
    created_at: i64,
    finished_at: Option<i64>,
}

impl TryFrom<DefRow> for TemplateDef {
    type Error = StoreError;

    fn try_from(r: DefRow) -> Result<Self, StoreError> {
        Ok(TemplateDef {
            cpu_count: r.cpu_count.map(|v| from_i64("cpu_count", v)).transpose()?,
            memory_mb: r.memory_mb.map(|v| from_i64("memory_mb", v)).transpose()?,
            created_at: from_millis("created_at", r.created_at)?,
            id: r.id,
            name: r.name,
        })
    }
}

impl TryFrom<BuildRow> for BuildRecord {
    type Error = StoreError;

    fn try_from(r: BuildRow) -> Result<Self, StoreError> {
        Ok(BuildRecord {
            status: BuildStatus::parse(&r.status)
                .ok_or_else(|| StoreError::Corrupt(format!("build status = {}", r.status)))?,
            created_at: from_millis("created_at", r.created_at)?,
            finished_at: r
                .finished_at
                .map(|v| from_millis("finished_at", v))
                .transpose()?,
            id: r.id,
            template_id: r.template_id,
            config: r.config,
            reason: r.reason,
            reason_step: r.reason_step,
        })
    }
}

const BUILD_COLUMNS: &str =
    "id, template_id, status, config, reason, reason_step, created_at, finished_at";

impl Store {
    /// Creates the template `name` with id `id`; `false` if the name is taken.
    pub async fn insert_template_def(&self, d: &TemplateDef) -> Result<bool, StoreError> {
        let done = sqlx::query(
            "INSERT INTO template_defs (id, name, cpu_count, memory_mb, created_at) \
             VALUES (?, ?, ?, ?, ?) ON CONFLICT (name) DO NOTHING",
        )
        .bind(&d.id)
        .bind(&d.name)
        .bind(d.cpu_count.map(i64::from))
        .bind(d.memory_mb.map(crate::to_i64).transpose()?)
        .bind(d.created_at.timestamp_millis())
        .execute(&self.pool)
        .await?;
        Ok(done.rows_affected() > 0)
    }

    /// Updates the requested resources of an existing template.
    pub async fn set_template_resources(
        &self,
        id: &str,
        cpu_count: Option<u32>,
        memory_mb: Option<u64>,
    ) -> Result<(), StoreError> {
        sqlx::query("UPDATE template_defs SET cpu_count = ?, memory_mb = ? WHERE id = ?")
            .bind(cpu_count.map(i64::from))
            .bind(memory_mb.map(crate::to_i64).transpose()?)
            .bind(id)
            .execute(&self.pool)
            .await?;
        Ok(())
    }

    /// The template whose id or name is `key`.
    pub async fn find_template_def(&self, key: &str) -> Result<Option<TemplateDef>, StoreError> {
        let row: Option<DefRow> =
            sqlx::query_as("SELECT * FROM template_defs WHERE id = ? OR name = ? LIMIT 1")
                .bind(key)
                .bind(key)
                .fetch_optional(&self.pool)
                .await?;
        row.map(TemplateDef::try_from).transpose()
    }

    pub async fn list_template_defs(&self) -> Result<Vec<TemplateDef>, StoreError> {
        let rows: Vec<DefRow> = sqlx::query_as("SELECT * FROM template_defs ORDER BY name")
            .fetch_all(&self.pool)
            .await?;
        rows.into_iter().map(TemplateDef::try_from).collect()
    }

    /// Deletes the template and its tags (its builds stay until [`Store::delete_build`]).
    pub async fn delete_template_def(&self, id: &str) -> Result<bool, StoreError> {
        let mut tx = self.pool.begin().await?;
        sqlx::query("DELETE FROM template_tags WHERE template_id = ?")
            .bind(id)
            .execute(&mut *tx)
            .await?;
        sqlx::query("DELETE FROM snapshots WHERE template_id = ?")
            .bind(id)
            .execute(&mut *tx)
            .await?;
        let done = sqlx::query("DELETE FROM template_defs WHERE id = ?")
            .bind(id)
            .execute(&mut *tx)
            .await?;
        tx.commit().await?;
        Ok(done.rows_affected() > 0)
    }

    /// Records that template `template_id` is a snapshot of sandbox `sandbox_id`.
    pub async fn insert_snapshot(
        &self,
        template_id: &str,
        sandbox_id: &str,
        at: DateTime<Utc>,
    ) -> Result<(), StoreError> {
        sqlx::query(
            "INSERT INTO snapshots (template_id, sandbox_id, created_at) VALUES (?, ?, ?) \
             ON CONFLICT (template_id) DO UPDATE SET sandbox_id = excluded.sandbox_id, \
             created_at = excluded.created_at",
        )
        .bind(template_id)
        .bind(sandbox_id)
        .bind(at.timestamp_millis())
        .execute(&self.pool)
        .await?;
        Ok(())
    }

    /// Snapshot templates, newest first: of `sandbox_id` only when given, named `name` only
    /// when given; at most `limit` after the first `offset`.
    pub async fn list_snapshots(
        &self,
        sandbox_id: Option<&str>,
        name: Option<&str>,
        offset: u32,
        limit: u32,
    ) -> Result<Vec<TemplateDef>, StoreError> {
        let rows: Vec<DefRow> = sqlx::query_as(
            "SELECT d.id, d.name, d.cpu_count, d.memory_mb, d.created_at FROM snapshots s \
             JOIN template_defs d ON d.id = s.template_id \
             WHERE (?1 IS NULL OR s.sandbox_id = ?1) AND (?2 IS NULL OR d.name = ?2) \
             ORDER BY s.created_at DESC, d.id LIMIT ?3 OFFSET ?4",
        )
        .bind(sandbox_id)
        .bind(name)
        .bind(i64::from(limit))
        .bind(i64::from(offset))
        .fetch_all(&self.pool)
        .await?;
        rows.into_iter().map(TemplateDef::try_from).collect()
    }

    pub async fn insert_build(&self, b: &BuildRecord) -> Result<(), StoreError> {
        sqlx::query(&format!(
            "INSERT INTO template_builds ({BUILD_COLUMNS}) VALUES (?, ?, ?, ?, ?, ?, ?, ?)"
        ))
        .bind(&b.id)
        .bind(&b.template_id)
        .bind(b.status.as_str())
        .bind(&b.config)
        .bind(&b.reason)
        .bind(&b.reason_step)
        .bind(b.created_at.timestamp_millis())
        .bind(b.finished_at.map(|t| t.timestamp_millis()))
        .execute(&self.pool)
        .await?;
        Ok(())
    }

    pub async fn get_build(&self, id: &str) -> Result<Option<BuildRecord>, StoreError> {
        let row: Option<BuildRow> = sqlx::query_as(&format!(
            "SELECT {BUILD_COLUMNS} FROM template_builds WHERE id = ?"
        ))
        .bind(id)
        .fetch_optional(&self.pool)
        .await?;
        row.map(BuildRecord::try_from).transpose()
    }

    /// Builds of a template, newest first.
    pub async fn builds_of(&self, template_id: &str) -> Result<Vec<BuildRecord>, StoreError> {
        let rows: Vec<BuildRow> = sqlx::query_as(&format!(
            "SELECT {BUILD_COLUMNS} FROM template_builds WHERE template_id = ? \
             ORDER BY created_at DESC, id DESC"
        ))
        .bind(template_id)
        .fetch_all(&self.pool)
        .await?;
        rows.into_iter().map(BuildRecord::try_from).collect()
    }

    /// Every build (for garbage collection).
    pub async fn all_builds(&self) -> Result<Vec<BuildRecord>, StoreError> {
        let rows: Vec<BuildRow> =
            sqlx::query_as(&format!("SELECT {BUILD_COLUMNS} FROM template_builds"))
                .fetch_all(&self.pool)
                .await?;
        rows.into_iter().map(BuildRecord::try_from).collect()
    }

    /// Moves a build to `status`; a finished one (ready/error) gets its end time and config or
    /// reason. A ready build also becomes what the tags in `tags` point at, atomically.
    pub async fn finish_build(&self, b: &BuildRecord, tags: &[String]) -> Result<(), StoreError> {
        let mut tx = self.pool.begin().await?;
        sqlx::query(
            "UPDATE template_builds SET status = ?, config = ?, reason = ?, reason_step = ?, \
             finished_at = ? WHERE id = ?",
        )
        .bind(b.status.as_str())
        .bind(&b.config)
        .bind(&b.reason)
        .bind(&b.reason_step)
        .bind(b.finished_at.map(|t| t.timestamp_millis()))
        .bind(&b.id)
        .execute(&mut *tx)
        .await?;
        for tag in tags {
            sqlx::query(
                "INSERT INTO template_tags (template_id, tag, build_id, created_at) \
                 VALUES (?, ?, ?, ?) ON CONFLICT (template_id, tag) DO UPDATE SET \
                 build_id = excluded.build_id, created_at = excluded.created_at",
            )
            .bind(&b.template_id)
            .bind(tag)
            .bind(&b.id)
            .bind(Utc::now().timestamp_millis())
            .execute(&mut *tx)
            .await?;
        }
        tx.commit().await?;
        Ok(())
    }

    /// Marks builds that were running when the server stopped as failed; returns their ids.
    pub async fn fail_unfinished_builds(&self, reason: &str) -> Result<Vec<String>, StoreError> {
        let ids: Vec<(String,)> = sqlx::query_as(
            "UPDATE template_builds SET status = 'error', reason = ?, finished_at = ? \
             WHERE status IN ('waiting', 'building') RETURNING id",
        )
        .bind(reason)
        .bind(Utc::now().timestamp_millis())
        .fetch_all(&self.pool)
        .await?;
        Ok(ids.into_iter().map(|(id,)| id).collect())
    }

    pub async fn delete_build(&self, id: &str) -> Result<(), StoreError> {
        sqlx::query("DELETE FROM template_builds WHERE id = ?")
            .bind(id)
            .execute(&self.pool)
            .await?;
        Ok(())
    }

    /// Points `tag` of the template at `build_id`.
    pub async fn set_tag(
        &self,
        template_id: &str,
        tag: &str,
        build_id: &str,
    ) -> Result<(), StoreError> {
        sqlx::query(
            "INSERT INTO template_tags (template_id, tag, build_id, created_at) VALUES (?, ?, ?, ?) \
             ON CONFLICT (template_id, tag) DO UPDATE SET build_id = excluded.build_id, \
             created_at = excluded.created_at",
        )
        .bind(template_id)
        .bind(tag)
        .bind(build_id)
        .bind(Utc::now().timestamp_millis())
        .execute(&self.pool)
        .await?;
        Ok(())
    }

    /// Removes a tag; `false` when there was none.
    pub async fn delete_tag(&self, template_id: &str, tag: &str) -> Result<bool, StoreError> {
        let done = sqlx::query("DELETE FROM template_tags WHERE template_id = ? AND tag = ?")
            .bind(template_id)
            .bind(tag)
            .execute(&self.pool)
            .await?;
        Ok(done.rows_affected() > 0)
    }

    pub async fn tags_of(&self, template_id: &str) -> Result<Vec<TagRecord>, StoreError> {
        let rows: Vec<(String, String, i64)> = sqlx::query_as(
            "SELECT tag, build_id, created_at FROM template_tags WHERE template_id = ? ORDER BY tag",
        )
        .bind(template_id)
        .fetch_all(&self.pool)
        .await?;
        rows.into_iter()
            .map(|(tag, build_id, at)| {
                Ok(TagRecord {
                    tag,
                    build_id,
                    created_at: from_millis("created_at", at)?,
                })
            })
            .collect()
    }

    /// Build ids any tag points at.
    pub async fn tagged_builds(&self) -> Result<Vec<String>, StoreError> {
        let rows: Vec<(String,)> = sqlx::query_as("SELECT DISTINCT build_id FROM template_tags")
            .fetch_all(&self.pool)
            .await?;
        Ok(rows.into_iter().map(|(id,)| id).collect())
    }

    /// The cached result of a build step: `Some(None)` = the step added no layer.
    pub async fn cached_layer(&self, key: &str) -> Result<Option<Option<String>>, StoreError> {
        let row: Option<(Option<String>,)> =
            sqlx::query_as("SELECT layer FROM layer_cache WHERE key = ?")
                .bind(key)
                .fetch_optional(&self.pool)
                .await?;
        Ok(row.map(|(layer,)| layer))
    }

    pub async fn cache_layer(&self, key: &str, layer: Option<&str>) -> Result<(), StoreError> {
        sqlx::query(
            "INSERT INTO layer_cache (key, layer, created_at) VALUES (?, ?, ?) \
             ON CONFLICT (key) DO UPDATE SET layer = excluded.layer",
        )
        .bind(key)
        .bind(layer)
        .bind(Utc::now().timestamp_millis())
        .execute(&self.pool)
        .await?;
        Ok(())
    }

    /// Forgets cache entries that name a layer not in `keep`.
    pub async fn prune_layer_cache(&self, keep: &[String]) -> Result<u64, StoreError> {
        let keep = serde_json::to_string(keep)
            .map_err(|e| StoreError::Corrupt(format!("encoding layer list: {e}")))?;
        let done = sqlx::query(
            "DELETE FROM layer_cache WHERE layer IS NOT NULL \
             AND layer NOT IN (SELECT value FROM json_each(?))",
        )
        .bind(keep)
        .execute(&self.pool)
        .await?;
        Ok(done.rows_affected())
    }

    /// Records the build a new sandbox runs on.
    pub async fn set_sandbox_build(
        &self,
        sandbox_id: &str,
        build_id: &str,
    ) -> Result<(), StoreError> {
        sqlx::query(
            "INSERT INTO sandbox_builds (sandbox_id, build_id) VALUES (?, ?) \
             ON CONFLICT (sandbox_id) DO UPDATE SET build_id = excluded.build_id",
        )
        .bind(sandbox_id)
        .bind(build_id)
        .execute(&self.pool)
        .await?;
        Ok(())
    }

    /// The build a sandbox runs on (`None` for sandboxes of templates registered by path).
    pub async fn sandbox_build(&self, sandbox_id: &str) -> Result<Option<String>, StoreError> {
        let row: Option<(String,)> =
            sqlx::query_as("SELECT build_id FROM sandbox_builds WHERE sandbox_id = ?")
                .bind(sandbox_id)
                .fetch_optional(&self.pool)
                .await?;
        Ok(row.map(|(b,)| b))
    }

    /// Builds that existing sandboxes run on; forgets rows of sandboxes that are gone.
    pub async fn builds_in_use(&self) -> Result<Vec<String>, StoreError> {
        sqlx::query(
            "DELETE FROM sandbox_builds WHERE sandbox_id NOT IN (SELECT id FROM sandboxes)",
        )
        .execute(&self.pool)
        .await?;
        let rows: Vec<(String,)> = sqlx::query_as("SELECT DISTINCT build_id FROM sandbox_builds")
            .fetch_all(&self.pool)
            .await?;
        Ok(rows.into_iter().map(|(id,)| id).collect())
    }

    /// Ids of sandboxes running on any build of `template_id`.
    pub async fn sandboxes_on_template(
        &self,
        template_id: &str,
    ) -> Result<Vec<String>, StoreError> {
        let rows: Vec<(String,)> = sqlx::query_as(
            "SELECT sb.sandbox_id FROM sandbox_builds sb \
             JOIN template_builds b ON b.id = sb.build_id \
             JOIN sandboxes s ON s.id = sb.sandbox_id WHERE b.template_id = ?",
        )
        .bind(template_id)
        .fetch_all(&self.pool)
        .await?;
        Ok(rows.into_iter().map(|(id,)| id).collect())
    }
}
