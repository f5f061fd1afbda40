"""PostgreSQL: `spendgate_write_batch` (0007) with fewer statements per call; same argument, same answer.

Sampled in the server at c=1, the function was ~55 % of the backend's time per batch and three
quarters of that went to its SQL statements, a quarter of those to starting each one's executor.
Loops over the argument's arrays were each a statement (`FOR .. IN SELECT jsonb_array_elements`),
and so were the empty `rates` loop and three sub-selects (the cap, read three times per hold, and
the settled amounts summed per budget row). Now the loops index the arrays (plain expressions, no
executor), the hold joins `budgets` once, and the settlement's DELETE sums what it released per
(budget, period) row as it goes. The statements, their order (rows locked in (budget, period)
order) and what each writes are otherwise those of 0007.

Revision ID: 0009
"""

from __future__ import annotations

import importlib

from alembic import op

revision = "0009"
down_revision = "0008"
branch_labels = None
depends_on = None

_0007 = importlib.import_module("spendgate.store.migrations.versions.0007_batch_function")

FUNCTION = """
CREATE OR REPLACE FUNCTION spendgate_write_batch(batch jsonb) RETURNS jsonb
LANGUAGE plpgsql AS $fn$
DECLARE
    ops jsonb := coalesce(batch->'ops', '[]');
    reserves jsonb := coalesce(batch->'reserves', '[]');
    comps jsonb := batch->'completions';
    rates jsonb := batch->'rates';
    n_res int := jsonb_array_length(coalesce(batch->'reserves', '[]'));
    gated boolean[] := array_fill(true, ARRAY[n_res]);
    blocked jsonb[] := array_fill(NULL::jsonb, ARRAY[n_res]);
    remaining bigint[] := array_fill(NULL::bigint, ARRAY[n_res]);
    held_ops jsonb[] := array_fill('[]'::jsonb, ARRAY[n_res]);
    rate_ok boolean[] := '{}';
    rates_out jsonb := '[]';
    res_out jsonb := '[]';
    held jsonb := '{}';  -- "budget period" -> the amount the settled requests' reservations held there
    r jsonb; o jsonb; w jsonb; wants jsonb; e jsonb; c audit_log;
    i int; j int; k int;
    b int; ps timestamp; amt bigint; win bigint;
    ensured boolean; ok boolean;
    s_spent bigint; s_reserved bigint; s_cap bigint;
    rn int; rprev int;
BEGIN
    IF batch ? 'inserts' THEN
        INSERT INTO audit_log SELECT * FROM jsonb_populate_recordset(NULL::audit_log, batch->'inserts');
    END IF;
    -- One UPDATE by primary key per row: joined to the JSON instead, the planner may scan the table.
    FOR j IN 0..coalesce(jsonb_array_length(comps), 0) - 1 LOOP
        c := jsonb_populate_record(NULL::audit_log, comps->j);
        UPDATE audit_log SET %(completion)s WHERE id = c.id;
    END LOOP;
    IF batch ? 'contents' THEN
        INSERT INTO audit_content SELECT * FROM jsonb_populate_recordset(NULL::audit_content, batch->'contents');
    END IF;

    -- `--rpm` counts, in key order (store.ratelimits.take, statement for statement).
    FOR j IN 0..coalesce(jsonb_array_length(rates), 0) - 1 LOOP
        r := rates->j;
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
            RETURNING budget_id, period_start, amount_nusd),
        g AS (SELECT d.budget_id || ' ' || d.period_start AS row_key, sum(d.amount_nusd) AS amount FROM d GROUP BY 1)
        SELECT coalesce(jsonb_object_agg(g.row_key, g.amount), '{}') INTO held FROM g;
    END IF;

    -- The budget rows in (budget, period) order: settle, then hold (store.budgets.apply).
    FOR k IN 0..jsonb_array_length(ops) - 1 LOOP
        o := ops->k;
        b := (o->>'b')::int;
        ps := (o->>'ps')::timestamp;
        IF o ? 'rids' THEN
            UPDATE budget_spend SET
                reserved_nusd = reserved_nusd - coalesce((held->>(b || ' ' || ps))::bigint, 0),
                spent_nusd = spent_nusd + (o->>'actual')::bigint
            WHERE budget_id = b AND period_start = ps;
        END IF;
        ensured := false;
        wants := o->'wants';
        FOR j IN 0..coalesce(jsonb_array_length(wants), 0) - 1 LOOP
            w := wants->j;
            i := (w->>'i')::int + 1;
            CONTINUE WHEN NOT gated[i] OR blocked[i] IS NOT NULL;
            amt := (w->>'amt')::bigint;
            LOOP  -- the hold; at most once more after creating the period's row on its first hold
                UPDATE budget_spend s SET reserved_nusd = s.reserved_nusd + amt
                    FROM budgets bb
                    WHERE bb.id = b AND s.budget_id = b AND s.period_start = ps
                    AND s.spent_nusd + s.reserved_nusd + amt <= bb.cap_nusd
                    AND s.spent_nusd + s.reserved_nusd < bb.cap_nusd
                    RETURNING s.spent_nusd, s.reserved_nusd, bb.cap_nusd
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
""" % {"completion": ", ".join(f'"{c}" = c."{c}"' for c in _0007._COMPLETION)}


def upgrade() -> None:
    if op.get_bind().dialect.name == "postgresql":
        op.execute(FUNCTION)


def downgrade() -> None:
    if op.get_bind().dialect.name == "postgresql":
        op.execute(_0007.FUNCTION)
