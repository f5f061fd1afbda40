"""spendgate.keys: the key format, parsing, hashing, and what a KeyRecord accepts."""

from __future__ import annotations

import hashlib
import string
from dataclasses import replace
from datetime import datetime, timedelta, timezone

import pytest

from spendgate.keys import (
    SECRET_LEN,
    KeyRecord,
    format_key,
    hash_secret,
    looks_like_gateway_key,
    new_key_id,
    new_secret,
    parse_key,
    secret_matches,
)

NOW = datetime(2026, 3, 1, 12, 0, tzinfo=timezone.utc)
SECRET = "A" * 20 + "b" * 13 + "0123456789"  # 43 base62 chars
OLD_SECRET = "Z" * 43


def record(**kw: object) -> KeyRecord:
    base = KeyRecord(
        key_id="abcd1234", user="alice", team="core", state="active", secret_hash=hash_secret(SECRET),
        prev_secret_hash=None, prev_valid_until=None, expires_at=None, allowed_models=(), rpm=None,
        byok=False, capture_content=False, capture_reason=None,
    )
    return replace(base, **kw)  # type: ignore[arg-type]


# -- format and parse ---------------------------------------------------------


def test_new_key_round_trips_through_parse() -> None:
    ids, secrets = set(), set()
    for _ in range(50):
        key_id, secret = new_key_id(), new_secret()
        ids.add(key_id)
        secrets.add(secret)
        assert len(key_id) == 8 and set(key_id) <= set(string.ascii_lowercase + string.digits)
        assert len(secret) == SECRET_LEN >= 32 and set(secret) <= set(string.ascii_letters + string.digits)
        key = format_key(key_id, secret)
        assert key == f"sg_{key_id}_{secret}"
        parsed = parse_key(key)
        assert parsed is not None and (parsed.key_id, parsed.secret) == (key_id, secret)
    assert len(ids) == 50 and len(secrets) == 50  # random, not a counter


@pytest.mark.parametrize(
    "value",
    [
        "",
        "sg_",
        "sg_abcd1234",
        "sg_abcd1234_",
        "sg_abcd1234_" + "a" * 31,  # secret too short
        "sg_abcd1234_" + "a" * 129,  # secret too long
        "sg_abc1234_" + "a" * 43,  # id 7 chars
        "sg_abcd12345_" + "a" * 43,  # id 9 chars
        "sg_ABCD1234_" + "a" * 43,  # id is lower-case only
        "sg_abcd1234_" + "a" * 42 + "-",  # not base62
        "sg_abcd1234_" + "a" * 42 + "_",
        "sk_abcd1234_" + "a" * 43,
        "SG_abcd1234_" + "a" * 43,
        "sg-abcd1234-" + "a" * 43,
        "Bearer sg_abcd1234_" + "a" * 43,
        "sg_abcd1234_" + "a" * 43 + "\nx",
    ],
)
def test_parse_rejects(value: str) -> None:
    assert parse_key(value) is None


def test_parse_accepts_surrounding_whitespace_and_long_secrets() -> None:
    assert parse_key("  sg_abcd1234_" + "a" * 43 + "\n") is not None
    assert parse_key("sg_abcd1234_" + "a" * 32) is not None
    assert parse_key("sg_abcd1234_" + "a" * 128) is not None


@pytest.mark.parametrize(
    ("value", "expected"),
    [("sg_abcd1234_" + "a" * 43, True), (" sg_x", True), ("sg_", True), ("xsg_", False), ("sk-abc", False),
     ("", False)],
)
def test_looks_like_gateway_key(value: str, expected: bool) -> None:
    assert looks_like_gateway_key(value) is expected


# -- hashing ------------------------------------------------------------------


def test_hash_is_sha256_hex_of_the_secret() -> None:
    assert hash_secret(SECRET) == hashlib.sha256(SECRET.encode()).hexdigest()
    assert len(hash_secret(SECRET)) == 64 and SECRET not in hash_secret(SECRET)
    assert hash_secret(SECRET) != hash_secret(OLD_SECRET)


@pytest.mark.parametrize(
    ("secret", "stored", "expected"),
    [
        (SECRET, hash_secret(SECRET), True),
        (OLD_SECRET, hash_secret(SECRET), False),
        (SECRET, None, False),
        (SECRET, "", False),
        (SECRET, SECRET, False),  # a stored plaintext never matches: only hashes are compared
    ],
)
def test_secret_matches(secret: str, stored: str | None, expected: bool) -> None:
    assert secret_matches(secret, stored) is expected


# -- KeyRecord ----------------------------------------------------------------


def test_matches_current_secret_only_without_rotation() -> None:
    rec = record()
    assert rec.matches(SECRET, NOW)
    assert not rec.matches(OLD_SECRET, NOW)
    assert not rec.matches("", NOW)


@pytest.mark.parametrize(
    ("valid_until", "expected_old"),
    [
        (NOW + timedelta(seconds=1), True),  # inside the grace period
        (NOW + timedelta(days=1), True),
        (NOW, False),  # the grace period ends exactly now: over
        (NOW - timedelta(microseconds=1), False),
        (None, False),  # rotated without grace
    ],
)
def test_matches_previous_secret_during_grace(valid_until: datetime | None, expected_old: bool) -> None:
    rec = record(secret_hash=hash_secret("N" * 43), prev_secret_hash=hash_secret(OLD_SECRET),
                 prev_valid_until=valid_until)
    assert rec.matches("N" * 43, NOW)  # the new one always works
    assert rec.matches(OLD_SECRET, NOW) is expected_old
    assert not rec.matches(SECRET, NOW)


def test_grace_without_previous_hash_matches_nothing_else() -> None:
    rec = record(prev_secret_hash=None, prev_valid_until=NOW + timedelta(hours=1))
    assert not rec.matches(OLD_SECRET, NOW)
    assert not rec.matches("", NOW)


@pytest.mark.parametrize(
    ("globs", "model", "expected"),
    [
        ((), "gpt-4o", True),  # no list: anything
        ((), None, True),
        (("gpt-4o-mini*",), "gpt-4o-mini", True),
        (("gpt-4o-mini*",), "gpt-4o-mini-2024-07-18", True),
        (("gpt-4o-mini*",), "gpt-4o", False),
        (("gpt-4o-mini*",), "GPT-4O-MINI", False),  # case matters, like the provider's own names
        (("gpt-4o-mini*",), "xgpt-4o-mini", False),
        (("gpt-4o-mini*",), "", False),
        (("gpt-4o-mini*",), None, True),  # listing models / files: no model is used
        (("gpt-4o-mini*", "claude-*"), "claude-sonnet-4-20250514", True),
        (("claude-?-5-haiku-*",), "claude-3-5-haiku-20241022", True),
        (("gpt-4o",), "gpt-4o-mini", False),  # exact names are exact
        (("models/gemini-*",), "gemini-2.0-flash", False),
    ],
)
def test_model_allowed(globs: tuple[str, ...], model: str | None, expected: bool) -> None:
    assert record(allowed_models=globs).model_allowed(model) is expected

