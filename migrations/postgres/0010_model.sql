-- The model (role hierarchy and permissions, src/model): one row, the file as it was set.
-- model_revision is the revision that set it (0: never set). It lives in the revision
-- row, so every read of a user's roles returns it from the same snapshot, and a replica
-- can tell whether the model it holds is the one those roles were read under.
CREATE TABLE model (
    id   INTEGER PRIMARY KEY CHECK (id = 1),
    spec TEXT NOT NULL
);
ALTER TABLE store_revision ADD COLUMN model_revision BIGINT NOT NULL DEFAULT 0;
