"""`spendgate serve` with some stages left out, to see what each one costs (bench/proxy_overhead.py --ablate).

    SPENDGATE_BENCH_DROP=Record,MetricsStage python bench/_serve_ablated.py serve --config PATH

Names are the stage classes of spendgate.stages.build_stages. Identity and Forward cannot be
dropped: without them nothing is attributed or sent to the configured upstream. A benchmark
tool only: a gateway without its Record stage keeps no audit log.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "addons"))

import spendgate.serve as serve_mod  # noqa: E402
from spendgate.cli import app  # noqa: E402

DROP = {name for name in os.environ.get("SPENDGATE_BENCH_DROP", "").split(",") if name}
if DROP & {"Identity", "Forward"}:
    raise SystemExit("Identity and Forward cannot be dropped")
_build = serve_mod.build_stages


def _ablated(rt: Any) -> list[Any]:
    stages = _build(rt)
    unknown = DROP - {type(s).__name__ for s in stages}
    if unknown:
        raise SystemExit(f"no such stage(s): {sorted(unknown)}; stages are {[type(s).__name__ for s in stages]}")
    return [s for s in stages if type(s).__name__ not in DROP]


serve_mod.build_stages = _ablated
sys.argv[0] = "spendgate"
app()
