"""spendgate.metrics in isolation: model label folding and its bound, what one finished request
adds, the store-backed gauges when the store fails, label escaping, and two measurements —
the cost of counting a request (on the request path) and the size of /metrics with 200 users
x 20 models. A fresh `Metrics` (its own CollectorRegistry) per test, prometheus-client style."""

from __future__ import annotations

import random
import socket
import statistics
import string
import threading
import time
from collections import Counter
from types import SimpleNamespace
from typing import Any

import pytest
from mitmproxy import http
from mitmproxy.test import tflow
from prometheus_client import generate_latest
from prometheus_client.parser import text_string_to_metric_families

from spendgate.call import META, Call, new_request_id
from spendgate.metrics import MAX_UNKNOWN_MODELS, Metrics, MetricsStage, ModelLabels, StoreCollector
from spendgate.pricing import Pricer
from spendgate.settings import parse_settings

SETTINGS = parse_settings({"database": {"url": "sqlite://"}}, {})
PRICER = Pricer()


class FakeStore:
    def __init__(self, rows: list[dict[str, Any]] | None = None) -> None:
        self.rows = rows or []
        self.fail = False
        self.calls = 0

    def budget_status(self) -> list[dict[str, Any]]:
        self.calls += 1
        if self.fail:
            raise ConnectionError("database gone")
        return self.rows


def fake_runtime(store: FakeStore | None = None, queue_depth: int = 0, write_errors: int = 0) -> Any:
    writer = SimpleNamespace(queue_depth=queue_depth, stats=SimpleNamespace(write_errors=write_errors))
    return SimpleNamespace(writer=writer, store=store or FakeStore())


def new_stage(store: FakeStore | None = None, labels: ModelLabels | None = None) -> tuple[MetricsStage, Metrics]:
    m = Metrics()
    return MetricsStage(fake_runtime(store), m, labels or ModelLabels(PRICER)), m


def finished_flow(user: str | None = "alice", team: str | None = "red", provider: str = "openai",
                  model: str | None = "gpt-4o", outcome: str = "completed", light: bool = False,
                  **fields: Any) -> http.HTTPFlow:
    """A flow as MetricsStage sees it after record.py finished it. `light`: only the metadata the
    stage reads (tflow.tflow costs ~0.3 ms; the bulk tests below make tens of thousands)."""
    p = SETTINGS.provider(provider)
    assert p is not None
    call = Call(request_id=new_request_id(), provider=p)
    call.key = SimpleNamespace(user=user, team=team) if user else None  # type: ignore[assignment]
    call.model_requested = model
    call.outcome = outcome
    final = {"latency_ms": 250.0, "input_tokens": 100, "output_tokens": 20, "cost_nusd": 450_000,
             "model_reported": None, **fields}
    call.extra.update(finished=True, final=final, t_pre=0.0012, t_post=0.0003)
    if light:
        return SimpleNamespace(metadata={META: call})  # type: ignore[return-value]
    flow = tflow.tflow(resp=True)
    flow.metadata[META] = call
    return flow


def series(m: Metrics) -> dict[str, dict[tuple[tuple[str, str], ...], float]]:
    """{sample name: {sorted labels: value}} of the registry's exposition, via the real parser."""
    out: dict[str, dict[tuple[tuple[str, str], ...], float]] = {}
    for fam in text_string_to_metric_families(generate_latest(m.registry).decode()):
        for s in fam.samples:
            out.setdefault(s.name, {})[tuple(sorted(s.labels.items()))] = s.value
    return out


# --------------------------------------------------------------------------- model labels


@pytest.mark.parametrize("provider, model, want", [
    ("openai", "gpt-4o-2024-08-06", "gpt-4o"),        # a dated snapshot folds into its family
    ("openai", "gpt-4o", "gpt-4o"),
    ("anthropic", "claude-3-5-haiku-20241022", PRICER.normalise_model("anthropic", "claude-3-5-haiku-20241022")),
    ("openai", None, "none"),
    ("openai", "", "none"),
    ("openai", "acme-private-finetune", "acme-private-finetune"),  # unknown, under the limit: kept
])
def test_model_labels_fold_known_names(provider: str, model: str | None, want: str) -> None:
    assert ModelLabels(PRICER)(provider, model) == want


def test_dated_snapshots_share_one_label() -> None:
    labels = ModelLabels(PRICER)
    assert labels("anthropic", "claude-3-5-haiku-20241022") != "claude-3-5-haiku-20241022"
    assert {labels("openai", m) for m in ("gpt-4o", "gpt-4o-2024-11-20", "gpt-4o-2024-08-06")} == {"gpt-4o"}
    # A snapshot genai-prices prices on its own (gpt-4o-2024-05-13 costs more) keeps its own label.
    assert labels("openai", "gpt-4o-2024-05-13") == PRICER.normalise_model("openai", "gpt-4o-2024-05-13")


def test_unknown_models_fold_into_other_past_the_limit() -> None:
    labels = ModelLabels(PRICER, max_unknown=3)
    assert [labels("openai", f"zz-unknown-{i}") for i in range(5)] == [
        "zz-unknown-0", "zz-unknown-1", "zz-unknown-2", "other", "other"]
    assert labels("openai", "zz-unknown-1") == "zz-unknown-1"  # an admitted name keeps its label
    assert labels("openai", "gpt-4o-2024-08-06") == "gpt-4o"  # known names are not limited


def test_overlong_unknown_names_are_other_even_below_the_limit() -> None:
    labels = ModelLabels(PRICER)
    assert labels("openai", "z" * 101) == "other"
    assert labels("openai", "z" * 100) == "z" * 100


# --------------------------------------------------------------------------- one request


def test_a_finished_request_is_counted_once_with_every_metric() -> None:
    stage, m = new_stage()
    flow = finished_flow(cache_read_tokens=7, ttft_ms=80.0, model_reported="gpt-4o-2024-08-06")
    stage.response(flow)
    stage.error(flow)  # a stream that ends in `error` after its response: still one request
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
    assert s["spendgate_overhead_seconds_sum"] == {(("provider", "openai"),): pytest.approx(0.0015)}
    assert "spendgate_blocked_total" not in s


def test_unfinished_or_foreign_flows_are_not_counted() -> None:
    stage, m = new_stage()
    flow = finished_flow()
    flow.metadata[META].extra["finished"] = False  # record.py has not settled it
    stage.response(flow)
    stage.response(tflow.tflow(resp=True))  # not a model request: no Call
    assert "spendgate_requests_total" not in series(m)


def test_a_refused_request_counts_as_a_block_but_not_as_latency() -> None:
    stage, m = new_stage()
    stage.response(finished_flow(user="bob", team=None, outcome="blocked_cap", input_tokens=None,
                                 output_tokens=None, cost_nusd=None))
    stage.response(finished_flow(user=None, outcome="blocked_auth", input_tokens=None, output_tokens=None,
                                 cost_nusd=None))
    s = series(m)
    assert s["spendgate_blocked_total"] == {(("reason", "cap"), ("user", "bob")): 1.0,
                                            (("reason", "auth"), ("user", "unknown")): 1.0}
    assert {dict(k)["team"] for k in s["spendgate_requests_total"]} == {"none"}
    assert "spendgate_request_duration_seconds_count" not in s
    assert "spendgate_tokens_total" not in s and "spendgate_cost_usd_total" not in s


# --------------------------------------------------------------------------- scrape-time gauges


def test_budget_gauges_come_from_the_store_and_survive_its_failure() -> None:
    store = FakeStore([{"scope": "user", "name": "bob", "period": "day", "cap_nusd": 5_000_000_000,
                        "spent_nusd": 1_250_000_000}])
    rt = fake_runtime(store, write_errors=3)
    m = Metrics()
    m.registry.register(StoreCollector(rt, ttl=0.0))
    key = (("name", "bob"), ("period", "day"), ("scope", "user"))
    s = series(m)
    assert s["spendgate_budget_spent_usd"] == {key: 1.25} and s["spendgate_budget_cap_usd"] == {key: 5.0}
    assert s["spendgate_audit_write_errors_total"] == {(): 3.0}
    store.fail = True
    s = series(m)  # /metrics still answers: the last known budgets, and the write errors
    assert s["spendgate_budget_spent_usd"] == {key: 1.25}
    assert s["spendgate_audit_write_errors_total"] == {(): 3.0}
    store.fail = False
    store.rows[0]["spent_nusd"] = 2_000_000_000
    assert series(m)["spendgate_budget_spent_usd"] == {key: 2.0}


class SilentDatabase:
    """A TCP port that accepts connections and never answers: a PostgreSQL server that hangs
    (overloaded, or a half-open network path)."""

    def __init__(self) -> None:
        self.sock = socket.create_server(("127.0.0.1", 0))
        self.port = self.sock.getsockname()[1]
        self.conns: list[socket.socket] = []
        threading.Thread(target=self._accept, daemon=True).start()

    def _accept(self) -> None:
        while True:
            try:
                self.conns.append(self.sock.accept()[0])
            except OSError:
                return

    def close(self) -> None:
        self.sock.close()
        for c in self.conns:
            c.close()


def test_a_scrape_answers_when_the_database_hangs() -> None:
    """/metrics must answer within Prometheus' scrape timeout (10 s by default) even when the
    database does not: otherwise every instance looks down (`up == 0`, SpendgateGatewayDown)
    when only the database is, and the audit-error counter on the same page is lost too."""
    from spendgate.store import Store

    db = SilentDatabase()
    store = Store(f"postgresql+psycopg://spendgate@127.0.0.1:{db.port}/spendgate")
    m = Metrics()
    m.registry.register(StoreCollector(SimpleNamespace(store=store, writer=fake_runtime().writer)))
    answered = threading.Event()
    scraper = threading.Thread(target=lambda: (generate_latest(m.registry), answered.set()), daemon=True)
    try:
        scraper.start()
        assert answered.wait(8.0), "GET /metrics hangs while the database does not answer"
    finally:
        db.close()  # the hung connection attempt now fails and the scrape thread ends
        scraper.join(10)
        store.close()


def test_budget_reads_are_cached_between_scrapes() -> None:
    store = FakeStore([])
    m = Metrics()
    m.registry.register(StoreCollector(fake_runtime(store), ttl=60.0))
    for _ in range(5):
        generate_latest(m.registry)
    assert store.calls == 1, "one database read per ttl, however often Prometheus scrapes"


def test_queue_depth_is_read_at_scrape_time() -> None:
    rt = fake_runtime()
    m = Metrics()
    MetricsStage(rt, m, ModelLabels(PRICER))
    rt.writer.queue_depth = 17
    assert series(m)["spendgate_audit_queue_depth"] == {(): 17.0}


@pytest.mark.parametrize("model", ['quote"d', "back\\slash", "new\nline", "ünïcødé-模型", "spaces and, commas"])
def test_odd_model_names_round_trip_through_the_exposition(model: str) -> None:
    stage, m = new_stage()
    stage.response(finished_flow(model=model))
    (key,) = series(m)["spendgate_requests_total"]
    assert dict(key)["model"] == model


@pytest.mark.parametrize("model", ["lone \ud800 surrogate", "nul\x00byte", "m" * 101])
def test_unexposable_model_names_fold_into_other(model: str) -> None:
    """One hostile model name must not break /metrics for every scrape after it."""
    stage, m = new_stage()
    stage.response(finished_flow(model=model))
    (key,) = series(m)["spendgate_requests_total"]
    assert dict(key)["model"] == "other"
    generate_latest(m.registry).decode("utf-8")


# --------------------------------------------------------------------------- cardinality


def _random_model(rng: random.Random) -> str:
    return "".join(rng.choices(string.ascii_lowercase + string.digits + "-._", k=rng.randint(3, 40)))


def test_ten_thousand_random_model_names_give_a_bounded_number_of_series() -> None:
    rng = random.Random(6)
    labels = ModelLabels(PRICER)
    stage, m = new_stage(labels=labels)
    users = ["alice", "bob", "carol"]
    outcomes = ["completed", "upstream_error", "client_aborted"]
    known = ["gpt-4o-2024-08-06", "gpt-4o-2024-11-20", "gpt-4o-mini-2024-07-18", "gpt-4.1-2025-04-14"]
    names = {_random_model(rng) for _ in range(12_000)}
    names = set(list(names)[:10_000])
    assert len(names) == 10_000
    sent = 0
    for i, name in enumerate(sorted(names, key=lambda _: rng.random())):
        model = known[i % len(known)] if i % 10 == 0 else name
        stage.response(finished_flow(user=users[i % 3], model=model, outcome=outcomes[(i // 3) % 3], light=True))
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
    """Measure: MetricsStage._count per finished request, steady state (label children exist)."""
    stage, _ = new_stage()
    users = [f"user{i}" for i in range(20)]
    models = ["gpt-4o", "gpt-4o-mini", "gpt-4.1", "o3-mini", "gpt-4o-2024-08-06"]
    flows = [finished_flow(user=users[i % 20], model=models[i % 5], ttft_ms=90.0, cache_read_tokens=3, light=True)
             for i in range(6000)]
    for f in flows[:1000]:  # warm-up: create every label child once
        stage._count(f)
    times = []
    for f in flows[1000:]:
        t0 = time.perf_counter_ns()
        stage._count(f)
        times.append(time.perf_counter_ns() - t0)
    p50_us = statistics.median(times) / 1000
    p99_us = sorted(times)[int(len(times) * 0.99)] / 1000
    print(f"\nMEASURE metrics on the request path: MetricsStage._count p50 {p50_us:.1f} us, p99 {p99_us:.1f} us "
          f"({len(times)} requests)")
    assert p50_us < 1000, "counting a request must stay far below a millisecond"


def test_measure_metrics_size_with_200_users_and_20_models() -> None:
    """Measure: /metrics after 200 users each used 20 models (completed and upstream errors)."""
    store = FakeStore([{"scope": "user", "name": f"user{u:03d}", "period": "month", "cap_nusd": 50 * 10**9,
                        "spent_nusd": u * 10**8} for u in range(200)])
    stage, m = new_stage(store=store)
    providers = ["openai", "anthropic", "gemini"]
    models = [f"model-{i:02d}" for i in range(20)]  # unknown to genai-prices, under the limit: kept
    for u in range(200):
        for i, model in enumerate(models):
            for outcome in ("completed", "upstream_error"):
                stage.response(finished_flow(user=f"user{u:03d}", team=f"team{u % 10}", provider=providers[i % 3],
                                             model=model, outcome=outcome, ttft_ms=120.0, cache_read_tokens=5,
                                             light=True))
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
