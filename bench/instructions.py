"""Issue 14's ratio without the machine's noise: instructions per request, counted by callgrind.

CPU seconds on this shared 2-core VM vary by ±20 % from one round to the next (mitmdump alone has
measured anywhere from 1,400 to 2,600 µs a request at c=1). `valgrind --tool=callgrind` counts the
instructions a process executes, which is the same on every run for the same work, whatever else
the machine does. This runs bare mitmdump (as installed, with bench/_mitm_redirect.py) and
`spendgate serve` (under -O as it runs itself: audit log on SQLite, the bench user under a cap,
metrics) under callgrind on the loopback mock, sends `--warmup` requests, zeroes the counters
(`callgrind_control --zero`), sends `--requests` more from `--concurrency` clients, and dumps the
counters (`callgrind_control --dump`): instructions per request, and the ratio gateway / mitmdump.

Instructions are not time (a cache miss or a syscall costs more than its count says), but for the
same kind of work in the same interpreter the ratio follows the CPU ratio; use it to tell whether a
change helped when the seconds cannot. Under callgrind both proxies run ~50x slower, one thread at
a time; the client and the mock run natively.

    .venv/bin/python bench/instructions.py                          # c=1 and c=16, plain (~4 min)
    .venv/bin/python bench/instructions.py --modes plain stream --concurrency 1
    .venv/bin/python bench/instructions.py --database postgresql --concurrency 1   # the store on 127.0.0.1:5432

Not run by CI.
"""

from __future__ import annotations

import argparse
import json
import re
import shutil
import ssl
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from _procs import PYTHON, MockProcess, port_open, wait_until  # noqa: E402
from proxy_overhead import BENCH_DIR, MITMDUMP, MODEL, PROMPT, _clean_env, mitmdump_ca, stop_proc  # noqa: E402
from side_by_side import database  # noqa: E402

URL = "https://api.openai.com/v1/chat/completions"
VALGRIND = ["valgrind", "--tool=callgrind", "--trace-children=no"]


def _counted(out: Path) -> int:
    """Instructions in the newest dump of a callgrind output (`totals:` / `summary:` line)."""
    dumps = sorted(out.parent.glob(out.name + "*"), key=lambda p: p.stat().st_mtime)
    for line in reversed(dumps[-1].read_text(errors="replace").splitlines()):
        m = re.match(r"(?:totals|summary):\s+(\d+)", line)
        if m:
            return int(m.group(1))
    raise RuntimeError(f"no totals in {dumps[-1]}")


def _load(proxy: str, ca: str, mode: str, n: int, conc: int) -> int:
    """n requests from conc clients (threads, one connection each); returns how many succeeded."""
    import httpx

    body = json.dumps({"model": MODEL, "messages": [{"role": "user", "content": PROMPT}],
                       "stream": mode == "stream"}).encode()
    headers = {"content-type": "application/json", "authorization": "Bearer unused"}
    ok = [0] * conc
    per = [n // conc + (1 if i < n % conc else 0) for i in range(conc)]

    def worker(i: int) -> None:
        with httpx.Client(proxy=proxy, verify=ssl.create_default_context(cafile=ca), trust_env=False,
                          timeout=300) as h:
            for _ in range(per[i]):
                with h.stream("POST", URL, content=body, headers=headers) as r:
                    data = b"".join(r.iter_bytes())
                if r.status_code == 200 and (mode != "stream" or b"[DONE]" in data):
                    ok[i] += 1

    threads = [threading.Thread(target=worker, args=(i,)) for i in range(conc)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    return sum(ok)


def _measure(name: str, pid: int, out: Path, proxy: str, ca: str, args: argparse.Namespace) -> dict[str, Any]:
    res: dict[str, Any] = {}
    for mode in args.modes:
        for conc in args.concurrency:
            _load(proxy, ca, mode, args.warmup, conc)
            subprocess.run(["callgrind_control", "--zero", str(pid)], check=True, capture_output=True)
            t0 = time.perf_counter()
            ok = _load(proxy, ca, mode, args.requests, conc)
            subprocess.run(["callgrind_control", "--dump", str(pid)], check=True, capture_output=True)
            time.sleep(0.5)
            ir = _counted(out)
            res[f"{mode} c={conc}"] = ir / max(ok, 1)
            print(f"  {name:<9} {mode:<6} c={conc:<3} {ok:>5}/{args.requests} ok  {ir / max(ok, 1) / 1e6:8.2f} M "
                  f"instructions/request  ({time.perf_counter() - t0:.0f} s under callgrind)", flush=True)
    return res


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--modes", nargs="+", default=["plain"], choices=["plain", "stream"])
    ap.add_argument("--concurrency", nargs="+", type=int, default=[1, 16])
    ap.add_argument("--requests", type=int, default=400)
    ap.add_argument("--warmup", type=int, default=60)
    ap.add_argument("--no-cap", action="store_true", help="the bench user under no cap")
    ap.add_argument("--database", choices=["sqlite", "postgresql"], default="sqlite")
    args = ap.parse_args(argv)
    if shutil.which("valgrind") is None or shutil.which("callgrind_control") is None:
        raise SystemExit("valgrind (callgrind) is not installed")
    from tests.rig.gateway import GatewayProcess, free_port

    print(f"instructions: bare mitmdump (as installed) and spendgate serve (python -O; audit on {args.database}, "
          f"{'no cap' if args.no_cap else 'a cap'}, metrics), each under callgrind")
    results: dict[str, dict[str, Any]] = {}
    with tempfile.TemporaryDirectory(prefix="sg-instr-") as tmp, database(args.database) as db_url:
        work = Path(tmp)
        mock = MockProcess()
        try:
            # bare mitmdump
            port = free_port()
            (work / "mitmdump" / "mitmdump-confdir").mkdir(parents=True)
            out = work / "mitmdump.callgrind"
            cmd = [*VALGRIND, f"--callgrind-out-file={out}", PYTHON, MITMDUMP, "--listen-host", "127.0.0.1",
                   "--listen-port", str(port), "--set", f"confdir={work / 'mitmdump' / 'mitmdump-confdir'}",
                   "--set", "connection_strategy=lazy", "--set", "ssl_insecure=true", "--set", "flow_detail=0",
                   "-s", str(BENCH_DIR / "_mitm_redirect.py"), "--set", f"bench_upstream=127.0.0.1:{mock.port}"]
            md = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, env=_clean_env(),
                                  cwd=work, start_new_session=True)
            try:
                wait_until(lambda: md.poll() is None and port_open(port), 300, "mitmdump under callgrind")
                results["mitmdump"] = _measure("mitmdump", md.pid, out, f"http://127.0.0.1:{port}",
                                               mitmdump_ca(work), args)
            finally:
                stop_proc(md, 60)
            # spendgate serve
            gw = GatewayProcess(work / "gateway", mock.url, name="instr-gateway", db_url=db_url)
            gw.write_config()
            key = gw.create_key("bench", team="perf", cap=None if args.no_cap else "100000", period="month")["key"]
            out = work / "gateway.callgrind"
            cmd = [*VALGRIND, f"--callgrind-out-file={out}", PYTHON, "-O", str(BENCH_DIR / "_serve_ablated.py"),
                   "serve", "--config", str(gw.config_path)]
            proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, env=gw.env(),
                                    cwd=gw.workdir, start_new_session=True)
            try:
                wait_until(lambda: proc.poll() is None and gw.ca_path.exists() and port_open(gw.port), 600,
                           "spendgate serve under callgrind")
                results["gateway"] = _measure("gateway", proc.pid, out, gw.proxy_url(key, "bench"),
                                              str(gw.ca_path), args)
            finally:
                stop_proc(proc, 60)
        finally:
            mock.stop()
    print("\nsummary: instructions per request, gateway / mitmdump")
    for k, g in results["gateway"].items():
        m = results["mitmdump"][k]
        print(f"  {k:<12} {g / m:.3f}×  ({g / 1e6:.2f} M vs {m / 1e6:.2f} M)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
