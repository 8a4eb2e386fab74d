-- Membership writes, applied server-side in batches: one call (and one COMMIT, so one
-- WAL flush) for every write queued while the previous batch ran. Each element of
-- `writes` is {"k": "grant"|"revoke"|"set", "t": tenant, "u": user, "r": [roles],
-- "e": expires_at or null, "c": caller}. Returns one revision per write, in order, or -1
-- where the tenant does not exist (that write changes nothing).
--
-- Each statement in this (volatile) function takes a fresh snapshot, so the roles read
-- for the history row after the revision row is locked include every write committed
-- before this one's revision: the same order as the stepwise writes of the embedded
-- store.
CREATE FUNCTION rolecheck_apply(writes jsonb, now_s bigint, now_ms bigint)
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
    FOR w IN SELECT value FROM jsonb_array_elements(writes) LOOP
        kind := w->>'k';
        t := w->>'t';
        u := w->>'u';
        rs := ARRAY(SELECT jsonb_array_elements_text(w->'r'));
        PERFORM 1 FROM tenants WHERE tenant_id = t;
        IF NOT FOUND THEN
            RETURN NEXT -1;
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
