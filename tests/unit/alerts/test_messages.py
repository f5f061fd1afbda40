"""spendgate.alerts.messages: what each alert says (Block Kit with a plain-text fallback, who, how
much, which period, when it resets, what to do), and `DedupeKey`, the event an alert is about,
built and parsed back in one place. (Money formatting itself: tests/unit/test_money.py.)"""

from __future__ import annotations

from datetime import datetime, timedelta, timezone
from decimal import Decimal

import pytest

from spendgate.alerts import messages as render
from spendgate.alerts.dedupe import DedupeKey, resets_at
from spendgate.alerts.messages import Alert
from spendgate.periods import period_end, period_start
from tests.unit.alerts.helpers import ALL_ALERTS

UTC = timezone.utc
NANO = 1_000_000_000
NOW = datetime(2026, 11, 25, 13, 30, tzinfo=UTC)


def test_threshold_message_names_who_how_much_period_reset_and_what_to_do() -> None:
    start, reset = period_start("day", NOW), period_end("day", NOW)
    a = render.threshold_alert("user", "alice", "day", 80, 850_000_000, NANO, start, reset, team="core")
    assert a.dedupe_key == "threshold:user:alice:day:2026-11-25:80"
    t = a.text
    for needle in ("alice", "team core", "crossed 80%", "$0.85 of $1.00 (85%)", "daily", "day",
                   "2026-11-26 00:00 UTC", "What to do", "spendgate budgets set user alice --cap <USD> --period day"):
        assert needle in t, (needle, t)
    blocks = a.blocks()
    assert blocks[0]["type"] == "header" and "alice" in blocks[0]["text"]["text"]
    fields = {f["text"].split("\n")[0].strip("*"): f["text"].split("\n", 1)[1] for f in blocks[1]["fields"]}
    assert fields["Spent"] == "$0.85 of $1.00 (85%)"
    assert fields["Resets"] == "2026-11-26 00:00 UTC"
    assert fields["Who"] == "user alice (team core)"
    assert blocks[2]["text"]["text"].startswith("*What to do:*")
    reached = render.threshold_alert("team", "core", "month", 100, NANO, NANO, start, reset)
    assert "reached the monthly cap" in reached.text and "refused (429)" in reached.text



@pytest.mark.parametrize("alert", ALL_ALERTS, ids=lambda a: a.dedupe_key or a.kind)
def test_every_kind_renders_valid_block_kit_with_a_fallback(alert: Alert) -> None:
    assert alert.text.startswith("Spendgate: ") and "What to do: " in alert.text
    blocks = alert.blocks()
    assert blocks[0]["type"] == "header" and len(blocks[0]["text"]["text"]) <= 150
    for b in blocks:
        assert b["type"] in ("header", "section", "context")
        for f in b.get("fields", []):
            assert f["type"] == "mrkdwn" and len(f["text"]) <= 2000
    assert len([b for b in blocks if "fields" in b]) <= 1 and all(len(b.get("fields", [])) <= 10 for b in blocks)
    assert render.alert_from_row(alert.kind, alert.dedupe_key, alert.scope, alert.name, alert.text,
                                 alert.blocks_json()).blocks() == blocks


def test_a_stored_alert_without_usable_blocks_falls_back_to_its_text() -> None:
    for blocks in (None, "not json", '{"a": 1}'):
        again = render.alert_from_row("spike", "spike:user:x:1", "user", "x", "Spendgate: spike.", blocks)
        assert again.text == "Spendgate: spike."
        assert again.blocks() == [{"type": "section", "text": {"type": "plain_text", "text": "Spendgate: spike."}}]


def test_cap_blocked_names_the_requester_when_it_is_not_the_capped_user() -> None:
    reset = NOW + timedelta(hours=10)
    team = render.cap_blocked_alert("team", "core", "day", NANO, NANO, NOW, reset, "bob", None, "openai")
    assert "Blocked request from: user bob." in team.text and "Provider: openai." in team.text
    own = render.cap_blocked_alert("user", "bob", "day", NANO, NANO, NOW, reset, "bob", "core")
    assert "Blocked request from" not in own.text and "user bob (team core)" in own.text


def test_summary_counts_the_further_blocks() -> None:
    one = render.cap_blocked_summary(DedupeKey.cap_blocked("user", "a", "day", NOW), "user", "a", "day", 1, 2, NOW,
                                     None, "2026-11-25T14")
    assert one.title.startswith("1 more request blocked") and "2 requests since" in one.text
    assert one.dedupe_key == "cap_blocked:user:a:day:2026-11-25:summary:2026-11-25T14"
    assert "Resets" not in one.text  # unknown reset: not made up


def test_backstop_mismatch_message_says_which_way() -> None:
    more = render.backstop_mismatch_alert("openai", Decimal("10"), 5 * NANO, 0.2, NOW, "2026-11-25")
    assert "50% more" in more.text and "$10.00" in more.text and "$5.00" in more.text
    assert "outside the gateway" in more.text
    less = render.backstop_mismatch_alert("openai", Decimal("5"), 10 * NANO, 0.2, NOW, "2026-11-25")
    assert "50% less" in less.text and "lags" in less.text


@pytest.mark.parametrize(("spent", "cap", "pct"), [(0, NANO, 0), (999_999_999, NANO, 99), (NANO, NANO, 100),
                                                   (2 * NANO, NANO, 200), (5, 0, 0)])
def test_percent_rounds_down_so_100_means_reached(spent: int, cap: int, pct: int) -> None:
    assert render.percent(spent, cap) == pct


def test_who_and_when() -> None:
    assert render.who("user", "alice", "core") == "user alice (team core)"
    assert render.who("team", "core") == "team core"
    assert render.who("global", "global") == "the whole organisation (global cap)"
    assert render.when(datetime(2026, 11, 25, 8, 5, tzinfo=timezone(timedelta(hours=-5)))) == "2026-11-25 13:05 UTC"


# --------------------------------------------------------------------------- dedupe keys

START = datetime(2026, 11, 25, tzinfo=UTC)


@pytest.mark.parametrize(("key", "text"), [
    (DedupeKey.threshold("user", "alice", "day", START, 80), "threshold:user:alice:day:2026-11-25:80"),
    (DedupeKey.threshold("user", "a:b", "week", START, 100), "threshold:user:a:b:week:2026-11-25:100"),
    (DedupeKey.cap_blocked("team", "core", "month", START), "cap_blocked:team:core:month:2026-11-25"),
    (DedupeKey.cap_blocked("user", "svc:batch:1", "day", START), "cap_blocked:user:svc:batch:1:day:2026-11-25"),
    (DedupeKey.cap_blocked("user", "summary", "day", START), "cap_blocked:user:summary:day:2026-11-25"),
    (DedupeKey.cap_blocked("user", "a:summary:b", "day", START), "cap_blocked:user:a:summary:b:day:2026-11-25"),
    (DedupeKey.cap_blocked("user", "a:b", "day", START).summary("2026-11-25T14"),
     "cap_blocked:user:a:b:day:2026-11-25:summary:2026-11-25T14"),
    (DedupeKey.spike("carol", 3), "spike:user:carol:3"),
    (DedupeKey.spike("c:a:r", 1), "spike:user:c:a:r:1"),
    (DedupeKey.shadow("dora", "openai", "2026-11-25"), "shadow_traffic:dora:openai:2026-11-25"),
    (DedupeKey.shadow("d:o", "anthropic", "2026-11-25"), "shadow_traffic:d:o:anthropic:2026-11-25"),
    (DedupeKey.backstop("mismatch", "anthropic", "2026-11-25"), "backstop:mismatch:anthropic:2026-11-25"),
    (DedupeKey.store_failing("2026-11-25T13"), "store_failing:2026-11-25T13"),
])
def test_dedupe_keys_are_stored_as_text_and_parsed_back(key: DedupeKey, text: str) -> None:
    assert str(key) == text
    assert DedupeKey.parse(text) == key


def test_the_day_is_the_utc_day_of_the_period_start() -> None:
    evening = datetime(2026, 11, 24, 20, tzinfo=timezone(timedelta(hours=-5)))  # 01:00 UTC on the 25th
    assert str(DedupeKey.cap_blocked("user", "a", "day", evening)) == "cap_blocked:user:a:day:2026-11-25"


@pytest.mark.parametrize(("key", "summary", "period"), [
    (DedupeKey.cap_blocked("user", "a:b", "week", START), False, ("week", START)),
    (DedupeKey.cap_blocked("user", "summary", "day", START), False, ("day", START)),  # a name, not a summary
    (DedupeKey.cap_blocked("user", "a", "day", START).summary("2026-11-25T14"), True, None),
    (DedupeKey.threshold("user", "a", "day", START, 50), False, None),
    (DedupeKey.parse("cap_blocked:user:a:day:not-a-date"), False, None),
])
def test_cap_period_and_summaries(key: DedupeKey, summary: bool, period: tuple[str, datetime] | None) -> None:
    assert key.is_summary is summary
    assert key.cap_period() == period
    parsed = DedupeKey.parse(str(key))
    assert (parsed.is_summary, parsed.cap_period()) == (summary, period)


def test_resets_at_is_the_end_of_the_blocked_period() -> None:
    assert resets_at(DedupeKey.cap_blocked("user", "a", "month", START)) == datetime(2026, 12, 1, tzinfo=UTC)
    assert resets_at(DedupeKey.spike("a", 1)) is None


def test_builders_use_the_keys() -> None:
    start, reset = period_start("week", NOW), period_end("week", NOW)
    assert ALL_ALERTS[1].dedupe_key == str(DedupeKey.cap_blocked("team", "core", "day", NOW))
    assert render.threshold_alert("user", "a:b", "week", 50, 1, 2, start, reset).dedupe_key == str(
        DedupeKey.threshold("user", "a:b", "week", start, 50))
    assert ALL_ALERTS[3].dedupe_key == "spike:user:carol:1"
    assert ALL_ALERTS[7].dedupe_key == "shadow_traffic:unknown:anthropic:2026-11-25"  # no user: "unknown"
    assert ALL_ALERTS[8].dedupe_key == "store_failing:2026-11-25T13"
