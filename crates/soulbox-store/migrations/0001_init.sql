-- Initial schema. Times are unix milliseconds (exact ordering for pagination cursors).

CREATE TABLE templates (
    name            TEXT PRIMARY KEY NOT NULL,
    -- JSON array of host paths of read-only rootfs layers, lowest first.
    layers          TEXT NOT NULL,
    cpu_count       INTEGER NOT NULL,
    memory_mb       INTEGER NOT NULL,
    disk_mb         INTEGER NOT NULL,
    default_user    TEXT NOT NULL,
    default_workdir TEXT NOT NULL,
    created_at      INTEGER NOT NULL
) STRICT;

CREATE TABLE sandboxes (
    id           TEXT PRIMARY KEY NOT NULL,
    template_id  TEXT NOT NULL,
    alias        TEXT,
    -- JSON objects string -> string.
    metadata     TEXT NOT NULL,
    env_vars     TEXT NOT NULL,
    -- envd access token in clear: the gateway needs it to verify signed file URLs.
    access_token TEXT,
    started_at   INTEGER NOT NULL,
    end_at       INTEGER NOT NULL,
    cpu_count    INTEGER NOT NULL,
    memory_mb    INTEGER NOT NULL,
    disk_mb      INTEGER NOT NULL,
    -- The runtime's SandboxHandle as JSON, so a restarted server can re-adopt the sandbox.
    handle       TEXT NOT NULL,
    state        TEXT NOT NULL CHECK (state IN ('running', 'paused'))
) STRICT;

CREATE INDEX sandboxes_started ON sandboxes (started_at, id);

CREATE TABLE api_keys (
    -- sha256 of the key, lowercase hex; the key itself is never stored.
    key_hash   TEXT PRIMARY KEY NOT NULL,
    name       TEXT NOT NULL,
    created_at INTEGER NOT NULL
) STRICT;
