-- Pause and resume (issue 14). Both columns are JSON owned by soulbox-core, opaque here:
-- `lifecycle` is what the create asked for on timeout and traffic (auto-pause, auto-resume);
-- `pause` is what the latest pause kept (its mode, the egress configuration of a sandbox
-- whose network slot was released, whether its agent answered), NULL while running.
ALTER TABLE sandboxes ADD COLUMN lifecycle TEXT NOT NULL DEFAULT '{}';
ALTER TABLE sandboxes ADD COLUMN pause TEXT;
