"""Key lifecycle against a running `spendgate serve`, driven only through the CLI: a fresh key
usable at once, revocation within a second, rotation with a grace period, expiry; and the CLI
refusing a database whose schema is missing or behind until `spendgate db upgrade` has run."""

from __future__ import annotations

import re
import sqlite3
import time
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from datetime import datetime, timedelta, timezone
from pathlib import Path
from typing import Any

import httpx
import pytest

from tests.rig.gateway import GatewayError, GatewayProcess
from tests.rig.mock_provider import MockProvider

MODELS_URL = "https://api.openai.com/v1/models"
POLL = 0.05
WITHIN = 1.0  # the contract: effective on every instance within 1 s


@pytest.fixture(scope="module")
def gw(tmp_path_factory: pytest.TempPathFactory, _mock_provider_session: MockProvider) -> Iterator[GatewayProcess]:
    g = GatewayProcess(tmp_path_factory.mktemp("e2e-keys"), _mock_provider_session.url, name="keys")
    g.start()
    yield g
    g.stop()


@pytest.fixture(autouse=True)
def _attach_gateway_log(request: pytest.FixtureRequest, gw: GatewayProcess, mock_provider: MockProvider) -> None:
    request.node._spendgate_gateways = [gw]


def mint(gw: GatewayProcess, *users: str) -> list[dict[str, Any]]:
    """`keys create` for each user, run side by side (each CLI call is a separate process)."""
    with ThreadPoolExecutor(len(users)) as pool:
        return list(pool.map(gw.create_key, users))


def via_proxy(gw: GatewayProcess, key: str) -> Callable[[], httpx.Response]:
    """One kept-alive client with the key in the proxy URL: revocation must reach open connections too."""
    client = gw.httpx_client(key)
    return lambda: client.get(MODELS_URL)


def via_header(gw: GatewayProcess, key: str) -> Callable[[], httpx.Response]:
    client = gw.httpx_client(None)
    return lambda: client.get(MODELS_URL, headers={"Authorization": f"Bearer {key}"})


def poll_until(pred: Callable[[], bool], deadline: float) -> float | None:
    """Seconds from now to the start of the first check of `pred()` that held (checks every
    50 ms), or None if none did among the checks started by `deadline`."""
    start = time.monotonic()
    while True:
        t = time.monotonic()
        if t > deadline:
            return None
        if pred():
            return t - start
        time.sleep(POLL)


def code_of(r: httpx.Response) -> str | None:
    try:
        return r.json()["error"]["code"]  # type: ignore[no-any-return]
    except (ValueError, KeyError, TypeError):
        return None


def test_revoke_while_running(gw: GatewayProcess, mock_provider: MockProvider) -> None:
    target, other = mint(gw, "alice", "bob")
    clients = {"proxy": via_proxy(gw, target["key"]), "header": via_header(gw, target["key"])}
    bystander = via_proxy(gw, other["key"])
    # keys minted while the gateway runs work on their very first request (no wait for a poll)
    for name, call in clients.items():
        assert call().status_code == 200, name
    assert bystander().status_code == 200
    assert len(mock_provider.wait_for(3)) == 3

    gw.revoke_key(target["key_id"])
    returned = time.monotonic()
    last: dict[str, httpx.Response] = {}

    def all_refused() -> bool:
        for name, call in clients.items():
            last[name] = call()
        return all(r.status_code == 403 for r in last.values())

    took = poll_until(all_refused, returned + WITHIN)
    assert took is not None, {n: (r.status_code, r.text[:200]) for n, r in last.items()}
    assert took <= WITHIN
    for name, r in last.items():
        assert code_of(r) == "spendgate_key_revoked", name
        assert target["key_id"] in r.json()["error"]["message"]
    # it stays refused; only that key is affected
    time.sleep(0.3)
    for call in clients.values():
        assert call().status_code == 403
    assert bystander().status_code == 200


def test_revoke_by_user_revokes_all_their_keys(gw: GatewayProcess, mock_provider: MockProvider) -> None:
    k1 = gw.create_key("dave")["key"]
    k2 = gw.create_key("dave")["key"]  # the user exists now: a second key for them
    calls = [via_proxy(gw, k1), via_header(gw, k2)]
    assert [c().status_code for c in calls] == [200, 200]
    gw.revoke_key("dave")
    took = poll_until(lambda: [c().status_code for c in calls] == [403, 403], time.monotonic() + WITHIN)
    assert took is not None and took <= WITHIN


def test_rotate_with_grace(gw: GatewayProcess, mock_provider: MockProvider) -> None:
    """Grace 4 s: the old secret works until then, the new one from (at most 1 s after) the rotation on."""
    grace = 4.0
    created = gw.create_key("carol")
    old = created["key"]
    old_proxy, old_header = via_proxy(gw, old), via_header(gw, old)
    assert old_proxy().status_code == 200

    before = time.monotonic()
    rotated = gw.rotate_key(created["key_id"], grace="4s")
    returned = time.monotonic()
    new = rotated["key"]
    assert new != old and new.split("_")[1] == old.split("_")[1]  # same key id, new secret
    new_proxy, new_header = via_proxy(gw, new), via_header(gw, new)

    # The grace period ends somewhere in [before + grace, returned + grace]; sample across it.
    samples: list[tuple[float, bool, bool]] = []
    while time.monotonic() < returned + grace + 1.0:
        t = time.monotonic()
        old_ok = old_proxy().status_code == 200 and old_header().status_code == 200
        new_ok = new_proxy().status_code == 200 and new_header().status_code == 200
        samples.append((t, old_ok, new_ok))
        time.sleep(0.1)

    during = [s for s in samples if s[0] < before + grace - 0.1]
    after = [s for s in samples if s[0] > returned + grace + 0.3]
    assert during and after, "too few samples (machine overloaded?)"
    assert all(old_ok for _, old_ok, _ in during), "the old secret stopped working during the grace period"
    assert not any(old_ok for _, old_ok, _ in after), "the old secret still works after the grace period"
    late_new = [ok for t, _, ok in samples if t > returned + WITHIN]
    assert late_new and all(late_new), "the new secret is not honoured 1 s after the rotation"
    assert all(ok for _, _, ok in after)
    r = old_header()
    assert r.status_code == 401 and code_of(r) == "spendgate_unknown_key"


def test_key_expires_while_running(gw: GatewayProcess, mock_provider: MockProvider) -> None:
    expires = (datetime.now(timezone.utc) + timedelta(seconds=5)).replace(microsecond=0)
    key = gw.create_key("frank", expires=expires.isoformat())["key"]
    call = via_proxy(gw, key)
    now = datetime.now(timezone.utc)
    assert now < expires - timedelta(seconds=0.3), "key creation took too long to test its expiry"
    assert call().status_code == 200
    last: list[httpx.Response] = []

    def refused() -> bool:
        last[:] = [call()]
        return last[0].status_code == 403

    took = poll_until(refused, time.monotonic() + (expires - datetime.now(timezone.utc)).total_seconds() + WITHIN)
    assert took is not None, (last[0].status_code, last[0].text)
    assert datetime.now(timezone.utc) >= expires  # refused because it expired, not before
    assert code_of(last[0]) == "spendgate_key_expired"


def test_concurrent_key_creation_for_a_new_user_and_team(gw: GatewayProcess, mock_provider: MockProvider) -> None:
    """Onboarding scripts mint in parallel: every `keys create` for the same new user and team succeeds."""
    made: list[dict[str, Any]] = []
    errors: list[str] = []

    def create(_: int) -> None:
        try:
            made.append(gw.create_key("zoe", team="newteam"))
        except Exception as e:  # noqa: BLE001 - collected and shown below
            causes = re.findall(r"^\w[\w.]*(?:Error|Exception): .*$", str(e), re.MULTILINE)
            errors.append(causes[0] if causes else repr(e)[:300])

    with ThreadPoolExecutor(4) as pool:
        list(pool.map(create, range(4)))
    assert errors == []
    listed = [k for k in gw.cli_json("keys", "list") if k["user"] == "zoe"]
    assert len(listed) == 4 and {k["team"] for k in listed} == {"newteam"}
    assert all(via_header(gw, k["key"])().status_code == 200 for k in made)


# --------------------------------------------------------------------------- schema


def _schema_snapshot(db_path: Path) -> tuple[Any, ...]:
    """Everything a command could change in a SQLite database: its schema objects, every table's
    rows, and the Alembic revision. A file that does not exist reads as an empty database."""
    if not db_path.exists():
        return ((), ())
    conn = sqlite3.connect(f"file:{db_path}?mode=ro", uri=True)
    try:
        objects = conn.execute("SELECT type, name, tbl_name, sql FROM sqlite_master ORDER BY type, name").fetchall()
        rows = tuple((name, sorted(conn.execute(f'SELECT * FROM "{name}"').fetchall(), key=repr))
                     for kind, name, _, _ in objects if kind == "table")
        return tuple(objects), rows
    finally:
        conn.close()


def _migrate_to(db_url: str, revision: str) -> None:
    """A database as an older Spendgate left it: the migrations up to `revision` only."""
    from alembic import command
    from alembic.config import Config

    from spendgate.store import MIGRATIONS, Database

    db = Database(db_url)
    cfg = Config()
    cfg.set_main_option("script_location", str(MIGRATIONS))
    try:
        with db.engine.begin() as conn:
            cfg.attributes["connection"] = conn
            command.upgrade(cfg, revision)
    finally:
        db.close()


@pytest.mark.parametrize("state", ["empty", "outdated"])
def test_cli_refuses_a_database_that_needs_db_upgrade(
        gateway_factory: Callable[..., GatewayProcess], mock_provider: MockProvider, state: str) -> None:
    """No command changes the schema under running gateways: on an empty database or one whose schema
    is behind, each exits 3 naming `spendgate db upgrade` and leaves the database as it was; `serve`
    refuses one that is behind. After `spendgate db upgrade` they work."""
    from spendgate.store import Database

    # No `db upgrade` done for it by the rig: this test is the admin who forgot.
    g = gateway_factory(name=f"schema-{state}", start=False, upgrade_new_database=False)
    head = Database.head_revision()
    assert head is not None and head > "0001"
    if state == "outdated":
        _migrate_to(g.db_url, f"{int(head) - 1:04d}")
    before = _schema_snapshot(g.db_path)
    # One command of each CLI module, writers and readers, side by side (each is a ~1 s process).
    commands = [("keys", "create", "erin"), ("budgets", "set", "user", "erin", "--cap", "5", "--period", "day"),
                ("audit", "--admin"), ("alerts", "list"), ("purge",)]
    with ThreadPoolExecutor(len(commands)) as pool:
        done = list(pool.map(lambda args: g.cli(*args, check=False), commands))
    for args, cp in zip(commands, done):
        said = " ".join((cp.stdout + cp.stderr).split())  # the message is wrapped to the terminal's width
        assert cp.returncode == 3, (args, cp.returncode, said)
        assert "run `spendgate db upgrade`" in said, (args, said)
    assert _schema_snapshot(g.db_path) == before, "a refused command changed the database"
    if state == "outdated":
        with pytest.raises(GatewayError) as refused:
            g.start()
        said = " ".join(str(refused.value).split())
        assert "exited with 3" in said and "run `spendgate db upgrade`" in said, said
        assert _schema_snapshot(g.db_path) == before, "serve changed a database whose schema is behind"

    upgraded = g.cli("db", "upgrade")
    assert upgraded.stdout.strip().endswith(f"-> {head}"), upgraded.stdout
    key = g.create_key("erin")
    assert [k["user"] for k in g.cli_json("keys", "list")] == ["erin"]
    if state == "outdated":  # (serve on an empty database, which it initialises itself, is every other test)
        g.start()
        assert via_header(g, key["key"])().status_code == 200
        assert [r["user"] for r in g.cli_json("audit")] == ["erin"]
