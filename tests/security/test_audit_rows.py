"""Every row lands: requests with fields no column can hold (a 5,000-character model name, a NUL,
a lone surrogate, a 10 KB User-Agent) mixed into concurrent good traffic cost no good request
its answer and no request its audit row; cut fields are cut to the column and the row says so.
On SQLite and on PostgreSQL (which refuses NUL and unpaired surrogates in text outright).
"""

from __future__ import annotations

import json
import threading
from collections import Counter
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

import httpx
import pytest

from tests.rig.gateway import GatewayProcess
from tests.rig.hostile import HostileClient, audit_rows, request_id
from tests.rig.leaks import SecretScan
from tests.rig.mock_provider import MockProvider

URL = "https://api.openai.com/v1/chat/completions"
MSGS = [{"role": "user", "content": "hi"}]
LONG_MODEL = "gpt-4o-mini-" + "x" * 5000
THREADS, GOOD_PER_THREAD = 20, 5
REACHED_UPSTREAM = {"completed", "upstream_error", "client_aborted"}


# The mock echoes the requested model in its answer and cannot encode a lone surrogate: it is
# told to report a plain name, so what is tested is the gateway, not the mock.
PLAIN_ANSWER = "ok; model=gpt-4o-mini"


@dataclass(frozen=True)
class Job:
    kind: str
    body: bytes
    user_agent: str = "hostile-suite/1"
    scenario: str = PLAIN_ANSWER  # the mock's x-mock-scenario


def _body(model: str) -> bytes:
    return json.dumps({"model": model, "messages": MSGS}).encode()  # ASCII escapes: NUL, \ud800 stay text


BAD_JOBS = [
    Job("long-model", _body(LONG_MODEL)),
    Job("nul-model", _body("gpt-4o\u0000mini")),
    Job("lone-surrogate-model", _body("gpt-4o-\ud800")),
    Job("huge-user-agent", _body("gpt-4o-mini"), "ua/" + "u" * 10_000),
    # No model reported back: the requested one is all the gateway has to label its metrics with.
    Job("lone-surrogate-model-upstream-500", _body("gpt-4o-\ud800"), scenario="error500"),
]


@pytest.fixture(params=["sqlite", "postgresql"])
def target(request: pytest.FixtureRequest, scan: SecretScan) -> tuple[GatewayProcess, str, str]:
    """(gateway, user, key): the suite's SQLite gateway, or its PostgreSQL one."""
    gw: GatewayProcess = request.getfixturevalue("gw" if request.param == "sqlite" else "gw_pg")
    user = f"rows-{request.param}"
    return gw, user, scan.mint(gw, user)


def test_bad_fields_in_concurrent_traffic_cost_no_request_and_no_row(
        target: tuple[GatewayProcess, str, str], scan: SecretScan, mock_provider: MockProvider) -> None:
    gw, user, key = target
    client = HostileClient(gw, scan.record)
    jobs = [Job("good", _body("gpt-4o-mini")) for _ in range(THREADS * GOOD_PER_THREAD)]
    for i, bad in enumerate(BAD_JOBS * 3):  # spread among the good ones
        jobs.insert(7 * i + 3, bad)
    local = threading.local()
    clients: list[httpx.Client] = []

    def send(job: Job) -> tuple[Job, httpx.Response]:
        if not hasattr(local, "http"):  # one keep-alive client per thread
            local.http = client.httpx(key)
            clients.append(local.http)
        r = local.http.post(URL, content=job.body, headers={"content-type": "application/json",
                                                            "user-agent": job.user_agent,
                                                            "x-mock-scenario": job.scenario})
        scan.record_httpx(r)
        return job, r

    try:
        with ThreadPoolExecutor(THREADS) as pool:
            results = list(pool.map(send, jobs))
    finally:
        for http in clients:
            http.close()

    refused = [(j.kind, r.status_code, r.text[:200]) for j, r in results if j.kind == "good" and r.status_code != 200]
    assert refused == [], f"{len(refused)} good requests refused"
    broken = [(j.kind, r.status_code, r.text[:200]) for j, r in results
              if r.status_code >= 500 and not (j.scenario == "error500" and r.status_code == 500)]
    assert broken == [], "an odd field may be refused, but must not make the gateway fail"

    ids = [request_id(r) for _, r in results]
    assert len(set(ids)) == len(ids)
    rows = audit_rows(gw, ids, user=user, timeout=30)
    assert len(rows) == len(jobs), f"{len(jobs)} requests, {len(rows)} audit rows for {user}"
    reached = [row for row in rows.values() if row["outcome"] in REACHED_UPSTREAM]
    assert len(reached) == len(mock_provider.requests), "every request that reached the upstream has one row"

    by_kind = Counter((j.kind, rows[request_id(r)]["outcome"]) for j, r in results)
    assert by_kind[("good", "completed")] == THREADS * GOOD_PER_THREAD, by_kind
    for job, r in results:
        row = rows[request_id(r)]
        if job.kind == "long-model":
            cut = row["model_requested"]
            assert cut and LONG_MODEL.startswith(cut) and len(cut) < len(LONG_MODEL), cut
            assert "model_requested" in str(row.get("cut_fields") or ""), f"the row must say it was cut: {row}"
        elif job.kind == "huge-user-agent":
            assert "user_agent" in str(row.get("cut_fields") or ""), f"the row must say it was cut: {row}"
        elif job.kind == "good":
            assert not row.get("cut_fields"), row
    # The audit copy is cut, not the request: what went upstream is what the client sent.
    long_sent = [rec for rec in mock_provider.requests if (rec.model or "").startswith("gpt-4o-mini-xxx")]
    assert all(rec.model == LONG_MODEL for rec in long_sent)
    metrics = httpx.get(gw.metrics_url, timeout=5, trust_env=False)
    assert metrics.status_code == 200, "the odd model names must not break /metrics"
