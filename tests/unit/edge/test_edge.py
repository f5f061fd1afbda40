"""`spendgate.edge` extends mitmproxy's HTTP layer by subclassing; these pin the seams it relies on,
so a mitmproxy upgrade that moves them fails here instead of silently dropping the bounds."""

from __future__ import annotations

import inspect
from collections.abc import Iterator

import pytest
from mitmproxy.proxy.layers import http as http_layers
from mitmproxy.proxy.layers.http._http1 import Http1Server

from spendgate import edge

# mitmproxy methods the subclasses override or call.
SEAMS = {
    http_layers.HttpStream: (
        "_handle_event", "passthrough", "state_wait_for_request_headers", "state_consume_request_body",
        "make_server_connection", "state_wait_for_response_headers", "start_response_stream",
        "state_stream_response_body", "state_consume_response_body", "handle_protocol_error", "send_response",
        "check_killed", "state_done", "state_errored",
    ),
    Http1Server: ("_handle_event", "start", "read_headers", "done", "mark_done"),
}


def test_the_overridden_methods_exist_in_mitmproxy() -> None:
    for base, names in SEAMS.items():
        for name in names:
            assert callable(getattr(base, name, None)), f"mitmproxy's {base.__name__} has no {name} any more"


def test_mitmproxy_builds_its_layers_by_module_global_name() -> None:
    """install() swaps the names mitmproxy looks up when a connection or stream starts."""
    assert "HttpStream(ctx, stream_id)" in inspect.getsource(http_layers.HttpLayer.make_stream)
    assert "Http1Server(self.context.fork())" in inspect.getsource(http_layers.HttpLayer._handle_event)
    stream_src = inspect.getsource(http_layers.HttpStream)
    for seam in ("def state_wait_for_request_headers", "def make_server_connection", "def handle_protocol_error",
                 "def state_consume_request_body", "def start_response_stream", "self.request_body_buf",
                 'headers.get("expect", "")'):
        assert seam in stream_src, seam


def test_install_swaps_the_classes() -> None:
    edge.install(edge.Limits(1024, 1024, 1.0, 1.0, 1.0), _NoAnswers())
    assert http_layers.HttpStream is edge.GatewayHttpStream
    assert http_layers.Http1Server is edge.GatewayHttp1Server


class _NoAnswers:
    def refuse_too_large(self, flow: object, limit: int) -> None:
        raise AssertionError("not used")

    def upstream_failed(self, flow: object, status: int, code: str, message: str, final: bool) -> object:
        raise AssertionError("not used")


def test_a_dropped_stream_lets_go_of_its_flow(monkeypatch: pytest.MonkeyPatch) -> None:
    """mitmproxy's layers keep a finished stream in reference cycles until a full collection: once
    the stream is dropped it lets go of its flow (so the flow and its call are freed at once). The
    commands and the answers to them pass through unchanged; another stream's drop releases nothing."""
    from mitmproxy import connection, options
    from mitmproxy.proxy import commands
    from mitmproxy.proxy.context import Context
    from mitmproxy.test import tflow

    answers: list[object] = []
    flow_after_drop: list[bool] = []

    def inner(self: edge.HttpStream, event: object) -> Iterator[object]:
        answers.append((yield commands.Log("first")))
        yield http_layers.DropStream(self.stream_id + 1)  # another stream's
        flow_after_drop.append(hasattr(self, "flow"))
        yield http_layers.DropStream(self.stream_id)
        flow_after_drop.append(hasattr(self, "flow"))

    monkeypatch.setattr(edge.HttpStream, "_handle_event", inner)  # mitmproxy's own (install() renames it)
    client = connection.Client(peername=("127.0.0.1", 1), sockname=("127.0.0.1", 2), timestamp_start=0)
    stream = edge.GatewayHttpStream(Context(client, options.Options()), 1)
    stream.flow = tflow.tflow(resp=True)
    gen = stream._handle_event(object())  # type: ignore[arg-type]
    assert isinstance(next(gen), commands.Log)
    assert isinstance(gen.send("answer"), http_layers.DropStream)
    assert gen.send(None).stream_id == 1
    with pytest.raises(StopIteration):
        gen.send(None)
    assert answers == ["answer"] and flow_after_drop == [True, False]
