"""Process-wide objects, built once from settings and handed to every stage."""

from __future__ import annotations

import logging
import socket
import threading
import time
from dataclasses import dataclass, field
from datetime import timedelta
from typing import Any

from spendgate.access import MODEL_PORT
from spendgate.auditlog import AuditWriter
from spendgate.holds import LiveHolds
from spendgate.metrics import Metrics, ModelLabels
from spendgate.pricing import Pricer
from spendgate.providers import HostMatcher
from spendgate.models import utcnow
from spendgate.registry import KeyRegistry
from spendgate.settings import ProviderSettings, Settings
from spendgate.store import Store

log = logging.getLogger("spendgate")


@dataclass
class Runtime:
    settings: Settings
    store: Store
    registry: KeyRegistry
    hosts: HostMatcher
    writer: AuditWriter
    pricer: Pricer
    metrics: Metrics
    model_labels: ModelLabels
    _insecure_upstreams: set[tuple[str, int]] = field(default_factory=set)
    _upstreams: frozenset[tuple[str, int]] = frozenset()
    holds: LiveHolds = field(default_factory=LiveHolds)
    instance_id: str = ""  # host:port, stable across restarts of the same gateway
    _stopping: threading.Event = field(default_factory=threading.Event)
    alerts: Any = None  # spendgate.alerting.AlertEvaluator when Slack alerts are configured

    @classmethod
    def build(cls, settings: Settings) -> "Runtime":
        store = Store(settings.database_url)
        pricer = Pricer(settings.price_overrides)
        hostmap: dict[str, str] = {}
        insecure: set[tuple[str, int]] = set()
        for p in settings.providers:
            for h in p.hosts:
                hostmap[h] = p.name
            if p.upstream is not None and not p.verify_upstream_tls:
                insecure.add((p.upstream.host, p.upstream.port))
        instance_id = f"{socket.gethostname()}:{settings.proxy.listen.port}"[:40]
        upstreams = frozenset((p.upstream.host, p.upstream.port) for p in settings.providers if p.upstream is not None)
        return cls(settings, store, KeyRegistry(store), HostMatcher(hostmap), AuditWriter(store),
                   pricer, Metrics(), ModelLabels(pricer), insecure, upstreams, instance_id=instance_id)

    def start(self) -> None:
        """Blocking: migrate an empty database, load keys, start the background threads."""
        if self.store.current_revision() is None:
            before, after = self.store.upgrade()
            log.info("database initialised (schema %s)", after)
        elif self.store.current_revision() != self.store.head_revision():
            raise SystemExit(
                f"database schema is at {self.store.current_revision()}, this gateway needs "
                f"{self.store.head_revision()}: run `spendgate db upgrade`"
            )
        mine = self.store.mark_instance_incomplete(self.instance_id)
        if mine:
            log.warning("%d requests were in flight when this gateway last stopped; their audit rows are marked incomplete", mine)
        stale = self.store.mark_stale_incomplete(utcnow() - timedelta(seconds=self.settings.reservation_ttl_seconds))
        if stale:
            log.warning("%d audit rows left open by a stopped gateway are marked incomplete", stale)
        self._warm_up()
        self.registry.start()
        self.writer.start()
        from spendgate.alerting import start_alerting

        self.alerts = start_alerting(self)
        self.metrics.serve(self.settings.metrics_listen.host, self.settings.metrics_listen.port)
        self._maintenance = threading.Thread(target=self._maintain, name="spendgate-maintenance", daemon=True)
        self._maintenance.start()

    def _warm_up(self) -> None:
        """Load tokenizer and price data now: first use on the event loop would stall it ~0.3 s."""
        from spendgate.tokens import encoding_for
        from spendgate.usage import Usage

        for model in ("gpt-4o", "gpt-4"):
            encoding_for(model)
        self.pricer.cost("openai", "gpt-4o", Usage(input_tokens=1, output_tokens=1))

    def _maintain(self) -> None:
        """Every 15 s (sooner for short TTLs): release reservations of dead instances. Hourly: purge content past retention."""
        last_purge = 0.0
        while True:
            try:
                now = utcnow()
                self.store.extend_reservations(self.holds.snapshot(), now + timedelta(seconds=self.settings.reservation_ttl_seconds))
                n = self.store.release_expired(now)
                if n:
                    log.warning("released %d expired budget reservations (a gateway stopped mid-request)", n)
                if time.monotonic() - last_purge > 3600 or not last_purge:
                    last_purge = time.monotonic()
                    n = self.store.purge_content(utcnow() - timedelta(days=self.settings.content_retention_days))
                    if n:
                        log.info("purged captured content of %d requests older than %d days", n,
                                 self.settings.content_retention_days)
            except Exception as e:
                log.warning("maintenance failed: %s", type(e).__name__)
            if self._stopping.wait(min(15.0, max(1.0, self.settings.reservation_ttl_seconds / 3))):
                return

    def stop(self) -> None:
        self._stopping.set()
        if self.alerts is not None:
            self.alerts.stop()
        self.metrics.stop()
        self.writer.stop()
        self.registry.stop()
        self.store.close()

    def provider_for_host(self, host: str) -> ProviderSettings | None:
        name = self.hosts.match(host)
        return self.settings.provider(name) if name else None

    def is_model_host(self, host: str) -> bool:
        return self.hosts.match(host) is not None

    def model_upstream(self, address: tuple[str, int]) -> bool:
        """A configured `upstream`, or a provider's own host on 443: the only places the team's keys go."""
        host, port = address
        if (host, port) in self._upstreams:
            return True
        return port == MODEL_PORT and self.hosts.match(host) is not None

    def verify_upstream(self, host: str, port: int) -> bool:
        return (host, port) not in self._insecure_upstreams
