-- Tenants, memberships and the store revision.
-- Text columns use the "C" collation so ordering (and so pagination) is bytewise,
-- the same as the embedded SQLite store and Rust's string ordering.
-- Times are integers: created_at in unix milliseconds, expires_at in unix seconds.

CREATE TABLE tenants (
    tenant_id  TEXT COLLATE "C" PRIMARY KEY,
    name       TEXT NOT NULL,
    created_at BIGINT NOT NULL
);

CREATE TABLE memberships (
    tenant_id  TEXT COLLATE "C" NOT NULL REFERENCES tenants (tenant_id) ON DELETE CASCADE,
    user_id    TEXT COLLATE "C" NOT NULL,
    role       TEXT COLLATE "C" NOT NULL,
    expires_at BIGINT,
    PRIMARY KEY (tenant_id, user_id, role)
);

CREATE INDEX memberships_by_user ON memberships (user_id, tenant_id, role) INCLUDE (expires_at);

-- One row; every write transaction increments it as its last statement, so the row lock
-- orders revisions exactly as the transactions commit.
CREATE TABLE store_revision (
    id    INTEGER PRIMARY KEY CHECK (id = 1),
    value BIGINT NOT NULL
);
INSERT INTO store_revision (id, value) VALUES (1, 0);
