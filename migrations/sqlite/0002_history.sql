-- The change history that Watch streams (see migrations/postgres for the notes).
CREATE TABLE changes (
    revision     INTEGER PRIMARY KEY,
    kind         TEXT NOT NULL,
    tenant_id    TEXT NOT NULL,
    user_id      TEXT NOT NULL,
    roles        TEXT NOT NULL,
    committed_at INTEGER NOT NULL
);
CREATE INDEX changes_by_time ON changes (committed_at);

ALTER TABLE store_revision ADD COLUMN pruned_through INTEGER NOT NULL DEFAULT 0;
