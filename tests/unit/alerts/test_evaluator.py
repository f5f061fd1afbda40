"""spendgate.alerts.evaluator: which alerts to send and when, with its once-only marks in real stores
(SQLite, and PostgreSQL when reachable) and an injected clock: thresholds, cap blocks and their
summaries, shadow traffic, unpriced models, store failures, spend spikes and retries of failed
deliveries, each sent once across instances and restarts."""

from __future__ import annotations

import threading
import time
from datetime import datetime, timedelta
from pathlib import Path

import pytest

from spendgate.alerts.evaluator import MAX_UNPRICED_A_DAY, AlertEvaluator
from spendgate.periods import period_end
from spendgate.store import Database
from spendgate.store.budgets import Blocked, BudgetLedger
from tests.unit.alerts.helpers import CENT, NANO, NOW, Stores, audit_rows, evaluator, settings, spend, utc


@pytest.fixture
def st(db: Database) -> Stores:
    return Stores.of(db)


@pytest.fixture
def sqlite_st(sqlite_db: Database) -> Stores:
    """For checks where the database engine does not matter."""
    return Stores.of(sqlite_db)


def blocked(scope: str = "user", name: str = "alice", spent: int = 100 * CENT, cap: int = 100 * CENT) -> Blocked:
    return Blocked(scope, name, "day", spent, 0, cap, period_end("day", NOW))


# ----------------------------------------------------------------------------- thresholds


def test_each_threshold_alerts_once_across_instances_and_restarts(st: Stores) -> None:
    st.keys.set_budget("user", "alice", NANO, "day", actor="t")
    st.keys.create_key("alice", team="core", actor="t")
    a, sent_a = evaluator(st)
    b, sent_b = evaluator(st)
    assert a.tick(NOW) == [] and b.tick(NOW) == []
    for amount, threshold in ((500_000_000, 50), (300_000_000, 80), (200_000_000, 100)):
        spend(st, "user", "alice", amount)
        a.tick(NOW)
        b.tick(NOW)
        a.tick(NOW)
        assert len(sent_a) + len(sent_b) == [50, 80, 100].index(threshold) + 1
    got = sorted(sent_a + sent_b, key=lambda x: x.dedupe_key)
    assert [x.dedupe_key.rsplit(":", 1)[1] for x in got] == ["100", "50", "80"]
    by = {x.dedupe_key.rsplit(":", 1)[1]: x.text for x in got}
    assert "$0.50 of $1.00 (50%)" in by["50"] and "$0.80 of $1.00 (80%)" in by["80"]
    assert "$1.00 of $1.00 (100%)" in by["100"]
    assert all("team core" in t and "2026-11-26 00:00 UTC" in t for t in by.values())
    restarted, sent_c = evaluator(st)
    restarted.tick(NOW)
    assert sent_c == []
    # The next period re-arms every threshold.
    tomorrow = NOW + timedelta(days=1)
    spend(st, "user", "alice", 600_000_000, at=tomorrow)
    restarted.tick(tomorrow)
    assert [x.dedupe_key for x in sent_c] == ["threshold:user:alice:day:2026-11-26:50"]


def test_a_jump_past_several_thresholds_sends_only_the_highest(sqlite_st: Stores) -> None:
    sqlite_st.keys.set_budget("team", "core", NANO, "week", actor="t")
    spend(sqlite_st, "team", "core", 2 * NANO)
    ev, sent = evaluator(sqlite_st)
    ev.tick(NOW)
    assert [x.dedupe_key for x in sent] == ["threshold:team:core:week:2026-11-23:100"]
    rows = {r.dedupe_key.rsplit(":", 1)[1]: r.status for r in sqlite_st.marks.recent(kind="threshold")}
    assert rows == {"100": "delivered", "80": "folded", "50": "folded"}
    assert "(200%)" in sent[0].text


@pytest.mark.parametrize("now", [NOW, utc(2026, 11, 30, 23, 59, 59), utc(2026, 12, 1)], ids=str)
def test_crossed_budgets_agrees_with_budget_status(st: Stores, now: datetime) -> None:
    """The evaluator's one-query read and `budgets list`'s per-budget read see the same period."""
    for scope, name, period in (("user", "alice", "day"), ("team", "core", "week"), ("global", "global", "month"),
                                ("user", "bob", "day"), ("user", "zero", "month")):
        st.keys.set_budget(scope, name, 0 if name == "zero" else NANO, period, actor="t")
    spend(st, "user", "alice", 700_000_000, at=now)
    spend(st, "team", "core", 500_000_000, at=now)
    spend(st, "global", "global", 499_999_999, at=now)
    spend(st, "user", "bob", 900_000_000, at=now - timedelta(days=1))  # yesterday: not this period
    want = [{k: r[k] for k in ("scope", "name", "period", "cap_nusd", "spent_nusd", "period_start", "resets_at")}
            for r in BudgetLedger(st.db).budget_status(now)
            if r["cap_nusd"] > 0 and r["spent_nusd"] * 100 >= 50 * r["cap_nusd"]]
    got = st.reports.crossed_budgets(now, 50)
    key = lambda r: (r["scope"], r["name"])  # noqa: E731
    assert sorted(got, key=key) == sorted(want, key=key)
    assert sorted((r["scope"], r["name"]) for r in got) == [("team", "core"), ("user", "alice")]


def test_concurrent_instances_claim_each_alert_once(st: Stores) -> None:
    st.keys.set_budget("user", "alice", NANO, "day", actor="t")
    spend(st, "user", "alice", NANO)
    evs = [evaluator(st) for _ in range(6)]
    barrier = threading.Barrier(len(evs))

    def run(ev: AlertEvaluator) -> None:
        barrier.wait()
        ev.tick(NOW)

    threads = [threading.Thread(target=run, args=(ev,)) for ev, _ in evs]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert sum(len(s) for _, s in evs) == 1


def test_configured_thresholds_and_zero_caps(sqlite_st: Stores) -> None:
    cfg = settings(slack={"thresholds": [90]})
    sqlite_st.keys.set_budget("user", "alice", NANO, "day", actor="t")
    sqlite_st.keys.set_budget("user", "zero", 0, "day", actor="t")
    spend(sqlite_st, "user", "alice", 850_000_000)
    ev, sent = evaluator(sqlite_st, cfg)
    ev.tick(NOW)
    assert sent == []
    spend(sqlite_st, "user", "alice", 50_000_000)
    ev.tick(NOW)
    assert [x.dedupe_key for x in sent] == ["threshold:user:alice:day:2026-11-25:90"]


# ----------------------------------------------------------------------------- cap blocked, shadow traffic


def test_first_cap_block_alerts_later_blocks_are_counted_and_summarised(st: Stores) -> None:
    a, sent_a = evaluator(st)
    b, sent_b = evaluator(st)
    for _ in range(3):
        a.observe_cap_block(blocked(), "alice", "core", "openai")
    a.tick(NOW)
    assert [x.dedupe_key for x in sent_a] == ["cap_blocked:user:alice:day:2026-11-25"]
    assert "blocked a request" in sent_a[0].text and "$1.00 of $1.00 (100%)" in sent_a[0].text
    for _ in range(4):
        b.observe_cap_block(blocked(), "alice", "core", "openai")
    b.tick(NOW)
    a.tick(NOW)
    assert sent_b == [] and len(sent_a) == 1
    row = st.mark("cap_blocked:user:alice:day:2026-11-25")
    assert row is not None and row.count == 7
    # An hour later one instance summarises the 6 further blocks, once.
    later = NOW + timedelta(hours=1)
    got = a.tick(later) + b.tick(later)
    assert len(got) == 1 and "6 more requests blocked" in got[0].text and "7 requests" in got[0].text
    assert a.tick(later + timedelta(minutes=5)) + b.tick(later + timedelta(minutes=5)) == []


def test_blocks_of_a_user_whose_name_holds_a_colon_are_summarised_too(sqlite_st: Stores) -> None:
    ev, sent = evaluator(sqlite_st)
    for name in ("svc:batch", "summary"):  # the dedupe key is parsed back from its stored text
        for _ in range(2):
            ev.observe_cap_block(blocked(name=name), name, None, "openai")
    ev.tick(NOW)
    got = ev.tick(NOW + timedelta(hours=1))
    assert sorted(a.dedupe_key for a in got) == ["cap_blocked:user:summary:day:2026-11-25:summary:2026-11-25T14",
                                                 "cap_blocked:user:svc:batch:day:2026-11-25:summary:2026-11-25T14"]
    assert all("1 more request blocked" in a.text and "Resets: 2026-11-26 00:00 UTC" in a.text for a in got)
    assert len(sent) == 4


def test_shadow_traffic_alerts_once_a_day_per_user_and_provider(sqlite_st: Stores) -> None:
    # Which requests count (BYOK pass-through, refused raw keys) is the AlertFeed stage's call.
    ev, sent = evaluator(sqlite_st)
    ev.observe_shadow("dora", "core", "openai", True, NOW)
    ev.observe_shadow("dora", "core", "openai", True, NOW)
    ev.observe_shadow(None, None, "anthropic", False, NOW)
    ev.tick(NOW)
    assert sorted(x.dedupe_key for x in sent) == ["shadow_traffic:dora:openai:2026-11-25",
                                                  "shadow_traffic:unknown:anthropic:2026-11-25"]
    dora = next(x for x in sent if "dora" in x.dedupe_key)
    assert "Passed through (BYOK): 2 requests" in dora.text
    unknown = next(x for x in sent if "unknown" in x.dedupe_key)
    assert "Refused: 1 request" in unknown.text and "an unidentified client" in unknown.text
    ev.observe_shadow("dora", "core", "openai", True, NOW)
    ev.tick(NOW)
    assert len(sent) == 2
    row = sqlite_st.mark("shadow_traffic:dora:openai:2026-11-25")
    assert row is not None and row.count == 3


def test_observing_is_cheap_and_bounded(sqlite_st: Stores) -> None:
    # (Before the redesign `observe(call)` also had to survive garbage; the typed inputs rule that out.)
    ev, _ = evaluator(sqlite_st)
    cap = blocked()
    t0 = time.perf_counter()
    for _ in range(10_000):
        ev.observe_cap_block(cap, "alice", "core", "openai")
        ev.observe_shadow("dora", None, "openai", True, NOW)
    assert time.perf_counter() - t0 < 0.5
    assert len(ev._events) == 10_000  # bounded


# ----------------------------------------------------------------------------- store failing


def test_store_failing_alerts_once_per_episode(sqlite_st: Stores) -> None:
    healthy = {"ok": False}
    ev, sent = evaluator(sqlite_st, writer_healthy=lambda: healthy["ok"])
    ev.on_store_error("OperationalError")
    ev.on_store_error("OperationalError")
    ev.tick(NOW)
    ev.tick(NOW)
    assert [x.kind for x in sent] == ["store_failing"] and "OperationalError" in sent[0].text
    healthy["ok"] = True
    ev.tick(NOW)
    healthy["ok"] = False
    ev.on_store_error("OperationalError")
    ev.tick(NOW + timedelta(hours=1))
    assert [x.kind for x in sent] == ["store_failing", "store_failing"]


def test_store_failing_alerts_even_when_the_store_cannot_take_the_mark(tmp_path: Path) -> None:
    db = Database(f"sqlite:///{tmp_path / 'gone' / 'x.db'}")  # never migrated: every query fails
    try:
        ev, sent = evaluator(Stores.of(db), writer_healthy=lambda: False)
        ev.on_store_error("OperationalError")
        ev.tick(NOW)
        assert [x.kind for x in sent] == ["store_failing"]
    finally:
        db.close()


# ----------------------------------------------------------------------------- spend spikes

SPIKE = {"window_seconds": 60, "baseline_seconds": 3600, "factor": 5.0, "min_requests": 20, "min_usd": 1}


def test_a_burst_far_above_baseline_alerts_once_per_episode(st: Stores) -> None:
    st.keys.create_key("carol", team="core", actor="t")
    cfg = settings(spike=SPIKE)
    base = [NOW - timedelta(minutes=m) for m in range(2, 60, 5)]  # ~12 requests an hour
    audit_rows(st, "carol", base)
    # dan: 20 requests a minute, but that is his usual rate all hour.
    audit_rows(st, "dan", [NOW - timedelta(seconds=s) for s in range(0, 3600, 3)])
    ev, sent = evaluator(st, cfg)
    ev.tick(NOW)
    assert sent == []
    burst = [NOW - timedelta(seconds=s) for s in range(0, 30)]
    audit_rows(st, "carol", burst)
    ev.tick(NOW)
    assert sent == []  # spike checks run every window/5 (here 12 s), not every tick
    ev.tick(NOW + timedelta(seconds=15))
    assert [x.dedupe_key for x in sent] == ["spike:user:carol:1"]
    assert "30 requests" in sent[0].text and "team core" in sent[0].text
    # The burst goes on: same episode, on this and on another instance.
    other, sent2 = evaluator(st, cfg)
    for i in range(1, 4):
        t = NOW + timedelta(seconds=15 + 20 * i)
        audit_rows(st, "carol", [t - timedelta(seconds=s) for s in range(0, 20)])
        ev.tick(t)
        other.tick(t)
    assert len(sent) == 1 and sent2 == []
    # Quiet for longer than a window, then a new burst: a new episode.
    t = NOW + timedelta(minutes=10)
    audit_rows(st, "carol", [t - timedelta(seconds=s) for s in range(0, 40)])
    ev.tick(t)
    assert [x.dedupe_key for x in sent] == ["spike:user:carol:1", "spike:user:carol:2"]


def test_spend_spike_by_cost(sqlite_st: Stores) -> None:
    cfg = settings(spike={**SPIKE, "min_requests": 1000})
    audit_rows(sqlite_st, "erin", [NOW - timedelta(minutes=m) for m in range(5, 60, 10)], cost_nusd=CENT)
    audit_rows(sqlite_st, "erin", [NOW - timedelta(seconds=s) for s in range(0, 5)], cost_nusd=NANO // 2)
    ev, sent = evaluator(sqlite_st, cfg)
    ev.tick(NOW)
    assert [x.dedupe_key for x in sent] == ["spike:user:erin:1"]
    assert "$2.50" in sent[0].text


# ----------------------------------------------------------------------------- retries of failed deliveries


def test_failed_delivery_is_retried_by_one_instance_with_backoff(st: Stores) -> None:
    st.keys.set_budget("user", "alice", NANO, "day", actor="t")
    spend(st, "user", "alice", 600_000_000)
    a, sent_a = evaluator(st)
    b, sent_b = evaluator(st)
    a.tick(NOW)
    (alert,) = sent_a
    st.marks.mark(alert.dedupe_key, "failed", "URLError: refused")
    assert a.tick(NOW + timedelta(seconds=40)) == []  # retry checks run, but the backoff is 60 s
    later = NOW + timedelta(seconds=90)
    got = a.tick(later) + b.tick(later)
    assert len(got) == 1 and got[0].text == alert.text and got[0].blocks() == alert.blocks()
    row = st.mark(alert.dedupe_key)
    assert row is not None and row.attempts == 2 and row.status == "delivered"
    st.marks.mark(alert.dedupe_key, "failed", "again")
    assert len(a.tick(later + timedelta(minutes=5))) == 1
    st.marks.mark(alert.dedupe_key, "failed", "again")
    assert a.tick(later + timedelta(minutes=10)) == []  # gave up after 3 attempts


# ----------------------------------------------------------------------------- unpriced models


def test_an_unpriced_model_alerts_once_a_day_across_instances_and_later_requests_are_counted(st: Stores) -> None:
    a, sent_a = evaluator(st)
    b, sent_b = evaluator(st)
    for _ in range(3):
        a.observe_unpriced("openai", "gpt-9-omega")
    a.tick(NOW)
    assert [x.dedupe_key for x in sent_a] == ["unpriced_model:openai:gpt-9-omega:2026-11-25"]
    text = sent_a[0].text
    assert "gpt-9-omega" in text and "Requests so far today: 3" in text
    assert '"openai:gpt-9-omega" = { input = ..., output = ... }' in text and "[prices.overrides]" in text
    for _ in range(2):
        b.observe_unpriced("openai", "gpt-9-omega")  # another instance, same day: counted on the mark, not re-sent
        a.observe_unpriced("openai", "gpt-9-omega")
    b.tick(NOW + timedelta(minutes=1))
    a.tick(NOW + timedelta(minutes=2))
    assert len(sent_a) == 1 and sent_b == []
    row = st.mark("unpriced_model:openai:gpt-9-omega:2026-11-25")
    assert row is not None and row.count == 7
    # The next day re-arms it.
    tomorrow = NOW + timedelta(days=1)
    b.observe_unpriced("openai", "gpt-9-omega")
    b.tick(tomorrow)
    assert [x.dedupe_key for x in sent_b] == ["unpriced_model:openai:gpt-9-omega:2026-11-26"]


def test_unpriced_models_are_alerted_per_provider_and_model(sqlite_st: Stores) -> None:
    ev, sent = evaluator(sqlite_st)
    for provider, model in (("openai", "m1"), ("openai", "m2"), ("azure", "m1"), ("openai", "m1")):
        ev.observe_unpriced(provider, model)
    ev.tick(NOW)
    assert sorted(x.dedupe_key for x in sent) == ["unpriced_model:azure:m1:2026-11-25",
                                                  "unpriced_model:openai:m1:2026-11-25",
                                                  "unpriced_model:openai:m2:2026-11-25"]


def test_made_up_model_names_are_a_bounded_number_of_alerts_a_day(sqlite_st: Stores) -> None:
    """Model names come from clients: a thousand invented ones are not a thousand Slack messages."""
    ev, sent = evaluator(sqlite_st)
    for i in range(1000):
        ev.observe_unpriced("openai", f"made-up-{i}")
    ev.tick(NOW)
    ev.observe_unpriced("openai", "made-up-0")  # already alerted today: counted
    ev.observe_unpriced("openai", "one-more")  # past the bound: not alerted today
    ev.tick(NOW + timedelta(minutes=1))
    assert len(sent) == MAX_UNPRICED_A_DAY
    counted = sqlite_st.mark("unpriced_model:openai:made-up-0:2026-11-25")
    assert counted is not None and counted.count == 2
    tomorrow = NOW + timedelta(days=1)
    ev.observe_unpriced("openai", "one-more")
    ev.tick(tomorrow)
    assert sent[-1].dedupe_key == "unpriced_model:openai:one-more:2026-11-26"


def test_a_long_model_name_is_cut_in_the_alert(sqlite_st: Stores) -> None:
    ev, sent = evaluator(sqlite_st)
    ev.observe_unpriced("openai", "x" * 5000)
    ev.tick(NOW)
    (alert,) = sent
    assert alert.dedupe_key == f"unpriced_model:openai:{'x' * 100}:2026-11-25"
    assert sqlite_st.mark(alert.dedupe_key) is not None
