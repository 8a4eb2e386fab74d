-- The history keyed by (revision, tenant, user) (see migrations/postgres/0011_import.sql):
-- SQLite cannot change a primary key in place, so the table is rebuilt.
CREATE TABLE changes_new (
    revision     INTEGER NOT NULL,
    kind         TEXT NOT NULL,
    tenant_id    TEXT NOT NULL,
    user_id      TEXT NOT NULL,
    roles        TEXT NOT NULL,
    committed_at INTEGER NOT NULL,
    caller       TEXT NOT NULL DEFAULT '',
    PRIMARY KEY (revision, tenant_id, user_id)
) WITHOUT ROWID;
INSERT INTO changes_new (revision, kind, tenant_id, user_id, roles, committed_at, caller)
    SELECT revision, kind, tenant_id, user_id, roles, committed_at, caller FROM changes;
DROP TABLE changes;
ALTER TABLE changes_new RENAME TO changes;
CREATE INDEX changes_by_time ON changes (committed_at);
CREATE INDEX changes_by_tenant ON changes (tenant_id, revision);
CREATE INDEX changes_by_user ON changes (user_id, revision);
CREATE INDEX changes_by_caller ON changes (caller, revision);
