-- The store's identity (see migrations/postgres/0008_epoch.sql).
ALTER TABLE store_revision ADD COLUMN epoch TEXT NOT NULL DEFAULT '';
UPDATE store_revision SET epoch = lower(hex(randomblob(16))) WHERE id = 1;
