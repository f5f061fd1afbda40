"""The `spendgate` command. `serve` starts again as `python -O` before anything is imported.

mitmproxy type-checks every request and response it builds (`if __debug__:` in
`mitmproxy.http.MessageData`) and asserts its layer states on every event; under `-O` those checks
are compiled out, about a sixth of the proxy's CPU per request (bench/side_by_side.py). Nothing the
gateway enforces is an `assert`. `SPENDGATE_PYTHON_ASSERTS=1` keeps them (and the checks) on.
"""

from __future__ import annotations

import os
import sys


def main() -> None:
    if (sys.argv[1:2] == ["serve"] and not sys.flags.optimize and os.name == "posix"
            and os.environ.get("SPENDGATE_PYTHON_ASSERTS") != "1"):
        # The same command line, interpreter options included, with -O: the same process (pid) and sys.path.
        os.execv(sys.executable, [sys.executable, "-O", *sys.orig_argv[1:]])
    from spendgate.cli import app

    app(prog_name="spendgate")


if __name__ == "__main__":
    main()
