"""spendgate.metrics in isolation: model label folding and its bound, and the store-backed gauges
read at scrape time (when the store fails, hangs, or is scraped often). A fresh `Metrics` (its own
CollectorRegistry) per test, prometheus-client style. What a finished request adds is in
tests/unit/stages/test_metrics.py."""

from __future__ import annotations

import socket
import threading
from typing import Any

import pytest
from prometheus_client import generate_latest
from prometheus_client.parser import text_string_to_metric_families

from spendgate.metrics import Metrics, ModelLabels, StoreCollector
from spendgate.pricing import Pricer
from spendgate.store import Database
from spendgate.store.budgets import BudgetLedger

PRICER = Pricer()


class BudgetRows:
    """A `budget_status` callable: the rows a store would return, or its failure."""

    def __init__(self, rows: list[dict[str, Any]] | None = None) -> None:
        self.rows = rows or []
        self.fail = False
        self.calls = 0

    def __call__(self) -> list[dict[str, Any]]:
        self.calls += 1
        if self.fail:
            raise ConnectionError("database gone")
        return self.rows


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
    ("anthropic", "claude-3-5-haiku-20241022", "claude-3-5-haiku-latest"),  # genai-prices' id for it
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
    assert labels("openai", "gpt-4o-2024-05-13") == "gpt-4o-2024-05-13"


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


@pytest.mark.parametrize("model", ["lone \ud800 surrogate", "nul\x00byte"])
def test_unexposable_unknown_names_are_other(model: str) -> None:
    assert ModelLabels(PRICER)("openai", model) == "other"


# --------------------------------------------------------------------------- scrape-time gauges


def test_budget_gauges_come_from_the_store_and_survive_its_failure() -> None:
    rows = BudgetRows([{"scope": "user", "name": "bob", "period": "day", "cap_nusd": 5_000_000_000,
                        "spent_nusd": 1_250_000_000}])
    m = Metrics()
    m.registry.register(StoreCollector(rows, lambda: 3, ttl=0.0))
    key = (("name", "bob"), ("period", "day"), ("scope", "user"))
    s = series(m)
    assert s["spendgate_budget_spent_usd"] == {key: 1.25} and s["spendgate_budget_cap_usd"] == {key: 5.0}
    assert s["spendgate_audit_write_errors_total"] == {(): 3.0}
    rows.fail = True
    s = series(m)  # /metrics still answers: the last known budgets, and the write errors
    assert s["spendgate_budget_spent_usd"] == {key: 1.25}
    assert s["spendgate_audit_write_errors_total"] == {(): 3.0}
    rows.fail = False
    rows.rows[0]["spent_nusd"] = 2_000_000_000
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
    silent = SilentDatabase()
    db = Database(f"postgresql+psycopg://spendgate@127.0.0.1:{silent.port}/spendgate")
    m = Metrics()
    m.registry.register(StoreCollector(BudgetLedger(db).budget_status, lambda: 0))
    answered = threading.Event()
    scraper = threading.Thread(target=lambda: (generate_latest(m.registry), answered.set()), daemon=True)
    try:
        scraper.start()
        assert answered.wait(8.0), "GET /metrics hangs while the database does not answer"
    finally:
        silent.close()  # the hung connection attempt now fails and the scrape thread ends
        scraper.join(10)
        db.close()


def test_budget_reads_are_cached_between_scrapes() -> None:
    rows = BudgetRows([])
    m = Metrics()
    m.registry.register(StoreCollector(rows, lambda: 0, ttl=60.0))
    for _ in range(5):
        generate_latest(m.registry)
    assert rows.calls == 1, "one database read per ttl, however often Prometheus scrapes"


def test_each_metrics_has_its_own_registry() -> None:
    a, b = Metrics(), Metrics()
    a.requests.labels("u", "t", "openai", "gpt-4o", "completed").inc()
    assert "spendgate_requests_total" in series(a) and "spendgate_requests_total" not in series(b)
    assert not any(name.endswith("_created") for name in series(a))  # no `_created` series
