-- Tenants marked deleted, purged in chunks (see migrations/postgres/0009_tenant_purge.sql).
ALTER TABLE tenants ADD COLUMN deleted_at INTEGER;
CREATE INDEX tenants_deleted ON tenants (tenant_id) WHERE deleted_at IS NOT NULL;
