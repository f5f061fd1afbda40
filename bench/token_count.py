"""How long counting a 1 MB prompt takes, and whether the event loop stalls meanwhile.

Counts an OpenAI chat body whose user message is 1 MiB of text with
`spendgate.providers.tokens.estimate_input_tokens`, the way the gateway does for large bodies
(`await asyncio.to_thread(...)`), while a ticker coroutine sleeps 1 ms in a loop and records how
late each tick wakes up. A late tick is time the loop could not serve other requests.

    TIKTOKEN_CACHE_DIR=../shared/tiktoken-cache .venv/bin/python bench/token_count.py

Not run by CI.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import random
import statistics
import sys
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))

from _procs import percentile  # noqa: E402  (also puts addons/ and the repo on sys.path)

STALL_MS = 10.0  # a tick later than this means requests on the loop would have waited visibly

WORDS = ("the model gateway request token budget audit stream provider cost user team key proxy "
         "hello world python async function return value error retry limit cache prompt answer "
         "because which would could should there their about after before between through").split()


def make_text(n_bytes: int, seed: int = 1) -> str:
    """Deterministic English-ish text with punctuation, numbers and some code, n_bytes of UTF-8."""
    rng = random.Random(seed)
    parts: list[str] = []
    size = 0
    while size < n_bytes:
        r = rng.random()
        if r < 0.02:
            piece = f"\n\ndef f_{rng.randrange(10_000)}(x):\n    return x * {rng.randrange(100)}\n"
        elif r < 0.05:
            piece = f" {rng.randrange(1_000_000)}"
        elif r < 0.10:
            piece = rng.choice((". ", ", ", "; ", "? ", "! ", ": ")) + rng.choice(WORDS).capitalize()
        elif r < 0.11:
            piece = " naïve café — ünïcode"
        else:
            piece = " " + rng.choice(WORDS)
        parts.append(piece)
        size += len(piece.encode())
    return "".join(parts).encode()[:n_bytes].decode("utf-8", "ignore")


class Ticker:
    def __init__(self, period: float = 0.001) -> None:
        self.period = period
        self.delays: list[float] = []
        self._stop = False

    async def run(self) -> None:
        while not self._stop:
            t = time.perf_counter()
            await asyncio.sleep(self.period)
            self.delays.append(time.perf_counter() - t - self.period)

    def stop(self) -> None:
        self._stop = True

    def summary(self) -> dict[str, float]:
        d = sorted(self.delays)
        return {"ticks": len(d), "max_ms": d[-1] * 1000 if d else float("nan"),
                "p99_ms": percentile(d, 99) * 1000, "p50_ms": percentile(d, 50) * 1000}


async def timed(work: Any, *, off_loop: bool) -> tuple[float, Any, dict[str, float]]:
    ticker = Ticker()
    task = asyncio.create_task(ticker.run())
    await asyncio.sleep(0.02)  # ticker running before the count starts
    ticker.delays.clear()
    t0 = time.perf_counter()
    result = await asyncio.to_thread(work) if off_loop else work()
    elapsed = time.perf_counter() - t0
    await asyncio.sleep(0.002)  # the tick that was due during the count gets recorded
    ticker.stop()
    await task
    return elapsed, result, ticker.summary()


async def main_async(args: argparse.Namespace) -> int:
    from spendgate.providers import tokens
    from spendgate.providers.wire import EndpointKind, Family

    text = make_text(args.bytes)
    body = {"model": args.model, "messages": [{"role": "system", "content": "You are terse."},
                                                {"role": "user", "content": text}]}

    def work() -> int:
        return tokens.estimate_input_tokens(Family.OPENAI, EndpointKind.CHAT, body, args.model)

    print(f"token_count: {len(text.encode()):,} bytes of prompt text in one chat message, model {args.model}; "
          f"TIKTOKEN_CACHE_DIR={os.environ.get('TIKTOKEN_CACHE_DIR')}")
    print(f"one process: the event loop (with a 1 ms ticker) and the default thread pool; {os.cpu_count()} cores, "
          f"load average {os.getloadavg()[0]:.2f}; 'stalled' = a tick more than {STALL_MS:.0f} ms late.\n")

    # the loop's own noise, nothing else running
    ticker = Ticker()
    task = asyncio.create_task(ticker.run())
    await asyncio.sleep(1.0)
    ticker.stop()
    await task
    idle = ticker.summary()
    print(f"  idle loop, 1 s:               tick delay p50 {idle['p50_ms']:.3f} ms, p99 {idle['p99_ms']:.3f} ms, "
          f"max {idle['max_ms']:.3f} ms ({idle['ticks']} ticks)")

    rows: list[tuple[str, float, Any, dict[str, float]]] = []
    elapsed, enc, tick = await timed(lambda: tokens.encoding_for(args.model), off_loop=True)
    load_row = ("load encoding (to_thread)", elapsed, enc.name if enc else "none: bytes/4 fallback", tick)
    times = []
    for i in range(args.repeat):
        elapsed, n, tick = await timed(work, off_loop=True)
        times.append(elapsed)
        rows.append((f"to_thread, run {i + 1}", elapsed, n, tick))
    elapsed, n, tick = await timed(work, off_loop=False)
    rows.append(("ON the loop (contrast)", elapsed, n, tick))
    for label, elapsed, n, tick in [load_row, *rows]:
        stalled = "STALLED" if tick["max_ms"] > STALL_MS else "not stalled"
        what = f"{n:,} tokens" if isinstance(n, int) else n
        print(f"  {label:<29} {elapsed * 1000:8.1f} ms -> {what};  tick delay max {tick['max_ms']:7.2f} ms, "
              f"p99 {tick['p99_ms']:6.2f} ms ({tick['ticks']} ticks): {stalled}")
    print("  (the gateway loads its encodings once at start-up; a request never pays the load.)")
    print(f"\n  1 MB prompt: median {statistics.median(times) * 1000:.1f} ms (min {min(times) * 1000:.1f}) "
          "to count off the loop "
          f"({len(text.encode()) / statistics.median(times) / 1e6:.1f} MB/s); worst tick delay meanwhile "
          f"{max(r[3]['max_ms'] for r in rows[:-1]):.2f} ms (idle baseline max {idle['max_ms']:.2f} ms).")
    return 0


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--bytes", type=int, default=1 << 20, help="prompt size (default 1 MiB)")
    ap.add_argument("--model", default="gpt-4o")
    ap.add_argument("--repeat", type=int, default=5, help="off-loop counts after the encoding is loaded")
    args = ap.parse_args(argv)
    if "TIKTOKEN_CACHE_DIR" not in os.environ:
        from tests.rig.gateway import tiktoken_cache_dir

        cache = tiktoken_cache_dir()
        if cache:
            os.environ["TIKTOKEN_CACHE_DIR"] = cache
    return asyncio.run(main_async(args))


if __name__ == "__main__":
    raise SystemExit(main())
