"""Request bodies read defensively: bounded decompression and strict JSON.

A compressed body is measured before it is inflated (a 39 KB gzip can hold 40 MB), and JSON
that a provider would misread or that would make the gateway recurse (absurd nesting,
duplicate keys, invalid UTF-8) is refused, never guessed at. Pure: bytes in, values out.
"""

from __future__ import annotations

import json
import re
import zlib
from collections.abc import Callable, Iterator
from typing import Any
from urllib.parse import unquote

import brotli  # type: ignore[import-untyped]
from backports import zstd

from spendgate.providers.wire import Upload

MAX_JSON_DEPTH = 128
_CHUNK = 64 * 1024
SUPPORTED_ENCODINGS = ("identity", "gzip", "x-gzip", "deflate", "br", "zstd")


class BodyError(ValueError):
    """The body is refused; `status` and `code` say how (400, 413 or 415)."""

    def __init__(self, status: int, code: str, message: str) -> None:
        super().__init__(message)
        self.status = status
        self.code = code


def _zlib_chunks(raw: bytes, wbits: int) -> Iterator[bytes]:
    d = zlib.decompressobj(wbits)
    data = raw
    while True:
        out = d.decompress(data, _CHUNK)
        if out:
            yield out
        data = d.unconsumed_tail
        if d.eof or (not data and not out):
            break
    if not d.eof:
        raise zlib.error("truncated stream")


def _deflate_chunks(raw: bytes) -> Iterator[bytes]:
    # "deflate" is zlib-wrapped by the RFC, raw deflate in practice for some clients.
    wrapped = len(raw) >= 2 and raw[0] & 0x0F == 8 and (raw[0] << 8 | raw[1]) % 31 == 0
    return _zlib_chunks(raw, 15 if wrapped else -15)


def _brotli_chunks(raw: bytes) -> Iterator[bytes]:
    d = brotli.Decompressor()
    out = d.process(raw, output_buffer_limit=_CHUNK)
    while out:
        yield out
        if d.is_finished():
            return
        out = d.process(b"", output_buffer_limit=_CHUNK)
    if not d.is_finished():
        raise brotli.error("truncated stream")


def _zstd_chunks(raw: bytes) -> Iterator[bytes]:
    d = zstd.ZstdDecompressor()
    data = raw
    while not d.eof:
        out = d.decompress(data, _CHUNK)
        data = b""
        if out:
            yield out
        elif d.needs_input:
            raise zstd.ZstdError("truncated stream")


_DECODERS: dict[str, Callable[[bytes], Iterator[bytes]]] = {
    "gzip": lambda raw: _zlib_chunks(raw, 31),
    "x-gzip": lambda raw: _zlib_chunks(raw, 31),
    "deflate": _deflate_chunks,
    "br": _brotli_chunks,
    "zstd": _zstd_chunks,
}


def decoded_size(raw: bytes, encoding: str | None, limit: int) -> int:
    """The size `raw` inflates to, measured without holding it (memory stays ~64 KB).

    Raises BodyError: 415 for an encoding the gateway cannot read, 400 for corrupt data, 413 as
    soon as the decoded size passes `limit`.
    """
    coding = (encoding or "identity").strip().lower()
    if coding in ("", "identity"):
        size = len(raw)
    else:
        decoder = _DECODERS.get(coding)
        if decoder is None:
            raise BodyError(415, "spendgate_unsupported_encoding",
                            f"Content-Encoding {coding[:40]!r} is not supported; send the body uncompressed "
                            "or as gzip, deflate, br or zstd.")
        size = 0
        try:
            for chunk in decoder(raw):
                size += len(chunk)
                if size > limit:
                    break
        except (zlib.error, brotli.error, zstd.ZstdError, EOFError) as e:
            raise BodyError(400, "spendgate_invalid_body",
                            f"The {coding} request body could not be decompressed ({type(e).__name__}).") from None
    if size > limit:
        raise BodyError(413, "spendgate_request_too_large",
                        f"Request body is over {limit} bytes{' once decompressed' if coding != 'identity' else ''}; "
                        f"this gateway accepts at most {limit}.")
    return size


def decode(raw: bytes, encoding: str | None, limit: int) -> bytes:
    """`raw` decoded, after `decoded_size` has shown it fits in `limit`. Raises BodyError."""
    decoded_size(raw, encoding, limit)
    coding = (encoding or "identity").strip().lower()
    if coding in ("", "identity"):
        return raw
    return b"".join(_DECODERS[coding](raw))


def _no_duplicates(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    out = dict(pairs)
    if len(out) != len(pairs):
        seen: set[str] = set()
        dup = next(k for k, _ in pairs if k in seen or seen.add(k))  # type: ignore[func-returns-value]
        raise _Duplicate(dup)
    return out


class _Duplicate(ValueError):
    pass


class _NotJson(ValueError):
    pass


def _no_constants(name: str) -> Any:
    raise _NotJson(f"{name} is not JSON")


def _depth(doc: Any) -> int:
    deepest, stack = 0, [(doc, 1)]
    while stack:
        node, d = stack.pop()
        if d > deepest:
            deepest = d
        if deepest > MAX_JSON_DEPTH:
            break
        if isinstance(node, dict):
            stack.extend((v, d + 1) for v in node.values() if isinstance(v, (dict, list)))
        elif isinstance(node, list):
            stack.extend((v, d + 1) for v in node if isinstance(v, (dict, list)))
    return deepest


def parse_json_object(raw: bytes) -> dict[str, Any]:
    """The body as a JSON object, or BodyError(400) saying what is wrong with it.

    >>> try:
    ...     parse_json_object(b'{"model": "a", "model": "b"}')
    ... except BodyError as e:
    ...     print(e.status, e)  # doctest: +NORMALIZE_WHITESPACE
    400 The request body is not a JSON object the gateway accepts: it has the key 'model' twice;
    nothing was sent to the provider.
    """
    def bad(why: str) -> BodyError:
        return BodyError(400, "spendgate_invalid_json",
                         f"The request body is not a JSON object the gateway accepts: it {why}; nothing was sent "
                         "to the provider.")

    try:
        doc = json.loads(raw, object_pairs_hook=_no_duplicates, parse_constant=_no_constants)
    except _Duplicate as e:
        raise bad(f"has the key {str(e)[:100]!r} twice") from None
    except _NotJson as e:
        raise bad(f"holds {e} (NaN and Infinity are not JSON)") from None
    except RecursionError:
        raise bad(f"is nested more than {MAX_JSON_DEPTH} levels deep") from None
    except UnicodeDecodeError:
        raise bad("is not valid UTF-8") from None
    except ValueError as e:
        raise bad(f"is not valid JSON ({str(e)[:120]})") from None
    if not isinstance(doc, dict):
        raise bad(f"is a JSON {type(doc).__name__.replace('NoneType', 'null')}")
    if raw.count(b"[") + raw.count(b"{") > MAX_JSON_DEPTH and _depth(doc) > MAX_JSON_DEPTH:
        raise bad(f"is nested more than {MAX_JSON_DEPTH} levels deep")
    return doc


# -- multipart/form-data (audio to transcribe, images to edit) ------------------------------------

_FIELD_LIMIT = 64 * 1024  # a form's text field longer than this is not one the gateway reads
# Parameters as lenient parsers read them (quoted or not, RFC 2231 `name*=`): the provider's parser
# must never find a part, a file or a boundary the gateway did not.
_BOUNDARY = re.compile(r'(?:^|;)\s*boundary\s*=\s*(?:"([^"]*)"|([^";,\s]+))', re.I)
_NAME = re.compile(r"""(?:^|;)\s*name(\*?)\s*=\s*(?:"([^"]*)"|([^";\s]*))""", re.I)
_FILENAME = re.compile(r"""(?:^|;)\s*filename(\*?)\s*=\s*(?:"([^"]*)"|([^";\s]*))""", re.I)
# Fields the gateway reads (model, answers asked for, image size): twice, a provider may read the other one.
_ONE_VALUE = frozenset({"model", "n", "quality", "size", "stream"})
_PCM_FORMATS = frozenset({1, 3, 6, 7})  # PCM, IEEE float, A-law, mu-law: bytes a second fixed by the header
_WAVE_EXTENSIBLE = 0xFFFE


def _param(pattern: re.Pattern[str], disposition: str) -> str | None:
    m = pattern.search(disposition)
    if m is None:
        return None
    value = m.group(2) if m.group(2) is not None else m.group(3)
    if m.group(1):  # RFC 2231: charset'language'percent-encoded
        value = unquote(value.split("'", 2)[-1])
    return value


def parse_form(raw: bytes, content_type: str) -> tuple[dict[str, str], list[Upload]]:
    """The text fields of a multipart form and a measure of its files (size, and an audio file's
    duration where its header says). Raises BodyError on a form without exactly one boundary.

    Fail closed: every part that is not a short text field counts as an upload, whatever it is
    named, and parts are delimited only where RFC 2046 delimits them (CRLF, then the boundary)."""
    found = _BOUNDARY.findall(content_type)
    if len(found) != 1 or not (found[0][0] or found[0][1]):
        raise BodyError(400, "spendgate_invalid_body", "A multipart/form-data body needs exactly one boundary.")
    boundary = (found[0][0] or found[0][1]).encode("latin-1", "replace")
    fields: dict[str, str] = {}
    uploads: list[Upload] = []
    for part in (b"\r\n" + raw).split(b"\r\n--" + boundary)[1:]:
        if part.startswith(b"--"):
            break
        head, sep, data = part.partition(b"\r\n\r\n")
        if not sep:
            head, data = b"", part
        headers: dict[str, str] = {}
        for line in head.decode("utf-8", "replace").split("\r\n"):
            if ":" in line:
                k, v = line.split(":", 1)
                headers[k.strip().lower()] = v.strip()
        disposition = headers.get("content-disposition", "")
        name, filename = _param(_NAME, disposition), _param(_FILENAME, disposition)
        text = headers.get("content-type", "text/plain").split(";")[0].strip().lower() in ("text/plain", "")
        if name is not None and filename is None and text and len(data) <= _FIELD_LIMIT:
            if name in fields and name in _ONE_VALUE:
                raise BodyError(400, "spendgate_invalid_body", f"The form names its {name!r} field twice.")
            fields[name] = data.decode("utf-8", "replace")
        else:
            uploads.append(Upload(name or "", filename, headers.get("content-type"), len(data), wav_seconds(data)))
    return fields, uploads


def wav_seconds(data: bytes) -> float | None:
    """How long a WAV file plays at most, from its header; None for anything else.

    A decoder plays PCM at its sample rate whatever the header's byte rate says, and reads on past
    a data chunk's declared end (a second data chunk, a size the header got wrong): every byte
    from the first data chunk on counts, at the slowest rate the header allows."""
    if len(data) < 44 or data[:4] != b"RIFF" or data[8:12] != b"WAVE":
        return None
    pos, rate = 12, 0
    while pos + 8 <= len(data):
        chunk, size = data[pos:pos + 4], int.from_bytes(data[pos + 4:pos + 8], "little")
        if chunk == b"fmt " and size >= 16:
            f = data[pos + 8:pos + 8 + min(size, 40)]
            fmt, channels = int.from_bytes(f[0:2], "little"), int.from_bytes(f[2:4], "little")
            sample_rate, byte_rate = int.from_bytes(f[4:8], "little"), int.from_bytes(f[8:12], "little")
            block_align, bits = int.from_bytes(f[12:14], "little"), int.from_bytes(f[14:16], "little")
            if fmt == _WAVE_EXTENSIBLE and len(f) >= 26:
                fmt = int.from_bytes(f[24:26], "little")  # the sub-format GUID's first two bytes
            if fmt not in _PCM_FORMATS:
                return None  # compressed: only its frames say how long it plays
            rates = [r for r in (byte_rate, sample_rate * block_align, sample_rate * channels * bits // 8) if r > 0]
            rate = min(rates) if rates else 0
        elif chunk == b"data":
            if rate <= 0:
                return None
            return (len(data) - pos - 8) / rate  # a streaming WAV's size says 0xFFFFFFFF
        pos += 8 + size + (size & 1)
    return None
