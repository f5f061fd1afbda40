"""A gateway killed with SIGKILL mid-traffic: the audit log still holds every request that
reached the provider, and the unfinished ones say `incomplete`."""

from __future__ import annotations

import signal
import time
from collections import Counter
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor

import httpx
import pytest

from tests.rig.gateway import GatewayProcess
from tests.rig.mock_provider import MockProvider

IN_FLIGHT = 50


@pytest.mark.slow
@pytest.mark.parametrize("store", ["sqlite", pytest.param("postgres", marks=pytest.mark.postgres)])
def test_sigkill_with_50_in_flight_leaves_no_request_unrecorded(
        gateway_factory: Callable[..., GatewayProcess], mock_provider: MockProvider, store: str,
        request: pytest.FixtureRequest) -> None:
    # On PostgreSQL a batch is one autocommitted call (`store.pgbatch`): its rows are there, or its
    # requests were never let go upstream.
    db = {"db_url": request.getfixturevalue("pg_url")} if store == "postgres" else {}
    # A 1 s staleness horizon so the restart below is allowed to close the dead gateway's rows.
    gw = gateway_factory(overrides={"budgets": {"reservation_ttl_seconds": 1}}, **db)
    key = gw.create_key("kim", team="t-crash")["key"]
    # The upstream holds every request until the gateway is gone (the mock then drops it).
    mock_provider.set_default("hang", hang_s=30)

    def one(i: int) -> str:
        # Each request carries its own User-Agent, which the audit row records and the mock
        # sees: that is how a row is matched to the request the provider received.
        try:
            r = client.post("https://api.openai.com/v1/chat/completions",
                            json={"model": "gpt-4o", "messages": [{"role": "user", "content": f"request {i}"}]},
                            headers={"user-agent": f"crash-test/{i}"})
            return f"answered {r.status_code}"
        except httpx.HTTPError as e:
            return type(e).__name__

    limits = httpx.Limits(max_connections=IN_FLIGHT + 10)  # one connection per request in flight
    with gw.httpx_client(key, timeout=30, limits=limits) as client, ThreadPoolExecutor(IN_FLIGHT) as pool:
        futures = [pool.submit(one, i) for i in range(IN_FLIGHT)]
        received = mock_provider.wait_for(IN_FLIGHT, timeout=30, finished=False)
        assert not any(f.done() for f in futures), "all requests must still be in flight at the kill"
        gw.kill()
        assert gw.proc is not None and gw.proc.returncode == -signal.SIGKILL
        outcomes = Counter(f.result() for f in futures)
    assert not any(o.startswith("answered") for o in outcomes), outcomes
    assert len(mock_provider.requests) == IN_FLIGHT

    time.sleep(1.2)  # past the staleness horizon, not a timing assertion
    mock_provider.set_default("ok")
    gw.start()

    rows = gw.cli_json("audit", "--limit", "100000")
    assert len(rows) == IN_FLIGHT, f"one row per request the provider received, no more: {len(rows)}"
    got = Counter(r["user_agent"] for r in rows)
    want = Counter(rec.headers["user-agent"] for rec in received)
    assert got == want, f"missing: {want - got}, unexpected: {got - want}"
    for r in rows:
        assert r["outcome"] == "incomplete", r
        assert r["ended_at"] is None and r["status_code"] is None
        assert (r["user"], r["team"], r["provider"], r["model_requested"]) == ("kim", "t-crash", "openai", "gpt-4o")
        assert r["error"] == "gateway stopped before the request ended", r
    assert "marked incomplete" in gw.log_text()

    # The restarted gateway records new traffic normally, next to the dead one's rows.
    with gw.httpx_client(key) as h:
        r = h.post("https://api.openai.com/v1/chat/completions",
                   json={"model": "gpt-4o", "messages": [{"role": "user", "content": "after"}]})
    assert r.status_code == 200
    deadline = time.monotonic() + 10
    while True:
        after = {x["id"]: x for x in gw.cli_json("audit", "--limit", "100000")}
        row = after.get(r.headers["x-spendgate-request-id"])
        if (row and row["ended_at"]) or time.monotonic() > deadline:
            break
        time.sleep(0.1)
    assert row is not None and row["outcome"] == "completed"
    assert sum(1 for x in after.values() if x["outcome"] == "incomplete") == IN_FLIGHT
