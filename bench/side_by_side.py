"""Issue 14's benchmark: `spendgate serve` (audit on, a cap, metrics) against bare mitmdump, side by side.

Both proxies run at once on the same loopback mock; each round measures every configuration on
mitmdump and then on the gateway, back to back (interleaved), so a noisy neighbour hits both.
Per run: requests, req/s, p50/p99, time to first byte (TTFT for streams) and the server's CPU µs
per request, read from /proc for the proxy process and every child it has (the process tree) —
mitmproxy and `serve` both run as one process, so the tree is that process. The machine's other
load during the run is printed too (`other`).

    .venv/bin/python bench/side_by_side.py                      # SQLite, 3 rounds (~4 min)
    .venv/bin/python bench/side_by_side.py --database postgresql
    .venv/bin/python bench/side_by_side.py --rounds 5 --configs plain:1 plain:16 stream:16 stream:1

`serve` runs under python -O (spendgate/launch.py); mitmdump runs as installed, or with
`--bare-optimized` under -O too, which leaves only what the gateway's own code costs.
The summary gives, per configuration, the median and range over the rounds of the CPU ratio
gateway / mitmdump (each round's own pair), the added p50 and the added TTFT, against the
issue's goals: ≤ 1.15× on JSON at c=1 and c=16 and on SSE at c=16 (PostgreSQL ≤ 1.3×), TTFT
added at c=1 ≤ 1 ms. On a shared 2-core VM one round's ratio can be anywhere in ±20 %, so from
6 rounds on the summary adds a 95 % confidence interval for the median ratio (from the order of
the rounds' ratios, no assumption about their spread): a goal is met "robustly" when the whole
interval is within it. Pass e.g. `--rounds 30 --configs plain:1 --requests 1000` (~5 min).
"""

from __future__ import annotations

import argparse
import contextlib
import math
import os
import statistics
import sys
import tempfile
from pathlib import Path
from typing import Any, Iterator

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from _procs import MockProcess  # noqa: E402
from proxy_overhead import Target, mitmdump_ca, run_load, start_bare_mitmdump, stop_proc  # noqa: E402

GOALS = {("plain", 1): 1.15, ("plain", 16): 1.15, ("stream", 16): 1.15}
PG_GOAL = 1.3
TTFT_GOAL_MS = 1.0


def children_cpu(pid: int) -> list[int]:
    """The pids below `pid` (mitmproxy and serve start none today; counted if they ever do)."""
    out: list[int] = []
    try:
        for tid in os.listdir(f"/proc/{pid}/task"):
            with open(f"/proc/{pid}/task/{tid}/children") as f:
                for c in f.read().split():
                    out += [int(c), *children_cpu(int(c))]
    except OSError:
        pass
    return out


@contextlib.contextmanager
def database(kind: str) -> Iterator[str | None]:
    if kind == "sqlite":
        yield None
        return
    from tests.rig.pg import throwaway_database

    with throwaway_database("spendgate_bench") as url:
        if url is None:
            raise SystemExit("no PostgreSQL answers on 127.0.0.1:5432 (SPENDGATE_TEST_PG_ADMIN overrides)")
        yield url


def start_gateway(work: Path, mock_url: str, db_url: str | None, cap: bool = True) -> tuple[Any, str]:
    """`spendgate serve` as a team runs it: audit log on, metrics on, the bench user under a cap."""
    from tests.rig.gateway import GatewayProcess

    gw = GatewayProcess(work, mock_url, name="bench-gateway", db_url=db_url)
    gw.start(timeout=60)
    key = gw.create_key("bench", team="perf", cap="100000" if cap else None, period="month")["key"]
    return gw, key


@contextlib.contextmanager
def proxies(work: Path, db_url: str | None, cap: bool = True, bare_optimized: bool = False
            ) -> Iterator[tuple[MockProcess, Any, Target, Target]]:
    """The mock, and bare mitmdump and `spendgate serve` on it: (mock, gateway process, bare, ours)."""
    from tests.rig.gateway import free_port

    mock = MockProcess()
    md = gw = None
    try:
        md_port = free_port()
        md = start_bare_mitmdump(work / "mitmdump", mock.port, md_port, optimized=bare_optimized)
        gw, key = start_gateway(work / "gateway", mock.url, db_url, cap=cap)
        bare = Target("mitmdump", "https://api.openai.com/v1/chat/completions", mitmdump_ca(work),
                      f"http://127.0.0.1:{md_port}", md.pid)
        ours = Target("gateway", "https://api.openai.com/v1/chat/completions", str(gw.ca_path),
                      gw.proxy_url(key, "bench"), gw.proc.pid)
        yield mock, gw, bare, ours
    finally:
        if gw is not None:
            gw.stop()
        if md is not None:
            stop_proc(md)
        mock.stop()


def measure(target: Target, mock_pid: int, mode: str, conc: int, args: argparse.Namespace) -> dict[str, Any]:
    kids = children_cpu(target.pid) if target.pid else []
    r = run_load(target, mock_pid, mode=mode, concurrency=conc, requests=args.requests, seconds=args.seconds)
    r["children"] = len(kids)
    return r


def row(name: str, r: dict[str, Any]) -> str:
    return (f"    {name:<9} {r['n']:>5} {r['rps']:>7.0f} {r['p50_ms']:>7.2f} {r['p99_ms']:>7.2f} "
            f"{r['ttfb_p50_ms']:>7.2f} {r['proxy_cpu_us']:>8.0f} ({r['proxy_loop_cpu_us']:.0f} loop + "
            f"{r['proxy_threads_cpu_us']:.0f} threads) {r['foreign_cpu']:>6.0%}"
            + (f"  ERRORS {r['errors']}" if r["errors"] else ""))


def median_interval(values: list[float], confidence: float = 0.95) -> tuple[float, float] | None:
    """A distribution-free interval for the median: the k-th smallest and k-th largest of the
    values, k the largest with P(Binomial(n, 1/2) < k) <= (1 - confidence) / 2; None below 6 values."""
    n, xs = len(values), sorted(values)
    tail, k = 0.0, 0
    while k < n // 2 and tail + math.comb(n, k) / 2**n <= (1 - confidence) / 2:
        tail += math.comb(n, k) / 2**n
        k += 1
    return None if k == 0 else (xs[k - 1], xs[n - k])


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--database", choices=["sqlite", "postgresql"], default="sqlite")
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--configs", nargs="+", default=["plain:1", "plain:16", "stream:16", "stream:1"],
                    help="mode:concurrency pairs (modes: plain, stream, stream+usage)")
    ap.add_argument("--requests", type=int, default=1500)
    ap.add_argument("--seconds", type=float, default=6.0)
    ap.add_argument("--no-cap", action="store_true", help="the bench user under no cap (what a cap costs)")
    ap.add_argument("--bare-optimized", action="store_true",
                    help="mitmdump under python -O too, as serve runs itself: what the gateway's own code costs")
    args = ap.parse_args(argv)
    configs = [(m, int(c)) for m, c in (x.split(":") for x in args.configs)]
    print(f"side_by_side: {args.database}, mitmdump {'under python -O' if args.bare_optimized else 'as installed'}, "
          f"serve under python -O; {args.rounds} interleaved rounds, {args.requests} requests or "
          f"{args.seconds:.0f} s per run; {os.cpu_count()} cores shared by client, mock and proxies; "
          f"load average at start {os.getloadavg()[0]:.2f}")
    results: dict[tuple[str, int], list[tuple[dict[str, Any], dict[str, Any]]]] = {c: [] for c in configs}
    with tempfile.TemporaryDirectory(prefix="sg-side-") as tmp, database(args.database) as db_url, \
            proxies(Path(tmp), db_url, not args.no_cap, args.bare_optimized) as (mock, gw, bare, ours):
        print("    path         ok   req/s  p50 ms  p99 ms  ttfb50  CPU µs/request (event loop + threads)  other")
        for rnd in range(1, args.rounds + 1):
            for mode, conc in configs:
                print(f"  round {rnd}: {mode}, c={conc}")
                # Alternate which goes first, so neither always runs on a warmer machine.
                pair = [bare, ours] if rnd % 2 else [ours, bare]
                got = {t.name: measure(t, mock.pid, mode, conc, args) for t in pair}
                for name in ("mitmdump", "gateway"):
                    print(row(name, got[name]), flush=True)
                results[(mode, conc)].append((got["mitmdump"], got["gateway"]))
        audited = gw.cli_json("usage", "--by", "user", "--since", "today")
    print(f"\nsummary ({args.database}): gateway / mitmdump server CPU per request, median [min–max] of "
          f"{args.rounds} rounds")
    goal_for = {k: (PG_GOAL if args.database == "postgresql" else v) for k, v in GOALS.items()}
    for (mode, conc), pairs in results.items():
        ratios = [g["proxy_cpu_us"] / m["proxy_cpu_us"] for m, g in pairs if m["proxy_cpu_us"]]
        added_p50 = [g["p50_ms"] - m["p50_ms"] for m, g in pairs]
        added_ttfb = [g["ttfb_p50_ms"] - m["ttfb_p50_ms"] for m, g in pairs]
        cpu_g = statistics.median(g["proxy_cpu_us"] for _, g in pairs)
        cpu_m = statistics.median(m["proxy_cpu_us"] for m, _ in pairs)
        other = max(max(m["foreign_cpu"], g["foreign_cpu"]) for m, g in pairs)
        goal = goal_for.get((mode, conc))
        ci = median_interval(ratios)
        verdict = "" if goal is None else (" goal ≤ %.2f×: %s" % (goal, "MISSED" if statistics.median(ratios) > goal
                                                                     else "met robustly" if ci and ci[1] <= goal
                                                                     else "met"))
        line = (f"  {mode:>6} c={conc:<3} {statistics.median(ratios):.2f}× [{min(ratios):.2f}–{max(ratios):.2f}]"
                + (f" 95% CI {ci[0]:.2f}–{ci[1]:.2f}" if ci else "")
                + f"  ({cpu_g:.0f} vs {cpu_m:.0f} µs)  added p50 {statistics.median(added_p50):+.2f} ms")
        if mode.startswith("stream"):
            ttft = statistics.median(added_ttfb)
            line += f"  added TTFT {ttft:+.2f} ms"
            if conc == 1:
                line += f" (goal ≤ {TTFT_GOAL_MS} ms: {'met' if ttft <= TTFT_GOAL_MS else 'MISSED'})"
        print(line + verdict + f"  other ≤ {other:.0%}")
    errors = sum(g["errors"] + m["errors"] for pairs in results.values() for m, g in pairs)
    if errors:
        print(f"  {errors} failed requests (see ERRORS above): the figures are not comparable")
    if audited is not None:
        print(f"  audited by the gateway: {audited}")
    return 1 if errors else 0


if __name__ == "__main__":
    raise SystemExit(main())
