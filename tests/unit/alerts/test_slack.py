"""spendgate.alerts.slack: the slack-sdk sender against a local Slack stand-in (tests/rig/slack_mock.py):
webhook and bot-token delivery, slack-sdk's retries, failures counted and recorded, a queue that never
blocks, and no proxy from the environment."""

from __future__ import annotations

import socket
import threading
import time
from collections.abc import Iterator

import pytest
from prometheus_client import generate_latest

from spendgate.alerts.slack import AlertDeliveryError, SlackSender, is_configured
from spendgate.metrics import Metrics
from spendgate.settings import SlackSettings
from spendgate.store import Database
from tests.rig.slack_mock import SlackMock
from tests.unit.alerts.helpers import ALL_ALERTS, Stores

THRESHOLD, CAP_BLOCKED, SPIKE = ALL_ALERTS[0], ALL_ALERTS[1], ALL_ALERTS[3]


@pytest.fixture(scope="module")
def _slack_module() -> Iterator[SlackMock]:
    with SlackMock(token="xoxb-test-token") as s:
        yield s


@pytest.fixture
def slack(_slack_module: SlackMock) -> Iterator[SlackMock]:
    _slack_module.reset()
    yield _slack_module
    _slack_module.reset()


def webhook(slack: SlackMock) -> SlackSettings:
    return SlackSettings(webhook_url=slack.webhook_url)


def bot(slack: SlackMock, token: str = "xoxb-test-token") -> SlackSettings:
    return SlackSettings(bot_token=token, channel="#spend", api_url=slack.api_url)


def test_what_counts_as_configured() -> None:
    assert is_configured(SlackSettings(webhook_url="https://hooks.example/x"))
    assert is_configured(SlackSettings(bot_token="xoxb-1", channel="#c"))
    assert not is_configured(SlackSettings(bot_token="xoxb-1"))  # a token needs a channel
    assert not is_configured(SlackSettings())
    with pytest.raises(ValueError, match="webhook_url"):
        SlackSender(SlackSettings())


def test_webhook_delivery_with_blocks_and_counted(slack: SlackMock) -> None:
    m = Metrics()
    sender = SlackSender(webhook(slack), m)
    assert sender.via == "incoming webhook"
    sender.deliver(THRESHOLD)
    (msg,) = slack.wait_for(1)
    assert msg.kind == "webhook" and msg.text == THRESHOLD.text and msg.blocks == THRESHOLD.blocks()
    sender.start()
    try:
        assert sender.submit(CAP_BLOCKED)
        slack.wait_for(2)
        deadline = time.monotonic() + 5
        while sender.stats.sent < 1 and time.monotonic() < deadline:
            time.sleep(0.01)
    finally:
        sender.stop()
    text = generate_latest(m.registry).decode()
    assert 'spendgate_alerts_sent_total{kind="cap_blocked"} 1.0' in text
    assert "spendgate_alert_failures_total 0.0" in text


def test_bot_token_posts_to_the_channel_and_a_bad_token_fails(slack: SlackMock) -> None:
    good = SlackSender(bot(slack))
    assert good.via == "chat.postMessage to #spend"
    good.deliver(SPIKE)
    (msg,) = slack.wait_for(1)
    assert msg.kind == "chat.postMessage" and msg.headers["authorization"] == "Bearer xoxb-test-token"
    assert msg.json["channel"] == "#spend" and msg.text == SPIKE.text and msg.blocks == SPIKE.blocks()
    bad = SlackSender(bot(slack, "xoxb-wrong"))
    with pytest.raises(AlertDeliveryError, match="invalid_auth"):
        bad.deliver(SPIKE)


@pytest.mark.parametrize("via", ["webhook", "bot"])
def test_429_with_retry_after_is_honoured_then_delivered_once(slack: SlackMock, via: str) -> None:
    slack.fail_next(429, retry_after=1)
    SlackSender(webhook(slack) if via == "webhook" else bot(slack)).deliver(THRESHOLD)
    assert [r.status for r in slack.requests] == [429, 200]
    first, second = slack.requests
    assert second.at - first.at >= 1.0  # Retry-After honoured
    assert len(slack.messages) == 1


def test_5xx_is_retried_and_slack_down_fails_and_is_counted(slack: SlackMock, sqlite_db: Database) -> None:
    slack.fail_next(500)
    SlackSender(webhook(slack)).deliver(THRESHOLD)
    assert [r.status for r in slack.requests] == [500, 200]

    st = Stores.of(sqlite_db)
    alert = THRESHOLD
    assert st.marks.claim(alert.dedupe_key, alert.kind, alert.scope, alert.name, alert.text, alert.blocks_json())
    m = Metrics()
    sender = SlackSender(webhook(slack), m, st.marks)
    slack.down()
    sender.start()
    try:
        sender.submit(alert)
        deadline = time.monotonic() + 10
        while sender.stats.failed < 1 and time.monotonic() < deadline:
            time.sleep(0.02)
    finally:
        sender.stop()
    assert "spendgate_alert_failures_total 1.0" in generate_latest(m.registry).decode()
    row = st.mark(alert.dedupe_key)
    assert row is not None and row.status == "failed" and "refused" in (row.error or "").lower()
    assert slack.webhook_url not in (row.error or "")
    assert sender.stats.last_error is not None and slack.webhook_url not in sender.stats.last_error


def test_submit_never_blocks_while_slack_hangs(slack: SlackMock) -> None:
    sender = SlackSender(webhook(slack), timeout=30)
    slack.hang()
    sender.start()
    try:
        t0 = time.perf_counter()
        for a in ALL_ALERTS:
            assert sender.submit(a)
        assert time.perf_counter() - t0 < 0.05
        deadline = time.monotonic() + 5
        while not slack.requests and time.monotonic() < deadline:
            time.sleep(0.01)
        assert len(slack.requests) == 1 and slack.requests[0].status is None  # stuck in the first send
    finally:
        slack.release()
        sender.stop(timeout=0.5)


class _RecordingProxy:
    """A TCP listener that only counts connections: where HTTPS_PROXY points."""

    def __init__(self) -> None:
        self.sock = socket.socket()
        self.sock.bind(("127.0.0.1", 0))
        self.sock.listen(16)
        self.sock.settimeout(0.1)
        self.accepted = 0
        self._stop = threading.Event()
        self._t = threading.Thread(target=self._run, daemon=True)
        self._t.start()

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.sock.getsockname()[1]}"

    def _run(self) -> None:
        while not self._stop.is_set():
            try:
                c, _ = self.sock.accept()
            except OSError:
                continue
            self.accepted += 1
            c.close()

    def close(self) -> None:
        self._stop.set()
        self._t.join(1)
        self.sock.close()


@pytest.mark.parametrize("via", ["webhook", "bot"])
def test_proxy_environment_is_not_used(slack: SlackMock, monkeypatch: pytest.MonkeyPatch, via: str) -> None:
    proxy = _RecordingProxy()
    try:
        for var in ("HTTPS_PROXY", "https_proxy", "HTTP_PROXY", "http_proxy", "ALL_PROXY"):
            monkeypatch.setenv(var, proxy.url)
        monkeypatch.delenv("NO_PROXY", raising=False)
        monkeypatch.delenv("no_proxy", raising=False)
        # slack-sdk on its own would take the environment's proxy (what this guards against):
        from slack_sdk.webhook import WebhookClient

        assert WebhookClient(slack.webhook_url).proxy == proxy.url
        SlackSender(webhook(slack) if via == "webhook" else bot(slack)).deliver(THRESHOLD)
        slack.wait_for(1)
        assert proxy.accepted == 0
    finally:
        proxy.close()
