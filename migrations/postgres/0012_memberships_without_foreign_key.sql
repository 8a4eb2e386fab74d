-- A membership's tenant is no longer checked by a foreign key. A foreign key checks each
-- row on its own (a trigger and a query per row), and that check was a third of an
-- import's time (src/store/postgres/bulk.rs). What it guaranteed holds by the lock order
-- (0006): every write that adds memberships takes the revision row first and then finds
-- its tenant live (rolecheck_apply_plans, an import batch), and every write that removes
-- a tenant takes the revision row first too (DeleteTenant, which removes or marks the
-- tenant's memberships before its row goes; see 0009). So no membership is added to a
-- tenant that is going, and none outlives its tenant.
ALTER TABLE memberships DROP CONSTRAINT IF EXISTS memberships_tenant_id_fkey;
