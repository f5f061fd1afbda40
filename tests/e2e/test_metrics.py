"""`/metrics` of a real `spendgate serve` after mixed traffic equals its audit log.

Several users, teams, providers and models; streams and non-streams; upstream errors, a refused
upstream connection, a truncated stream, a client that hangs up; requests refused by a cap, by a
model allow-list and for an unknown key. Then `/metrics` is parsed with prometheus-client's own
parser and every counter is compared with the rows of `spendgate audit --format json`: requests
per (user, team, provider, model, outcome), tokens per kind, cost, blocks, histogram counts and
buckets, and the budget gauges with `spendgate budgets list`.

`drive_mix` and `wait_settled` are also used by tests/e2e/test_prometheus.py.
"""

from __future__ import annotations

import asyncio
import math
import re
import time
import uuid
from collections import Counter, defaultdict
from collections.abc import Callable, Iterator
from contextlib import ExitStack
from decimal import Decimal
from typing import Any

import anthropic
import httpx
import openai
import pytest
from prometheus_client.parser import text_string_to_metric_families
from prometheus_client.samples import Sample

from spendgate.metrics import LATENCY_BUCKETS, MAX_UNKNOWN_MODELS, OVERHEAD_BUCKETS, TOKEN_KINDS, ModelLabels
from spendgate.pricing import Pricer
from tests.rig.gateway import GatewayProcess, free_port
from tests.rig.mock_provider import MockProvider

OPENAI = "https://api.openai.com/v1"
GEMINI = "https://generativelanguage.googleapis.com/v1beta/models"
MISTRAL = "https://api.mistral.ai/v1"
MSGS = [{"role": "user", "content": "How many sheep fit in a barn?"}]

# Every metric of the contract (CONTRACT.md, "Metrics"), by the family name the parser reports
# (counters lose their `_total` suffix there).
CONTRACT_FAMILIES = {
    "spendgate_requests": "counter", "spendgate_tokens": "counter", "spendgate_cost_usd": "counter",
    "spendgate_request_duration_seconds": "histogram", "spendgate_time_to_first_token_seconds": "histogram",
    "spendgate_budget_spent_usd": "gauge", "spendgate_budget_cap_usd": "gauge", "spendgate_blocked": "counter",
    "spendgate_audit_queue_depth": "gauge", "spendgate_audit_write_errors": "counter",
    "spendgate_alerts_sent": "counter", "spendgate_alert_failures": "counter",
    "spendgate_overhead_seconds": "histogram",
}

# Bob's cap: a few small gpt-4o-mini requests fit, a gpt-4o request with the default output limit
# (4096 tokens, ~$0.04 estimated) does not.
BOB_CAP_USD = "0.0005"


# --------------------------------------------------------------------------- traffic


def mistral_unreachable_override() -> dict[str, Any]:
    """Config override: Mistral's upstream is a closed port (the "refused connection" case)."""
    return {"providers": {"mistral": {"upstream": f"https://127.0.0.1:{free_port()}", "verify_upstream_tls": False}}}


def create_fleet(gw: GatewayProcess) -> dict[str, str]:
    """Budgets first (a new key's load brings the budgets with it), then four keys.

    One CLI call after another: in parallel on a 2-core machine they were no faster."""
    gw.cli("budgets", "set", "team", "blue", "--cap", "100", "--period", "month")
    gw.cli("budgets", "set", "global", "global", "--cap", "1000", "--period", "month")
    specs: dict[str, dict[str, Any]] = {
        "alice": {"team": "red"},
        "bob": {"team": "blue", "cap": BOB_CAP_USD, "period": "day"},
        "carol": {},
        "dave": {"team": "red", "models": ["gpt-4o-mini"]},
    }
    return {user: str(gw.create_key(user, **spec)["key"]) for user, spec in specs.items()}


def _expect_error(fn: Callable[[], Any], *errors: type[BaseException]) -> None:
    try:
        fn()
    except errors:
        return
    raise AssertionError(f"expected one of {errors}")


def drive_mix(gw: GatewayProcess, keys: dict[str, str], *, hang_up: bool = True) -> int:
    """One round of mixed traffic through `gw`; returns how many requests reached the gateway."""
    with ExitStack() as clients:
        return _mix(gw, keys, clients, hang_up)


def _mix(gw: GatewayProcess, keys: dict[str, str], clients: ExitStack, hang_up: bool) -> int:
    n = 0
    alice = clients.enter_context(gw.openai_client(keys["alice"]))
    alice_ant = clients.enter_context(gw.anthropic_client(keys["alice"]))
    # alice: OpenAI chat (a dated snapshot and a family name), stream with usage, Responses,
    # embeddings, a model genai-prices does not know (refused), two upstream errors, a truncated stream.
    alice.chat.completions.create(model="gpt-4o-2024-08-06", messages=MSGS)
    alice.chat.completions.create(model="gpt-4o", messages=MSGS, max_tokens=50)
    for _ in alice.chat.completions.create(model="gpt-4o-mini", messages=MSGS, stream=True,
                                           stream_options={"include_usage": True}):
        pass
    alice.responses.create(model="gpt-4.1", input="Count the sheep.")
    alice.embeddings.create(model="text-embedding-3-small", input="sheep")
    # Everyone here is under the global cap: a model with no price is refused (blocked_policy).
    _expect_error(lambda: alice.chat.completions.create(model="acme-private-finetune-v7", messages=MSGS),
                  openai.PermissionDeniedError)
    n += 6
    _expect_error(lambda: alice.chat.completions.create(
        model="gpt-4o", messages=MSGS, extra_headers={"x-mock-scenario": "error500"}), openai.InternalServerError)
    _expect_error(lambda: alice.chat.completions.create(
        model="gpt-4o-mini", messages=MSGS, extra_headers={"x-mock-scenario": "error429"}), openai.RateLimitError)
    n += 2
    with gw.httpx_client(keys["alice"]) as h, h.stream(
            "POST", f"{OPENAI}/chat/completions", json={"model": "gpt-4o", "messages": MSGS, "stream": True},
            headers={"x-mock-scenario": "truncate; chunks=8"}) as r:
        _expect_error(r.read, httpx.RemoteProtocolError)  # the gateway passes the cut on
    n += 1
    # alice on Anthropic: plain and streamed (time to first token).
    alice_ant.messages.create(model="claude-sonnet-4-20250514", max_tokens=100, messages=MSGS)
    with alice_ant.messages.stream(model="claude-3-5-haiku-20241022", max_tokens=100, messages=MSGS) as s:
        s.get_final_message()
    n += 2
    # carol (no team): Gemini plain and streamed, and Mistral, whose upstream refuses the connection.
    body = {"contents": [{"role": "user", "parts": [{"text": "Sheep?"}]}]}
    with gw.httpx_client(keys["carol"]) as h:
        assert h.post(f"{GEMINI}/gemini-2.0-flash:generateContent", json=body).status_code == 200
        with h.stream("POST", f"{GEMINI}/gemini-2.5-flash:streamGenerateContent", params={"alt": "sse"},
                      json=body) as r:
            assert r.status_code == 200
            r.read()
        r2 = h.post(f"{MISTRAL}/chat/completions", json={"model": "mistral-small-latest", "messages": MSGS})
        assert r2.status_code == 502, r2.text
    n += 3
    # bob: small requests fit his cap, then one that would pass it is refused (twice).
    bob = clients.enter_context(gw.openai_client(keys["bob"]))
    for _ in range(3):
        bob.chat.completions.create(model="gpt-4o-mini", messages=MSGS, max_tokens=10)
    for _ in range(2):
        _expect_error(lambda: bob.chat.completions.create(model="gpt-4o", messages=MSGS), openai.RateLimitError)
    n += 5
    # dave: one allowed model, one refused by his allow-list (via the SDK key, not the proxy password).
    dave = clients.enter_context(gw.openai_client(keys["dave"], via="apikey"))
    dave.chat.completions.create(model="gpt-4o-mini", messages=MSGS)
    _expect_error(lambda: dave.chat.completions.create(model="gpt-4o", messages=MSGS), openai.PermissionDeniedError)
    n += 2
    # no key at all, and a well-formed key the gateway never issued: blocked_auth, user unknown.
    nobody = clients.enter_context(gw.openai_client(None))
    _expect_error(lambda: nobody.chat.completions.create(model="gpt-4o", messages=MSGS), openai.AuthenticationError)
    made_up = "sg_" + "zz9zz9zz" + "_" + "Q" * 43
    stranger = clients.enter_context(gw.anthropic_client(made_up, via="apikey"))
    _expect_error(lambda: stranger.messages.create(model="claude-sonnet-4-20250514", max_tokens=10, messages=MSGS),
                  anthropic.AuthenticationError)
    n += 2
    if hang_up:
        # alice hangs up after the first streamed chunk: client_aborted, estimated usage.
        with gw.httpx_client(keys["alice"]) as h, h.stream(
                "POST", f"{OPENAI}/chat/completions", json={"model": "gpt-4o", "messages": MSGS, "stream": True},
                headers={"x-mock-scenario": "slow; delay_ms=150; chunks=20"}) as r:
            for line in r.iter_lines():
                if line.startswith("data:") and "content" in line:
                    break
        n += 1
    return n


# --------------------------------------------------------------------------- reading both sides


def audit_rows(gw: GatewayProcess) -> list[dict[str, Any]]:
    rows = gw.cli_json("audit", "--limit", "100000")
    assert isinstance(rows, list)
    return rows


def scrape(gw: GatewayProcess) -> dict[str, Any]:
    """{family name: Metric} of one /metrics answer, parsed by prometheus-client's parser."""
    return {f.name: f for f in text_string_to_metric_families(gw.metrics_text())}


def samples(families: dict[str, Any], sample_name: str) -> list[Sample]:
    return [s for f in families.values() for s in f.samples if s.name == sample_name]


def wait_settled(gws: list[GatewayProcess], expected: int, timeout: float = 20.0) -> list[dict[str, Any]]:
    """Audit rows once all `expected` requests are finished in the audit log *and* counted by the
    instances' /metrics (the stream hook may run a moment after the client saw the last byte)."""
    deadline = time.monotonic() + timeout
    while True:
        rows = audit_rows(gws[0])
        finished = [r for r in rows if r["outcome"] != "incomplete" and r["ended_at"] is not None]
        counted = sum(s.value for g in gws for s in samples(scrape(g), "spendgate_requests_total"))
        if len(rows) == expected and len(finished) == expected and counted == expected:
            return rows
        if time.monotonic() > deadline:
            raise AssertionError(f"not settled after {timeout}s: {len(rows)} rows, {len(finished)} finished, "
                                 f"{counted} counted, {expected} expected; outcomes "
                                 f"{Counter(r['outcome'] for r in rows)}")
        time.sleep(0.1)


class Labeller:
    """The labels the gateway should give an audit row (users/teams from the key, model folded)."""

    def __init__(self) -> None:
        self.model = ModelLabels(Pricer())

    def __call__(self, row: dict[str, Any]) -> dict[str, str]:
        return {
            "user": row["user"] or "unknown",
            "team": row["team"] or "none",
            "provider": row["provider"],
            "model": self.model(row["provider"], row["model_reported"] or row["model_requested"]),
        }


def by_labels(samples_: list[Sample], *names: str) -> dict[tuple[str, ...], float]:
    out: dict[tuple[str, ...], float] = defaultdict(float)
    for s in samples_:
        out[tuple(s.labels[n] for n in names)] += s.value
    return dict(out)


# --------------------------------------------------------------------------- fixtures


@pytest.fixture(scope="module")
def gw(tmp_path_factory: pytest.TempPathFactory, _mock_provider_session: MockProvider) -> Iterator[GatewayProcess]:
    g = GatewayProcess(tmp_path_factory.mktemp("gw-metrics"), _mock_provider_session.url, name="metrics",
                       overrides=mistral_unreachable_override())
    g.start()
    yield g
    g.stop()


@pytest.fixture(autouse=True)
def _attach_log(request: pytest.FixtureRequest, gw: GatewayProcess) -> None:
    request.node._spendgate_gateways = [gw]


@pytest.fixture(scope="module")
def fleet(gw: GatewayProcess) -> dict[str, str]:
    return create_fleet(gw)


@pytest.fixture(scope="module")
def settled(gw: GatewayProcess, fleet: dict[str, str],
            _mock_provider_session: MockProvider) -> tuple[list[dict[str, Any]], dict[str, Any]]:
    """(audit rows, parsed /metrics) after one round of the mix."""
    _mock_provider_session.reset()
    expected = drive_mix(gw, fleet)
    rows = wait_settled([gw], expected)
    return rows, scrape(gw)


# --------------------------------------------------------------------------- tests


def test_every_contract_metric_is_exposed_with_its_type(settled: tuple[list[dict[str, Any]], dict[str, Any]]) -> None:
    _, fams = settled
    got = {name: fams[name].type for name in CONTRACT_FAMILIES if name in fams}
    assert got == CONTRACT_FAMILIES
    # Nothing the contract does not name (prometheus-client's process metrics are not on this registry).
    assert set(fams) == set(CONTRACT_FAMILIES), sorted(set(fams) - set(CONTRACT_FAMILIES))


def test_the_mix_covered_every_outcome_and_provider(settled: tuple[list[dict[str, Any]], dict[str, Any]]) -> None:
    """Guards the comparisons below against a mix that silently stopped exercising a case."""
    rows, _ = settled
    outcomes = Counter(r["outcome"] for r in rows)
    assert {"completed", "upstream_error", "client_aborted", "blocked_cap", "blocked_policy",
            "blocked_auth"} <= set(outcomes), outcomes
    assert {r["provider"] for r in rows} >= {"openai", "anthropic", "gemini", "mistral"}
    # Under the global cap an unpriced model is refused (tests/e2e/test_caps_dodges.py has the uncapped case).
    assert any(r["error"] == "spendgate_unpriced_model" for r in rows), "an unpriced model"
    assert any(r["ttft_ms"] is not None for r in rows)


def test_requests_total_equals_audit_rows(settled: tuple[list[dict[str, Any]], dict[str, Any]]) -> None:
    rows, fams = settled
    label = Labeller()
    want: Counter[tuple[str, ...]] = Counter()
    for r in rows:
        lab = label(r)
        want[(lab["user"], lab["team"], lab["provider"], lab["model"], r["outcome"])] += 1
    got = by_labels(samples(fams, "spendgate_requests_total"), "user", "team", "provider", "model", "outcome")
    assert got == {k: float(v) for k, v in want.items()}
    per_user_outcome = by_labels(samples(fams, "spendgate_requests_total"), "user", "outcome")
    assert per_user_outcome == {k: float(v) for k, v in
                                Counter(((r["user"] or "unknown"), r["outcome"]) for r in rows).items()}
    # Dated snapshots are folded into their family: the label is genai-prices' id, not the raw name.
    models = {s.labels["model"] for s in samples(fams, "spendgate_requests_total")}
    assert "gpt-4o" in models and "gpt-4o-2024-08-06" not in models, models
    assert "acme-private-finetune-v7" in models  # unknown names are kept (below the limit)


def test_tokens_total_by_kind_equals_audit(settled: tuple[list[dict[str, Any]], dict[str, Any]]) -> None:
    rows, fams = settled
    label = Labeller()
    want: Counter[tuple[str, ...]] = Counter()
    for r in rows:
        lab = label(r)
        for kind in TOKEN_KINDS:
            if r[f"{kind}_tokens"]:
                want[(lab["user"], lab["team"], lab["provider"], lab["model"], kind)] += r[f"{kind}_tokens"]
    got = by_labels(samples(fams, "spendgate_tokens_total"), "user", "team", "provider", "model", "kind")
    assert got == {k: float(v) for k, v in want.items()}
    assert {k[-1] for k in got} >= {"input", "output"}
    by_kind = by_labels(samples(fams, "spendgate_tokens_total"), "kind")
    for kind in ("input", "output"):
        assert by_kind[(kind,)] == sum(r[f"{kind}_tokens"] or 0 for r in rows)


def test_cost_total_equals_audit(settled: tuple[list[dict[str, Any]], dict[str, Any]]) -> None:
    rows, fams = settled
    label = Labeller()
    want: dict[tuple[str, ...], Decimal] = defaultdict(Decimal)
    for r in rows:
        if r["cost_usd"] is not None:
            lab = label(r)
            want[(lab["user"], lab["team"], lab["provider"], lab["model"])] += Decimal(r["cost_usd"])
    want = {k: v for k, v in want.items() if v}
    got = by_labels(samples(fams, "spendgate_cost_usd_total"), "user", "team", "provider", "model")
    assert set(got) == set(want)
    for k, v in want.items():
        assert math.isclose(got[k], float(v), rel_tol=1e-9), (k, got[k], v)
    total = sum((Decimal(r["cost_usd"]) for r in rows if r["cost_usd"] is not None), Decimal(0))
    assert total > 0
    assert math.isclose(sum(got.values()), float(total), rel_tol=1e-9)


def test_blocked_total_equals_audit(settled: tuple[list[dict[str, Any]], dict[str, Any]]) -> None:
    rows, fams = settled
    want = Counter(((r["user"] or "unknown"), r["outcome"].removeprefix("blocked_"))
                   for r in rows if r["outcome"].startswith("blocked_"))
    got = by_labels(samples(fams, "spendgate_blocked_total"), "user", "reason")
    assert got == {k: float(v) for k, v in want.items()}
    assert got[("bob", "cap")] == 2 and got[("dave", "policy")] == 1 and got[("unknown", "auth")] == 2


def _bucket_counts(values: list[float], bounds: tuple[float, ...]) -> dict[str, float]:
    out = {str(float(b)): float(sum(1 for v in values if v <= b)) for b in bounds}
    out["+Inf"] = float(len(values))
    return out


def test_latency_and_ttft_histograms_equal_audit(settled: tuple[list[dict[str, Any]], dict[str, Any]]) -> None:
    rows, fams = settled
    label = Labeller()
    for metric, field, keep in [
        ("spendgate_request_duration_seconds", "latency_ms", lambda r: not r["outcome"].startswith("blocked_")),
        ("spendgate_time_to_first_token_seconds", "ttft_ms", lambda r: True),
    ]:
        want: dict[tuple[str, str], list[float]] = defaultdict(list)
        for r in rows:
            if r[field] is not None and keep(r):
                lab = label(r)
                want[(lab["provider"], lab["model"])].append(r[field] / 1000)
        assert want, metric
        counts = by_labels(samples(fams, f"{metric}_count"), "provider", "model")
        assert counts == {k: float(len(v)) for k, v in want.items()}, metric
        sums = by_labels(samples(fams, f"{metric}_sum"), "provider", "model")
        for k, v in want.items():
            assert math.isclose(sums[k], sum(v), rel_tol=1e-9, abs_tol=1e-12), (metric, k)
            buckets = {s.labels["le"]: s.value for s in samples(fams, f"{metric}_bucket")
                       if (s.labels["provider"], s.labels["model"]) == k}
            assert buckets == _bucket_counts(v, LATENCY_BUCKETS), (metric, k)


def test_overhead_histogram_counts_every_request(settled: tuple[list[dict[str, Any]], dict[str, Any]]) -> None:
    rows, fams = settled
    counts = by_labels(samples(fams, "spendgate_overhead_seconds_count"), "provider")
    assert counts == {(p,): float(n) for p, n in Counter(r["provider"] for r in rows).items()}
    les = {s.labels["le"] for s in samples(fams, "spendgate_overhead_seconds_bucket")}
    assert les == {str(float(b)) for b in OVERHEAD_BUCKETS} | {"+Inf"}
    # What the gateway adds is a part of each request's latency, never more than all of it.
    total_latency = sum(r["latency_ms"] / 1000 for r in rows if r["latency_ms"] is not None)
    assert 0 < sum(s.value for s in samples(fams, "spendgate_overhead_seconds_sum")) < total_latency


def test_budget_gauges_equal_the_store(gw: GatewayProcess,
                                      settled: tuple[list[dict[str, Any]], dict[str, Any]]) -> None:
    rows, _ = settled
    listed = gw.cli_json("budgets", "list")
    want = {(b["scope"], b["name"], b["period"]): (Decimal(str(b["spent_usd"])), Decimal(str(b["cap_usd"])))
            for b in listed}
    assert set(want) == {("user", "bob", "day"), ("team", "blue", "month"), ("global", "global", "month")}
    # Every cap existed before the first request, so each one's spend is exactly the audit's.
    cost = {k: sum((Decimal(r["cost_usd"]) for r in rows if r["cost_usd"] is not None and pred(r)), Decimal(0))
            for k, pred in [(("user", "bob", "day"), lambda r: r["user"] == "bob"),
                            (("team", "blue", "month"), lambda r: r["team"] == "blue"),
                            (("global", "global", "month"), lambda r: True)]}
    assert {k: v[0] for k, v in want.items()} == cost
    assert cost[("user", "bob", "day")] > 0
    deadline = time.monotonic() + 5  # the collector caches the store's answer for a second
    while True:
        fams = scrape(gw)
        spent = by_labels(samples(fams, "spendgate_budget_spent_usd"), "scope", "name", "period")
        caps = by_labels(samples(fams, "spendgate_budget_cap_usd"), "scope", "name", "period")
        ok = set(spent) == set(want) == set(caps) and all(
            math.isclose(spent[k], float(s), rel_tol=1e-9, abs_tol=1e-15)
            and math.isclose(caps[k], float(c), rel_tol=1e-9)
            for k, (s, c) in want.items())
        if ok:
            break
        assert time.monotonic() < deadline, (spent, caps, want)
        time.sleep(0.2)
    assert caps[("user", "bob", "day")] == float(BOB_CAP_USD)


def test_audit_queue_and_errors_at_rest(settled: tuple[list[dict[str, Any]], dict[str, Any]]) -> None:
    _, fams = settled
    assert [s.value for s in samples(fams, "spendgate_audit_queue_depth")] == [0.0]
    assert [s.value for s in samples(fams, "spendgate_audit_write_errors_total")] == [0.0]
    assert [s.value for s in samples(fams, "spendgate_alert_failures_total")] == [0.0]
    assert samples(fams, "spendgate_alerts_sent_total") == []  # no Slack configured: nothing sent


_REQUEST_ID = re.compile(r"sgr_[0-9a-f]{8,}")


def test_label_values_are_bounded_and_never_ids_paths_or_keys(
        gw: GatewayProcess, settled: tuple[list[dict[str, Any]], dict[str, Any]]) -> None:
    rows, fams = settled
    key_ids = {k["key_id"] for k in gw.cli_json("keys", "list")}
    request_ids = {r["id"] for r in rows}
    for fam in fams.values():
        for s in fam.samples:
            for name, value in s.labels.items():
                assert not _REQUEST_ID.search(value) and value not in request_ids, (s.name, name, value)
                assert "/" not in value and "sg_" not in value and "?" not in value, (s.name, name, value)
                assert value not in key_ids, (s.name, name, value)
                assert len(value) <= 100, (s.name, name, value)
    users = {s.labels["user"] for s in samples(fams, "spendgate_requests_total")}
    assert users == {"alice", "bob", "carol", "dave", "unknown"}
    providers = {s.labels["provider"] for s in samples(fams, "spendgate_requests_total")}
    assert providers == {r["provider"] for r in rows}


def test_metrics_server_is_not_the_proxy(gw: GatewayProcess) -> None:
    """/metrics answers on its own port, directly; the proxy port does not serve it."""
    r = httpx.get(gw.metrics_url, trust_env=False, timeout=5)
    assert r.status_code == 200 and r.headers["content-type"].startswith("text/plain")
    r2 = httpx.get(f"http://127.0.0.1:{gw.port}/metrics", trust_env=False, timeout=5)
    assert "spendgate_requests_total" not in r2.text


# --------------------------------------------------------------------------- cardinality

# Several times MAX_UNKNOWN_MODELS, so most names must fold into `other`; the bound itself for any
# number of names is a unit test of ModelLabels; this proves it holds through a real gateway.
CARDINALITY_REQUESTS = 300


async def _flood(gw: GatewayProcess, keys: list[str], models: list[str], concurrency: int = 32) -> Counter[int]:
    clients = [httpx.AsyncClient(proxy=gw.proxy_url(k), verify=gw.ssl_context(), trust_env=False, timeout=60,
                                 limits=httpx.Limits(max_connections=concurrency)) for k in keys]
    gate = asyncio.Semaphore(concurrency)

    async def one(i: int, model: str) -> int:
        async with gate:
            headers = {"x-mock-scenario": "error500"} if i % 10 == 9 else {}
            r = await clients[i % len(clients)].post(
                f"{OPENAI}/chat/completions", json={"model": model, "messages": MSGS, "max_tokens": 5},
                headers=headers)
            return r.status_code

    try:
        return Counter(await asyncio.gather(*(one(i, m) for i, m in enumerate(models))))
    finally:
        for c in clients:
            await c.aclose()


def test_random_model_names_keep_series_bounded(
        gw: GatewayProcess, fleet: dict[str, str], settled: tuple[list[dict[str, Any]], dict[str, Any]]) -> None:
    pricer = Pricer()

    def unknown_labels(fams: dict[str, Any]) -> set[tuple[str, str]]:
        pairs = {(s.labels["provider"], s.labels["model"]) for s in samples(fams, "spendgate_requests_total")}
        return {(p, m) for p, m in pairs if m not in ("other", "none") and not pricer.knows(p, m)}

    before = scrape(gw)
    rows_before = len(audit_rows(gw))
    admitted_before = len(unknown_labels(before))
    models = [f"rnd-{uuid.uuid4().hex}" for _ in range(CARDINALITY_REQUESTS)]
    t0 = time.perf_counter()
    statuses = asyncio.run(_flood(gw, [fleet["alice"], fleet["bob"], fleet["carol"]], models))
    took = time.perf_counter() - t0
    # Every caller here is under the global cap, so a model with no price is refused before it goes
    # upstream; the refusals are labelled like any request.
    assert statuses == Counter({403: CARDINALITY_REQUESTS}), statuses
    rows = wait_settled([gw], rows_before + CARDINALITY_REQUESTS, timeout=60)
    fams = scrape(gw)
    text_size = len(gw.metrics_text())
    print(f"\nMEASURE {CARDINALITY_REQUESTS} requests with random models through the gateway in {took:.1f} s "
          f"({CARDINALITY_REQUESTS / took:.0f}/s); /metrics {text_size / 1000:.0f} kB")
    # The audit log keeps every raw name; the metrics fold them.
    assert len({r["model_requested"] for r in rows} & set(models)) == CARDINALITY_REQUESTS
    requests = samples(fams, "spendgate_requests_total")
    labels_ = {(s.labels["provider"], s.labels["model"]) for s in requests}
    unknown = unknown_labels(fams)
    assert len(unknown) == MAX_UNKNOWN_MODELS, "unknown names are admitted up to the limit, no further"
    other = sum(s.value for s in requests if s.labels["model"] == "other")
    assert other == CARDINALITY_REQUESTS - (MAX_UNKNOWN_MODELS - admitted_before)
    known = labels_ - unknown - {(p, "other") for p, _ in labels_}
    users = {s.labels["user"] for s in requests}
    outcomes = {s.labels["outcome"] for s in requests}
    bound = len(users) * len(outcomes) * (MAX_UNKNOWN_MODELS + len(known) + 1)
    assert len(requests) <= bound, (len(requests), bound)
    providers = {p for p, _ in labels_}
    assert len(labels_) <= MAX_UNKNOWN_MODELS + len(known) + len(providers)  # `other` at most once per provider
    assert len(samples(fams, "spendgate_request_duration_seconds_count")) <= len(labels_)
    assert sum(s.value for s in requests) == len(rows)
    assert text_size < 1_000_000, text_size
