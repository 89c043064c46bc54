-- Volumes (issue 14): persistent directories mounted into sandboxes by name. The files live in
-- the data dir (`sandboxes/volumes/<id>`); these rows say which exist and hold their tokens.

CREATE TABLE volumes (
    -- 20 characters [a-z0-9], what the E2B API calls volumeID.
    id         TEXT PRIMARY KEY NOT NULL,
    -- Unique; what `volumeMounts` name.
    name       TEXT NOT NULL UNIQUE,
    -- Bearer token of the volume content API, in clear (GET /volumes/{id} returns it).
    token      TEXT NOT NULL,
    -- Size limit in MiB.
    size_mb    INTEGER NOT NULL,
    created_at INTEGER NOT NULL
) STRICT;

-- Which sandbox mounts which volume where; a volume with rows here cannot be deleted.
CREATE TABLE sandbox_volumes (
    sandbox_id TEXT NOT NULL,
    volume_id  TEXT NOT NULL REFERENCES volumes (id),
    path       TEXT NOT NULL,
    PRIMARY KEY (sandbox_id, path)
) STRICT;

CREATE INDEX sandbox_volumes_volume ON sandbox_volumes (volume_id);
