"""In-memory key registry, refreshed from the store when its version changes.

Lookups are a dict access on the event loop. A daemon thread polls the one-row
`registry_version` every `poll_interval` (default 0.25 s) and reloads keys when it
moved, so revocations reach every instance sharing the database within a second
without a database round trip per request.
"""

from __future__ import annotations

import logging
import threading
import time
from datetime import datetime
from typing import Callable

from spendgate.keys import KeyRecord
from spendgate.store.budgets import BudgetDef
from spendgate.store.keys import KeyStore
from spendgate.store.models import utcnow

log = logging.getLogger(__name__)


class KeyRegistry:
    def __init__(self, store: KeyStore, poll_interval: float = 0.25, clock: Callable[[], datetime] = utcnow) -> None:
        self._store = store
        self._poll = poll_interval
        self._clock = clock
        self._keys: dict[str, KeyRecord] = {}
        self._budgets: dict[tuple[str, str], BudgetDef] = {}
        self._version = -1
        self._used: dict[str, datetime] = {}
        self._used_lock = threading.Lock()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._last_flush = time.monotonic()
        self.healthy = True

    def start(self) -> None:
        self.refresh()
        self._thread = threading.Thread(target=self._run, name="spendgate-registry", daemon=True)
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        if self._thread:
            self._thread.join(timeout=2)
        self._flush_used()

    def refresh(self) -> bool:
        """Reload when the store's version moved. Blocking: call from a thread."""
        v = self._store.registry_version()
        if v == self._version:
            return False
        version, records = self._store.load_keys()
        budgets = self._store.load_budgets()
        self._keys = {r.key_id: r for r in records}  # one assignment: readers see old or new, never half
        self._budgets = {(b.scope, b.name): b for b in budgets}
        self._version = version
        return True

    def _run(self) -> None:
        while not self._stop.wait(self._poll):
            try:
                self.refresh()
                if not self.healthy:
                    log.info("key registry: store reachable again")
                self.healthy = True
            except Exception as e:  # the store may be down; keep serving from memory
                if self.healthy:
                    log.error("key registry: cannot read the store: %s", type(e).__name__)
                self.healthy = False
            if time.monotonic() - self._last_flush > 5:
                self._flush_used()

    def budgets_for(self, user: str, team: str | None) -> list[BudgetDef]:
        """The caps that apply to a request: the user's, the team's, and the global one."""
        b = self._budgets
        found = [b.get(("user", user)), b.get(("team", team)) if team else None, b.get(("global", "global"))]
        return [x for x in found if x is not None]

    def get(self, key_id: str) -> KeyRecord | None:
        return self._keys.get(key_id)

    def load_one(self, key_id: str) -> KeyRecord | None:
        """Cache miss path (a key minted since the last poll). Blocking: call from a thread."""
        self.refresh()  # keys and budgets together, so a new key's cap is known with it
        return self._keys.get(key_id)

    def mark_used(self, key_id: str) -> None:
        with self._used_lock:
            self._used[key_id] = self._clock()

    def _flush_used(self) -> None:
        with self._used_lock:
            used, self._used = self._used, {}
        self._last_flush = time.monotonic()
        if used:
            try:
                self._store.touch_last_used(used)
            except Exception as e:
                log.warning("could not record key last-used times: %s", type(e).__name__)
