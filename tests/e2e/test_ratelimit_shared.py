"""`--rpm` across instances (issue 12): two `spendgate serve` processes on one PostgreSQL database
hold one key to its requests per minute in total, not once per instance.

Skipped without PostgreSQL on 127.0.0.1:5432.
"""

from __future__ import annotations

import threading
import time
from collections import Counter
from collections.abc import Iterator
from typing import Any

import openai
import pytest

from tests.rig.gateway import GatewayProcess
from tests.rig.ledger import Ledger
from tests.rig.mock_provider import MockProvider

pytestmark = pytest.mark.postgres

RPM = 30
MSGS = [{"role": "user", "content": "Say hi."}]


@pytest.fixture(scope="module")
def pair(tmp_path_factory: pytest.TempPathFactory, _mock_provider_session: MockProvider,
         pg_module_url: str) -> Iterator[tuple[GatewayProcess, GatewayProcess]]:
    """Two gateways on one (migrated) PostgreSQL database, started side by side."""
    gws = tuple(GatewayProcess(tmp_path_factory.mktemp(f"e2e-rpm-{n}"), _mock_provider_session.url,
                               db_url=pg_module_url, name=f"rpm-{n}") for n in "ab")
    starting = [threading.Thread(target=g.start) for g in gws]
    for t in starting:
        t.start()
    for t in starting:
        t.join()
    try:
        assert all(g.running for g in gws), [g.log_tail() for g in gws]
        yield gws[0], gws[1]
    finally:
        for g in gws:
            g.stop()


@pytest.fixture(autouse=True)
def _attach_logs(request: pytest.FixtureRequest, pair: tuple[GatewayProcess, GatewayProcess]) -> None:
    request.node._spendgate_gateways = list(pair)  # conftest attaches their logs to a failing test's report


@pytest.fixture(scope="module")
def lg(pair: tuple[GatewayProcess, GatewayProcess]) -> Iterator[Ledger]:
    ledger = Ledger.of(pair[0])
    yield ledger
    ledger.close()


def send(client: Any) -> tuple[int, str | None]:
    """One small chat request: (status, error code)."""
    try:
        client.chat.completions.create(model="gpt-4o", messages=MSGS, max_tokens=4)
        return 200, None
    except openai.RateLimitError as e:
        assert 1 <= int(e.response.headers["retry-after"]) <= 60
        return 429, e.code


def test_rpm_holds_across_two_instances_sharing_postgres(
        pair: tuple[GatewayProcess, GatewayProcess], lg: Ledger, mock_provider: MockProvider) -> None:
    """60 requests alternating between the two gateways within a few seconds: 30 served, 30 refused."""
    key = lg.key("rpm-shared", rpm=RPM)["key"]
    clients = [g.openai_client(key) for g in pair]
    started = time.monotonic()
    results = [send(clients[i % 2]) for i in range(2 * RPM)]
    assert time.monotonic() - started < 30, "the requests must all fall in one minute's window"
    got = Counter(results)
    assert got == Counter({(200, None): RPM, (429, "spendgate_rate_limited"): RPM}), got
    assert len(mock_provider.requests) == RPM, "a rate-limited request must not reach the provider"
    rows = lg.settled("rpm-shared", 2 * RPM)
    assert Counter((r["outcome"], r["status_code"]) for r in rows) == Counter(
        {("completed", 200): RPM, ("blocked_rate", 429): RPM})
    assert len({r["instance_id"] for r in rows}) == 2


def test_rpm_on_one_instance_alone_also_stops_at_the_limit(
        pair: tuple[GatewayProcess, GatewayProcess], lg: Ledger, mock_provider: MockProvider) -> None:
    key = lg.key("rpm-alone", rpm=RPM)["key"]
    client = pair[0].openai_client(key)
    results = [send(client) for _ in range(RPM + 10)]
    assert results[:RPM] == [(200, None)] * RPM
    assert results[RPM:] == [(429, "spendgate_rate_limited")] * 10
    assert len(mock_provider.requests) == RPM
    rows = lg.settled("rpm-alone", RPM + 10)
    assert Counter(r["outcome"] for r in rows) == Counter({"completed": RPM, "blocked_rate": 10})
