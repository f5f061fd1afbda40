"""A developer's workstation as `spendgate onboard` sets it up, for driving real tools through a gateway.

The environment of every tool run is made from nothing but:

* a few basics every shell has (``PATH``, locale, ``USER``…) and a fresh, empty ``HOME`` and
  ``TMPDIR`` (no tool config left over from the machine or an earlier test);
* the real output of ``spendgate onboard USER --key KEY``, pasted into bash as a developer pastes
  it: its one-time line (fetch the gateway CA and the Node preload from the gateway, build
  ``~/.spendgate/ca-bundle.pem`` from this machine's CAs) runs, its ``export`` lines set the
  variables, and the environment that results is what the tools get;
* whatever a test passes as ``quiet`` — only switches that turn off a tool's own telemetry or
  update checks (each test module lists the ones it uses).

Nothing else of the test process's environment leaks in: not its proxy or CA variables, nor any
API key. A tool that needs a variable the onboarding does not set fails with a message naming it
(:meth:`Workstation.require`) rather than the test setting it.

    ws = Workstation.onboarded(gw, "ann", key, tmp_path)
    ws.require("ANTHROPIC_API_KEY", tool="Claude Code")
    run = ws.run([claude, "-p", "Say hello"], quiet={"CLAUDE_CODE_DISABLE_NONESSENTIAL_TRAFFIC": "1"})
"""

from __future__ import annotations

import contextlib
import dataclasses
import os
import re
import shlex
import signal
import subprocess
import time
from collections.abc import Iterable, Mapping, Sequence
from decimal import Decimal
from pathlib import Path
from typing import Any

from .gateway import UPSTREAM_KEYS, GatewayProcess
from .ledger import Ledger, Row
from .mock_provider import MockProvider, RecordedRequest

BASE_VARS = ("PATH", "LANG", "LC_ALL", "LC_CTYPE", "TZ", "USER", "LOGNAME", "SHELL")
SHELL_OWN_VARS = frozenset({"PWD", "OLDPWD", "SHLVL", "_"})  # bash sets these itself
GATEWAY_KEY_RE = re.compile(rb"sg_[a-z0-9]{8}_[A-Za-z0-9]{32,}")
CREDENTIAL_HEADERS = ("authorization", "x-api-key", "api-key", "x-goog-api-key")
UPSTREAM_HEADER = {"openai": ("authorization", f"Bearer {UPSTREAM_KEYS['openai']}"),
                   "anthropic": ("x-api-key", UPSTREAM_KEYS["anthropic"]),
                   "gemini": ("x-goog-api-key", UPSTREAM_KEYS["gemini"])}


@dataclasses.dataclass
class Run:
    """A finished run: exit code and output (stderr kept apart, for failure messages)."""

    cmd: list[str]
    returncode: int
    stdout: str
    stderr: str
    seconds: float

    def __str__(self) -> str:
        return (f"$ {shlex.join(self.cmd)}  -> exit {self.returncode} after {self.seconds:.1f}s\n"
                f"--- stdout\n{self.stdout[-4000:]}\n--- stderr\n{self.stderr[-4000:]}")


def run_process(argv: Sequence[str | Path], env: Mapping[str, str], *, cwd: Path, stdin: str = "",
                timeout: float = 120.0) -> Run:
    """Run ``argv``; one past ``timeout`` is killed (with its children) and fails the test."""
    cmd = [str(c) for c in argv]
    t0 = time.monotonic()
    proc = subprocess.Popen(cmd, cwd=cwd, env=dict(env), text=True, stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, start_new_session=True)
    try:
        out, err = proc.communicate(stdin, timeout=timeout)
    except subprocess.TimeoutExpired:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGKILL)
        out, err = proc.communicate()
        raise AssertionError(f"timed out\n{Run(cmd, -9, out, err, time.monotonic() - t0)}") from None
    finally:
        with contextlib.suppress(ProcessLookupError):  # what the tool left running in its session
            os.killpg(proc.pid, signal.SIGKILL)
    return Run(cmd, proc.returncode, out, err, time.monotonic() - t0)


class Workstation:
    """A fresh HOME whose environment is what pasting the onboarding output made it (see the module docstring)."""

    def __init__(self, root: Path) -> None:
        self.root = root
        self.home = root / "home"
        self.tmp = root / "tmp"
        for d in (self.home, self.tmp):
            d.mkdir(parents=True, exist_ok=True)
        self.base = {k: os.environ[k] for k in BASE_VARS if k in os.environ}
        self.base.update({"HOME": str(self.home), "TMPDIR": str(self.tmp), "TERM": "dumb"})
        self.environ = dict(self.base)
        self.onboard_text = ""

    @property
    def onboard(self) -> dict[str, str]:
        """What the onboarding lines set or changed."""
        return {k: v for k, v in self.environ.items() if self.base.get(k) != v}

    @classmethod
    def onboarded(cls, gw: GatewayProcess, user: str, key: str, root: Path) -> Workstation:
        ws = cls(root)
        ws.paste(gw.cli("onboard", user, "--key", key).stdout)
        return ws

    def paste(self, text: str) -> None:
        """Run ``text`` in bash in this workstation's environment and keep the environment it leaves."""
        self.onboard_text = text
        script, dump = self.root / "onboard.sh", self.root / "onboard.env"
        script.write_text(text)
        run = run_process(["bash", "--noprofile", "--norc", "-c", 'source "$1"; env -0 > "$2"', "onboard",
                           script, dump], self.environ, cwd=self.home, timeout=60)
        if run.returncode != 0 or run.stderr.strip() or not dump.exists():
            raise AssertionError(f"pasting the `spendgate onboard` output into bash failed:\n{text}\n{run}")
        env = dict(item.split("=", 1) for item in dump.read_text().split("\0") if "=" in item)
        self.environ = {k: v for k, v in env.items() if k not in SHELL_OWN_VARS}

    def require(self, *names: str, tool: str) -> None:
        """Fail (not skip: the onboarding is what is under test) when it does not set a variable ``tool`` needs."""
        missing = [n for n in names if not self.onboard.get(n)]
        if missing:
            raise AssertionError(f"{tool} needs {', '.join(missing)}, which the `spendgate onboard` lines do not "
                                 f"set; they set {sorted(self.onboard)} from:\n{self.onboard_text}")

    def env(self, quiet: Mapping[str, str] | None = None, unset: Iterable[str] = ()) -> dict[str, str]:
        env = {**self.environ, **(quiet or {})}
        for name in unset:
            env.pop(name, None)
        return env

    def run(self, cmd: Sequence[str | Path], *, cwd: Path | None = None, quiet: Mapping[str, str] | None = None,
            unset: Iterable[str] = (), stdin: str = "", timeout: float = 120.0) -> Run:
        return run_process(cmd, self.env(quiet, unset), cwd=cwd or self.root, stdin=stdin, timeout=timeout)


# --------------------------------------------------------------------------- what must hold afterwards


def _seen(rec: RecordedRequest) -> bytes:
    return b"\n".join([
        "\n".join(f"{k}: {v}" for k, v in rec.header_list).encode(), rec.path.encode(), rec.query.encode(), rec.body,
    ])


def assert_team_key_only(mock: MockProvider, key: str) -> list[RecordedRequest]:
    """Every request (and WebSocket message) the mock received carries the team's upstream key in its
    provider's header, and nothing of the gateway key. Returns the requests."""
    recs = list(mock.requests)
    assert recs, "the mock received nothing: the tool did not go through the gateway"
    secret = key.rsplit("_", 1)[1].encode()
    for rec in recs:
        seen = _seen(rec)
        assert key.encode() not in seen and secret not in seen and not GATEWAY_KEY_RE.search(seen), (
            f"gateway key reached the mock: {rec.method} {rec.path}")
        sent = [(k.lower(), v) for k, v in rec.header_list if k.lower() in CREDENTIAL_HEADERS]
        # The mock tells the provider of a model call by its path; other paths (Claude Code's
        # /api/claude_code/*) it cannot, but they too must carry one team key and only that.
        allowed = [UPSTREAM_HEADER[rec.provider]] if rec.endpoint != "unknown" else list(UPSTREAM_HEADER.values())
        assert len(sent) == 1 and sent[0] in allowed, f"{rec.method} {rec.path}: credentials at the mock {sent}"
        assert "proxy-authorization" not in rec.headers and "key" not in rec.query_params
    for sess in mock.ws_sessions:
        for msg in sess.messages:
            data = msg.text.encode()
            assert secret not in data and not GATEWAY_KEY_RE.search(data), f"gateway key in a {sess.path} message"
    return recs


def model_rows(ledger: Ledger, user: str, model: str, n: int = 1, timeout: float = 15.0) -> list[Row]:
    """The user's settled audit rows that asked for ``model`` and got output tokens, once there are ``n``."""

    def answered(rows: list[Row]) -> list[Row]:
        return [r for r in rows if r["model_requested"] == model and (r["output_tokens"] or 0) > 0]

    rows = ledger.settled(user, where=lambda rs: len(answered(rs)) >= n, timeout=timeout)
    return answered(rows)


def assert_row(row: Row, *, user: str, model: str, tokens: Mapping[str, int] | None = None,
               provider: str | None = None) -> None:
    """An audit row of a paid answer: who, which model, the tokens the mock reported, a positive cost."""
    where = f"audit row {row['id']} ({row['method']} {row['path']})"
    assert row["user"] == user, where
    assert row["outcome"] == "completed" and row["status_code"] == 200, (where, row["outcome"], row["status_code"])
    assert row["model_requested"] == model and row["model_reported"] == model, (where, row["model_reported"])
    if provider:
        assert row["provider"] == provider, where
    assert row["usage_source"] == "provider", where
    assert (row["input_tokens"] or 0) > 0 and (row["output_tokens"] or 0) > 0, where
    if tokens is not None:
        assert (row["input_tokens"], row["output_tokens"]) == (tokens["input_tokens"], tokens["output_tokens"]), where
    cost: Any = row["cost_usd"]
    assert isinstance(cost, Decimal) and cost > 0, (where, cost)
