"""Slack alerts from real `spendgate serve` processes, with slack-sdk talking to a local Slack
stand-in (tests/rig/slack_mock.py): thresholds sent once across two gateways on PostgreSQL and a
restart, 429 with Retry-After, Slack down without slowing the proxy, a spend spike, shadow
traffic, the provider backstop against the mock's cost APIs, and `spendgate alerts test|list`."""

from __future__ import annotations

import re
import statistics
import threading
import time
from collections.abc import Callable, Iterator
from datetime import datetime, timezone
from decimal import Decimal
from typing import Any

import openai
import pytest

from spendgate.periods import period_end
from tests.rig.gateway import GatewayProcess, Inline
from tests.rig.mock_provider import MockProvider
from tests.rig.slack_mock import SlackMock, SlackRequest

UTC = timezone.utc
MSGS = [{"role": "user", "content": "hi"}]
# $1 per million prompt tokens; the mock bills the prompt tokens a test asks for, and no output.
PRICES = {"prices": {"overrides": {"openai:gpt-4o": Inline(input=1.0, output=1.0)}}}
SPIKE = {"window_seconds": 10, "baseline_seconds": 120, "factor": 5.0, "min_requests": 25, "min_usd": 1000}


def slack_config(slack: SlackMock, **tables: dict[str, Any]) -> dict[str, Any]:
    return {**PRICES, "alerts": {"slack": {"webhook_url": slack.webhook_url, "thresholds": [50, 80, 100]}, **tables}}


def spend(gw: GatewayProcess, key: str, usd: str) -> Any:
    """One chat request that costs exactly `usd` (the mock reports usd * 1M prompt tokens)."""
    tokens = int(Decimal(usd) * 1_000_000)
    return gw.openai_client(key).chat.completions.create(
        model="gpt-4o", messages=MSGS, max_tokens=1,
        extra_headers={"x-mock-scenario": f"ok; input_tokens={tokens}; output_tokens=0"})


def kind_of(msg: SlackRequest) -> str:
    """The alert kind, from the message's context block ("threshold · threshold:user:…")."""
    ctx = msg.blocks[-1]["elements"][0]["text"] if msg.blocks else ""
    return ctx.split(" ", 1)[0]


def key_of(msg: SlackRequest) -> str:
    return msg.blocks[-1]["elements"][0]["text"].split(" · ", 1)[1]


def of(kind: str, name: str | None = None) -> Callable[[SlackRequest], bool]:
    return lambda m: kind_of(m) == kind and (name is None or f":{name}:" in key_of(m))


def metric(gw: GatewayProcess, name: str, labels: str = "") -> float:
    pat = re.compile(rf"^{re.escape(name)}{re.escape(labels)} ([0-9.e+-]+)$", re.M)
    m = pat.search(gw.metrics_text())
    return float(m.group(1)) if m else 0.0


def wait_until(cond: Callable[[], bool], timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while not cond():
        if time.monotonic() > deadline:
            raise TimeoutError(what)
        time.sleep(0.05)


@pytest.fixture(scope="module")
def _slack_module() -> Iterator[SlackMock]:
    with SlackMock() as s:
        yield s


@pytest.fixture
def slack(_slack_module: SlackMock) -> Iterator[SlackMock]:
    _slack_module.reset()
    yield _slack_module
    _slack_module.reset()


@pytest.fixture(scope="module")
def gw(tmp_path_factory: pytest.TempPathFactory, _mock_provider_session: MockProvider,
       _slack_module: SlackMock) -> Iterator[GatewayProcess]:
    """One gateway (SQLite) with Slack alerts and a short spike window, shared by this module's tests."""
    g = GatewayProcess(tmp_path_factory.mktemp("e2e-alerts"), _mock_provider_session.url, name="alerts",
                       overrides=slack_config(_slack_module, spike=SPIKE))
    g.start()
    yield g
    g.stop()


@pytest.fixture
def attach(request: pytest.FixtureRequest) -> Callable[..., None]:
    def _attach(*gws: GatewayProcess) -> None:
        request.node._spendgate_gateways = list(gws)  # conftest attaches their logs to a failing test's report
    return _attach


# --------------------------------------------------------------------------- thresholds


def test_thresholds_alert_once_across_two_instances_on_postgres_and_a_restart(
    gateway_factory: Callable[..., GatewayProcess], pg_url: str, slack: SlackMock,
) -> None:
    cfg = slack_config(slack, spike={"min_usd": 1000})  # $1 in 5 minutes from a new user would be a spike
    a = gateway_factory(db_url=pg_url, overrides=cfg, name="pg-a", start=False)
    b = gateway_factory(db_url=pg_url, overrides=cfg, name="pg-b", start=False)
    key = a.create_key("alice", team="core", cap="1.00", period="day")["key"]  # also migrates the database
    starting = [threading.Thread(target=g.start) for g in (a, b)]
    for t in starting:
        t.start()
    for t in starting:
        t.join()
    assert a.running and b.running
    threshold = of("threshold", "alice")

    spend(a, key, "0.50")
    (m50,) = slack.wait_for(1, 15, threshold)
    b.restart()  # a fresh process, no memory of what was sent: the mark is in the database
    spend(b, key, "0.30")
    slack.wait_for(2, 15, threshold)
    spend(a, key, "0.20")
    msgs = slack.wait_for(3, 15, threshold)

    # The cap is reached: the next requests are refused; the first block alerts, the second is counted.
    for g in (b, a):
        with pytest.raises(openai.RateLimitError):
            spend(g, key, "0.01")
    slack.wait_for(1, 15, of("cap_blocked", "alice"))
    time.sleep(2.0)  # a few more evaluation rounds on both instances: nothing new may appear
    msgs = [m for m in slack.messages if threshold(m)]
    assert len(msgs) == 3, [m.text for m in msgs]
    assert len([m for m in slack.messages if kind_of(m) == "cap_blocked"]) == 1

    reset = period_end("day", datetime.now(UTC)).strftime("%Y-%m-%d %H:%M UTC")
    for m, pct, spent in zip(msgs, (50, 80, 100), ("0.50", "0.80", "1.00")):
        assert key_of(m).endswith(f":{pct}") and key_of(m).startswith("threshold:user:alice:day:")
        assert f"${spent} of $1.00 ({pct}%)" in m.text, m.text
        assert "user alice (team core)" in m.text and "Period: day" in m.text and f"Resets: {reset}" in m.text
        assert "What to do:" in m.text
        fields = {f["text"].split("\n")[0].strip("*"): f["text"].split("\n", 1)[1] for f in m.blocks[1]["fields"]}
        assert fields["Spent"] == f"${spent} of $1.00 ({pct}%)" and fields["Resets"] == reset
    assert "reached the daily cap" in msgs[2].text and "refused (429)" in msgs[2].text
    assert m50 is msgs[0]

    rows = a.cli_json("alerts", "list")
    assert sorted((r["kind"], r["status"]) for r in rows) == [
        ("cap_blocked", "delivered"), ("threshold", "delivered"), ("threshold", "delivered"),
        ("threshold", "delivered")]
    assert next(r for r in rows if r["kind"] == "cap_blocked")["count"] == 2
    for g in (a, b):
        log = g.log_text()
        assert slack.webhook_url.rsplit("/", 1)[1] not in log  # the webhook URL is a secret


# --------------------------------------------------------------------------- Slack misbehaving


def test_slack_429_with_retry_after_is_delivered_once_late(gw: GatewayProcess, slack: SlackMock,
                                                           attach: Callable[..., None]) -> None:
    attach(gw)
    key = gw.create_key("bob", cap="1.00", period="day")["key"]
    sent_before = metric(gw, "spendgate_alerts_sent_total", '{kind="threshold"}')
    failures_before = metric(gw, "spendgate_alert_failures_total")
    slack.fail_next(429, retry_after=2)
    spend(gw, key, "0.60")
    (msg,) = slack.wait_for(1, 20, of("threshold", "bob"))
    attempts = [r for r in slack.requests if r.text == msg.text]
    assert [r.status for r in attempts] == [429, 200]
    assert attempts[1].at - attempts[0].at >= 2.0  # Retry-After honoured
    assert "$0.60 of $1.00 (60%)" in msg.text
    wait_until(lambda: metric(gw, "spendgate_alerts_sent_total", '{kind="threshold"}') == sent_before + 1, 5,
               "alerts_sent not counted")
    assert metric(gw, "spendgate_alert_failures_total") == failures_before
    time.sleep(1.0)
    assert len([m for m in slack.messages if of("threshold", "bob")(m)]) == 1


def _latencies(gw: GatewayProcess, key: str, n: int) -> list[float]:
    client = gw.openai_client(key)
    out = []
    for _ in range(n):
        t0 = time.perf_counter()
        client.chat.completions.create(model="gpt-4o", messages=MSGS, max_tokens=1)
        out.append(time.perf_counter() - t0)
    return out


def test_slack_down_does_not_slow_proxying_and_the_failure_is_counted(gw: GatewayProcess, slack: SlackMock,
                                                                      attach: Callable[..., None]) -> None:
    attach(gw)
    up_key = gw.create_key("carl")["key"]
    down_key = gw.create_key("dina", cap="1.00", period="day")["key"]
    _latencies(gw, up_key, 3)  # warm up connections and code paths
    up = _latencies(gw, up_key, 20)

    failures_before = metric(gw, "spendgate_alert_failures_total")
    slack.hang()  # Slack accepts the connection and never answers: the worst case for a blocking sender
    spend(gw, down_key, "0.60")
    wait_until(lambda: any(r.status is None for r in slack.requests), 10, "the alert never reached Slack")
    down = _latencies(gw, down_key, 15)  # dina stays below the spike test's min_requests
    med_up, med_down = statistics.median(up), statistics.median(down)
    assert med_down < 3 * med_up + 0.05, (med_up, med_down)
    assert max(down) < 2.0, down

    slack.down()  # now refuse connections: the hung attempt and its retries fail
    wait_until(lambda: metric(gw, "spendgate_alert_failures_total") >= failures_before + 1, 20,
               "the failed delivery was not counted")
    assert not [m for m in slack.messages if of("threshold", "dina")(m)]
    rows = [r for r in gw.cli_json("alerts", "list", "--kind", "threshold") if r["name"] == "dina"]
    assert [r["status"] for r in rows] == ["failed"] and rows[0]["error"]
    # Proxying still fine while Slack is down.
    assert max(_latencies(gw, down_key, 5)) < 2.0


# --------------------------------------------------------------------------- spikes, shadow traffic


def test_a_burst_far_above_baseline_sends_one_spike_alert(gw: GatewayProcess, slack: SlackMock,
                                                          attach: Callable[..., None]) -> None:
    attach(gw)
    eve = gw.create_key("eve", team="agents")["key"]
    gus = gw.create_key("gus")["key"]
    _latencies(gw, gus, 10)  # below min_requests: not a spike
    _latencies(gw, eve, 40)
    (msg,) = slack.wait_for(1, 15, of("spike", "eve"))
    assert "eve (team agents)" in msg.text and "requests" in msg.text and "What to do:" in msg.text
    n = int(re.search(r"Last 10 s: (\d+) requests", msg.text).group(1))  # type: ignore[union-attr]
    assert 25 <= n <= 40
    # The loop goes on: the same episode, no second alert.
    for _ in range(2):
        _latencies(gw, eve, 10)
        time.sleep(0.7)
    time.sleep(2.0)
    assert len([m for m in slack.messages if of("spike", "eve")(m)]) == 1
    assert not [m for m in slack.messages if of("spike", "gus")(m)]


def test_raw_provider_keys_alert_as_shadow_traffic(gw: GatewayProcess, slack: SlackMock,
                                                   attach: Callable[..., None]) -> None:
    attach(gw)
    foreign = "sk-" + "proj" + "Shadow" + "Z" * 20  # built at runtime: a leak scanner reads the source
    client = openai.OpenAI(api_key=foreign, base_url="https://api.openai.com/v1", max_retries=0,
                           http_client=openai.DefaultHttpxClient(proxy=gw.proxy_url(), verify=gw.ssl_context(),
                                                                 trust_env=False))
    for _ in range(2):
        with pytest.raises(openai.PermissionDeniedError):
            client.chat.completions.create(model="gpt-4o", messages=MSGS)
    (msg,) = slack.wait_for(1, 10, lambda m: kind_of(m) == "shadow_traffic")
    assert "raw openai key" in msg.text and "Rotate that key" in msg.text
    assert foreign not in msg.text and foreign not in gw.log_text()
    time.sleep(1.5)
    assert len([m for m in slack.messages if kind_of(m) == "shadow_traffic"]) == 1


# --------------------------------------------------------------------------- CLI


def test_alerts_test_command(gw: GatewayProcess, slack: SlackMock) -> None:
    cp = gw.cli("alerts", "test")
    assert "delivered" in cp.stdout
    (msg,) = slack.wait_for(1, 5, lambda m: kind_of(m) == "test")
    assert msg.text.startswith("Spendgate: test message")
    slack.down()
    cp = gw.cli("alerts", "test", check=False)
    assert cp.returncode == 1 and "not delivered" in cp.stderr
    assert slack.webhook_url.rsplit("/", 1)[1] not in cp.stderr + cp.stdout


def test_alerts_commands_without_slack(gateway_factory: Callable[..., GatewayProcess]) -> None:
    g = gateway_factory(start=False, name="no-slack")
    cp = g.cli("alerts", "test", check=False)
    assert cp.returncode == 2 and "not configured" in cp.stderr


# --------------------------------------------------------------------------- provider backstop


def test_provider_backstop_alerts_on_budget_and_mismatch_not_within_tolerance(
    gateway_factory: Callable[..., GatewayProcess], mock_provider: MockProvider, slack: SlackMock,
) -> None:
    cfg = slack_config(slack, backstop={"interval_seconds": 1, "budget_usd": 5, "tolerance": 0.2})
    cfg["providers"] = {"openai": {"admin_api_key": "env:OPENAI_ADMIN_KEY"},
                        "anthropic": {"admin_api_key": "env:ANTHROPIC_ADMIN_KEY"}}
    g = gateway_factory(overrides=cfg, name="backstop")
    key = g.create_key("alice")["key"]
    spend(g, key, "1.00")  # what the gateway attributes to openai today
    assert not mock_provider.find(endpoint="costs")  # no admin key in the environment yet: no backstop

    mock_provider.set_costs(openai_usd="1.05", anthropic_usd="0")  # 5% apart: within tolerance
    g.extra_env.update(OPENAI_ADMIN_KEY="admin-openai-e2e", ANTHROPIC_ADMIN_KEY="admin-anthropic-e2e")
    g.restart()
    wait_until(lambda: len(mock_provider.find(endpoint="costs")) >= 2
               and len(mock_provider.find(endpoint="cost_report")) >= 2, 15, "the backstop did not poll")
    time.sleep(0.3)  # the last poll's verdict
    assert not [m for m in slack.messages if kind_of(m) == "backstop"]
    o, a = mock_provider.find(endpoint="costs")[-1], mock_provider.find(endpoint="cost_report")[-1]
    assert o.header("authorization") == "Bearer admin-openai-e2e"
    assert a.header("x-api-key") == "admin-anthropic-e2e" and a.header("anthropic-version") == "2023-06-01"

    mock_provider.set_costs(openai_usd="6.5", anthropic_usd="0.4")
    msgs = slack.wait_for(3, 15, lambda m: kind_of(m) == "backstop")
    keys = sorted(key_of(m).rsplit(":", 1)[0] for m in msgs)
    assert keys == ["backstop:budget:openai", "backstop:mismatch:anthropic", "backstop:mismatch:openai"]
    budget = next(m for m in msgs if ":budget:" in key_of(m))
    assert "$6.50" in budget.text and "$5.00" in budget.text and "Gateway attributed: $1.00" in budget.text
    mismatch = next(m for m in msgs if key_of(m).startswith("backstop:mismatch:openai"))
    assert "85% more" in mismatch.text
    polls = len(mock_provider.find(endpoint="costs"))
    wait_until(lambda: len(mock_provider.find(endpoint="costs")) >= polls + 1, 10, "the backstop stopped polling")
    time.sleep(0.3)
    assert len([m for m in slack.messages if kind_of(m) == "backstop"]) == 3  # once a day each
    log = g.log_text()
    assert "admin-openai-e2e" not in log and "admin-anthropic-e2e" not in log
