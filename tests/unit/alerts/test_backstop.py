"""spendgate.alerts.backstop: the providers' own cost reports (read from the mock provider's cost APIs)
against the backstop budget and what the gateway attributed, alerting once a day per finding."""

from __future__ import annotations

import socket
from collections.abc import Iterator
from datetime import timedelta
from decimal import Decimal
from typing import Any

import pytest

from spendgate.alerts.backstop import Backstop, CostClient, backstop_providers, base_url, window
from spendgate.settings import Settings, parse_settings
from spendgate.store import Database
from spendgate.store.reports import Reports
from tests.rig.mock_provider import MockProvider
from tests.unit.alerts.helpers import NANO, NOW, Stores, audit_rows, evaluator, utc


@pytest.fixture
def mock(_mock_provider_session: MockProvider) -> Iterator[MockProvider]:
    _mock_provider_session.reset()
    yield _mock_provider_session
    _mock_provider_session.reset()


NOT_READ = Reports(Database("sqlite://"))  # an empty in-memory database: evaluate() never asks it


def backstop_settings(mock: MockProvider, **bs: Any) -> Settings:
    prov = {p: {"api_key": "up", "upstream": mock.url, "verify_upstream_tls": False} for p in ("openai", "anthropic")}
    prov["openai"]["admin_api_key"] = "admin-openai-test"
    prov["anthropic"]["admin_api_key"] = "admin-anthropic-test"
    return parse_settings({"providers": prov, "alerts": {"backstop": bs}}, {})


def test_window_is_whole_utc_days_up_to_now() -> None:
    assert window(utc(2026, 11, 25, 13, 5), 1) == (utc(2026, 11, 25), utc(2026, 11, 25, 13, 5))
    assert window(utc(2026, 3, 1, 0, 0, 1), 3) == (utc(2026, 2, 27), utc(2026, 3, 1, 0, 0, 1))


def test_only_providers_with_a_cost_api_and_an_admin_key_are_checked() -> None:
    cfg = parse_settings({"providers": {"openai": {"admin_api_key": "a"}, "gemini": {"admin_api_key": "g"},
                                        "anthropic": {}}}, {})
    assert [p.name for p in backstop_providers(cfg)] == ["openai"]
    openai = cfg.provider("openai")
    assert openai is not None and base_url(openai) == "https://api.openai.com"
    moved = parse_settings({"providers": {"anthropic": {"upstream": "https://127.0.0.1:9443"}}}, {}).provider(
        "anthropic")
    assert moved is not None and base_url(moved) == "https://127.0.0.1:9443"


def test_cost_client_reads_both_providers_from_the_mock(mock: MockProvider) -> None:
    cfg = backstop_settings(mock)
    mock.set_costs(openai_usd="12.34", anthropic_usd="5.678")
    since, until = window(NOW, 2)
    c = CostClient()
    openai_p, anthropic_p = cfg.provider("openai"), cfg.provider("anthropic")
    assert openai_p is not None and anthropic_p is not None
    assert c.fetch(openai_p, since, until) == Decimal("12.34")
    assert c.fetch(anthropic_p, since, until) == Decimal("5.678")
    o = mock.find(endpoint="costs")[-1]
    assert o.header("authorization") == "Bearer admin-openai-test"
    assert o.query_params["start_time"] == [str(int(since.timestamp()))]
    assert o.query_params["end_time"] == [str(int(until.timestamp()))]
    assert o.query_params["bucket_width"] == ["1d"]
    a = mock.find(endpoint="cost_report")[-1]
    assert a.header("x-api-key") == "admin-anthropic-test" and a.header("anthropic-version") == "2023-06-01"
    assert a.header("authorization") is None
    assert a.query_params["starting_at"] == ["2026-11-24T00:00:00Z"]
    assert a.query_params["ending_at"] == ["2026-11-25T13:30:00Z"]


@pytest.mark.parametrize(("reported", "attributed_usd", "budget", "expected"), [
    ("0", "0", "100", []),
    ("10", "10", "100", []),
    ("10.5", "10", "100", []),  # 4.8% apart, tolerance 20%
    ("13", "10", "100", ["mismatch"]),  # 23% apart
    ("10", "13", "100", ["mismatch"]),
    ("150", "140", "100", ["budget"]),
    ("150", "10", "100", ["budget", "mismatch"]),
    ("0.004", "0", "100", []),  # less than a cent apart
    ("5", "0", None, ["mismatch"]),
])
def test_backstop_evaluation_table(reported: str, attributed_usd: str, budget: str | None, expected: list[str]) -> None:
    bs: dict[str, Any] = {"tolerance": 0.2}
    if budget is not None:
        bs["budget_usd"] = budget
    cfg = parse_settings({"alerts": {"backstop": bs}}, {})
    got = Backstop(cfg, NOT_READ, lambda a: True).evaluate(  # pure: the store is not read
        "openai", Decimal(reported), int(Decimal(attributed_usd) * NANO), utc(2026, 11, 25))
    assert [a.dedupe_key.split(":")[1] for a in got] == expected


def test_backstop_check_compares_with_gateway_totals_and_alerts_once_a_day(mock: MockProvider, db: Database) -> None:
    st = Stores.of(db)
    cfg = backstop_settings(mock, budget_usd=5, tolerance=0.2)
    audit_rows(st, "alice", [NOW - timedelta(hours=1)] * 4, cost_nusd=NANO // 4, provider="openai")  # $1.00
    audit_rows(st, "alice", [NOW - timedelta(days=2)], cost_nusd=50 * NANO, provider="openai")  # outside the window
    mock.set_costs(openai_usd="1.1", anthropic_usd="0")
    ev, sent = evaluator(st, cfg)
    bs = Backstop(cfg, st.reports, ev.emit, clock=lambda: NOW)
    assert bs.check() == [] and sent == []
    assert bs.last["openai"].attributed_nusd == NANO and bs.last["openai"].reported_usd == Decimal("1.1")
    mock.set_costs(openai_usd="6", anthropic_usd="0.5")
    got = bs.check()
    assert sorted(a.dedupe_key for a in got) == ["backstop:budget:openai:2026-11-25",
                                                 "backstop:mismatch:anthropic:2026-11-25",
                                                 "backstop:mismatch:openai:2026-11-25"]
    budget = next(a for a in got if "budget" in a.dedupe_key)
    assert "$6.00" in budget.text and "$5.00" in budget.text and "$1.00" in budget.text
    other_instance, sent2 = evaluator(st, cfg)
    assert Backstop(cfg, st.reports, other_instance.emit, clock=lambda: NOW).check() == [] and sent2 == []
    assert bs.check() == []


def test_backstop_survives_an_unreachable_cost_api(sqlite_db: Database) -> None:
    port = socket.socket()
    port.bind(("127.0.0.1", 0))
    url = f"https://127.0.0.1:{port.getsockname()[1]}"
    port.close()
    cfg = parse_settings({"providers": {"openai": {"upstream": url, "verify_upstream_tls": False,
                                                   "admin_api_key": "admin"}},
                          "alerts": {"backstop": {"budget_usd": 1}}}, {})
    assert Backstop(cfg, Reports(sqlite_db), lambda a: True).check() == []
