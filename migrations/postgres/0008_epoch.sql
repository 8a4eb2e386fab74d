-- The store's identity: an epoch chosen once, when the store is created (or first migrated
-- to this version). A restored dump keeps it with its older revision; a new store has
-- another. Watch carries it, and a follower or replica that sees its store's epoch change,
-- or its revision go back, drops its cache and starts over (see src/coherence.rs).
ALTER TABLE store_revision ADD COLUMN epoch TEXT NOT NULL DEFAULT '';
UPDATE store_revision SET epoch = gen_random_uuid()::text WHERE id = 1;
