-- Tenants, memberships and the store revision (see migrations/postgres for the notes).

CREATE TABLE tenants (
    tenant_id  TEXT PRIMARY KEY,
    name       TEXT NOT NULL,
    created_at INTEGER NOT NULL
) WITHOUT ROWID;

CREATE TABLE memberships (
    tenant_id  TEXT NOT NULL REFERENCES tenants (tenant_id) ON DELETE CASCADE,
    user_id    TEXT NOT NULL,
    role       TEXT NOT NULL,
    expires_at INTEGER,
    PRIMARY KEY (tenant_id, user_id, role)
) WITHOUT ROWID;

CREATE INDEX memberships_by_user ON memberships (user_id, tenant_id, role, expires_at);

CREATE TABLE store_revision (
    id    INTEGER PRIMARY KEY CHECK (id = 1),
    value INTEGER NOT NULL
);
INSERT INTO store_revision (id, value) VALUES (1, 0);
