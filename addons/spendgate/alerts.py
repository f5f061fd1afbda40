"""Slack alerts: what a message says, and the background sender that delivers it.

The only module that talks to Slack. Messages are Block Kit with a plain-text fallback and
always say who (user / team), how much (spent, cap, percent), which period, when it resets
and what to do. Delivery runs on its own thread with slack-sdk's retry handlers (429 with
`Retry-After`, 5xx, connection errors); a failure is counted and logged, never raised into
the proxy. What to alert and when lives in `alerting.py`; this module only renders and sends.
"""

from __future__ import annotations

import json
import logging
import queue
import threading
import urllib.request
from dataclasses import dataclass, field
from datetime import datetime, timezone
from decimal import Decimal
from typing import TYPE_CHECKING, Any, Callable
from urllib.request import Request

from slack_sdk.errors import SlackApiError, SlackRequestError
from slack_sdk.http_retry.builtin_handlers import (
    ConnectionErrorRetryHandler,
    RateLimitErrorRetryHandler,
    ServerErrorRetryHandler,
)
from slack_sdk.http_retry.handler import RetryHandler
from slack_sdk.web import WebClient
from slack_sdk.webhook import WebhookClient, WebhookResponse

from spendgate.settings import SlackSettings

if TYPE_CHECKING:
    from spendgate.metrics import Metrics
    from spendgate.store import Store

log = logging.getLogger("spendgate.alerts")

# slack-sdk logs the request URL on retries at INFO (an incoming-webhook URL is a secret) and every
# failed attempt at ERROR; this module logs one line per alert instead.
_sdk_log = logging.getLogger("spendgate.alerts.slack_sdk")
_sdk_log.setLevel(logging.CRITICAL)

SEND_TIMEOUT_SECONDS = 10
QUEUE_LIMIT = 1000

KINDS = ("threshold", "cap_blocked", "spike", "backstop", "shadow_traffic", "store_failing", "test")
_PERIOD_WORD = {"day": "daily", "week": "weekly", "month": "monthly"}
_NANO = Decimal(1_000_000_000)


# -- money and names ------------------------------------------------------------------------


def money(amount: int | Decimal) -> str:
    """Nano-USD (int) or USD (Decimal) as a dollar amount: cents when exact, else up to 6 decimals.

    >>> money(800_000_000), money(Decimal("12.5")), money(1234)
    ('$0.80', '$12.50', '$0.000001')
    """
    usd = Decimal(amount) / _NANO if isinstance(amount, int) else amount
    cents = usd.quantize(Decimal("0.01"))
    if cents == usd or abs(usd) >= 100:
        return f"${cents:,.2f}" if usd >= 0 else f"-${-cents:,.2f}"
    fine = usd.quantize(Decimal("0.000001"))
    if fine == 0 and usd != 0:
        fine = Decimal("0.000001") if usd > 0 else Decimal("-0.000001")
    text = format(fine.normalize(), "f")
    if "." not in text or len(text.split(".")[1]) < 2:
        text = format(fine.quantize(Decimal("0.01")), "f")
    return f"${text}" if fine >= 0 else f"-${text[1:]}"


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


def threshold_key(scope: str, name: str, period: str, period_start: datetime, threshold: int) -> str:
    """e.g. "threshold:user:alice:day:2026-11-25:80"."""
    return f"threshold:{scope}:{name}:{period}:{period_start.astimezone(timezone.utc).date().isoformat()}:{threshold}"


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
        dedupe_key=threshold_key(scope, name, period, period_start, threshold),
        scope=scope, name=name, title=title,
        facts=(
            ("Who", who(scope, name, team)),
            ("Spent", f"{money(spent_nusd)} of {money(cap_nusd)} ({pct}%)"),
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
        dedupe_key=f"cap_blocked:{scope}:{name}:{period}:{period_start.date().isoformat()}",
        scope=scope, name=name,
        title=f"the {_PERIOD_WORD.get(period, period)} cap of {who(scope, name)} blocked a request",
        facts=tuple(x for x in (
            ("Who", who(scope, name, team)),
            ("Blocked request from", requester) if requester else None,
            ("Provider", provider) if provider else None,
            ("Spent", f"{money(spent_nusd)} of {money(cap_nusd)} ({percent(spent_nusd, cap_nusd)}%)"),
            ("Period", f"{period} (since {when(period_start)})"),
            ("Resets", when(resets_at)),
        ) if x is not None),
        action=(f"Requests are refused (429) until {when(resets_at)}; further blocks are counted and summarised, "
                f"not sent one by one. If the spend is expected, raise the cap: {_budget_cmd(scope, name, period)}; "
                f"otherwise ask what is running (`spendgate audit --user {user or name} --limit 50`)."),
    )


def cap_blocked_summary(base_key: str, scope: str, name: str, period: str, new_blocks: int, total: int,
                        since: datetime, resets_at: datetime | None, bucket: str) -> Alert:
    return Alert(
        kind="cap_blocked",
        dedupe_key=f"{base_key}:summary:{bucket}",
        scope=scope, name=name,
        title=f"{new_blocks} more request{'s' if new_blocks != 1 else ''} blocked by the {_PERIOD_WORD.get(period, period)} cap of {who(scope, name)}",
        facts=tuple(x for x in (
            ("Who", who(scope, name)),
            ("Blocked this period", f"{total} request{'s' if total != 1 else ''} since {when(since)}"),
            ("Period", period),
            ("Resets", when(resets_at)) if resets_at else None,
        ) if x is not None),
        action=f"Something keeps calling after the cap was reached. Check `spendgate audit --outcome blocked_cap --limit 50`; "
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
        dedupe_key=f"spike:user:{user}:{episode}",
        scope="user", name=user,
        title=f"spend spike: {who('user', user)} is far above their usual rate",
        facts=(
            ("Who", who("user", user, team)),
            (f"Last {minutes}", f"{requests} requests, {money(spend_nusd)}"),
            (f"Usual per {minutes}", f"{baseline_requests_per_window:.1f} requests, "
                                     f"{money(Decimal(round(baseline_spend_per_window_nusd)) / _NANO)}"),
            ("Why", reason),
            ("Since", when(started)),
        ),
        action=(f"Check what {user} is running, e.g. an agent stuck in a retry loop: "
                f"`spendgate audit --user {user} --since {started.astimezone(timezone.utc).strftime('%Y-%m-%dT%H:%M')} --limit 50`. "
                f"To stop it now: `spendgate keys revoke {user}`, or set a cap with {_budget_cmd('user', user, 'day')}. "
                "One alert per episode; it re-arms once the rate is back to normal."),
    )


def backstop_budget_alert(provider: str, reported: Decimal, budget: Decimal, attributed_nusd: int,
                          since: datetime, day: str) -> Alert:
    return Alert(
        kind="backstop",
        dedupe_key=f"backstop:budget:{provider}:{day}",
        scope="provider", name=provider,
        title=f"{provider}'s own cost report passed the backstop budget",
        facts=(
            ("Provider", provider),
            ("Provider-reported spend", f"{money(reported)} since {when(since)}"),
            ("Backstop budget", money(budget)),
            ("Gateway attributed", money(attributed_nusd)),
        ),
        action=(f"This is the provider's bill, including traffic the gateway may not see. Compare with "
                f"`spendgate usage --by user --since {since.date().isoformat()}`, check the {provider} usage dashboard, "
                "and rotate the organisation's provider keys if they are used outside the gateway."),
    )


def backstop_mismatch_alert(provider: str, reported: Decimal, attributed_nusd: int, tolerance: float,
                            since: datetime, day: str) -> Alert:
    attributed = Decimal(attributed_nusd) / _NANO
    base = max(reported, attributed)
    share = float(abs(reported - attributed) / base) if base else 0.0
    more = "more" if reported > attributed else "less"
    return Alert(
        kind="backstop",
        dedupe_key=f"backstop:mismatch:{provider}:{day}",
        scope="provider", name=provider,
        title=f"{provider} reports {share:.0%} {more} spend than the gateway attributed",
        facts=(
            ("Provider", provider),
            ("Provider-reported spend", f"{money(reported)} since {when(since)}"),
            ("Gateway attributed", money(attributed_nusd)),
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
        dedupe_key=f"shadow_traffic:{name}:{provider}:{day}",
        scope="user", name=name,
        title=f"a raw {provider} key was used by {who('user', user) if user else 'an unidentified client'}",
        facts=tuple(facts),
        action=("A provider key of the client's own is in use: spend on it is invisible to the gateway and its caps. "
                f"Rotate that key at {provider} and give the developer a Spendgate key (`spendgate keys create`)."
                + (" Their key is --byok, so these requests were passed through." if passthrough else "")),
    )


def store_failing_alert(error: str, instance: str, hour: str) -> Alert:
    return Alert(
        kind="store_failing",
        dedupe_key=f"store_failing:{hour}",
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


# -- delivery -------------------------------------------------------------------------------


class AlertDeliveryError(RuntimeError):
    pass


def retry_handlers() -> list[RetryHandler]:
    """slack-sdk's own: 429 waits `Retry-After`, 500/503 and connection errors back off and retry."""
    return [
        RateLimitErrorRetryHandler(max_retry_count=3),
        ServerErrorRetryHandler(max_retry_count=2),
        ConnectionErrorRetryHandler(max_retry_count=2),
    ]


def _open_direct(req: Request, ctx: Any, timeout: float) -> Any:
    # An empty ProxyHandler: urllib would otherwise read HTTPS_PROXY itself, and the gateway's
    # own outbound calls must never loop through its own proxy.
    opener = urllib.request.build_opener(urllib.request.ProxyHandler({}), urllib.request.HTTPSHandler(context=ctx))
    return opener.open(req, timeout=timeout)


class _DirectWebhookClient(WebhookClient):
    """slack-sdk's WebhookClient, connecting directly (it reads HTTPS_PROXY from the environment by itself)."""

    def __init__(self, url: str, **kw: Any) -> None:
        super().__init__(url, **kw)
        self.proxy = None  # drop what the constructor picked up from HTTPS_PROXY / HTTP_PROXY

    def _perform_http_request_internal(self, url: str, req: Request) -> WebhookResponse:
        if not url.lower().startswith("http"):
            raise SlackRequestError(f"Invalid URL detected: {url}")
        resp = _open_direct(req, self.ssl, self.timeout)
        charset = resp.headers.get_content_charset() or "utf-8"
        return WebhookResponse(url=url, status_code=resp.status, body=resp.read().decode(charset), headers=resp.headers)


class _DirectWebClient(WebClient):
    """slack-sdk's WebClient, connecting directly (see `_DirectWebhookClient`)."""

    def __init__(self, **kw: Any) -> None:
        super().__init__(**kw)
        self.proxy = None

    def _perform_urllib_http_request_internal(self, url: str, req: Request) -> dict[str, Any]:
        if not url.lower().startswith("http"):
            raise SlackRequestError(f"Invalid URL detected: {url}")
        resp = _open_direct(req, self.ssl, self.timeout)
        charset = resp.headers.get_content_charset() or "utf-8"
        return {"status": resp.code, "headers": resp.headers, "body": resp.read().decode(charset)}


def is_configured(slack: SlackSettings) -> bool:
    return bool(slack.webhook_url or (slack.bot_token and slack.channel))


@dataclass
class SenderStats:
    sent: int = 0
    failed: int = 0
    last_error: str | None = None
    on_result: list[Callable[[Alert, bool], None]] = field(default_factory=list)


class SlackSender:
    """Delivers alerts to Slack: `deliver` blocks (CLI), `submit` queues for the sender thread (gateway).

    Args:
        slack: `[alerts.slack]` settings: an incoming webhook, or a bot token and channel
            (`api_url` is the Web API base, normally https://slack.com/api/).
        metrics: counts `spendgate_alerts_sent_total{kind}` and `spendgate_alert_failures_total`.
        store: records each alert's delivery result in `alerts_sent` (optional).
        timeout: seconds per HTTP attempt; retries come on top.
    """

    def __init__(self, slack: SlackSettings, metrics: Metrics | None = None, store: Store | None = None,
                 timeout: int = SEND_TIMEOUT_SECONDS) -> None:
        if not is_configured(slack):
            raise ValueError("alerts.slack needs webhook_url, or bot_token and channel")
        self.slack = slack
        self.metrics = metrics
        self.store = store
        self.stats = SenderStats()
        self._webhook: WebhookClient | None = None
        self._web: WebClient | None = None
        if slack.webhook_url:
            self._webhook = _DirectWebhookClient(slack.webhook_url, timeout=timeout, logger=_sdk_log,
                                                 retry_handlers=retry_handlers())
        else:
            self._web = _DirectWebClient(token=slack.bot_token, base_url=slack.api_url, timeout=timeout,
                                         logger=_sdk_log, retry_handlers=retry_handlers())
        self._q: queue.Queue[Alert | None] = queue.Queue(maxsize=QUEUE_LIMIT)
        self._thread: threading.Thread | None = None

    @property
    def via(self) -> str:
        return "incoming webhook" if self._webhook is not None else f"chat.postMessage to {self.slack.channel}"

    def deliver(self, alert: Alert) -> None:
        """Send now, retrying per slack-sdk's handlers. Raises `AlertDeliveryError`."""
        try:
            if self._webhook is not None:
                resp = self._webhook.send(text=alert.text, blocks=alert.blocks())
                if resp.status_code != 200:
                    raise AlertDeliveryError(f"Slack answered {resp.status_code}: {(resp.body or '')[:200]}")
            else:
                assert self._web is not None and self.slack.channel
                self._web.chat_postMessage(channel=self.slack.channel, text=alert.text, blocks=alert.blocks())
        except AlertDeliveryError:
            raise
        except SlackApiError as e:
            raise AlertDeliveryError(f"Slack answered {e.response.status_code}: {e.response.get('error')}") from None
        except Exception as e:  # URLError, timeouts, TLS: the message, never the (secret) webhook URL
            reason = getattr(e, "reason", None) or e
            raise AlertDeliveryError(f"{type(e).__name__}: {reason}"[:300]) from None

    # -- background -----------------------------------------------------------

    def start(self) -> None:
        self._thread = threading.Thread(target=self._run, name="spendgate-slack", daemon=True)
        self._thread.start()

    def stop(self, timeout: float = 3.0) -> None:
        if self._thread is None:
            return
        try:
            self._q.put_nowait(None)
        except queue.Full:
            pass
        self._thread.join(timeout)
        self._thread = None

    def submit(self, alert: Alert) -> bool:
        """Queue for the sender thread; never blocks. False (counted as a failure) when the queue is full."""
        try:
            self._q.put_nowait(alert)
            return True
        except queue.Full:
            self._failed(alert, "queue full")
            return False

    @property
    def queue_depth(self) -> int:
        return self._q.qsize()

    def _run(self) -> None:
        while True:
            alert = self._q.get()
            if alert is None:
                return
            try:
                self.deliver(alert)
            except AlertDeliveryError as e:
                self._failed(alert, str(e))
                continue
            except Exception as e:  # never let the sender thread die
                self._failed(alert, f"{type(e).__name__}: {e}"[:300])
                continue
            self._sent(alert)

    def _sent(self, alert: Alert) -> None:
        self.stats.sent += 1
        if self.metrics is not None:
            self.metrics.alerts_sent.labels(alert.kind).inc()
        log.info("alert sent to Slack: %s", alert.dedupe_key or alert.kind)
        self._record(alert, "delivered", None)
        for cb in self.stats.on_result:
            cb(alert, True)

    def _failed(self, alert: Alert, error: str) -> None:
        self.stats.failed += 1
        self.stats.last_error = error
        if self.metrics is not None:
            self.metrics.alert_failures.inc()
        log.warning("alert %s not delivered to Slack: %s", alert.dedupe_key or alert.kind, error)
        self._record(alert, "failed", error)
        for cb in self.stats.on_result:
            cb(alert, False)

    def _record(self, alert: Alert, status: str, error: str | None) -> None:
        if self.store is None or not alert.dedupe_key:
            return
        try:
            self.store.mark_alert(alert.dedupe_key, status, error)
        except Exception as e:
            log.warning("could not record alert delivery (%s): %s", alert.dedupe_key, type(e).__name__)


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
