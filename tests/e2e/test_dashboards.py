"""Offline checks of what ops deploy: Grafana provisioning and dashboards, Prometheus config and
alert rules, the compose file, the Dockerfile and the container config.

The dashboards are checked the way Grafana would load them (unique panel ids, datasource
references that resolve to the provisioned uid, valid template variables, panels on the grid),
every PromQL expression is checked to aggregate over instances and to name only metrics the
gateway exposes, and `promtool` checks the rules and the Prometheus config. The same helpers
feed tests/e2e/test_prometheus.py, which runs every expression against a real Prometheus.
"""

from __future__ import annotations

import json
import re
import shutil
import subprocess
from collections.abc import Iterator
from pathlib import Path
from typing import Any
from urllib.parse import parse_qs, urlsplit

import pytest
from ruamel.yaml import YAML

from spendgate.settings import load_settings

REPO = Path(__file__).resolve().parents[2]
GRAFANA = REPO / "grafana"
DASHBOARDS = GRAFANA / "dashboards"
DATASOURCES = GRAFANA / "provisioning" / "datasources" / "prometheus.yaml"
DASHBOARD_PROVIDER = GRAFANA / "provisioning" / "dashboards" / "spendgate.yaml"
PROMETHEUS_DIR = REPO / "deploy" / "prometheus"
PROMETHEUS_YML = PROMETHEUS_DIR / "prometheus.yml"
RULES_YML = PROMETHEUS_DIR / "rules.yml"
GATEWAY_TOML = REPO / "deploy" / "spendgate" / "spendgate.toml"
COMPOSE = REPO / "docker-compose.yml"
DOCKERFILE = REPO / "Dockerfile"

# What /metrics exposes (CONTRACT.md, "Metrics"), as the series names PromQL sees.
COUNTERS = ["spendgate_requests_total", "spendgate_tokens_total", "spendgate_cost_usd_total", "spendgate_blocked_total",
            "spendgate_audit_write_errors_total", "spendgate_alerts_sent_total", "spendgate_alert_failures_total"]
GAUGES = ["spendgate_budget_spent_usd", "spendgate_budget_cap_usd", "spendgate_audit_queue_depth"]
HISTOGRAMS = ["spendgate_request_duration_seconds", "spendgate_time_to_first_token_seconds",
              "spendgate_overhead_seconds"]
EXPOSED = set(COUNTERS) | set(GAUGES) | {h + s for h in HISTOGRAMS for s in ("_bucket", "_sum", "_count")} | {"up"}
# Budget gauges are read from the shared database: every instance reports the same number, so
# summing them over instances would multiply the spend. They must be combined with max/min/avg.
STORE_GAUGES = {"spendgate_budget_spent_usd", "spendgate_budget_cap_usd"}

PANEL_TYPES = {"row", "stat", "timeseries", "bargauge", "table", "piechart", "gauge", "text"}
VARIABLE_TYPES = {"query", "custom", "constant", "interval", "textbox", "adhoc", "datasource"}

# Grafana's built-in variables, and the values tests/e2e/test_prometheus.py gives them.
BUILTINS = {"__rate_interval": "1m", "__interval": "15s", "__range": "1h", "__range_s": "3600",
            "__range_ms": "3600000", "__interval_ms": "15000"}

_yaml = YAML(typ="safe", pure=True)


def load_yaml(path: Path) -> Any:
    return _yaml.load(path.read_text())


# --------------------------------------------------------------------------- dashboard helpers


def load_dashboards() -> dict[str, dict[str, Any]]:
    """{file name: dashboard JSON} for every grafana/dashboards/*.json."""
    return {p.name: json.loads(p.read_text()) for p in sorted(DASHBOARDS.glob("*.json"))}


def all_panels(dash: dict[str, Any]) -> Iterator[dict[str, Any]]:
    """Every panel, including those nested in collapsed rows."""
    for p in dash.get("panels", []):
        yield p
        yield from p.get("panels", [])


def panel_targets(dash: dict[str, Any]) -> Iterator[tuple[dict[str, Any], dict[str, Any]]]:
    for p in all_panels(dash):
        for t in p.get("targets", []):
            yield p, t


_VAR = re.compile(r"\$\{([A-Za-z_][\w.]*)(?::[\w]+)?\}|\$([A-Za-z_]\w*)|\[\[([A-Za-z_]\w*)\]\]")


def variables_used(text: str) -> set[str]:
    return {next(g for g in m.groups() if g) for m in _VAR.finditer(text)}


def substitute(text: str, values: dict[str, str]) -> str:
    """Grafana's interpolation of `$x`, `${x}` and `[[x]]`: built-ins plus `values`."""
    table = {**BUILTINS, **values}

    def repl(m: re.Match[str]) -> str:
        name = next(g for g in m.groups() if g)
        if name not in table:
            raise KeyError(f"no value for ${name} in {text!r}")
        return table[name]

    return _VAR.sub(repl, text)


_LABEL_VALUES = re.compile(r"^label_values\(\s*(?:(?P<selector>[^,]+?)\s*,\s*)?(?P<label>[A-Za-z_]\w*)\s*\)$")


def parse_label_values(query: str) -> tuple[str | None, str]:
    """`label_values(selector, label)` / `label_values(label)` -> (selector or None, label)."""
    m = _LABEL_VALUES.match(query.strip())
    if not m:
        raise ValueError(f"not a label_values() query: {query!r}")
    return m.group("selector"), m.group("label")


# --------------------------------------------------------------------------- a small PromQL lexer

_TOKEN = re.compile(r"""
    (?P<ws>\s+)
  | (?P<string>"(?:\\.|[^"\\])*"|'(?:\\.|[^'\\])*'|`[^`]*`)
  | (?P<matchers>\{[^}]*\})
  | (?P<range>\[[^\]]*\])
  | (?P<duration>\d+(?:ms|s|m|h|d|w|y)\b)
  | (?P<number>(?:\d+\.?\d*|\.\d+)(?:[eE][+-]?\d+)?)
  | (?P<ident>[A-Za-z_:][\w:]*)
  | (?P<op>==|!=|>=|<=|=~|!~|[-+*/%^<>(),])
""", re.VERBOSE)

AGGREGATIONS = {"sum", "min", "max", "avg", "group", "stddev", "stdvar", "count", "count_values", "bottomk", "topk",
                "quantile", "limitk", "limit_ratio"}
KEYWORDS = {"by", "without", "on", "ignoring", "group_left", "group_right", "bool", "offset", "and", "or", "unless",
            "inf", "nan", "atan2"}


def tokens(expr: str) -> list[tuple[str, str]]:
    out, pos = [], 0
    while pos < len(expr):
        m = _TOKEN.match(expr, pos)
        if not m:
            raise ValueError(f"cannot lex {expr[pos:pos + 20]!r} in {expr!r}")
        pos = m.end()
        if m.lastgroup != "ws":
            out.append((m.lastgroup or "", m.group()))
    return out


def metric_uses(expr: str) -> list[tuple[str, list[str]]]:
    """Each metric selector in `expr` with the aggregations enclosing it, innermost last."""
    toks = tokens(expr)
    stack: list[tuple[str, str]] = []  # (kind, name): agg | call | group | paren
    uses: list[tuple[str, list[str]]] = []
    pending_call: str | None = None
    pending_agg: str | None = None
    grouping = False
    for i, (kind, text) in enumerate(toks):
        nxt = toks[i + 1][1] if i + 1 < len(toks) else ""
        if kind == "ident":
            if stack and stack[-1][0] == "group":
                continue  # a label name in by (...) / on (...)
            if text in ("by", "without", "on", "ignoring", "group_left", "group_right"):
                grouping = nxt == "("
            elif text in AGGREGATIONS and nxt in ("by", "without"):
                pending_agg = text
            elif nxt == "(":
                pending_call = text
            elif text not in KEYWORDS:
                uses.append((text, [name for k, name in stack if k == "agg"]))
        elif text == "(":
            if grouping:
                stack.append(("group", ""))
                grouping = False
            elif pending_call is not None:
                stack.append(("agg" if pending_call in AGGREGATIONS else "call", pending_call))
                pending_call = None
            elif pending_agg is not None:
                stack.append(("agg", pending_agg))
                pending_agg = None
            else:
                stack.append(("paren", ""))
        elif text == ")":
            stack.pop()
    assert not stack, f"unbalanced parentheses in {expr!r}"
    return uses


def without_fallback(expr: str) -> str:
    """`X or vector(0)` -> `X`: the fallback only turns "no data" into a 0 on stat panels."""
    return re.sub(r"\s+or\s+vector\(0\)\s*$", "", expr)


def comparison_lhs(expr: str) -> str:
    """The left-most operand of a rule's top-level `and`/`unless` and comparison operators:
    `A > 3 * B and A > 5` -> `A`. (PromQL binds `and` looser than comparisons, so splitting at the
    first top-level `and`/`unless`, then at the first top-level comparison, gives the measured value.)"""
    def split_first(text: str, ops: set[str]) -> str:
        depth = 0
        for kind, tok, start in _positions(text):
            if tok in "([":
                depth += 1
            elif tok in ")]":
                depth -= 1
            elif depth == 0 and tok in ops:
                return text[:start].strip()
        return text.strip()

    return split_first(split_first(expr, {"and", "unless"}), {">", "<", ">=", "<=", "==", "!="})


def _positions(text: str) -> Iterator[tuple[str, str, int]]:
    pos = 0
    while pos < len(text):
        m = _TOKEN.match(text, pos)
        if not m:
            raise ValueError(f"cannot lex {text[pos:pos + 20]!r}")
        if m.lastgroup != "ws":
            yield m.lastgroup or "", m.group(), m.start()
        pos = m.end()


# --------------------------------------------------------------------------- fixtures


@pytest.fixture(scope="module")
def dashboards() -> dict[str, dict[str, Any]]:
    d = load_dashboards()
    assert set(d) >= {"overview.json", "user.json"}, sorted(d)
    return d


@pytest.fixture(scope="module")
def datasource() -> dict[str, Any]:
    doc = load_yaml(DATASOURCES)
    assert doc["apiVersion"] == 1
    (ds,) = doc["datasources"]
    return dict(ds)


@pytest.fixture(scope="module")
def compose() -> dict[str, Any]:
    return dict(load_yaml(COMPOSE))


@pytest.fixture(scope="module")
def prometheus_config() -> dict[str, Any]:
    return dict(load_yaml(PROMETHEUS_YML))


def _job(prometheus_config: dict[str, Any]) -> dict[str, Any]:
    (job,) = [j for j in prometheus_config["scrape_configs"] if j["job_name"] == "spendgate"]
    return dict(job)


# --------------------------------------------------------------------------- the lexer itself


@pytest.mark.parametrize("expr, want", [
    ("sum by (user) (rate(spendgate_cost_usd_total[5m]))", [("spendgate_cost_usd_total", ["sum"])]),
    ("sum(rate(spendgate_cost_usd_total[5m])) by (user)", [("spendgate_cost_usd_total", ["sum"])]),
    ("rate(spendgate_cost_usd_total[5m])", [("spendgate_cost_usd_total", [])]),
    ('histogram_quantile(0.5, sum by (le) (rate(x_bucket{a="b"}[1m])))', [("x_bucket", ["sum"])]),
    ("max by (name) (a) / on (name) group_left () sum(b offset 15m)", [("a", ["max"]), ("b", ["sum"])]),
    ('sum(a) or vector(0)', [("a", ["sum"])]),
    ('up{job="x"} == 0', [("up", [])]),
])
def test_metric_uses_lexer(expr: str, want: list[tuple[str, list[str]]]) -> None:
    assert metric_uses(expr) == want


@pytest.mark.parametrize("expr, lhs", [
    ("sum(rate(a[15m])) * 3600 > 3 * (sum(rate(a[1d] offset 15m)) * 3600 or vector(0)) and sum(rate(a[15m])) > 5",
     "sum(rate(a[15m])) * 3600"),
    ('up{job="spendgate"} == 0', 'up{job="spendgate"}'),
    ("sum by (instance) (increase(e[5m])) > 0", "sum by (instance) (increase(e[5m]))"),
    ("sum(a)", "sum(a)"),
])
def test_comparison_lhs(expr: str, lhs: str) -> None:
    assert comparison_lhs(expr) == lhs


# --------------------------------------------------------------------------- dashboards


def test_dashboard_uids_and_titles_are_unique(dashboards: dict[str, dict[str, Any]]) -> None:
    uids = [d["uid"] for d in dashboards.values()]
    titles = [d["title"] for d in dashboards.values()]
    assert len(set(uids)) == len(uids) and len(set(titles)) == len(titles)
    for d in dashboards.values():
        assert re.fullmatch(r"[A-Za-z0-9_-]{1,40}", d["uid"]), d["uid"]
        assert isinstance(d["schemaVersion"], int) and d["schemaVersion"] >= 36
        assert "id" not in d or d["id"] is None, "provisioned dashboards must not carry a database id"


def test_panel_ids_are_unique_and_panels_sit_on_the_grid(dashboards: dict[str, dict[str, Any]]) -> None:
    for name, d in dashboards.items():
        ids = [p["id"] for p in all_panels(d)]
        assert all(isinstance(i, int) for i in ids), name
        assert len(ids) == len(set(ids)), f"{name}: duplicate panel ids {sorted(ids)}"
        cells: dict[tuple[int, int], int] = {}
        for p in d["panels"]:
            assert p["type"] in PANEL_TYPES, (name, p["type"])
            g = p["gridPos"]
            assert all(isinstance(g[k], int) for k in ("h", "w", "x", "y")), (name, p["id"])
            assert g["w"] >= 1 and g["h"] >= 1 and 0 <= g["x"] and g["x"] + g["w"] <= 24, (name, p["id"], g)
            for x in range(g["x"], g["x"] + g["w"]):
                for y in range(g["y"], g["y"] + g["h"]):
                    assert (x, y) not in cells, f"{name}: panels {cells[(x, y)]} and {p['id']} overlap"
                    cells[(x, y)] = p["id"]


def _datasource_refs(node: Any, path: str = "") -> Iterator[tuple[str, Any]]:
    if isinstance(node, dict):
        for k, v in node.items():
            if k == "datasource":
                yield f"{path}.{k}", v
            yield from _datasource_refs(v, f"{path}.{k}")
    elif isinstance(node, list):
        for i, v in enumerate(node):
            yield from _datasource_refs(v, f"{path}[{i}]")


def test_every_datasource_reference_resolves_to_the_provisioned_one(
        dashboards: dict[str, dict[str, Any]], datasource: dict[str, Any]) -> None:
    assert datasource["type"] == "prometheus" and datasource["uid"] == "spendgate-prometheus"
    for name, d in dashboards.items():
        refs = list(_datasource_refs(d))
        assert refs, name
        for where, ref in refs:
            assert ref == {"type": datasource["type"], "uid": datasource["uid"]}, (name, where, ref)
        for p in all_panels(d):
            if p["type"] == "row":
                assert not p.get("targets"), (name, p["id"])
                continue
            assert p.get("datasource"), (name, p["id"], "panel without a datasource")
            assert p.get("targets"), (name, p["id"], "panel without a query")
            ref_ids = [t["refId"] for t in p["targets"]]
            assert len(ref_ids) == len(set(ref_ids)), (name, p["id"])
            for t in p["targets"]:
                assert t.get("datasource") == p["datasource"] and t.get("expr", "").strip(), (name, p["id"])


def test_template_variables_are_valid_defined_and_used(
        dashboards: dict[str, dict[str, Any]], datasource: dict[str, Any]) -> None:
    for name, d in dashboards.items():
        variables = d.get("templating", {}).get("list", [])
        names = [v["name"] for v in variables]
        assert len(names) == len(set(names)), name
        defined: set[str] = set()
        for v in variables:
            assert re.fullmatch(r"[A-Za-z_]\w*", v["name"]) and not v["name"].startswith("__"), (name, v["name"])
            assert v["type"] in VARIABLE_TYPES, (name, v["name"], v["type"])
            if v["type"] == "query":
                assert v["datasource"] == {"type": datasource["type"], "uid": datasource["uid"]}, (name, v["name"])
                query = v["query"]["query"] if isinstance(v["query"], dict) else v["query"]
                assert v.get("definition", query) == query, (name, v["name"])
                selector, _label = parse_label_values(query)
                # A variable may use only variables defined before it (Grafana resolves them in order).
                assert variables_used(query) <= defined, (name, v["name"], variables_used(query) - defined)
                if selector:
                    for metric, _aggs in metric_uses(substitute(selector, {n: "x" for n in defined})):
                        assert metric in EXPOSED, (name, v["name"], metric)
                assert v.get("refresh") in (1, 2), (name, v["name"], "refresh on load or on time range change")
            defined.add(v["name"])
        texts = [d["title"]]
        for p in all_panels(d):
            texts += [p.get("title", ""), p.get("description", "")]
            texts += [t["expr"] for t in p.get("targets", [])]
            texts += [link["url"] for link in p.get("fieldConfig", {}).get("defaults", {}).get("links", [])]
        used = set().union(*(variables_used(t) for t in texts))
        used_plain = {u for u in used if not u.startswith("__")}
        assert used_plain <= defined, f"{name}: undefined variables {used_plain - defined}"
        assert {u for u in used if u.startswith("__") and "." not in u} <= set(BUILTINS) | {"__url_time_range"}, name
        queried = set().union(*(variables_used(v["query"]["query"] if isinstance(v["query"], dict) else v["query"])
                                for v in variables if v["type"] == "query")) if variables else set()
        assert defined <= used_plain | queried, f"{name}: variables defined but never used {defined - used_plain}"


def test_every_expression_aggregates_over_instances_and_names_exposed_metrics(
        dashboards: dict[str, dict[str, Any]], prometheus_config: dict[str, Any]) -> None:
    job = _job(prometheus_config)["job_name"]
    for name, d in dashboards.items():
        values = {v["name"]: "x" for v in d.get("templating", {}).get("list", [])}
        for p, t in panel_targets(d):
            expr = substitute(t["expr"], values)
            uses = metric_uses(expr)
            assert uses, (name, p["title"], expr)
            for metric, aggs in uses:
                assert metric in EXPOSED, f"{name} / {p['title']}: {metric} is not exposed by the gateway"
                assert aggs, f"{name} / {p['title']}: {metric} is not aggregated over instances: {expr}"
                if metric in STORE_GAUGES:
                    assert aggs[-1] in ("max", "min", "avg"), f"{name} / {p['title']}: {metric} summed: {expr}"
            for m in re.finditer(r"\bup\{([^}]*)\}", expr):
                assert f'job="{job}"' in m.group(1), (name, p["title"], expr)


def test_links_point_at_existing_dashboards_and_variables(dashboards: dict[str, dict[str, Any]]) -> None:
    by_uid = {d["uid"]: d for d in dashboards.values()}
    n = 0
    for name, d in dashboards.items():
        for p in all_panels(d):
            for link in p.get("fieldConfig", {}).get("defaults", {}).get("links", []):
                url = urlsplit(link["url"])
                m = re.match(r"^/d/([^/]+)/", url.path)
                assert m and m.group(1) in by_uid, (name, p["title"], link["url"])
                target_vars = {v["name"] for v in by_uid[m.group(1)]["templating"]["list"]}
                for q in parse_qs(url.query):
                    if q.startswith("var-"):
                        assert q[4:] in target_vars, (name, p["title"], q)
                n += 1
    assert n, "the overview links users to their drill-down"


def _exprs(d: dict[str, Any]) -> list[tuple[dict[str, Any], str]]:
    return [(p, t["expr"]) for p, t in panel_targets(d)]


def test_overview_has_the_panels_ops_asked_for(dashboards: dict[str, dict[str, Any]]) -> None:
    d = dashboards["overview.json"]
    exprs = _exprs(d)

    def has(pred: Any) -> bool:
        return any(pred(p, e) for p, e in exprs)

    for period in ("now/d", "now/M"):  # spend today and this month, in total and by each label
        assert has(lambda p, e: p.get("timeFrom") == period and e.startswith("sum(increase(spendgate_cost_usd_total"))
        for label in ("user", "team", "model", "provider"):
            by = f"sum by ({label}) (increase(spendgate_cost_usd_total"
            assert has(lambda p, e: p.get("timeFrom") == period and by in e), (period, label)
    assert has(lambda p, e: "sum by (kind)" in e and "spendgate_tokens_total" in e)
    assert has(lambda p, e: "sum by (outcome)" in e and "spendgate_requests_total" in e)
    assert has(lambda p, e: "spendgate_blocked_total" in e and "by (reason)" in e)
    for h in ("spendgate_request_duration_seconds", "spendgate_time_to_first_token_seconds"):
        for q in ("0.5", "0.95"):
            assert has(lambda p, e: e.startswith(f"histogram_quantile({q}, sum by (le") and f"{h}_bucket" in e), (h, q)
    (budget,) = [p for p in all_panels(d) if p["type"] == "table"]
    pct = [t for t in budget["targets"] if "/" in t["expr"]]
    assert len(pct) == 1
    assert pct[0]["expr"].startswith("100 * max by (scope, name, period) (spendgate_budget_spent_usd)")
    assert all(t.get("format") == "table" and t.get("instant") for t in budget["targets"])
    renamed = budget["transformations"][1]["options"]["renameByName"]
    assert renamed[f"Value #{pct[0]['refId']}"] == "% of cap"


def test_user_dashboard_is_a_drill_down_on_user(dashboards: dict[str, dict[str, Any]]) -> None:
    d = dashboards["user.json"]
    (user_var,) = [v for v in d["templating"]["list"] if v["name"] == "user"]
    assert parse_label_values(user_var["query"]["query"]) == ("spendgate_requests_total", "user")
    assert not user_var["multi"] and not user_var["includeAll"]  # `user="$user"` needs exactly one value
    for p, e in _exprs(d):
        if "spendgate_budget" not in e:
            selectors = re.findall(r"spendgate_\w+\{[^}]*\}|spendgate_\w+(?![\w{])", e)
            assert selectors and all('user="$user"' in sel for sel in selectors), (p["title"], e)


# --------------------------------------------------------------------------- provisioning and deployment


def test_datasource_provisioning_matches_compose_and_prometheus(
        datasource: dict[str, Any], compose: dict[str, Any], prometheus_config: dict[str, Any]) -> None:
    assert datasource["access"] == "proxy" and datasource.get("isDefault") is True
    url = urlsplit(datasource["url"])
    assert url.hostname in compose["services"], f"{url.hostname} is not a compose service"
    assert url.port == 9090
    assert datasource["jsonData"]["timeInterval"] == prometheus_config["global"]["scrape_interval"], \
        "Grafana's $__rate_interval needs the scrape interval"


def _mounts(service: dict[str, Any]) -> dict[str, str]:
    """{container path: host path or volume name} of a compose service's short-syntax volumes."""
    out = {}
    for v in service.get("volumes", []):
        src, dst, *_ = v.split(":")
        out[dst] = src
    return out


def test_dashboard_provider_loads_the_repo_dashboards(compose: dict[str, Any]) -> None:
    doc = load_yaml(DASHBOARD_PROVIDER)
    assert doc["apiVersion"] == 1
    (prov,) = doc["providers"]
    assert prov["type"] == "file"
    grafana = compose["services"]["grafana"]
    mounts = _mounts(grafana)
    assert mounts[prov["options"]["path"]] == "./grafana/dashboards"
    assert mounts["/etc/grafana/provisioning"] == "./grafana/provisioning"
    home = grafana["environment"]["GF_DASHBOARDS_DEFAULT_HOME_DASHBOARD_PATH"]
    assert home.startswith(prov["options"]["path"] + "/")
    assert (DASHBOARDS / home.rsplit("/", 1)[1]).is_file()


def test_compose_wires_gateway_postgres_prometheus_grafana(compose: dict[str, Any]) -> None:
    services = compose["services"]
    assert {"gateway", "postgres", "prometheus", "grafana"} <= set(services)
    gw, pg, prom = services["gateway"], services["postgres"], services["prometheus"]
    # Every bind mount exists in the repo; every named volume is declared.
    for name, svc in services.items():
        for dst, src in _mounts(svc).items():
            if src.startswith("."):
                assert (REPO / src).exists(), (name, src)
            else:
                assert src in compose["volumes"], (name, src)
    # The gateway reads the mounted config and reaches PostgreSQL with its credentials.
    env = gw["environment"]
    assert _mounts(gw)[env["SPENDGATE_CONFIG"]] == "./deploy/spendgate/spendgate.toml"
    db = urlsplit(env["SPENDGATE_DATABASE_URL"].replace("${POSTGRES_PASSWORD:-spendgate}", "spendgate"))
    assert db.scheme == "postgresql+psycopg" and db.hostname == "postgres" and db.port == 5432
    assert (db.username, db.path.lstrip("/")) == (pg["environment"]["POSTGRES_USER"], pg["environment"]["POSTGRES_DB"])
    assert db.password == pg["environment"]["POSTGRES_PASSWORD"].replace("${POSTGRES_PASSWORD:-spendgate}", "spendgate")
    # The schema and CA are made once before the gateway starts; PostgreSQL must be healthy first.
    assert gw["depends_on"]["init"]["condition"] == "service_completed_successfully"
    assert services["init"]["depends_on"]["postgres"]["condition"] == "service_healthy"
    # Prometheus reads the repo's config and rules; its retention covers "this month".
    args = prom["command"]
    config_file = next(a.split("=", 1)[1] for a in args if a.startswith("--config.file="))
    assert _mounts(prom)[config_file.rsplit("/", 1)[0]] == "./deploy/prometheus"
    retention = next(a.split("=", 1)[1] for a in args if a.startswith("--storage.tsdb.retention.time="))
    assert int(retention.rstrip("d")) > 31
    # The proxy is published; /metrics is not (Prometheus reaches it on the compose network).
    assert any(str(p).endswith(":8080") for p in gw["ports"])
    assert not any(":9464" in str(p) for p in gw.get("ports", []))


def test_gateway_container_config_agrees_with_prometheus_and_dockerfile(
        compose: dict[str, Any], prometheus_config: dict[str, Any]) -> None:
    env = {k: str(v) for k, v in compose["services"]["gateway"]["environment"].items()}
    env["SPENDGATE_DATABASE_URL"] = "postgresql+psycopg://spendgate:pw@postgres:5432/spendgate"
    settings = load_settings(GATEWAY_TOML, environ=env)
    assert settings.database.url == env["SPENDGATE_DATABASE_URL"]
    assert settings.metrics.listen.host == "0.0.0.0" and settings.proxy.listen.host == "0.0.0.0"
    job = _job(prometheus_config)
    (sd,) = job["dns_sd_configs"]
    assert sd["names"] == ["gateway"] and sd["port"] == settings.metrics.listen.port
    assert job.get("metrics_path", "/metrics") == "/metrics"
    # The CA lives on the shared volume, so every instance presents the same one.
    assert _mounts(compose["services"]["gateway"])[str(settings.proxy.confdir)] == "gateway-ca"
    docker = DOCKERFILE.read_text()
    exposed = {int(p) for line in re.findall(r"^EXPOSE\s+(.+)$", docker, re.M) for p in line.split()}
    assert exposed == {settings.proxy.listen.port, settings.metrics.listen.port}
    assert str(settings.proxy.confdir) in docker, "the image creates the CA directory for the volume"
    for src in re.findall(r"^COPY\s+(\S+)\s+\S+$", docker, re.M):
        assert (REPO / src).exists(), src
    assert re.search(r'^ENTRYPOINT \["spendgate"\]$', docker, re.M) and re.search(r'^CMD \["serve"\]$', docker, re.M)


# --------------------------------------------------------------------------- alert rules


def test_rules_cover_spike_audit_errors_and_gateway_down(prometheus_config: dict[str, Any]) -> None:
    doc = load_yaml(RULES_YML)
    rules = [r for g in doc["groups"] for r in g["rules"]]
    names = {r["alert"] for r in rules}
    assert {"SpendgateSpendRateSpike", "SpendgateAuditWriteErrors", "SpendgateGatewayDown"} <= names
    assert len(names) == len(rules)
    job = _job(prometheus_config)["job_name"]
    for r in rules:
        assert r["labels"]["severity"] in ("warning", "critical") and r["annotations"]["summary"], r["alert"]
        for metric, _ in metric_uses(r["expr"]):
            assert metric in EXPOSED, (r["alert"], metric)
    down = next(r for r in rules if r["alert"] == "SpendgateGatewayDown")
    assert down["expr"].strip() == f'up{{job="{job}"}} == 0'
    expr = {r["alert"]: r["expr"] for r in rules}
    assert "spendgate_audit_write_errors_total" in expr["SpendgateAuditWriteErrors"]
    assert "spendgate_cost_usd_total" in expr["SpendgateSpendRateSpike"]
    assert prometheus_config["rule_files"] == [RULES_YML.name]


def _promtool() -> str:
    tool = shutil.which("promtool") or ("/usr/bin/promtool" if Path("/usr/bin/promtool").exists() else None)
    if tool is None:
        pytest.skip("promtool not found: install the Debian package `prometheus` (.ci/run does)")
    return tool


def test_promtool_check_rules() -> None:
    cp = subprocess.run([_promtool(), "check", "rules", str(RULES_YML)], capture_output=True, text=True, timeout=60)
    assert cp.returncode == 0, cp.stdout + cp.stderr
    assert "SUCCESS" in cp.stdout + cp.stderr


def test_promtool_check_config() -> None:
    """The config as compose mounts it (rule_files resolved next to it)."""
    cp = subprocess.run([_promtool(), "check", "config", PROMETHEUS_YML.name], capture_output=True, text=True,
                        timeout=60, cwd=PROMETHEUS_DIR)
    assert cp.returncode == 0, cp.stdout + cp.stderr
