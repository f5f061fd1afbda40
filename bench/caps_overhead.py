"""What caps cost: the pre-flight estimate and reservation, and throughput with caps on.

1. Store level, in this process: the estimate (tiktoken + price), a reservation
   (`spendgate.store.batches.settle_and_reserve`, as its own transaction) against 1 and 3 caps, and the
   settlement (as its own transaction, the worst case: in the gateway both ride in the audit
   writer's group commit), p50/p99 in µs, on SQLite and PostgreSQL; and reservations/s
   when 8 threads hit the same cap row (the row lock serialises them).
2. End to end through `spendgate serve` (audit log on) against the mock run as its own process:
   one gateway, two keys — one with no cap, one under a user and a team cap — alternated request
   by request, concurrency 1, streaming chat. The difference is what the pre-flight check and
   reservation (and the settlement riding in the audit batch) add to a request. SQLite and
   PostgreSQL.
3. Throughput at concurrency 32, streaming chat: the gateway with caps on (SQLite, PostgreSQL)
   against bare mitmdump with a redirect script (target: >= 75%).

Load generator, mock and proxy share this machine's cores; other work on the box moves every
figure, so the load average is printed with them.

    .venv/bin/python bench/caps_overhead.py            # ~3 min
    .venv/bin/python bench/caps_overhead.py --quick    # fewer requests

Not run by CI.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from datetime import datetime, timedelta, timezone
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))

import proxy_overhead as po  # noqa: E402
from _procs import MockProcess, percentile  # noqa: E402  (puts the repo and addons/ on sys.path)

PG_ADMIN_URL = os.environ.get("SPENDGATE_TEST_PG_ADMIN", "postgresql://postgres@127.0.0.1:5432/postgres")
BIG_CAP = "1000000"  # USD: never binds, so every request is reserved and settled but none refused
# Streaming chat without stream_options: the gateway asks upstream for the usage chunk and strips
# it before the client sees it (the full path). `--mode stream+usage` or `plain` for the others.
MODE = "stream"


def load_avg() -> str:
    return " ".join(f"{x:.1f}" for x in os.getloadavg())


# =========================================================================== databases


@contextmanager
def postgres_db() -> Iterator[str | None]:
    """A throwaway PostgreSQL database URL, or None when no server answers."""
    from tests.rig.pg import throwaway_database

    with throwaway_database("spendgate_bench", PG_ADMIN_URL) as url:
        if url is None:
            print(f"(PostgreSQL not reachable at {PG_ADMIN_URL}; its figures are skipped)")
        yield url


# =========================================================================== 1. store level


def timed(fn: Callable[[], Any], n: int) -> list[float]:
    out = []
    for _ in range(n):
        t0 = time.perf_counter()
        fn()
        out.append(time.perf_counter() - t0)
    out.sort()
    return out


def us(values: list[float]) -> str:
    return f"p50 {percentile(values, 50) * 1e6:8.0f} µs   p99 {percentile(values, 99) * 1e6:8.0f} µs"


def store_level(label: str, url: str, n: int) -> None:
    from spendgate.store import Database
    from spendgate.store.batches import settle_and_reserve
    from spendgate.store.budgets import BudgetDef, ReserveRequest, ReserveResult, Settlement
    from spendgate.store.keys import KeyStore

    db = Database(url)
    db.upgrade()
    keys = KeyStore(db)
    for scope, name in (("user", "u"), ("team", "t"), ("global", "global")):
        keys.set_budget(scope, name, 10**18, "day", actor="bench")
    defs = {b.scope: b for b in keys.load_budgets()}
    one, three = [defs["user"]], [defs["user"], defs["team"], defs["global"]]
    ttl = timedelta(seconds=600)
    amount = 123_456

    def reserve(rid: str, caps: list[BudgetDef], amt: int) -> ReserveResult:
        request = ReserveRequest(rid, tuple(caps), amt, datetime.now(timezone.utc), ttl)
        with db.transaction() as conn:
            return settle_and_reserve(conn, [], [request])[0]

    def settle(rid: str, result: ReserveResult, actual: int) -> None:
        with db.transaction() as conn:
            settle_and_reserve(conn, [Settlement(rid, result.refs, actual)], [])

    def cycle(caps: list[BudgetDef]) -> tuple[list[float], list[float]]:
        res_t, settle_t = [], []
        for _ in range(n):
            rid = "sgr_" + uuid.uuid4().hex[:24]
            t0 = time.perf_counter()
            r = reserve(rid, caps, amount)
            t1 = time.perf_counter()
            settle(rid, r, amount - 1)
            t2 = time.perf_counter()
            assert r.blocked is None
            res_t.append(t1 - t0)
            settle_t.append(t2 - t1)
        return sorted(res_t), sorted(settle_t)

    cycle(one[:1])  # warm the pool and the statement caches
    r1, s1 = cycle(one)
    r3, s3 = cycle(three)
    print(f"  {label:<10} reserve, 1 cap     {us(r1)}")
    print(f"  {label:<10} reserve, 3 caps    {us(r3)}")
    print(f"  {label:<10} settle,  1 cap     {us(s1)}   (own transaction; in the gateway both join the audit batch)")
    print(f"  {label:<10} settle,  3 caps    {us(s3)}")

    # 8 threads on the same user cap: every reservation waits for the row lock of the one before.
    stop = time.perf_counter() + 2.0
    counts = [0] * 8

    def worker(i: int) -> None:
        while time.perf_counter() < stop:
            reserve("sgr_" + uuid.uuid4().hex[:24], one, 1)
            counts[i] += 1

    threads = [threading.Thread(target=worker, args=(i,)) for i in range(8)]
    t0 = time.perf_counter()
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    print(f"  {label:<10} 8 threads, one cap row: {sum(counts) / (time.perf_counter() - t0):8.0f} reservations/s")
    db.close()


def estimate_cost(n: int) -> None:
    from spendgate.pricing import Pricer
    from spendgate.providers.tokens import estimate_input_tokens
    from spendgate.providers.wire import EndpointKind, Family, Usage

    pricer = Pricer({})
    small = {"model": "gpt-4o-mini", "messages": [{"role": "user", "content": po.PROMPT}], "stream": True}
    large = {"model": "gpt-4o-mini", "messages": [{"role": "user", "content": "lorem ipsum dolor sit amet " * 1500}]}
    for label, body in (("~10 tokens", small), ("~6k tokens", large)):
        def one(body: dict[str, Any] = body) -> None:
            inp = estimate_input_tokens(Family.OPENAI, EndpointKind.CHAT, body, "gpt-4o-mini")
            pricer.cost("openai", "gpt-4o-mini", Usage(input_tokens=inp, output_tokens=4096))

        one()
        print(f"  estimate, prompt {label:<11} {us(timed(one, n))}")


# =========================================================================== 2 + 3. through the proxy


class Gateway:
    """`spendgate serve` on a database, with an uncapped key and a key under user + team caps."""

    def __init__(self, workdir: Path, mock: MockProcess, db_url: str | None, label: str) -> None:
        from tests.rig.gateway import GatewayProcess

        self.label = label
        self.gw = GatewayProcess(workdir, mock.url, db_url=db_url, name=f"bench-{label}")
        self.gw.start(timeout=60)
        self.free_key = self.gw.create_key("free", team="open")["key"]
        self.gw.cli("budgets", "set", "team", "perf", "--cap", BIG_CAP, "--period", "month")
        self.capped_key = self.gw.create_key("capped", team="perf", cap=BIG_CAP, period="day")["key"]
        assert self.gw.proc is not None
        self.pid = self.gw.proc.pid

    def target(self, capped: bool) -> po.Target:
        key, user = (self.capped_key, "capped") if capped else (self.free_key, "free")
        return po.Target(f"{self.label}-{'caps' if capped else 'nocap'}", po.TARGET_URL, str(self.gw.ca_path),
                         self.gw.proxy_url(key, user), self.pid)

    def check(self) -> str:
        rows = {r["name"]: r for r in self.gw.cli_json("budgets", "list")}
        u = rows["capped"]
        return f"budgets list after the run: user capped spent ${u['spent_usd']}, reserved ${u['reserved_usd']}"

    def stop(self) -> None:
        self.gw.stop()


def latency_pairs(g: Gateway, pairs: int) -> None:
    """Sequential requests from this process, alternating the uncapped and the capped key request
    by request, so drift in the box's load falls on both alike."""
    import json

    body = {"model": po.MODEL, "messages": [{"role": "user", "content": po.PROMPT}], "stream": MODE != "plain"}
    if MODE == "stream+usage":
        body["stream_options"] = {"include_usage": True}
    content = json.dumps(body).encode()
    clients = {True: g.gw.httpx_client(g.capped_key, user="capped"), False: g.gw.httpx_client(g.free_key, user="free")}
    lat: dict[bool, list[float]] = {True: [], False: []}
    errors = 0
    try:
        for i in range(pairs + 50):
            for capped in ((False, True) if i % 2 else (True, False)):
                t0 = time.perf_counter()
                with clients[capped].stream("POST", po.TARGET_URL, content=content,
                                            headers={"content-type": "application/json"}) as r:
                    raw = b"".join(r.iter_raw())
                dt = time.perf_counter() - t0
                if r.status_code != 200 or (body["stream"] and b"[DONE]" not in raw):
                    errors += 1
                elif i >= 50:  # the first 50 pairs warm connections and caches
                    lat[capped].append(dt)
    finally:
        for c in clients.values():
            c.close()
    for v in lat.values():
        v.sort()

    def q(capped: bool, p: float) -> float:
        return percentile(lat[capped], p) * 1000

    for capped in (False, True):
        print(f"  {g.label:<10} {'user+team caps' if capped else 'no cap':<15} p50 {q(capped, 50):6.2f} ms"
              f"   p90 {q(capped, 90):6.2f} ms   p99 {q(capped, 99):6.2f} ms   ({len(lat[capped])} requests)")
    print(f"  {g.label:<10} {'added by caps':<15} p50 {q(True, 50) - q(False, 50):+6.2f} ms"
          f"   p90 {q(True, 90) - q(False, 90):+6.2f} ms   p99 {q(True, 99) - q(False, 99):+6.2f} ms"
          + (f"   ERRORS {errors}" if errors else ""))


def throughput(targets: list[po.Target], mock: MockProcess, rounds: int, requests: int,
               seconds: float) -> dict[str, float]:
    got: dict[str, list[dict[str, Any]]] = {t.name: [] for t in targets}
    for _ in range(rounds):
        for t in targets:
            r = po.run_load(t, mock.pid, mode=MODE, concurrency=32, requests=requests, seconds=seconds)
            if r["errors"]:
                print(f"    ERRORS {t.name}: {r['errors']}: {r['error_kinds']}")
            got[t.name].append(r)
    out = {}
    for name, rs in got.items():
        rps = statistics.median(r["rps"] for r in rs)
        out[name] = rps
        print(f"  {name:<16} {rps:7.0f} req/s   p50 {statistics.median(r['p50_ms'] for r in rs):7.2f} ms"
              f"   p99 {statistics.median(r['p99_ms'] for r in rs):7.2f} ms"
              f"   proxy CPU {statistics.median(r['proxy_cpu_us'] for r in rs):5.0f} µs/req"
              f" ({statistics.median(r['proxy_loop_cpu_us'] for r in rs):.0f} loop)"
              f"   errors {sum(r['errors'] for r in rs)}   (median of {len(rs)} rounds)")
    return out


def main(argv: list[str] | None = None) -> int:
    global MODE
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--sections", default="123", help="which of 1 (store), 2 (latency), 3 (throughput) to run")
    ap.add_argument("--mode", choices=list(po.MODES), default=MODE, help=f"request kind (default {MODE})")
    args = ap.parse_args(argv)
    MODE = args.mode
    n_store = 300 if args.quick else 1500
    lat_pairs = 200 if args.quick else 800
    tp_rounds, tp_requests, tp_seconds = (1, 800, 8.0) if args.quick else (2, 2000, 12.0)

    print(f"caps_overhead: {os.cpu_count()} cores shared by load generator, mock and proxy; "
          f"load average at start {load_avg()}\n")
    with tempfile.TemporaryDirectory(prefix="sg-caps-bench-") as tmp, postgres_db() as pg_url:
        work = Path(tmp)
        if "1" in args.sections:
            print("1. store level (this process), per call")
            estimate_cost(n_store)
            store_level("SQLite", f"sqlite:///{work / 'store.db'}", n_store)
            if pg_url:
                with postgres_db() as pg_store_url:
                    assert pg_store_url
                    store_level("PostgreSQL", pg_store_url, n_store)
            print()

        mock = MockProcess()
        procs: list[Any] = []
        try:
            from tests.rig.gateway import free_port

            sqlite_gw = Gateway(work / "gw-sqlite", mock, None, "SQLite")
            procs.append(sqlite_gw)
            pg_gw = Gateway(work / "gw-pg", mock, pg_url, "PostgreSQL") if pg_url else None
            if pg_gw:
                procs.append(pg_gw)
            if "2" in args.sections:
                print(f"2. end to end, concurrency 1, {MODE} chat (POST {po.TARGET_URL} via the gateway, "
                      f"keys alternated; load {load_avg()})")
                for g in (sqlite_gw, pg_gw):
                    if g:
                        latency_pairs(g, lat_pairs)
                print()
            if "3" not in args.sections:
                return 0

            md_port = free_port()
            md = po.start_bare_mitmdump(work / "mitmdump", mock.port, md_port)
            procs.append(md)
            bare = po.Target("bare mitmdump", po.TARGET_URL,
                             str(work / "mitmdump" / "mitmdump-confdir" / "mitmproxy-ca-cert.pem"),
                             f"http://127.0.0.1:{md_port}", md.pid)
            targets = [bare, sqlite_gw.target(True), sqlite_gw.target(False)]
            if pg_gw:
                targets.append(pg_gw.target(True))
            print(f"3. throughput, concurrency 32, {MODE} chat (load {load_avg()})")
            rps = throughput(targets, mock, tp_rounds, tp_requests, tp_seconds)
            for t in targets[1:]:
                ratio = rps[t.name] / rps[bare.name]
                verdict = "met" if ratio >= 0.75 else "MISSED"
                print(f"  {t.name:<16} / bare mitmdump = {ratio:6.1%}   (target >= 75%: {verdict})")
            for g in (sqlite_gw, pg_gw):
                if g:
                    print(f"  {g.label}: {g.check()}")
            print(f"\nload average at the end {load_avg()}")
        finally:
            for p in reversed(procs):
                po.stop_proc(p) if not isinstance(p, Gateway) else p.stop()
            mock.stop()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
