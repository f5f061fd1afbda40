"""A real Prometheus server scrapes real gateways; every dashboard and alert-rule expression runs.

Prometheus is the Debian package's binary (`apt-get install prometheus`; .ci/run installs it),
started on a free loopback port with a temporary config: scrape interval 1 s, the `spendgate`
job of deploy/prometheus/prometheus.yml pointed at the test gateways' metrics ports, and
deploy/prometheus/rules.yml as its rule file. Two gateway instances share one PostgreSQL database
when one answers on 127.0.0.1:5432 (a single instance on SQLite otherwise), so "panels sum over
instances" is checked against the audit log's truth.

Traffic runs in two rounds with scrapes in between, so `rate()` and `increase()` have samples on
both sides of an increment. Then every PromQL expression of every panel of every dashboard is
sent to /api/v1/query with Grafana's variables filled in (`$user` from Prometheus' label values,
`$__rate_interval` = 1m, `$__range` = 1h) and must return status success and a non-empty result.

Alert rules are conditions: a healthy system legitimately returns nothing for `up == 0`. Each
rule's full expression must run without error; when its result is empty, the measured side
(the left-most operand of its top-level `and` / comparison, see `comparison_lhs`) must be
non-empty, which proves the metric names and selectors match what the gateways expose. The
gateway-down rule is then made true for real by stopping an instance.
"""

from __future__ import annotations

import json
import math
import shutil
import subprocess
import time
from collections import Counter
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from decimal import Decimal
from pathlib import Path
from typing import Any

import httpx
import pytest

from tests.e2e.test_dashboards import (
    PROMETHEUS_YML,
    RULES_YML,
    comparison_lhs,
    load_dashboards,
    load_yaml,
    panel_targets,
    parse_label_values,
    substitute,
    without_fallback,
)
from tests.e2e.test_metrics import create_fleet, drive_mix, mistral_unreachable_override, wait_settled
from tests.rig.gateway import GatewayProcess, free_port
from tests.rig.mock_provider import MockProvider
from tests.rig.pg import throwaway_database

# The drill-down is checked for a user with a cap, a team, spend, tokens and blocks.
PREFERRED = {"user": "bob"}
# No Slack alert is sent in this test, so this counter has no series: its stat panel shows the
# `or vector(0)` fallback, and only the fallback.
NO_SERIES_IN_TEST = {"spendgate_alerts_sent_total"}


def _prometheus_binary() -> str:
    for cand in (shutil.which("prometheus"), "/usr/bin/prometheus"):
        if cand and Path(cand).is_file():
            return cand
    pytest.skip("the prometheus binary is not installed (Debian package `prometheus`; .ci/run installs it "
                "with apt-get when it can)")


# --------------------------------------------------------------------------- Prometheus


class Prometheus:
    def __init__(self, binary: str, workdir: Path, targets: list[str], job: dict[str, Any]) -> None:
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.workdir = workdir
        config = {
            "global": {"scrape_interval": "1s", "evaluation_interval": "1s", "scrape_timeout": "1s"},
            "rule_files": [str(RULES_YML)],
            "scrape_configs": [{"job_name": job["job_name"], "metrics_path": job.get("metrics_path", "/metrics"),
                                "static_configs": [{"targets": targets}]}],
        }
        self.config_path = workdir / "prometheus.yml"
        self.config_path.write_text(json.dumps(config, indent=2))  # JSON is YAML
        self.log_path = workdir / "prometheus.log"
        self._log = open(self.log_path, "wb")
        self.proc = subprocess.Popen(
            [binary, f"--config.file={self.config_path}", f"--storage.tsdb.path={workdir / 'data'}",
             f"--web.listen-address=127.0.0.1:{self.port}", "--log.level=warn"],
            stdout=self._log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, cwd=workdir,
        )
        self.http = httpx.Client(base_url=self.url, trust_env=False, timeout=10)
        deadline = time.monotonic() + 30
        while True:
            if self.proc.poll() is not None:
                raise RuntimeError(f"prometheus exited with {self.proc.returncode}:\n{self.log()}")
            try:
                if self.http.get("/-/ready").status_code == 200:
                    break
            except httpx.TransportError:
                pass
            if time.monotonic() > deadline:
                raise RuntimeError(f"prometheus not ready after 30 s:\n{self.log()}")
            time.sleep(0.1)

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")[-4000:]

    def query(self, expr: str) -> dict[str, Any]:
        """/api/v1/query at now: the whole JSON answer (status, data or error)."""
        r = self.http.post("/api/v1/query", data={"query": expr})
        body = r.json()
        assert isinstance(body, dict), body
        return body

    def vector(self, expr: str) -> list[dict[str, Any]]:
        body = self.query(expr)
        assert body["status"] == "success", (expr, body)
        result = body["data"]["result"]
        return result if body["data"]["resultType"] == "vector" else [{"metric": {}, "value": result}]

    def label_values(self, label: str, selector: str | None) -> list[str]:
        params = {"match[]": selector} if selector else {}
        body = self.http.get(f"/api/v1/label/{label}/values", params=params).json()
        assert body["status"] == "success", body
        return list(body["data"])

    def wait_for(self, what: str, pred: Any, timeout: float = 20.0) -> Any:
        deadline = time.monotonic() + timeout
        while True:
            got = pred()
            if got:
                return got
            if time.monotonic() > deadline:
                raise AssertionError(f"Prometheus: {what} not true after {timeout}s\n{self.log()}")
            time.sleep(0.2)

    def stop(self) -> None:
        self.http.close()
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(5)
        self._log.close()


def _value(sample: dict[str, Any]) -> float:
    return float(sample["value"][1])


# --------------------------------------------------------------------------- fixtures


class Setup:
    def __init__(self, prom: Prometheus, gws: list[GatewayProcess], rows: list[dict[str, Any]]) -> None:
        self.prom, self.gws, self.rows = prom, gws, rows


@pytest.fixture(scope="module")
def setup(tmp_path_factory: pytest.TempPathFactory, _mock_provider_session: MockProvider) -> Iterator[Setup]:
    binary = _prometheus_binary()
    job = next(j for j in load_yaml(PROMETHEUS_YML)["scrape_configs"] if j["job_name"] == "spendgate")
    db = throwaway_database()  # None: no PostgreSQL, one instance on SQLite instead
    db_url = db.__enter__()
    gws: list[GatewayProcess] = []
    prom: Prometheus | None = None
    try:
        for i in range(2 if db_url else 1):
            gws.append(GatewayProcess(tmp_path_factory.mktemp(f"gw-prom{i}"), _mock_provider_session.url,
                                      db_url=db_url, name=f"prom{i}", overrides=mistral_unreachable_override()))
        gws[0].cli("db", "upgrade")  # the schema once, then the instances start side by side
        with ThreadPoolExecutor(len(gws)) as pool:
            list(pool.map(GatewayProcess.start, gws))
        # Prometheus applies its targets ~5 s after start: let that overlap with the CLI work.
        prom = Prometheus(binary, tmp_path_factory.mktemp("prometheus"), [f"127.0.0.1:{g.metrics_port}" for g in gws],
                          job)
        keys = create_fleet(gws[0])
        sent = sum(drive_mix(g, keys, hang_up=False) for g in gws)
        # A scrape of the first round before the second: rate() and increase() then span increments.
        prom.wait_for("a scrape of the first round", lambda: (v := prom.vector("sum(spendgate_requests_total)"))
                      and _value(v[0]) == sent)
        sent += sum(drive_mix(g, keys, hang_up=False) for g in gws)
        rows = wait_settled(gws, sent)
        prom.wait_for("a scrape of the second round", lambda: (v := prom.vector("sum(spendgate_requests_total)"))
                      and _value(v[0]) == len(rows))
        yield Setup(prom, gws, rows)
    finally:
        if prom is not None:
            prom.stop()
        for g in gws:
            g.stop()
        db.__exit__(None, None, None)


@pytest.fixture(autouse=True)
def _attach_log(request: pytest.FixtureRequest, setup: Setup) -> None:
    request.node._spendgate_gateways = setup.gws


# --------------------------------------------------------------------------- tests


def test_prometheus_sums_over_instances_equal_the_audit_log(setup: Setup) -> None:
    prom, rows = setup.prom, setup.rows
    up = prom.vector('up{job="spendgate"}')
    assert sorted(s["metric"]["instance"] for s in up) == sorted(f"127.0.0.1:{g.metrics_port}" for g in setup.gws)
    assert all(_value(s) == 1 for s in up)
    if len(setup.gws) > 1:  # both instances served traffic: each one's counters are only a part
        per_instance = prom.vector("sum by (instance) (spendgate_requests_total)")
        assert len(per_instance) == 2 and all(0 < _value(s) < len(rows) for s in per_instance)
    by_user = {s["metric"]["user"]: _value(s) for s in prom.vector("sum by (user) (spendgate_requests_total)")}
    assert by_user == {u or "unknown": float(n) for u, n in Counter(r["user"] for r in rows).items()}
    (cost,) = prom.vector("sum(spendgate_cost_usd_total)")
    want = sum((Decimal(r["cost_usd"]) for r in rows if r["cost_usd"] is not None), Decimal(0))
    assert math.isclose(_value(cost), float(want), rel_tol=1e-9)
    (tokens,) = prom.vector('sum(spendgate_tokens_total{kind="output"})')
    assert _value(tokens) == sum(r["output_tokens"] or 0 for r in rows)
    # Budget gauges: every instance reports the store's one truth, so max (not sum) is the spend.
    # Settlement is asynchronous and the collector caches the store for a second: converge.
    bob = sum((Decimal(r["cost_usd"]) for r in rows if r["user"] == "bob" and r["cost_usd"]), Decimal(0))

    def budgets() -> dict[tuple[str, str], float]:
        got = {(s["metric"]["scope"], s["metric"]["name"]): _value(s)
               for s in prom.vector("max by (scope, name) (spendgate_budget_spent_usd)")}
        ok = math.isclose(got.get(("user", "bob"), -1), float(bob), rel_tol=1e-9) and \
            math.isclose(got.get(("global", "global"), -1), float(want), rel_tol=1e-9)
        return got if ok else {}

    spent = prom.wait_for(f"budget gauges = audit (bob {bob}, global {want})", budgets, timeout=10)
    assert spent[("team", "blue")] == spent[("user", "bob")]  # bob is team blue's only member


def _resolve_variables(prom: Prometheus, dash: dict[str, Any]) -> dict[str, str]:
    """Grafana's variable resolution, in order: label_values() through Prometheus' label API."""
    values: dict[str, str] = {}
    for v in dash.get("templating", {}).get("list", []):
        assert v["type"] == "query", v["name"]
        selector, label = parse_label_values(v["query"]["query"])
        options = prom.label_values(label, substitute(selector, values) if selector else None)
        assert options, f"variable ${v['name']} has no values: {v['query']['query']}"
        want = PREFERRED.get(v["name"])
        if want is not None:
            assert want in options, (v["name"], options)
        values[v["name"]] = want if want is not None else sorted(options)[0]
    return values


def test_template_variables_resolve_through_prometheus(setup: Setup) -> None:
    user = load_dashboards()["user.json"]
    assert _resolve_variables(setup.prom, user) == {"user": "bob", "team": "blue"}
    assert set(setup.prom.label_values("user", "spendgate_requests_total")) == {
        r["user"] or "unknown" for r in setup.rows}


def test_every_dashboard_expression_returns_data(setup: Setup) -> None:
    prom = setup.prom
    problems: list[str] = []
    checked = 0
    for file, dash in load_dashboards().items():
        values = _resolve_variables(prom, dash)
        for panel, target in panel_targets(dash):
            expr = substitute(target["expr"], values)
            where = f"{file} / {panel['title']} / {target['refId']}: {expr}"
            body = prom.query(expr)
            checked += 1
            if body["status"] != "success" or body.get("warnings"):
                problems.append(f"{where}\n    -> {body.get('error') or body.get('warnings')}")
                continue
            result = prom.vector(expr)
            if not result:
                problems.append(f"{where}\n    -> empty result")
                continue
            if not any(math.isfinite(_value(s)) for s in result):
                problems.append(f"{where}\n    -> no finite value: {result}")
            bare = without_fallback(expr)
            if bare != expr and not any(m in bare for m in NO_SERIES_IN_TEST) and not prom.vector(bare):
                problems.append(f"{where}\n    -> data only from the `or vector(0)` fallback")
    assert checked >= 40
    assert not problems, "\n".join(problems)


def test_every_alert_rule_is_loaded_and_its_expression_returns_data(setup: Setup) -> None:
    prom = setup.prom
    rules = [r for g in load_yaml(RULES_YML)["groups"] for r in g["rules"]]
    problems: list[str] = []
    for r in rules:
        body = prom.query(r["expr"])
        if body["status"] != "success":
            problems.append(f"{r['alert']}: {body.get('error')}")
            continue
        if body["data"]["result"]:
            continue  # the condition is true right now: non-empty as it stands
        lhs = comparison_lhs(r["expr"])
        assert lhs != r["expr"].strip(), f"{r['alert']}: empty result and no comparison to strip"
        if not prom.vector(lhs):
            problems.append(f"{r['alert']}: neither the rule nor its measured side `{lhs}` returns data")
    assert not problems, "\n".join(problems)

    def loaded() -> list[dict[str, Any]]:
        body = prom.http.get("/api/v1/rules").json()
        got = [x for g in body["data"]["groups"] for x in g["rules"]]
        return got if len(got) == len(rules) and all(x.get("lastEvaluation", "").startswith("20") for x in got) \
            else []

    evaluated = prom.wait_for("every rule evaluated", loaded, timeout=10)
    assert {x["name"] for x in evaluated} == {r["alert"] for r in rules}
    assert all(x["health"] == "ok" and not x.get("lastError") for x in evaluated), evaluated


def test_gateway_down_rule_fires_when_an_instance_stops(setup: Setup) -> None:
    """Runs last: it stops an instance."""
    prom = setup.prom
    rules = [r for g in load_yaml(RULES_YML)["groups"] for r in g["rules"]]
    (down_rule,) = [r for r in rules if r["alert"] == "SpendgateGatewayDown"]
    assert prom.vector(down_rule["expr"]) == []
    victim = setup.gws[-1]
    victim.stop()
    fired = prom.wait_for("up == 0 for the stopped instance", lambda: prom.vector(down_rule["expr"]), timeout=15)
    assert [s["metric"]["instance"] for s in fired] == [f"127.0.0.1:{victim.metrics_port}"]
    alerts = prom.wait_for("SpendgateGatewayDown pending", lambda: [
        a for a in prom.http.get("/api/v1/alerts").json()["data"]["alerts"]
        if a["labels"]["alertname"] == "SpendgateGatewayDown"], timeout=10)
    assert alerts[0]["state"] in ("pending", "firing") and alerts[0]["labels"]["severity"] == "critical"
