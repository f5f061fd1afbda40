"""Caps through real `spendgate serve` processes and real SDK clients: concurrent bursts against a
cap on SQLite and on two gateways sharing PostgreSQL, team and global caps, refusals the SDKs show,
reservations of a crashed gateway released after their expiry, and the per-key rate limit."""

from __future__ import annotations

import re
import threading
import time
from collections import Counter
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from datetime import datetime, timedelta, timezone
from decimal import Decimal
from typing import Any

import anthropic
import httpx
import openai
import pytest

from spendgate.store import Database
from spendgate.store.audit import AuditLog
from spendgate.store.budgets import BudgetLedger
from tests.rig.gateway import GatewayProcess, Inline
from tests.rig.mock_provider import MockProvider

UTC = timezone.utc
CLAUDE = "claude-sonnet-4-20250514"
# $0.0001 per prompt token, $0.01 per output token. The mock streams 5 tokens and bills
# 10 + len(body) / 4 prompt tokens (~40): a request costs about $0.054. Asking for max_tokens=6
# makes the gateway's estimate about $0.061: close to, and above, the actual cost.
PRICE = Inline(input=100.0, output=10000.0)
PRICES = {"prices": {"overrides": {"openai:gpt-4o": PRICE, f"anthropic:{CLAUDE}": PRICE}}}
MAX_TOKENS = 6
# One request's estimation error: 1 output token ($0.01) minus the prompt-count difference (< $0.01).
ONE_ESTIMATE_ERROR = Decimal("0.02")
MSGS = [{"role": "user", "content": "Count to five."}]
TEXT = "Hello from the mock provider"  # the mock's 5 streamed pieces


# --------------------------------------------------------------------------- helpers


@pytest.fixture(scope="module")
def gw(tmp_path_factory: pytest.TempPathFactory, _mock_provider_session: MockProvider) -> Iterator[GatewayProcess]:
    g = GatewayProcess(tmp_path_factory.mktemp("e2e-budgets"), _mock_provider_session.url, name="budgets",
                       overrides=PRICES)
    g.start()
    yield g
    g.stop()


TTL = 3  # seconds; [budgets] reservation_ttl_seconds of the gateway the crash tests use


@pytest.fixture(scope="module")
def ttl_gw(tmp_path_factory: pytest.TempPathFactory, _mock_provider_session: MockProvider) -> Iterator[GatewayProcess]:
    g = GatewayProcess(tmp_path_factory.mktemp("e2e-budgets-ttl"), _mock_provider_session.url, name="short-ttl",
                       overrides={**PRICES, "budgets": {"reservation_ttl_seconds": TTL}})
    g.start()
    yield g
    g.stop()


@pytest.fixture
def attach(request: pytest.FixtureRequest) -> Callable[..., None]:
    def _attach(*gws: GatewayProcess) -> None:
        request.node._spendgate_gateways = list(gws)  # conftest attaches their logs to a failing test's report
    return _attach


def budget_row(gw: GatewayProcess, scope: str, name: str) -> dict[str, Any]:
    """The cap's row as `spendgate budgets list --format json` shows it."""
    rows = gw.cli_json("budgets", "list")
    found = [r for r in rows if (r["scope"], r["name"]) == (scope, name)]
    assert len(found) == 1, rows
    return found[0]  # type: ignore[no-any-return]


class _Db:
    """The gateway's database, read directly: its budgets and its audit log."""

    def __init__(self, url: str) -> None:
        self.database = Database(url)
        self.ledger = BudgetLedger(self.database)
        self.audit = AuditLog(self.database)

    def close(self) -> None:
        self.database.close()


_stores: dict[str, _Db] = {}


def db(gw: GatewayProcess) -> _Db:
    """The gateway's database, read directly: polling through the CLI costs a second a call."""
    if gw.db_url not in _stores:
        _stores[gw.db_url] = _Db(gw.db_url)
    return _stores[gw.db_url]


@pytest.fixture(scope="module", autouse=True)
def _close_stores() -> Iterator[None]:
    yield
    for s in _stores.values():
        s.close()
    _stores.clear()


def held_nusd(gw: GatewayProcess, scope: str, name: str) -> tuple[int, int]:
    """(spent, reserved) of a cap in its current period, in nano-USD."""
    for b in db(gw).ledger.budget_status():
        if (b["scope"], b["name"]) == (scope, name):
            return int(b["spent_nusd"]), int(b["reserved_nusd"])
    raise AssertionError(f"no {scope} cap {name}")


def settled(gw: GatewayProcess, user: str, n: int, timeout: float = 20.0) -> list[Any]:
    """The user's n audit rows once every one is complete (and their own cap, if any, holds nothing)."""
    deadline = time.monotonic() + timeout
    capped = any((b["scope"], b["name"]) == ("user", user) for b in db(gw).ledger.budget_status())
    while True:
        rows = db(gw).audit.rows(user=user, limit=None)
        if len(rows) == n and all(r.outcome != "incomplete" for r in rows) and (
                not capped or held_nusd(gw, "user", user)[1] == 0):
            return rows
        if time.monotonic() > deadline:
            raise AssertionError(f"{user}: {len(rows)} rows, outcomes {Counter(r.outcome for r in rows)}")
        time.sleep(0.1)


def usd(nano: int | None) -> Decimal:
    return Decimal(nano or 0) / Decimal(10**9)


def seconds_to(when: datetime) -> float:
    return (when - datetime.now(UTC)).total_seconds()


def next_midnight() -> datetime:
    now = datetime.now(UTC)
    return datetime(now.year, now.month, now.day, tzinfo=UTC) + timedelta(days=1)


def stream_chat(client: Any, max_tokens: int = MAX_TOKENS) -> str:
    stream = client.chat.completions.create(model="gpt-4o", messages=MSGS, max_tokens=max_tokens, stream=True)
    return "".join(c.choices[0].delta.content or "" for c in stream if c.choices)


def burst(gws: list[GatewayProcess], key: str, n: int) -> list[tuple[str, Any]]:
    """n streaming chat requests at once, spread over the gateways; ("ok", text) or ("429", error)."""
    clients = [gws[i % len(gws)].openai_client(key, timeout=60) for i in range(n)]
    go = threading.Barrier(n)

    def one(client: Any) -> tuple[str, Any]:
        go.wait()
        try:
            return "ok", stream_chat(client)
        except openai.RateLimitError as e:
            return "429", e

    with ThreadPoolExecutor(n) as pool:
        return list(pool.map(one, clients))


def check_burst(gws: list[GatewayProcess], key: str, user: str, results: list[tuple[str, Any]],
                mock: MockProvider, cap: Decimal) -> None:
    ok = [r for kind, r in results if kind == "ok"]
    refused = [e for kind, e in results if kind == "429"]
    assert len(ok) + len(refused) == len(results)
    assert all(text == TEXT for text in ok)
    assert len(mock.requests) == len(ok), "a refused request must never reach the provider"
    for e in refused:
        assert e.status_code == 429 and e.code == "spendgate_budget_exceeded"
        assert f"user {user}" in e.message and "cap" in e.message
        assert abs(int(e.response.headers["retry-after"]) - seconds_to(next_midnight())) <= 5

    rows = settled(gws[0], user, len(results))
    outcomes = Counter(r.outcome for r in rows)
    assert outcomes == Counter({"completed": len(ok), "blocked_cap": len(refused)}), outcomes
    assert all(r.status_code == 429 and r.cost_nusd is None for r in rows if r.outcome == "blocked_cap")
    per_instance = Counter(r.instance_id for r in rows)  # each gateway took its share of the burst
    assert sorted(per_instance.values()) == [len(results) // len(gws)] * len(gws), per_instance
    total = usd(sum(r.cost_nusd for r in rows if r.outcome == "completed"))
    assert total <= cap + ONE_ESTIMATE_ERROR, f"spent {total} against a {cap} cap"
    # Refused only when the request really did not fit: held (spent + reserved) + its estimate > cap.
    estimates = []
    for e in refused:
        m = re.search(r"(?:estimated \$([0-9.]+)\): )?spent \$([0-9.]+) of \$([0-9.]+)", e.message)
        assert m, e.message
        held, named_cap = Decimal(m.group(2)), Decimal(m.group(3))
        est = Decimal(m.group(1) or 0)
        assert named_cap == cap and held + est > cap, e.message
        estimates.append(est)
    # ...so at least as many were admitted as there is room for estimates in the cap.
    assert len(ok) >= int(cap / max(estimates)), (len(ok), max(estimates))
    b = budget_row(gws[-1], "user", user)
    assert (Decimal(b["spent_usd"]), Decimal(b["reserved_usd"]), Decimal(b["cap_usd"])) == (total, 0, cap)


# --------------------------------------------------------------------------- concurrency


def test_64_concurrent_streams_against_a_1_dollar_cap_sqlite(gw: GatewayProcess, mock_provider: MockProvider,
                                                             attach: Callable[..., None]) -> None:
    attach(gw)
    key = gw.create_key("burst", cap="1.00", period="day")["key"]
    mock_provider.set_default("slow", delay_ms=150)  # every admitted stream is still open when the last arrives
    results = burst([gw], key, 64)
    check_burst([gw], key, "burst", results, mock_provider, Decimal("1.00"))


@pytest.mark.postgres
def test_64_concurrent_streams_against_a_1_dollar_cap_two_gateways_on_postgres(
        gateway_factory: Callable[..., GatewayProcess], pg_url: str, mock_provider: MockProvider) -> None:
    gw1 = gateway_factory(db_url=pg_url, overrides=PRICES, name="pg1")
    gw2 = gateway_factory(db_url=pg_url, overrides=PRICES, name="pg2")
    key = gw1.create_key("pgburst", cap="1.00", period="day")["key"]
    mock_provider.set_default("slow", delay_ms=150)
    results = burst([gw1, gw2], key, 64)
    check_burst([gw1, gw2], key, "pgburst", results, mock_provider, Decimal("1.00"))


# --------------------------------------------------------------------------- refusals the SDKs show


def test_request_whose_estimate_passes_the_remaining_budget_never_goes_upstream(
        gw: GatewayProcess, mock_provider: MockProvider, attach: Callable[..., None]) -> None:
    attach(gw)
    key = gw.create_key("tight", cap="0.05", period="day")["key"]
    resets = next_midnight()

    with pytest.raises(openai.RateLimitError) as oi:  # estimate ~$0.061 > $0.05 left
        gw.openai_client(key).chat.completions.create(model="gpt-4o", messages=MSGS, max_tokens=MAX_TOKENS, stream=True)
    e = oi.value
    assert e.status_code == 429 and e.code == "spendgate_budget_exceeded"
    for part in ("cap", "user tight", "spent $0 of $0.05", "(estimated $0.06", resets.isoformat()):
        assert part in str(e), (part, str(e))
    assert abs(int(e.response.headers["retry-after"]) - seconds_to(resets)) <= 5
    assert e.response.headers["x-spendgate-request-id"].startswith("sgr_")

    with pytest.raises(anthropic.RateLimitError) as ai:
        gw.anthropic_client(key).messages.create(model=CLAUDE, max_tokens=MAX_TOKENS, messages=MSGS)
    a = ai.value
    assert a.status_code == 429 and a.body["error"]["type"] == "rate_limit_error"  # type: ignore[index]
    for part in ("cap", "user tight", "spent $0 of $0.05", resets.isoformat()):
        assert part in a.message, (part, a.message)
    assert abs(int(a.response.headers["retry-after"]) - seconds_to(resets)) <= 5
    assert mock_provider.requests == [], "refused before upstream"

    # A smaller request fits, and the answer says what is left.
    mock_provider.set_next("ok", chunks=4)
    raw = gw.openai_client(key).chat.completions.with_raw_response.create(
        model="gpt-4o", messages=MSGS, max_tokens=4, stream=True)
    remaining = Decimal(raw.headers["x-spendgate-budget-remaining-usd"])
    assert Decimal("0") < remaining < Decimal("0.01")  # $0.05 minus an estimate of ~$0.041
    assert "".join(c.choices[0].delta.content or "" for c in raw.parse() if c.choices) == "Hello from the mock"
    rows = settled(gw, "tight", 3)
    assert Counter(r.outcome for r in rows) == Counter({"blocked_cap": 2, "completed": 1})
    assert all(r.status_code == 429 for r in rows if r.outcome == "blocked_cap")
    assert len(mock_provider.requests) == 1


def test_team_cap_binds_when_the_users_own_cap_does_not(gw: GatewayProcess, mock_provider: MockProvider,
                                                        attach: Callable[..., None]) -> None:
    attach(gw)
    gw.cli("budgets", "set", "team", "squad", "--cap", "0.10", "--period", "week")
    ann = gw.create_key("ann", team="squad", cap="5", period="day")["key"]
    ben = gw.create_key("ben", team="squad")["key"]  # no cap of his own
    assert stream_chat(gw.openai_client(ann)) == TEXT
    settled(gw, "ann", 1)
    for key, user in ((ben, "ben"), (ann, "ann")):
        with pytest.raises(openai.RateLimitError) as oi:
            stream_chat(gw.openai_client(key))
        assert "team squad" in oi.value.message and "week" in oi.value.message
    assert len(mock_provider.requests) == 1
    ann_rows = settled(gw, "ann", 2)
    assert Counter(r.outcome for r in ann_rows) == Counter({"completed": 1, "blocked_cap": 1})
    (ben_row,) = settled(gw, "ben", 1)
    assert ben_row.outcome == "blocked_cap"
    cost = next(r.cost_nusd for r in ann_rows if r.outcome == "completed")
    assert held_nusd(gw, "team", "squad") == held_nusd(gw, "user", "ann") == (cost, 0)


def test_global_cap_binds_when_the_users_own_cap_does_not(gw: GatewayProcess, mock_provider: MockProvider,
                                                          attach: Callable[..., None]) -> None:
    attach(gw)
    gw.cli("budgets", "set", "global", "global", "--cap", "0.10", "--period", "month")
    try:
        gus = gw.create_key("gus", team="solo", cap="5", period="day")["key"]
        assert stream_chat(gw.openai_client(gus)) == TEXT
        with pytest.raises(openai.RateLimitError) as oi:
            stream_chat(gw.openai_client(gus))
        assert "Spend cap for global" in oi.value.message and "month" in oi.value.message
        now = datetime.now(UTC)
        first_of_next = datetime(now.year + (now.month == 12), now.month % 12 + 1, 1, tzinfo=UTC)
        assert abs(int(oi.value.response.headers["retry-after"]) - seconds_to(first_of_next)) <= 5
        assert len(mock_provider.requests) == 1
    finally:  # the other tests on this gateway must not meet it
        gw.cli("budgets", "set", "global", "global", "--cap", "1000000", "--period", "month")


# --------------------------------------------------------------------------- crashes and expiry


def test_reservations_of_a_killed_gateway_are_released_after_their_expiry(
        ttl_gw: GatewayProcess, mock_provider: MockProvider, attach: Callable[..., None]) -> None:
    gw, ttl = ttl_gw, TTL
    attach(gw)
    key = gw.create_key("crash", cap="1", period="day")["key"]
    mock_provider.set_default("hang", hang_s=15)

    def one(_: int) -> str:
        try:
            return stream_chat(gw.openai_client(key, timeout=30))
        except (openai.APIError, httpx.HTTPError) as e:
            return type(e).__name__

    with ThreadPoolExecutor(4) as pool:
        futures = [pool.submit(one, i) for i in range(4)]
        mock_provider.wait_for(4, timeout=15, finished=False)  # all four reserved and upstream
        gw.kill()
        killed_at = time.monotonic()
        assert not any(f.result().startswith("Hello") for f in futures)

    held = budget_row(gw, "user", "crash")
    assert Decimal(held["reserved_usd"]) > Decimal("0.2"), held  # 4 x ~$0.061, nobody left to settle them
    assert Decimal(held["spent_usd"]) == 0

    mock_provider.set_default("ok")
    gw.start()
    while held_nusd(gw, "user", "crash")[1] != 0:
        assert time.monotonic() - killed_at < ttl + 10, "reservations not released after their expiry"
        time.sleep(0.1)
    b = budget_row(gw, "user", "crash")
    assert (Decimal(b["reserved_usd"]), Decimal(b["spent_usd"])) == (0, 0), b
    raw = gw.openai_client(key).chat.completions.with_raw_response.create(
        model="gpt-4o", messages=MSGS, max_tokens=MAX_TOKENS)
    assert Decimal(raw.headers["x-spendgate-budget-remaining-usd"]) > Decimal("0.93")  # the whole dollar is back


def test_a_live_request_keeps_its_reservation_past_the_ttl(
        ttl_gw: GatewayProcess, mock_provider: MockProvider, attach: Callable[..., None]) -> None:
    """The TTL is for reservations whose gateway died. A stream that simply runs longer than
    the TTL still holds its estimate: releasing it would let the next request pass the cap."""
    gw, ttl = ttl_gw.start(), TTL  # (running again after the crash test, or on its own)
    attach(gw)
    key = gw.create_key("longrun", cap="0.10", period="day")["key"]
    mock_provider.set_next("slow", delay_ms=1200)  # 5 pieces: the stream lasts ~6 s

    with ThreadPoolExecutor(1) as pool:
        long = pool.submit(stream_chat, gw.openai_client(key))
        first = mock_provider.wait_for(1, timeout=10, finished=False)[0]
        time.sleep(ttl + 1.5)  # past the TTL and one maintenance pass (every ttl/3, >= 1 s); not a timing assertion
        assert not first.finished.is_set(), "the long stream must still be running"
        with pytest.raises(openai.RateLimitError):  # ~$0.061 in flight + ~$0.061 > $0.10
            stream_chat(gw.openai_client(key))
        assert long.result(timeout=30) == TEXT
    rows = settled(gw, "longrun", 2)
    assert usd(sum(r.cost_nusd or 0 for r in rows)) <= Decimal("0.10") + ONE_ESTIMATE_ERROR


# --------------------------------------------------------------------------- rate limit and allow-list


def test_rpm_limit_and_model_allow_list(gw: GatewayProcess, mock_provider: MockProvider,
                                        attach: Callable[..., None]) -> None:
    attach(gw)
    started = datetime.now(UTC)
    key = gw.create_key("rapid", rpm=3, models=["gpt-4o*"])["key"]
    client = gw.openai_client(key)
    for _ in range(3):
        client.chat.completions.create(model="gpt-4o", messages=MSGS, max_tokens=MAX_TOKENS)
    with pytest.raises(openai.RateLimitError) as oi:
        client.chat.completions.create(model="gpt-4o", messages=MSGS, max_tokens=MAX_TOKENS)
    e = oi.value
    assert e.code == "spendgate_rate_limited" and "3 requests per minute" in e.message
    assert 1 <= int(e.response.headers["retry-after"]) <= 60
    with pytest.raises(anthropic.RateLimitError):
        gw.anthropic_client(key).messages.create(model=CLAUDE, max_tokens=MAX_TOKENS, messages=MSGS)

    picky = gw.create_key("picky", models=["gpt-4o-mini*"])["key"]
    with pytest.raises(openai.PermissionDeniedError) as pi:
        gw.openai_client(picky).chat.completions.create(model="gpt-4o", messages=MSGS)
    assert pi.value.code == "spendgate_model_not_allowed"
    assert len(mock_provider.requests) == 3
    settled(gw, "rapid", 5)
    settled(gw, "picky", 1)

    rows = gw.cli_json("audit", "--since", started.isoformat(), "--limit", "1000")  # as an admin reads it
    got = Counter((r["user"], r["outcome"], r["status_code"]) for r in rows if r["user"] in ("rapid", "picky"))
    assert got == Counter({("rapid", "completed", 200): 3, ("rapid", "blocked_rate", 429): 2,
                           ("picky", "blocked_policy", 403): 1}), got


def test_stream_through_a_capped_key_arrives_whole_on_a_reused_connection(
        gw: GatewayProcess, mock_provider: MockProvider, attach: Callable[..., None]) -> None:
    """The gateway asks upstream for the usage chunk and strips it before the client sees it.
    Regression: when that chunk arrived in a read of its own, the stream callback returned b"",
    which mitmproxy writes as an empty HTTP/1.1 chunk — `0\\r\\n\\r\\n`, the end of the body — so
    the client's stream stopped before `data: [DONE]`, and that event's chunk landed in front of
    the next response on the same keep-alive connection."""
    attach(gw)
    key = gw.create_key("sse", cap="5", period="day")["key"]
    body = {"model": "gpt-4o", "messages": MSGS, "max_tokens": MAX_TOKENS, "stream": True}
    with gw.httpx_client(key) as client:
        for _ in range(3):
            with client.stream("POST", "https://api.openai.com/v1/chat/completions", json=body) as r:
                raw = b"".join(r.iter_bytes())
            assert r.status_code == 200
            assert raw.endswith(b"data: [DONE]\n\n"), raw[-200:]
            assert b'"usage"' not in raw  # the client did not ask for it
    assert all(rec.include_usage and rec.usage_sent for rec in mock_provider.wait_for(3))
