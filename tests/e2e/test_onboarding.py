"""Onboarding a developer's machine against a real `spendgate serve`: the CA fetched from the gateway
without credentials, the setup script run in a separate HOME whose system CAs are a throwaway CA,
and afterwards, with only the files it wrote, a model request governed (audit row, team key at the
mock) while the machine's own intranet TLS server still verifies. Traffic stays on 127.0.0.1."""

from __future__ import annotations

import json
import shutil
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.rig import tools
from tests.rig.devmachine import DevMachine, TlsServer
from tests.rig.gateway import UPSTREAM_KEYS, GatewayProcess
from tests.rig.ledger import Ledger
from tests.rig.mock_provider import MockProvider

CHAT_URL = "https://api.openai.com/v1/chat/completions"
BODY = json.dumps({"model": "gpt-4o-mini", "messages": [{"role": "user", "content": "Say hello"}]})
INTRANET_TEXT = "hello from the intranet"
SHELLS = [pytest.param(s, marks=pytest.mark.skipif(not shutil.which(s), reason=f"{s} is not installed"))
          for s in ("bash", "zsh", "fish")]
TEAM_KEY = f"Bearer {UPSTREAM_KEYS['openai']}"
OPENAI_SDK = ("import openai; print(openai.OpenAI(max_retries=0).chat.completions.create(model=\"gpt-4o-mini\", "
              "messages=[{\"role\": \"user\", \"content\": \"hi\"}]).model_dump_json())")


@pytest.fixture(scope="module")
def gw(tmp_path_factory: pytest.TempPathFactory, _mock_provider_session: MockProvider) -> Iterator[GatewayProcess]:
    g = GatewayProcess(tmp_path_factory.mktemp("e2e-onboarding"), _mock_provider_session.url, name="onboarding")
    g.config["proxy"]["public_url"] = f"http://localhost:{g.port}"  # what the lines must use, not listen
    g.start()
    yield g
    g.stop()


@pytest.fixture(scope="module")
def ledger(gw: GatewayProcess) -> Iterator[Ledger]:
    """Keys minted straight in the store (as `keys create` does; the CLI costs seconds a call)."""
    led = Ledger.of(gw)
    yield led
    led.close()


@pytest.fixture(autouse=True)
def _attach_gateway_log(request: pytest.FixtureRequest, gw: GatewayProcess, mock_provider: MockProvider) -> None:
    request.node._spendgate_gateways = [gw]


@pytest.fixture
def machine(tmp_path: Path) -> DevMachine:
    return DevMachine(tmp_path / "workstation")


@pytest.fixture
def intranet(machine: DevMachine) -> Iterator[TlsServer]:
    with machine.ca.tls_server(INTRANET_TEXT) as server:
        yield server


def curl_model(var: str = "$OPENAI_API_KEY") -> str:
    """curl as the provider's docs show it, from the environment only."""
    return (f"curl -sS --fail-with-body {CHAT_URL} -H \"Authorization: Bearer {var}\" "
            f"-H 'content-type: application/json' -d '{BODY}'")


def assert_governed(ledger: Ledger, mock: MockProvider, user: str, key: str, answers: list[str]) -> None:
    recs = mock.wait_for(len(answers))
    assert len(recs) == len(answers), [(r.method, r.path) for r in recs]
    for rec in recs:
        assert rec.header("authorization") == TEAM_KEY  # the team's key, set by the gateway
        seen = "\n".join(f"{k}: {v}" for k, v in rec.header_list) + rec.body.decode(errors="replace")
        assert key not in seen and key.rsplit("_", 1)[1] not in seen and "spendgate" not in rec.header("authorization")
    for out in answers:
        assert json.loads(out)["choices"][0]["message"]["content"]
    rows = ledger.settled(user, len(answers))
    for row in rows:
        assert (row["user"], row["model_requested"], row["outcome"], row["status_code"]) == (
            user, "gpt-4o-mini", "completed", 200)
        assert row["input_tokens"] > 0 and row["output_tokens"] > 0 and row["cost_usd"] > 0


def test_the_ca_is_served_by_the_gateway_without_credentials(gw: GatewayProcess, machine: DevMachine) -> None:
    for url in (f"http://localhost:{gw.port}/spendgate/ca.pem", f"http://127.0.0.1:{gw.port}/spendgate/ca.pem"):
        cp = machine.shell(f"curl -sS --fail --noproxy '*' {url}", rc=False)
        assert cp.returncode == 0 and cp.stdout == gw.ca_path.read_text(), cp.stderr
        assert "PRIVATE KEY" not in cp.stdout
    preload = machine.shell(f"curl -sS --fail http://localhost:{gw.port}/spendgate/node-proxy.cjs", rc=False)
    assert preload.returncode == 0 and "EnvHttpProxyAgent" in preload.stdout
    # The same port is still no open proxy: a request for another host is refused without credentials.
    other = machine.shell(f"curl -sS -o /dev/null -w '%{{http_code}}' -x http://127.0.0.1:{gw.port} "
                          "http://example.invalid/spendgate/ca.pem", rc=False)
    assert other.stdout == "407"


@pytest.mark.parametrize("shell", SHELLS)
def test_the_setup_script_onboards_a_separate_machine(gw: GatewayProcess, ledger: Ledger,
                                                      mock_provider: MockProvider, machine: DevMachine,
                                                      intranet: TlsServer, shell: str) -> None:
    user = f"ana.{shell}@corp"
    key = ledger.key(user, team="web")["key"]
    # Before: this machine trusts its intranet, and nothing of the gateway.
    before = machine.shell(f"curl -sS --cacert {machine.system_ca} {intranet.url}", rc=False)
    assert before.stdout == INTRANET_TEXT, before.stderr
    assert "HTTPS_PROXY" not in machine.environment(shell=shell)

    machine.setup(gw, user, shell=shell, env={"SPENDGATE_KEY": key})  # the key from the environment, not the script
    bundle = (machine.spendgate_dir / "ca-bundle.pem").read_text()
    assert bundle.count("BEGIN CERTIFICATE") == 2  # this machine's CA and the gateway's: not the gateway host's store
    assert machine.ca.pem in bundle and gw.ca_path.read_text().strip() in bundle

    env = machine.environment(shell=shell)
    assert env["HTTPS_PROXY"] == f"http://ana.{shell}%40corp:{key}@localhost:{gw.port}"
    assert env["SSL_CERT_FILE"] == env["CURL_CA_BUNDLE"] == str(machine.spendgate_dir / "ca-bundle.pem")

    model = machine.shell(curl_model(), shell=shell)
    assert model.returncode == 0, model.stdout + model.stderr
    sdk = machine.shell(f"{sys.executable} -c '{OPENAI_SDK}'", shell=shell)  # the SDK with nothing set in code
    assert sdk.returncode == 0, sdk.stderr
    assert_governed(ledger, mock_provider, user, key, [model.stdout, sdk.stdout])

    # The machine's own TLS server still verifies with the written trust variables (which replace the store)...
    local = machine.shell(f"curl -sS --fail {intranet.url}", shell=shell)
    assert local.stdout == INTRANET_TEXT, local.stderr
    # ...and a certificate neither of the two CAs signed does not.
    stranger = machine.shell(f"curl -sS --fail https://127.0.0.1:{mock_provider.port}/", shell=shell)
    assert stranger.returncode == 60, stranger.stderr


def test_running_the_script_again_keeps_one_rc_block(gw: GatewayProcess, ledger: Ledger, machine: DevMachine) -> None:
    key = ledger.key("rerun@corp")["key"]
    rc = machine.home / ".bashrc"
    rc.write_text("# my own settings\nexport EDITOR=vi\n")
    machine.setup(gw, "rerun@corp", key)
    machine.setup(gw, "rerun@corp", key)
    text = rc.read_text()
    assert text.startswith("# my own settings\nexport EDITOR=vi\n")
    assert text.count("# >>> spendgate >>>") == 1 and text.count("# <<< spendgate <<<") == 1
    assert machine.environment()["EDITOR"] == "vi"


def test_a_ca_that_is_not_the_admins_is_refused(gw: GatewayProcess, ledger: Ledger, machine: DevMachine) -> None:
    key = ledger.key("wary@corp")["key"]
    script = gw.cli("onboard", "wary@corp", "--script", "--key", key).stdout
    forged = script.replace("SG_CA_SHA256='", "SG_CA_SHA256='00", 1)  # as if someone answered for the gateway
    cp = machine.setup(gw, "wary@corp", script=forged, check=False)
    assert cp.returncode != 0 and "SHA-256" in cp.stderr
    assert not (machine.spendgate_dir / "env.sh").exists() and not (machine.home / ".bashrc").exists()
    assert not (machine.spendgate_dir / "ca-bundle.pem").exists()


@pytest.mark.parametrize("shell", [SHELLS[0], SHELLS[2]])  # zsh pastes the bash lines
def test_the_pasted_lines_work_too(gw: GatewayProcess, ledger: Ledger, mock_provider: MockProvider,
                                   machine: DevMachine, intranet: TlsServer, shell: str) -> None:
    """`onboard USER` as printed, pasted into a shell on the other machine (its one-liner builds the bundle)."""
    user = f"paste.{shell}@corp"
    key = ledger.key(user)["key"]
    lines = gw.cli("onboard", user, "--key", key, "--shell", shell).stdout
    cp = machine.shell(lines + "\n" + curl_model() + f"\necho\ncurl -sS --fail {intranet.url}", shell=shell, rc=False,
                       env={"SPENDGATE_SYSTEM_CA": str(machine.system_ca)})
    assert cp.returncode == 0, cp.stdout + cp.stderr
    answer, local = cp.stdout.rsplit("\n", 1)
    assert local == INTRANET_TEXT
    assert_governed(ledger, mock_provider, user, key, [answer])


def test_node_20_fetch_goes_through_the_gateway_with_the_written_lines(gw: GatewayProcess, ledger: Ledger,
                                                                        mock_provider: MockProvider,
                                                                        machine: DevMachine) -> None:
    """Node 20/22 ignore HTTPS_PROXY in fetch(): the preload the script fetched from the gateway fixes that."""
    node = shutil.which("node")
    if node is None:
        pytest.skip("node is not installed")
    try:
        undici = tools.node_modules() / "undici"  # what `npm install --prefix ~/.spendgate undici@7` gives
    except tools.ToolUnavailable as exc:
        pytest.skip(str(exc))
    user = "node@corp"
    key = ledger.key(user)["key"]
    machine.setup(gw, user, key, env={"SPENDGATE_UNDICI": str(undici)})
    client = machine.root / "chat.js"
    client.write_text(
        # Without the preload's dispatcher fetch() would go to the internet: stop before it does.
        "const d = globalThis[Symbol.for('undici.globalDispatcher.1')];\n"
        "if (!d || d.constructor.name !== 'EnvHttpProxyAgent') { console.error('no dispatcher'); process.exit(3); }\n"
        f"fetch({json.dumps(CHAT_URL)}, {{method: 'POST', body: {json.dumps(BODY)}, headers: "
        "{authorization: 'Bearer ' + process.env.OPENAI_API_KEY, 'content-type': 'application/json'}})"
        ".then(r => r.text()).then(t => console.log(t));\n")
    cp = machine.shell(f"node {client}")
    assert cp.returncode == 0 and "SPENDGATE_NO_UNDICI" not in cp.stderr, cp.stderr
    assert_governed(ledger, mock_provider, user, key, [cp.stdout])
