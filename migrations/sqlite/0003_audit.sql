-- The audit trail (see migrations/postgres for the notes).
ALTER TABLE changes ADD COLUMN caller TEXT NOT NULL DEFAULT '';
CREATE INDEX changes_by_tenant ON changes (tenant_id, revision);
CREATE INDEX changes_by_user ON changes (user_id, revision);
