"""Requests/s and latency through `spendgate serve` versus bare mitmdump versus no proxy.

Three kinds of process, each separate: the provider mock (tests/rig/mock_provider.py, HTTPS),
the proxy under test (`spendgate serve` with the audit log on SQLite, or bare `mitmdump -s
bench/_mitm_redirect.py`), and a load generator (asyncio + httpx, HTTP/1.1 keep-alive, one
connection per concurrent worker, trusting the CA of the path it measures). On this machine
all of them share the same cores, so every figure is "on a shared box", not a proxy's ceiling.

    .venv/bin/python bench/proxy_overhead.py                 # the full matrix (~2 min)
    .venv/bin/python bench/proxy_overhead.py --ablate        # serve with stages left out: what each costs
    .venv/bin/python bench/proxy_overhead.py --profile       # cProfile both proxies, print where time goes

See bench/README.md for what each column means.

Not run by CI.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import signal
import ssl
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))

from _procs import (  # noqa: E402
    PYTHON,
    REPO_ROOT,
    MockProcess,
    cpu_seconds,
    machine_busy_seconds,
    percentile,
    port_open,
    wait_until,
)

BENCH_DIR = Path(__file__).resolve().parent
MITMDUMP = str(Path(PYTHON).parent / "mitmdump")
TARGET_URL = "https://api.openai.com/v1/chat/completions"
MODEL = "gpt-4o-mini"
PROMPT = "Say hello to the benchmark."

# Targets from the issues' "Measure" sections (gateway vs bare mitmdump).
TARGETS = (
    ("issue 3 (identity + key swap)", 1.0, 0.85),
    ("issue 4 (audit log on)", 1.5, 0.80),
    ("issue 5 (caps on)", None, 0.75),
)


# =========================================================================== load generator (own process)


MODES = {
    # name: (stream, stream_options.include_usage set by the client)
    "plain": (False, False),
    "stream": (True, False),  # the gateway adds include_usage upstream and strips the usage chunk
    "stream+usage": (True, True),  # the client asked for usage itself: the gateway only observes
}


async def _loadgen(cfg: dict[str, Any]) -> dict[str, Any]:
    import httpx

    conc = int(cfg["concurrency"])
    ctx = ssl.create_default_context(cafile=cfg["ca"])
    # One client with one connection per worker: a shared httpx pool costs the client O(connections)
    # per request at c=32, and this box has no CPU to spare for that.
    clients = [
        httpx.AsyncClient(proxy=cfg.get("proxy"), verify=ctx, http1=True, http2=False, trust_env=False,
                          limits=httpx.Limits(max_connections=1, max_keepalive_connections=1, keepalive_expiry=300),
                          timeout=60)
        for _ in range(conc)
    ]
    stream, include_usage = MODES[cfg["mode"]]
    payload: dict[str, Any] = {"model": MODEL, "messages": [{"role": "user", "content": PROMPT}], "stream": stream}
    if include_usage:
        payload["stream_options"] = {"include_usage": True}
    body = json.dumps(payload).encode()
    headers = {"content-type": "application/json", "authorization": "Bearer unused", "accept": "application/json"}
    url = cfg["url"]

    lat: list[float] = []
    ttfb: list[float] = []
    events: dict[int, int] = {}
    errors: dict[str, int] = {}

    def fail(msg: str) -> None:
        errors[msg] = errors.get(msg, 0) + 1

    async def one(client: Any, measure: bool) -> None:
        t0 = time.perf_counter()
        first = None
        try:
            if stream:
                async with client.stream("POST", url, content=body, headers=headers) as r:
                    buf = bytearray()
                    async for chunk in r.aiter_raw():
                        if first is None:
                            first = time.perf_counter()
                        buf += chunk
                n_events = buf.count(b"data: ")
                if r.status_code == 200 and not buf.rstrip().endswith(b"data: [DONE]"):
                    fail(f"200 but stream ended without data: [DONE] ({n_events} events)")
                    return
            else:
                r = await client.post(url, content=body, headers=headers)
                first = time.perf_counter()
                n_events = 0
                if r.status_code == 200 and b'"choices"' not in r.content:
                    fail("200 without choices")
                    return
        except Exception as e:  # noqa: BLE001 - a benchmark counts failures, it does not stop on them
            fail(f"{type(e).__name__}: {e}"[:160])
            return
        t1 = time.perf_counter()
        if r.status_code != 200:
            fail(f"status {r.status_code}")
            return
        if measure:
            lat.append(t1 - t0)
            ttfb.append((first or t1) - t0)
            events[n_events] = events.get(n_events, 0) + 1

    async def run(total: int, seconds: float, measure: bool) -> float:
        left = total
        deadline = time.perf_counter() + seconds

        async def worker(client: Any) -> None:
            nonlocal left
            while left > 0 and time.perf_counter() < deadline:
                left -= 1
                await one(client, measure)

        t0 = time.perf_counter()
        await asyncio.gather(*(worker(c) for c in clients))
        return time.perf_counter() - t0

    await run(max(60, 3 * conc), 20, measure=False)  # open every connection, warm mitmproxy's cert cache
    warm_errors = dict(errors)
    errors.clear()
    # Handshake: the parent samples CPU counters between "warm" and "go".
    print("warm", flush=True)
    await asyncio.to_thread(sys.stdin.readline)
    cpu0 = time.process_time()
    elapsed = await run(int(cfg["requests"]), float(cfg["seconds"]), measure=True)
    cpu1 = time.process_time()
    for c in clients:
        await c.aclose()
    lat.sort()
    ttfb.sort()
    n = len(lat)
    return {
        "n": n,
        "errors": sum(errors.values()),
        "error_kinds": errors,
        "warm_errors": warm_errors,
        "elapsed": elapsed,
        "rps": n / elapsed if elapsed else 0.0,
        "p50_ms": percentile(lat, 50) * 1000,
        "p90_ms": percentile(lat, 90) * 1000,
        "p99_ms": percentile(lat, 99) * 1000,
        "max_ms": (lat[-1] * 1000) if lat else float("nan"),
        "ttfb_p50_ms": percentile(ttfb, 50) * 1000,
        "events": events,
        "loadgen_cpu_s": cpu1 - cpu0,
    }


def loadgen_main(cfg_json: str) -> int:
    cfg = json.loads(cfg_json)
    result = asyncio.run(_loadgen(cfg))
    print(json.dumps(result), flush=True)
    return 0


# =========================================================================== proxies under test


@dataclass
class Target:
    name: str
    url: str
    ca: str
    proxy: str | None
    pid: int | None  # process whose CPU is the "proxy" CPU


def mitmdump_ca(work: Path) -> str:
    """The CA of the bare mitmdump that `start_bare_mitmdump(work / "mitmdump", ...)` runs."""
    return str(work / "mitmdump" / "mitmdump-confdir" / "mitmproxy-ca-cert.pem")


def start_bare_mitmdump(workdir: Path, mock_port: int, port: int,
                        profile_to: Path | None = None, optimized: bool = False) -> subprocess.Popen[bytes]:
    """Bare mitmdump as installed; `optimized`: under python -O, as `serve` runs (its debug checks off)."""
    confdir = workdir / "mitmdump-confdir"
    confdir.mkdir(parents=True, exist_ok=True)
    cmd = [PYTHON, "-O", MITMDUMP] if optimized else [MITMDUMP]
    if profile_to is not None:
        cmd = [PYTHON, *(["-O"] if optimized else []), str(BENCH_DIR / "_profiled.py"), str(profile_to), MITMDUMP]
    cmd += [
        "--listen-host", "127.0.0.1", "--listen-port", str(port),
        "--set", f"confdir={confdir}", "--set", "connection_strategy=lazy", "--set", "ssl_insecure=true",
        "--set", "flow_detail=0",  # `serve` has no flow dumper either; its termlog stays at info, as here
        "-s", str(BENCH_DIR / "_mitm_redirect.py"), "--set", f"bench_upstream=127.0.0.1:{mock_port}",
    ]
    log = open(workdir / "mitmdump.log", "ab")
    proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, cwd=workdir,
                            env=_clean_env(), start_new_session=True)
    log.close()
    ca = confdir / "mitmproxy-ca-cert.pem"
    try:
        def exited() -> bool:
            return _raise(f"mitmdump exited: {(workdir / 'mitmdump.log').read_text()[-2000:]}")

        wait_until(lambda: (proc.poll() is None or exited()) and ca.exists() and port_open(port), 30, "mitmdump")
    except Exception:
        proc.kill()
        raise
    return proc


def _raise(msg: str) -> bool:
    raise RuntimeError(msg)


def _clean_env() -> dict[str, str]:
    drop = {"https_proxy", "http_proxy", "all_proxy", "no_proxy"}
    return {k: v for k, v in os.environ.items() if k.lower() not in drop}


def stop_proc(proc: subprocess.Popen[bytes], timeout: float = 20) -> None:
    if proc.poll() is None:
        proc.terminate()
        try:
            proc.wait(timeout)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(5)


def start_gateway(workdir: Path, mock_url: str, profile_to: Path | None = None,
                  drop: tuple[str, ...] | None = None) -> tuple[Any, subprocess.Popen[bytes] | None, str]:
    """A `spendgate serve` on SQLite with every provider pointed at the mock, and a key.

    Plain: the real `spendgate serve` (GatewayProcess). With `profile_to` and/or `drop`, the same
    config and environment, run as `python -O [bench/_profiled.py FILE] bench/_serve_ablated.py serve`
    (-O as `spendgate serve` runs itself, spendgate/launch.py).
    Returns (GatewayProcess, the custom Popen or None, gateway key)."""
    from tests.rig.gateway import GatewayProcess

    gw = GatewayProcess(workdir, mock_url, name="bench-gateway")
    if profile_to is None and drop is None:
        gw.start(timeout=60)
        return gw, None, gw.create_key("bench", team="perf")["key"]
    gw.write_config()
    key = gw.create_key("bench", team="perf")["key"]
    cmd = [PYTHON, "-O"]
    if profile_to is not None:
        cmd += [str(BENCH_DIR / "_profiled.py"), str(profile_to)]
    cmd += [str(BENCH_DIR / "_serve_ablated.py"), "serve", "--config", str(gw.config_path)]
    env = gw.env() | {"SPENDGATE_BENCH_DROP": ",".join(drop or ())}
    log = open(gw.log_path, "ab")
    proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, env=env,
                            cwd=gw.workdir, start_new_session=True)
    log.close()
    try:
        wait_until(lambda: (proc.poll() is None or _raise(f"serve exited: {gw.log_tail()}"))
                   and gw.ca_path.exists() and port_open(gw.port), 60, "spendgate serve (bench runner)")
    except Exception:
        stop_proc(proc)
        raise
    return gw, proc, key


def thread_cpu(pid: int) -> tuple[float, float]:
    """(main thread CPU s, all other threads CPU s) of a process: the event loop vs helper threads."""
    main = cpu_seconds_task(pid, pid)
    return main, cpu_seconds(pid) - main


def cpu_seconds_task(pid: int, tid: int) -> float:
    from _procs import CLK_TCK

    with open(f"/proc/{pid}/task/{tid}/stat") as f:
        fields = f.read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / CLK_TCK


def run_load(target: Target, mock_pid: int, *, mode: str, concurrency: int, requests: int, seconds: float,
             profile: bool = False) -> dict[str, Any]:
    """One load-generator process against one target; with `profile`, the target (started by
    bench/_profiled.py) is profiled during the measured phase only."""
    cfg = {"url": target.url, "ca": target.ca, "proxy": target.proxy, "mode": mode,
           "concurrency": concurrency, "requests": requests, "seconds": seconds}
    proc = subprocess.Popen([PYTHON, str(Path(__file__).resolve()), "--loadgen", json.dumps(cfg)],
                            stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            env=_clean_env(), cwd=REPO_ROOT)
    assert proc.stdin and proc.stdout
    line = proc.stdout.readline()
    if line.strip() != "warm":
        out, err = proc.communicate(timeout=30)
        raise RuntimeError(f"load generator failed during warm-up: {line}{out}\n{err[-3000:]}")
    pids = {"mock": mock_pid} | ({"proxy": target.pid} if target.pid else {})
    before = {k: cpu_seconds(p) for k, p in pids.items()}
    loop_before = thread_cpu(target.pid) if target.pid else (0.0, 0.0)
    if profile and target.pid:
        os.kill(target.pid, signal.SIGRTMIN + 1)  # see bench/_profiled.py
        time.sleep(0.05)
    busy0, t0 = machine_busy_seconds(), time.monotonic()
    proc.stdin.write("go\n")
    proc.stdin.flush()
    out_line = proc.stdout.readline()
    busy1, t1 = machine_busy_seconds(), time.monotonic()
    if profile and target.pid:
        os.kill(target.pid, signal.SIGRTMIN + 2)
        time.sleep(0.5)  # let it write the stats
    after = {k: cpu_seconds(p) for k, p in pids.items()}
    loop_after = thread_cpu(target.pid) if target.pid else (0.0, 0.0)
    _, err = proc.communicate(timeout=30)
    if proc.returncode != 0 or not out_line.strip():
        raise RuntimeError(f"load generator failed: {out_line}\n{err[-3000:]}")
    res: dict[str, Any] = json.loads(out_line)
    n = max(res["n"] + res["errors"], 1)  # failed requests cost CPU too
    res["mock_cpu_us"] = (after["mock"] - before["mock"]) / n * 1e6
    res["proxy_cpu_us"] = ((after["proxy"] - before["proxy"]) / n * 1e6) if "proxy" in after else 0.0
    res["proxy_loop_cpu_us"] = (loop_after[0] - loop_before[0]) / n * 1e6
    res["proxy_threads_cpu_us"] = (loop_after[1] - loop_before[1]) / n * 1e6
    res["loadgen_cpu_us"] = res["loadgen_cpu_s"] / n * 1e6
    ours = sum(after[k] - before[k] for k in after) + res["loadgen_cpu_s"]
    # share of the machine used by processes other than these three (other sessions, CI, the kernel)
    res["foreign_cpu"] = max(0.0, (busy1 - busy0) - ours) / ((t1 - t0) * (os.cpu_count() or 1))
    return res


# =========================================================================== report


def fmt_row(name: str, r: dict[str, Any]) -> str:
    proxy_cpu = (f"{r['proxy_cpu_us']:6.0f} ({r['proxy_loop_cpu_us']:.0f} loop + "
                 f"{r['proxy_threads_cpu_us']:.0f} threads)" if r["proxy_cpu_us"] else f"{'-':>6}")
    line = (f"  {name:<9} {r['n']:>5} {r['rps']:>7.0f} {r['p50_ms']:>7.2f} {r['p90_ms']:>7.2f} {r['p99_ms']:>7.2f} "
            f"{r['ttfb_p50_ms']:>7.2f} {r['foreign_cpu']:>6.0%}   {r['loadgen_cpu_us']:>6.0f} "
            f"{r['mock_cpu_us']:>6.0f} {proxy_cpu}")
    if r["errors"]:
        kinds = "; ".join(f"{v}x {k}" for k, v in sorted(r["error_kinds"].items(), key=lambda kv: -kv[1])[:3])
        line += f"\n  {'':<9} ERRORS {r['errors']}: {kinds}"
    return line


HEADER = (f"  {'path':<9} {'ok':>5} {'req/s':>7} {'p50 ms':>7} {'p90 ms':>7} {'p99 ms':>7} {'ttfb50':>7}   "
          "CPU µs per request: client, mock, proxy")


def matrix(args: argparse.Namespace) -> int:
    ncpu = os.cpu_count()
    print(f"proxy_overhead: load generator, mock and proxy are three separate processes sharing this machine's "
          f"{ncpu} cores;")
    print("every latency includes client and mock CPU on the same box; read the gateway-vs-mitmdump deltas, "
          "not absolute ceilings.")
    print(f"per configuration: {args.requests} requests or {args.seconds:.0f} s, whichever first, after a warm-up; "
          "HTTP/1.1 keep-alive, one connection per concurrent worker.")
    print(f"request: POST {TARGET_URL} model={MODEL}; streams are OpenAI chat SSE with 5 content chunks.")
    print("modes: plain = non-streaming; stream = stream without stream_options (the gateway adds include_usage "
          "and strips the usage chunk);\n       stream+usage = the client sets include_usage itself "
          "(the gateway only observes).")
    print("CPU columns: CPU time each process spent per measured request (from /proc; proxy split into "
          "event-loop thread and helper threads).")
    print("other: share of the machine's CPU used meanwhile by processes outside this benchmark (other sessions' "
          "tests...);\n       when it is not ~0%, wall-clock figures are disturbed and the CPU µs/request columns "
          "are the ones to trust.")
    print(f"load average at start: {os.getloadavg()[0]:.2f}\n")
    with tempfile.TemporaryDirectory(prefix="sg-bench-") as tmp:
        work = Path(tmp)
        mock = MockProcess()
        procs: list[Any] = []
        try:
            from tests.rig.gateway import free_port

            md_port = free_port()
            md = start_bare_mitmdump(work / "mitmdump", mock.port, md_port)
            procs.append(md)
            gw, _, key = start_gateway(work / "gateway", mock.url)
            procs.append(gw)
            targets = {
                "direct": Target("direct", f"{mock.url}/v1/chat/completions", mock.cert_path, None, None),
                "mitmdump": Target("mitmdump", TARGET_URL, mitmdump_ca(work), f"http://127.0.0.1:{md_port}", md.pid),
                "gateway": Target("gateway", TARGET_URL, str(gw.ca_path), gw.proxy_url(key, "bench"), gw.proc.pid),
            }
            print(f"mock pid {mock.pid}; bare mitmdump pid {md.pid}; spendgate serve pid {gw.proc.pid} "
                  "(audit log on SQLite, gateway key in the proxy URL)\n")
            results: dict[tuple[str, int, str], dict[str, Any]] = {}
            for mode in args.modes:
                for conc in args.concurrency:
                    print(f"{mode}, concurrency {conc}")
                    print(HEADER)
                    for name in args.paths:
                        r = run_load(targets[name], mock.pid, mode=mode, concurrency=conc,
                                     requests=args.requests, seconds=args.seconds)
                        results[(mode, conc, name)] = r
                        print(fmt_row(name, r), flush=True)
                        if name == "gateway" and not gw.running:
                            print(f"\n!! spendgate serve exited (code {gw.proc.returncode}); last log lines:")
                            print("\n".join("   " + ln for ln in gw.log_tail(40).splitlines()))
                            gw.start(timeout=60)
                            targets["gateway"].pid = gw.proc.pid
                            print(f"!! restarted it (pid {gw.proc.pid}) for the remaining configurations\n")
                    print()
            if "gateway" in args.paths and "mitmdump" in args.paths:
                summary(results, args)
            audit_check(gw)
        finally:
            for p in reversed(procs):
                stop_proc(p) if isinstance(p, subprocess.Popen) else p.stop()
            mock.stop()
    return 0


def summary(results: dict[tuple[str, int, str], dict[str, Any]], args: argparse.Namespace) -> None:
    print("gateway vs bare mitmdump (same mock, same client)")
    print(f"  {'config':<20} {'added p50 ms':>12} {'added p99 ms':>12} {'throughput':>10} "
          f"{'proxy CPU µs/req gw / bare (added)':>36}")
    for mode in args.modes:
        for conc in args.concurrency:
            g, m = results[(mode, conc, "gateway")], results[(mode, conc, "mitmdump")]
            label = f"{mode}, c={conc}"
            bad = "   <- gateway answers were wrong (see ERRORS)" if g["errors"] else ""
            cpu = f"{g['proxy_cpu_us']:.0f} / {m['proxy_cpu_us']:.0f} ({g['proxy_cpu_us'] - m['proxy_cpu_us']:+.0f})"
            print(f"  {label:<20} {g['p50_ms'] - m['p50_ms']:>+12.2f} {g['p99_ms'] - m['p99_ms']:>+12.2f} "
                  f"{g['rps'] / m['rps']:>10.1%} {cpu:>36}{bad}")
    print()
    for name, p50_limit, ratio_limit in TARGETS:
        misses = []
        for mode in args.modes:
            for conc in args.concurrency:
                g, m = results[(mode, conc, "gateway")], results[(mode, conc, "mitmdump")]
                label = f"{mode} c={conc}"
                if g["errors"]:
                    misses.append(f"{label}: {g['errors']} failed requests")
                    continue
                if p50_limit is not None and g["p50_ms"] - m["p50_ms"] > p50_limit:
                    misses.append(f"{label}: p50 +{g['p50_ms'] - m['p50_ms']:.2f} ms")
                if g["rps"] / m["rps"] < ratio_limit:
                    misses.append(f"{label}: {g['rps'] / m['rps']:.0%}")
        goal = (f"p50 added <= {p50_limit} ms, " if p50_limit is not None else "") + f"throughput >= {ratio_limit:.0%}"
        print(f"  target {name}: {goal}: " + ("met" if not misses else "MISSED — " + "; ".join(misses)))
    print("  (caps: measured with whatever budget stage the gateway has today; no budget is set for the bench user.)\n")


def audit_check(gw: Any) -> None:
    """Sanity: the gateway really audited the traffic it carried; and what it says it added itself."""
    try:
        rows = gw.cli_json("usage", "--by", "user")
        print(f"gateway's own `spendgate usage --by user` after the run: {rows}")
    except Exception as e:  # noqa: BLE001 - informational only
        print(f"(could not read the gateway's usage report: {e})")
    try:
        sums: dict[str, float] = {}
        for line in gw.metrics_text().splitlines():
            if line.startswith("spendgate_overhead_seconds_sum") or line.startswith("spendgate_overhead_seconds_count"):
                name, value = line.rsplit(" ", 1)
                kind = "sum" if "_sum" in name else "count"
                sums[kind] = sums.get(kind, 0.0) + float(value)
        if sums.get("count"):
            print(f"gateway's own spendgate_overhead_seconds (mean over all {sums['count']:.0f} requests, all modes): "
                  f"{sums['sum'] / sums['count'] * 1000:.3f} ms")
    except Exception as e:  # noqa: BLE001 - informational only
        print(f"(could not read the gateway's metrics: {e})")


# =========================================================================== ablation

ABLATIONS: list[tuple[str, tuple[str, ...] | None]] = [
    ("bare mitmdump (python -O)", None),
    ("gateway, all stages", ()),
    ("  - MetricsStage", ("MetricsStage",)),
    ("  - Record (no audit log)", ("Record", "BudgetAdmission")),
    ("  - Budgets - RateLimit - Policy", ("Budgets", "BudgetAdmission", "RateLimit", "Policy")),
    ("  - Meter - Record - Metrics", ("Meter", "Record", "BudgetAdmission", "MetricsStage")),
    ("only Tls+Routing+Identity+Forward",
     ("OnboardingFiles", "Destinations", "RateLimit", "Policy", "Sockets", "Budgets", "Meter", "Record",
      "BudgetAdmission", "MetricsStage")),
]


def ablate(args: argparse.Namespace) -> int:
    print("proxy_overhead --ablate: `spendgate serve` with stages left out (bench/_serve_ablated.py), each in a "
          "fresh process,")
    print(f"versus bare mitmdump. Load generator, mock and proxy are separate processes sharing {os.cpu_count()} "
          "cores. Proxy CPU µs per request is the")
    print("steadiest figure (loop = event-loop thread, threads = audit writer, registry poller, to_thread workers, "
          "metrics server).\n")
    with tempfile.TemporaryDirectory(prefix="sg-bench-abl-") as tmp:
        work = Path(tmp)
        mock = MockProcess()
        try:
            from tests.rig.gateway import free_port

            rows: list[tuple[str, dict[str, dict[str, Any]]]] = []
            for i, (label, drop) in enumerate(ABLATIONS):
                if drop is None:
                    port = free_port()
                    proc = start_bare_mitmdump(work / "mitmdump", mock.port, port, optimized=True)
                    target = Target(label, TARGET_URL, mitmdump_ca(work), f"http://127.0.0.1:{port}", proc.pid)
                else:
                    gw, p, key = start_gateway(work / f"gw{i}", mock.url, drop=drop)
                    assert p is not None
                    proc = p
                    target = Target(label, TARGET_URL, str(gw.ca_path), gw.proxy_url(key, "bench"), proc.pid)
                res: dict[str, dict[str, Any]] = {}
                try:
                    for mode in args.modes:
                        for conc in args.concurrency:
                            res[f"{mode} c={conc}"] = run_load(target, mock.pid, mode=mode, concurrency=conc,
                                                               requests=args.requests, seconds=args.seconds)
                finally:
                    stop_proc(proc)
                rows.append((label, res))
                cells = "  ".join(
                    f"{k}: {r['rps']:.0f}/s p50 {r['p50_ms']:.2f} cpu {r['proxy_cpu_us']:.0f} "
                    f"({r['proxy_loop_cpu_us']:.0f}+{r['proxy_threads_cpu_us']:.0f}) other {r['foreign_cpu']:.0%}"
                    + (f" ERR {r['errors']}" if r["errors"] else "")
                    for k, r in res.items())
                print(f"  {label:<34} {cells}", flush=True)
            print()
            base = rows[0][1]
            print("proxy CPU µs per request above bare mitmdump (loop + threads), per configuration:")
            for label, res in rows[1:]:
                cells = "  ".join(
                    f"{k}: {r['proxy_cpu_us'] - base[k]['proxy_cpu_us']:+5.0f} "
                    f"({r['proxy_loop_cpu_us'] - base[k]['proxy_loop_cpu_us']:+.0f}"
                    f"{r['proxy_threads_cpu_us'] - base[k]['proxy_threads_cpu_us']:+.0f})"
                    for k, r in res.items())
                print(f"  {label:<34} {cells}")
        finally:
            mock.stop()
    return 0


# =========================================================================== profile


def profile(args: argparse.Namespace) -> int:
    import pstats

    print("proxy_overhead --profile: each proxy runs under bench/_profiled.py; cProfile is on only during the "
          "measured phase")
    print("(Python 3.12's cProfile sees every thread: event loop, audit writer, worker threads). cProfile slows "
          "Python code ~2x:")
    print(f"read shares and the gateway-minus-mitmdump excess, not speed. Load generator, mock and proxy share "
          f"{os.cpu_count()} cores.\n")
    with tempfile.TemporaryDirectory(prefix="sg-bench-prof-") as tmp:
        work = Path(tmp)
        mock = MockProcess()
        try:
            from tests.rig.gateway import free_port

            stats: dict[tuple[str, str], tuple[Any, int]] = {}
            for name in ("mitmdump", "gateway"):
                prof = work / f"{name}.prof"
                if name == "mitmdump":
                    port = free_port()
                    proc = start_bare_mitmdump(work / "mitmdump", mock.port, port, profile_to=prof, optimized=True)
                    target = Target(name, TARGET_URL, mitmdump_ca(work), f"http://127.0.0.1:{port}", proc.pid)
                else:
                    gw, proc, key = start_gateway(work / "gateway", mock.url, profile_to=prof)
                    assert proc is not None
                    target = Target(name, TARGET_URL, str(gw.ca_path), gw.proxy_url(key, "bench"), proc.pid)
                try:
                    for i, mode in enumerate(args.modes, 1):
                        r = run_load(target, mock.pid, mode=mode, concurrency=args.profile_concurrency,
                                     requests=args.requests, seconds=args.seconds, profile=True)
                        print(f"  {name:<9} {mode} c={args.profile_concurrency}: {r['rps']:.0f} req/s, "
                              f"p50 {r['p50_ms']:.2f} ms (profiled)  errors={r['errors']} {r['error_kinds'] or ''}")
                        out = Path(f"{prof}.{i}")
                        wait_until(out.exists, 10, f"profile {out}")
                        time.sleep(0.2)
                        stats[(name, mode)] = (pstats.Stats(str(out)), r["n"] + r["errors"])
                finally:
                    stop_proc(proc, timeout=30)
            print()
            for mode in args.modes:
                print(f"===== {mode}, c={args.profile_concurrency}")
                compare_profiles({"gateway": stats[("gateway", mode)], "mitmdump": stats[("mitmdump", mode)]})
        finally:
            mock.stop()
    return 0


def _bucket(path: str, func: str) -> str:
    if path == "~":
        if "_ssl." in func or "ssl" in func.lower():
            return "C: ssl"
        if "select" in func or "epoll" in func or "poll" in func:
            return "C: epoll wait (idle)"
        if "socket" in func or "send" in func or "recv" in func:
            return "C: socket"
        return "C: builtins"
    p = path.replace("\\", "/")
    for marker, name in (("/spendgate/", "spendgate."), ("/mitmproxy/", "mitmproxy.")):
        if marker in p:
            rest = p.split(marker, 1)[1]
            parts = rest.split("/")
            if name == "mitmproxy." and parts[0] in ("proxy",) and len(parts) > 2:
                return name + "/".join(parts[:3]).removesuffix(".py")
            return name + "/".join(parts[:2]).removesuffix(".py")
    for lib in ("sqlalchemy", "sqlmodel", "genai_prices", "pydantic", "h11", "h2", "wsproto", "OpenSSL",
                "cryptography", "prometheus_client", "tiktoken", "psycopg"):
        if f"/{lib}/" in p:
            return lib
    if "/asyncio/" in p:
        return "stdlib asyncio"
    if "/python3" in p or "/lib/python" in p:
        return "stdlib " + Path(p).stem
    return Path(p).name


def compare_profiles(totals: dict[str, Any]) -> None:
    import pstats

    per_req: dict[str, dict[str, float]] = {}
    for name, (st, n) in totals.items():
        b: dict[str, float] = {}
        for (path, _line, func), (_cc, _nc, tt, _ct, _callers) in st.stats.items():  # type: ignore[attr-defined]
            k = _bucket(path, func)
            b[k] = b.get(k, 0.0) + tt
        per_req[name] = {k: v / n * 1e6 for k, v in b.items()}
    g, m = per_req["gateway"], per_req["mitmdump"]
    keys = sorted(set(g) | set(m), key=lambda k: -(g.get(k, 0) - m.get(k, 0)))
    idle = "C: epoll wait (idle)"
    print("event-loop thread, own time (tottime) per request, µs — largest gateway excess first:")
    print(f"  {'where':<46} {'gateway':>9} {'mitmdump':>9} {'excess':>9}")
    for k in keys[:25]:
        print(f"  {k:<46} {g.get(k, 0):>9.1f} {m.get(k, 0):>9.1f} {g.get(k, 0) - m.get(k, 0):>+9.1f}")
    tg = sum(v for k, v in g.items() if k != idle)
    tm = sum(v for k, v in m.items() if k != idle)
    print(f"  {'TOTAL busy (excluding epoll wait)':<46} {tg:>9.1f} {tm:>9.1f} {tg - tm:>+9.1f}\n")

    st, n = totals["gateway"]
    print("gateway: spendgate functions by cumulative time per request "
          "(µs; includes callees; async hooks count per resume):")
    rows = []
    for (path, line, func), (_cc, nc, _tt, ct, _callers) in st.stats.items():  # type: ignore[attr-defined]
        if "/spendgate/" in path:
            rows.append((ct / n * 1e6, nc / n, f"{path.split('/spendgate/', 1)[1]}:{line}({func})"))
    for ct, calls, label in sorted(rows, reverse=True)[:25]:
        print(f"  {ct:>8.1f}  {calls:>6.2f} calls/req  {label}")
    print()
    print("gateway: top 20 functions by own time (all code):")
    st.sort_stats(pstats.SortKey.TIME)
    for (path, line, func), (_cc, nc, tt, _ct, _callers) in sorted(
            st.stats.items(), key=lambda kv: -kv[1][2])[:20]:  # type: ignore[attr-defined]
        where = path if path == "~" else "/".join(Path(path).parts[-3:])
        print(f"  {tt / n * 1e6:>8.1f} µs/req  {nc / n:>7.2f} calls/req  {where}:{line}({func})")


# =========================================================================== main


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--requests", type=int, default=2000, help="measured requests per configuration (default 2000)")
    ap.add_argument("--seconds", type=float, default=8.0, help="time bound per configuration (default 8)")
    ap.add_argument("--concurrency", type=int, nargs="+", default=[1, 32])
    ap.add_argument("--modes", nargs="+", default=list(MODES), choices=list(MODES))
    ap.add_argument("--paths", nargs="+", default=["direct", "mitmdump", "gateway"],
                    choices=["direct", "mitmdump", "gateway"])
    ap.add_argument("--profile", action="store_true", help="instead of the matrix: cProfile both proxies and compare")
    ap.add_argument("--profile-concurrency", type=int, default=32)
    ap.add_argument("--ablate", action="store_true",
                    help="instead of the matrix: the gateway with stages left out, vs bare mitmdump")
    ap.add_argument("--loadgen", metavar="JSON", help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.loadgen:
        return loadgen_main(args.loadgen)
    if args.profile:
        return profile(args)
    if args.ablate:
        return ablate(args)
    return matrix(args)


if __name__ == "__main__":
    raise SystemExit(main())
