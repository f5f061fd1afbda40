"""Audit values fit their columns (`spendgate.rowfit`): one odd field never costs a row."""

from __future__ import annotations

from spendgate.models import AuditRecord
from spendgate.rowfit import TEXT_LIMIT, RowFitter

FIT = RowFitter(AuditRecord.__table__)  # type: ignore[attr-defined]


def test_a_row_that_fits_is_unchanged() -> None:
    row = {"id": "sgr_1", "model_requested": "gpt-4o", "input_tokens": 10, "stream": True, "latency_ms": 1.5}
    assert FIT.fit(dict(row)) == row


def test_strings_are_cut_to_their_column_and_the_row_says_so() -> None:
    row = FIT.fit({"model_requested": "m" * 5000, "user_agent": "u" * 400, "method": "PROPFIND" * 4,
                   "path": "/" + "p" * 10_000, "error": None})
    assert len(row["model_requested"]) == 200 and len(row["user_agent"]) == 300 and len(row["method"]) == 16
    assert len(row["path"]) == TEXT_LIMIT
    assert row["cut_fields"] == "method,model_requested,path,user_agent"


def test_nul_bytes_and_lone_surrogates_are_cleaned() -> None:
    row = FIT.fit({"model_requested": "gpt\x00-4o", "user_agent": "ua\ud800x"})
    assert row["model_requested"] == "gpt-4o"
    row["user_agent"].encode("utf-8")  # encodable now
    assert row["cut_fields"] == "model_requested,user_agent"


def test_integers_are_clamped_to_their_column_type() -> None:
    row = FIT.fit({"input_tokens": 3 * 10**9, "output_tokens": -(3 * 10**9), "cost_nusd": 10**30,
                   "status_code": 200})
    assert row["input_tokens"] == 2**31 - 1 and row["output_tokens"] == -(2**31)
    assert row["cost_nusd"] == 2**63 - 1 and row["status_code"] == 200
    assert row["cut_fields"] == "cost_nusd,input_tokens,output_tokens"
