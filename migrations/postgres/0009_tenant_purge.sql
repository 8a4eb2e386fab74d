-- Deleting a tenant with more memberships than one purge chunk (see src/store/shared.rs)
-- marks it deleted in one short write, at one revision, and its memberships go afterwards
-- in bounded chunks: no statement as long as the tenant, and no write held behind it.
-- A tenant with deleted_at set is gone for every reader and writer; its row stays until
-- its last membership is purged (so the foreign key holds), and its id cannot be taken
-- again until then.
ALTER TABLE tenants ADD COLUMN deleted_at BIGINT;
CREATE INDEX tenants_deleted ON tenants (tenant_id) WHERE deleted_at IS NOT NULL;

-- rolecheck_apply_plans of 0007, with a tenant marked deleted counted as missing.
CREATE OR REPLACE FUNCTION rolecheck_apply_plans(plans jsonb, now_s bigint, now_ms bigint)
RETURNS SETOF bigint
LANGUAGE plpgsql AS $$
DECLARE
    p jsonb;
    t text;
    u text;
    after text;
BEGIN
    PERFORM 1 FROM store_revision WHERE id = 1 FOR UPDATE;
    FOR p IN SELECT value FROM jsonb_array_elements(plans) LOOP
        t := p->>'t';
        u := p->>'u';
        PERFORM 1 FROM tenants WHERE tenant_id = t AND deleted_at IS NULL;
        IF NOT FOUND THEN
            IF (p->>'missing_ok')::boolean THEN
                RETURN NEXT (SELECT value FROM store_revision WHERE id = 1);
            ELSE
                RETURN NEXT -1;
            END IF;
            CONTINUE;
        END IF;
        IF p->>'remove' = 'all' THEN
            DELETE FROM memberships WHERE tenant_id = t AND user_id = u;
        ELSIF jsonb_typeof(p->'remove') = 'array' THEN
            DELETE FROM memberships WHERE tenant_id = t AND user_id = u
                AND role IN (SELECT jsonb_array_elements_text(p->'remove'));
        END IF;
        INSERT INTO memberships (tenant_id, user_id, role, expires_at)
        SELECT t, u, r, (p->>'e')::bigint FROM jsonb_array_elements_text(p->'add') AS r
        ON CONFLICT (tenant_id, user_id, role) DO UPDATE SET expires_at = excluded.expires_at;
        SELECT coalesce(string_agg(role, ',' ORDER BY role), '') INTO after
        FROM memberships
        WHERE tenant_id = t AND user_id = u AND (expires_at IS NULL OR expires_at > now_s);
        RETURN NEXT rolecheck_record('m', t, u, after, now_ms, p->>'c');
    END LOOP;
END
$$;
