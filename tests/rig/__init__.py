"""Reusable end-to-end test rig: a TLS mock of the model providers and a real gateway process.

    from tests.rig import MockProvider, GatewayProcess, UPSTREAM_KEYS
"""

from typing import Any

__all__ = [
    "UPSTREAM_KEYS",
    "GatewayError",
    "GatewayProcess",
    "Inline",
    "MockProvider",
    "RecordedRequest",
    "Scenario",
    "free_port",
]

_WHERE = {
    "MockProvider": "mock_provider",
    "RecordedRequest": "mock_provider",
    "Scenario": "mock_provider",
    "UPSTREAM_KEYS": "gateway",
    "GatewayError": "gateway",
    "GatewayProcess": "gateway",
    "Inline": "gateway",
    "free_port": "gateway",
}


def __getattr__(name: str) -> Any:  # lazy, so `python -m tests.rig.mock_provider` imports it once
    if name in _WHERE:
        import importlib

        return getattr(importlib.import_module(f".{_WHERE[name]}", __name__), name)
    raise AttributeError(name)
