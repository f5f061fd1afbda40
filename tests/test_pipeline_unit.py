"""The pipeline runs stages in order, awaits async ones, and fails closed when a stage breaks."""

from __future__ import annotations

import asyncio
from typing import Any

from mitmproxy.test import tflow

from spendgate.call import META, Call
from spendgate.pipeline import Pipeline
from spendgate.settings import parse_settings


def _call() -> Call:
    provider = parse_settings({}, {}).provider("openai")
    assert provider is not None
    return Call(request_id="sgr_test", provider=provider, host="api.openai.com")


class Recorder:
    def __init__(self, name: str, log: list[str]) -> None:
        self.name, self.log = name, log

    def request(self, flow: Any) -> None:
        self.log.append(self.name)


class AsyncRecorder(Recorder):
    async def request(self, flow: Any) -> None:  # type: ignore[override]
        await asyncio.sleep(0)
        self.log.append(self.name)


class Broken:
    def request(self, flow: Any) -> None:
        raise RuntimeError("boom")

    def response(self, flow: Any) -> None:
        raise RuntimeError("boom")


def test_stages_run_in_order_mixing_sync_and_async() -> None:
    log: list[str] = []
    p = Pipeline([Recorder("a", log), AsyncRecorder("b", log), Recorder("c", log)])
    asyncio.run(p.request(tflow.tflow()))
    assert log == ["a", "b", "c"]
    assert not hasattr(p, "response"), "hooks no stage implements are not exposed"


def test_a_broken_request_stage_refuses_the_request_provider_shaped() -> None:
    log: list[str] = []
    p = Pipeline([Broken(), Recorder("after", log)])
    flow = tflow.tflow()
    flow.metadata[META] = call = _call()
    p.request(flow)
    assert flow.response is not None and flow.response.status_code == 500
    assert b"spendgate_internal_error" in flow.response.content
    assert call.outcome == "gateway_error"
    assert log == ["after"], "later stages still run (and see the refusal)"


def test_a_broken_stage_without_a_call_still_stops_the_request() -> None:
    p = Pipeline([Broken()])
    flow = tflow.tflow()
    p.request(flow)
    assert flow.response is not None and flow.response.status_code == 500


def test_a_broken_response_stage_does_not_replace_the_answer() -> None:
    p = Pipeline([Broken()])
    flow = tflow.tflow(resp=True)
    before = flow.response
    p.response(flow)
    assert flow.response is before and flow.response.status_code == 200
