"""Where the gateway's log lines go, and in what shape: `[log] level` and `format` (text or JSON).

One handler on stderr for the gateway's own loggers (`spendgate.*`) and mitmproxy's (`mitmproxy.*`,
at warning unless debugging: its per-connection chatter is not the admin's business, its protocol
errors are). Log lines never carry credentials: callers log key ids, never keys.
"""

from __future__ import annotations

import json
import logging
import sys
from datetime import datetime, timezone
from typing import IO

__all__ = ["JsonFormatter", "setup"]

_TEXT = "[%(asctime)s.%(msecs)03d] %(levelname)-7s %(name)s: %(message)s"
_STD = frozenset(vars(logging.LogRecord("", 0, "", 0, "", None, None)))


class JsonFormatter(logging.Formatter):
    """One JSON object a line: ts, level, logger, msg, and any `extra=` fields."""

    def format(self, record: logging.LogRecord) -> str:
        out: dict[str, object] = {
            "ts": datetime.fromtimestamp(record.created, timezone.utc).isoformat(timespec="milliseconds"),
            "level": record.levelname.lower(),
            "logger": record.name,
            "msg": record.getMessage(),
        }
        for k, v in vars(record).items():
            if k not in _STD and k not in out and not k.startswith("_"):
                out[k] = v if isinstance(v, (str, int, float, bool, type(None))) else str(v)
        if record.exc_info:
            out["exc"] = self.formatException(record.exc_info)
        return json.dumps(out, ensure_ascii=False)


def setup(level: str = "info", fmt: str = "text", stream: IO[str] | None = None) -> logging.Handler:
    handler = logging.StreamHandler(stream or sys.stderr)
    handler.setFormatter(JsonFormatter() if fmt == "json" else logging.Formatter(_TEXT, "%H:%M:%S"))
    numeric = getattr(logging, level.upper(), logging.INFO)
    for name, lvl in (("spendgate", numeric), ("mitmproxy", logging.DEBUG if numeric <= logging.DEBUG else
                                                             logging.WARNING)):
        logger = logging.getLogger(name)
        logger.handlers = [handler]
        logger.setLevel(lvl)
        # mitmproxy's errorcheck addon watches the root logger for start-up errors (a port in use).
        logger.propagate = name == "mitmproxy"
    return handler
