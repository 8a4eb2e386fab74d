-- The model (see migrations/postgres/0010_model.sql).
CREATE TABLE model (
    id   INTEGER PRIMARY KEY CHECK (id = 1),
    spec TEXT NOT NULL
);
ALTER TABLE store_revision ADD COLUMN model_revision INTEGER NOT NULL DEFAULT 0;
