"""The client libraries and curl, real and unmodified, through a real `spendgate serve`.

The Python SDKs (openai, anthropic) and ``requests`` / ``httpx`` (from the project's venv, run as
a developer's script: :mod:`tests.rig.py_clients`), the Node SDKs (openai, @anthropic-ai/sdk)
on the machine's Node, from a project whose ``node_modules`` :mod:`tests.rig.tools` installs into
the cache outside the clone, and curl exactly as the providers' docs show it, over HTTP/1.1 and
HTTP/2. Each runs in a fresh HOME whose whole environment is what pasting
``spendgate onboard USER --key KEY`` into bash makes it (:mod:`tests.rig.workstation`), against
the rig's mock provider, and shows the answer printed, the team's upstream key at the mock and
never the gateway key, and an audit row per call with the user, the model, the tokens the mock
reported and a cost. Users are named by e-mail (``HTTPS_PROXY`` carries the ``@`` URL-encoded).

Nothing is set besides the onboarding lines: none of these clients calls home. Node 20/22 get
the one step the onboarding asks for besides its lines, undici next to the preload it fetched
("npm install --prefix ~/.spendgate undici@7"), linked from the cache.
"""

from __future__ import annotations

import json
import re
import shutil
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.rig import tools
from tests.rig.gateway import GatewayProcess
from tests.rig.ledger import Ledger, Row
from tests.rig.mock_provider import MockProvider, RecordedRequest, content_pieces
from tests.rig.workstation import Workstation, assert_row, assert_team_key_only

pytestmark = pytest.mark.slow

ANSWER = "".join(content_pieces(5))  # "Hello from the mock provider"
GPT = "gpt-4o-mini"
CLAUDE = "claude-sonnet-4-20250514"
RIG = Path(__file__).resolve().parents[1] / "rig"
MODEL_OF = {"openai": GPT, "anthropic": CLAUDE}
NODE_USER = "node.dev@corp.example"


@pytest.fixture(scope="module")
def gw(tmp_path_factory: pytest.TempPathFactory, _mock_provider_session: MockProvider) -> Iterator[GatewayProcess]:
    g = GatewayProcess(tmp_path_factory.mktemp("e2e-tools-clients"), _mock_provider_session.url, name="clients")
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
    key = ledger.key(user, team="tools")["key"]
    return Workstation.onboarded(gw, user, key, tmp_path / "ws"), key


def assert_calls_audited(ledger: Ledger, user: str, recs: list[RecordedRequest]) -> list[Row]:
    """One completed, priced audit row per model call the mock answered, in order, with its tokens."""
    calls = [r for r in recs if r.endpoint in ("chat", "messages")]
    rows = ledger.settled(user, len(calls))
    assert len(rows) == len(calls), [(r["path"], r["outcome"]) for r in rows]
    for row, rec in zip(rows, calls):
        assert_row(row, user=user, model=MODEL_OF[rec.provider], tokens=rec.tokens, provider=rec.provider)
        assert bool(row["stream"]) is rec.stream
    return rows


# --------------------------------------------------------------------------- Python


PY_CLIENTS = {  # client: (variables it reads, provider, answers printed)
    "openai": (("HTTPS_PROXY", "SSL_CERT_FILE", "OPENAI_API_KEY"), "openai", ["openai", "openai stream"]),
    "anthropic": (("HTTPS_PROXY", "SSL_CERT_FILE", "ANTHROPIC_API_KEY"), "anthropic",
                  ["anthropic", "anthropic stream"]),
    "requests": (("HTTPS_PROXY", "REQUESTS_CA_BUNDLE", "OPENAI_API_KEY"), "openai", ["requests"]),
    "httpx": (("HTTPS_PROXY", "SSL_CERT_FILE", "ANTHROPIC_API_KEY"), "anthropic", ["httpx"]),
}


@pytest.mark.parametrize("client", list(PY_CLIENTS))
def test_python_client(gw: GatewayProcess, ledger: Ledger, mock_provider: MockProvider, tmp_path: Path,
                       client: str) -> None:
    needs, provider, printed = PY_CLIENTS[client]
    cp = subprocess.run([sys.executable, "-c", f"import {client}"], capture_output=True, text=True)
    if cp.returncode != 0:
        pytest.skip(f"{client} is not installed in {sys.executable}: {cp.stderr.strip().splitlines()[-1:]}")
    user = f"py.{client}@corp.example"
    ws, key = onboard(gw, ledger, user, tmp_path)
    ws.require(*needs, tool=f"Python {client}")
    run = ws.run([sys.executable, RIG / "py_clients.py", client], timeout=60)
    assert run.returncode == 0 and run.stdout.splitlines() == [f"{p}: {ANSWER}" for p in printed], run

    recs = assert_team_key_only(mock_provider, key)
    assert {r.provider for r in recs} == {provider}
    assert_calls_audited(ledger, user, recs)


# --------------------------------------------------------------------------- Node


def test_node_sdks(gw: GatewayProcess, ledger: Ledger, mock_provider: MockProvider, tmp_path: Path) -> None:
    """openai and @anthropic-ai/sdk, default-constructed, from a project's own node_modules."""
    node = shutil.which("node")
    if not node:
        pytest.skip("node is not installed")
    modules = tools.require("node-sdks")
    major = int(subprocess.run([node, "--version"], capture_output=True, text=True).stdout.strip()
                .lstrip("v").split(".")[0])
    ws, key = onboard(gw, ledger, NODE_USER, tmp_path)
    ws.require("HTTPS_PROXY", "NODE_EXTRA_CA_CERTS", "OPENAI_API_KEY", "ANTHROPIC_API_KEY", tool="the Node SDKs")
    # Node < 24's fetch ignores HTTPS_PROXY: without the onboarding's Node line the SDKs would go
    # straight to the provider, with the gateway key. Checked before anything runs.
    ws.require("NODE_USE_ENV_PROXY" if major >= 24 else "NODE_OPTIONS", tool=f"Node {major}'s fetch")
    if major < 24:
        # The onboarding's one step for Node 20/22 besides the lines: undici next to the preload
        # ("npm install --prefix ~/.spendgate undici@7"), done here from the cache.
        step = re.search(r"npm install --prefix (\S+) (undici@\S+)", ws.onboard_text)
        assert step, f"the onboarding does not say how Node {major} gets undici:\n{ws.onboard_text}"
        prefix = Path(step[1].replace("$HOME", str(ws.home)).replace("~", str(ws.home)))
        (prefix / "node_modules").mkdir(parents=True, exist_ok=True)
        (prefix / "node_modules" / "undici").symlink_to(tools.undici(), target_is_directory=True)
    project = tmp_path / "project"
    project.mkdir()
    (project / "node_modules").symlink_to(modules, target_is_directory=True)
    shutil.copy(RIG / "node_sdks.cjs", project / "app.cjs")
    run = ws.run([node, "app.cjs", "both"], cwd=project, timeout=60)
    assert run.returncode == 0 and run.stdout.splitlines() == [
        f"openai: {ANSWER}", f"openai stream: {ANSWER}", f"anthropic: {ANSWER}"], run
    # node_sdks.cjs prints the TCP peer of every connection fetch made: the gateway, never a provider.
    peers = re.findall(r"^\[fetch\] (\S+) (via \S+|failed: .*)$", run.stderr, re.M)
    assert peers and all(via == f"via 127.0.0.1:{gw.port}" for _, via in peers), run

    recs = assert_team_key_only(mock_provider, key)
    assert [r.provider for r in recs] == ["openai", "openai", "anthropic"]
    assert_calls_audited(ledger, NODE_USER, recs)


# --------------------------------------------------------------------------- curl, as the providers' docs show it


DOCS_CURL = {
    "openai": """curl https://api.openai.com/v1/chat/completions \\
  -H "Content-Type: application/json" \\
  -H "Authorization: Bearer $OPENAI_API_KEY" \\
  -d '{"model": "gpt-4o-mini", "messages": [{"role": "user", "content": "Say hello"}]}'""",
    "anthropic": """curl https://api.anthropic.com/v1/messages \\
     --header "x-api-key: $ANTHROPIC_API_KEY" \\
     --header "anthropic-version: 2023-06-01" \\
     --header "content-type: application/json" \\
     --data '{"model": "claude-sonnet-4-20250514", "max_tokens": 1024,
              "messages": [{"role": "user", "content": "Say hello"}]}'""",
}
HTTP_VERSION = {"http1.1": "1.1", "http2": "2"}
WRITE_OUT = r""" -sS -w '\n%{http_version} %{http_code}\n'"""


def run_docs_curl(ws: Workstation, provider: str, http: str, unset: tuple[str, ...] = ()) -> tuple[str, int, str]:
    """The docs' command with ``--http1.1`` / ``--http2`` (and -sS, and the status written out);
    returns (HTTP version, status, body)."""
    run = ws.run(["bash", "-c", DOCS_CURL[provider] + f" --{http}" + WRITE_OUT], unset=unset, timeout=60)
    assert run.returncode == 0, run  # exit 56 "Connection reset by peer": the gateway reset it
    body, _, last = run.stdout.rstrip("\n").rpartition("\n")
    version, status = last.split()
    return version, int(status), body


@pytest.mark.parametrize("http", list(HTTP_VERSION))
@pytest.mark.parametrize("provider", list(DOCS_CURL))
def test_curl(gw: GatewayProcess, ledger: Ledger, mock_provider: MockProvider, tmp_path: Path, provider: str,
              http: str) -> None:
    user = f"curl.{provider}.{http}@corp.example"
    ws, key = onboard(gw, ledger, user, tmp_path)
    ws.require("HTTPS_PROXY", "CURL_CA_BUNDLE", f"{provider.upper()}_API_KEY", tool="curl")
    version, status, body = run_docs_curl(ws, provider, http)
    assert (version, status) == (HTTP_VERSION[http], 200), body
    answer = json.loads(body)
    text = answer["choices"][0]["message"]["content"] if provider == "openai" else answer["content"][0]["text"]
    assert text == ANSWER

    (rec,) = assert_team_key_only(mock_provider, key)
    assert rec.provider == provider and rec.response_body == body.encode()
    (row,) = assert_calls_audited(ledger, user, [rec])
    assert row["user_agent"].startswith("curl/")


@pytest.mark.parametrize("http", list(HTTP_VERSION))
def test_curl_with_openai_api_key_unset(gw: GatewayProcess, ledger: Ledger, mock_provider: MockProvider,
                                        tmp_path: Path, http: str) -> None:
    """The docs' command with ``$OPENAI_API_KEY`` unset sends ``Authorization: Bearer `` (a trailing
    space; HTTP/2 once had its connection reset for it, silently). The proxy credentials of the
    onboarding lines identify the developer: the call is answered and attributed to them."""
    user = f"curl.unset.{http}@corp.example"
    ws, key = onboard(gw, ledger, user, tmp_path)
    ws.require("HTTPS_PROXY", "CURL_CA_BUNDLE", tool="curl")
    version, status, body = run_docs_curl(ws, "openai", http, unset=("OPENAI_API_KEY",))
    assert (version, status) == (HTTP_VERSION[http], 200), body
    assert json.loads(body)["choices"][0]["message"]["content"] == ANSWER
    (rec,) = assert_team_key_only(mock_provider, key)
    assert_calls_audited(ledger, user, [rec])
