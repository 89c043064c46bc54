-- Snapshots (issue 14): a snapshot is a template (def, build, tag `default`) made from a
-- sandbox's files; this table says which templates are snapshots and of which sandbox.
CREATE TABLE snapshots (
    template_id TEXT PRIMARY KEY NOT NULL,
    sandbox_id  TEXT NOT NULL,
    created_at  INTEGER NOT NULL
) STRICT;

CREATE INDEX snapshots_sandbox ON snapshots (sandbox_id, created_at);
