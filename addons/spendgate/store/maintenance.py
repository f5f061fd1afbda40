"""Budget reservations this instance still holds, and the loop that keeps the store tidy.

The loop extends the holds of requests still running (so only a crashed instance's reservations
ever expire), releases expired ones, and purges captured content past its retention.
"""

from __future__ import annotations

import logging
import threading
import time
from datetime import timedelta

from spendgate.store.audit import AuditLog
from spendgate.store.budgets import BudgetLedger
from spendgate.store.models import utcnow

log = logging.getLogger(__name__)


class LiveHolds:
    def __init__(self) -> None:
        self._ids: set[str] = set()
        self._lock = threading.Lock()

    def add(self, request_id: str) -> None:
        with self._lock:
            self._ids.add(request_id)

    def discard(self, request_id: str) -> None:
        with self._lock:
            self._ids.discard(request_id)

    def snapshot(self) -> list[str]:
        with self._lock:
            return list(self._ids)


class Maintenance:
    """Every 15 s (sooner for short TTLs): extend live holds, release dead instances' ones.
    Hourly: purge captured content past retention."""

    def __init__(self, holds: LiveHolds, ledger: BudgetLedger, audit: AuditLog, ttl_seconds: int,
                 retention_days: int) -> None:
        self.holds = holds
        self.ledger = ledger
        self.audit = audit
        self.ttl = timedelta(seconds=ttl_seconds)
        self.retention = timedelta(days=retention_days)
        self._stopping = threading.Event()
        self._thread: threading.Thread | None = None

    def start(self) -> None:
        self._thread = threading.Thread(target=self._run, name="spendgate-maintenance", daemon=True)
        self._thread.start()

    def stop(self) -> None:
        self._stopping.set()

    def _run(self) -> None:
        last_purge = 0.0
        while True:
            try:
                now = utcnow()
                self.ledger.extend_reservations(self.holds.snapshot(), now + self.ttl)
                n = self.ledger.release_expired(now)
                if n:
                    log.warning("released %d expired budget reservations (a gateway stopped mid-request)", n)
                if time.monotonic() - last_purge > 3600 or not last_purge:
                    last_purge = time.monotonic()
                    n = self.audit.purge_content(utcnow() - self.retention)
                    if n:
                        log.info("purged captured content of %d requests older than %d days", n, self.retention.days)
            except Exception as e:
                log.warning("maintenance failed: %s: %s", type(e).__name__, str(e)[:200])
            if self._stopping.wait(min(15.0, max(1.0, self.ttl.total_seconds() / 3))):
                return
