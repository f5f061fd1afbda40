"""Prompts and completions stay out of the database unless a key has capture on, with a reason;
captured content is purged after `audit.content_retention_days`."""

from __future__ import annotations

import json
import sqlite3
import time
import uuid
from collections.abc import Callable, Iterator
from datetime import datetime, timedelta, timezone
from pathlib import Path
from typing import Any

import pytest

from tests.rig.gateway import GatewayProcess
from tests.rig.mock_provider import MockProvider, content_pieces

REQUEST_ID = "x-spendgate-request-id"
COMPLETION = "".join(content_pieces(5))  # "Hello from the mock provider"
RETENTION_DAYS = 7


def marker(tag: str) -> str:
    return f"PROMPT-MARKER-{tag}-{uuid.uuid4().hex}"


def send_all_kinds(gw: GatewayProcess, key: str, mark: str) -> list[str]:
    """One request of each kind carrying `mark` in its prompt; returns their request ids."""
    ids = []
    oai = gw.openai_client(key)
    msgs = [{"role": "user", "content": f"Please summarise: {mark}"}]
    raw = oai.chat.completions.with_raw_response.create(model="gpt-4o", messages=msgs)
    assert raw.parse().choices[0].message.content == COMPLETION
    ids.append(raw.headers[REQUEST_ID])
    raw = oai.chat.completions.with_raw_response.create(model="gpt-4o", messages=msgs, stream=True)
    assert "".join(c.choices[0].delta.content or "" for c in raw.parse() if c.choices) == COMPLETION
    ids.append(raw.headers[REQUEST_ID])
    raw = oai.embeddings.with_raw_response.create(model="text-embedding-3-small", input=mark)
    raw.parse()
    ids.append(raw.headers[REQUEST_ID])
    raw = gw.anthropic_client(key).messages.with_raw_response.create(
        model="claude-sonnet-4-20250514", max_tokens=100, messages=msgs)
    assert raw.parse().content[0].text == COMPLETION
    ids.append(raw.headers[REQUEST_ID])
    with gw.httpx_client(key) as h:
        r = h.post("https://generativelanguage.googleapis.com/v1beta/models/gemini-2.5-flash:generateContent",
                   json={"contents": [{"role": "user", "parts": [{"text": f"Please summarise: {mark}"}]}]})
    assert r.status_code == 200 and COMPLETION in r.text
    ids.append(r.headers[REQUEST_ID])
    return ids


def finished_rows(gw: GatewayProcess, ids: list[str], timeout: float = 10.0) -> dict[str, dict[str, Any]]:
    deadline = time.monotonic() + timeout
    while True:
        rows = {r["id"]: r for r in gw.cli_json("audit", "--limit", "100000")}
        if all(i in rows and rows[i]["ended_at"] for i in ids):
            return rows
        if time.monotonic() > deadline:
            raise AssertionError(f"rows not finished after {timeout}s: {[i for i in ids if i not in rows]}")
        time.sleep(0.1)


def dump_database(db: Path) -> list[tuple[str, str, str]]:
    """(table, column, text) for every non-null value of every column of every table."""
    out = []
    con = sqlite3.connect(f"file:{db}?mode=ro", uri=True)
    try:
        tables = [r[0] for r in con.execute("SELECT name FROM sqlite_master WHERE type = 'table'")]
        assert "audit_log" in tables and "audit_content" in tables
        for table in tables:
            cur = con.execute(f'SELECT * FROM "{table}"')
            cols = [d[0] for d in cur.description]
            for row in cur:
                for col, value in zip(cols, row):
                    if value is None:
                        continue
                    text = value.decode("utf-8", "replace") if isinstance(value, bytes) else str(value)
                    out.append((table, col, text))
    finally:
        con.close()
    return out


def places(dump: list[tuple[str, str, str]], needle: str) -> list[tuple[str, str]]:
    return [(t, c) for t, c, v in dump if needle in v]


def content_rows(db: Path) -> dict[str, dict[str, Any]]:
    con = sqlite3.connect(f"file:{db}?mode=ro", uri=True)
    con.row_factory = sqlite3.Row
    try:
        return {r["request_id"]: dict(r) for r in con.execute("SELECT * FROM audit_content")}
    finally:
        con.close()


def sse_text(body: str) -> str:
    """The completion text of a captured OpenAI chat stream."""
    text = []
    for line in body.splitlines():
        if line.startswith("data: ") and line != "data: [DONE]":
            for choice in json.loads(line[6:]).get("choices", []):
                text.append(choice.get("delta", {}).get("content") or "")
    return "".join(text)


@pytest.fixture
def gw(gateway_factory: Callable[..., GatewayProcess]) -> Iterator[GatewayProcess]:
    yield gateway_factory(overrides={"audit": {"content_retention_days": RETENTION_DAYS}})


def test_no_content_anywhere_by_default(gw: GatewayProcess, mock_provider: MockProvider) -> None:
    key = gw.create_key("dana", team="t-content")["key"]
    mark = marker("off")
    ids = send_all_kinds(gw, key, mark)
    assert all(mark.encode() in r.body for r in mock_provider.requests)  # it did pass through the gateway
    rows = finished_rows(gw, ids)
    assert all(rows[i]["content_captured"] is False for i in ids)

    dump = dump_database(gw.db_path)
    assert len(dump) > 100  # the dump did read the audit rows
    # The streamed completion is stored, if at all, as JSON string pieces: '" provider"'.
    for needle in (mark, "Please summarise", COMPLETION, '" provider"'):
        assert places(dump, needle) == [], f"{needle!r} stored in the database"
    assert content_rows(gw.db_path) == {}
    # Nor in the raw files (free pages, the write-ahead log).
    for f in gw.db_path.parent.glob(gw.db_path.name + "*"):
        assert mark.encode() not in f.read_bytes(), f
        assert COMPLETION.encode() not in f.read_bytes(), f


def test_capture_on_for_one_key_with_reason_then_purged(gw: GatewayProcess, mock_provider: MockProvider) -> None:
    capture = gw.create_key("erin", team="t-content", capture_content=True, reason="incident 42")
    plain = gw.create_key("frank", team="t-content")
    mark_on, mark_off = marker("on"), marker("off")
    ids_on = send_all_kinds(gw, capture["key"], mark_on)
    ids_off = send_all_kinds(gw, plain["key"], mark_off)
    rows = finished_rows(gw, ids_on + ids_off)

    # The captured key: every request's prompt and completion, with the reason.
    assert all(rows[i]["content_captured"] is True for i in ids_on)
    deadline = time.monotonic() + 10
    while set(ids_on) - set(content_rows(gw.db_path)) and time.monotonic() < deadline:
        time.sleep(0.1)  # content rows are queued after the audit row's completion
    captured = content_rows(gw.db_path)
    assert set(captured) == set(ids_on), "content only for the capture key's requests"
    for rid in ids_on:
        c = captured[rid]
        assert c["reason"] == "incident 42" and c["key_id"] == capture["key_id"]
        assert mark_on in c["request_body"], c
    chat, chat_stream, _embeddings, messages, generate = (captured[i] for i in ids_on)
    assert COMPLETION in chat["response_body"]
    assert sse_text(chat_stream["response_body"]) == COMPLETION
    assert COMPLETION in messages["response_body"] and COMPLETION in generate["response_body"]

    # The other key on the same gateway: nothing.
    assert all(rows[i]["content_captured"] is False for i in ids_off)
    assert places(dump_database(gw.db_path), mark_off) == []

    # Visible to admins: the key listing and the admin log.
    keys = {k["key_id"]: k for k in gw.cli_json("keys", "list")}
    assert (keys[capture["key_id"]]["capture_content"], keys[capture["key_id"]]["capture_reason"]) == (
        True, "incident 42")
    assert (keys[plain["key_id"]]["capture_content"], keys[plain["key_id"]]["capture_reason"]) == (False, None)
    events = gw.cli_json("audit", "--admin")
    on = [e for e in events if e["action"] == "content_capture.on"]
    assert len(on) == 1 and on[0]["target"] == capture["key_id"], events
    assert json.loads(on[0]["after"])["reason"] == "incident 42" and on[0]["actor"]

    # Purge: kept while within retention, gone after it; the audit rows stay.
    now = datetime.now(timezone.utc)
    for when in (now, now + timedelta(days=RETENTION_DAYS - 1)):
        gw.cli("purge", "--now", when.isoformat())
        assert set(content_rows(gw.db_path)) == set(ids_on), f"purged too early (--now {when})"
    out = gw.cli("purge", "--now", (now + timedelta(days=RETENTION_DAYS + 1)).isoformat()).stdout
    assert str(len(ids_on)) in out
    assert content_rows(gw.db_path) == {}
    assert places(dump_database(gw.db_path), mark_on) == []
    after = finished_rows(gw, ids_on)
    assert all(after[i]["content_captured"] is True and after[i]["outcome"] == "completed" for i in ids_on)
