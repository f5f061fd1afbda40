"""System calls per request: bare mitmdump and `spendgate serve` (audit, a cap, metrics), side by side.

`side_by_side.py` finds that at c=1 the gateway's excess CPU is mostly the kernel's (callgrind counts
fewer user-space instructions than mitmdump's); this says which calls. `strace -f -c` is attached to
each proxy for one measured run (after the load generator's warm-up) and its counts divided by the
requests sent. strace slows the proxies down: read the counts, not the times; the user and system CPU per request
printed below them come from a run before, untraced (from /proc, so in clock ticks: a rough split).

    .venv/bin/python bench/syscalls.py                       # SQLite, plain c=1
    .venv/bin/python bench/syscalls.py --database postgresql --configs plain:1 stream:16
"""

from __future__ import annotations

import argparse
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from _procs import CLK_TCK  # noqa: E402
from proxy_overhead import Target, run_load  # noqa: E402
from side_by_side import database, proxies  # noqa: E402

_LINE = re.compile(r"^\s*[\d.]+\s+[\d.]+\s+\d+\s+(\d+)\s+(?:\d+\s+)?(\w+)\s*$")


def user_system(target: Target, mock_pid: int, mode: str, conc: int, requests: int) -> tuple[float, ...]:
    """User and system CPU µs per request of one run, untraced, and its threads' voluntary and
    involuntary context switches per request (each a thread that blocked or was preempted)."""
    assert target.pid is not None
    before, switched = _times(target.pid), _switches(target.pid)
    r = run_load(target, mock_pid, mode=mode, concurrency=conc, requests=requests, seconds=600)
    after, switched_after = _times(target.pid), _switches(target.pid)
    n = max(r["n"] + r["errors"], 1)
    return ((after[0] - before[0]) / n * 1e6, (after[1] - before[1]) / n * 1e6,
            (switched_after[0] - switched[0]) / n, (switched_after[1] - switched[1]) / n)


def _times(pid: int) -> tuple[float, float]:
    with open(f"/proc/{pid}/stat") as f:
        fields = f.read().rsplit(")", 1)[1].split()
    return int(fields[11]) / CLK_TCK, int(fields[12]) / CLK_TCK


def _switches(pid: int) -> tuple[int, int]:
    voluntary = involuntary = 0
    for task in Path(f"/proc/{pid}/task").iterdir():
        try:
            status = (task / "status").read_text()
        except OSError:  # a thread that just ended
            continue
        for line in status.splitlines():
            if line.startswith("voluntary_ctxt_switches"):
                voluntary += int(line.split()[1])
            elif line.startswith("nonvoluntary_ctxt_switches"):
                involuntary += int(line.split()[1])
    return voluntary, involuntary


def counted(target: Target, mock_pid: int, mode: str, conc: int, requests: int, out: Path) -> dict[str, float]:
    assert target.pid is not None
    tracer = subprocess.Popen(["strace", "-f", "-c", "-o", str(out), "-p", str(target.pid)],
                              stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    time.sleep(1.0)  # attached to every thread
    r = run_load(target, mock_pid, mode=mode, concurrency=conc, requests=requests, seconds=600)
    tracer.send_signal(signal.SIGINT)
    tracer.wait(30)
    n = max(r["n"] + r["errors"], 1)
    calls: dict[str, float] = {}
    for line in out.read_text().splitlines():
        m = _LINE.match(line)
        if m and m.group(2) != "total":
            calls[m.group(2)] = int(m.group(1)) / n
    return calls


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--database", choices=["sqlite", "postgresql"], default="sqlite")
    ap.add_argument("--configs", nargs="+", default=["plain:1"])
    ap.add_argument("--requests", type=int, default=500)
    args = ap.parse_args(argv)
    if shutil.which("strace") is None:
        raise SystemExit("strace is not installed (apt-get install strace)")
    with tempfile.TemporaryDirectory(prefix="sg-sys-") as tmp, database(args.database) as db_url, \
            proxies(Path(tmp), db_url) as (mock, _, bare, ours):
        work = Path(tmp)
        for spec in args.configs:
            mode, conc = spec.split(":")[0], int(spec.split(":")[1])
            split = {t.name: user_system(t, mock.pid, mode, conc, args.requests * 4) for t in (bare, ours)}
            got = {t.name: counted(t, mock.pid, mode, conc, args.requests, work / f"{t.name}.strace")
                   for t in (bare, ours)}
            names = sorted(set(got["mitmdump"]) | set(got["gateway"]),
                           key=lambda s: -max(got["gateway"].get(s, 0), got["mitmdump"].get(s, 0)))
            print(f"{args.database}, {mode} c={conc}: system calls per request")
            print(f"    {'call':<16} {'mitmdump':>9} {'gateway':>9}")
            for name in names:
                a, b = got["mitmdump"].get(name, 0.0), got["gateway"].get(name, 0.0)
                if max(a, b) >= 0.05:
                    print(f"    {name:<16} {a:>9.2f} {b:>9.2f}")
            print(f"    {'total':<16} {sum(got['mitmdump'].values()):>9.2f} {sum(got['gateway'].values()):>9.2f}")
            for i, what in enumerate(("user CPU µs", "system CPU µs", "switches, vol.", "switches, invol.")):
                a, b = split["mitmdump"][i], split["gateway"][i]
                print(f"    {what:<16} {a:>9.{2 if i > 1 else 0}f} {b:>9.{2 if i > 1 else 0}f}  (untraced)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
