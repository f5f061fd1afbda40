"""No secret in clear, anywhere the gateway writes: after real traffic (good and refused) through
`spendgate serve`, neither its log, nor any column of any table, nor the raw database files, nor
`keys list` contain a gateway key, a gateway key's secret part, or an upstream key."""

from __future__ import annotations

import base64
import json
import socket
import sqlite3
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import anthropic
import openai
import pytest

from spendgate.keys import hash_secret
from tests.rig.gateway import UPSTREAM_KEYS, GatewayProcess
from tests.rig.mock_provider import MockProvider

MSGS = [{"role": "user", "content": "Say hello"}]
CLAUDE = "claude-sonnet-4-20250514"
GEMINI = "https://generativelanguage.googleapis.com/v1beta/models/gemini-2.0-flash"
# Built at runtime: a leak scanner reads the source for provider-key-shaped literals.
FOREIGN = "sk-" + "proj" + "Secretish" + "Q" * 20


def basic(user: str, password: str) -> str:
    return "Basic " + base64.b64encode(f"{user}:{password}".encode()).decode()


def connect_status(gw: GatewayProcess, target: str, proxy_auth: str) -> int:
    with socket.create_connection(("127.0.0.1", gw.port), timeout=10) as s:
        s.sendall(f"CONNECT {target} HTTP/1.1\r\nHost: {target}\r\nProxy-Authorization: {proxy_auth}\r\n\r\n".encode())
        head = b""
        while b"\r\n" not in head and (chunk := s.recv(1024)):
            head += chunk
    return int(head.split()[1])


def dump_sqlite(path: Path) -> tuple[str, dict[str, list[tuple[Any, ...]]]]:
    """Every row of every table, as text, and the rows by table."""
    con = sqlite3.connect(f"file:{path}?mode=ro", uri=True)
    try:
        tables = [r[0] for r in con.execute("SELECT name FROM sqlite_master WHERE type = 'table'")]
        rows = {t: con.execute(f'SELECT * FROM "{t}"').fetchall() for t in tables}
    finally:
        con.close()
    text = "\n".join(f"{t}: {r!r}" for t, rs in rows.items() for r in rs)
    return text, rows


def find_leaks(haystack: str | bytes, secrets: dict[str, str]) -> list[str]:
    if isinstance(haystack, bytes):
        hay = haystack
        forms = {name: [s.encode(), s.encode("utf-16-le")] for name, s in secrets.items()}
        return [name for name, fs in forms.items() if any(f in hay for f in fs)]
    return [name for name, s in secrets.items() if s in haystack]


def test_no_secret_in_logs_database_or_key_listing(gateway_factory: Callable[..., GatewayProcess],
                                                    mock_provider: MockProvider) -> None:
    gw = gateway_factory(name="secrets")
    with ThreadPoolExecutor(4) as pool:
        alice, bob, rev, carol, dora = pool.map(
            lambda a: gw.create_key(a[0], **a[1]),
            [("alice", {"team": "core"}), ("bob", {}), ("rev", {}), ("carol", {}), ("dora", {"byok": True})],
        )
    gw.revoke_key(rev["key_id"])
    carol_new = gw.rotate_key(carol["key_id"], grace="1h")
    a, b = alice["key"], bob["key"]
    wrong_secret = f"sg_{alice['key_id']}_" + "WrongSecretPart" + "w" * 30
    unknown = "sg_zz99zz99_" + "UnknownSecretPart" + "u" * 30

    # -- good traffic, every way a key can arrive
    gw.openai_client(a).chat.completions.create(model="gpt-4o-mini", messages=MSGS)
    list(gw.openai_client(a, via="apikey").chat.completions.create(model="gpt-4o", messages=MSGS, stream=True))
    gw.anthropic_client(b, via="apikey").messages.create(model=CLAUDE, max_tokens=16, messages=MSGS)
    gw.anthropic_client(b).messages.create(model=CLAUDE, max_tokens=16, messages=MSGS, stream=True).close()
    with gw.httpx_client(None) as c:
        assert c.post(f"{GEMINI}:generateContent?key={b}", json={"contents": []}).status_code == 200
        assert c.post(f"{GEMINI}:generateContent", json={"contents": []},
                      headers={"x-goog-api-key": b}).status_code == 200
    gw.openai_client(carol["key"]).models.list()  # old secret, in its grace period
    gw.openai_client(carol_new["key"], via="apikey").models.list()
    gw.openai_client(dora["key"]).with_options(api_key=FOREIGN).chat.completions.create(model="gpt-4o", messages=MSGS)
    assert mock_provider.last.headers["authorization"] == f"Bearer {FOREIGN}"  # BYOK went through

    # -- refused and failed traffic, still carrying secrets
    refusals: list[tuple[Callable[[], Any], type[Exception]]] = [
        (lambda: gw.openai_client(rev["key"]).models.list(), openai.PermissionDeniedError),
        (lambda: gw.openai_client(rev["key"], via="apikey").models.list(), openai.PermissionDeniedError),
        (lambda: gw.openai_client(wrong_secret, via="apikey").models.list(), openai.AuthenticationError),
        (lambda: gw.openai_client(unknown).models.list(), openai.AuthenticationError),
        (lambda: gw.openai_client(a).with_options(api_key=FOREIGN).models.list(), openai.PermissionDeniedError),
        (lambda: gw.anthropic_client(rev["key"], via="apikey").messages.create(
            model=CLAUDE, max_tokens=8, messages=MSGS), anthropic.PermissionDeniedError),
        (lambda: gw.openai_client(a, max_retries=0).chat.completions.create(
            model="gpt-4o", messages=MSGS, extra_headers={"x-mock-scenario": "error500"}), openai.InternalServerError),
    ]
    for call, exc in refusals:
        with pytest.raises(exc):
            call()
    with gw.httpx_client(a) as c:
        assert c.post("https://api.openai.com/v1/chat/completions", content=b"not json {" + a.encode(),
                      headers={"content-type": "application/json"}).status_code == 400
    for auth in (basic("alice", a), basic("rev", rev["key"]), basic("x", unknown), "Basic " + a):
        assert connect_status(gw, "127.0.0.1:9", auth) in (403, 407)  # a non-model host (loopback: refused)

    # -- let the audit writer finish every row (one per model-host request), then stop so all is flushed
    expected_rows = 9 + len(refusals) + 1
    deadline = time.monotonic() + 10
    while True:
        _, rows = dump_sqlite(gw.db_path)
        audit = rows.get("audit_log", [])
        if len(audit) >= expected_rows and not any("incomplete" in r for r in audit) or time.monotonic() > deadline:
            break
        time.sleep(0.1)
    keys_listing = gw.cli("keys", "list", "--format", "json").stdout
    assert len(json.loads(keys_listing)) == 5
    gw.stop()

    keys_made = {"alice": alice, "bob": bob, "rev": rev, "carol-old": carol, "carol-new": carol_new, "dora": dora}
    secrets: dict[str, str] = {}
    for name, k in keys_made.items():
        secrets[f"{name} key"] = k["key"]
        secrets[f"{name} secret"] = k["key"].rsplit("_", 1)[1]
    secrets["wrong secret"] = wrong_secret.rsplit("_", 1)[1]
    secrets["unknown secret"] = unknown.rsplit("_", 1)[1]
    secrets["client's own provider key"] = FOREIGN
    secrets.update({f"upstream {p}": v for p, v in UPSTREAM_KEYS.items()})

    # positive controls: the dump really holds the keys table and the traffic
    text, rows = dump_sqlite(gw.db_path)
    assert {"api_keys", "audit_log", "admin_events"} <= set(rows)
    for name in ("alice", "bob", "rev", "dora"):
        k = keys_made[name]
        assert k["key_id"] in text and hash_secret(k["key"].rsplit("_", 1)[1]) in text
    assert hash_secret(carol_new["key"].rsplit("_", 1)[1]) in text
    assert len(rows["audit_log"]) == expected_rows
    outcomes = " ".join(repr(r) for r in rows["audit_log"])
    assert "completed" in outcomes and "blocked_auth" in outcomes and "upstream_error" in outcomes

    log = gw.log_text()
    assert find_leaks(log, secrets) == []
    assert find_leaks(text, secrets) == []
    for f in sorted(gw.db_path.parent.glob(gw.db_path.name + "*")):
        assert find_leaks(f.read_bytes(), secrets) == [], f.name
    assert find_leaks(keys_listing, secrets) == []
