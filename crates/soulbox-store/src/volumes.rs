//! Volumes and which sandboxes mount them (migration `0004_volumes.sql`).

use chrono::{DateTime, Utc};

use crate::{Store, StoreError, from_i64, from_millis};

/// One volume row.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct VolumeRecord {
    pub id: String,
    pub name: String,
    /// Bearer token of its content API.
    pub token: String,
    pub size_mb: u64,
    pub created_at: DateTime<Utc>,
}

/// One mount of a volume into a sandbox.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct VolumeMountRecord {
    pub sandbox_id: String,
    pub volume_id: String,
    /// Where it appears inside the sandbox.
    pub path: String,
}

#[derive(sqlx::FromRow)]
struct VolumeRow {
    id: String,
    name: String,
    token: String,
    size_mb: i64,
    created_at: i64,
}

impl TryFrom<VolumeRow> for VolumeRecord {
    type Error = StoreError;

    fn try_from(r: VolumeRow) -> Result<Self, StoreError> {
        Ok(VolumeRecord {
            size_mb: from_i64("size_mb", r.size_mb)?,
            created_at: from_millis("created_at", r.created_at)?,
            id: r.id,
            name: r.name,
            token: r.token,
        })
    }
}

const VOLUME_COLUMNS: &str = "id, name, token, size_mb, created_at";

impl Store {
    /// Records a new volume; `false` if its name (or id) is taken.
    pub async fn insert_volume(&self, v: &VolumeRecord) -> Result<bool, StoreError> {
        let done = sqlx::query(
            "INSERT INTO volumes (id, name, token, size_mb, created_at) VALUES (?, ?, ?, ?, ?) \
             ON CONFLICT DO NOTHING",
        )
        .bind(&v.id)
        .bind(&v.name)
        .bind(&v.token)
        .bind(crate::to_i64(v.size_mb)?)
        .bind(v.created_at.timestamp_millis())
        .execute(&self.pool)
        .await?;
        Ok(done.rows_affected() == 1)
    }

    pub async fn get_volume(&self, id: &str) -> Result<Option<VolumeRecord>, StoreError> {
        let row: Option<VolumeRow> = sqlx::query_as(&format!(
            "SELECT {VOLUME_COLUMNS} FROM volumes WHERE id = ?"
        ))
        .bind(id)
        .fetch_optional(&self.pool)
        .await?;
        row.map(VolumeRecord::try_from).transpose()
    }

    pub async fn get_volume_by_name(&self, name: &str) -> Result<Option<VolumeRecord>, StoreError> {
        let row: Option<VolumeRow> = sqlx::query_as(&format!(
            "SELECT {VOLUME_COLUMNS} FROM volumes WHERE name = ?"
        ))
        .bind(name)
        .fetch_optional(&self.pool)
        .await?;
        row.map(VolumeRecord::try_from).transpose()
    }

    /// Every volume, oldest first.
    pub async fn list_volumes(&self) -> Result<Vec<VolumeRecord>, StoreError> {
        let rows: Vec<VolumeRow> = sqlx::query_as(&format!(
            "SELECT {VOLUME_COLUMNS} FROM volumes ORDER BY created_at, id"
        ))
        .fetch_all(&self.pool)
        .await?;
        rows.into_iter().map(VolumeRecord::try_from).collect()
    }

    /// Deletes the volume's row unless a sandbox that has a row mounts it: `Ok(Err(sandbox ids))` then.
    /// `Ok(Ok(false))` if there was no such volume.
    pub async fn delete_volume(&self, id: &str) -> Result<Result<bool, Vec<String>>, StoreError> {
        let mut tx = self.pool.begin().await?;
        let users: Vec<(String,)> = sqlx::query_as(
            "SELECT DISTINCT sandbox_id FROM sandbox_volumes WHERE volume_id = ? \
             AND sandbox_id IN (SELECT id FROM sandboxes) ORDER BY 1",
        )
        .bind(id)
        .fetch_all(&mut *tx)
        .await?;
        if !users.is_empty() {
            return Ok(Err(users.into_iter().map(|(s,)| s).collect()));
        }
        // Rows of sandboxes that are gone (their mounts are not deleted with them).
        sqlx::query("DELETE FROM sandbox_volumes WHERE volume_id = ?")
            .bind(id)
            .execute(&mut *tx)
            .await?;
        let done = sqlx::query("DELETE FROM volumes WHERE id = ?")
            .bind(id)
            .execute(&mut *tx)
            .await?;
        tx.commit().await?;
        Ok(Ok(done.rows_affected() == 1))
    }

    /// Records the mounts of one sandbox (all or none).
    pub async fn insert_volume_mounts(
        &self,
        mounts: &[VolumeMountRecord],
    ) -> Result<(), StoreError> {
        let mut tx = self.pool.begin().await?;
        for m in mounts {
            sqlx::query(
                "INSERT INTO sandbox_volumes (sandbox_id, volume_id, path) VALUES (?, ?, ?)",
            )
            .bind(&m.sandbox_id)
            .bind(&m.volume_id)
            .bind(&m.path)
            .execute(&mut *tx)
            .await?;
        }
        tx.commit().await?;
        Ok(())
    }

    /// The volumes `sandbox_id` mounts, in path order.
    pub async fn sandbox_volume_mounts(
        &self,
        sandbox_id: &str,
    ) -> Result<Vec<VolumeMountRecord>, StoreError> {
        let rows: Vec<(String, String, String)> = sqlx::query_as(
            "SELECT sandbox_id, volume_id, path FROM sandbox_volumes WHERE sandbox_id = ? \
             ORDER BY path",
        )
        .bind(sandbox_id)
        .fetch_all(&self.pool)
        .await?;
        Ok(rows
            .into_iter()
            .map(|(sandbox_id, volume_id, path)| VolumeMountRecord {
                sandbox_id,
                volume_id,
                path,
            })
            .collect())
    }

    /// Forgets the mounts of `sandbox_id` (after it is destroyed).
    pub async fn delete_volume_mounts(&self, sandbox_id: &str) -> Result<(), StoreError> {
        sqlx::query("DELETE FROM sandbox_volumes WHERE sandbox_id = ?")
            .bind(sandbox_id)
            .execute(&self.pool)
            .await?;
        Ok(())
    }

    /// Drops mount rows of sandboxes that have no row any more (a kill that ended between the
    /// two deletes, or a server that died there); returns how many went.
    pub async fn prune_volume_mounts(&self) -> Result<u64, StoreError> {
        let done = sqlx::query(
            "DELETE FROM sandbox_volumes WHERE sandbox_id NOT IN (SELECT id FROM sandboxes)",
        )
        .execute(&self.pool)
        .await?;
        Ok(done.rows_affected())
    }
}
