"""Slack alerts without a gateway: messages, the slack-sdk sender against a local Slack stand-in,
the evaluator's once-only marks in a real store (SQLite, and PostgreSQL when reachable) with an
injected clock, and the provider backstop against the mock's cost APIs."""

from __future__ import annotations

import socket
import threading
import time
from collections.abc import Iterator
from datetime import datetime, timedelta, timezone
from decimal import Decimal
from pathlib import Path
from typing import Any

import pytest
import sqlalchemy as sa
from prometheus_client import generate_latest

from spendgate import alerts as render
from spendgate.alerting import AlertEvaluator
from spendgate.alerts import Alert, AlertDeliveryError, SlackSender, money
from spendgate.backstop import Backstop, CostClient, anthropic_cost_usd, openai_costs_usd, window
from spendgate.call import Call, new_request_id
from spendgate.keys import KeyRecord
from spendgate.metrics import Metrics
from spendgate.periods import period_end, period_start
from spendgate.settings import Settings, SlackSettings, parse_settings
from spendgate.store import Blocked, Store
from tests.rig.mock_provider import MockProvider
from tests.rig.slack_mock import SlackMock

UTC = timezone.utc
NANO = 1_000_000_000
CENT = 10_000_000
KEEP_TABLES = {"alembic_version", "registry_version"}
NOW = datetime(2026, 11, 25, 13, 30, tzinfo=UTC)


def utc(*a: int) -> datetime:
    return datetime(*a, tzinfo=UTC)


# ----------------------------------------------------------------------------- fixtures


@pytest.fixture(params=["sqlite", pytest.param("postgres", marks=pytest.mark.postgres)])
def store(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[Store]:
    if request.param == "sqlite":
        s = Store(f"sqlite:///{tmp_path / 'alerts.db'}")
        s.upgrade()
    else:
        s = Store(request.getfixturevalue("pg_module_url"))
        with s.engine.begin() as conn:
            tables = [r[0] for r in conn.execute(sa.text(
                "SELECT tablename FROM pg_tables WHERE schemaname = 'public'")) if r[0] not in KEEP_TABLES]
            conn.execute(sa.text(f"TRUNCATE {', '.join(tables)} RESTART IDENTITY CASCADE"))
    yield s
    s.close()


@pytest.fixture
def sqlite_store(tmp_path: Path) -> Iterator[Store]:
    """For checks where the database engine does not matter."""
    s = Store(f"sqlite:///{tmp_path / 'alerts.db'}")
    s.upgrade()
    yield s
    s.close()


@pytest.fixture(scope="module")
def _slack_module() -> Iterator[SlackMock]:
    with SlackMock(token="xoxb-test-token") as s:
        yield s


@pytest.fixture
def slack(_slack_module: SlackMock) -> Iterator[SlackMock]:
    _slack_module.reset()
    yield _slack_module
    _slack_module.reset()


def settings(**alerts: Any) -> Settings:
    return parse_settings({"alerts": alerts}, {})


class Sent(list[Alert]):
    """The evaluator's `send`: records what this instance would hand to Slack, and marks it
    delivered as the Slack sender does."""

    def __init__(self, store: Store) -> None:
        super().__init__()
        self.store = store

    def __call__(self, alert: Alert) -> None:
        self.append(alert)
        try:
            self.store.mark_alert(alert.dedupe_key, "delivered")
        except Exception:  # noqa: BLE001 - a broken store is what some tests are about
            pass


def evaluator(store: Store, cfg: Settings | None = None, **kw: Any) -> tuple[AlertEvaluator, Sent]:
    sent = Sent(store)
    return AlertEvaluator(cfg or settings(), store, sent, **kw), sent


def spend(store: Store, scope: str, name: str, nusd: int, at: datetime = NOW) -> None:
    """Reserve and settle `nusd` against a budget, as a finished request does."""
    b = next(b for b in store.load_budgets() if (b.scope, b.name) == (scope, name))
    r = store.reserve(new_request_id(), [b], 0, at, timedelta(minutes=10))
    assert r.ok
    store.write_audit_batch([], [], (), [{"request_id": new_request_id(), "refs": r.refs, "actual_nusd": nusd}])


def audit_rows(store: Store, user: str, times: list[datetime], cost_nusd: int = 0, provider: str = "openai") -> None:
    store.write_audit_batch([{
        "id": new_request_id(), "started_at": t, "ended_at": t, "user": user, "provider": provider,
        "host": "api.openai.com", "method": "POST", "path": "/v1/chat/completions", "endpoint_kind": "chat",
        "outcome": "completed", "cost_nusd": cost_nusd,
    } for t in times], [])


def key(user: str, team: str | None = None, byok: bool = False) -> KeyRecord:
    return KeyRecord(key_id="k" + user[:7], user=user, team=team, state="active", secret_hash="x", prev_secret_hash=None,
                     prev_valid_until=None, expires_at=None, allowed_models=(), rpm=None, byok=byok,
                     capture_content=False, capture_reason=None)


def finished_call(outcome: str | None = "completed", user: str | None = "alice", team: str | None = "core",
                  provider: str = "openai", **kw: Any) -> Call:
    p = settings().provider(provider)
    assert p is not None
    c = Call(request_id=new_request_id(), provider=p, started_at=NOW)
    c.key = key(user, team) if user else None
    c.outcome = outcome
    for k, v in kw.items():
        if k in ("blocked_budget",):
            c.extra[k] = v
        else:
            setattr(c, k, v)
    return c


def blocked(scope: str = "user", name: str = "alice", spent: int = 100 * CENT, cap: int = 100 * CENT) -> Blocked:
    return Blocked(scope, name, "day", spent, 0, cap, period_end("day", NOW))


# ----------------------------------------------------------------------------- messages


@pytest.mark.parametrize(("amount", "text"), [
    (0, "$0.00"),
    (800_000_000, "$0.80"),
    (NANO, "$1.00"),
    (1_234_500_000, "$1.2345"),
    (1234, "$0.000001"),
    (12_345 * NANO, "$12,345.00"),
    (Decimal("12.5"), "$12.50"),
    (Decimal("0.123456789"), "$0.123457"),
])
def test_money(amount: int | Decimal, text: str) -> None:
    assert money(amount) == text


def test_threshold_message_names_who_how_much_period_reset_and_what_to_do() -> None:
    start, reset = period_start("day", NOW), period_end("day", NOW)
    a = render.threshold_alert("user", "alice", "day", 80, 850_000_000, NANO, start, reset, team="core")
    assert a.dedupe_key == "threshold:user:alice:day:2026-11-25:80"
    t = a.text
    for needle in ("alice", "team core", "crossed 80%", "$0.85 of $1.00 (85%)", "daily", "day",
                   "2026-11-26 00:00 UTC", "What to do", "spendgate budgets set user alice --cap <USD> --period day"):
        assert needle in t, (needle, t)
    blocks = a.blocks()
    assert blocks[0]["type"] == "header" and "alice" in blocks[0]["text"]["text"]
    fields = {f["text"].split("\n")[0].strip("*"): f["text"].split("\n", 1)[1] for f in blocks[1]["fields"]}
    assert fields["Spent"] == "$0.85 of $1.00 (85%)"
    assert fields["Resets"] == "2026-11-26 00:00 UTC"
    assert fields["Who"] == "user alice (team core)"
    assert blocks[2]["text"]["text"].startswith("*What to do:*")
    reached = render.threshold_alert("team", "core", "month", 100, NANO, NANO, start, reset)
    assert "reached the monthly cap" in reached.text and "refused (429)" in reached.text


ALL_ALERTS = [
    render.threshold_alert("global", "global", "week", 50, NANO, 2 * NANO, NOW, NOW + timedelta(days=3)),
    render.cap_blocked_alert("team", "core", "day", NANO, NANO, NOW, NOW + timedelta(hours=10), "bob", None, "openai"),
    render.cap_blocked_summary("cap_blocked:team:core:day:2026-11-25", "team", "core", "day", 41, 42, NOW,
                               NOW + timedelta(hours=10), "2026-11-25T14"),
    render.spike_alert("carol", 1, 300, 240, 5 * NANO, 3.0, 0.1 * NANO, "240 requests vs usual 3.0", NOW, "core"),
    render.backstop_budget_alert("openai", Decimal("120.5"), Decimal("100"), 90 * NANO, NOW, "2026-11-25"),
    render.backstop_mismatch_alert("anthropic", Decimal("10"), 5 * NANO, 0.2, NOW, "2026-11-25"),
    render.shadow_alert("dora", "openai", 3, 0, "2026-11-25", "core"),
    render.shadow_alert(None, "anthropic", 0, 1, "2026-11-25"),
    render.store_failing_alert("OperationalError", "host:1", "2026-11-25T13"),
    render.hello_alert(),
]


@pytest.mark.parametrize("alert", ALL_ALERTS, ids=lambda a: a.dedupe_key or a.kind)
def test_every_kind_renders_valid_block_kit_with_a_fallback(alert: Alert) -> None:
    assert alert.kind in render.KINDS
    assert alert.text.startswith("Spendgate: ") and "What to do: " in alert.text
    blocks = alert.blocks()
    assert blocks[0]["type"] == "header" and len(blocks[0]["text"]["text"]) <= 150
    for b in blocks:
        assert b["type"] in ("header", "section", "context")
        for f in b.get("fields", []):
            assert f["type"] == "mrkdwn" and len(f["text"]) <= 2000
    assert len([b for b in blocks if "fields" in b]) <= 1 and all(len(b.get("fields", [])) <= 10 for b in blocks)
    assert render.alert_from_row(alert.kind, alert.dedupe_key, alert.scope, alert.name, alert.text,
                                 alert.blocks_json()).blocks() == blocks


def test_backstop_mismatch_message_says_which_way() -> None:
    more = render.backstop_mismatch_alert("openai", Decimal("10"), 5 * NANO, 0.2, NOW, "2026-11-25")
    assert "50% more" in more.text and "$10.00" in more.text and "$5.00" in more.text and "outside the gateway" in more.text
    less = render.backstop_mismatch_alert("openai", Decimal("5"), 10 * NANO, 0.2, NOW, "2026-11-25")
    assert "50% less" in less.text and "lags" in less.text


# ----------------------------------------------------------------------------- sender


def test_webhook_delivery_with_blocks_and_counted(slack: SlackMock) -> None:
    m = Metrics()
    sender = SlackSender(SlackSettings(webhook_url=slack.webhook_url), m)
    alert = ALL_ALERTS[0]
    sender.deliver(alert)
    (msg,) = slack.wait_for(1)
    assert msg.kind == "webhook" and msg.text == alert.text and msg.blocks == alert.blocks()
    sender.start()
    try:
        assert sender.submit(ALL_ALERTS[1])
        slack.wait_for(2)
        deadline = time.monotonic() + 5
        while sender.stats.sent < 1 and time.monotonic() < deadline:
            time.sleep(0.01)
    finally:
        sender.stop()
    text = generate_latest(m.registry).decode()
    assert 'spendgate_alerts_sent_total{kind="cap_blocked"} 1.0' in text
    assert "spendgate_alert_failures_total 0.0" in text


def test_bot_token_posts_to_the_channel_and_a_bad_token_fails(slack: SlackMock) -> None:
    good = SlackSender(SlackSettings(bot_token="xoxb-test-token", channel="#spend", api_url=slack.api_url))
    good.deliver(ALL_ALERTS[3])
    (msg,) = slack.wait_for(1)
    assert msg.kind == "chat.postMessage" and msg.headers["authorization"] == "Bearer xoxb-test-token"
    assert msg.json["channel"] == "#spend" and msg.text == ALL_ALERTS[3].text and msg.blocks == ALL_ALERTS[3].blocks()
    bad = SlackSender(SlackSettings(bot_token="xoxb-wrong", channel="#spend", api_url=slack.api_url))
    with pytest.raises(AlertDeliveryError, match="invalid_auth"):
        bad.deliver(ALL_ALERTS[3])


@pytest.mark.parametrize("via", ["webhook", "bot"])
def test_429_with_retry_after_is_honoured_then_delivered_once(slack: SlackMock, via: str) -> None:
    cfg = (SlackSettings(webhook_url=slack.webhook_url) if via == "webhook"
           else SlackSettings(bot_token="xoxb-test-token", channel="#spend", api_url=slack.api_url))
    slack.fail_next(429, retry_after=1)
    SlackSender(cfg).deliver(ALL_ALERTS[0])
    assert [r.status for r in slack.requests] == [429, 200]
    first, second = slack.requests
    assert second.at - first.at >= 1.0  # Retry-After honoured
    assert len(slack.messages) == 1


def test_5xx_is_retried_and_slack_down_fails_and_is_counted(slack: SlackMock, tmp_path: Path) -> None:
    slack.fail_next(500)
    SlackSender(SlackSettings(webhook_url=slack.webhook_url)).deliver(ALL_ALERTS[0])
    assert [r.status for r in slack.requests] == [500, 200]

    store = Store(f"sqlite:///{tmp_path / 'a.db'}")
    store.upgrade()
    alert = ALL_ALERTS[0]
    assert store.claim_alert(alert.dedupe_key, alert.kind, alert.scope, alert.name, alert.text, alert.blocks_json())
    m = Metrics()
    sender = SlackSender(SlackSettings(webhook_url=slack.webhook_url), m, store)
    slack.down()
    sender.start()
    try:
        sender.submit(alert)
        deadline = time.monotonic() + 10
        while sender.stats.failed < 1 and time.monotonic() < deadline:
            time.sleep(0.02)
    finally:
        sender.stop()
    assert "spendgate_alert_failures_total 1.0" in generate_latest(m.registry).decode()
    row = store.get_alert(alert.dedupe_key)
    assert row is not None and row.status == "failed" and "refused" in (row.error or "").lower()
    assert slack.webhook_url not in (row.error or "")


def test_submit_never_blocks_while_slack_hangs(slack: SlackMock) -> None:
    sender = SlackSender(SlackSettings(webhook_url=slack.webhook_url), timeout=30)
    slack.hang()
    sender.start()
    try:
        t0 = time.perf_counter()
        for a in ALL_ALERTS:
            assert sender.submit(a)
        assert time.perf_counter() - t0 < 0.05
        deadline = time.monotonic() + 5
        while not slack.requests and time.monotonic() < deadline:
            time.sleep(0.01)
        assert len(slack.requests) == 1 and slack.requests[0].status is None  # stuck in the first send
    finally:
        slack.release()
        sender.stop(timeout=0.5)


class _RecordingProxy:
    """A TCP listener that only counts connections: where HTTPS_PROXY points."""

    def __init__(self) -> None:
        self.sock = socket.socket()
        self.sock.bind(("127.0.0.1", 0))
        self.sock.listen(16)
        self.sock.settimeout(0.1)
        self.accepted = 0
        self._stop = threading.Event()
        self._t = threading.Thread(target=self._run, daemon=True)
        self._t.start()

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.sock.getsockname()[1]}"

    def _run(self) -> None:
        while not self._stop.is_set():
            try:
                c, _ = self.sock.accept()
            except OSError:
                continue
            self.accepted += 1
            c.close()

    def close(self) -> None:
        self._stop.set()
        self._t.join(1)
        self.sock.close()


@pytest.mark.parametrize("via", ["webhook", "bot"])
def test_proxy_environment_is_not_used(slack: SlackMock, monkeypatch: pytest.MonkeyPatch, via: str) -> None:
    proxy = _RecordingProxy()
    try:
        for var in ("HTTPS_PROXY", "https_proxy", "HTTP_PROXY", "http_proxy", "ALL_PROXY"):
            monkeypatch.setenv(var, proxy.url)
        monkeypatch.delenv("NO_PROXY", raising=False)
        monkeypatch.delenv("no_proxy", raising=False)
        # slack-sdk on its own would take the environment's proxy (what this guards against):
        from slack_sdk.webhook import WebhookClient

        assert WebhookClient(slack.webhook_url).proxy == proxy.url
        cfg = (SlackSettings(webhook_url=slack.webhook_url) if via == "webhook"
               else SlackSettings(bot_token="xoxb-test-token", channel="#spend", api_url=slack.api_url))
        SlackSender(cfg).deliver(ALL_ALERTS[0])
        slack.wait_for(1)
        assert proxy.accepted == 0
    finally:
        proxy.close()


# ----------------------------------------------------------------------------- thresholds


def test_each_threshold_alerts_once_across_instances_and_restarts(store: Store) -> None:
    store.set_budget("user", "alice", NANO, "day", actor="t")
    store.create_key("alice", team="core", actor="t")
    a, sent_a = evaluator(store)
    b, sent_b = evaluator(store)
    assert a.tick(NOW) == [] and b.tick(NOW) == []
    for amount, threshold in ((500_000_000, 50), (300_000_000, 80), (200_000_000, 100)):
        spend(store, "user", "alice", amount)
        a.tick(NOW)
        b.tick(NOW)
        a.tick(NOW)
        assert len(sent_a) + len(sent_b) == [50, 80, 100].index(threshold) + 1
    got = sorted(sent_a + sent_b, key=lambda x: x.dedupe_key)
    assert [x.dedupe_key.rsplit(":", 1)[1] for x in got] == ["100", "50", "80"]
    by = {x.dedupe_key.rsplit(":", 1)[1]: x.text for x in got}
    assert "$0.50 of $1.00 (50%)" in by["50"] and "$0.80 of $1.00 (80%)" in by["80"] and "$1.00 of $1.00 (100%)" in by["100"]
    assert all("team core" in t and "2026-11-26 00:00 UTC" in t for t in by.values())
    restarted, sent_c = evaluator(store)
    restarted.tick(NOW)
    assert sent_c == []
    # The next period re-arms every threshold.
    tomorrow = NOW + timedelta(days=1)
    spend(store, "user", "alice", 600_000_000, at=tomorrow)
    restarted.tick(tomorrow)
    assert [x.dedupe_key for x in sent_c] == ["threshold:user:alice:day:2026-11-26:50"]


def test_a_jump_past_several_thresholds_sends_only_the_highest(sqlite_store: Store) -> None:
    sqlite_store.set_budget("team", "core", NANO, "week", actor="t")
    spend(sqlite_store, "team", "core", 2 * NANO)
    ev, sent = evaluator(sqlite_store)
    ev.tick(NOW)
    assert [x.dedupe_key for x in sent] == ["threshold:team:core:week:2026-11-23:100"]
    rows = {r.dedupe_key.rsplit(":", 1)[1]: r.status for r in sqlite_store.list_alerts(kind="threshold")}
    assert rows == {"100": "delivered", "80": "folded", "50": "folded"}
    assert "(200%)" in sent[0].text


@pytest.mark.parametrize("now", [NOW, utc(2026, 11, 30, 23, 59, 59), utc(2026, 12, 1)], ids=str)
def test_crossed_budgets_agrees_with_budget_status(store: Store, now: datetime) -> None:
    """The evaluator's one-query read and `budgets list`'s per-budget read see the same period."""
    for scope, name, period in (("user", "alice", "day"), ("team", "core", "week"), ("global", "global", "month"),
                                ("user", "bob", "day"), ("user", "zero", "month")):
        store.set_budget(scope, name, 0 if name == "zero" else NANO, period, actor="t")
    spend(store, "user", "alice", 700_000_000, at=now)
    spend(store, "team", "core", 500_000_000, at=now)
    spend(store, "global", "global", 499_999_999, at=now)
    spend(store, "user", "bob", 900_000_000, at=now - timedelta(days=1))  # yesterday: not this period
    want = [{k: r[k] for k in ("scope", "name", "period", "cap_nusd", "spent_nusd", "period_start", "resets_at")}
            for r in store.budget_status(now) if r["cap_nusd"] > 0 and r["spent_nusd"] * 100 >= 50 * r["cap_nusd"]]
    got = store.crossed_budgets(now, 50)
    key = lambda r: (r["scope"], r["name"])  # noqa: E731
    assert sorted(got, key=key) == sorted(want, key=key)
    assert sorted((r["scope"], r["name"]) for r in got) == [("team", "core"), ("user", "alice")]


def test_concurrent_instances_claim_each_alert_once(store: Store) -> None:
    store.set_budget("user", "alice", NANO, "day", actor="t")
    spend(store, "user", "alice", NANO)
    evs = [evaluator(store) for _ in range(6)]
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


def test_configured_thresholds_and_zero_caps(sqlite_store: Store) -> None:
    cfg = settings(slack={"thresholds": [90]})
    sqlite_store.set_budget("user", "alice", NANO, "day", actor="t")
    sqlite_store.set_budget("user", "zero", 0, "day", actor="t")
    spend(sqlite_store, "user", "alice", 850_000_000)
    ev, sent = evaluator(sqlite_store, cfg)
    ev.tick(NOW)
    assert sent == []
    spend(sqlite_store, "user", "alice", 50_000_000)
    ev.tick(NOW)
    assert [x.dedupe_key for x in sent] == ["threshold:user:alice:day:2026-11-25:90"]


# ----------------------------------------------------------------------------- cap blocked, shadow traffic


def test_first_cap_block_alerts_later_blocks_are_counted_and_summarised(store: Store) -> None:
    a, sent_a = evaluator(store)
    b, sent_b = evaluator(store)
    for _ in range(3):
        a.observe(finished_call("blocked_cap", blocked_budget=blocked()))
    a.tick(NOW)
    assert [x.dedupe_key for x in sent_a] == ["cap_blocked:user:alice:day:2026-11-25"]
    assert "blocked a request" in sent_a[0].text and "$1.00 of $1.00 (100%)" in sent_a[0].text
    for _ in range(4):
        b.observe(finished_call("blocked_cap", blocked_budget=blocked()))
    b.tick(NOW)
    a.tick(NOW)
    assert sent_b == [] and len(sent_a) == 1
    row = store.get_alert("cap_blocked:user:alice:day:2026-11-25")
    assert row is not None and row.count == 7
    # An hour later one instance summarises the 6 further blocks, once.
    later = NOW + timedelta(hours=1)
    got = a.tick(later) + b.tick(later)
    assert len(got) == 1 and "6 more requests blocked" in got[0].text and "7 requests" in got[0].text
    assert a.tick(later + timedelta(minutes=5)) + b.tick(later + timedelta(minutes=5)) == []


def test_shadow_traffic_alerts_once_a_day_per_user_and_provider(sqlite_store: Store) -> None:
    ev, sent = evaluator(sqlite_store)
    ev.observe(finished_call("completed", user="dora", byok_passthrough=True))
    ev.observe(finished_call("completed", user="dora", byok_passthrough=True))
    ev.observe(finished_call("blocked_policy", user=None, error="spendgate_foreign_key", provider="anthropic"))
    ev.observe(finished_call("completed", user="erin"))  # an ordinary request: nothing
    ev.tick(NOW)
    assert sorted(x.dedupe_key for x in sent) == ["shadow_traffic:dora:openai:2026-11-25",
                                                  "shadow_traffic:unknown:anthropic:2026-11-25"]
    dora = next(x for x in sent if "dora" in x.dedupe_key)
    assert "Passed through (BYOK): 2 requests" in dora.text
    ev.observe(finished_call("completed", user="dora", byok_passthrough=True))
    ev.tick(NOW)
    assert len(sent) == 2
    row = sqlite_store.get_alert("shadow_traffic:dora:openai:2026-11-25")
    assert row is not None and row.count == 3


def test_observe_is_cheap_and_never_raises(sqlite_store: Store) -> None:
    ev, _ = evaluator(sqlite_store)
    ev.observe(None)  # type: ignore[arg-type]
    ev.observe(object())  # type: ignore[arg-type]
    c = finished_call("blocked_cap", blocked_budget="not a Blocked")
    ev.observe(c)
    call = finished_call("blocked_cap", blocked_budget=blocked())
    t0 = time.perf_counter()
    for _ in range(20_000):
        ev.observe(call)
    assert time.perf_counter() - t0 < 0.5
    assert len(ev._events) == 10_000  # bounded


# ----------------------------------------------------------------------------- store failing


def test_store_failing_alerts_once_per_episode(sqlite_store: Store) -> None:
    healthy = {"ok": False}
    ev, sent = evaluator(sqlite_store, writer_healthy=lambda: healthy["ok"])
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
    s = Store(f"sqlite:///{tmp_path / 'gone' / 'x.db'}")  # never migrated: every query fails
    ev, sent = evaluator(s, writer_healthy=lambda: False)
    ev.on_store_error("OperationalError")
    ev.tick(NOW)
    assert [x.kind for x in sent] == ["store_failing"]


# ----------------------------------------------------------------------------- spend spikes

SPIKE = {"window_seconds": 60, "baseline_seconds": 3600, "factor": 5.0, "min_requests": 20, "min_usd": 1}


def test_a_burst_far_above_baseline_alerts_once_per_episode(store: Store) -> None:
    store.create_key("carol", team="core", actor="t")
    cfg = settings(spike=SPIKE)
    base = [NOW - timedelta(minutes=m) for m in range(2, 60, 5)]  # ~12 requests an hour
    audit_rows(store, "carol", base)
    # dan: 20 requests a minute, but that is his usual rate all hour.
    audit_rows(store, "dan", [NOW - timedelta(seconds=s) for s in range(0, 3600, 3)])
    ev, sent = evaluator(store, cfg)
    ev.tick(NOW)
    assert sent == []
    burst = [NOW - timedelta(seconds=s) for s in range(0, 30)]
    audit_rows(store, "carol", burst)
    ev.tick(NOW)
    assert sent == []  # spike checks run every window/5 (here 12 s), not every tick
    ev.tick(NOW + timedelta(seconds=15))
    assert [x.dedupe_key for x in sent] == ["spike:user:carol:1"]
    assert "30 requests" in sent[0].text and "team core" in sent[0].text
    # The burst goes on: same episode, on this and on another instance.
    other, sent2 = evaluator(store, cfg)
    for i in range(1, 4):
        t = NOW + timedelta(seconds=15 + 20 * i)
        audit_rows(store, "carol", [t - timedelta(seconds=s) for s in range(0, 20)])
        ev.tick(t)
        other.tick(t)
    assert len(sent) == 1 and sent2 == []
    # Quiet for longer than a window, then a new burst: a new episode.
    t = NOW + timedelta(minutes=10)
    audit_rows(store, "carol", [t - timedelta(seconds=s) for s in range(0, 40)])
    ev.tick(t)
    assert [x.dedupe_key for x in sent] == ["spike:user:carol:1", "spike:user:carol:2"]


def test_spend_spike_by_cost(sqlite_store: Store) -> None:
    cfg = settings(spike={**SPIKE, "min_requests": 1000})
    audit_rows(sqlite_store, "erin", [NOW - timedelta(minutes=m) for m in range(5, 60, 10)], cost_nusd=CENT)
    audit_rows(sqlite_store, "erin", [NOW - timedelta(seconds=s) for s in range(0, 5)], cost_nusd=NANO // 2)
    ev, sent = evaluator(sqlite_store, cfg)
    ev.tick(NOW)
    assert [x.dedupe_key for x in sent] == ["spike:user:erin:1"]
    assert "$2.50" in sent[0].text


# ----------------------------------------------------------------------------- retries of failed deliveries


def test_failed_delivery_is_retried_by_one_instance_with_backoff(store: Store) -> None:
    store.set_budget("user", "alice", NANO, "day", actor="t")
    spend(store, "user", "alice", 600_000_000)
    a, sent_a = evaluator(store)
    b, sent_b = evaluator(store)
    a.tick(NOW)
    (alert,) = sent_a
    store.mark_alert(alert.dedupe_key, "failed", "URLError: refused")
    assert a.tick(NOW + timedelta(seconds=40)) == []  # retry checks run, but the backoff is 60 s
    later = NOW + timedelta(seconds=90)
    got = a.tick(later) + b.tick(later)
    assert len(got) == 1 and got[0].text == alert.text and got[0].blocks() == alert.blocks()
    row = store.get_alert(alert.dedupe_key)
    assert row is not None and row.attempts == 2 and row.status == "delivered"
    store.mark_alert(alert.dedupe_key, "failed", "again")
    assert len(a.tick(later + timedelta(minutes=5))) == 1
    store.mark_alert(alert.dedupe_key, "failed", "again")
    assert a.tick(later + timedelta(minutes=10)) == []  # gave up after 3 attempts


# ----------------------------------------------------------------------------- backstop


def test_window_is_whole_utc_days_up_to_now() -> None:
    assert window(utc(2026, 11, 25, 13, 5), 1) == (utc(2026, 11, 25), utc(2026, 11, 25, 13, 5))
    assert window(utc(2026, 3, 1, 0, 0, 1), 3) == (utc(2026, 2, 27), utc(2026, 3, 1, 0, 0, 1))


def test_cost_report_parsers_sum_every_bucket_in_documented_formats() -> None:
    openai_page = {"object": "page", "has_more": False, "next_page": None, "data": [
        {"object": "bucket", "start_time": 1, "end_time": 2, "results": [
            {"object": "organization.costs.result", "amount": {"value": 0.06, "currency": "usd"},
             "line_item": None, "project_id": None}]},
        {"object": "bucket", "start_time": 2, "end_time": 3, "results": []},
        {"object": "bucket", "start_time": 3, "end_time": 4, "results": [
            {"object": "organization.costs.result", "amount": {"value": 12.5, "currency": "usd"}},
            {"object": "organization.costs.result", "amount": {"value": 0.44, "currency": "usd"}}]},
    ]}
    assert openai_costs_usd(openai_page) == Decimal("13.00")
    anthropic_page = {"has_more": False, "next_page": None, "data": [
        {"starting_at": "2026-11-24T00:00:00Z", "ending_at": "2026-11-25T00:00:00Z",
         "results": [{"currency": "USD", "amount": "123.45", "workspace_id": None, "description": None}]},
        {"starting_at": "2026-11-25T00:00:00Z", "ending_at": "2026-11-26T00:00:00Z",
         "results": [{"currency": "USD", "amount": "0.5"}]},
    ]}
    assert anthropic_cost_usd(anthropic_page) == Decimal("1.2395")
    from spendgate.backstop import CostReportError

    with pytest.raises(CostReportError):
        openai_costs_usd({"error": {"message": "nope"}})
    with pytest.raises(CostReportError):
        anthropic_cost_usd({"data": [{"results": [{"currency": "EUR", "amount": "1"}]}]})


@pytest.fixture
def mock(_mock_provider_session: MockProvider) -> Iterator[MockProvider]:
    _mock_provider_session.reset()
    yield _mock_provider_session
    _mock_provider_session.reset()


def backstop_settings(mock: MockProvider, **bs: Any) -> Settings:
    prov = {p: {"api_key": "up", "upstream": mock.url, "verify_upstream_tls": False} for p in ("openai", "anthropic")}
    prov["openai"]["admin_api_key"] = "admin-openai-test"
    prov["anthropic"]["admin_api_key"] = "admin-anthropic-test"
    return parse_settings({"providers": prov, "alerts": {"backstop": bs}}, {})


def test_cost_client_reads_both_providers_from_the_mock(mock: MockProvider) -> None:
    cfg = backstop_settings(mock)
    mock.set_costs(openai_usd="12.34", anthropic_usd="5.678")
    since, until = window(NOW, 2)
    c = CostClient()
    openai_p, anthropic_p = cfg.provider("openai"), cfg.provider("anthropic")
    assert openai_p is not None and anthropic_p is not None
    assert c.fetch(openai_p, since, until) == Decimal("12.34")
    assert c.fetch(anthropic_p, since, until) == Decimal("5.678")
    o = mock.find(endpoint="costs")[-1]
    assert o.header("authorization") == "Bearer admin-openai-test"
    assert o.query_params["start_time"] == [str(int(since.timestamp()))]
    assert o.query_params["end_time"] == [str(int(until.timestamp()))]
    assert o.query_params["bucket_width"] == ["1d"]
    a = mock.find(endpoint="cost_report")[-1]
    assert a.header("x-api-key") == "admin-anthropic-test" and a.header("anthropic-version") == "2023-06-01"
    assert a.header("authorization") is None
    assert a.query_params["starting_at"] == ["2026-11-24T00:00:00Z"]
    assert a.query_params["ending_at"] == ["2026-11-25T13:30:00Z"]


@pytest.mark.parametrize(("reported", "attributed_usd", "budget", "expected"), [
    ("0", "0", "100", []),
    ("10", "10", "100", []),
    ("10.5", "10", "100", []),  # 4.8% apart, tolerance 20%
    ("13", "10", "100", ["mismatch"]),  # 23% apart
    ("10", "13", "100", ["mismatch"]),
    ("150", "140", "100", ["budget"]),
    ("150", "10", "100", ["budget", "mismatch"]),
    ("0.004", "0", "100", []),  # less than a cent apart
    ("5", "0", None, ["mismatch"]),
])
def test_backstop_evaluation_table(reported: str, attributed_usd: str, budget: str | None, expected: list[str]) -> None:
    bs: dict[str, Any] = {"tolerance": 0.2}
    if budget is not None:
        bs["budget_usd"] = budget
    cfg = parse_settings({"alerts": {"backstop": bs}}, {})
    got = Backstop(cfg, None, lambda a: True).evaluate(  # type: ignore[arg-type]  # pure: no store
        "openai", Decimal(reported), int(Decimal(attributed_usd) * NANO), utc(2026, 11, 25))
    assert [a.dedupe_key.split(":")[1] for a in got] == expected


def test_backstop_check_compares_with_gateway_totals_and_alerts_once_a_day(mock: MockProvider, store: Store) -> None:
    cfg = backstop_settings(mock, budget_usd=5, tolerance=0.2)
    audit_rows(store, "alice", [NOW - timedelta(hours=1)] * 4, cost_nusd=NANO // 4, provider="openai")  # $1.00
    audit_rows(store, "alice", [NOW - timedelta(days=2)], cost_nusd=50 * NANO, provider="openai")  # outside the window
    mock.set_costs(openai_usd="1.1", anthropic_usd="0")
    ev, sent = evaluator(store, cfg)
    bs = Backstop(cfg, store, ev.emit, clock=lambda: NOW)
    assert bs.check() == [] and sent == []
    assert bs.last["openai"].attributed_nusd == NANO and bs.last["openai"].reported_usd == Decimal("1.1")
    mock.set_costs(openai_usd="6", anthropic_usd="0.5")
    got = bs.check()
    assert sorted(a.dedupe_key for a in got) == ["backstop:budget:openai:2026-11-25", "backstop:mismatch:anthropic:2026-11-25",
                                                 "backstop:mismatch:openai:2026-11-25"]
    budget = next(a for a in got if "budget" in a.dedupe_key)
    assert "$6.00" in budget.text and "$5.00" in budget.text and "$1.00" in budget.text
    other_instance, sent2 = evaluator(store, cfg)
    assert Backstop(cfg, store, other_instance.emit, clock=lambda: NOW).check() == [] and sent2 == []
    assert bs.check() == []


def test_backstop_survives_an_unreachable_cost_api(sqlite_store: Store) -> None:
    port = socket.socket()
    port.bind(("127.0.0.1", 0))
    url = f"https://127.0.0.1:{port.getsockname()[1]}"
    port.close()
    cfg = parse_settings({"providers": {"openai": {"upstream": url, "verify_upstream_tls": False,
                                                   "admin_api_key": "admin"}}, "alerts": {"backstop": {"budget_usd": 1}}}, {})
    assert Backstop(cfg, sqlite_store, lambda a: True).check() == []
