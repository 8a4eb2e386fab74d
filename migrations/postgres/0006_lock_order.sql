-- One lock order for every write transaction: the revision row first. rolecheck_apply
-- used to lock membership rows before it bumped the revision, while DeleteTenant locked
-- the tenant's rows first and the revision row last; two of them on different replicas
-- could deadlock. Now every write takes the revision row before anything else, so
-- writers queue there and never hold one lock while waiting for another.
--
-- A Revoke in a tenant that no longer exists changes nothing and succeeds, answering the
-- current revision (a retry after DeleteTenant is not an error); any other write there
-- is -1 (NOT_FOUND).
CREATE OR REPLACE FUNCTION rolecheck_apply(writes jsonb, now_s bigint, now_ms bigint)
RETURNS SETOF bigint
LANGUAGE plpgsql AS $$
DECLARE
    w jsonb;
    kind text;
    t text;
    u text;
    rs text[];
    rev bigint;
    after text;
BEGIN
    PERFORM 1 FROM store_revision WHERE id = 1 FOR UPDATE;
    FOR w IN SELECT value FROM jsonb_array_elements(writes) LOOP
        kind := w->>'k';
        t := w->>'t';
        u := w->>'u';
        rs := ARRAY(SELECT jsonb_array_elements_text(w->'r'));
        PERFORM 1 FROM tenants WHERE tenant_id = t;
        IF NOT FOUND THEN
            IF kind = 'revoke' THEN
                RETURN NEXT (SELECT value FROM store_revision WHERE id = 1);
            ELSE
                RETURN NEXT -1;
            END IF;
            CONTINUE;
        END IF;
        IF kind = 'set' OR (kind = 'revoke' AND cardinality(rs) = 0) THEN
            DELETE FROM memberships WHERE tenant_id = t AND user_id = u;
        ELSIF kind = 'revoke' THEN
            DELETE FROM memberships WHERE tenant_id = t AND user_id = u AND role = ANY (rs);
        END IF;
        IF kind <> 'revoke' AND cardinality(rs) > 0 THEN
            INSERT INTO memberships (tenant_id, user_id, role, expires_at)
            SELECT t, u, r, (w->>'e')::bigint FROM unnest(rs) AS r
            ON CONFLICT (tenant_id, user_id, role) DO UPDATE SET expires_at = excluded.expires_at;
        END IF;
        UPDATE store_revision SET value = value + 1 WHERE id = 1 RETURNING value INTO rev;
        SELECT coalesce(string_agg(role, ',' ORDER BY role), '') INTO after
        FROM memberships
        WHERE tenant_id = t AND user_id = u AND (expires_at IS NULL OR expires_at > now_s);
        INSERT INTO changes (revision, kind, tenant_id, user_id, roles, committed_at, caller)
        VALUES (rev, 'm', t, u, after, now_ms, w->>'c');
        PERFORM pg_notify('rolecheck', rev || ':m:' || u);
        RETURN NEXT rev;
    END LOOP;
END
$$;
