"""Stage: requests per minute per key (`keys create --rpm`), a sliding window in memory.

Per instance: with N gateways behind a balancer a key can reach N × rpm at worst.
"""

from __future__ import annotations

import math
import time
from collections import deque
from typing import Callable

from mitmproxy import http

from spendgate.stages.call import Outcome, get_call, refuse

WINDOW = 60.0


class RateLimit:
    def __init__(self, clock: Callable[[], float] = time.monotonic) -> None:
        self.clock = clock
        self._hits: dict[str, deque[float]] = {}

    def requestheaders(self, flow: http.HTTPFlow) -> None:
        call = get_call(flow)
        if call is None or flow.response is not None or call.key is None or not call.key.rpm:
            return
        now = self.clock()
        hits = self._hits.setdefault(call.key.key_id, deque())
        while hits and hits[0] <= now - WINDOW:
            hits.popleft()
        if len(hits) >= call.key.rpm:
            retry = max(1, math.ceil(hits[0] + WINDOW - now))
            refuse(flow, call, 429, "spendgate_rate_limited",
                   f"Rate limit: key {call.key.key_id} allows {call.key.rpm} requests per minute. Retry in {retry} s.",
                   Outcome.BLOCKED_RATE, headers={"retry-after": str(retry)})
            return
        hits.append(now)
