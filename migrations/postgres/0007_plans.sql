-- The meaning of a membership write (Grant, Revoke, SetRoles) lives in Rust alone
-- (`MembershipWrite::plan` in src/store/mod.rs); this function carries plans out as they
-- are: remove (nothing, "all", or the listed roles), then add, in a tenant that must
-- exist unless the plan says a missing tenant is fine (a Revoke after DeleteTenant).
--
-- "Bump the revision, record the history row, notify" is written once, in
-- rolecheck_record, which every write calls (the tenant writes from Rust).
--
-- rolecheck_apply (0004, 0006) stays for one release, so replicas of the previous release
-- keep writing during a rolling upgrade; this release never calls it.

-- Takes the next revision (the row lock it holds until COMMIT orders revisions as
-- commits), inserts the history row and queues the '<revision>:<kind>:<subject>'
-- notification (the user of a membership change, the tenant of a tenant change), which
-- Postgres delivers at COMMIT. Returns the revision.
CREATE OR REPLACE FUNCTION rolecheck_record(
    kind text, t text, u text, roles text, now_ms bigint, caller text)
RETURNS bigint
LANGUAGE plpgsql AS $$
DECLARE
    rev bigint;
BEGIN
    UPDATE store_revision SET value = value + 1 WHERE id = 1 RETURNING value INTO rev;
    INSERT INTO changes (revision, kind, tenant_id, user_id, roles, committed_at, caller)
    VALUES (rev, kind, t, u, roles, now_ms, caller);
    PERFORM pg_notify('rolecheck',
        rev || ':' || kind || ':' || CASE WHEN kind = 'm' THEN u ELSE t END);
    RETURN rev;
END
$$;

-- Carries out a batch of plans, in order, each at a revision of its own; one result per
-- plan: its revision, the current revision for a missing tenant that is fine, or -1 for
-- a missing tenant that is not (NOT_FOUND). The revision row is locked first, as in every
-- write transaction, so writers never deadlock.
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
        PERFORM 1 FROM tenants WHERE tenant_id = t;
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
