"""Runs last in the suite (file order): after every hostile request above, no credential (a
gateway key or its secret part, an upstream key, a proxy password) is in any answer a client
read, any gateway log line, any /metrics page or any database column, nor did the attacker's
listener ever receive one.
"""

from __future__ import annotations

import pytest

from tests.rig.attacker import Listener
from tests.rig.leaks import SecretScan


def test_no_credential_in_any_answer_log_metric_or_database(scan: SecretScan, attacker: Listener) -> None:
    if not scan.gateways or not scan.answers:
        pytest.skip("scans what the rest of tests/security did: run the whole folder")
    found = {where: names for where, data in scan.places() if (names := scan.leaks(data))}
    pages, unreadable = scan.metrics_pages()
    found |= {f"{gw} /metrics": names for gw, text in pages.items() if (names := scan.leaks(text))}
    assert found == {}, f"credentials found: {found}"
    assert unreadable == {}, "a /metrics page that fails cannot be checked (and is broken)"
    assert scan.leaks(attacker.history) == [], "the attacker's listener received a credential"
