"""Fixtures of the hostile-client suite.

A `spendgate serve` takes seconds to start, so the suite shares a few session-wide gateways,
each with only the config its tests need (a config key today's code does not know only stops
the gateway that uses it):

* ``gw``: defaults; Mistral's upstream is a closed port, Groq's is the key-echoing upstream.
* ``gw_allow``: ``allow_ports`` / ``allow_destinations`` naming the stand-in listeners.
* ``gw_limits``: small body limit and short header / upstream / stream-idle timeouts.
* ``gw_pg``: defaults on a throwaway PostgreSQL database.
* ``gw_caps``: defaults (clamping on, unpriced models refused) plus the token and per-minute
  prices the cap-dodging tests compute with.

Every credential minted and every answer read goes into the session's :class:`SecretScan`,
which ``test_zz_no_credential_anywhere`` scans last.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import pytest

from tests.rig.attacker import Listener
from tests.rig.echo_upstream import EchoUpstream
from tests.rig.gateway import UPSTREAM_KEYS, GatewayProcess, Inline, free_port
from tests.rig.hostile import HostileClient
from tests.rig.leaks import SecretScan
from tests.rig.mock_provider import MockProvider
from tests.rig.pg import throwaway_database
from tests.rig.rawclient import basic

HEADER_TIMEOUT_S = 2
UPSTREAM_TIMEOUT_S = 2
STREAM_IDLE_S = 2
SMALL_MAX_BYTES = 65536


@pytest.fixture(scope="session")
def scan() -> SecretScan:
    s = SecretScan()
    for provider, key in UPSTREAM_KEYS.items():
        s.add_secret(f"upstream key of {provider}", key)
    return s


@pytest.fixture(autouse=True)
def _attach_gateway_logs(request: pytest.FixtureRequest, scan: SecretScan) -> None:
    """A failing test's report shows the logs of the suite's gateways (the list fills as they start)."""
    request.node._spendgate_gateways = scan.gateways


def _gateway(tmp_path_factory: pytest.TempPathFactory, mock: MockProvider, scan: SecretScan, name: str,
             overrides: dict[str, Any] | None = None, db_url: str | None = None) -> GatewayProcess:
    gw = GatewayProcess(tmp_path_factory.mktemp(name), mock.url, name=name, overrides=overrides, db_url=db_url)
    scan.gateways.append(gw)
    return gw


# --------------------------------------------------------------------------- stand-ins


@pytest.fixture(scope="session")
def attacker() -> Iterator[Listener]:
    """A host of the hostile user's choosing; ``gw_allow`` lets tunnels reach it."""
    with Listener() as listener:
        yield listener


@pytest.fixture(scope="session")
def origin() -> Iterator[Listener]:
    """An allowed non-model destination (``ip:port`` in ``allow_destinations``, port not in ``allow_ports``)."""
    with Listener() as listener:
        yield listener


@pytest.fixture(scope="session")
def loopback() -> Iterator[Listener]:
    """A loopback service on an allowed port: only the address makes it refused."""
    with Listener() as listener:
        yield listener


@pytest.fixture(scope="session")
def loopback6() -> Iterator[Listener]:
    with Listener("::1") as listener:
        yield listener


@pytest.fixture(scope="session")
def cidr_ok() -> Iterator[Listener]:
    """On 127.0.0.3, allowed as a CIDR; its port is in ``allow_ports``."""
    with Listener("127.0.0.3") as listener:
        yield listener


@pytest.fixture(scope="session")
def cidr_bad_port() -> Iterator[Listener]:
    """On 127.0.0.3 (allowed as a CIDR) but on a port not in ``allow_ports``."""
    with Listener("127.0.0.3") as listener:
        yield listener


@pytest.fixture(scope="session")
def echo() -> Iterator[EchoUpstream]:
    with EchoUpstream() as e:
        yield e


@pytest.fixture(autouse=True)
def _fresh_stand_ins(request: pytest.FixtureRequest) -> None:
    """Listeners and the echo upstream a test uses start it with nothing recorded."""
    for name in ("attacker", "origin", "loopback", "loopback6", "cidr_ok", "cidr_bad_port", "echo"):
        if name in request.fixturenames:
            request.getfixturevalue(name).clear()


# --------------------------------------------------------------------------- gateways


@pytest.fixture(scope="session")
def gw(tmp_path_factory: pytest.TempPathFactory, _mock_provider_session: MockProvider, scan: SecretScan,
       echo: EchoUpstream) -> Iterator[GatewayProcess]:
    closed = free_port()  # nothing listens there: the "upstream refuses connections" case
    g = _gateway(tmp_path_factory, _mock_provider_session, scan, "sec-default", overrides={"providers": {
        "mistral": {"upstream": f"https://127.0.0.1:{closed}", "verify_upstream_tls": False},
        "groq": {"upstream": echo.url, "verify_upstream_tls": False},
    }})
    yield g.start()
    g.stop()


@pytest.fixture(scope="session")
def gw_allow(tmp_path_factory: pytest.TempPathFactory, _mock_provider_session: MockProvider, scan: SecretScan,
             attacker: Listener, origin: Listener, loopback: Listener, loopback6: Listener, cidr_ok: Listener,
             cidr_bad_port: Listener) -> Iterator[GatewayProcess]:
    g = _gateway(tmp_path_factory, _mock_provider_session, scan, "sec-allow")
    # The gateway's own ports are allowed ports too: only "it is me" may refuse them.
    g.config["proxy"].update(
        allow_ports=[443, loopback.port, loopback6.port, cidr_ok.port, g.port, g.metrics_port],
        allow_destinations=[attacker.address, origin.address, "127.0.0.3/32"],
    )
    yield g.start()
    g.stop()


@pytest.fixture(scope="session")
def gw_limits(tmp_path_factory: pytest.TempPathFactory, _mock_provider_session: MockProvider,
              scan: SecretScan) -> Iterator[GatewayProcess]:
    g = _gateway(tmp_path_factory, _mock_provider_session, scan, "sec-limits", overrides={"proxy": {
        "max_request_bytes": SMALL_MAX_BYTES, "header_timeout_seconds": HEADER_TIMEOUT_S,
        "upstream_timeout_seconds": UPSTREAM_TIMEOUT_S, "stream_idle_timeout_seconds": STREAM_IDLE_S,
    }})
    yield g.start()
    g.stop()


@pytest.fixture(scope="session")
def gw_pg(tmp_path_factory: pytest.TempPathFactory, _mock_provider_session: MockProvider,
          scan: SecretScan) -> Iterator[GatewayProcess]:
    with throwaway_database("spendgate_security") as url:
        if url is None:
            pytest.skip("PostgreSQL not reachable at 127.0.0.1:5432")
        g = _gateway(tmp_path_factory, _mock_provider_session, scan, "sec-pg", db_url=url)
        yield g.start()
        g.stop()


# USD per million tokens, and per minute of audio: round numbers the cap-dodging tests compute with.
CAPS_PRICES = {"openai:gpt-4.1": Inline(input=1.0, output=40.0),
               "openai:gpt-3.5-turbo-instruct": Inline(input=1.0, output=40.0),
               "gemini:gemini-1.5-pro": Inline(input=1.0, output=40.0),
               "azure:gpt-4.1": Inline(input=1.0, output=40.0), "azure:gpt-4o-mini": Inline(input=1.0, output=40.0),
               "openai:whisper-1": Inline(input=0.0, output=0.0, per_minute=0.006)}


@pytest.fixture(scope="session")
def gw_caps(tmp_path_factory: pytest.TempPathFactory, _mock_provider_session: MockProvider,
            scan: SecretScan) -> Iterator[GatewayProcess]:
    g = _gateway(tmp_path_factory, _mock_provider_session, scan, "sec-caps",
                 overrides={"prices": {"overrides": CAPS_PRICES}})
    yield g.start()
    g.stop()


# --------------------------------------------------------------------------- keys and clients


@pytest.fixture(scope="session")
def key(gw: GatewayProcess, scan: SecretScan) -> str:
    """The hostile user's own, valid gateway key."""
    return scan.mint(gw, "mallory", team="red")


@pytest.fixture(scope="session")
def allow_key(gw_allow: GatewayProcess, scan: SecretScan) -> str:
    return scan.mint(gw_allow, "mallory", team="red")


@pytest.fixture(scope="session")
def limits_key(gw_limits: GatewayProcess, scan: SecretScan) -> str:
    return scan.mint(gw_limits, "mallory", team="red")


@pytest.fixture
def auth(key: str) -> str:
    """``Proxy-Authorization`` carrying ``key``."""
    return basic("mallory", key)


@pytest.fixture
def client(gw: GatewayProcess, scan: SecretScan) -> HostileClient:
    return HostileClient(gw, scan.record)


@pytest.fixture
def client_allow(gw_allow: GatewayProcess, scan: SecretScan) -> HostileClient:
    return HostileClient(gw_allow, scan.record)


@pytest.fixture
def client_limits(gw_limits: GatewayProcess, scan: SecretScan) -> HostileClient:
    return HostileClient(gw_limits, scan.record)
