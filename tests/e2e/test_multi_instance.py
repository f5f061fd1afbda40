"""Two `spendgate serve` processes on one PostgreSQL database: keys minted or revoked through the
CLI are honoured by both, within a second, without restarting either."""

from __future__ import annotations

import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor

import httpx
import pytest

from tests.rig.gateway import UPSTREAM_KEYS, GatewayProcess
from tests.rig.mock_provider import MockProvider

pytestmark = pytest.mark.postgres

MODELS_URL = "https://api.openai.com/v1/models"
WITHIN = 1.0


def caller(gw: GatewayProcess, key: str) -> Callable[[], httpx.Response]:
    client = gw.httpx_client(key)  # kept alive across calls
    return lambda: client.get(MODELS_URL)


def test_two_instances_share_keys_and_revocations(
    gateway_factory: Callable[..., GatewayProcess], pg_url: str, mock_provider: MockProvider
) -> None:
    gw1 = gateway_factory(db_url=pg_url, name="pg-a")  # migrates the empty database
    gw2 = gateway_factory(db_url=pg_url, name="pg-b")
    assert gw1.db_url == gw2.db_url == pg_url and gw1.port != gw2.port

    # minted through each instance's CLI (same database), used through both processes
    with ThreadPoolExecutor(2) as pool:
        a, b = pool.map(lambda args: args[0].create_key(args[1]), [(gw1, "alice"), (gw2, "bob")])
    calls = {
        (gw.name, who): caller(gw, k["key"]) for gw in (gw1, gw2) for who, k in (("alice", a), ("bob", b))
    }
    for name, call in calls.items():
        r = call()
        assert r.status_code == 200, (name, r.text)
    recs = mock_provider.wait_for(4)
    assert all(r.headers["authorization"] == f"Bearer {UPSTREAM_KEYS['openai']}" for r in recs)

    # revoked through one instance's CLI: both processes refuse it within a second
    gw2.revoke_key(a["key_id"])
    returned = time.monotonic()
    alice = [calls[(gw1.name, "alice")], calls[(gw2.name, "alice")]]
    last: list[httpx.Response] = []
    refused_at = None
    served_meanwhile = 0  # requests still served while the revocation propagated (<= 1 s)
    while (t := time.monotonic()) <= returned + WITHIN:
        last = [c() for c in alice]
        served_meanwhile += sum(r.status_code == 200 for r in last)
        if all(r.status_code == 403 for r in last):
            refused_at = t - returned  # when the successful round of checks started
            break
        time.sleep(0.05)
    assert refused_at is not None, [(r.status_code, r.text[:200]) for r in last]
    assert all(r.json()["error"]["code"] == "spendgate_key_revoked" for r in last)
    # bob is untouched on both
    assert calls[(gw1.name, "bob")]().status_code == 200
    assert calls[(gw2.name, "bob")]().status_code == 200

    # both instances audit into the shared database: every served request has its row
    expected = ["alice"] * (2 + served_meanwhile) + ["bob"] * 4
    deadline = time.monotonic() + 5
    while True:
        rows = gw1.cli_json("audit", "--outcome", "completed", "--limit", "100")
        done = sorted(r["user"] for r in rows)
        if done == expected or time.monotonic() > deadline:
            break
        time.sleep(0.2)
    assert done == expected
