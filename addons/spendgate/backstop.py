"""The provider backstop: the providers' own cost reports against a budget and the gateway's totals.

With an admin key configured (`[providers.openai].admin_api_key`, `[providers.anthropic].admin_api_key`)
a background thread reads, every `[alerts.backstop].interval_seconds`:

* OpenAI's organization costs API, ``GET /v1/organization/costs`` (``Authorization: Bearer <admin key>``),
  buckets of ``results[].amount.value`` in USD;
* Anthropic's cost report API, ``GET /v1/organizations/cost_report`` (``x-api-key: <admin key>``,
  ``anthropic-version``), buckets of ``results[].amount``, a decimal string in cents;

over the UTC days of `lookback_days` up to now, and alerts when a provider's reported spend passes
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
from decimal import Decimal, InvalidOperation
from typing import Any, Callable

import httpx

from spendgate import alerts as render
from spendgate.alerts import Alert
from spendgate.models import utcnow
from spendgate.settings import ProviderSettings, Settings
from spendgate.store import Store

log = logging.getLogger("spendgate.backstop")

API_BASES = {"openai": "https://api.openai.com", "anthropic": "https://api.anthropic.com"}
ANTHROPIC_VERSION = "2023-06-01"
MAX_PAGES = 20
MIN_DIFFERENCE_USD = Decimal("0.01")  # below a cent, rounding in the providers' reports is not a finding
NANO = Decimal(1_000_000_000)


class CostReportError(RuntimeError):
    pass


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


def _decimal(v: Any, what: str) -> Decimal:
    try:
        d = Decimal(str(v))
    except (InvalidOperation, ValueError):
        raise CostReportError(f"{what}: not a number: {v!r}") from None
    if not d.is_finite():
        raise CostReportError(f"{what}: not a number: {v!r}")
    return d


def openai_costs_usd(page: Any) -> Decimal:
    """Sum of one page of ``GET /v1/organization/costs``.

    >>> openai_costs_usd({"data": [{"results": [{"amount": {"value": 0.5, "currency": "usd"}}]},
    ...                            {"results": [{"amount": {"value": 1.25, "currency": "usd"}}]}]})
    Decimal('1.75')
    """
    if not isinstance(page, dict) or not isinstance(page.get("data"), list):
        raise CostReportError("OpenAI costs: expected {\"data\": [buckets]}")
    total = Decimal(0)
    for bucket in page["data"]:
        for r in (bucket or {}).get("results") or []:
            amount = (r or {}).get("amount") or {}
            currency = str(amount.get("currency") or "usd").lower()
            if currency != "usd":
                raise CostReportError(f"OpenAI costs: currency {currency!r} is not USD")
            total += _decimal(amount.get("value", 0), "OpenAI costs amount.value")
    return total


def anthropic_cost_usd(page: Any) -> Decimal:
    """Sum of one page of ``GET /v1/organizations/cost_report`` (amounts are cents, as decimal strings).

    >>> anthropic_cost_usd({"data": [{"results": [{"currency": "USD", "amount": "123.45"}]}]})
    Decimal('1.2345')
    """
    if not isinstance(page, dict) or not isinstance(page.get("data"), list):
        raise CostReportError("Anthropic cost report: expected {\"data\": [buckets]}")
    cents = Decimal(0)
    for bucket in page["data"]:
        for r in (bucket or {}).get("results") or []:
            currency = str((r or {}).get("currency") or "USD").upper()
            if currency != "USD":
                raise CostReportError(f"Anthropic cost report: currency {currency!r} is not USD")
            cents += _decimal((r or {}).get("amount", "0"), "Anthropic cost report amount")
    return cents / 100


def _rfc3339(d: datetime) -> str:
    return d.astimezone(timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ")


class CostClient:
    """Reads a provider's cost report over [since, until). Blocking: runs on the backstop thread."""

    def __init__(self, timeout: float = 20.0) -> None:
        self.timeout = timeout

    def fetch(self, p: ProviderSettings, since: datetime, until: datetime) -> Decimal:
        assert p.admin_api_key
        verify = p.verify_upstream_tls if p.upstream is not None else True
        days = max(1, (until - since).days + 1)
        if p.name == "openai":
            path = "/v1/organization/costs"
            params: dict[str, Any] = {"start_time": int(since.timestamp()), "end_time": int(until.timestamp()),
                                      "bucket_width": "1d", "limit": min(180, days)}
            headers = {"authorization": f"Bearer {p.admin_api_key}"}
            parse: Callable[[Any], Decimal] = openai_costs_usd
        elif p.name == "anthropic":
            path = "/v1/organizations/cost_report"
            params = {"starting_at": _rfc3339(since), "ending_at": _rfc3339(until), "bucket_width": "1d",
                      "limit": min(31, days)}
            headers = {"x-api-key": p.admin_api_key, "anthropic-version": ANTHROPIC_VERSION}
            parse = anthropic_cost_usd
        else:
            raise CostReportError(f"no cost report API known for {p.name}")
        total = Decimal(0)
        # trust_env=False: never through HTTPS_PROXY (which may be this very gateway).
        with httpx.Client(base_url=base_url(p), verify=verify, trust_env=False, timeout=self.timeout,
                          headers={**headers, "user-agent": "spendgate-backstop"}) as client:
            for _ in range(MAX_PAGES):
                try:
                    r = client.get(path, params=params)
                except httpx.HTTPError as e:
                    raise CostReportError(f"{p.name} cost report: {type(e).__name__}: {e}") from None
                if r.status_code != 200:
                    raise CostReportError(f"{p.name} cost report answered {r.status_code}: {r.text[:200]}")
                try:
                    page = r.json()
                except ValueError:
                    raise CostReportError(f"{p.name} cost report: the answer is not JSON") from None
                total += parse(page)
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
        store: Store,
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
            if self._stop.wait(self.settings.backstop.interval_seconds):
                return

    def check(self, now: datetime | None = None) -> list[Alert]:
        """One pass over every provider with an admin key; returns the alerts this instance sent."""
        now = now or self.clock()
        bs = self.settings.backstop
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
        bs = self.settings.backstop
        day = since.date().isoformat()
        out: list[Alert] = []
        if bs.budget_usd is not None and reported > bs.budget_usd:
            out.append(render.backstop_budget_alert(provider, reported, bs.budget_usd, attributed_nusd, since, day))
        attributed = Decimal(attributed_nusd) / NANO
        larger = max(reported, attributed)
        diff = abs(reported - attributed)
        if larger > 0 and diff >= MIN_DIFFERENCE_USD and diff / larger > Decimal(str(bs.tolerance)):
            out.append(render.backstop_mismatch_alert(provider, reported, attributed_nusd, bs.tolerance, since, day))
        return out
