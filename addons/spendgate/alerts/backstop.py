"""The provider backstop: the providers' own cost reports against a budget and the gateway's totals.

With an admin key configured (`[providers.openai].admin_api_key`, `[providers.anthropic].admin_api_key`)
a background thread reads, every `[alerts.backstop].interval_seconds`, the providers' cost reports
(`spendgate.providers.costs`) over the UTC days of `lookback_days` up to now, and alerts when a provider's
reported spend passes
`budget_usd`, or differs from what the gateway attributed to that provider over the same window by
more than `tolerance` (a share of the larger of the two). That is the blind spot: a key used outside
the gateway, or a price the gateway did not know. The base URL is the provider's `upstream` override
when set (tests, mirrors), else the real API host. No proxy from the environment is used.
"""

from __future__ import annotations

import logging
import threading
from dataclasses import dataclass
from datetime import datetime, timedelta, timezone
from decimal import Decimal
from typing import Callable

import httpx

from spendgate.alerts import messages
from spendgate.alerts.messages import Alert
from spendgate.money import usd
from spendgate.providers.costs import API_BASES, CostReportError, cost_report_request
from spendgate.settings import ProviderSettings, Settings
from spendgate.store.models import utcnow
from spendgate.store.reports import Reports

log = logging.getLogger(__name__)

MAX_PAGES = 20
MIN_DIFFERENCE_USD = Decimal("0.01")  # below a cent, rounding in the providers' reports is not a finding


def backstop_providers(settings: Settings) -> list[ProviderSettings]:
    return [p for p in settings.providers if p.name in API_BASES and p.admin_api_key]


def base_url(p: ProviderSettings) -> str:
    if p.upstream is not None:
        return f"{p.upstream.scheme}://{p.upstream.host}:{p.upstream.port}"
    return API_BASES[p.name]


def window(now: datetime, lookback_days: int) -> tuple[datetime, datetime]:
    """[UTC midnight `lookback_days - 1` days ago, now): whole provider buckets plus today so far.

    >>> [d.isoformat() for d in window(datetime(2026, 11, 25, 13, tzinfo=timezone.utc), 2)]
    ['2026-11-24T00:00:00+00:00', '2026-11-25T13:00:00+00:00']
    """
    now = now.astimezone(timezone.utc)
    start = now.replace(hour=0, minute=0, second=0, microsecond=0) - timedelta(days=lookback_days - 1)
    return start, now


class CostClient:
    """Reads a provider's cost report over [since, until). Blocking: runs on the backstop thread."""

    def __init__(self, timeout: float = 20.0) -> None:
        self.timeout = timeout

    def fetch(self, p: ProviderSettings, since: datetime, until: datetime) -> Decimal:
        assert p.admin_api_key
        verify = p.verify_upstream_tls if p.upstream is not None else True
        ask = cost_report_request(p.name, p.admin_api_key, since, until)
        params = ask.params
        total = Decimal(0)
        # trust_env=False: never through HTTPS_PROXY (which may be this very gateway).
        with httpx.Client(base_url=base_url(p), verify=verify, trust_env=False, timeout=self.timeout,
                          headers={**ask.headers, "user-agent": "spendgate-backstop"}) as client:
            for _ in range(MAX_PAGES):
                try:
                    r = client.get(ask.path, params=params)
                except httpx.HTTPError as e:
                    raise CostReportError(f"{p.name} cost report: {type(e).__name__}: {e}") from None
                if r.status_code != 200:
                    raise CostReportError(f"{p.name} cost report answered {r.status_code}: {r.text[:200]}")
                try:
                    page = r.json()
                except ValueError:
                    raise CostReportError(f"{p.name} cost report: the answer is not JSON") from None
                total += ask.parse(page)
                nxt = page.get("next_page")
                if not page.get("has_more") or not nxt:
                    break
                params = {**params, "page": nxt}
        return total


@dataclass(frozen=True)
class Finding:
    provider: str
    reported_usd: Decimal
    attributed_nusd: int
    since: datetime
    until: datetime


class Backstop:
    """Args:
        settings: `[alerts.backstop]` and the providers' admin keys and upstreams.
        store: the gateway-attributed spend per provider (audit log).
        emit: claims and sends an alert (`AlertEvaluator.emit`); returns whether this instance sent it.
    """

    def __init__(
        self,
        settings: Settings,
        store: Reports,
        emit: Callable[[Alert], bool],
        *,
        client: CostClient | None = None,
        clock: Callable[[], datetime] = utcnow,
    ) -> None:
        self.settings = settings
        self.store = store
        self.emit = emit
        self.client = client or CostClient()
        self.clock = clock
        self.last: dict[str, Finding] = {}
        self._failing: set[str] = set()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def start(self) -> None:
        self._thread = threading.Thread(target=self._run, name="spendgate-backstop", daemon=True)
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(5)
            self._thread = None

    def _run(self) -> None:
        if self._stop.wait(1.0):  # let start-up finish first
            return
        while True:
            self.check()
            if self._stop.wait(self.settings.alerts.backstop.interval_seconds):
                return

    def check(self, now: datetime | None = None) -> list[Alert]:
        """One pass over every provider with an admin key; returns the alerts this instance sent."""
        now = now or self.clock()
        bs = self.settings.alerts.backstop
        since, until = window(now, bs.lookback_days)
        sent: list[Alert] = []
        for p in backstop_providers(self.settings):
            try:
                reported = self.client.fetch(p, since, until)
                attributed = self.store.provider_spend_nusd(p.name, since, until)
            except Exception as e:
                if p.name not in self._failing:
                    self._failing.add(p.name)
                    log.warning("backstop: cannot read %s's cost report: %s", p.name, str(e)[:300])
                continue
            if p.name in self._failing:
                self._failing.discard(p.name)
                log.info("backstop: %s's cost report is readable again", p.name)
            self.last[p.name] = Finding(p.name, reported, attributed, since, until)
            for alert in self.evaluate(p.name, reported, attributed, since):
                try:
                    if self.emit(alert):
                        sent.append(alert)
                except Exception as e:
                    log.warning("backstop: cannot record alert %s: %s", alert.dedupe_key, type(e).__name__)
        return sent

    def evaluate(self, provider: str, reported: Decimal, attributed_nusd: int, since: datetime) -> list[Alert]:
        """Pure: the alerts a reading calls for (each keyed per provider and window start)."""
        bs = self.settings.alerts.backstop
        day = since.date().isoformat()
        out: list[Alert] = []
        if bs.budget_usd is not None and reported > bs.budget_usd:
            out.append(messages.backstop_budget_alert(provider, reported, bs.budget_usd, attributed_nusd, since, day))
        attributed = usd(attributed_nusd)
        larger = max(reported, attributed)
        diff = abs(reported - attributed)
        if larger > 0 and diff >= MIN_DIFFERENCE_USD and diff / larger > Decimal(str(bs.tolerance)):
            out.append(messages.backstop_mismatch_alert(provider, reported, attributed_nusd, bs.tolerance, since, day))
        return out
