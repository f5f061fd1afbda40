"""Request bodies read defensively (`spendgate.stages.bodies`): bounded decompression, strict JSON."""

from __future__ import annotations

import gzip
import json
import zlib
from collections.abc import Callable

import brotli
import pytest
from backports import zstd

from spendgate.stages.bodies import MAX_JSON_DEPTH, BodyError, decode, decoded_size, parse_json_object

LIMIT = 1024 * 1024


def raw_deflate(data: bytes) -> bytes:
    c = zlib.compressobj(wbits=-15)
    return c.compress(data) + c.flush()


CODECS: dict[str, Callable[[bytes], bytes]] = {
    "gzip": gzip.compress, "x-gzip": gzip.compress, "deflate": zlib.compress, "br": brotli.compress,
    "zstd": zstd.compress,
}


@pytest.mark.parametrize("coding", [*CODECS, "deflate-raw"])
def test_a_small_body_decodes_exactly(coding: str) -> None:
    body = json.dumps({"model": "gpt-4o", "messages": [{"role": "user", "content": "hi " * 500}]}).encode()
    packed = raw_deflate(body) if coding == "deflate-raw" else CODECS[coding](body)
    name = "deflate" if coding == "deflate-raw" else coding
    assert decoded_size(packed, name, LIMIT) == len(body)
    assert decode(packed, name, LIMIT) == body


@pytest.mark.parametrize("coding", list(CODECS))
def test_a_compression_bomb_is_413_without_inflating_it(coding: str) -> None:
    bomb = CODECS[coding](b"\0" * (8 * LIMIT))
    assert len(bomb) < LIMIT // 10
    with pytest.raises(BodyError) as e:
        decode(bomb, coding, LIMIT)
    assert e.value.status == 413 and e.value.code == "spendgate_request_too_large"


@pytest.mark.parametrize(("coding", "data"), [
    ("gzip", b"not gzip at all"), ("gzip", gzip.compress(b"x" * 1000)[:-12]), ("br", b"\xff" * 20),
    ("zstd", b"nonsense"), ("deflate", b"\x78\x9c garbage"),
])
def test_corrupt_data_is_400(coding: str, data: bytes) -> None:
    with pytest.raises(BodyError) as e:
        decoded_size(data, coding, LIMIT)
    assert e.value.status == 400 and e.value.code == "spendgate_invalid_body"


@pytest.mark.parametrize("coding", ["xyz", "compress", "gzip, br", "identity;q=0"])
def test_unknown_encodings_are_415(coding: str) -> None:
    with pytest.raises(BodyError) as e:
        decoded_size(b"{}", coding, LIMIT)
    assert e.value.status == 415 and e.value.code == "spendgate_unsupported_encoding"


def test_identity_is_measured_as_is() -> None:
    assert decoded_size(b"{}", None, 2) == 2
    with pytest.raises(BodyError) as e:
        decoded_size(b"{}x", "identity", 2)
    assert e.value.status == 413


@pytest.mark.parametrize(("raw", "why"), [
    (b"not json", "not valid JSON"),
    (b"[1, 2]", "JSON list"),
    (b"null", "JSON null"),
    (b'"text"', "JSON str"),
    (b'{"model": "gpt-4o", "model": "gpt-4o-mini"}', "key 'model' twice"),
    (b'{"a": {"b": 1, "b": 2}}', "key 'b' twice"),
    (b'{"a": "\xff\xfe"}', "not valid UTF-8"),
    (b"[" * 100_000, "nested more than"),
    (b'{"a":' * (MAX_JSON_DEPTH + 1) + b"1" + b"}" * (MAX_JSON_DEPTH + 1), "nested more than"),
])
def test_json_the_gateway_refuses(raw: bytes, why: str) -> None:
    with pytest.raises(BodyError) as e:
        parse_json_object(raw)
    assert e.value.status == 400 and e.value.code == "spendgate_invalid_json"
    assert why in str(e.value)


def test_json_just_within_the_depth_limit_is_accepted() -> None:
    raw = b'{"a":' * (MAX_JSON_DEPTH - 1) + b"1" + b"}" * (MAX_JSON_DEPTH - 1)
    assert isinstance(parse_json_object(raw), dict)
    many_flat = json.dumps({"messages": [{"role": "user", "content": str(i)} for i in range(1000)]}).encode()
    assert len(parse_json_object(many_flat)["messages"]) == 1000
