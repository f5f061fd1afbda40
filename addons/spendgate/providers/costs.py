"""Providers' own cost reports: where they are, how to ask, and how to read an answer page.

OpenAI's organization costs API, ``GET /v1/organization/costs`` (``Authorization: Bearer <admin key>``):
buckets of ``results[].amount.value`` in USD. Anthropic's cost report API,
``GET /v1/organizations/cost_report`` (``x-api-key: <admin key>``, ``anthropic-version``): buckets
of ``results[].amount``, a decimal string in cents. Pure: the backstop makes the requests.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from datetime import datetime, timezone
from decimal import Decimal, InvalidOperation
from typing import Any

API_BASES = {"openai": "https://api.openai.com", "anthropic": "https://api.anthropic.com"}
ANTHROPIC_VERSION = "2023-06-01"


class CostReportError(RuntimeError):
    pass


@dataclass(frozen=True)
class CostReportRequest:
    path: str
    params: dict[str, Any]
    headers: dict[str, str]
    parse: Callable[[Any], Decimal]  # one answer page -> USD


def cost_report_request(provider: str, admin_key: str, since: datetime, until: datetime) -> CostReportRequest:
    """How to ask `provider` for its spend over [since, until)."""
    days = max(1, (until - since).days + 1)
    if provider == "openai":
        return CostReportRequest(
            "/v1/organization/costs",
            {"start_time": int(since.timestamp()), "end_time": int(until.timestamp()), "bucket_width": "1d",
             "limit": min(180, days)},
            {"authorization": f"Bearer {admin_key}"}, openai_costs_usd)
    if provider == "anthropic":
        return CostReportRequest(
            "/v1/organizations/cost_report",
            {"starting_at": _rfc3339(since), "ending_at": _rfc3339(until), "bucket_width": "1d",
             "limit": min(31, days)},
            {"x-api-key": admin_key, "anthropic-version": ANTHROPIC_VERSION}, anthropic_cost_usd)
    raise CostReportError(f"no cost report API known for {provider}")


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
