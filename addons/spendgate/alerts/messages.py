"""What an alert says, and what event it is (its `DedupeKey`).

Messages are Block Kit with a plain-text fallback and always say who (user / team), how much
(spent, cap, percent), which period, when it resets and what to do. Each alert names its event
with a `DedupeKey` (`alerts/dedupe.py`).
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from datetime import datetime, timezone
from decimal import Decimal
from typing import Any

from spendgate.alerts.dedupe import DedupeKey
from spendgate.money import dollars, to_nano
from spendgate.pricing import price_line

_PERIOD_WORD = {"day": "daily", "week": "weekly", "month": "monthly"}


# -- money and names ------------------------------------------------------------------------


def when(d: datetime) -> str:
    return d.astimezone(timezone.utc).strftime("%Y-%m-%d %H:%M UTC")


def who(scope: str, name: str, team: str | None = None) -> str:
    if scope == "user":
        return f"user {name}" + (f" (team {team})" if team else "")
    if scope == "team":
        return f"team {name}"
    if scope == "global":
        return "the whole organisation (global cap)"
    return f"{scope} {name}"


def percent(spent_nusd: int, cap_nusd: int) -> int:
    """Whole percent, rounded down so "100%" only ever means the cap is reached."""
    return (spent_nusd * 100) // cap_nusd if cap_nusd > 0 else 0


def _budget_cmd(scope: str, name: str, period: str) -> str:
    target = "global global" if scope == "global" else f"{scope} {name}"
    return f"`spendgate budgets set {target} --cap <USD> --period {period}`"


# -- the alert ------------------------------------------------------------------------------


@dataclass(frozen=True)
class Alert:
    """One Slack message. `dedupe_key` names the event; it is sent once however many instances see it."""

    kind: str
    dedupe_key: str
    scope: str
    name: str
    title: str
    facts: tuple[tuple[str, str], ...] = ()
    action: str = ""
    context: str = ""

    @property
    def text(self) -> str:
        """Plain-text fallback (notifications, clients without Block Kit)."""
        parts = [f"Spendgate: {self.title}."]
        parts += [f"{k}: {v}." for k, v in self.facts]
        if self.action:
            parts.append(f"What to do: {self.action}")
        return " ".join(parts)

    def blocks(self) -> list[dict[str, Any]]:
        out: list[dict[str, Any]] = [
            {"type": "header", "text": {"type": "plain_text", "text": f"Spendgate: {self.title}"[:150], "emoji": True}},
        ]
        if self.facts:
            out.append({"type": "section", "fields": [
                {"type": "mrkdwn", "text": f"*{k}*\n{v}"[:2000]} for k, v in self.facts[:10]
            ]})
        if self.action:
            out.append({"type": "section", "text": {"type": "mrkdwn", "text": f"*What to do:* {self.action}"[:3000]}})
        out.append({"type": "context", "elements": [
            {"type": "mrkdwn", "text": (self.context or f"{self.kind} · {self.dedupe_key}")[:300]}
        ]})
        return out

    def blocks_json(self) -> str:
        return json.dumps(self.blocks(), separators=(",", ":"))


def threshold_alert(
    scope: str, name: str, period: str, threshold: int, spent_nusd: int, cap_nusd: int,
    period_start: datetime, resets_at: datetime, team: str | None = None,
) -> Alert:
    pct = percent(spent_nusd, cap_nusd)
    reached = threshold >= 100
    title = (f"{who(scope, name)} reached the {_PERIOD_WORD.get(period, period)} cap" if reached
             else f"{who(scope, name)} crossed {threshold}% of the {_PERIOD_WORD.get(period, period)} cap")
    if reached:
        action = (f"Requests from {who(scope, name)} are refused (429) until the cap resets at {when(resets_at)}. "
                  f"If this spend is expected, raise the cap: {_budget_cmd(scope, name, period)}.")
    else:
        action = (f"Nothing is blocked yet; at 100% requests are refused until {when(resets_at)}. "
                  f"Check the spend with `spendgate usage --by user --since {period_start.date().isoformat()}`; "
                  f"to allow more, raise the cap: {_budget_cmd(scope, name, period)}.")
    return Alert(
        kind="threshold",
        dedupe_key=str(DedupeKey.threshold(scope, name, period, period_start, threshold)),
        scope=scope, name=name, title=title,
        facts=(
            ("Who", who(scope, name, team)),
            ("Spent", f"{dollars(spent_nusd)} of {dollars(cap_nusd)} ({pct}%)"),
            ("Threshold", f"{threshold}%"),
            ("Period", f"{period} (since {when(period_start)})"),
            ("Resets", when(resets_at)),
        ),
        action=action,
    )


def cap_blocked_alert(
    scope: str, name: str, period: str, spent_nusd: int, cap_nusd: int, period_start: datetime,
    resets_at: datetime, user: str | None, team: str | None = None, provider: str | None = None,
) -> Alert:
    requester = f"user {user}" if user and not (scope == "user" and user == name) else None
    return Alert(
        kind="cap_blocked",
        dedupe_key=str(DedupeKey.cap_blocked(scope, name, period, period_start)),
        scope=scope, name=name,
        title=f"the {_PERIOD_WORD.get(period, period)} cap of {who(scope, name)} blocked a request",
        facts=tuple(x for x in (
            ("Who", who(scope, name, team)),
            ("Blocked request from", requester) if requester else None,
            ("Provider", provider) if provider else None,
            ("Spent", f"{dollars(spent_nusd)} of {dollars(cap_nusd)} ({percent(spent_nusd, cap_nusd)}%)"),
            ("Period", f"{period} (since {when(period_start)})"),
            ("Resets", when(resets_at)),
        ) if x is not None),
        action=(f"Requests are refused (429) until {when(resets_at)}; further blocks are counted and summarised, "
                f"not sent one by one. If the spend is expected, raise the cap: {_budget_cmd(scope, name, period)}; "
                f"otherwise ask what is running (`spendgate audit --user {user or name} --limit 50`)."),
    )


def cap_blocked_summary(base_key: DedupeKey, scope: str, name: str, period: str, new_blocks: int, total: int,
                        since: datetime, resets_at: datetime | None, bucket: str) -> Alert:
    return Alert(
        kind="cap_blocked",
        dedupe_key=str(base_key.summary(bucket)),
        scope=scope, name=name,
        title=(f"{new_blocks} more request{'s' if new_blocks != 1 else ''} blocked by the "
               f"{_PERIOD_WORD.get(period, period)} cap of {who(scope, name)}"),
        facts=tuple(x for x in (
            ("Who", who(scope, name)),
            ("Blocked this period", f"{total} request{'s' if total != 1 else ''} since {when(since)}"),
            ("Period", period),
            ("Resets", when(resets_at)) if resets_at else None,
        ) if x is not None),
        action="Something keeps calling after the cap was reached. "
               "Check `spendgate audit --outcome blocked_cap --limit 50`; "
               f"raise the cap with {_budget_cmd(scope, name, period)} if the spend is expected.",
    )


def spike_alert(
    user: str, episode: int, window_seconds: int, requests: int, spend_nusd: int,
    baseline_requests_per_window: float, baseline_spend_per_window_nusd: float, reason: str,
    started: datetime, team: str | None = None,
) -> Alert:
    minutes = f"{window_seconds // 60} min" if window_seconds % 60 == 0 else f"{window_seconds} s"
    return Alert(
        kind="spike",
        dedupe_key=str(DedupeKey.spike(user, episode)),
        scope="user", name=user,
        title=f"spend spike: {who('user', user)} is far above their usual rate",
        facts=(
            ("Who", who("user", user, team)),
            (f"Last {minutes}", f"{requests} requests, {dollars(spend_nusd)}"),
            (f"Usual per {minutes}", f"{baseline_requests_per_window:.1f} requests, "
                                     f"{dollars(round(baseline_spend_per_window_nusd))}"),
            ("Why", reason),
            ("Since", when(started)),
        ),
        action=(f"Check what {user} is running, e.g. an agent stuck in a retry loop: "
                f"`spendgate audit --user {user} "
                f"--since {started.astimezone(timezone.utc).strftime('%Y-%m-%dT%H:%M')} --limit 50`. "
                f"To stop it now: `spendgate keys revoke {user}`, "
                f"or set a cap with {_budget_cmd('user', user, 'day')}. "
                "One alert per episode; it re-arms once the rate is back to normal."),
    )


def backstop_budget_alert(provider: str, reported: Decimal, budget: Decimal, attributed_nusd: int,
                          since: datetime, day: str) -> Alert:
    return Alert(
        kind="backstop",
        dedupe_key=str(DedupeKey.backstop("budget", provider, day)),
        scope="provider", name=provider,
        title=f"{provider}'s own cost report passed the backstop budget",
        facts=(
            ("Provider", provider),
            ("Provider-reported spend", f"{dollars(to_nano(reported))} since {when(since)}"),
            ("Backstop budget", dollars(to_nano(budget))),
            ("Gateway attributed", dollars(attributed_nusd)),
        ),
        action=(f"This is the provider's bill, including traffic the gateway may not see. Compare with "
                f"`spendgate usage --by user --since {since.date().isoformat()}`, "
                f"check the {provider} usage dashboard, "
                "and rotate the organisation's provider keys if they are used outside the gateway."),
    )


def backstop_mismatch_alert(provider: str, reported: Decimal, attributed_nusd: int, tolerance: float,
                            since: datetime, day: str) -> Alert:
    attributed = Decimal(attributed_nusd) / Decimal(1_000_000_000)
    base = max(reported, attributed)
    share = float(abs(reported - attributed) / base) if base else 0.0
    more = "more" if reported > attributed else "less"
    return Alert(
        kind="backstop",
        dedupe_key=str(DedupeKey.backstop("mismatch", provider, day)),
        scope="provider", name=provider,
        title=f"{provider} reports {share:.0%} {more} spend than the gateway attributed",
        facts=(
            ("Provider", provider),
            ("Provider-reported spend", f"{dollars(to_nano(reported))} since {when(since)}"),
            ("Gateway attributed", dollars(attributed_nusd)),
            ("Tolerance", f"{tolerance:.0%}"),
        ),
        action=("Spend the gateway did not see: a provider key used outside the gateway (rotate the organisation's "
                "keys at the provider), or a price the gateway does not know (add it under [prices.overrides]). "
                f"Compare per model with `spendgate usage --by model --since {since.date().isoformat()}`."
                if reported > attributed else
                "The gateway attributed more than the provider billed: prices in the gateway may be too high "
                "([prices.overrides]), or the provider's report lags (cost reports can be hours behind)."),
    )


def shadow_alert(user: str | None, provider: str, passthrough: int, refused: int, day: str,
                 team: str | None = None) -> Alert:
    name = user or "unknown"
    facts: list[tuple[str, str]] = [("Who", who("user", user, team) if user else "an unidentified client"),
                                    ("Provider", provider)]
    if passthrough:
        facts.append(("Passed through (BYOK)", f"{passthrough} request{'s' if passthrough != 1 else ''}"))
    if refused:
        facts.append(("Refused", f"{refused} request{'s' if refused != 1 else ''}"))
    return Alert(
        kind="shadow_traffic",
        dedupe_key=str(DedupeKey.shadow(name, provider, day)),
        scope="user", name=name,
        title=f"a raw {provider} key was used by {who('user', user) if user else 'an unidentified client'}",
        facts=tuple(facts),
        action=("A provider key of the client's own is in use: spend on it is invisible to the gateway and its caps. "
                f"Rotate that key at {provider} and give the developer a Spendgate key (`spendgate keys create`)."
                + (" Their key is --byok, so these requests were passed through." if passthrough else "")),
    )


def unpriced_alert(provider: str, model: str, requests: int, day: str) -> Alert:
    return Alert(
        kind="unpriced_model",
        dedupe_key=str(DedupeKey.unpriced(provider, model, day)),
        scope="model", name=f"{provider}:{model}",
        title=f"no price is known for {provider} model {model}",
        facts=(("Provider", provider), ("Model", model), ("Requests so far today", str(requests))),
        action=("Its cost is recorded as unknown and callers under a cap are refused it. Add its price to the "
                f"config under `[prices.overrides]`: `{price_line(provider, model)}` (USD per million tokens), "
                'or set `[prices] unknown_model = "fallback"`.'),
    )


def store_failing_alert(error: str, instance: str, hour: str) -> Alert:
    return Alert(
        kind="store_failing",
        dedupe_key=str(DedupeKey.store_failing(hour)),
        scope="store", name="audit",
        title="the audit store is failing",
        facts=(("Error", error), ("Gateway instance", instance), ("Since", hour.replace("T", " ") + ":00 UTC")),
        action=("With budgets.fail_closed = true requests are refused (503) until writes succeed; otherwise they go "
                "through unaudited. Check the database (`spendgate doctor`), its disk and connections."),
    )


def hello_alert() -> Alert:
    return Alert(
        kind="test", dedupe_key="", scope="test", name="test",
        title="test message",
        facts=(("Sent by", "`spendgate alerts test`"),),
        action="Nothing; alerts reach this channel.",
    )


def alert_from_row(kind: str, dedupe_key: str, scope: str, name: str, text: str, blocks: str | None) -> Alert:
    """An alert rebuilt from its `alerts_sent` row, for a retry after a failed delivery."""
    return _StoredAlert(kind=kind, dedupe_key=dedupe_key, scope=scope, name=name, title="", stored_text=text,
                        stored_blocks=blocks)


@dataclass(frozen=True)
class _StoredAlert(Alert):
    stored_text: str = ""
    stored_blocks: str | None = None

    @property
    def text(self) -> str:
        return self.stored_text

    def blocks(self) -> list[dict[str, Any]]:
        if self.stored_blocks:
            try:
                out = json.loads(self.stored_blocks)
                if isinstance(out, list):
                    return out
            except ValueError:
                pass
        return [{"type": "section", "text": {"type": "plain_text", "text": self.stored_text[:3000]}}]
