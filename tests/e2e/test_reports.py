"""`spendgate usage` totals equal the sums of the `spendgate audit` rows, exactly, for every
grouping; JSON and CSV say the same thing."""

from __future__ import annotations

import csv
import io
import time
from collections import defaultdict
from collections.abc import Iterator
from decimal import Decimal
from typing import Any

import httpx
import openai
import pytest

from tests.rig.gateway import GatewayProcess
from tests.rig.mock_provider import MockProvider

TOKEN_COLUMNS = ("input_tokens", "output_tokens", "cache_read_tokens", "cache_write_tokens", "reasoning_tokens")
GROUPINGS = ("user", "team", "model", "provider", "day")
MSGS = [{"role": "user", "content": "How many sheep?"}]


@pytest.fixture(scope="module")
def gw(tmp_path_factory: pytest.TempPathFactory, _mock_provider_session: MockProvider) -> Iterator[GatewayProcess]:
    g = GatewayProcess(tmp_path_factory.mktemp("gw-reports"), _mock_provider_session.url, name="reports")
    g.start()
    yield g
    g.stop()


@pytest.fixture(autouse=True)
def _attach_log(request: pytest.FixtureRequest, gw: GatewayProcess) -> None:
    request.node._spendgate_gateways = [gw]


@pytest.fixture(scope="module")
def audit(gw: GatewayProcess, _mock_provider_session: MockProvider) -> list[dict[str, Any]]:
    """Mixed traffic (3 users, 2 teams and none, 4 providers, several models, errors, an
    unpriced model, a refused request), then every audit row."""
    mock = _mock_provider_session
    mock.reset()
    alice = gw.create_key("alice", team="red")["key"]
    bob = gw.create_key("bob", team="red")["key"]
    carol = gw.create_key("carol", team="blue")["key"]
    dave = gw.create_key("dave")["key"]  # no team
    n = 0

    def chat(key: str, model: str, stream: bool = False, **tokens: int) -> None:
        nonlocal n
        n += 1
        mock.set_next("ok", **tokens)
        out = gw.openai_client(key).chat.completions.create(model=model, messages=MSGS, stream=stream)
        if stream:
            list(out)

    chat(alice, "gpt-4o", input_tokens=1200, cache_read_tokens=400, output_tokens=77, reasoning_tokens=5)
    chat(alice, "gpt-4o", stream=True, input_tokens=333, output_tokens=12)
    chat(alice, "gpt-4o-mini", input_tokens=5000, output_tokens=900)
    chat(bob, "o3-mini", input_tokens=2100, cache_read_tokens=1000, output_tokens=640, reasoning_tokens=512)
    chat(bob, "acme-internal-7", input_tokens=99, output_tokens=9)  # no price known: cost null
    chat(dave, "gpt-4.1", stream=True)
    for i in range(3):
        n += 1
        mock.set_next("ok", input_tokens=300 + i, cache_read_tokens=100, cache_write_tokens=50 + i, output_tokens=20)
        gw.anthropic_client(carol).messages.create(model="claude-sonnet-4-20250514", max_tokens=64, messages=MSGS,
                                                   stream=bool(i % 2))
    with gw.httpx_client(carol) as h:
        n += 1
        mock.set_next("ok", input_tokens=4321, cache_read_tokens=321, reasoning_tokens=44, output_tokens=66)
        r = h.post("https://generativelanguage.googleapis.com/v1beta/models/gemini-2.5-flash:generateContent",
                   json={"contents": [{"parts": [{"text": "How many sheep?"}]}]})
        assert r.status_code == 200
    n += 1
    gw.openai_client(bob, base_url="https://api.mistral.ai/v1").chat.completions.create(
        model="mistral-small-latest", messages=MSGS)
    n += 1
    mock.set_next("error500")
    with pytest.raises(openai.InternalServerError):
        gw.openai_client(alice).chat.completions.create(model="gpt-4o", messages=MSGS)
    n += 1
    gw.openai_client(bob).embeddings.create(model="text-embedding-3-small", input="sheep")
    n += 1  # refused by the gateway: no user, no model
    with httpx.Client(proxy=gw.proxy_url(), verify=gw.ssl_context(), trust_env=False) as h:
        assert h.post("https://api.openai.com/v1/chat/completions", json={"model": "gpt-4o"}).status_code == 401
    mock.reset()

    deadline = time.monotonic() + 15
    while True:
        rows = gw.cli_json("audit", "--limit", "100000")
        if len(rows) >= n and all(r["ended_at"] for r in rows) or time.monotonic() > deadline:
            break
        time.sleep(0.1)
    assert len(rows) == n and all(r["ended_at"] for r in rows), rows
    return list(rows)


def group_key(row: dict[str, Any], by: str) -> Any:
    if by == "model":
        return row["model_reported"] or row["model_requested"]
    if by == "day":
        return row["started_at"][:10]  # UTC
    return row[by]


def sums(rows: list[dict[str, Any]], by: str) -> dict[Any, dict[str, Any]]:
    out: dict[Any, dict[str, Any]] = defaultdict(
        lambda: {"requests": 0, **{c: 0 for c in TOKEN_COLUMNS}, "cost_usd": Decimal(0), "unpriced": 0})
    for r in rows:
        g = out[group_key(r, by)]
        g["requests"] += 1
        for c in TOKEN_COLUMNS:
            g[c] += r[c]
        if r["cost_usd"] is not None:
            g["cost_usd"] += Decimal(r["cost_usd"])
        elif r["input_tokens"] + r["output_tokens"] > 0:
            g["unpriced"] += 1
    return dict(out)


def test_traffic_is_mixed(audit: list[dict[str, Any]]) -> None:
    """The report checks below mean something only if the rows differ along every grouping."""
    assert {r["user"] for r in audit} == {"alice", "bob", "carol", "dave", None}
    assert {r["team"] for r in audit} == {"red", "blue", None}
    assert {"openai", "anthropic", "gemini", "mistral"} <= {r["provider"] for r in audit}
    assert {r["outcome"] for r in audit} == {"completed", "upstream_error", "blocked_auth"}
    assert any(r["cost_usd"] is None and r["input_tokens"] for r in audit)
    for c in TOKEN_COLUMNS:
        assert sum(1 for r in audit if r[c]) >= 2, c
    assert sum(1 for r in audit if r["cost_usd"] is not None) >= 10


def _cell(v: Any) -> str:
    """A JSON value as its CSV cell: empty for null, true/false for booleans (no Python reprs)."""
    if isinstance(v, bool):
        return "true" if v else "false"
    return "" if v is None else str(v)


@pytest.mark.parametrize("by", GROUPINGS)
def test_usage_totals_equal_audit_sums_in_json_and_csv(gw: GatewayProcess, audit: list[dict[str, Any]],
                                                       by: str) -> None:
    report = gw.cli_json("usage", "--by", by)
    assert all(r[by] != "TOTAL" for r in report), "no TOTAL row in JSON"
    got = {r[by]: r for r in report}
    assert len(got) == len(report), f"a {by} appears twice"
    want = sums(audit, by)
    assert set(got) == set(want)
    for k, w in want.items():
        g = got[k]
        assert {c: g[c] for c in ("requests", *TOKEN_COLUMNS)} == {c: w[c] for c in ("requests", *TOKEN_COLUMNS)}, k
        assert isinstance(g["cost_usd"], str) and Decimal(g["cost_usd"]) == w["cost_usd"], (k, g["cost_usd"])
        assert g["unpriced"] == w["unpriced"], k
    assert sum(Decimal(r["cost_usd"]) for r in report) == sum(
        Decimal(r["cost_usd"]) for r in audit if r["cost_usd"] is not None)
    assert sum(r["requests"] for r in report) == len(audit)

    # The same report as CSV: parses, same rows, same values.
    text = gw.cli("usage", "--by", by, "--format", "csv").stdout
    as_csv = list(csv.DictReader(io.StringIO(text)))
    assert len(as_csv) == len(report) and all(r[by] != "TOTAL" for r in as_csv)
    for j, c in zip(report, as_csv):
        assert set(c) == set(j)
        for col, v in j.items():
            if col == "cost_usd":
                assert Decimal(c[col]) == Decimal(v)
            else:
                assert c[col] == _cell(v), (col, c[col], v)


def test_audit_csv_matches_json(gw: GatewayProcess, audit: list[dict[str, Any]]) -> None:
    text = gw.cli("audit", "--limit", "100000", "--format", "csv").stdout
    as_csv = list(csv.DictReader(io.StringIO(text)))
    assert [r["id"] for r in as_csv] == [r["id"] for r in audit]
    for j, c in zip(audit, as_csv):
        assert set(c) == set(j)
        for col, v in j.items():
            assert c[col] == _cell(v), (j["id"], col, c[col], v)


def test_usage_window_equals_audit_window(gw: GatewayProcess, audit: list[dict[str, Any]]) -> None:
    starts = sorted(r["started_at"] for r in audit)
    since, until = starts[3], starts[-3]  # strictly inside the traffic: both bounds cut rows off
    window = gw.cli_json("audit", "--since", since, "--until", until, "--limit", "100000")
    assert 0 < len(window) < len(audit) - 3
    assert all(since <= r["started_at"] < until for r in window)
    report = gw.cli_json("usage", "--by", "provider", "--since", since, "--until", until)
    want = sums(window, "provider")
    assert {r["provider"]: (r["requests"], r["input_tokens"], Decimal(r["cost_usd"])) for r in report} == {
        k: (w["requests"], w["input_tokens"], w["cost_usd"]) for k, w in want.items()}
