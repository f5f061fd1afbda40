"""Prometheus metrics: the only module that touches prometheus-client.

Counters are updated in memory when a request ends; the exposition runs on its own
small server thread (`[metrics].listen`), never through the proxy. Budget gauges are
read from the store at scrape time so every instance reports the same truth.
Label values are bounded: users and teams come from the key registry, models are
normalised to genai-prices' ids and unknown names fold into `other` past a limit.
"""

from __future__ import annotations

import logging
import threading
import time
from typing import Any, Callable, Iterable
from wsgiref.simple_server import WSGIServer

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, disable_created_metrics, start_wsgi_server
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily
from prometheus_client.registry import Collector

from spendgate.money import as_float
from spendgate.pricing import Pricer

log = logging.getLogger(__name__)

# Model latencies run from tens of milliseconds (embeddings) to minutes (long reasoning streams).
LATENCY_BUCKETS = (0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 20, 30, 60, 120, 180, 300)
OVERHEAD_BUCKETS = (0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25)
MAX_UNKNOWN_MODELS = 50

TOKEN_KINDS = ("input", "output", "cache_read", "cache_write", "reasoning")


class ModelLabels:
    """Normalises model names to a bounded label set."""

    def __init__(self, pricer: Pricer, max_unknown: int = MAX_UNKNOWN_MODELS) -> None:
        self._pricer = pricer
        self._max_unknown = max_unknown
        self._unknown: set[tuple[str, str]] = set()
        self._known: dict[tuple[str, str], str] = {}

    def __call__(self, provider: str, model: str | None) -> str:
        if not model:
            return "none"
        key = (provider, model)
        hit = self._known.get(key)
        if hit is not None:
            return hit
        canonical = self._pricer.normalise_model(provider, model)
        if canonical != model or self._pricer.knows(provider, model):
            if len(self._known) < 10_000:
                self._known[key] = canonical
            return canonical
        if key in self._unknown:
            return model
        if len(self._unknown) < self._max_unknown and _exposable(model):
            self._unknown.add(key)
            return model
        return "other"


def _exposable(model: str) -> bool:
    """Quotes, newlines and any Unicode are escaped by the exposition; a lone surrogate (from a JSON
    "\\ud800") cannot be encoded at all and a NUL upsets parsers: either would break /metrics for everyone."""
    if len(model) > 100 or "\x00" in model:
        return False
    try:
        model.encode("utf-8")
    except UnicodeEncodeError:
        return False
    return True


class Metrics:
    """The metric objects, on their own registry (one per gateway process)."""

    def __init__(self, registry: CollectorRegistry | None = None) -> None:
        disable_created_metrics()  # type: ignore[no-untyped-call]  # `_created` series double /metrics; no dashboard uses them
        self.registry = registry or CollectorRegistry()
        r = self.registry
        self.requests = Counter("spendgate_requests", "Requests to model hosts, by outcome.",
                                ["user", "team", "provider", "model", "outcome"], registry=r)
        self.tokens = Counter("spendgate_tokens", "Tokens by kind.",
                              ["user", "team", "provider", "model", "kind"], registry=r)
        self.cost = Counter("spendgate_cost_usd", "Spend in USD.", ["user", "team", "provider", "model"], registry=r)
        self.duration = Histogram("spendgate_request_duration_seconds", "Request duration, end to end.",
                                  ["provider", "model"], buckets=LATENCY_BUCKETS, registry=r)
        self.ttft = Histogram("spendgate_time_to_first_token_seconds", "Time to the first streamed chunk.",
                              ["provider", "model"], buckets=LATENCY_BUCKETS, registry=r)
        self.blocked = Counter("spendgate_blocked", "Requests the gateway refused, by reason.",
                               ["user", "reason"], registry=r)
        self.alerts_sent = Counter("spendgate_alerts_sent", "Slack alerts delivered, by kind.", ["kind"], registry=r)
        self.alert_failures = Counter("spendgate_alert_failures", "Slack alerts that could not be delivered.",
                                      registry=r)
        self.overhead = Histogram("spendgate_overhead_seconds",
                                  "Time the gateway itself adds (upstream time excluded).",
                                  ["provider"], buckets=OVERHEAD_BUCKETS, registry=r)
        self.queue_depth = Gauge("spendgate_audit_queue_depth", "Audit rows waiting to be committed.", registry=r)
        self._server: WSGIServer | None = None
        # Each metric's labelled children by label values: `labels()` takes a lock and checks its values
        # on every call, ~1 µs each and six per request; the label sets are bounded (see above).
        self._children: dict[tuple[Any, ...], Any] = {}

    def child(self, metric: Any, *labels: str) -> Any:
        """`metric.labels(*labels)`, looked up once per label set (never removed: no series is)."""
        key = (id(metric), *labels)
        got = self._children.get(key)
        if got is None:
            got = self._children[key] = metric.labels(*labels)
        return got

    def serve(self, host: str, port: int) -> None:
        self._server, _ = start_wsgi_server(port, addr=host, registry=self.registry)

    def stop(self) -> None:
        # Close the socket only: shutdown() would wait on the serving thread's poll loop,
        # which is a daemon and ends with the process.
        if self._server is not None:
            self._server.server_close()
            self._server = None


class StoreCollector(Collector):
    """Budget gauges and audit write errors, read at scrape time (cached briefly)."""

    def __init__(self, budget_status: Callable[[], list[dict[str, Any]]], write_errors: Callable[[], int],
                 ttl: float = 1.0, wait: float = 2.0) -> None:
        self.budget_status = budget_status
        self.write_errors = write_errors
        self.ttl = ttl
        self.wait = wait  # a scrape never waits longer than this for the database
        self._cache: tuple[float, list[dict[str, Any]]] = (0.0, [])
        self._lock = threading.Lock()
        self._refreshing: threading.Thread | None = None

    def collect(self) -> Iterable[Any]:
        spent = GaugeMetricFamily("spendgate_budget_spent_usd", "Spend this period against a cap (settled).",
                                  labels=["scope", "name", "period"])
        cap = GaugeMetricFamily("spendgate_budget_cap_usd", "The cap.", labels=["scope", "name", "period"])
        for b in self._budgets():
            labels = [b["scope"], b["name"], b["period"]]
            spent.add_metric(labels, as_float(b["spent_nusd"]))
            cap.add_metric(labels, as_float(b["cap_nusd"]))
        yield spent
        yield cap
        errors = CounterMetricFamily("spendgate_audit_write_errors", "Failed audit batch commits.")
        errors.add_metric([], self.write_errors())
        yield errors

    def _budgets(self) -> list[dict[str, Any]]:
        """Fresh values when the database answers in time; the last known ones when it does not,
        so a hung database never makes /metrics (and so the whole gateway) look down."""
        with self._lock:
            at, rows = self._cache
            if at and time.monotonic() - at < self.ttl:
                return rows
            if self._refreshing is None or not self._refreshing.is_alive():
                self._refreshing = threading.Thread(target=self._refresh, name="spendgate-metrics-budgets", daemon=True)
                self._refreshing.start()
            worker = self._refreshing
        worker.join(self.wait)
        return self._cache[1]

    def _refresh(self) -> None:
        try:
            rows = self.budget_status()
        except Exception as e:
            log.warning("metrics: cannot read budgets: %s", type(e).__name__)
            return
        self._cache = (time.monotonic(), rows)
