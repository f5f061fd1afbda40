"""The `spendgate` CLI as admins use it, as real processes: the config file's directory anchors a
relative SQLite path wherever the command runs; listings piped or saved show full ids and plain
decimal money in every format; caps are removed with `budgets delete` (the global one needs no
name); `--version`; `--since 7d / 24h / today`; a mistyped choice is an error naming the choices;
`doctor` says what it found; and `mitmdump -s addons/spendgate_addon.py` runs the same gateway."""

from __future__ import annotations

import csv
import io
import json
import os
import re
import subprocess
import sys
import time
from collections.abc import Iterator, Mapping
from datetime import datetime, timedelta, timezone
from importlib.metadata import version
from pathlib import Path
from typing import Any

import httpx
import pytest

from tests.rig.gateway import REPO_ROOT, SPENDGATE_BIN, GatewayProcess, Inline, _port_open, free_port, parse_json_output
from tests.rig.mock_provider import MockProvider

CHAT_URL = "https://api.openai.com/v1/chat/completions"
CHAT = {"model": "gpt-4o", "messages": [{"role": "user", "content": "Say hello."}]}
# One thousandth of a dollar per million tokens: a request costs a few hundred-millionths of a dollar,
# which Decimal's str() writes in E-notation (3E-8).
TINY = {"prices": {"overrides": {"openai:gpt-4o": Inline(input=0.001, output=0.001)}}}
E_NOTATION = re.compile(r"(?<![\w.])\d+(\.\d+)?[eE][+-]?\d+(?![\w.])")  # 1E+3, 3e-08; not inside an id
REPRS = ("None", "True", "False", "Decimal(")


def spendgate(*args: str, cwd: Path, env: Mapping[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    """The CLI run from `cwd`, without $SPENDGATE_CONFIG; stdout is a pipe, as in a script."""
    base = {k: v for k, v in os.environ.items() if k != "SPENDGATE_CONFIG"}
    return subprocess.run([str(SPENDGATE_BIN), *args], capture_output=True, text=True, cwd=cwd, timeout=60,
                          env=base | {"COLUMNS": "80"} | dict(env or {}))


@pytest.fixture(scope="module")
def gw(tmp_path_factory: pytest.TempPathFactory, _mock_provider_session: MockProvider) -> Iterator[GatewayProcess]:
    g = GatewayProcess(tmp_path_factory.mktemp("e2e-cli"), _mock_provider_session.url, name="cli", overrides=TINY)
    g.start()
    yield g
    g.stop()


@pytest.fixture(autouse=True)
def _attach_log(request: pytest.FixtureRequest) -> None:
    if "gw" in request.fixturenames:
        request.node._spendgate_gateways = [request.getfixturevalue("gw")]


@pytest.fixture(scope="module")
def keys(gw: GatewayProcess) -> dict[str, dict[str, Any]]:
    """Keys for users with long names, each with one priced request through the gateway."""
    users = ["alexandra.konstantinopoulou@example.com", "bartholomew-the-platform-team-service-account"]
    made = {u: gw.create_key(u, team="platform-engineering-emea", models=["gpt-4o*", "gpt-4.1*"]) for u in users}
    for u, k in made.items():
        with gw.httpx_client(k["key"], user=u) as client:
            assert client.post(CHAT_URL, json=CHAT).status_code == 200
    deadline = time.monotonic() + 10
    while len([r for r in gw.cli_json("audit") if r["user"] in made and r["cost_usd"]]) < len(made):
        assert time.monotonic() < deadline, "audit rows not completed"
        time.sleep(0.1)
    return made


# --------------------------------------------------------------------------- config-relative database


def test_a_relative_sqlite_path_is_relative_to_the_config_file(tmp_path: Path) -> None:
    etc, work, elsewhere = tmp_path / "etc", tmp_path / "work", tmp_path / "elsewhere"
    for d in (etc, work, elsewhere):
        d.mkdir()
    cfg = etc / "spendgate.toml"
    cfg.write_text(f'[database]\nurl = "sqlite:///data/gateway.db"\n[proxy]\nconfdir = "{tmp_path / "ca"}"\n')
    db_file = etc / "data" / "gateway.db"

    refused = spendgate("keys", "list", "--config", str(cfg), cwd=work)
    assert refused.returncode == 3, refused
    assert str(db_file) in refused.stderr and "spendgate db upgrade" in refused.stderr
    assert not db_file.exists() and not list(tmp_path.rglob("*.db")), "a refused command creates no database"

    up = spendgate("db", "upgrade", "--config", "../etc/spendgate.toml", cwd=work)  # a relative --config too
    assert up.returncode == 0, up
    assert db_file.exists()
    assert spendgate("keys", "create", "alice", "--config", str(cfg), cwd=work).returncode == 0
    for cwd, config in ((elsewhere, str(cfg)), (etc, "spendgate.toml"), (tmp_path, "etc/spendgate.toml")):
        listed = spendgate("keys", "list", "--config", config, "--format", "json", cwd=cwd)
        assert listed.returncode == 0, (cwd, listed)
        assert [k["user"] for k in parse_json_output(listed.stdout)] == ["alice"], cwd
    assert sorted(tmp_path.rglob("*.db")) == [db_file], "one database, beside the config file"


# --------------------------------------------------------------------------- full ids, plain money


def test_piped_tables_show_every_id_and_column_in_full(gw: GatewayProcess, keys: dict[str, dict[str, Any]]) -> None:
    table = spendgate("keys", "list", "--config", str(gw.config_path), cwd=gw.workdir)
    assert table.returncode == 0, table
    assert max(len(line) for line in table.stdout.splitlines()) > 80  # wider than the COLUMNS=80 it was told
    assert "…" not in table.stdout
    for user, k in keys.items():
        (line,) = [ln for ln in table.stdout.splitlines() if k["key_id"] in ln]  # one row, one line
        assert user in line and "platform-engineering-emea" in line and "gpt-4o*,gpt-4.1*" in line
    for column in ("key_id", "last_used_at", "expires_at", "capture_content", "capture_reason"):
        assert column in table.stdout
    audit = spendgate("audit", "--config", str(gw.config_path), cwd=gw.workdir)
    for row in gw.cli_json("audit"):
        assert row["id"] in audit.stdout  # request ids are 28 characters: all of them


def test_money_is_plain_decimals_in_every_format(gw: GatewayProcess, keys: dict[str, dict[str, Any]]) -> None:
    said = gw.cli("budgets", "set", "team", "platform-engineering-emea", "--cap", "1e3", "--period", "month")
    assert "$1000 per month" in said.stdout
    gw.cli("budgets", "set", "user", "tiny-cap-user", "--cap", "0.000000001", "--period", "day")
    try:
        outputs = {(command[0], fmt): gw.cli(*command, "--format", fmt).stdout
                   for command in (["budgets", "list"], ["audit"], ["usage", "--by", "user"])
                   for fmt in ("table", "json", "csv") if (command[0], fmt) != ("usage", "table")}
    finally:
        gw.cli("budgets", "delete", "team", "platform-engineering-emea")
        gw.cli("budgets", "delete", "user", "tiny-cap-user")
    for (command, fmt), out in outputs.items():
        assert not E_NOTATION.search(out), (command, fmt, out)
    costs = {r["cost_usd"] for r in parse_json_output(outputs["audit", "json"]) if r["user"] in keys}
    assert costs and all(c.startswith("0.0000000") for c in costs), costs  # far below a millionth of a dollar
    for fmt in ("table", "json", "csv"):
        assert "1000" in outputs["budgets", fmt] and "0.000000001" in outputs["budgets", fmt], fmt
        assert all(c in outputs["audit", fmt] for c in costs), fmt
    caps = {b["name"]: b["cap_usd"] for b in parse_json_output(outputs["budgets", "json"])}
    assert caps["platform-engineering-emea"] == "1000" and caps["tiny-cap-user"] == "0.000000001"
    spent = {r["user"]: r["cost_usd"] for r in parse_json_output(outputs["usage", "json"])}
    assert all(spent[u].startswith("0.0000000") for u in keys), spent


def test_csv_cells_are_values_not_python_reprs(gw: GatewayProcess, keys: dict[str, dict[str, Any]]) -> None:
    gw.cli("budgets", "set", "global", "--cap", "500", "--period", "week")
    try:
        texts = {c: gw.cli(*c.split(), "--format", "csv").stdout
                 for c in ("keys list", "audit", "audit --admin", "usage", "budgets list")}
    finally:
        gw.cli("budgets", "delete", "global")
    for command, text in texts.items():
        rows = list(csv.DictReader(io.StringIO(text)))
        assert rows, (command, text)
        for row in rows:
            for col, cell in row.items():
                assert not any(r in cell for r in REPRS), (command, col, cell)
                assert not cell.startswith(("[", "(")), (command, col, cell)  # no list or tuple reprs either
    mine = [r for r in csv.DictReader(io.StringIO(texts["keys list"])) if r["user"] in keys]
    assert {r["byok"] for r in mine} == {"false"} and {r["models"] for r in mine} == {"gpt-4o*,gpt-4.1*"}
    assert {r["expires_at"] for r in mine} == {""}
    assert {r["stream"] for r in csv.DictReader(io.StringIO(texts["audit"]))} == {"false"}


# --------------------------------------------------------------------------- budgets delete, global without a name


def status_of(gw: GatewayProcess, key: str, user: str) -> int:
    with gw.httpx_client(key, user=user) as client:
        return client.post(CHAT_URL, json=CHAT).status_code


def until_status(gw: GatewayProcess, key: str, user: str, want: int, within: float = 5.0) -> float:
    start = time.monotonic()
    while (got := status_of(gw, key, user)) != want:
        assert time.monotonic() - start < within, f"still {got}, not {want}"
        time.sleep(0.1)
    return time.monotonic() - start


def test_a_global_cap_is_set_and_deleted_without_a_name(gw: GatewayProcess, keys: dict[str, dict[str, Any]]) -> None:
    user, k = next(iter(keys.items()))
    set_ = gw.cli("budgets", "set", "global", "--cap", "0", "--period", "day")
    assert "global" in set_.stdout and "$0 per day" in set_.stdout
    try:
        until_status(gw, k["key"], user, 429)
        assert [b["name"] for b in gw.cli_json("budgets", "list") if b["scope"] == "global"] == ["global"]
    finally:
        deleted = gw.cli("budgets", "delete", "global")
    assert "removed" in deleted.stdout
    assert until_status(gw, k["key"], user, 200) < 2.0  # every gateway drops it at its next registry poll
    again = gw.cli("budgets", "delete", "global", check=False)
    assert again.returncode == 1 and "no cap set for global" in again.stderr
    events = [(e["action"], e["target"]) for e in gw.cli_json("audit", "--admin", "--since", "5m")]
    assert events[:2] == [("budget.delete", "global:global"), ("budget.set", "global:global")]
    old = gw.cli("budgets", "set", "global", "global", "--cap", "7", "--period", "week")  # the old spelling works
    assert "$7 per week" in old.stdout
    gw.cli("budgets", "delete", "global", "global")


@pytest.mark.parametrize("scope", ["user", "team"])
def test_user_and_team_caps_are_deleted_and_recorded(gw: GatewayProcess, scope: str) -> None:
    name = f"deleted-{scope}"
    gw.cli("budgets", "set", scope, name, "--cap", "12.5", "--period", "week", "--actor", "ops-lead")
    assert f"cap removed for {scope} {name}" in gw.cli("budgets", "delete", scope, name, "--actor", "ops-lead").stdout
    (event,) = [e for e in gw.cli_json("audit", "--admin") if e["target"] == f"{scope}:{name}"
                and e["action"] == "budget.delete"]
    assert event["actor"] == "ops-lead" and json.loads(event["before"]) == {"cap_usd": "12.5", "period": "week"}
    missing = gw.cli("budgets", "delete", scope, name, check=False)
    assert missing.returncode == 1 and f"no cap set for {scope} {name}" in missing.stderr
    nameless = gw.cli("budgets", "delete", scope, check=False)
    assert nameless.returncode == 2 and f"budgets delete {scope} NAME" in nameless.stderr


# --------------------------------------------------------------------------- --version, relative times


def test_version(tmp_path: Path) -> None:
    out = spendgate("--version", cwd=tmp_path)
    assert out.returncode == 0 and out.stdout.strip() == f"spendgate {version('spendgate')}"


def test_since_and_until_take_spans_and_today(gw: GatewayProcess, keys: dict[str, dict[str, Any]]) -> None:
    day = datetime.now(timezone.utc).date()
    every = gw.cli_json("audit", "--limit", "1000")
    mine = {r["id"] for r in every if r["user"] in keys}
    assert mine
    for since in ("30m", "1h", "7d"):
        assert mine <= {r["id"] for r in gw.cli_json("audit", "--since", since, "--limit", "1000")}, since
    assert {r["user"] for r in gw.cli_json("usage", "--by", "user", "--since", "24h")} >= set(keys)
    assert not mine & {r["id"] for r in gw.cli_json("audit", "--until", "1h", "--limit", "1000")}
    assert gw.cli_json("usage", "--until", "2w") == []
    today = {r["id"] for r in gw.cli_json("audit", "--since", "today", "--limit", "1000")}
    if datetime.now(timezone.utc).date() == day:  # not across midnight
        assert today == {r["id"] for r in every if datetime.fromisoformat(r["started_at"]).date() == day}
    iso = (datetime.now(timezone.utc) - timedelta(days=1)).date().isoformat()
    assert mine <= {r["id"] for r in gw.cli_json("audit", "--since", iso, "--limit", "1000")}  # ISO dates still work
    bad = gw.cli("audit", "--since", "7 days", check=False)
    assert bad.returncode == 2 and "--since" in bad.stderr and "7d" in bad.stderr


# --------------------------------------------------------------------------- choices


@pytest.mark.parametrize(("args", "allowed"), [
    (["audit", "--outcome", "blocked"], ["completed", "blocked_cap", "blocked_policy", "incomplete"]),
    (["usage", "--by", "users"], ["user", "team", "model", "provider", "day"]),
    (["keys", "list", "--format", "xml"], ["table", "json", "csv"]),
    (["budgets", "set", "user", "al", "--cap", "5", "--period", "monthly"], ["day", "week", "month"]),
    (["keys", "create", "al", "--cap", "5", "--period", "fortnight"], ["day", "week", "month"]),
    (["budgets", "set", "org", "x", "--cap", "5", "--period", "day"], ["user", "team", "global"]),
    (["budgets", "delete", "teams", "x"], ["user", "team", "global"]),
    (["alerts", "list", "--kind", "thresholds"], ["threshold", "cap_blocked", "spike", "shadow_traffic"]),
])
def test_a_mistyped_choice_is_an_error_naming_the_choices(gw: GatewayProcess, args: list[str],
                                                          allowed: list[str]) -> None:
    out = gw.cli(*args, check=False)
    assert out.returncode == 2, out
    assert out.stdout == ""
    for value in allowed:
        assert value in out.stderr, (value, out.stderr)


def test_a_valid_outcome_still_filters(gw: GatewayProcess, keys: dict[str, dict[str, Any]]) -> None:
    rows = gw.cli_json("audit", "--outcome", "completed", "--limit", "1000")
    assert rows and {r["outcome"] for r in rows} == {"completed"}
    assert {r["user"] for r in rows} >= set(keys)


# --------------------------------------------------------------------------- doctor


def test_doctor_names_what_it_found_and_sees_the_running_gateway(gw: GatewayProcess) -> None:
    out = gw.cli("doctor")
    lines = out.stdout.splitlines()
    assert f"OK   database: {gw.db_path} (schema" in out.stdout
    assert "OK   upstream key openai: set from $OPENAI_API_KEY" in lines
    assert "OK   upstream key azure: set from $AZURE_OPENAI_API_KEY" in lines
    assert f"OK   gateway proxy: Spendgate answers on 127.0.0.1:{gw.port}" in lines
    assert f"OK   gateway metrics: Spendgate's metrics on http://127.0.0.1:{gw.metrics_port}/metrics" in lines
    gw.wait_for_log("spendgate-doctor.invalid")  # the gateway logs the probe it refused


def test_doctor_says_which_variable_is_missing_and_that_no_gateway_runs(tmp_path: Path) -> None:
    cfg = tmp_path / "spendgate.toml"
    cfg.write_text(f'[proxy]\nlisten = "127.0.0.1:{free_port()}"\nconfdir = "{tmp_path / "ca"}"\n'
                   f'[metrics]\nlisten = "127.0.0.1:{free_port()}"\n'
                   '[providers.anthropic]\napi_key = "env:TEAM_CLAUDE_KEY"\n')
    out = spendgate("doctor", "--config", str(cfg), cwd=tmp_path, env={"TEAM_CLAUDE_KEY": "", "ANTHROPIC_API_KEY": "x"})
    assert out.returncode == 1, out  # no database: FAIL
    assert "$TEAM_CLAUDE_KEY is not set" in out.stdout and "export TEAM_CLAUDE_KEY" in out.stdout
    assert f"FAIL database: no database file at {tmp_path / 'spendgate.db'}" in out.stdout
    assert "WARN gateway proxy: nothing answers" in out.stdout and "WARN gateway metrics: nothing answers" in out.stdout
    assert not (tmp_path / "spendgate.db").exists()


# --------------------------------------------------------------------------- mitmdump -s


def test_mitmdump_script_runs_the_gateway_at_the_configs_address_and_ca(
        tmp_path: Path, mock_provider: MockProvider) -> None:
    """The README's command, from another directory. mitmdump first listens where its own options
    say; `--listen-port` points that at a free port (8080 may be taken on a test machine) so the test
    can see the script move the proxy to the config's address."""
    g = GatewayProcess(tmp_path / "gw", mock_provider.url, name="mitmdump", overrides=TINY)
    key = g.create_key("dora")["key"]  # the CLI on the same config: the same database
    own = free_port()
    log = open(g.log_path, "wb")
    proc = subprocess.Popen(
        [str(Path(sys.executable).parent / "mitmdump"), "-s", str(REPO_ROOT / "addons" / "spendgate_addon.py"),
         "--set", f"spendgate_config={g.config_path}", "--listen-port", str(own)],
        stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, env=g.env(), cwd=tmp_path,
        start_new_session=True)
    try:
        deadline = time.monotonic() + 60
        while not (_port_open(g.port) and g.ca_path.exists()):
            assert proc.poll() is None, g.log_text()
            assert time.monotonic() < deadline, g.log_text()
            time.sleep(0.1)
        while _port_open(own):  # mitmproxy's own listener is replaced by the config's
            assert time.monotonic() < deadline, g.log_text()
            time.sleep(0.1)
        assert g.cli("ca").stdout.strip() == str(g.ca_path)  # `spendgate ca` (and serve) use the same CA

        with g.httpx_client(None) as anon:  # trusts only the CA in the config's confdir
            refused = anon.get("https://api.openai.com/v1/models")
        assert refused.status_code == 401 and refused.json()["error"]["code"] == "spendgate_no_key"
        assert not mock_provider.requests

        with g.httpx_client(key, user="dora") as client:
            ok = client.post(CHAT_URL, json=CHAT)
        assert ok.status_code == 200 and ok.json()["choices"][0]["message"]["content"]
        (seen,) = mock_provider.requests
        assert seen.header("authorization") == f"Bearer {g.upstream_keys['openai']}"
        assert key not in repr(seen.headers)

        deadline = time.monotonic() + 10
        while not [r for r in g.cli_json("audit") if r["id"] == ok.headers["x-spendgate-request-id"]
                   and r["outcome"] == "completed"]:
            assert time.monotonic() < deadline, g.cli_json("audit")
            time.sleep(0.1)
        (row,) = [r for r in g.cli_json("audit") if r["id"] == ok.headers["x-spendgate-request-id"]]
        assert (row["user"], row["model_requested"], row["status_code"]) == ("dora", "gpt-4o", 200)
        assert row["input_tokens"] > 0 and row["cost_usd"] and not E_NOTATION.search(row["cost_usd"])
        metrics = httpx.get(g.metrics_url, timeout=5, trust_env=False).text
        assert 'spendgate_requests_total{' in metrics and 'user="dora"' in metrics
    finally:
        proc.terminate()
        try:
            proc.wait(15)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(5)
        log.close()
