"""Gateway key format: `sg_<key id, 8 chars>_<secret, 43 base62 chars>`.

Pure functions. Only the key id and SHA-256 of the secret are stored: the
secret has ~256 bits of entropy, so a fast hash is safe and keeps lookups cheap.
"""

from __future__ import annotations

import fnmatch
import hashlib
import hmac
import re
import secrets
import string
from dataclasses import dataclass
from datetime import datetime
from urllib.parse import unquote

_ALPHABET = string.ascii_letters + string.digits
_ID_ALPHABET = string.ascii_lowercase + string.digits
KEY_RE = re.compile(r"^sg_([a-z0-9]{8})_([A-Za-z0-9]{32,128})$")
SECRET_LEN = 43


@dataclass(frozen=True)
class ParsedKey:
    key_id: str
    secret: str


def new_key_id() -> str:
    return "".join(secrets.choice(_ID_ALPHABET) for _ in range(8))


def new_secret() -> str:
    return "".join(secrets.choice(_ALPHABET) for _ in range(SECRET_LEN))


def format_key(key_id: str, secret: str) -> str:
    return f"sg_{key_id}_{secret}"


def parse_key(value: str) -> ParsedKey | None:
    m = KEY_RE.match(value.strip())
    if not m:
        return None
    return ParsedKey(m.group(1), m.group(2))


def looks_like_gateway_key(value: str) -> bool:
    return value.strip().startswith("sg_")


_EMBEDDED_KEY = re.compile(r"sg_[a-z0-9]{8}_[A-Za-z0-9]{16}")


def contains_gateway_key(value: str | bytes) -> bool:
    """True if `value` holds a gateway key anywhere, also percent-encoded (up to three times over).

    >>> contains_gateway_key("Bearer%20sg%255Fabcd1234_" + "x" * 43)
    True
    """
    text = value.decode("latin-1") if isinstance(value, bytes) else value
    for _ in range(4):
        if _EMBEDDED_KEY.search(text):
            return True
        if "%" not in text:
            return False
        text = unquote(text)
    return False


def hash_secret(secret: str) -> str:
    return hashlib.sha256(secret.encode()).hexdigest()


def secret_matches(secret: str, stored_hash: str | None) -> bool:
    if not stored_hash:
        return False
    return hmac.compare_digest(hash_secret(secret), stored_hash)


@dataclass(frozen=True)
class KeyRecord:
    """A key as the gateway needs it at request time (no secret, only hashes)."""

    key_id: str
    user: str
    team: str | None
    state: str  # active | revoked
    secret_hash: str
    prev_secret_hash: str | None
    prev_valid_until: datetime | None
    expires_at: datetime | None
    allowed_models: tuple[str, ...]
    rpm: int | None
    byok: bool
    capture_content: bool
    capture_reason: str | None

    def matches(self, secret: str, now: datetime) -> bool:
        if secret_matches(secret, self.secret_hash):
            return True
        return (
            self.prev_valid_until is not None
            and now < self.prev_valid_until
            and secret_matches(secret, self.prev_secret_hash)
        )

    def model_allowed(self, model: str | None) -> bool:
        if not self.allowed_models:
            return True
        if model is None:  # listing models, files, batches: no model is used by this request
            return True
        return any(fnmatch.fnmatchcase(model, g) for g in self.allowed_models)
