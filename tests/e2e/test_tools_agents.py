"""The coding agents and CLIs developers use, real and unmodified, through a real `spendgate serve`.

Claude Code (``claude -p``), Codex CLI (``codex exec``), aider and ``llm``, each installed by
:mod:`tests.rig.tools` into the cache outside the clone when missing (skipped, with the reason,
when no registry answers), each run in a fresh HOME whose whole environment is what pasting
``spendgate onboard USER --key KEY`` into bash makes it (:mod:`tests.rig.workstation`: its
one-time line fetches the CA from the gateway and builds the bundle, its ``export`` lines set the
rest), against the rig's mock provider. Each test shows the answer printed, the team's upstream
key at the mock and never the gateway key, and an audit row with the user, the model, the tokens
the mock reported and a cost. Every key is under a daily cap, as a team's would be: the gateway
must meter what these tools send, Codex's Responses WebSocket included. Users are named by
e-mail, so each tool must also take the URL-encoded ``@`` in ``HTTPS_PROXY``.

Set besides the onboarding lines, only to keep the tools from calling home (there is no
internet here, and a test must not depend on it):

* Claude Code: ``CLAUDE_CODE_DISABLE_NONESSENTIAL_TRAFFIC=1`` (auto-updater, telemetry, error
  reporting);
* Codex CLI: ``[analytics] enabled = false`` in ``$HOME/.codex/config.toml`` (a file in the fresh
  HOME, no variable);
* aider: ``AIDER_CHECK_UPDATE=false``, ``AIDER_ANALYTICS_DISABLE=true``, and
  ``LITELLM_LOCAL_MODEL_COST_MAP=True`` (litellm reads its bundled price map instead of
  fetching it from GitHub);
* llm: nothing.

Command-line flags are the ordinary non-interactive use of each tool (``--model``; aider's
``--message --no-git --yes-always --no-pretty --no-show-release-notes``; ``codex exec
--skip-git-repo-check``).
"""

from __future__ import annotations

from collections.abc import Iterator
from decimal import Decimal
from pathlib import Path

import pytest

from tests.rig import tools
from tests.rig.gateway import GatewayProcess
from tests.rig.ledger import Ledger
from tests.rig.mock_provider import MockProvider, content_pieces
from tests.rig.workstation import Workstation, assert_row, assert_team_key_only, model_rows

pytestmark = pytest.mark.slow

ANSWER = "".join(content_pieces(5))  # "Hello from the mock provider"
PROMPT = "Say hello"
CLAUDE = "claude-sonnet-4-20250514"
GPT = "gpt-4o-mini"
CAP = "10"  # USD a day: every tool must work for a capped caller
CLAUDE_USER, CODEX_USER, AIDER_USER = "claude.dev@corp.example", "codex.dev@corp.example", "aider.dev@corp.example"

CLAUDE_QUIET = {"CLAUDE_CODE_DISABLE_NONESSENTIAL_TRAFFIC": "1"}
AIDER_QUIET = {"AIDER_CHECK_UPDATE": "false", "AIDER_ANALYTICS_DISABLE": "true",
               "LITELLM_LOCAL_MODEL_COST_MAP": "True"}


@pytest.fixture(scope="module")
def gw(tmp_path_factory: pytest.TempPathFactory, _mock_provider_session: MockProvider) -> Iterator[GatewayProcess]:
    g = GatewayProcess(tmp_path_factory.mktemp("e2e-tools-agents"), _mock_provider_session.url, name="agents")
    g.start()
    yield g
    g.stop()


@pytest.fixture(scope="module")
def ledger(gw: GatewayProcess) -> Iterator[Ledger]:
    led = Ledger.of(gw)
    yield led
    led.close()


@pytest.fixture(autouse=True)
def _attach_gateway_log(request: pytest.FixtureRequest, gw: GatewayProcess) -> None:
    request.node._spendgate_gateways = [gw]  # conftest attaches its log to a failing test's report


def onboard(gw: GatewayProcess, ledger: Ledger, user: str, tmp_path: Path) -> tuple[Workstation, str]:
    key = ledger.key(user, team="tools", cap=CAP)["key"]
    return Workstation.onboarded(gw, user, key, tmp_path / "ws"), key


def assert_spent(ledger: Ledger, user: str) -> Decimal:
    """The user's cap was charged exactly what the audit rows cost, and nothing is left reserved."""
    spent, reserved = ledger.held("user", user)
    total = ledger.spent(user)
    assert reserved == 0 and total > 0
    assert Decimal(spent) / 10**9 == total, (spent, total)
    return total


# --------------------------------------------------------------------------- Claude Code


def test_claude_code(gw: GatewayProcess, ledger: Ledger, mock_provider: MockProvider, tmp_path: Path) -> None:
    claude = tools.require("claude")
    ws, key = onboard(gw, ledger, CLAUDE_USER, tmp_path)
    ws.require("HTTPS_PROXY", "NODE_EXTRA_CA_CERTS", "ANTHROPIC_API_KEY", tool="Claude Code")
    run = ws.run([claude, "-p", PROMPT, "--model", CLAUDE], quiet=CLAUDE_QUIET)
    assert run.returncode == 0 and ANSWER in run.stdout, run

    recs = assert_team_key_only(mock_provider, key)  # its /api/claude_code/* calls too
    messages = [r for r in recs if r.endpoint == "messages" and r.model == CLAUDE]
    assert messages and all(r.stream and r.completed for r in messages), [(r.method, r.path) for r in recs]
    rows = model_rows(ledger, CLAUDE_USER, CLAUDE, len(messages))
    assert len(rows) == len(messages)
    for row, rec in zip(rows, messages):
        assert row["stream"] and row["user_agent"].startswith("claude-cli/")
        assert_row(row, user=CLAUDE_USER, model=CLAUDE, tokens=rec.tokens, provider="anthropic")
    assert {r["provider"] for r in ledger.rows(CLAUDE_USER)} == {"anthropic"}
    assert_spent(ledger, CLAUDE_USER)


# --------------------------------------------------------------------------- Codex CLI


def test_codex_exec(gw: GatewayProcess, ledger: Ledger, mock_provider: MockProvider, tmp_path: Path) -> None:
    codex = tools.require("codex")
    ws, key = onboard(gw, ledger, CODEX_USER, tmp_path)
    ws.require("HTTPS_PROXY", "SSL_CERT_FILE", "OPENAI_API_KEY", tool="Codex CLI")
    (ws.home / ".codex").mkdir()
    (ws.home / ".codex" / "config.toml").write_text("[analytics]\nenabled = false\n")
    project = tmp_path / "project"
    project.mkdir()
    run = ws.run([codex, "exec", "-m", GPT, "--skip-git-repo-check", PROMPT], cwd=project)
    assert run.returncode == 0 and ANSWER in run.stdout, run

    assert_team_key_only(mock_provider, key)
    # Codex's default transport, not its SSE fallback: the gateway meters the WebSocket call by call.
    sessions = mock_provider.find_ws(endpoint="responses_ws")
    assert sessions and not mock_provider.find(endpoint="responses"), (
        "Codex fell back from the Responses WebSocket to SSE", [(r.method, r.path, r.response_status)
                                                                for r in mock_provider.requests], run)
    # Codex opens with a "prewarm" call (generate: false, no output), then the turn: a row each.
    calls = [c for s in sessions for c in s.calls if c.completed]
    assert calls and calls[-1].usage and calls[-1].usage["output_tokens"] > 0, [c.usage for c in calls]
    rows = ledger.settled(CODEX_USER, where=lambda rs: sum(r["model_requested"] == GPT for r in rs) >= len(calls))
    rows = [r for r in rows if r["model_requested"] == GPT]
    assert len(rows) == len(calls)
    for row, call in zip(rows, calls):
        assert call.usage is not None
        assert row["endpoint_kind"] == "responses" and row["stream"]
        assert (row["input_tokens"], row["output_tokens"]) == (call.usage["input_tokens"], call.usage["output_tokens"])
    assert_row(rows[-1], user=CODEX_USER, model=GPT, provider="openai")
    assert_spent(ledger, CODEX_USER)


# --------------------------------------------------------------------------- aider


def test_aider(gw: GatewayProcess, ledger: Ledger, mock_provider: MockProvider, tmp_path: Path) -> None:
    aider = tools.require("aider")
    ws, key = onboard(gw, ledger, AIDER_USER, tmp_path)
    ws.require("HTTPS_PROXY", "SSL_CERT_FILE", "OPENAI_API_KEY", tool="aider")
    project = tmp_path / "project"
    project.mkdir()
    run = ws.run([aider, "--model", GPT, "--message", PROMPT, "--no-git", "--yes-always", "--no-pretty",
                  "--no-show-release-notes"], cwd=project, quiet=AIDER_QUIET, timeout=180)
    # aider exits 0 even when every call failed: the answer and the audit rows are the evidence.
    assert run.returncode == 0 and ANSWER in run.stdout, run
    assert "litellm." not in run.stdout + run.stderr, run  # litellm.APIConnectionError & co

    chats = [r for r in assert_team_key_only(mock_provider, key) if r.endpoint == "chat"]
    assert len(chats) == 1, [(r.method, r.path) for r in mock_provider.requests]
    (row,) = model_rows(ledger, AIDER_USER, GPT)
    assert_row(row, user=AIDER_USER, model=GPT, tokens=chats[0].tokens, provider="openai")
    assert_spent(ledger, AIDER_USER)


# --------------------------------------------------------------------------- llm


@pytest.mark.parametrize("stream", [True, False], ids=["stream", "no-stream"])
def test_llm(gw: GatewayProcess, ledger: Ledger, mock_provider: MockProvider, tmp_path: Path, stream: bool) -> None:
    llm = tools.require("llm")
    user = f"llm.{'stream' if stream else 'plain'}@corp.example"
    ws, key = onboard(gw, ledger, user, tmp_path)
    ws.require("HTTPS_PROXY", "SSL_CERT_FILE", "OPENAI_API_KEY", tool="llm")
    run = ws.run([llm, "-m", GPT, *([] if stream else ["--no-stream"]), PROMPT], timeout=60)
    assert run.returncode == 0 and run.stdout.strip() == ANSWER, run

    (chat,) = assert_team_key_only(mock_provider, key)
    assert chat.endpoint == "chat" and chat.stream is stream
    (row,) = model_rows(ledger, user, GPT)
    assert_row(row, user=user, model=GPT, tokens=chat.tokens, provider="openai")
    assert row["user_agent"].startswith("OpenAI/Python")
    assert_spent(ledger, user)
