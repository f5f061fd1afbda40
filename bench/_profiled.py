"""Run a Python console script with cProfile off until signal SIGRTMIN+1; SIGRTMIN+2 stops it and
writes the stats of that window to OUT.1, OUT.2, ...

    python bench/_profiled.py OUT /path/to/script [script args...]

So a benchmark profiles only its measured phase, not start-up, imports or warm-up. (Python 3.12's
cProfile is built on sys.monitoring and sees every thread, not just the one that enabled it.)
"""

from __future__ import annotations

import cProfile
import runpy
import signal
import sys

out = sys.argv[1]
script = sys.argv[2]
prof: cProfile.Profile | None = None
seq = 0


def _on(*_: object) -> None:
    global prof
    prof = cProfile.Profile()
    prof.enable()


def _off(*_: object) -> None:
    # each on/off window goes to its own file: OUT.1, OUT.2, ...
    global seq
    if prof is not None:
        prof.disable()
        seq += 1
        prof.dump_stats(f"{out}.{seq}")


# mitmproxy takes SIGUSR1/SIGUSR2 for its own debug dumps, so use real-time signals.
SIG_ON, SIG_OFF = signal.SIGRTMIN + 1, signal.SIGRTMIN + 2
signal.signal(SIG_ON, _on)
signal.signal(SIG_OFF, _off)
sys.argv = sys.argv[2:]
runpy.run_path(script, run_name="__main__")
