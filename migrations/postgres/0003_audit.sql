-- The audit trail: who made each change (the caller's key name or certificate subject;
-- never a secret).
ALTER TABLE changes ADD COLUMN caller TEXT NOT NULL DEFAULT '';
CREATE INDEX changes_by_tenant ON changes (tenant_id, revision);
CREATE INDEX changes_by_user ON changes (user_id, revision);
