"""OpenAI's non-chat billable endpoints for the mock provider: images, audio, files, batches,
fine-tuning. Shapes follow the API reference (and the ``openai`` SDK's generated types).

Deterministic numbers (``t`` = the request's plan_tokens(), so scenario overrides apply):

* images (GPT image models): ``input_tokens = t.input`` (all text; edits add
  ``image_tokens = 1 + len(file) // 1024`` per uploaded image), ``output_tokens`` = the per-image
  count of OpenAI's table (low / medium / high: 272 / 1056 / 4160 square, 408 / 1584 / 6240
  for 1024x1536 and 1536x1024) times ``n``. DALL-E models answer without usage.
* speech: audio bytes (silent MP3 frames, WAV or raw PCM), ``chunks`` pieces; no usage in
  the body (``stream_format: "sse"``: ``speech.audio.delta`` / ``speech.audio.done`` with
  usage ``output_tokens = chunks``).
* transcriptions: text = the usual content pieces; ``whisper-1``: usage
  ``{"type": "duration", "seconds": len(file) / 32000}`` (16 kHz 16-bit mono);
  ``gpt-4o(-mini)-transcribe``: usage ``type: "tokens"`` with
  ``audio_tokens = max(1, len(file) // 400)``, ``text_tokens = len(prompt) // 4``,
  ``output_tokens = t.output``.
"""

from __future__ import annotations

import base64
import re
import struct
import time
import uuid
import zlib
from typing import TYPE_CHECKING, Any

from . import mock_provider as mp

if TYPE_CHECKING:
    from .mock_provider import RecordedRequest, _Handler

POST_SUFFIXES = (
    ("/images/generations", "images"), ("/images/edits", "image_edits"), ("/audio/speech", "speech"),
    ("/audio/transcriptions", "transcriptions"), ("/audio/translations", "translations"),
    ("/fine_tuning/jobs", "fine_tuning"), ("/batches", "batches"), ("/files", "files"),
)
_GET_RES = (
    (re.compile(r"/files/([^/]+)/content$"), "file_content"),
    (re.compile(r"/files/([^/]+)$"), "file"),
    (re.compile(r"/batches/([^/]+)$"), "batch"),
    (re.compile(r"/fine_tuning/jobs/([^/]+)$"), "fine_tuning_job"),
)

IMAGE_TOKENS = {  # gpt-image-1 output tokens per image (OpenAI image generation guide)
    "square": {"low": 272, "medium": 1056, "high": 4160},
    "portrait": {"low": 408, "medium": 1584, "high": 6240},
}
AUDIO_TYPES = {"mp3": "audio/mpeg", "opus": "audio/opus", "aac": "audio/aac", "flac": "audio/flac",
               "wav": "audio/wav", "pcm": "audio/pcm"}


def get_endpoint(path: str) -> str | None:
    for rx, ep in _GET_RES:
        if rx.search(path):
            return ep
    return None


def _id_from(path: str) -> str:
    for rx, _ in _GET_RES:
        m = rx.search(path)
        if m:
            return m.group(1)
    return ""


def parse_multipart(rec: RecordedRequest) -> tuple[dict[str, str], dict[str, list[tuple[str, str, bytes]]]]:
    """(fields, files) of a multipart/form-data body; files: name -> [(filename, type, bytes)]."""
    ctype = rec.headers.get("content-type", "")
    m = re.search(r'boundary="?([^";]+)"?', ctype)
    fields: dict[str, str] = {}
    files: dict[str, list[tuple[str, str, bytes]]] = {}
    if "multipart/form-data" not in ctype or not m:
        return fields, files
    sep = b"--" + m.group(1).encode()
    for part in rec.body.split(sep)[1:]:
        if part.startswith(b"--"):
            break
        head, _, data = part.partition(b"\r\n\r\n")
        if data.endswith(b"\r\n"):
            data = data[:-2]
        hdrs = {}
        for line in head.decode("utf-8", "replace").split("\r\n"):
            if ":" in line:
                k, v = line.split(":", 1)
                hdrs[k.strip().lower()] = v.strip()
        disp = hdrs.get("content-disposition", "")
        name = re.search(r'(?:^|;)\s*name="([^"]*)"', disp)
        filename = re.search(r'filename="([^"]*)"', disp)
        if not name:
            continue
        if filename:
            files.setdefault(name.group(1), []).append(
                (filename.group(1), hdrs.get("content-type", "application/octet-stream"), data))
        else:
            fields[name.group(1)] = data.decode("utf-8", "replace")
    return fields, files


def _not_found(h: _Handler, rec: RecordedRequest, what: str, ident: str) -> None:
    h._send_json(rec, 404, {"error": {"message": f"No such {what}: {ident}", "type": "invalid_request_error",
                                      "param": "id", "code": None}})


def _bad_request(h: _Handler, rec: RecordedRequest, message: str, param: str | None = None) -> None:
    h._send_json(rec, 400, {"error": {"message": message, "type": "invalid_request_error",
                                      "param": param, "code": None}})


def _send_bytes(h: _Handler, rec: RecordedRequest, data: bytes, content_type: str) -> None:
    headers = [("Content-Type", content_type), *h._provider_headers(rec), ("Content-Length", str(len(data)))]
    h._begin(rec, 200, headers)
    h._write(data)
    rec.chunk_times.append(time.monotonic())
    rec.response_body = rec.response_raw = data
    rec.completed = True


def tiny_png() -> bytes:
    """A valid 1x1 white PNG."""
    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))
    ihdr = struct.pack(">IIBBBBB", 1, 1, 8, 2, 0, 0, 0)
    return (b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", zlib.compress(b"\x00\xff\xff\xff"))
            + chunk(b"IEND", b""))


PNG_B64 = base64.b64encode(tiny_png()).decode()


# --------------------------------------------------------------------------- images


def _is_gpt_image(model: str) -> bool:
    return model.startswith(("gpt-image", "chatgpt-image"))


def _image_answer(h: _Handler, rec: RecordedRequest, params: dict[str, Any], image_tokens: int) -> None:
    sc, t = rec.scenario, rec.tokens
    model = str(params.get("model") or ("gpt-image-1" if rec.endpoint == "image_edits" else "dall-e-2"))
    rec.model = rec.model or model
    n = mp._positive_int(int(params["n"]) if str(params.get("n", "")).isdigit() else params.get("n"))
    rec.n = n
    created = int(rec.timestamp)
    if not _is_gpt_image(model):
        fmt = params.get("response_format") or "url"
        data = [({"b64_json": PNG_B64} if fmt == "b64_json" else
                 {"url": f"https://mock-provider.invalid/images/img-{rec.seq:06d}-{i}.png"}) for i in range(n)]
        if model == "dall-e-3":
            for d in data:
                d["revised_prompt"] = str(params.get("prompt") or "")
        rec.tokens["output_tokens"] = 0
        h._send_json(rec, 200, {"created": created, "data": data})
        return
    quality = params.get("quality") if params.get("quality") in ("low", "medium", "high") else "high"
    size = params.get("size") if params.get("size") not in (None, "auto") else "1024x1024"
    shape = "square" if size == "1024x1024" else "portrait"
    out = sc.output_tokens if sc.output_tokens is not None else IMAGE_TOKENS[shape][quality] * n
    text_tokens = t["input_tokens"]
    t["output_tokens"] = out
    usage = {"input_tokens": text_tokens + image_tokens,
             "input_tokens_details": {"image_tokens": image_tokens, "text_tokens": text_tokens},
             "output_tokens": out, "total_tokens": text_tokens + image_tokens + out}
    meta = {"background": params.get("background") or "opaque", "output_format": params.get("output_format") or "png",
            "quality": quality, "size": size}
    if rec.stream or str(params.get("stream")).lower() == "true":
        kind = "image_edit" if rec.endpoint == "image_edits" else "image_generation"
        events = []
        for i in range(int(params.get("partial_images") or 0)):
            events.append(mp._Event(mp._sse({"type": f"{kind}.partial_image", "b64_json": PNG_B64,
                                             "created_at": created, "partial_image_index": i, **meta},
                                            event=f"{kind}.partial_image"),
                                    content=True))
        done = {"type": f"{kind}.completed", "b64_json": PNG_B64, "created_at": created, **meta, "usage": usage}
        events.append(mp._Event(mp._sse(done, event=f"{kind}.completed"), content=True, final_usage=usage))
        h._send_stream(rec, events)
        return
    body = {"created": created, "background": meta["background"], "data": [{"b64_json": PNG_B64} for _ in range(n)],
            "output_format": meta["output_format"], "quality": quality, "size": size, "usage": usage}
    h._send_json(rec, 200, body, usage=usage)


def ep_images(h: _Handler, rec: RecordedRequest) -> None:
    payload = rec.json if isinstance(rec.json, dict) else None
    if payload is None or not payload.get("prompt"):
        _bad_request(h, rec, "Missing required parameter: 'prompt'.", "prompt")
        return
    _image_answer(h, rec, payload, 0)


def ep_image_edits(h: _Handler, rec: RecordedRequest) -> None:
    fields, files = parse_multipart(rec)
    images = files.get("image", []) + files.get("image[]", [])
    if not images:
        _bad_request(h, rec, "Missing required parameter: 'image'.", "image")
        return
    rec.model = fields.get("model") or "gpt-image-1"
    image_tokens = sum(1 + len(data) // 1024 for _, _, data in images) if _is_gpt_image(rec.model) else 0
    _image_answer(h, rec, fields, image_tokens)


# --------------------------------------------------------------------------- audio


def silent_audio(fmt: str, pieces: int, chars: int) -> list[bytes]:
    """``pieces`` chunks of silence in ``fmt`` (MP3 frames for mp3 and the compressed formats)."""
    frames = 1 + chars // 20
    if fmt in ("wav", "pcm"):
        pcm = [b"\x00\x00" * 2400 * frames for _ in range(pieces)]  # 24 kHz 16-bit mono, 0.1 s a frame
        if fmt == "pcm":
            return pcm
        size = sum(len(c) for c in pcm)
        header = (b"RIFF" + struct.pack("<I", 36 + size) + b"WAVEfmt "
                  + struct.pack("<IHHIIHH", 16, 1, 1, 24000, 48000, 2, 16) + b"data" + struct.pack("<I", size))
        return [header + pcm[0], *pcm[1:]]
    frame = b"\xff\xfb\x90\xc0" + b"\x00" * 413  # MPEG-1 Layer III, 128 kbit/s, 44.1 kHz, mono, silent
    return [frame * frames for _ in range(pieces)]


def ep_speech(h: _Handler, rec: RecordedRequest) -> None:
    payload = rec.json if isinstance(rec.json, dict) else None
    if payload is None or not isinstance(payload.get("input"), str) or not payload.get("voice"):
        _bad_request(h, rec, "Missing required parameter: 'input' or 'voice'.", "input")
        return
    fmt = payload.get("response_format") or "mp3"
    if fmt not in AUDIO_TYPES:
        _bad_request(h, rec, f"Invalid value: '{fmt}'.", "response_format")
        return
    rec.tokens["input_characters"] = len(payload["input"])
    chunks = silent_audio(fmt, rec.scenario.chunks, len(payload["input"]))
    if payload.get("stream_format") == "sse":
        t = rec.tokens
        usage = {"input_tokens": t["input_tokens"], "output_tokens": t["output_tokens"],
                 "total_tokens": t["input_tokens"] + t["output_tokens"]}
        events = [mp._Event(mp._sse({"type": "speech.audio.delta", "audio": base64.b64encode(c).decode()}),
                            content=True)
                  for c in chunks]
        events.append(mp._Event(mp._sse({"type": "speech.audio.done", "usage": usage}), final_usage=usage))
        h._send_stream(rec, events)
        return
    h._send_stream(rec, [mp._Event(c, content=True) for c in chunks], content_type=AUDIO_TYPES[fmt])


def ep_transcriptions(h: _Handler, rec: RecordedRequest) -> None:
    fields, files = parse_multipart(rec)
    if "file" not in files or not fields.get("model"):
        _bad_request(h, rec, "Missing required parameter: 'file' or 'model'.", "file")
        return
    sc, t = rec.scenario, rec.tokens
    audio = files["file"][0][2]
    rec.model = fields["model"]
    rec.model_reported = sc.model or rec.model
    pieces = mp.content_pieces(sc.chunks)
    text = "".join(pieces)
    fmt = fields.get("response_format") or "json"
    if rec.endpoint == "translations":
        if fmt in ("text", "srt", "vtt"):
            _send_bytes(h, rec, (text + "\n").encode(), "text/plain; charset=utf-8")
        else:
            h._send_json(rec, 200, {"text": text})
        return
    usage: dict[str, Any]
    if rec.model.startswith("whisper"):
        seconds = sc.audio_seconds if sc.audio_seconds is not None else round(len(audio) / 32000, 2)
        usage = {"type": "duration", "seconds": seconds}
    else:
        audio_tokens = sc.audio_input_tokens if sc.audio_input_tokens is not None else max(1, len(audio) // 400)
        text_tokens = len(fields.get("prompt", "")) // 4
        inp = sc.input_tokens if sc.input_tokens is not None else audio_tokens + text_tokens
        t["input_tokens"] = inp
        usage = {"type": "tokens", "input_tokens": inp,
                 "input_token_details": {"text_tokens": text_tokens, "audio_tokens": audio_tokens},
                 "output_tokens": t["output_tokens"], "total_tokens": inp + t["output_tokens"]}
    if fields.get("stream") == "true" and not rec.model.startswith("whisper"):
        events = [mp._Event(mp._sse({"type": "transcript.text.delta", "delta": p}), content=True) for p in pieces]
        events.append(mp._Event(mp._sse({"type": "transcript.text.done", "text": text, "usage": usage}),
                                final_usage=usage))
        h._send_stream(rec, events)
    elif fmt in ("text", "srt", "vtt"):
        _send_bytes(h, rec, (text + "\n").encode(), "text/plain; charset=utf-8")
    elif fmt == "verbose_json":
        duration = usage.get("seconds", round(len(audio) / 32000, 2))
        body = {"task": "transcribe", "language": fields.get("language") or "english", "duration": duration,
                "text": text, "segments": [{"id": 0, "seek": 0, "start": 0.0, "end": duration, "text": text,
                                            "tokens": [], "temperature": 0.0, "avg_logprob": -0.1,
                                            "compression_ratio": 1.0, "no_speech_prob": 0.0}], "usage": usage}
        h._send_json(rec, 200, body, usage=usage)
    else:
        h._send_json(rec, 200, {"text": text, "usage": usage}, usage=usage)


# --------------------------------------------------------------------------- files, batches, fine-tuning


def _new_id(prefix: str, rec: RecordedRequest) -> str:
    return f"{prefix}{rec.seq:06d}{uuid.uuid4().hex[:10]}"


def ep_files(h: _Handler, rec: RecordedRequest) -> None:
    fields, files = parse_multipart(rec)
    if "file" not in files or not fields.get("purpose"):
        _bad_request(h, rec, "Missing required parameter: 'file' or 'purpose'.", "file")
        return
    filename, _, data = files["file"][0]
    obj = {"id": _new_id("file-mock", rec), "object": "file", "bytes": len(data), "created_at": int(rec.timestamp),
           "filename": filename, "purpose": fields["purpose"], "status": "processed", "expires_at": None,
           "status_details": None}
    mock = h.server.mock
    with mock._lock:
        mock.files[obj["id"]] = {**obj, "content": data}
    h._send_json(rec, 200, obj)


def ep_file(h: _Handler, rec: RecordedRequest) -> None:
    f = h.server.mock.files.get(_id_from(rec.path))
    if f is None:
        _not_found(h, rec, "File object", _id_from(rec.path))
        return
    h._send_json(rec, 200, {k: v for k, v in f.items() if k != "content"})


def ep_file_content(h: _Handler, rec: RecordedRequest) -> None:
    f = h.server.mock.files.get(_id_from(rec.path))
    if f is None:
        _not_found(h, rec, "File object", _id_from(rec.path))
        return
    _send_bytes(h, rec, f["content"], "application/octet-stream")


def ep_batches(h: _Handler, rec: RecordedRequest) -> None:
    p = rec.json if isinstance(rec.json, dict) else {}
    missing = [k for k in ("input_file_id", "endpoint", "completion_window") if not p.get(k)]
    if missing:
        _bad_request(h, rec, f"Missing required parameter: '{missing[0]}'.", missing[0])
        return
    mock = h.server.mock
    model = None
    f = mock.files.get(p["input_file_id"])
    if f is not None:  # the model of the first request line, as the API reports it
        first = f["content"].split(b"\n", 1)[0]
        m = re.search(rb'"model"\s*:\s*"([^"]+)"', first)
        model = m.group(1).decode() if m else None
    created = int(rec.timestamp)
    batch = {"id": _new_id("batch_mock", rec), "object": "batch", "endpoint": p["endpoint"], "model": model,
             "errors": None, "input_file_id": p["input_file_id"], "completion_window": p["completion_window"],
             "status": "validating", "output_file_id": None, "error_file_id": None, "created_at": created,
             "in_progress_at": None, "expires_at": created + 86400, "finalizing_at": None, "completed_at": None,
             "failed_at": None, "expired_at": None, "cancelling_at": None, "cancelled_at": None,
             "request_counts": {"total": 0, "completed": 0, "failed": 0}, "usage": None,
             "metadata": p.get("metadata")}
    rec.model = rec.model or model
    with mock._lock:
        mock.batches[batch["id"]] = batch
    h._send_json(rec, 200, batch)


def ep_batch(h: _Handler, rec: RecordedRequest) -> None:
    b = h.server.mock.batches.get(_id_from(rec.path))
    if b is None:
        _not_found(h, rec, "batch", _id_from(rec.path))
        return
    h._send_json(rec, 200, b)


def ep_fine_tuning(h: _Handler, rec: RecordedRequest) -> None:
    p = rec.json if isinstance(rec.json, dict) else {}
    if not p.get("model") or not p.get("training_file"):
        _bad_request(h, rec, "Missing required parameter: 'model' or 'training_file'.", "training_file")
        return
    hyper = {"batch_size": "auto", "learning_rate_multiplier": "auto", "n_epochs": "auto",
             **(p.get("hyperparameters") or {})}
    method = p.get("method") or {"type": "supervised", "supervised": {"hyperparameters": hyper}}
    job = {"id": _new_id("ftjob-mock", rec), "object": "fine_tuning.job", "model": p["model"],
           "created_at": int(rec.timestamp), "finished_at": None, "fine_tuned_model": None,
           "organization_id": "org-mock", "result_files": [], "status": "validating_files",
           "validation_file": p.get("validation_file"), "training_file": p["training_file"],
           "hyperparameters": hyper, "trained_tokens": None, "error": None, "seed": p.get("seed", 42),
           "estimated_finish": None, "integrations": [], "metadata": p.get("metadata"), "method": method,
           "user_provided_suffix": p.get("suffix")}
    mock = h.server.mock
    with mock._lock:
        mock.fine_tuning_jobs[job["id"]] = job
    h._send_json(rec, 200, job)


def ep_fine_tuning_job(h: _Handler, rec: RecordedRequest) -> None:
    j = h.server.mock.fine_tuning_jobs.get(_id_from(rec.path))
    if j is None:
        _not_found(h, rec, "fine-tuning job", _id_from(rec.path))
        return
    h._send_json(rec, 200, j)


ENDPOINTS = {
    "images": ep_images, "image_edits": ep_image_edits, "speech": ep_speech,
    "transcriptions": ep_transcriptions, "translations": ep_transcriptions,
    "files": ep_files, "file": ep_file, "file_content": ep_file_content,
    "batches": ep_batches, "batch": ep_batch,
    "fine_tuning": ep_fine_tuning, "fine_tuning_job": ep_fine_tuning_job,
}
