"""`spendgate serve` with some stages left out, to see what each one costs (bench/proxy_overhead.py --ablate).

    SPENDGATE_BENCH_DROP=Record,MetricsStage python bench/_serve_ablated.py serve --config PATH

Names are the stage classes `spendgate.stages.build_stages` returns (TlsPolicy, Routing, Identity,
Destinations, RateLimit, Policy, Budgets, Meter, Forward, Record, BudgetAdmission, MetricsStage, AlertFeed). Routing,
Identity and Forward cannot be dropped: without them no request is attributed to a provider and a
key, or sent to the configured upstream. A benchmark tool only: a gateway without its Record stage
keeps no audit log.
"""

from __future__ import annotations

import atexit
import json
import os
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "addons"))

from spendgate.cli import app  # noqa: E402
from spendgate.gateway import Gateway  # noqa: E402
from spendgate.stages.pipeline import Pipeline  # noqa: E402

TIMES = os.environ.get("SPENDGATE_BENCH_STAGE_TIMES")  # a file: each stage's seconds, written at exit
DROP = {name for name in os.environ.get("SPENDGATE_BENCH_DROP", "").split(",") if name}
KEEP = {"Routing", "Identity", "Forward"}
if DROP & KEEP:
    raise SystemExit(f"{', '.join(sorted(DROP & KEEP))} cannot be dropped")
_pipeline = Gateway.pipeline


def _ablated(self: Gateway) -> Pipeline:
    """The gateway's own pipeline (stages built and wired as `serve` does), minus the dropped stages."""
    stages = _pipeline(self).stages
    names = [type(s).__name__ for s in stages]
    unknown = DROP - set(names)
    if unknown:
        raise SystemExit(f"no such stage(s): {sorted(unknown)}; stages are {names}")
    pipeline = Pipeline([s for s in stages if type(s).__name__ not in DROP])
    if TIMES:
        gc_time = _time_collections()
        atexit.register(lambda: Path(TIMES).write_text(json.dumps(pipeline.seconds | gc_time)))
    return pipeline


def _time_collections() -> dict[str, float]:
    """Seconds the garbage collector ran, per generation (`gc.callbacks`); not the full collection
    `serve` runs once before it freezes what start-up built."""
    import gc
    import time

    spent = {"gc0": 0.0, "gc1": 0.0, "gc2": 0.0}
    started = [0.0]
    startup = [True]

    def timer(phase: str, info: dict[str, int]) -> None:
        if phase == "start":
            started[0] = time.perf_counter()
        elif info["generation"] == 2 and startup[0]:
            startup[0] = False
        else:
            spent[f"gc{info['generation']}"] += time.perf_counter() - started[0]

    gc.callbacks.append(timer)
    return spent


Gateway.pipeline = _ablated  # type: ignore[method-assign]
sys.argv[0] = "spendgate"
app()
