"""Issue 14, item 5: the gateway's memory over many requests, and a 1 MB prompt among small ones.

`spendgate serve` as side_by_side.py runs it (audit log on SQLite or PostgreSQL, the bench user
under a cap, metrics on), on the loopback mock.

1. RSS: `--chunks` load-generator runs of `--chunk` requests each (plain and SSE alternating,
   c=16), the gateway's resident set (/proc/PID/status VmRSS) read after each. The first chunk
   is the warm-up (caches, pools, the allocator's arenas); the verdict compares every later
   reading with it: flat means within ±10 %.
2. A 1 MiB prompt: a client sends small chat requests back to back (c=1) for `--baseline`
   seconds, then keeps sending them while another user, under a $10 cap (so each prompt is
   counted exactly, not bounded by its bytes), sends `--big` 1 MiB prompts one after the other;
   the small requests' p50 / p99 / max latency before and during, and each big request's own
   time. The gateway counts a large body's tokens off the event loop; a stall shows as a max
   far above the baseline's.

    .venv/bin/python bench/soak.py                      # 10 x 5,000 requests, then the 1 MiB prompt (~3 min)
    .venv/bin/python bench/soak.py --database postgresql --chunks 4 --chunk 2500

Not run by CI.
"""

from __future__ import annotations

import argparse
import json
import os
import ssl
import statistics
import sys
import tempfile
import threading
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from _procs import MockProcess, percentile  # noqa: E402
from proxy_overhead import MODEL, PROMPT, Target, run_load  # noqa: E402
from side_by_side import database, start_gateway  # noqa: E402
from token_count import make_text  # noqa: E402

from tests.rig.hostile import rss_kib  # noqa: E402

URL = "https://api.openai.com/v1/chat/completions"
FLAT = 0.10  # ±10 % of the warm reading


def memory(target: Target, mock_pid: int, args: argparse.Namespace) -> bool:
    print(f"1. RSS over {args.chunks} x {args.chunk} requests (plain and stream alternating, c=16)")
    readings: list[int] = []
    done = 0
    for n in range(args.chunks):
        mode = "plain" if n % 2 == 0 else "stream"
        r = run_load(target, mock_pid, mode=mode, concurrency=16, requests=args.chunk, seconds=600)
        done += r["n"]
        readings.append(rss_kib(target.pid or 0))
        print(f"    after {done:>6} requests ({mode:<6} {r['rps']:>4.0f}/s, {r['errors']} errors): "
              f"RSS {readings[-1] / 1024:7.1f} MiB", flush=True)
    warm = readings[0]
    worst = max(readings[1:], key=lambda x: abs(x - warm)) if len(readings) > 1 else warm
    drift = (readings[-1] - warm) / warm
    ok = all(abs(x - warm) <= FLAT * warm for x in readings[1:])
    print(f"    warm {warm / 1024:.1f} MiB, last {readings[-1] / 1024:.1f} MiB ({drift:+.1%}), furthest "
          f"{worst / 1024:.1f} MiB: {'flat (within ±10 %)' if ok else 'NOT flat'}")
    return ok


def big_prompt(target: Target, big_proxy: str, args: argparse.Namespace) -> None:
    import httpx

    print(f"2. small requests (c=1) for {args.baseline:.0f} s, then alongside {args.big} prompts of 1 MiB each")
    ctx = ssl.create_default_context(cafile=target.ca)

    def client(proxy: str | None = target.proxy) -> httpx.Client:
        return httpx.Client(proxy=proxy, verify=ctx, trust_env=False, timeout=120)

    small = json.dumps({"model": MODEL, "messages": [{"role": "user", "content": PROMPT}]}).encode()
    big = json.dumps({"model": MODEL, "messages": [{"role": "user", "content": make_text(1 << 20)}]}).encode()
    headers = {"content-type": "application/json", "authorization": "Bearer unused"}
    phase = "baseline"
    lat: dict[str, list[float]] = {"baseline": [], "during": []}
    errors: list[str] = []
    stop = threading.Event()

    def smalls() -> None:
        with client() as h:
            while not stop.is_set():
                t = time.perf_counter()
                r = h.post(URL, content=small, headers=headers)
                if r.status_code != 200:
                    errors.append(f"small {r.status_code}")
                lat[phase].append(time.perf_counter() - t)

    worker = threading.Thread(target=smalls, daemon=True)
    worker.start()
    time.sleep(args.baseline)
    phase = "during"
    bigs: list[float] = []
    with client(big_proxy) as h:
        for _ in range(args.big):
            t = time.perf_counter()
            r = h.post(URL, content=big, headers=headers)
            bigs.append(time.perf_counter() - t)
            if r.status_code != 200:
                errors.append(f"big {r.status_code}: {r.text[:200]}")
    stop.set()
    worker.join(30)
    for name in ("baseline", "during"):
        xs = sorted(lat[name])
        if xs:
            print(f"    small requests, {name:<8}: n={len(xs):>5}  p50 {percentile(xs, 50) * 1000:6.2f} ms  "
                  f"p99 {percentile(xs, 99) * 1000:6.2f} ms  max {xs[-1] * 1000:7.2f} ms")
    print(f"    1 MiB prompts: {', '.join(f'{b * 1000:.0f}' for b in bigs)} ms each "
          f"(median {statistics.median(bigs) * 1000:.0f} ms)" + (f"  ERRORS {errors[:3]}" if errors else ""))


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--database", choices=["sqlite", "postgresql"], default="sqlite")
    ap.add_argument("--chunks", type=int, default=10)
    ap.add_argument("--chunk", type=int, default=5000)
    ap.add_argument("--baseline", type=float, default=5.0)
    ap.add_argument("--big", type=int, default=5)
    args = ap.parse_args(argv)
    print(f"soak: {args.database}; {os.cpu_count()} cores shared by client, mock and gateway; "
          f"load average at start {os.getloadavg()[0]:.2f}")
    with tempfile.TemporaryDirectory(prefix="sg-soak-") as tmp, database(args.database) as db_url:
        mock = MockProcess()
        gw = None
        try:
            gw, key = start_gateway(Path(tmp) / "gateway", mock.url, db_url)
            target = Target("gateway", URL, str(gw.ca_path), gw.proxy_url(key, "bench"), gw.proc.pid)
            flat = memory(target, mock.pid, args)
            # Under a $10 cap a 1 MiB prompt's bytes bound is over 1 % of it: its tokens are counted exactly.
            big_key = gw.create_key("bigprompt", team="perf", cap="10", period="month")["key"]
            big_prompt(target, gw.proxy_url(big_key, "bigprompt"), args)
            print(f"    audited by the gateway: {gw.cli_json('usage', '--by', 'user', '--since', 'today')}")
        finally:
            if gw is not None:
                gw.stop()
            mock.stop()
    return 0 if flat else 1


if __name__ == "__main__":
    raise SystemExit(main())
