"""Audit values fit their columns (`spendgate.store.rowfit`): one odd field never costs a row."""

from __future__ import annotations

import dataclasses
from datetime import datetime, timezone
from typing import Any

from spendgate.store.audit import AuditRow
from spendgate.store.models import AuditRecord
from spendgate.store.rowfit import TEXT_LIMIT, RowFitter

FIT = RowFitter(AuditRecord.__table__)  # type: ignore[attr-defined]


def row(**kw: Any) -> AuditRow:
    return AuditRow(**({"id": "sgr_1", "started_at": datetime(2026, 11, 25, tzinfo=timezone.utc), "provider": "openai",
                        "host": "api.openai.com", "method": "POST", "path": "/v1/chat/completions",
                        "endpoint_kind": "chat", "outcome": "completed"} | kw))


def test_a_row_that_fits_is_unchanged() -> None:
    r = row(model_requested="gpt-4o", input_tokens=10, stream=True, latency_ms=1.5)
    before = dataclasses.replace(r)
    assert FIT.fit(r) == set()
    assert r == before


def test_strings_are_cut_to_their_column_and_the_cut_is_named() -> None:
    r = row(model_requested="m" * 5000, user_agent="u" * 400, method="PROPFIND" * 4, path="/" + "p" * 10_000,
            error=None)
    assert FIT.fit(r) == {"method", "model_requested", "path", "user_agent"}  # the caller records it in cut_fields
    assert r.model_requested is not None and r.user_agent is not None
    assert len(r.model_requested) == 200 and len(r.user_agent) == 300 and len(r.method) == 16
    assert len(r.path) == TEXT_LIMIT
    assert r.error is None


def test_nul_bytes_and_lone_surrogates_are_cleaned() -> None:
    r = row(model_requested="gpt\x00-4o", user_agent="ua\ud800x")
    assert FIT.fit(r) == {"model_requested", "user_agent"}
    assert r.model_requested == "gpt-4o"
    assert r.user_agent is not None
    r.user_agent.encode("utf-8")  # encodable now


def test_integers_are_clamped_to_their_column_type() -> None:
    r = row(input_tokens=3 * 10**9, output_tokens=-(3 * 10**9), cost_nusd=10**30, status_code=200)
    assert FIT.fit(r) == {"cost_nusd", "input_tokens", "output_tokens"}
    assert r.input_tokens == 2**31 - 1 and r.output_tokens == -(2**31)
    assert r.cost_nusd == 2**63 - 1 and r.status_code == 200


def test_only_the_names_asked_for_are_fitted() -> None:
    r = row(model_requested="m" * 5000, user_agent="u" * 400)
    assert FIT.fit(r, names=("user_agent", "status_code")) == {"user_agent"}
    assert r.model_requested == "m" * 5000 and r.user_agent == "u" * 300
