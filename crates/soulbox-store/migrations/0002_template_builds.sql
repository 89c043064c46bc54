-- Templates built into the layer store (issue 5). A template is a name with an id; each build
-- is a new row with its layers and config; tags point at builds. The older `templates` table
-- stays for templates registered directly by rootfs path.

CREATE TABLE template_defs (
    -- 20 characters [a-z0-9], what the E2B API calls templateID.
    id         TEXT PRIMARY KEY NOT NULL,
    -- Alias (E2B "name"), unique; may contain a namespace (`team/name`).
    name       TEXT NOT NULL UNIQUE,
    -- Requested at POST /v3/templates; NULL = the build's (or the parent's) default.
    cpu_count  INTEGER,
    memory_mb  INTEGER,
    created_at INTEGER NOT NULL
) STRICT;

CREATE TABLE template_builds (
    id          TEXT PRIMARY KEY NOT NULL,
    -- No foreign key: a build outlives its deleted template while sandboxes still use it.
    template_id TEXT NOT NULL,
    status      TEXT NOT NULL CHECK (status IN ('waiting', 'building', 'ready', 'error')),
    -- JSON (core's BuildConfig): layers, env, user, workdir, start/ready commands, limits.
    config      TEXT,
    reason      TEXT,
    reason_step TEXT,
    created_at  INTEGER NOT NULL,
    finished_at INTEGER
) STRICT;

CREATE INDEX template_builds_template ON template_builds (template_id, created_at);

CREATE TABLE template_tags (
    template_id TEXT NOT NULL,
    tag         TEXT NOT NULL,
    build_id    TEXT NOT NULL,
    created_at  INTEGER NOT NULL,
    PRIMARY KEY (template_id, tag)
) STRICT;

-- Build step cache: hash(parent + instruction + inputs) -> layer digest (NULL: the step
-- changed nothing).
CREATE TABLE layer_cache (
    key        TEXT PRIMARY KEY NOT NULL,
    layer      TEXT,
    created_at INTEGER NOT NULL
) STRICT;

-- Which build a sandbox runs on, so the layers of a deleted template stay until its last
-- sandbox is gone. Rows of sandboxes that no longer exist are ignored and pruned.
CREATE TABLE sandbox_builds (
    sandbox_id TEXT PRIMARY KEY NOT NULL,
    build_id   TEXT NOT NULL
) STRICT;
