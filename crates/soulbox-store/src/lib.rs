//! Persistent state (SQLite through sqlx): sandboxes, templates, API keys.
//!
//! One SQLite file in WAL mode; the schema lives in `migrations/` and is applied on open.
//! Queries are checked at run time, so building needs no `DATABASE_URL`.
//!
//! What sandboxed code can do with this: nothing directly; the file lives in the host-only data
//! directory and is created 0600. It holds envd access tokens in clear (the gateway must verify
//! signatures with them) and API keys only as sha256 hashes.

#![forbid(unsafe_code)]

mod keys;
mod templates;
mod volumes;

use std::collections::BTreeMap;
use std::os::unix::fs::OpenOptionsExt;
use std::path::{Path, PathBuf};
use std::str::FromStr;
use std::time::Duration;

use chrono::{DateTime, Utc};
use soulbox_wire::rest::SandboxState;
use sqlx::sqlite::{SqliteConnectOptions, SqliteJournalMode, SqlitePoolOptions, SqliteSynchronous};
use sqlx::{QueryBuilder, Sqlite, SqlitePool};

pub use keys::{generate_api_key, hash_api_key, is_api_key_format};
pub use templates::{BuildRecord, BuildStatus, TagRecord, TemplateDef};
pub use volumes::{VolumeMountRecord, VolumeRecord};

#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    #[error("database: {0}")]
    Db(#[from] sqlx::Error),
    #[error("database migration: {0}")]
    Migrate(#[from] sqlx::migrate::MigrateError),
    #[error("creating database file {path}: {source}")]
    Create {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("stored row is corrupt: {0}")]
    Corrupt(String),
}

/// A template as the manager needs it to create sandboxes.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TemplateRecord {
    pub name: String,
    /// Read-only rootfs layers, lowest first.
    pub layers: Vec<PathBuf>,
    pub cpu_count: u32,
    pub memory_mb: u64,
    pub disk_mb: u64,
    pub default_user: String,
    pub default_workdir: String,
    pub created_at: DateTime<Utc>,
}

/// One sandbox row.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SandboxRecord {
    pub id: String,
    pub template_id: String,
    pub alias: Option<String>,
    pub metadata: BTreeMap<String, String>,
    pub env_vars: BTreeMap<String, String>,
    pub access_token: Option<String>,
    pub started_at: DateTime<Utc>,
    pub end_at: DateTime<Utc>,
    pub cpu_count: u32,
    pub memory_mb: u64,
    pub disk_mb: u64,
    /// The runtime's `SandboxHandle`, serialised by the manager (opaque here).
    pub handle: String,
    pub state: SandboxState,
    /// What the create asked for on timeout and traffic, serialised by the manager (opaque).
    pub lifecycle: String,
    /// What the latest pause kept, serialised by the manager (opaque); `None` while running.
    pub pause: Option<String>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum Order {
    Asc,
    #[default]
    Desc,
}

/// Position after which a page starts: the last row of the previous page.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Cursor {
    pub started_at: DateTime<Utc>,
    pub id: String,
}

/// Filters for [`Store::list_sandboxes`]; every given filter must match.
#[derive(Debug, Clone, Default)]
pub struct SandboxQuery {
    /// Exact key/value pairs that must all be present in the metadata.
    pub metadata: Vec<(String, String)>,
    /// Allowed states; empty = any.
    pub states: Vec<SandboxState>,
    pub template: Option<String>,
    pub started_after: Option<DateTime<Utc>>,
    pub order: Order,
    pub after: Option<Cursor>,
    pub limit: Option<u32>,
}

/// Handle to the database; cheap to clone.
#[derive(Clone, Debug)]
pub struct Store {
    pool: SqlitePool,
}

#[derive(sqlx::FromRow)]
struct SandboxRow {
    id: String,
    template_id: String,
    alias: Option<String>,
    metadata: String,
    env_vars: String,
    access_token: Option<String>,
    started_at: i64,
    end_at: i64,
    cpu_count: i64,
    memory_mb: i64,
    disk_mb: i64,
    handle: String,
    state: String,
    lifecycle: String,
    pause: Option<String>,
}

#[derive(sqlx::FromRow)]
struct TemplateRow {
    name: String,
    layers: String,
    cpu_count: i64,
    memory_mb: i64,
    disk_mb: i64,
    default_user: String,
    default_workdir: String,
    created_at: i64,
}

const SANDBOX_COLUMNS: &str = "id, template_id, alias, metadata, env_vars, access_token, \
     started_at, end_at, cpu_count, memory_mb, disk_mb, handle, state, lifecycle, pause";

impl Store {
    /// Opens (creating if needed, mode 0600) the database at `path` and applies migrations.
    pub async fn open(path: &Path) -> Result<Store, StoreError> {
        // Create the file ourselves so it is 0600 from the start; SQLite gives its -wal and
        // -shm files the same mode.
        std::fs::OpenOptions::new()
            .create(true)
            .truncate(false)
            .write(true)
            .mode(0o600)
            .open(path)
            .map_err(|source| StoreError::Create {
                path: path.to_owned(),
                source,
            })?;
        let opts = SqliteConnectOptions::new()
            .filename(path)
            .journal_mode(SqliteJournalMode::Wal)
            .synchronous(SqliteSynchronous::Normal)
            .busy_timeout(Duration::from_secs(5))
            .foreign_keys(true);
        let pool = SqlitePoolOptions::new()
            .max_connections(8)
            .connect_with(opts)
            .await?;
        sqlx::migrate!().run(&pool).await?;
        Ok(Store { pool })
    }

    /// Stores the hash of `key` under `name`; storing the same key again is a no-op.
    pub async fn add_api_key(&self, key: &str, name: &str) -> Result<(), StoreError> {
        sqlx::query("INSERT OR IGNORE INTO api_keys (key_hash, name, created_at) VALUES (?, ?, ?)")
            .bind(hash_api_key(key))
            .bind(name)
            .bind(Utc::now().timestamp_millis())
            .execute(&self.pool)
            .await?;
        Ok(())
    }

    /// Whether `key` is a known API key.
    pub async fn api_key_valid(&self, key: &str) -> Result<bool, StoreError> {
        let found: Option<(i64,)> = sqlx::query_as("SELECT 1 FROM api_keys WHERE key_hash = ?")
            .bind(hash_api_key(key))
            .fetch_optional(&self.pool)
            .await?;
        Ok(found.is_some())
    }

    /// Inserts or replaces the template called `t.name`.
    pub async fn upsert_template(&self, t: &TemplateRecord) -> Result<(), StoreError> {
        let layers: Vec<String> = t
            .layers
            .iter()
            .map(|p| p.to_string_lossy().into_owned())
            .collect();
        let layers = serde_json::to_string(&layers)
            .map_err(|e| StoreError::Corrupt(format!("template layers: {e}")))?;
        sqlx::query(
            "INSERT INTO templates (name, layers, cpu_count, memory_mb, disk_mb, default_user, \
             default_workdir, created_at) VALUES (?, ?, ?, ?, ?, ?, ?, ?)
             ON CONFLICT (name) DO UPDATE SET layers = excluded.layers, \
             cpu_count = excluded.cpu_count, memory_mb = excluded.memory_mb, \
             disk_mb = excluded.disk_mb, default_user = excluded.default_user, \
             default_workdir = excluded.default_workdir",
        )
        .bind(&t.name)
        .bind(layers)
        .bind(i64::from(t.cpu_count))
        .bind(to_i64(t.memory_mb)?)
        .bind(to_i64(t.disk_mb)?)
        .bind(&t.default_user)
        .bind(&t.default_workdir)
        .bind(t.created_at.timestamp_millis())
        .execute(&self.pool)
        .await?;
        Ok(())
    }

    pub async fn get_template(&self, name: &str) -> Result<Option<TemplateRecord>, StoreError> {
        let row: Option<TemplateRow> = sqlx::query_as("SELECT * FROM templates WHERE name = ?")
            .bind(name)
            .fetch_optional(&self.pool)
            .await?;
        row.map(TemplateRecord::try_from).transpose()
    }

    pub async fn insert_sandbox(&self, s: &SandboxRecord) -> Result<(), StoreError> {
        sqlx::query(
            "INSERT INTO sandboxes (id, template_id, alias, metadata, env_vars, access_token, \
             started_at, end_at, cpu_count, memory_mb, disk_mb, handle, state, lifecycle, pause) \
             VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
        )
        .bind(&s.id)
        .bind(&s.template_id)
        .bind(&s.alias)
        .bind(to_json(&s.metadata)?)
        .bind(to_json(&s.env_vars)?)
        .bind(&s.access_token)
        .bind(s.started_at.timestamp_millis())
        .bind(s.end_at.timestamp_millis())
        .bind(i64::from(s.cpu_count))
        .bind(to_i64(s.memory_mb)?)
        .bind(to_i64(s.disk_mb)?)
        .bind(&s.handle)
        .bind(s.state.as_str())
        .bind(&s.lifecycle)
        .bind(&s.pause)
        .execute(&self.pool)
        .await?;
        Ok(())
    }

    pub async fn get_sandbox(&self, id: &str) -> Result<Option<SandboxRecord>, StoreError> {
        let row: Option<SandboxRow> = sqlx::query_as(&format!(
            "SELECT {SANDBOX_COLUMNS} FROM sandboxes WHERE id = ?"
        ))
        .bind(id)
        .fetch_optional(&self.pool)
        .await?;
        row.map(SandboxRecord::try_from).transpose()
    }

    /// Deletes the row and the record of the build it ran on; `false` when there was none.
    pub async fn delete_sandbox(&self, id: &str) -> Result<bool, StoreError> {
        let mut tx = self.pool.begin().await?;
        let done = sqlx::query("DELETE FROM sandboxes WHERE id = ?")
            .bind(id)
            .execute(&mut *tx)
            .await?;
        sqlx::query("DELETE FROM sandbox_builds WHERE sandbox_id = ?")
            .bind(id)
            .execute(&mut *tx)
            .await?;
        tx.commit().await?;
        Ok(done.rows_affected() > 0)
    }

    /// Sets the expiry; `false` when the sandbox does not exist.
    pub async fn set_end_at(&self, id: &str, end_at: DateTime<Utc>) -> Result<bool, StoreError> {
        let done = sqlx::query("UPDATE sandboxes SET end_at = ? WHERE id = ?")
            .bind(end_at.timestamp_millis())
            .bind(id)
            .execute(&self.pool)
            .await?;
        Ok(done.rows_affected() > 0)
    }

    /// Marks a running sandbox paused with what its pause kept; `false` when there is no
    /// running sandbox `id` (unknown, or paused already).
    pub async fn set_paused(&self, id: &str, pause: &str) -> Result<bool, StoreError> {
        let done = sqlx::query(
            "UPDATE sandboxes SET state = 'paused', pause = ? WHERE id = ? AND state = 'running'",
        )
        .bind(pause)
        .bind(id)
        .execute(&self.pool)
        .await?;
        Ok(done.rows_affected() > 0)
    }

    /// Rewrites what a paused sandbox's pause kept (e.g. once its memory is known lost);
    /// `false` when there is no paused sandbox `id`.
    pub async fn update_pause(&self, id: &str, pause: &str) -> Result<bool, StoreError> {
        let done = sqlx::query("UPDATE sandboxes SET pause = ? WHERE id = ? AND state = 'paused'")
            .bind(pause)
            .bind(id)
            .execute(&self.pool)
            .await?;
        Ok(done.rows_affected() > 0)
    }

    /// Marks a paused sandbox running again with its new handle and expiry; `false` when there
    /// is no paused sandbox `id`.
    pub async fn set_resumed(
        &self,
        id: &str,
        handle: &str,
        end_at: DateTime<Utc>,
    ) -> Result<bool, StoreError> {
        let done = sqlx::query(
            "UPDATE sandboxes SET state = 'running', pause = NULL, handle = ?, end_at = ? \
             WHERE id = ? AND state = 'paused'",
        )
        .bind(handle)
        .bind(end_at.timestamp_millis())
        .bind(id)
        .execute(&self.pool)
        .await?;
        Ok(done.rows_affected() > 0)
    }

    /// Every sandbox row, oldest first (used for restart adoption).
    pub async fn all_sandboxes(&self) -> Result<Vec<SandboxRecord>, StoreError> {
        self.list_sandboxes(&SandboxQuery {
            order: Order::Asc,
            ..SandboxQuery::default()
        })
        .await
    }

    /// Sandboxes matching `q`, ordered by (start time, id) in `q.order`, after `q.after`.
    pub async fn list_sandboxes(&self, q: &SandboxQuery) -> Result<Vec<SandboxRecord>, StoreError> {
        let mut b: QueryBuilder<Sqlite> = QueryBuilder::new(format!(
            "SELECT {SANDBOX_COLUMNS} FROM sandboxes s WHERE 1=1"
        ));
        for (k, v) in &q.metadata {
            b.push(" AND EXISTS (SELECT 1 FROM json_each(s.metadata) WHERE key = ")
                .push_bind(k.clone())
                .push(" AND value = ")
                .push_bind(v.clone())
                .push(")");
        }
        if !q.states.is_empty() {
            b.push(" AND state IN (");
            let mut sep = b.separated(", ");
            for s in &q.states {
                sep.push_bind(s.as_str());
            }
            b.push(")");
        }
        if let Some(t) = &q.template {
            b.push(" AND (template_id = ")
                .push_bind(t.clone())
                .push(" OR alias = ")
                .push_bind(t.clone())
                .push(")");
        }
        if let Some(after) = q.started_after {
            b.push(" AND started_at > ")
                .push_bind(after.timestamp_millis());
        }
        let (cmp, dir) = match q.order {
            Order::Asc => (">", "ASC"),
            Order::Desc => ("<", "DESC"),
        };
        if let Some(c) = &q.after {
            b.push(format!(" AND (started_at, id) {cmp} ("))
                .push_bind(c.started_at.timestamp_millis())
                .push(", ")
                .push_bind(c.id.clone())
                .push(")");
        }
        b.push(format!(" ORDER BY started_at {dir}, id {dir}"));
        if let Some(limit) = q.limit {
            b.push(" LIMIT ").push_bind(i64::from(limit));
        }
        let rows: Vec<SandboxRow> = b.build_query_as().fetch_all(&self.pool).await?;
        rows.into_iter().map(SandboxRecord::try_from).collect()
    }

    /// Closes the pool (flushes the WAL); used on shutdown.
    pub async fn close(&self) {
        self.pool.close().await;
    }
}

fn to_json(m: &BTreeMap<String, String>) -> Result<String, StoreError> {
    serde_json::to_string(m).map_err(|e| StoreError::Corrupt(format!("encoding map: {e}")))
}

fn from_json(what: &str, s: &str) -> Result<BTreeMap<String, String>, StoreError> {
    serde_json::from_str(s).map_err(|e| StoreError::Corrupt(format!("{what}: {e}")))
}

fn to_i64(v: u64) -> Result<i64, StoreError> {
    i64::try_from(v).map_err(|_| StoreError::Corrupt(format!("{v} does not fit in i64")))
}

fn from_i64<T: TryFrom<i64>>(what: &str, v: i64) -> Result<T, StoreError> {
    T::try_from(v).map_err(|_| StoreError::Corrupt(format!("{what} = {v} out of range")))
}

fn from_millis(what: &str, ms: i64) -> Result<DateTime<Utc>, StoreError> {
    DateTime::from_timestamp_millis(ms)
        .ok_or_else(|| StoreError::Corrupt(format!("{what} = {ms} is not a valid time")))
}

impl TryFrom<SandboxRow> for SandboxRecord {
    type Error = StoreError;

    fn try_from(r: SandboxRow) -> Result<Self, StoreError> {
        Ok(SandboxRecord {
            metadata: from_json("metadata", &r.metadata)?,
            env_vars: from_json("env_vars", &r.env_vars)?,
            started_at: from_millis("started_at", r.started_at)?,
            end_at: from_millis("end_at", r.end_at)?,
            cpu_count: from_i64("cpu_count", r.cpu_count)?,
            memory_mb: from_i64("memory_mb", r.memory_mb)?,
            disk_mb: from_i64("disk_mb", r.disk_mb)?,
            state: SandboxState::parse(&r.state)
                .ok_or_else(|| StoreError::Corrupt(format!("state = {}", r.state)))?,
            id: r.id,
            template_id: r.template_id,
            alias: r.alias,
            access_token: r.access_token,
            handle: r.handle,
            lifecycle: r.lifecycle,
            pause: r.pause,
        })
    }
}

impl TryFrom<TemplateRow> for TemplateRecord {
    type Error = StoreError;

    fn try_from(r: TemplateRow) -> Result<Self, StoreError> {
        let layers: Vec<String> = serde_json::from_str(&r.layers)
            .map_err(|e| StoreError::Corrupt(format!("template layers: {e}")))?;
        Ok(TemplateRecord {
            layers: layers.into_iter().map(PathBuf::from).collect(),
            cpu_count: from_i64("cpu_count", r.cpu_count)?,
            memory_mb: from_i64("memory_mb", r.memory_mb)?,
            disk_mb: from_i64("disk_mb", r.disk_mb)?,
            created_at: from_millis("created_at", r.created_at)?,
            name: r.name,
            default_user: r.default_user,
            default_workdir: r.default_workdir,
        })
    }
}

impl FromStr for Order {
    type Err = String;

    fn from_str(s: &str) -> Result<Order, String> {
        match s {
            "asc" => Ok(Order::Asc),
            "desc" => Ok(Order::Desc),
            other => Err(format!("invalid order '{other}', expected 'asc' or 'desc'")),
        }
    }
}
