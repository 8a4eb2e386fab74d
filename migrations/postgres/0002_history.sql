-- The change history that Watch streams: one row per committed write, keyed by its
-- revision. kind: 'm' membership changed, 'c' tenant created, 'd' tenant deleted.
-- roles: the user's live roles in the tenant after the change, comma-separated.
-- committed_at: unix milliseconds, for the retention window.
CREATE TABLE changes (
    revision     BIGINT PRIMARY KEY,
    kind         CHAR(1) NOT NULL,
    tenant_id    TEXT COLLATE "C" NOT NULL,
    user_id      TEXT COLLATE "C" NOT NULL,
    roles        TEXT NOT NULL,
    committed_at BIGINT NOT NULL
);
CREATE INDEX changes_by_time ON changes (committed_at);

-- History at or below this revision has been pruned; Watch cannot resume before it.
ALTER TABLE store_revision ADD COLUMN pruned_through BIGINT NOT NULL DEFAULT 0;
