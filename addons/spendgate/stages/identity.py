"""Stage: who is calling. Proxy credentials or a gateway key in the SDK's key slot.

Whatever credential the client sent is removed; the provider's upstream key is set
(or, for a BYOK key, the client's own provider key is kept). Non-model hosts need
valid proxy credentials at CONNECT: the gateway is never an open proxy.
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import logging
import time
import weakref
from collections.abc import Callable
from dataclasses import dataclass
from typing import Protocol
from urllib.parse import unquote

from mitmproxy import connection, http

from spendgate.keys import KeyRecord, contains_gateway_key, looks_like_gateway_key, parse_key
from spendgate.providers.credentials import KEY_HEADERS, KEY_QUERY_PARAMS, looks_like_provider_key, strip_bearer
from spendgate.stages.call import REQUEST_ID_HEADER, Outcome, get_call, new_request_id, refuse
from spendgate.store.models import utcnow

log = logging.getLogger(__name__)

NEGATIVE_CACHE_SECONDS = 1.0
_KEY_HEADERS_B = tuple((h, h.encode()) for h in KEY_HEADERS)  # in KEY_HEADERS' order of precedence


@dataclass(frozen=True)
class ProxyCred:
    username: str
    password: str
    malformed: bool = False

    @property
    def gateway_key(self) -> str | None:
        for part in (self.password, self.username):
            if looks_like_gateway_key(part):
                return part
        return None


def parse_proxy_authorization(value: str | None) -> ProxyCred | None:
    if not value:
        return None
    scheme, _, token = value.partition(" ")
    if scheme.lower() != "basic":
        return ProxyCred("", "", malformed=True)
    try:
        user, sep, pw = base64.b64decode(token.strip(), validate=True).decode("utf-8").partition(":")
    except (binascii.Error, UnicodeDecodeError, ValueError):
        return ProxyCred("", "", malformed=True)
    if not sep:
        return ProxyCred("", "", malformed=True)
    return ProxyCred(unquote(user), unquote(pw))


@dataclass(frozen=True)
class Verdict:
    key: KeyRecord | None
    status: int = 0
    code: str = ""
    message: str = ""

    @property
    def ok(self) -> bool:
        return self.key is not None


class Keys(Protocol):
    """What identity needs of the key registry (`spendgate.store.registry.KeyRegistry`)."""

    def get(self, key_id: str) -> KeyRecord | None: ...

    def load_one(self, key_id: str) -> KeyRecord | None: ...

    def mark_used(self, key_id: str) -> None: ...


class Identity:
    def __init__(self, keys: Keys, is_model_host: Callable[[str], bool], block_other_hosts: bool) -> None:
        self.keys = keys
        self.is_model_host = is_model_host
        self.block_other_hosts = block_other_hosts
        self._conn_creds: weakref.WeakKeyDictionary[connection.Client, ProxyCred | None] = weakref.WeakKeyDictionary()
        self._misses: dict[str, float] = {}

    # -- key resolution -------------------------------------------------------

    async def resolve(self, value: str) -> Verdict:
        """A gateway key string -> the key record, or why not."""
        parsed = parse_key(value)
        if parsed is None:
            return Verdict(None, 401, "spendgate_invalid_key",
                           "This is not a valid Spendgate key (expected sg_<id>_<secret>). "
                           "Check the key `spendgate keys create` printed.")
        now = utcnow()
        rec = self.keys.get(parsed.key_id)
        if rec is None or not rec.matches(parsed.secret, now):
            # Minted or rotated since the last registry poll: look again (bounded per key id).
            rec = await self._load_miss(parsed.key_id, parsed.secret) or rec
        if rec is None or not (rec.matches(parsed.secret, now)):
            return Verdict(None, 401, "spendgate_unknown_key",
                           "Unknown Spendgate key. Ask your admin for a key (`spendgate keys create`).")
        if rec.state == "revoked":
            return Verdict(None, 403, "spendgate_key_revoked",
                           f"Spendgate key {rec.key_id} has been revoked. Ask your admin for a new key.")
        if rec.expires_at is not None and rec.expires_at <= now:
            return Verdict(None, 403, "spendgate_key_expired",
                           f"Spendgate key {rec.key_id} expired at {rec.expires_at.isoformat()}. "
                           "Ask your admin for a new key.")
        return Verdict(rec)

    async def _load_miss(self, key_id: str, secret: str) -> KeyRecord | None:
        # A key minted or rotated since the last registry poll; at most one store look-up per key id
        # a second, so garbage keys cannot hammer the store.
        t = self._misses.get(key_id)
        now = time.monotonic()
        if t is not None and now - t < NEGATIVE_CACHE_SECONDS:
            return None
        try:
            rec = await asyncio.to_thread(self.keys.load_one, key_id)
        except Exception as e:
            log.warning("key lookup failed: %s", type(e).__name__)
            rec = None
        if rec is None or not rec.matches(secret, utcnow()):
            if len(self._misses) > 10_000:
                self._misses.clear()
            self._misses[key_id] = now
        return rec

    # -- CONNECT --------------------------------------------------------------

    async def http_connect(self, flow: http.HTTPFlow) -> None:
        cred = parse_proxy_authorization(flow.request.headers.get("proxy-authorization"))
        flow.request.headers.pop("proxy-authorization", None)
        self._conn_creds[flow.client_conn] = cred
        if flow.response is not None or self.is_model_host(flow.request.host):
            return  # a model host: identity is checked per request, so the SDK gets a provider-shaped answer
        await self._gate_other_host(flow, cred)

    async def _gate_other_host(self, flow: http.HTTPFlow, cred: ProxyCred | None) -> bool:
        if self.block_other_hosts:
            flow.response = http.Response.make(
                403, b"Spendgate: only model API hosts are allowed through this gateway.\n",
                {"content-type": "text/plain", REQUEST_ID_HEADER: new_request_id()},
            )
            return False
        key = cred.gateway_key if cred else None
        if key is None or not (await self.resolve(key)).ok:
            flow.response = http.Response.make(
                407, b"Spendgate: proxy authentication required (HTTPS_PROXY=http://USER:KEY@host:port).\n",
                {"proxy-authenticate": 'Basic realm="spendgate"', "content-type": "text/plain",
                 REQUEST_ID_HEADER: new_request_id()},
            )
            return False
        return True

    # -- requests -------------------------------------------------------------

    async def requestheaders(self, flow: http.HTTPFlow) -> None:
        if flow.response is not None:
            return
        request_cred = None
        if "proxy-authorization" in flow.request.headers:
            request_cred = parse_proxy_authorization(flow.request.headers.pop("proxy-authorization"))
        call = get_call(flow)
        if call is None:
            # Plain-HTTP proxying of a non-model host (a CONNECT was checked at CONNECT time).
            if not flow.client_conn.tls_established and flow.client_conn not in self._conn_creds:
                await self._gate_other_host(flow, request_cred)
            return
        provider = call.provider

        cred = request_cred or self._conn_creds.get(flow.client_conn)
        client_keys = self._take_client_keys(flow)
        foreign = [k for k in client_keys if not looks_like_gateway_key(k) and looks_like_provider_key(k)]
        gateway_keys = [k for k in client_keys if looks_like_gateway_key(k)]

        verdict: Verdict | None = None
        if cred is not None and (cred.malformed or cred.gateway_key is None):
            if not gateway_keys:
                refuse(flow, call, 401, "spendgate_bad_proxy_credentials",
                       "Proxy credentials are malformed or carry no Spendgate key. Use HTTPS_PROXY=http://USER:sg_...@host:port.",
                       Outcome.BLOCKED_AUTH)
                return
        if cred is not None and cred.gateway_key is not None:
            verdict = await self.resolve(cred.gateway_key)
        elif gateway_keys:
            verdict = await self.resolve(gateway_keys[0])

        if verdict is None:
            if foreign:
                refuse(flow, call, 403, "spendgate_foreign_key",
                       "Provider API keys are not accepted by this gateway; use your Spendgate key (sg_...) instead.",
                       Outcome.BLOCKED_POLICY)
            elif client_keys:
                refuse(flow, call, 401, "spendgate_invalid_key",
                       "This is not a valid Spendgate key (expected sg_<id>_<secret>). "
                       "Check the key `spendgate keys create` printed.",
                       Outcome.BLOCKED_AUTH)
            else:
                refuse(flow, call, 401, "spendgate_no_key",
                       "No Spendgate key. Put your sg_... key in HTTPS_PROXY (http://USER:KEY@host:port) "
                       "or use it as the API key.",
                       Outcome.BLOCKED_AUTH)
            return
        if not verdict.ok:
            refuse(flow, call, verdict.status, verdict.code, verdict.message, Outcome.BLOCKED_AUTH)
            return
        key = verdict.key
        assert key is not None
        call.key = key
        self.keys.mark_used(key.key_id)

        if foreign:
            if not key.byok:
                refuse(flow, call, 403, "spendgate_foreign_key",
                       f"Provider API keys are not accepted for {key.user}; "
                       "remove it and let the gateway supply the key "
                       "(or ask your admin for a --byok key).",
                       Outcome.BLOCKED_POLICY)
                return
            call.byok_key = foreign[0]  # sent upstream by `forward`, never recorded
            return
        if not provider.api_key:
            refuse(flow, call, 503, "spendgate_upstream_key_missing",
                   f"The gateway has no upstream API key for {provider.name}; "
                   f"an admin must set providers.{provider.name}.api_key.",
                   Outcome.GATEWAY_ERROR)

    def _take_client_keys(self, flow: http.HTTPFlow) -> list[str]:
        """Every credential the client put in the request, removed from it.

        The SDKs' key slots are read in order of precedence; a gateway key anywhere else (another
        header, any query parameter, whatever its encoding) is removed too: it never leaves.
        """
        found: list[str] = []
        headers = flow.request.headers
        names = {k.lower() for k, _ in headers.fields}  # one pass over the raw fields
        for h, hb in _KEY_HEADERS_B:
            if hb not in names:
                continue
            for v in headers.get_all(h):
                v = strip_bearer(v) if h == "authorization" else v.strip()
                if v and v not in found:
                    found.append(v)
            headers.pop(h, None)
        stray = [k for k, v in headers.fields if contains_gateway_key(v)]
        for k in stray:
            headers.pop(k.decode("latin-1"), None)  # e.g. `x-foo: sg_…`: forwarded, it would leave the gateway
        path = flow.request.path
        if "?" not in path:
            return found
        kept: list[tuple[str, str]] = []
        changed = False
        for name, value in flow.request.query.items(multi=True):  # names and values percent-decoded
            if name.strip().lower() in KEY_QUERY_PARAMS:
                changed = True
                if value and value not in found:
                    found.append(value)
            elif contains_gateway_key(name) or contains_gateway_key(value):
                changed = True
            else:
                kept.append((name, value))
        if changed:
            flow.request.query = kept
        return found

