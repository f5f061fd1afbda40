"""A store that goes away: requests get 503 (fail closed), nothing unaudited goes upstream,
the gateway keeps running, and the refused request's audit row lands once the store is back."""

from __future__ import annotations

import time

import psycopg
import pytest

from tests.conftest import PG_ADMIN_URL


def _set_db_reachable(name: str, reachable: bool) -> None:
    with psycopg.connect(PG_ADMIN_URL, autocommit=True) as admin:
        admin.execute(f'ALTER DATABASE "{name}" ALLOW_CONNECTIONS {"true" if reachable else "false"}')
        if not reachable:
            admin.execute("SELECT pg_terminate_backend(pid) FROM pg_stat_activity WHERE datname = %s", (name,))


def _ask(gw, key):  # type: ignore[no-untyped-def]
    with gw.httpx_client(key) as c:
        return c.post("https://api.openai.com/v1/chat/completions",
                      json={"model": "gpt-4o", "messages": [{"role": "user", "content": "hi"}]})


@pytest.mark.parametrize("capped", [False, True])
def test_store_down_fails_closed_and_recovers(gateway_factory, pg_url, mock_provider, capped):  # type: ignore[no-untyped-def]
    gw = gateway_factory(db_url=pg_url)
    key = gw.create_key("dora", **({"cap": "100", "period": "day"} if capped else {}))["key"]
    assert _ask(gw, key).status_code == 200
    seen_before = len(mock_provider.requests)
    db = pg_url.rsplit("/", 1)[1]
    _set_db_reachable(db, False)
    try:
        r = _ask(gw, key)
        assert r.status_code == 503, r.text
        assert r.json()["error"]["code"] == "spendgate_store_unavailable"
        refused_id = r.headers["x-spendgate-request-id"]
        assert len(mock_provider.requests) == seen_before, "a request went upstream without its audit row"
        assert gw.running
    finally:
        _set_db_reachable(db, True)
    deadline = time.monotonic() + 15
    while True:
        r = _ask(gw, key)
        if r.status_code == 200 or time.monotonic() > deadline:
            break
        time.sleep(0.3)
    assert r.status_code == 200, r.text
    # The refusal itself is on the record, written late once the store came back.
    deadline = time.monotonic() + 15
    rows = []
    while time.monotonic() < deadline:
        rows = [x for x in gw.cli_json("audit", "--limit", "100") if x["id"] == refused_id]
        if rows:
            break
        time.sleep(0.5)
    assert rows and rows[0]["outcome"] == "gateway_error" and rows[0]["status_code"] == 503
    secrets_in_log = [key, key.split("_")[-1]]
    assert not any(s in gw.log_text() for s in secrets_in_log)
