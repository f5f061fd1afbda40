"""The log handler: levels, the JSON format, and mitmproxy's own chatter kept below warning."""

from __future__ import annotations

import io
import json
import logging
from collections.abc import Iterator

import pytest

from spendgate import logs


@pytest.fixture(autouse=True)
def _restore() -> Iterator[None]:
    saved = {n: (logging.getLogger(n).handlers[:], logging.getLogger(n).level, logging.getLogger(n).propagate)
             for n in ("spendgate", "mitmproxy")}
    yield
    for n, (handlers, level, propagate) in saved.items():
        lg = logging.getLogger(n)
        lg.handlers, lg.level, lg.propagate = handlers, level, propagate


def test_json_lines_carry_level_logger_message_and_extra_fields() -> None:
    out = io.StringIO()
    logs.setup("info", "json", out)
    logging.getLogger("spendgate.stages.pipeline").info("refused %s", "sgr_1", extra={"status": 401})
    logging.getLogger("spendgate.x").debug("not at info")
    (line,) = out.getvalue().splitlines()
    doc = json.loads(line)
    assert (doc["level"], doc["logger"], doc["msg"], doc["status"]) == ("info", "spendgate.stages.pipeline",
                                                                         "refused sgr_1", 401)
    assert doc["ts"].endswith("+00:00")


def test_text_lines_and_levels() -> None:
    out = io.StringIO()
    logs.setup("warning", "text", out)
    logging.getLogger("spendgate").info("quiet")
    logging.getLogger("spendgate").warning("loud")
    logging.getLogger("mitmproxy.proxy.server").info("client connect")
    logging.getLogger("mitmproxy.proxy.server").warning("protocol error")
    text = out.getvalue()
    assert "loud" in text and "protocol error" in text
    assert "quiet" not in text and "client connect" not in text
    assert "WARNING" in text and "spendgate: loud" in text


def test_debug_lets_mitmproxy_speak() -> None:
    out = io.StringIO()
    logs.setup("debug", "text", out)
    logging.getLogger("mitmproxy.proxy.server").info("client connect")
    assert "client connect" in out.getvalue()
