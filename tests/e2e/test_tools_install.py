"""The tool installers (:mod:`tests.rig.tools`): a warm cache needs no registry at all, and with no
registry answering the tool tests skip within seconds, each with the reason, instead of paying an
install timeout per tool. Run as ``python -m tests.rig.tools`` in a subprocess, with the registries
pointed at a closed local port (npm's ``npm_config_registry``; pip's index, with its config file,
local wheel directories and extra indexes turned off)."""

from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

from tests.rig import tools
from tests.rig.gateway import free_port

REPO = Path(__file__).resolve().parents[2]


def dead_registries(cache: Path) -> dict[str, str]:
    dead = f"http://127.0.0.1:{free_port()}"
    env = {k: v for k, v in os.environ.items() if not k.upper().startswith(("PIP_", "NPM_CONFIG_"))}
    env.update({tools.CACHE_ENV: str(cache), "npm_config_registry": f"{dead}/", "PIP_CONFIG_FILE": os.devnull,
                "PIP_INDEX_URL": f"{dead}/simple", "PIP_FIND_LINKS": "", "PIP_EXTRA_INDEX_URL": ""})
    return env


def install(env: dict[str, str], *names: str) -> tuple[dict[str, str], float]:
    t0 = time.monotonic()
    cp = subprocess.run([sys.executable, "-m", "tests.rig.tools", *names], cwd=REPO, env=env, capture_output=True,
                        text=True, timeout=120)
    lines = dict(line.split(": ", 1) for line in cp.stdout.splitlines() if ": " in line)
    assert set(lines) == set(names), cp.stdout + cp.stderr
    return lines, time.monotonic() - t0


def test_no_registry_skips_fast_with_the_reason(tmp_path: Path) -> None:
    lines, seconds = install(dead_registries(tmp_path / "cache"), "claude", "codex", "llm", "aider")
    assert all(v.startswith("UNAVAILABLE") for v in lines.values()), lines
    assert "npm registry http://127.0.0.1:" in lines["claude"] and "did not answer" in lines["claude"]
    assert "package registry unreachable (pip install llm==" in lines["llm"]
    # the second tool of each registry is refused at once, with the first one's reason
    assert "found earlier in this run" in lines["codex"] and "found earlier in this run" in lines["aider"]
    assert seconds < 60, seconds
    leftovers = [p.name for d in ("npm", "venvs") if (tmp_path / "cache" / d).is_dir()
                 for p in (tmp_path / "cache" / d).iterdir() if not p.name.startswith(".")]
    assert leftovers == [], leftovers  # nothing half-installed that a later run would take as done


def test_cached_tools_need_no_registry() -> None:
    cached = [name for name in tools.ALL_TOOLS if tools.cached(name)]
    if not cached:
        pytest.skip(f"no tool in the cache {tools.cache_root()} yet")
    lines, seconds = install(dead_registries(tools.cache_root()), *cached)
    assert not any(v.startswith("UNAVAILABLE") for v in lines.values()), lines
    assert seconds < 10, seconds

