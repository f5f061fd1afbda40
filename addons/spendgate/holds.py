"""Budget reservations this instance still holds for requests in flight.

The maintenance thread extends their expiry while the request runs, so only the
reservations of a crashed instance ever expire (a long stream keeps its hold).
"""

from __future__ import annotations

import threading


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
