"""Where clients put API keys, what a provider's own key looks like, and how the team's key is sent."""

from __future__ import annotations

import re

from spendgate.providers import ProviderSpec

# Where SDKs put an API key. All are read and all are removed, whatever the provider.
KEY_HEADERS = ("authorization", "x-api-key", "api-key", "x-goog-api-key")
KEY_QUERY_PARAMS = ("key",)

# Shapes of real provider keys, to tell "your own provider key" from garbage.
_FOREIGN_KEY = re.compile(
    r"^(sk-[A-Za-z0-9_\-]{16,}|sk-ant-[A-Za-z0-9_\-]{16,}|AIza[A-Za-z0-9_\-]{20,}|gsk_[A-Za-z0-9]{20,}|xai-[A-Za-z0-9]{20,}|[0-9a-f]{32})$"
)


def looks_like_provider_key(value: str) -> bool:
    return bool(_FOREIGN_KEY.match(value))


def strip_bearer(value: str) -> str:
    """The token of an Authorization value; "" for a bare `Bearer` (an unset key variable)."""
    scheme, _, rest = value.strip().partition(" ")
    if scheme.lower() == "bearer":
        return rest.strip()
    return value.strip()


def upstream_auth_headers(spec: ProviderSpec, key: str) -> tuple[str, str]:
    if spec.upstream_auth == "bearer":
        return "authorization", f"Bearer {key}"
    return spec.upstream_auth, key
