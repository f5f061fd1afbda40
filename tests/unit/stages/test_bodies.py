"""Request bodies read defensively (`spendgate.stages.bodies`): bounded decompression, strict JSON."""

from __future__ import annotations

import gzip
import json
import zlib
from collections.abc import Callable

import brotli
import pytest
from backports import zstd

from spendgate.providers.wire import Upload
from spendgate.stages.bodies import (
    MAX_JSON_DEPTH,
    BodyError,
    decode,
    decoded_size,
    parse_form,
    parse_json_object,
    wav_seconds,
)

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
    ("gzip", b"not gzip at all"), ("gzip", gzip.compress(b"x" * 1000, mtime=0)[:-12]), ("br", b"\xff" * 20),
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


# --------------------------------------------------------------------------- multipart forms (audio, image edits)


def form(*parts: tuple[str, bytes], boundary: str = "sg-boundary") -> bytes:
    """A multipart/form-data body: each part is its header lines and its data."""
    out = b""
    for head, data in parts:
        out += f"--{boundary}\r\n{head}\r\n\r\n".encode() + data + b"\r\n"
    return out + f"--{boundary}--\r\n".encode()


def field(name: str, value: str) -> tuple[str, bytes]:
    return f'Content-Disposition: form-data; name="{name}"', value.encode()


def upload(data: bytes, disposition: str = 'name="file"; filename="a.wav"',
           content_type: str | None = "audio/wav") -> tuple[str, bytes]:
    head = f"Content-Disposition: form-data; {disposition}"
    return (head + (f"\r\nContent-Type: {content_type}" if content_type else "")), data


def wav(seconds: float, rate: int = 16_000, channels: int = 1, bits: int = 16, *, fmt: int = 1,
        byte_rate: int | None = None, data_size: int | None = None, extra: bytes = b"") -> bytes:
    """A WAV file of silence; the header's byte rate and data size may lie."""
    block = channels * bits // 8
    pcm = b"\0" * int(seconds * rate * block)
    fmt_chunk = (fmt.to_bytes(2, "little") + channels.to_bytes(2, "little") + rate.to_bytes(4, "little")
                 + (byte_rate if byte_rate is not None else rate * block).to_bytes(4, "little")
                 + block.to_bytes(2, "little") + bits.to_bytes(2, "little"))
    size = len(pcm) if data_size is None else data_size
    body = b"WAVE" + b"fmt " + len(fmt_chunk).to_bytes(4, "little") + fmt_chunk + b"data" + size.to_bytes(
        4, "little") + pcm + extra
    return b"RIFF" + (len(body) if data_size is None else 0xFFFFFFFF).to_bytes(4, "little") + body


CT = "multipart/form-data; boundary=sg-boundary"


def test_a_form_s_fields_and_files() -> None:
    audio = wav(2)
    raw = form(field("model", "whisper-1"), field("response_format", "json"), upload(audio))
    fields, files = parse_form(raw, CT)
    assert fields == {"model": "whisper-1", "response_format": "json"}
    assert files == [Upload("file", "a.wav", "audio/wav", len(audio), 2.0)]


@pytest.mark.parametrize("content_type", [
    'multipart/form-data; boundary="sg-boundary"', "multipart/form-data;boundary=sg-boundary",
    "Multipart/Form-Data; charset=utf-8; BOUNDARY=sg-boundary",
])
def test_boundary_spellings(content_type: str) -> None:
    assert parse_form(form(field("model", "m")), content_type)[0] == {"model": "m"}


@pytest.mark.parametrize("content_type", [
    "multipart/form-data", "multipart/form-data; boundary=", 'multipart/form-data; boundary=""',
    # Two boundaries: the provider's parser might split on the other one and find parts the gateway did not.
    "multipart/form-data; boundary=sg-boundary; boundary=other",
])
def test_a_form_without_exactly_one_boundary_is_400(content_type: str) -> None:
    with pytest.raises(BodyError) as e:
        parse_form(form(field("model", "m")), content_type)
    assert e.value.status == 400 and e.value.code == "spendgate_invalid_body"


@pytest.mark.parametrize("name", ["model", "n", "size"])
def test_a_field_the_gateway_reads_named_twice_is_400(name: str) -> None:
    with pytest.raises(BodyError) as e:
        parse_form(form(field(name, "a"), field(name, "b")), CT)
    assert e.value.status == 400 and repr(name) in str(e.value)
    fields, _ = parse_form(form(field("include[]", "a"), field("include[]", "b")), CT)  # arrays repeat
    assert fields == {"include[]": "b"}


def test_a_huge_text_field_is_measured_as_an_upload_not_kept() -> None:
    raw = form(field("model", "gpt-image-1"), field("prompt", "x" * (2 * 1024 * 1024)))
    fields, files = parse_form(raw, CT)
    assert fields == {"model": "gpt-image-1"}
    assert [(f.field, f.size) for f in files] == [("prompt", 2 * 1024 * 1024)]


@pytest.mark.parametrize("disposition, content_type, name", [
    ('name="file"; filename="a.mp3"', "audio/mpeg", "file"),
    ("name=file; filename=a.mp3", None, "file"),  # unquoted, no content type: still a file
    ("name=\"file\"; filename*=UTF-8''a%20b.mp3", None, "file"),  # RFC 2231
    ("name*=UTF-8''file; filename=a.mp3", None, "file"),
    ('name="file"', "application/octet-stream", "file"),  # a file part without a filename
    ('filename="a.mp3"', "audio/mpeg", ""),  # no name the gateway can read: measured anyway
    ("", None, ""),
])
def test_every_file_part_is_measured_however_it_is_named(disposition: str, content_type: str | None,
                                                         name: str) -> None:
    data = b"\xff\xfb" * 100_000  # 200 kB that is not text
    fields, files = parse_form(form(upload(data, disposition, content_type)), CT)
    assert fields == {}
    assert [(f.field, f.size) for f in files] == [(name, len(data))]


def test_parts_are_delimited_only_after_a_line_break() -> None:
    """The boundary inside a file's bytes (not after CRLF) does not end the part: a provider reads on."""
    data = b"A" * 1000 + b"--sg-boundary\r\nContent-Disposition: form-data; name=\"x\"\r\n\r\n" + b"B" * 50_000
    _, files = parse_form(form(upload(data, content_type="application/octet-stream")), CT)
    assert [f.size for f in files] == [len(data)]


def test_a_form_cut_short_still_counts_its_file() -> None:
    raw = form(field("model", "whisper-1"), upload(b"\x01" * 90_000))[:-40]  # no closing delimiter
    fields, files = parse_form(raw, CT)
    assert fields == {"model": "whisper-1"} and files[0].size > 89_000


def test_a_part_without_headers_is_measured() -> None:
    raw = b"--sg-boundary\r\n" + b"\x01" * 5000 + b"\r\n--sg-boundary--\r\n"
    assert [f.size for f in parse_form(raw, CT)[1]] == [5002]  # its bytes, to the delimiter


def test_parts_after_the_closing_delimiter_are_not_read() -> None:
    raw = form(field("model", "a")) + b"--sg-boundary\r\n" + b'Content-Disposition: form-data; name="n"\r\n\r\n9\r\n'
    assert parse_form(raw, CT)[0] == {"model": "a"}


# --------------------------------------------------------------------------- WAV durations


@pytest.mark.parametrize("audio, seconds", [
    (wav(1), 1.0),
    (wav(3, rate=8000, bits=8), 3.0),
    (wav(2, rate=48_000, channels=2), 2.0),
    (wav(1.5, fmt=3, bits=32), 1.5),  # IEEE float
    # A streaming WAV: sizes say 0xFFFFFFFF; the bytes there are what plays.
    (wav(2, data_size=0xFFFFFFFF), 2.0),
    # Truncated: less data than the header says.
    (wav(2, data_size=10 * 32_000)[:44 + 32_000], 1.0),
    # Lies that would make a long file look short: each is read as the longest it can play.
    (wav(60, data_size=32_000), 60.0),  # a data chunk "of 1 s" followed by 59 s more
    (wav(60, byte_rate=60 * 32_000), 60.0),  # a byte rate 60x the sample rate's
    (wav(1, extra=b"data" + (32_000 * 9).to_bytes(4, "little") + b"\0" * 32_000 * 9), 10.0),  # a second chunk
])
def test_wav_seconds(audio: bytes, seconds: float) -> None:
    got = wav_seconds(audio)
    assert got is not None and got == pytest.approx(seconds, abs=0.01)


@pytest.mark.parametrize("audio", [
    b"", b"RIFF", b"ID3\x03" + b"\0" * 100,  # an MP3
    b"RIFF" + b"\0" * 4 + b"WAVE" + b"\0" * 40,  # no fmt, no data
    wav(1, fmt=0x55),  # MP3 in a WAV: only its frames say how long it plays
    wav(1, fmt=2),  # ADPCM
    wav(1, rate=0, byte_rate=0),  # no rate: no duration
    b"RIFF\xff\xff\xff\xffWAVE" + b"LIST\xff\xff\xff\xff" + b"\0" * 64,  # a chunk that claims the rest
])
def test_wav_seconds_of_what_it_cannot_read_is_none(audio: bytes) -> None:
    assert wav_seconds(audio) is None
