"""The pipeline runs stages in order, awaits async ones, fails closed when a stage breaks, measures
each stage, and ends every request exactly once."""

from __future__ import annotations

import asyncio
import time
from typing import Any

from mitmproxy import flow as mflow
from mitmproxy.test import tflow

from spendgate.stages.call import Call, Outcome
from spendgate.stages.pipeline import Pipeline
from spendgate.testing import tcall, tresponse
from spendgate.testing import tflow as sgflow


def _call(flow: Any) -> Call:
    return tcall(flow)


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
    assert not hasattr(p, "responseheaders"), "hooks no stage implements are not exposed"


def test_a_broken_request_stage_refuses_the_request_provider_shaped() -> None:
    log: list[str] = []
    p = Pipeline([Broken(), Recorder("after", log)])
    flow = tflow.tflow()
    call = _call(flow)
    p.request(flow)
    assert flow.response is not None and flow.response.status_code == 500
    assert b"spendgate_internal_error" in flow.response.content
    assert call.outcome is Outcome.GATEWAY_ERROR
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
    asyncio.run(p.response(flow))
    assert flow.response is before and flow.response.status_code == 200


class Finisher:
    def __init__(self, name: str, log: list[str]) -> None:
        self.name, self.log = name, log

    def finish(self, flow: Any, call: Call) -> None:
        self.log.append(self.name)


class AsyncFinisher(Finisher):
    async def finish(self, flow: Any, call: Call) -> None:  # type: ignore[override]
        await asyncio.sleep(0)
        self.log.append(self.name)


def test_finish_runs_once_per_request_in_order_whichever_hook_ends_it() -> None:
    log: list[str] = []
    p = Pipeline([Finisher("meter", log), AsyncFinisher("record", log), Finisher("metrics", log)])
    flow = sgflow(resp=tresponse())
    call = _call(flow)
    asyncio.run(p.response(flow))
    flow.error = mflow.Error("Client disconnected.")  # a late error after the answer
    asyncio.run(p.error(flow))
    assert log == ["meter", "record", "metrics"] and call.finished


def test_finish_runs_on_error_alone_and_not_for_flows_without_a_call() -> None:
    log: list[str] = []
    p = Pipeline([Finisher("record", log)])
    asyncio.run(p.error(tflow.tflow(err=True)))
    assert log == []
    flow = sgflow()
    _call(flow)
    flow.error = mflow.Error("upstream went away")
    asyncio.run(p.error(flow))
    assert log == ["record"]


def test_a_broken_finish_does_not_stop_the_others() -> None:
    class BrokenFinish:
        def finish(self, flow: Any, call: Call) -> None:
            raise RuntimeError("boom")

    log: list[str] = []
    p = Pipeline([BrokenFinish(), Finisher("metrics", log)])
    flow = sgflow(resp=tresponse())
    _call(flow)
    asyncio.run(p.response(flow))
    assert log == ["metrics"]


class Slow:
    def __init__(self, seconds: float) -> None:
        self.seconds = seconds

    def requestheaders(self, flow: Any) -> None:
        time.sleep(self.seconds)

    def finish(self, flow: Any, call: Call) -> None:
        time.sleep(self.seconds)


def test_stage_time_is_measured_before_and_after_the_upstream() -> None:
    p = Pipeline([Slow(0.01)])
    flow = sgflow(resp=tresponse())
    call = _call(flow)
    p.requestheaders(flow)
    asyncio.run(p.response(flow))
    assert 0.01 <= call.timing.pre < 0.5 and 0.01 <= call.timing.post < 0.5
    assert call.timing.overhead == call.timing.pre + call.timing.post
    assert p.seconds["Slow"] >= 0.02
