"""Shared fixtures: the TLS mock provider, real gateway processes, a throwaway PostgreSQL db."""

from __future__ import annotations

import contextlib
import sys
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

_REPO_ROOT = Path(__file__).resolve().parents[1]
if str(_REPO_ROOT) not in sys.path:  # so `from tests.rig import …` works however pytest was started
    sys.path.insert(0, str(_REPO_ROOT))

from tests.rig.gateway import GatewayProcess  # noqa: E402
from tests.rig.mock_provider import MockProvider  # noqa: E402
from tests.rig.pg import PG_ADMIN_URL, throwaway_database  # noqa: E402,F401 - PG_ADMIN_URL is used by tests


@pytest.hookimpl(wrapper=True, tryfirst=True)
def pytest_runtest_makereport(item: pytest.Item, call: pytest.CallInfo[None]) -> Any:
    report = yield
    if report.failed:
        for gw in getattr(item, "_spendgate_gateways", ()):
            report.sections.append((f"spendgate log: {gw.name} ({gw.log_path})", gw.log_tail(200)))
    return report


@pytest.fixture(scope="session")
def _mock_provider_session() -> Iterator[MockProvider]:
    with MockProvider() as mock:
        yield mock


@pytest.fixture
def mock_provider(_mock_provider_session: MockProvider) -> Iterator[MockProvider]:
    """The session's mock provider, reset (no records, default scenario) for this test."""
    _mock_provider_session.reset()
    yield _mock_provider_session
    _mock_provider_session.reset()


@pytest.fixture
def gateway_factory(
    request: pytest.FixtureRequest, tmp_path: Path, mock_provider: MockProvider
) -> Iterator[Callable[..., GatewayProcess]]:
    """``gateway_factory(db_url=None, extra_config="", overrides=None, start=True, **kw)``.

    Every gateway sends all providers to ``mock_provider``; all are stopped at teardown, and
    their logs are attached to the report of a failing test.
    """
    made: list[GatewayProcess] = []
    request.node._spendgate_gateways = made

    def make(
        db_url: str | None = None,
        extra_config: str = "",
        overrides: dict[str, Any] | None = None,
        start: bool = True,
        **kw: Any,
    ) -> GatewayProcess:
        name = kw.pop("name", f"gw{len(made) + 1}")
        gw = GatewayProcess(
            tmp_path / name, mock_provider.url, db_url=db_url, extra_config=extra_config,
            overrides=overrides, name=name, **kw,
        )
        made.append(gw)
        if start:
            gw.start()
        return gw

    yield make
    for gw in made:
        try:
            gw.stop()
        except Exception:  # noqa: BLE001 - one bad gateway must not keep the others running
            gw.kill()


@pytest.fixture
def gateway(gateway_factory: Callable[..., GatewayProcess]) -> GatewayProcess:
    """One started gateway on a fresh SQLite database."""
    return gateway_factory()


@contextlib.contextmanager
def fresh_pg_database() -> Iterator[str]:
    """A new PostgreSQL database (dropped afterwards) as a SQLAlchemy URL; skips when PostgreSQL is absent."""
    with throwaway_database() as url:
        if url is None:
            pytest.skip("PostgreSQL not reachable at 127.0.0.1:5432")
        yield url


@pytest.fixture
def pg_url() -> Iterator[str]:
    """A fresh PostgreSQL database (dropped afterwards) as a SQLAlchemy URL."""
    with fresh_pg_database() as url:
        yield url


@pytest.fixture(scope="module")
def pg_module_url() -> Iterator[str]:
    """One migrated PostgreSQL database for a module (creating one per test costs a second each)."""
    from spendgate.store import Database

    with fresh_pg_database() as url:
        db = Database(url)
        db.upgrade()
        db.close()
        yield url
