"""The composition root: builds every process-wide object from the settings once, gives each
stage only what it uses, and starts and stops the background threads. The only module that
imports everything."""

from __future__ import annotations

import logging
import socket
from datetime import timedelta

from spendgate import alerts, edge
from spendgate.alerts.evaluator import AlertEvaluator
from spendgate.metrics import Metrics, ModelLabels, StoreCollector
from spendgate.pricing import Pricer
from spendgate.providers.tokens import encoding_for
from spendgate.providers.wire import Usage
from spendgate.settings import Settings
from spendgate.stages import build_stages
from spendgate.stages.pipeline import Pipeline
from spendgate.stages.routing import EdgeAnswers
from spendgate.store import Database, sqlite_path
from spendgate.store.alerts import AlertMarks
from spendgate.store.audit import AuditLog
from spendgate.store.budgets import BudgetLedger
from spendgate.store.keys import KeyStore
from spendgate.store.maintenance import LiveHolds, Maintenance
from spendgate.store.models import utcnow
from spendgate.store.registry import KeyRegistry
from spendgate.store.reports import Reports
from spendgate.store.writer import AuditWriter

log = logging.getLogger("spendgate")


class Gateway:
    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        self.db = Database(settings.database.url)
        self.keys = KeyStore(self.db)
        self.audit = AuditLog(self.db)
        self.ledger = BudgetLedger(self.db)
        self.marks = AlertMarks(self.db)
        self.reports = Reports(self.db)
        self.registry = KeyRegistry(self.keys)
        self.writer = AuditWriter(self.db)
        self.pricer = Pricer(settings.prices.overrides, settings.prices.fallback_rates)
        self.metrics = Metrics()
        self.model_labels = ModelLabels(self.pricer)
        self.holds = LiveHolds()
        self.maintenance = Maintenance(self.holds, self.ledger, self.audit, settings.budgets.reservation_ttl_seconds,
                                       settings.audit.content_retention_days)
        self.instance_id = f"{socket.gethostname()}:{settings.proxy.listen.port}"[:40]  # stable across restarts
        self.alerts: AlertEvaluator | None = None

    def start(self) -> None:
        """Blocking: initialise an empty database, load keys, start the background threads."""
        new_file = (path := sqlite_path(self.settings.database.url)) is not None and not path.exists()
        if new_file or self.db.current_revision() is None:
            _, after = self.db.upgrade()
            log.info("database initialised (schema %s)", after)
        self.db.require_current()
        mine = self.audit.mark_instance_incomplete(self.instance_id)
        if mine:
            log.warning("%d requests were in flight when this gateway last stopped; their audit rows are marked "
                        "incomplete", mine)
        ttl = timedelta(seconds=self.settings.budgets.reservation_ttl_seconds)
        stale = self.audit.mark_stale_incomplete(utcnow() - ttl)
        if stale:
            log.warning("%d audit rows left open by a stopped gateway are marked incomplete", stale)
        self._warm_up()
        self.registry.start()
        self.writer.start()
        self.alerts = alerts.start(self.settings, self.marks, self.reports, self.keys.user_team, self.metrics,
                                   lambda: self.writer.healthy, self.instance_id)
        if self.alerts is not None:
            self.writer.stats.on_error.append(self.alerts.on_store_error)
        self.metrics.registry.register(StoreCollector(self.ledger.budget_status,
                                                      lambda: self.writer.stats.write_errors))
        self.metrics.queue_depth.set_function(lambda: self.writer.queue_depth)
        self.metrics.serve(self.settings.metrics.listen.host, self.settings.metrics.listen.port)
        self.maintenance.start()

    def _warm_up(self) -> None:
        """Load tokenizer and price data now: first use on the event loop would stall it ~0.3 s."""
        for model in ("gpt-4o", "gpt-4"):
            encoding_for(model)
        self.pricer.cost("openai", "gpt-4o", Usage(input_tokens=1, output_tokens=1))

    def pipeline(self) -> Pipeline:
        """The stages as one mitmproxy addon, and mitmproxy's HTTP layer with the gateway's bounds."""
        p = self.settings.proxy
        edge.install(edge.Limits(p.max_request_bytes, p.max_header_bytes, p.header_timeout_seconds,
                                 p.upstream_timeout_seconds, p.stream_idle_timeout_seconds), EdgeAnswers())
        return Pipeline(build_stages(
            self.settings, registry=self.registry, writer=self.writer, reserve=self.writer.reserve,
            pricer=self.pricer, hold=self.holds.add, release=self.holds.discard, metrics=self.metrics,
            model_label=self.model_labels, alerts=self.alerts, instance_id=self.instance_id,
        ))

    def stop(self) -> None:
        self.maintenance.stop()
        if self.alerts is not None:
            self.alerts.stop()
        self.metrics.stop()
        self.writer.stop()
        self.registry.stop()
        self.db.close()
