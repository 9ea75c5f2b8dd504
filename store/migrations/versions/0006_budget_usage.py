"""Budget counters in the store, so replicas on one PostgreSQL share budgets without Redis:
the `budget_usage` table, and on PostgreSQL the two functions that reserve and settle."""

from __future__ import annotations

from alembic import op

from store.tables import build_metadata

revision = "0006_budget_usage"
down_revision = "0005_upstream_status"
branch_labels = None
depends_on = None

# One call of this function is one round trip and one transaction. It locks the rollout's
# row first, so reserves and settles of one rollout run one at a time on every replica, and
# reads the attempt's row after the lock is held (each statement of a PL/pgSQL function
# sees what committed before it), the way the Redis state's Lua script runs whole.
# `p_limits` is the rollout's max_calls, max_tokens, max_cost_usd, max_seconds, then the
# attempt's; a null limit does not apply. `usage` is both scopes' calls, tokens, cost and
# started before this call. Outcomes: missing (not seeded), stale (the budget text is no
# longer `p_expect`; `budget` is the current one), refused (`scope` 0 or 1, `limit_name`),
# reserved.
RESERVE_FUNCTION = """
CREATE OR REPLACE FUNCTION spangate_budget_reserve(
    p_rollout text, p_attempt text, p_expect text, p_now float8,
    p_tokens float8, p_cost float8, p_need_tokens float8, p_need_cost float8,
    p_limits float8[]
) RETURNS TABLE (outcome text, budget text, scope int, limit_name text, usage float8[])
LANGUAGE plpgsql AS $$
DECLARE
    r budget_usage%ROWTYPE;
    a budget_usage%ROWTYPE;
    u float8[];
    base int;
    refused text;
BEGIN
    SELECT * INTO r FROM budget_usage
    WHERE budget_usage.rollout_id = p_rollout AND budget_usage.attempt_id = ''
    FOR UPDATE;
    IF NOT FOUND THEN
        RETURN QUERY SELECT 'missing'::text, NULL::text, NULL::int, NULL::text, NULL::float8[];
        RETURN;
    END IF;
    IF r.budget IS DISTINCT FROM p_expect THEN
        RETURN QUERY SELECT 'stale'::text, coalesce(r.budget, '{}'), NULL::int, NULL::text,
            NULL::float8[];
        RETURN;
    END IF;
    SELECT * INTO a FROM budget_usage
    WHERE budget_usage.rollout_id = p_rollout AND budget_usage.attempt_id = p_attempt;
    u := ARRAY[r.calls, r.tokens, r.cost, r.started,
               coalesce(a.calls, 0), coalesce(a.tokens, 0), coalesce(a.cost, 0),
               coalesce(a.started, 0)]::float8[];
    FOR i IN 0..1 LOOP
        base := i * 4;
        refused := CASE
            WHEN u[base + 1] + 1 > p_limits[base + 1] THEN 'max_calls'
            WHEN u[base + 2] + p_need_tokens > p_limits[base + 2] THEN 'max_tokens'
            WHEN u[base + 3] + p_need_cost > p_limits[base + 3] THEN 'max_cost_usd'
            WHEN u[base + 4] > 0 AND p_now - u[base + 4] > p_limits[base + 4] THEN 'max_seconds'
        END;
        IF refused IS NOT NULL THEN
            RETURN QUERY SELECT 'refused'::text, NULL::text, i, refused, u;
            RETURN;
        END IF;
    END LOOP;
    UPDATE budget_usage
    SET calls = budget_usage.calls + 1,
        tokens = budget_usage.tokens + p_tokens,
        cost = budget_usage.cost + p_cost,
        started = CASE WHEN budget_usage.started = 0 THEN p_now ELSE budget_usage.started END
    WHERE budget_usage.rollout_id = p_rollout AND budget_usage.attempt_id = '';
    INSERT INTO budget_usage AS b (rollout_id, attempt_id, calls, tokens, cost, started)
    VALUES (p_rollout, p_attempt, 1, p_tokens, p_cost, p_now)
    ON CONFLICT (rollout_id, attempt_id) DO UPDATE
    SET calls = b.calls + 1,
        tokens = b.tokens + p_tokens,
        cost = b.cost + p_cost,
        started = CASE WHEN b.started = 0 THEN p_now ELSE b.started END;
    RETURN QUERY SELECT 'reserved'::text, NULL::text, NULL::int, NULL::text, u;
END
$$
"""

# A call's reservation replaced by its real usage (the differences), never below zero; the
# rollout's row is locked first, in the same order as a reserve, so the two never deadlock.
SETTLE_FUNCTION = """
CREATE OR REPLACE FUNCTION spangate_budget_settle(
    p_rollout text, p_attempt text, p_tokens float8, p_cost float8
) RETURNS void
LANGUAGE plpgsql AS $$
BEGIN
    PERFORM 1 FROM budget_usage
    WHERE rollout_id = p_rollout AND attempt_id = ''
    FOR UPDATE;
    UPDATE budget_usage
    SET tokens = greatest(tokens + p_tokens, 0), cost = greatest(cost + p_cost, 0)
    WHERE rollout_id = p_rollout AND attempt_id IN ('', p_attempt);
END
$$
"""


def upgrade() -> None:
    bind = op.get_bind()
    build_metadata(bind.dialect.name).tables["budget_usage"].create(bind, checkfirst=True)
    if bind.dialect.name == "postgresql":
        op.execute(RESERVE_FUNCTION)
        op.execute(SETTLE_FUNCTION)


def downgrade() -> None:
    bind = op.get_bind()
    if bind.dialect.name == "postgresql":
        op.execute("DROP FUNCTION IF EXISTS spangate_budget_reserve")
        op.execute("DROP FUNCTION IF EXISTS spangate_budget_settle")
    op.drop_table("budget_usage")
