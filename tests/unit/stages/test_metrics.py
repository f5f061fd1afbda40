"""The MetricsStage (`spendgate.stages.metrics`): what one finished request adds, counted from its
completed audit row (`call.audit.row`) and its timing, once per request; label escaping; the
bound on series; and two measurements — the cost of counting a request (on the request path) and
the size of /metrics with 200 users x 20 models. A fresh `Metrics` per test."""

from __future__ import annotations

import asyncio
import random
import statistics
import string
import time
from collections import Counter
from typing import Any

import pytest
from mitmproxy import http
from prometheus_client import generate_latest
from prometheus_client.parser import text_string_to_metric_families

from spendgate.metrics import MAX_UNKNOWN_MODELS, Metrics, ModelLabels, StoreCollector
from spendgate.pricing import Pricer
from spendgate.stages.call import META, Call
from spendgate.stages.metrics import MetricsStage
from spendgate.stages.pipeline import Pipeline
from spendgate.store.audit import AuditRow
from spendgate.store.models import utcnow
from spendgate.testing import tcall, tflow, tkey, tprovider

PRICER = Pricer()
FLOW = tflow()  # the stage reads only the Call; one flow serves the bulk tests


def new_stage(labels: ModelLabels | None = None) -> tuple[MetricsStage, Metrics]:
    m = Metrics()
    return MetricsStage(m, labels or ModelLabels(PRICER)), m


def finished_call(user: str | None = "alice", team: str | None = "red", provider: str = "openai",
                  model: str | None = "gpt-4o", outcome: str = "completed", **fields: Any) -> Call:
    """A Call as MetricsStage sees it once Record finished it: its completed audit row, its timing."""
    call = tcall(provider=tprovider(provider), key=tkey(user, team=team) if user else None, model_requested=model)
    values: dict[str, Any] = {"latency_ms": 250.0, "input_tokens": 100, "output_tokens": 20, "cost_nusd": 450_000,
                              "model_reported": None} | fields
    call.audit.row = AuditRow(id=call.request_id, started_at=call.started_at, ended_at=utcnow(),
                              provider=provider, host=call.host, method="POST", path="/v1/chat/completions",
                              endpoint_kind=call.endpoint_kind, outcome=outcome, user=user, team=team,
                              model_requested=model, **values)
    call.timing.pre, call.timing.post = 0.0012, 0.0003
    return call


def series(m: Metrics) -> dict[str, dict[tuple[tuple[str, str], ...], float]]:
    """{sample name: {sorted labels: value}} of the registry's exposition, via the real parser."""
    out: dict[str, dict[tuple[tuple[str, str], ...], float]] = {}
    for fam in text_string_to_metric_families(generate_latest(m.registry).decode()):
        for s in fam.samples:
            out.setdefault(s.name, {})[tuple(sorted(s.labels.items()))] = s.value
    return out


def end_through_the_pipeline(stage: MetricsStage, flow: http.HTTPFlow, *hooks: str) -> None:
    pipeline = Pipeline([stage])

    async def go() -> None:
        for hook in hooks:
            await getattr(pipeline, hook)(flow)

    asyncio.run(go())


# --------------------------------------------------------------------------- one request


def test_a_finished_request_is_counted_once_with_every_metric() -> None:
    stage, m = new_stage()
    flow = tflow(resp=http.Response.make(200, b"{}"))
    call = finished_call(cache_read_tokens=7, ttft_ms=80.0, model_reported="gpt-4o-2024-08-06")
    flow.metadata[META] = call
    # A stream that ends in `error` after its response is still one request: the pipeline finishes it once.
    end_through_the_pipeline(stage, flow, "response", "error")
    s = series(m)
    lab = (("model", "gpt-4o"), ("provider", "openai"), ("team", "red"), ("user", "alice"))
    assert s["spendgate_requests_total"] == {tuple(sorted(lab + (("outcome", "completed"),))): 1.0}
    assert s["spendgate_tokens_total"] == {tuple(sorted(lab + (("kind", k),))): v
                                           for k, v in (("input", 100.0), ("output", 20.0), ("cache_read", 7.0))}
    assert s["spendgate_cost_usd_total"] == {lab: 450_000 / 1e9}
    hist = (("model", "gpt-4o"), ("provider", "openai"))
    assert s["spendgate_request_duration_seconds_count"] == {hist: 1.0}
    assert s["spendgate_request_duration_seconds_sum"] == {hist: 0.25}
    assert s["spendgate_time_to_first_token_seconds_sum"] == {hist: 0.08}
    assert s["spendgate_overhead_seconds_sum"] == {(("provider", "openai"),): pytest.approx(0.0015)}  # pre + post
    assert "spendgate_blocked_total" not in s


def test_unfinished_or_foreign_flows_are_not_counted() -> None:
    stage, m = new_stage()
    call = finished_call()
    call.audit.row = None  # Record has not completed its row
    stage.finish(FLOW, call)
    end_through_the_pipeline(stage, tflow(resp=http.Response.make(200, b"")), "response")  # no Call: not ours
    assert "spendgate_requests_total" not in series(m)


def test_a_refused_request_counts_as_a_block_but_not_as_latency() -> None:
    stage, m = new_stage()
    stage.finish(FLOW, finished_call(user="bob", team=None, outcome="blocked_cap", input_tokens=0, output_tokens=0,
                                     cost_nusd=None))
    stage.finish(FLOW, finished_call(user=None, outcome="blocked_auth", input_tokens=0, output_tokens=0,
                                     cost_nusd=None))
    s = series(m)
    assert s["spendgate_blocked_total"] == {(("reason", "cap"), ("user", "bob")): 1.0,
                                            (("reason", "auth"), ("user", "unknown")): 1.0}
    assert {dict(k)["team"] for k in s["spendgate_requests_total"]} == {"none"}
    assert "spendgate_request_duration_seconds_count" not in s
    assert "spendgate_tokens_total" not in s and "spendgate_cost_usd_total" not in s


@pytest.mark.parametrize("model", ['quote"d', "back\\slash", "new\nline", "ünïcødé-模型", "spaces and, commas"])
def test_odd_model_names_round_trip_through_the_exposition(model: str) -> None:
    stage, m = new_stage()
    stage.finish(FLOW, finished_call(model=model))
    (key,) = series(m)["spendgate_requests_total"]
    assert dict(key)["model"] == model


@pytest.mark.parametrize("model", ["lone \ud800 surrogate", "nul\x00byte", "m" * 101])
def test_unexposable_model_names_fold_into_other(model: str) -> None:
    """One hostile model name must not break /metrics for every scrape after it."""
    stage, m = new_stage()
    stage.finish(FLOW, finished_call(model=model))
    (key,) = series(m)["spendgate_requests_total"]
    assert dict(key)["model"] == "other"
    generate_latest(m.registry).decode("utf-8")


# --------------------------------------------------------------------------- cardinality


def _random_model(rng: random.Random) -> str:
    return "".join(rng.choices(string.ascii_lowercase + string.digits + "-._", k=rng.randint(3, 40)))


def test_ten_thousand_random_model_names_give_a_bounded_number_of_series() -> None:
    rng = random.Random(6)
    labels = ModelLabels(PRICER)
    stage, m = new_stage(labels)
    users = ["alice", "bob", "carol"]
    outcomes = ["completed", "upstream_error", "client_aborted"]
    known = ["gpt-4o-2024-08-06", "gpt-4o-2024-11-20", "gpt-4o-mini-2024-07-18", "gpt-4.1-2025-04-14"]
    names = {_random_model(rng) for _ in range(12_000)}
    names = set(list(names)[:10_000])
    assert len(names) == 10_000
    sent = 0
    for i, name in enumerate(sorted(names, key=lambda _: rng.random())):
        model = known[i % len(known)] if i % 10 == 0 else name
        stage.finish(FLOW, finished_call(user=users[i % 3], model=model, outcome=outcomes[(i // 3) % 3]))
        sent += 1
    s = series(m)
    requests = s["spendgate_requests_total"]
    assert sum(requests.values()) == sent == 10_000  # nothing lost to the folding
    model_labels = {dict(k)["model"] for k in requests}
    known_labels = {lab for lab in model_labels if PRICER.knows("openai", lab)}
    unknown_labels = model_labels - known_labels - {"other"}
    assert "other" in model_labels
    assert len(unknown_labels) <= MAX_UNKNOWN_MODELS
    assert len(known_labels) <= len(known)
    bound = len(users) * len(outcomes) * (MAX_UNKNOWN_MODELS + len(known_labels) + 1)
    assert len(requests) <= bound, (len(requests), bound)
    assert len(s["spendgate_request_duration_seconds_count"]) <= MAX_UNKNOWN_MODELS + len(known_labels) + 1
    assert len(s["spendgate_cost_usd_total"]) <= len(users) * (MAX_UNKNOWN_MODELS + len(known_labels) + 1)


# --------------------------------------------------------------------------- measurements


def test_measure_the_cost_of_counting_a_request() -> None:
    """Measure: MetricsStage.finish per finished request, steady state (label children exist)."""
    stage, _ = new_stage()
    users = [f"user{i}" for i in range(20)]
    models = ["gpt-4o", "gpt-4o-mini", "gpt-4.1", "o3-mini", "gpt-4o-2024-08-06"]
    calls = [finished_call(user=users[i % 20], model=models[i % 5], ttft_ms=90.0, cache_read_tokens=3)
             for i in range(6000)]
    for c in calls[:1000]:  # warm-up: create every label child once
        stage.finish(FLOW, c)
    times = []
    for c in calls[1000:]:
        t0 = time.perf_counter_ns()
        stage.finish(FLOW, c)
        times.append(time.perf_counter_ns() - t0)
    p50_us = statistics.median(times) / 1000
    p99_us = sorted(times)[int(len(times) * 0.99)] / 1000
    print(f"\nMEASURE metrics on the request path: MetricsStage.finish p50 {p50_us:.1f} us, p99 {p99_us:.1f} us "
          f"({len(times)} requests)")
    assert p50_us < 1000, "counting a request must stay far below a millisecond"


def test_measure_metrics_size_with_200_users_and_20_models() -> None:
    """Measure: /metrics after 200 users each used 20 models (completed and upstream errors)."""
    budgets = [{"scope": "user", "name": f"user{u:03d}", "period": "month", "cap_nusd": 50 * 10**9,
                "spent_nusd": u * 10**8} for u in range(200)]
    stage, m = new_stage()
    m.registry.register(StoreCollector(lambda: budgets, lambda: 0))
    providers = ["openai", "anthropic", "gemini"]
    models = [f"model-{i:02d}" for i in range(20)]  # unknown to genai-prices, under the limit: kept
    for u in range(200):
        for i, model in enumerate(models):
            for outcome in ("completed", "upstream_error"):
                stage.finish(FLOW, finished_call(user=f"user{u:03d}", team=f"team{u % 10}", provider=providers[i % 3],
                                                 model=model, outcome=outcome, ttft_ms=120.0, cache_read_tokens=5))
    t0 = time.perf_counter()
    body = generate_latest(m.registry)
    scrape_ms = (time.perf_counter() - t0) * 1000
    fams = {f.name: f for f in text_string_to_metric_families(body.decode())}
    n = Counter({name: len(f.samples) for name, f in fams.items()})
    assert n["spendgate_requests"] == 200 * 20 * 2
    assert n["spendgate_tokens"] == 200 * 20 * 3
    assert n["spendgate_cost_usd"] == 200 * 20
    assert n["spendgate_budget_spent_usd"] == 200
    total = sum(n.values())
    print(f"\nMEASURE /metrics with 200 users x 20 models: {len(body) / 1e6:.2f} MB, {total} samples, "
          f"generated in {scrape_ms:.0f} ms")
    assert len(body) < 20e6
