"""spendgate.providers.costs: how to ask OpenAI and Anthropic for their cost reports, and reading an
answer page in the documented formats. (The backstop that fetches them: tests/unit/alerts/test_backstop.py.)"""

from __future__ import annotations

from datetime import datetime, timezone
from decimal import Decimal
from typing import Any

import pytest

from spendgate.providers.costs import (
    ANTHROPIC_VERSION,
    CostReportError,
    anthropic_cost_usd,
    cost_report_request,
    openai_costs_usd,
)

UTC = timezone.utc
SINCE, UNTIL = datetime(2026, 11, 24, tzinfo=UTC), datetime(2026, 11, 25, 13, 30, tzinfo=UTC)


def test_cost_report_parsers_sum_every_bucket_in_documented_formats() -> None:
    openai_page = {"object": "page", "has_more": False, "next_page": None, "data": [
        {"object": "bucket", "start_time": 1, "end_time": 2, "results": [
            {"object": "organization.costs.result", "amount": {"value": 0.06, "currency": "usd"},
             "line_item": None, "project_id": None}]},
        {"object": "bucket", "start_time": 2, "end_time": 3, "results": []},
        {"object": "bucket", "start_time": 3, "end_time": 4, "results": [
            {"object": "organization.costs.result", "amount": {"value": 12.5, "currency": "usd"}},
            {"object": "organization.costs.result", "amount": {"value": 0.44, "currency": "usd"}}]},
    ]}
    assert openai_costs_usd(openai_page) == Decimal("13.00")
    anthropic_page = {"has_more": False, "next_page": None, "data": [
        {"starting_at": "2026-11-24T00:00:00Z", "ending_at": "2026-11-25T00:00:00Z",
         "results": [{"currency": "USD", "amount": "123.45", "workspace_id": None, "description": None}]},
        {"starting_at": "2026-11-25T00:00:00Z", "ending_at": "2026-11-26T00:00:00Z",
         "results": [{"currency": "USD", "amount": "0.5"}]},
    ]}
    assert anthropic_cost_usd(anthropic_page) == Decimal("1.2395")  # cents
    with pytest.raises(CostReportError):
        openai_costs_usd({"error": {"message": "nope"}})
    with pytest.raises(CostReportError):
        anthropic_cost_usd({"data": [{"results": [{"currency": "EUR", "amount": "1"}]}]})


@pytest.mark.parametrize(("page", "usd"), [
    ({"data": [{"results": [{"amount": {"value": 0.5, "currency": "usd"}}]},
               {"results": [{"amount": {"value": 1.25, "currency": "usd"}}]}]}, Decimal("1.75")),
    ({"data": []}, Decimal(0)),
    ({"data": [None, {"results": None}, {"results": [None, {"amount": None}]}]}, Decimal(0)),  # null is nothing
    ({"data": [{"results": [{"amount": {"value": "0.1"}}]}]}, Decimal("0.1")),  # no currency: USD
])
def test_openai_page(page: Any, usd: Decimal) -> None:
    assert openai_costs_usd(page) == usd


@pytest.mark.parametrize("page", [
    [], "x", {"data": "x"},
    {"data": [{"results": [{"amount": {"value": 1, "currency": "eur"}}]}]},
    {"data": [{"results": [{"amount": {"value": "lots", "currency": "usd"}}]}]},
    {"data": [{"results": [{"amount": {"value": "NaN", "currency": "usd"}}]}]},
])
def test_openai_page_refused(page: Any) -> None:
    with pytest.raises(CostReportError):
        openai_costs_usd(page)


@pytest.mark.parametrize(("page", "usd"), [
    ({"data": [{"results": [{"currency": "USD", "amount": "123.45"}]}]}, Decimal("1.2345")),
    ({"data": [{"results": [{"amount": "1"}]}]}, Decimal("0.01")),  # no currency: USD
    ({"data": [None, {"results": None}]}, Decimal(0)),
])
def test_anthropic_page(page: Any, usd: Decimal) -> None:
    assert anthropic_cost_usd(page) == usd


@pytest.mark.parametrize("page", [None, {"data": None}, {"data": [{"results": [{"amount": "Infinity"}]}]}])
def test_anthropic_page_refused(page: Any) -> None:
    with pytest.raises(CostReportError):
        anthropic_cost_usd(page)


def test_openai_request() -> None:
    ask = cost_report_request("openai", "admin-key", SINCE, UNTIL)
    assert ask.path == "/v1/organization/costs"
    assert ask.headers == {"authorization": "Bearer admin-key"}
    assert ask.params == {"start_time": int(SINCE.timestamp()), "end_time": int(UNTIL.timestamp()),
                          "bucket_width": "1d", "limit": 2}
    assert ask.parse is openai_costs_usd


def test_anthropic_request() -> None:
    ask = cost_report_request("anthropic", "admin-key", SINCE, UNTIL)
    assert ask.path == "/v1/organizations/cost_report"
    assert ask.headers == {"x-api-key": "admin-key", "anthropic-version": ANTHROPIC_VERSION}
    assert ask.params == {"starting_at": "2026-11-24T00:00:00Z", "ending_at": "2026-11-25T13:30:00Z",
                          "bucket_width": "1d", "limit": 2}
    assert ask.parse is anthropic_cost_usd


def test_page_limits_cover_the_window_within_each_api_maximum() -> None:
    long_ago = datetime(2025, 1, 1, tzinfo=UTC)
    assert cost_report_request("openai", "k", long_ago, UNTIL).params["limit"] == 180
    assert cost_report_request("anthropic", "k", long_ago, UNTIL).params["limit"] == 31


def test_no_cost_report_for_other_providers() -> None:
    with pytest.raises(CostReportError, match="gemini"):
        cost_report_request("gemini", "k", SINCE, UNTIL)
