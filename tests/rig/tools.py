"""Install the real developer tools the end-to-end tests drive, once per machine.

Every tool goes into a cache outside the repository clone, so a fresh clone (CI) pays the
install only the first time on a machine:

* ``$SPENDGATE_TOOLS_CACHE``, else ``$XDG_CACHE_HOME/spendgate-tools``, else
  ``~/.cache/spendgate-tools``;
* npm tools in ``npm/<name>-<version>/`` (``npm install --prefix``), Python tools in their own
  venvs ``venvs/<name>-<version>/`` (aider and llm pull heavy, conflicting dependency trees that
  must not land in the project's ``.venv``).

Each installer returns the path of what was installed, or raises :class:`ToolUnavailable` with
the reason (no registry answered, the install failed or timed out); tests turn that into
``pytest.skip(reason)`` (see :func:`require`). Installs are serialised per tool with a lock
file and never seen half done: npm trees are built in a temporary directory and renamed into
place; a venv (whose scripts hard-code its path) is built in place and counts only once its
``.complete`` marker is written. Installs talk to the registries directly (a test's
``HTTPS_PROXY`` is dropped), quietly, each bounded by ``$SPENDGATE_TOOLS_INSTALL_TIMEOUT``
seconds (default 300). So that a machine with no registry (offline CI) skips in seconds, not
tools x timeouts: the npm registry is probed first (``REGISTRY_PROBE_S``, unless npm is set to
go through a proxy), and once a registry did not answer, every later install from it in the same
process is refused at once with the same reason. (pip gets no probe: its config may name local
wheel directories or indexes that need no network.)

Measured on this machine (2 cores, Node 20.20, Python 3.12; cold = empty cache, cached = a
lookup of what is already there, ~0.0 s for each):

=========  ============================================================  =============  ========
name       pins                                                          cold install   on disk
=========  ============================================================  =============  ========
claude     @anthropic-ai/claude-code 2.1.332 (native binary, any Node)   6-10 s         384 MB
codex      @openai/codex 0.171.0 (native binary)                         7-14 s         424 MB
node-sdks  openai 6.49.0, @anthropic-ai/sdk 1.15.0, undici 7.30.2        4-7 s          55 MB
aider      aider-chat 0.86.2 (own venv; pins its own dependencies)       48-84 s        666 MB
llm        llm 0.36 (own venv)                                           16-33 s        80 MB
=========  ============================================================  =============  ========

``python -m tests.rig.tools [NAME…]`` installs (all by default) and prints path and time.
"""

from __future__ import annotations

import contextlib
import dataclasses
import fcntl
import hashlib
import os
import shutil
import signal
import ssl
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from pathlib import Path
from typing import NoReturn

CACHE_ENV = "SPENDGATE_TOOLS_CACHE"
TIMEOUT_ENV = "SPENDGATE_TOOLS_INSTALL_TIMEOUT"
DEFAULT_INSTALL_TIMEOUT_S = 300.0  # per tool; the slowest (aider) takes ~50 s on this machine

REPO_ROOT = Path(__file__).resolve().parents[2]
NODE_PROXY_PRELOAD = REPO_ROOT / "addons" / "spendgate" / "onboarding_assets" / "node-proxy.cjs"
"""``NODE_OPTIONS="--require <this>"`` routes Node 18-23's fetch through ``HTTPS_PROXY``."""


class ToolUnavailable(Exception):
    """A tool could not be installed here; ``str(exc)`` is the reason, fit for ``pytest.skip``.

    ``unreachable``: the registry did not answer (as opposed to refusing or failing the install)."""

    def __init__(self, reason: str, unreachable: bool = False) -> None:
        super().__init__(reason)
        self.unreachable = unreachable


REGISTRY_PROBE_S = 10.0
_DOWN: dict[str, str] = {}  # registry ("npm" | "pypi") -> why it did not answer, for this process


@dataclasses.dataclass(frozen=True)
class NpmTool:
    name: str
    packages: tuple[str, ...]  # "name@version" specs installed together
    bin: str | None  # executable under node_modules/.bin, or None for libraries

    @property
    def slug(self) -> str:
        """Cache directory name: changes whenever a pin does, so a new pin is a new install."""
        if len(self.packages) == 1:
            return f"{self.name}-{self.packages[0].rsplit('@', 1)[1]}"
        return f"{self.name}-{_digest(self.packages)}"


@dataclasses.dataclass(frozen=True)
class PythonTool:
    name: str
    requirement: str  # "dist==version"
    extra: tuple[str, ...] = ()  # further pins installed with it
    bin: str = ""

    @property
    def slug(self) -> str:
        version = self.requirement.split("==", 1)[1]
        return f"{self.name}-{version}" + (f"-{_digest(self.extra)}" if self.extra else "")


def _digest(parts: tuple[str, ...]) -> str:
    return hashlib.sha256("\n".join(parts).encode()).hexdigest()[:10]


# Pins that install and run on this machine (Node 20, Python 3.12). Claude Code and Codex ship
# a native binary through a per-platform optional dependency, so Node's version does not matter
# for them; openai 7.x requires Node >= 22, hence 6.x for the Node SDK.
NPM_TOOLS: dict[str, NpmTool] = {
    "claude": NpmTool("claude", ("@anthropic-ai/claude-code@2.1.332",), "claude"),
    "codex": NpmTool("codex", ("@openai/codex@0.171.0",), "codex"),
    "node-sdks": NpmTool("node-sdks", ("openai@6.49.0", "@anthropic-ai/sdk@1.15.0", "undici@7.30.2"), None),
}
PYTHON_TOOLS: dict[str, PythonTool] = {
    "aider": PythonTool("aider", "aider-chat==0.86.2", bin="aider"),
    "llm": PythonTool("llm", "llm==0.36", bin="llm"),
}
ALL_TOOLS = (*NPM_TOOLS, *PYTHON_TOOLS)


def cache_root() -> Path:
    if os.environ.get(CACHE_ENV):
        return Path(os.environ[CACHE_ENV]).expanduser()
    base = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(base) / "spendgate-tools"


# --------------------------------------------------------------------------- public API


def install_timeout() -> float:
    try:
        return float(os.environ.get(TIMEOUT_ENV, "") or DEFAULT_INSTALL_TIMEOUT_S)
    except ValueError:
        return DEFAULT_INSTALL_TIMEOUT_S


def install(name: str, timeout: float | None = None) -> Path:
    """The executable of tool ``name`` (or, for ``node-sdks``, its ``node_modules`` directory)."""
    timeout = install_timeout() if timeout is None else timeout
    if name in NPM_TOOLS:
        return _install_npm(NPM_TOOLS[name], timeout)
    if name in PYTHON_TOOLS:
        return _install_python(PYTHON_TOOLS[name], timeout)
    raise KeyError(f"unknown tool {name!r}; known: {', '.join(ALL_TOOLS)}")


def cached(name: str) -> bool:
    """Whether tool ``name`` is already installed in the cache (no registry needed)."""
    root = cache_root()
    if name in NPM_TOOLS:
        return _npm_result(NPM_TOOLS[name], root / "npm" / NPM_TOOLS[name].slug).exists()
    venv = root / "venvs" / PYTHON_TOOLS[name].slug
    return (venv / ".complete").exists() and (venv / "bin" / PYTHON_TOOLS[name].bin).exists()


def claude() -> Path:
    return install("claude")


def codex() -> Path:
    return install("codex")


def aider() -> Path:
    return install("aider")


def llm() -> Path:
    return install("llm")


def node_modules() -> Path:
    """A ``node_modules`` with the official Node SDKs and undici (for ``NODE_PATH``)."""
    return install("node-sdks")


def undici() -> Path:
    """The npm package undici (the Node 20/22 preload needs it), as ``npm install undici@7`` puts it."""
    return node_modules() / "undici"


def node_proxy_env() -> dict[str, str]:
    """What a Node 20/22 process needs, besides the proxy and CA lines, for its fetch to use the proxy.

    ``NODE_PATH`` only serves the test scripts' ``require('openai')``; a developer's project has
    the SDKs in its own ``node_modules``.
    """
    modules = node_modules()
    return {
        "NODE_OPTIONS": f"--require {NODE_PROXY_PRELOAD}",
        "SPENDGATE_UNDICI": str(modules / "undici"),
        "NODE_PATH": str(modules),
    }


def node() -> Path:
    exe = shutil.which("node")
    if not exe:
        raise ToolUnavailable("node is not installed")
    return Path(exe)


def require(name: str) -> Path:
    """:func:`install`, or ``pytest.skip`` with the reason."""
    import pytest

    try:
        return install(name)
    except ToolUnavailable as exc:
        pytest.skip(f"{name}: {exc}")


# --------------------------------------------------------------------------- npm


def _install_npm(tool: NpmTool, timeout: float) -> Path:
    final = cache_root() / "npm" / tool.slug
    result = _npm_result(tool, final)
    if result.exists():
        return result
    npm = shutil.which("npm")
    if not npm:
        raise ToolUnavailable("npm is not installed")
    with _locked(final), _registry("npm", lambda: _probe_npm(npm)):
        if result.exists():
            return result
        with _staging(final) as tmp:
            _run(
                [npm, "install", "--prefix", str(tmp), "--no-audit", "--no-fund", "--no-save",
                 "--no-package-lock", "--loglevel=error", "--no-update-notifier", "--fetch-retries=2",
                 "--fetch-retry-maxtimeout=20000", *tool.packages],
                what=f"npm install {' '.join(tool.packages)}", timeout=timeout,
                env={"npm_config_cache": str(cache_root() / "npm-cache")},
            )
            if not _npm_result(tool, tmp).exists():
                raise ToolUnavailable(f"npm installed {tool.packages} but {_npm_result(tool, tmp)} is missing")
    return result


def _npm_result(tool: NpmTool, prefix: Path) -> Path:
    return prefix / "node_modules" / ".bin" / tool.bin if tool.bin else prefix / "node_modules"


def _probe_npm(npm: str) -> None:
    """Raise (unreachable) unless the registry npm uses answers HTTP within ``REGISTRY_PROBE_S``."""
    import json
    import urllib.error
    import urllib.request

    try:
        cp = subprocess.run([npm, "config", "list", "--json"], capture_output=True, text=True, timeout=30,
                            stdin=subprocess.DEVNULL)
        config = json.loads(cp.stdout) if cp.returncode == 0 else {}
    except (OSError, ValueError, subprocess.TimeoutExpired):
        config = {}
    if config.get("proxy") or config.get("https-proxy"):
        return  # npm goes through a proxy we would not: let npm itself find out
    registry = str(config.get("registry") or "https://registry.npmjs.org/")
    url = registry.rstrip("/") + "/-/ping"
    opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))
    try:
        opener.open(urllib.request.Request(url, method="GET"), timeout=REGISTRY_PROBE_S).close()
    except urllib.error.HTTPError:
        return  # it answered
    except (urllib.error.URLError, OSError) as exc:
        reason = getattr(exc, "reason", exc)
        if isinstance(reason, ssl.SSLError):
            return  # it answered, with a certificate npm may well accept (its own cafile)
        raise ToolUnavailable(f"npm registry {registry} did not answer within {REGISTRY_PROBE_S:.0f}s: {reason}",
                              unreachable=True) from None


# --------------------------------------------------------------------------- python


def _install_python(tool: PythonTool, timeout: float) -> Path:
    final = cache_root() / "venvs" / tool.slug
    result = final / "bin" / tool.bin
    complete = final / ".complete"
    if complete.exists() and result.exists():
        return result
    with _locked(final):
        if complete.exists() and result.exists():
            return result
        python = _base_python()
        deadline = time.monotonic() + timeout
        # A venv's scripts hard-code its absolute path, so it is built where it will live and
        # marked complete only at the end (a ``.complete`` file), not renamed into place.
        if final.exists():
            shutil.rmtree(final)
        try:
            with _registry("pypi"):
                _run([python, "-m", "venv", str(final)], what="python -m venv", timeout=120)
                _run(
                    [str(final / "bin" / "python"), "-m", "pip", "install", "--quiet", "--disable-pip-version-check",
                     "--no-input", "--retries", "2", "--timeout", "60", tool.requirement, *tool.extra],
                    what=f"pip install {tool.requirement}", timeout=max(deadline - time.monotonic(), 1),
                    env={"PIP_CACHE_DIR": str(cache_root() / "pip-cache")},
                )
        except BaseException:
            shutil.rmtree(final, ignore_errors=True)
            raise
        if not result.exists():
            shutil.rmtree(final, ignore_errors=True)
            raise ToolUnavailable(f"pip installed {tool.requirement} but {result} is missing")
        complete.write_text(time.strftime("%Y-%m-%dT%H:%M:%S\n"))
    return result


def _base_python() -> str:
    """The interpreter behind the running one (a venv's own ``python`` would nest venvs)."""
    base = getattr(sys, "_base_executable", None) or sys.executable
    return base if os.path.exists(base) else sys.executable


# --------------------------------------------------------------------------- plumbing


@contextlib.contextmanager
def _registry(name: str, probe: Callable[[], None] | None = None) -> Iterator[None]:
    """Refuse at once when ``name`` did not answer earlier in this process; else probe it, and
    remember it as down when the probe or the install finds it unreachable."""
    if name in _DOWN:
        raise ToolUnavailable(f"{_DOWN[name]} (found earlier in this run; not retried)", unreachable=True)
    try:
        if probe is not None:
            probe()
        yield
    except ToolUnavailable as exc:
        if exc.unreachable:
            _DOWN[name] = str(exc)
        raise


@contextlib.contextmanager
def _locked(target: Path) -> Iterator[None]:
    target.parent.mkdir(parents=True, exist_ok=True)
    with open(target.parent / f".{target.name}.lock", "w") as fh:
        fcntl.flock(fh, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(fh, fcntl.LOCK_UN)


@contextlib.contextmanager
def _staging(final: Path) -> Iterator[Path]:
    """A temporary directory beside ``final``, renamed to it when the block succeeds."""
    tmp = Path(tempfile.mkdtemp(prefix=f".{final.name}.", dir=final.parent))
    try:
        yield tmp
        if final.exists():
            shutil.rmtree(final)
        tmp.rename(final)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)


_UNREACHABLE = ("ENOTFOUND", "EAI_AGAIN", "ECONNREFUSED", "ETIMEDOUT", "ECONNRESET", "ENETUNREACH",
                "Network is unreachable", "Temporary failure in name resolution",
                "Failed to establish a new connection",
                "Max retries exceeded", "Could not fetch URL", "ConnectTimeoutError", "ReadTimeoutError",
                "network request to", "request to https://")


def _run(cmd: Sequence[str], *, what: str, timeout: float, env: Mapping[str, str] | None = None) -> None:
    # A test run may have HTTPS_PROXY pointing at a gateway under test: the registry is reached directly.
    proc_env = {k: v for k, v in os.environ.items() if k.lower() not in ("https_proxy", "http_proxy", "all_proxy")}
    proc_env.update(env or {})
    try:
        # Own session, so a timeout also ends npm's postinstall scripts and pip's build backends.
        proc = subprocess.Popen(list(cmd), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=proc_env,
                                stdin=subprocess.DEVNULL, start_new_session=True)
    except OSError as exc:
        _unavailable(f"{what} could not start: {exc}")
    try:
        stdout, stderr = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGKILL)
        proc.communicate()
        _unavailable(f"{what} timed out after {timeout:.0f}s (registry slow or unreachable)", unreachable=True)
    if proc.returncode != 0:
        out = (stderr or "") + (stdout or "")
        tail = " | ".join(line.strip() for line in out.strip().splitlines()[-3:])[-400:]
        if any(s in out for s in _UNREACHABLE):
            _unavailable(f"package registry unreachable ({what}): {tail}", unreachable=True)
        if "No matching distribution" in out or "ETARGET" in out or "E404" in out:
            _unavailable(f"pinned version not on the registry ({what}): {tail}")
        _unavailable(f"{what} failed (exit {proc.returncode}): {tail}")


def _unavailable(reason: str, unreachable: bool = False) -> NoReturn:
    raise ToolUnavailable(reason, unreachable)


def main(argv: Sequence[str] | None = None) -> int:
    names = list(argv if argv is not None else sys.argv[1:]) or list(ALL_TOOLS)
    rc = 0
    for name in names:
        t0 = time.monotonic()
        try:
            path = install(name)
        except ToolUnavailable as exc:
            print(f"{name}: UNAVAILABLE after {time.monotonic() - t0:.1f}s: {exc}", flush=True)
            rc = 1
        else:
            print(f"{name}: {path} ({time.monotonic() - t0:.1f}s)", flush=True)
    return rc


if __name__ == "__main__":
    sys.exit(main())
