"""PostgreSQL: one audit-writer batch in one round trip (`spendgate_write_batch`, see `store.pgbatch`).

Statement by statement a capped request's batch cost seven round trips, ~50 µs of the gateway's CPU
and ~150 µs of wall time each; as one function call in autocommit it costs one. The function runs
what `store.batches.write_batch` plans, in the order it plans it (rows locked in (budget, period)
order); SQLite keeps running the same statements one by one in the gateway, where they cost no
round trip. A migration that adds a completion column must recreate this function with it (the
current text is 0009's, built from this `_COMPLETION`).

Revision ID: 0007
"""

from __future__ import annotations

from alembic import op

revision = "0007"
down_revision = "0006"
branch_labels = None
depends_on = None

# Every column `store.audit.COMPLETION` names (a test holds the two together).
_COMPLETION = (
    "ended_at", "status_code", "outcome", "input_tokens", "output_tokens", "cache_read_tokens", "cache_write_tokens",
    "reasoning_tokens", "usage_source", "cost_nusd", "cost_source", "latency_ms", "ttft_ms", "response_bytes",
    "model_reported", "upstream_request_id", "error", "cut_fields",
)

FUNCTION = """
CREATE OR REPLACE FUNCTION spendgate_write_batch(batch jsonb) RETURNS jsonb
LANGUAGE plpgsql AS $fn$
DECLARE
    ops jsonb := coalesce(batch->'ops', '[]');
    reserves jsonb := coalesce(batch->'reserves', '[]');
    n_res int := jsonb_array_length(coalesce(batch->'reserves', '[]'));
    gated boolean[] := array_fill(true, ARRAY[n_res]);
    blocked jsonb[] := array_fill(NULL::jsonb, ARRAY[n_res]);
    remaining bigint[] := array_fill(NULL::bigint, ARRAY[n_res]);
    held_ops jsonb[] := array_fill('[]'::jsonb, ARRAY[n_res]);
    rate_ok boolean[] := '{}';
    rates_out jsonb := '[]';
    res_out jsonb := '[]';
    held jsonb := '{}';
    r jsonb; o jsonb; w jsonb; e jsonb; c audit_log;
    i int; k int;
    b int; ps timestamp; amt bigint; win bigint;
    ensured boolean; ok boolean;
    s_spent bigint; s_reserved bigint; s_cap bigint;
    rn int; rprev int;
BEGIN
    IF batch ? 'inserts' THEN
        INSERT INTO audit_log SELECT * FROM jsonb_populate_recordset(NULL::audit_log, batch->'inserts');
    END IF;
    -- One UPDATE by primary key per row: joined to the JSON instead, the planner may scan the table.
    FOR c IN SELECT * FROM jsonb_populate_recordset(NULL::audit_log, batch->'completions') LOOP
        UPDATE audit_log SET %(completion)s WHERE id = c.id;
    END LOOP;
    IF batch ? 'contents' THEN
        INSERT INTO audit_content SELECT * FROM jsonb_populate_recordset(NULL::audit_content, batch->'contents');
    END IF;

    -- `--rpm` counts, in key order (store.ratelimits.take, statement for statement).
    FOR r IN SELECT * FROM jsonb_array_elements(coalesce(batch->'rates', '[]')) LOOP
        win := (r->>'w')::bigint;
        INSERT INTO rate_windows (key_id, minute, n, prev_n) VALUES (r->>'k', win, 0, 0)
            ON CONFLICT (key_id) DO NOTHING;
        UPDATE rate_windows SET prev_n = CASE WHEN minute = win - 1 THEN n ELSE 0 END, n = 0, minute = win
            WHERE key_id = r->>'k' AND minute <> win;
        UPDATE rate_windows SET n = n + 1
            WHERE key_id = r->>'k' AND minute = win AND prev_n * (r->>'weight')::float8 + n + 1 <= (r->>'rpm')::int;
        ok := FOUND;
        rate_ok := rate_ok || ok;
        IF ok THEN
            rates_out := rates_out || jsonb_build_array(jsonb_build_array(true));
        ELSE
            SELECT rw.n, rw.prev_n INTO rn, rprev FROM rate_windows rw WHERE rw.key_id = r->>'k';
            rates_out := rates_out || jsonb_build_array(jsonb_build_array(false, rn, rprev));
        END IF;
    END LOOP;
    -- A reservation goes ahead only if its request's rate count did.
    FOR i IN 1..n_res LOOP
        IF reserves->(i - 1)->>'rate' IS NOT NULL THEN
            gated[i] := rate_ok[(reserves->(i - 1)->>'rate')::int + 1];
        END IF;
    END LOOP;

    -- Settled requests' reservations: whoever deletes one releases it, exactly once.
    IF batch ? 'settle_rids' THEN
        WITH d AS (
            DELETE FROM reservations
            WHERE request_id = ANY (ARRAY(SELECT jsonb_array_elements_text(batch->'settle_rids')))
            RETURNING request_id, budget_id, amount_nusd)
        SELECT coalesce(jsonb_object_agg(d.request_id || ' ' || d.budget_id, d.amount_nusd), '{}') INTO held FROM d;
    END IF;

    -- The budget rows in (budget, period) order: settle, then hold (store.budgets.apply).
    FOR k IN 0..jsonb_array_length(ops) - 1 LOOP
        o := ops->k;
        b := (o->>'b')::int;
        ps := (o->>'ps')::timestamp;
        IF o ? 'rids' THEN
            UPDATE budget_spend SET
                reserved_nusd = reserved_nusd - (
                    SELECT coalesce(sum((held->>(x || ' ' || b))::bigint), 0)
                    FROM jsonb_array_elements_text(o->'rids') x),
                spent_nusd = spent_nusd + (o->>'actual')::bigint
            WHERE budget_id = b AND period_start = ps;
        END IF;
        ensured := false;
        FOR w IN SELECT * FROM jsonb_array_elements(coalesce(o->'wants', '[]')) LOOP
            i := (w->>'i')::int + 1;
            CONTINUE WHEN NOT gated[i] OR blocked[i] IS NOT NULL;
            amt := (w->>'amt')::bigint;
            LOOP  -- the hold; at most once more after creating the period's row on its first hold
                UPDATE budget_spend SET reserved_nusd = reserved_nusd + amt
                    WHERE budget_id = b AND period_start = ps
                    AND spent_nusd + reserved_nusd + amt <= (SELECT cap_nusd FROM budgets WHERE id = b)
                    AND spent_nusd + reserved_nusd < (SELECT cap_nusd FROM budgets WHERE id = b)
                    RETURNING spent_nusd, reserved_nusd, (SELECT cap_nusd FROM budgets WHERE id = b)
                    INTO s_spent, s_reserved, s_cap;
                ok := FOUND;
                EXIT WHEN ok OR ensured;
                INSERT INTO budget_spend (budget_id, period_start, spent_nusd, reserved_nusd) VALUES (b, ps, 0, 0)
                    ON CONFLICT DO NOTHING;
                ensured := true;
            END LOOP;
            IF NOT ok THEN  -- the cap would be passed: say why, and give back the earlier holds (all or none)
                SELECT s.spent_nusd, s.reserved_nusd, bb.cap_nusd INTO s_spent, s_reserved, s_cap
                    FROM budget_spend s JOIN budgets bb ON bb.id = s.budget_id
                    WHERE s.budget_id = b AND s.period_start = ps;
                blocked[i] := jsonb_build_array(k, s_spent, s_reserved, s_cap);
                FOR e IN SELECT * FROM jsonb_array_elements(held_ops[i]) LOOP
                    UPDATE budget_spend SET reserved_nusd = reserved_nusd - amt
                        WHERE budget_id = (ops->(e::int)->>'b')::int
                        AND period_start = (ops->(e::int)->>'ps')::timestamp;
                END LOOP;
                held_ops[i] := '[]';
                CONTINUE;
            END IF;
            remaining[i] := least(remaining[i], s_cap - s_spent - s_reserved);
            held_ops[i] := held_ops[i] || to_jsonb(k);
        END LOOP;
    END LOOP;

    FOR i IN 1..n_res LOOP
        r := reserves->(i - 1);
        IF gated[i] AND blocked[i] IS NULL AND (r->>'amt')::bigint > 0 THEN
            INSERT INTO reservations (request_id, budget_id, period_start, amount_nusd, expires_at)
                SELECT r->>'rid', (ops->(e2::int)->>'b')::int, (ops->(e2::int)->>'ps')::timestamp,
                       (r->>'amt')::bigint, (r->>'exp')::timestamp
                FROM jsonb_array_elements(held_ops[i]) e2;
        END IF;
        res_out := res_out || jsonb_build_array(jsonb_build_array(gated[i], blocked[i], held_ops[i], remaining[i]));
    END LOOP;
    RETURN jsonb_build_object('rates', rates_out, 'reserves', res_out);
END
$fn$
""" % {"completion": ", ".join(f'"{c}" = c."{c}"' for c in _COMPLETION)}


def upgrade() -> None:
    if op.get_bind().dialect.name == "postgresql":
        op.execute(FUNCTION)


def downgrade() -> None:
    if op.get_bind().dialect.name == "postgresql":
        op.execute("DROP FUNCTION IF EXISTS spendgate_write_batch(jsonb)")
