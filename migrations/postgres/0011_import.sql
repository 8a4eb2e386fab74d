-- An import batch commits many memberships at one revision (src/store/bulk.rs), each with
-- its own history row, so the history is keyed by (revision, tenant, user): one row per
-- user and tenant a revision changed (a tenant change has an empty user, the model an
-- empty tenant too). Readers of the history page by whole revisions (src/store/sql.rs).
--
-- A replica of an older release pages the history by rows: during a rolling upgrade,
-- finish the rollout before importing (docs/cli.md).
ALTER TABLE changes DROP CONSTRAINT changes_pkey;
ALTER TABLE changes ADD CONSTRAINT changes_pkey PRIMARY KEY (revision, tenant_id, user_id);
