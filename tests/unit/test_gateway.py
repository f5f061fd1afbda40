"""spendgate.gateway, the composition root, in-process (no proxy, no port but an ephemeral /metrics):
what it wires that no single module does."""

from __future__ import annotations

from pathlib import Path

from prometheus_client import generate_latest
from prometheus_client.parser import text_string_to_metric_families

from spendgate.gateway import Gateway
from spendgate.settings import parse_settings
from spendgate.store.keys import KeyStore


def test_queue_depth_and_budget_gauges_are_read_at_scrape_time(tmp_path: Path) -> None:
    # (Before the redesign MetricsStage registered these; now Gateway.start wires the writer and the ledger.)
    settings = parse_settings({"database": {"url": f"sqlite:///{tmp_path / 'gw.db'}"},
                               "metrics": {"listen": "127.0.0.1:0"}}, {})
    gw = Gateway(settings)
    gw.start()
    try:
        KeyStore(gw.db).set_budget("user", "bob", 5_000_000_000, "day", actor="t")
        gw.writer._pending = 17  # as if 17 rows waited for their commit

        def sample(name: str) -> float:
            fams = text_string_to_metric_families(generate_latest(gw.metrics.registry).decode())
            return next(s.value for f in fams for s in f.samples if s.name == name)

        assert sample("spendgate_audit_queue_depth") == 17.0
        assert sample("spendgate_budget_cap_usd") == 5.0
        assert sample("spendgate_audit_write_errors_total") == 0.0
        gw.writer._pending = 0
        assert sample("spendgate_audit_queue_depth") == 0.0
    finally:
        gw.stop()
