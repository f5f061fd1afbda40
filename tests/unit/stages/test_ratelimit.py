"""spendgate.stages.ratelimit: requests per minute per key, a sliding window, with an injected clock."""

from __future__ import annotations

import json
from dataclasses import replace
from typing import Any

import pytest
from mitmproxy import http
from mitmproxy.test import tflow

from spendgate.keys import KeyRecord
from spendgate.settings import parse_settings
from spendgate.stages.call import META, Call, new_request_id
from spendgate.stages.ratelimit import RateLimit

SETTINGS = parse_settings({}, {})
KEY = KeyRecord(
    key_id="rate0001", user="alice", team=None, state="active", secret_hash="0" * 64, prev_secret_hash=None,
    prev_valid_until=None, expires_at=None, allowed_models=(), rpm=3, byok=False, capture_content=False,
    capture_reason=None,
)


class Clock:
    def __init__(self, t: float = 1000.0) -> None:
        self.t = t

    def __call__(self) -> float:
        return self.t


def flow(key: KeyRecord | None = KEY, provider: str = "openai") -> http.HTTPFlow:
    f = tflow.tflow()
    f.metadata[META] = Call(request_id=new_request_id(), provider=SETTINGS.provider(provider), host="api.openai.com",
                            key=key)
    return f


def hit(rl: RateLimit, f: http.HTTPFlow | None = None) -> http.HTTPFlow:
    f = f or flow()
    rl.requestheaders(f)
    return f


def status(f: http.HTTPFlow) -> int:
    return 200 if f.response is None else f.response.status_code


# (seconds since the first request, expected status, expected Retry-After or None)
SCHEDULES = [
    pytest.param([(0, 200, None), (1, 200, None), (2, 200, None), (3, 429, "57")], id="fourth-within-a-minute"),
    pytest.param([(0, 200, None), (0, 200, None), (0, 200, None), (59.5, 429, "1"), (60, 200, None)],
                 id="window-slides-at-60s"),
    pytest.param([(0, 200, None), (30, 200, None), (40, 200, None), (50, 429, "10"), (60, 200, None),
                  (61, 429, "29"), (90, 200, None)], id="sliding-not-fixed-minute"),
    pytest.param([(0, 200, None), (1, 200, None), (2, 200, None), (10, 429, "50"), (11, 429, "49"),
                  (60, 200, None)], id="refusals-do-not-count"),
]


@pytest.mark.parametrize("schedule", SCHEDULES)
def test_schedule(schedule: list[tuple[float, int, str | None]]) -> None:
    clock = Clock()
    rl = RateLimit(clock=clock)
    t0 = clock.t
    for offset, want, retry in schedule:
        clock.t = t0 + offset
        f = hit(rl)
        assert status(f) == want, (offset, schedule)
        if want == 429:
            assert f.response is not None
            assert f.response.headers["retry-after"] == retry
            call = f.metadata[META]
            assert (call.outcome, call.status_code) == ("blocked_rate", 429)


def test_refusal_is_provider_shaped_and_names_the_limit() -> None:
    clock = Clock()
    rl = RateLimit(clock=clock)
    for provider, shape in (("openai", "openai"), ("anthropic", "anthropic")):
        key = replace(KEY, key_id=f"rate{provider[:4]}", rpm=1)
        assert status(hit(rl, flow(key, provider))) == 200
        f = hit(rl, flow(key, provider))
        assert f.response is not None and f.response.status_code == 429
        doc: Any = json.loads(f.response.content or b"")
        if shape == "openai":
            assert doc["error"]["code"] == "spendgate_rate_limited"
            message = doc["error"]["message"]
        else:
            assert doc["type"] == "error" and doc["error"]["type"] == "rate_limit_error"
            message = doc["error"]["message"]
        assert "1 requests per minute" in message and key.key_id in message
        assert f.response.headers["x-spendgate-request-id"] == f.metadata[META].request_id


def test_limits_are_per_key() -> None:
    rl = RateLimit(clock=Clock())
    other = replace(KEY, key_id="rate0002")
    for _ in range(3):
        assert status(hit(rl)) == 200
    assert status(hit(rl)) == 429
    assert status(hit(rl, flow(other))) == 200


@pytest.mark.parametrize("rpm", [None, 0])
def test_keys_without_rpm_are_not_limited(rpm: int | None) -> None:
    rl = RateLimit(clock=Clock())
    key = replace(KEY, rpm=rpm)
    assert all(status(hit(rl, flow(key))) == 200 for _ in range(500))


def test_requests_refused_earlier_or_not_attributed_are_not_counted() -> None:
    rl = RateLimit(clock=Clock())
    refused = flow()
    refused.response = http.Response.make(401, b"")
    for _ in range(5):
        rl.requestheaders(refused)
        assert refused.response.status_code == 401
    rl.requestheaders(flow(key=None))  # no key: identity already refused it
    bare = tflow.tflow()  # not a model host: no Call at all
    rl.requestheaders(bare)
    assert bare.response is None
    for _ in range(3):
        assert status(hit(rl)) == 200  # the key's 3 requests are all still available
    assert status(hit(rl)) == 429
