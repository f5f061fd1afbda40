"""Slack delivery: the only code that talks to Slack.

Delivery runs on its own thread with slack-sdk's retry handlers (429 with `Retry-After`, 5xx,
connection errors); a failure is counted and logged, never raised into the proxy. The clients
connect directly: slack-sdk would otherwise pick up HTTPS_PROXY and loop through the gateway.
"""

from __future__ import annotations

import logging
import queue
import threading
import urllib.request
from dataclasses import dataclass
from typing import Any
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

from spendgate.alerts.messages import Alert
from spendgate.metrics import Metrics
from spendgate.settings import SlackSettings
from spendgate.store.alerts import AlertMarks

log = logging.getLogger(__name__)

# slack-sdk logs the request URL on retries at INFO (an incoming-webhook URL is a secret) and every
# failed attempt at ERROR; this module logs one line per alert instead.
_sdk_log = logging.getLogger(__name__ + ".slack_sdk")
_sdk_log.setLevel(logging.CRITICAL)

SEND_TIMEOUT_SECONDS = 10
QUEUE_LIMIT = 1000


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


class SlackSender:
    """Delivers alerts to Slack: `deliver` blocks (CLI), `submit` queues for the sender thread (gateway).

    Args:
        slack: `[alerts.slack]` settings: an incoming webhook, or a bot token and channel
            (`api_url` is the Web API base, normally https://slack.com/api/).
        metrics: counts `spendgate_alerts_sent_total{kind}` and `spendgate_alert_failures_total`.
        store: records each alert's delivery result in `alerts_sent` (optional).
        timeout: seconds per HTTP attempt; retries come on top.
    """

    def __init__(self, slack: SlackSettings, metrics: Metrics | None = None, store: AlertMarks | None = None,
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

    def _failed(self, alert: Alert, error: str) -> None:
        self.stats.failed += 1
        self.stats.last_error = error
        if self.metrics is not None:
            self.metrics.alert_failures.inc()
        log.warning("alert %s not delivered to Slack: %s", alert.dedupe_key or alert.kind, error)
        self._record(alert, "failed", error)

    def _record(self, alert: Alert, status: str, error: str | None) -> None:
        if self.store is None or not alert.dedupe_key:
            return
        try:
            self.store.mark(alert.dedupe_key, status, error)
        except Exception as e:
            log.warning("could not record alert delivery (%s): %s", alert.dedupe_key, type(e).__name__)
