"""The per-request record the stages share (`flow.metadata["spendgate"]`), in typed parts.

Each part has one writer: `Routing` makes the Call, `Identity` sets `key`, `Policy` what the
request is, `Budgets` the `ask` (`Record` its result) and the `hold`, `Meter` the `metering`,
`Record` the `audit` state and the outcome of requests that reached an upstream, the `Pipeline`
the `timing`. A stage that refuses sets `outcome` through `refuse()`.
"""

from __future__ import annotations

import random
import time
from dataclasses import dataclass, field
from datetime import datetime
from decimal import Decimal
from enum import StrEnum
from typing import Any

from mitmproxy import http
from mitmproxy.connection import ConnectionState

from spendgate.keys import KeyRecord
from spendgate.money import Nano
from spendgate.pricing import CostSource
from spendgate.providers.errors import error_body
from spendgate.providers.stream import StreamTap
from spendgate.providers.wire import EndpointKind, Upload, Usage, UsageSource
from spendgate.settings import ProviderSettings
from spendgate.store.audit import AuditRow
from spendgate.store.budgets import Blocked, BudgetRef, ReserveRequest, ReserveResult
from spendgate.store.models import utcnow

META = "spendgate"
REQUEST_ID_HEADER = "x-spendgate-request-id"
OFF_LOOP_BYTES = 64 * 1024  # bodies larger than this are parsed / counted in a worker thread


class Outcome(StrEnum):
    COMPLETED = "completed"
    UPSTREAM_ERROR = "upstream_error"
    CLIENT_ABORTED = "client_aborted"
    BLOCKED_AUTH = "blocked_auth"
    BLOCKED_CAP = "blocked_cap"
    BLOCKED_RATE = "blocked_rate"
    BLOCKED_POLICY = "blocked_policy"
    GATEWAY_ERROR = "gateway_error"
    INCOMPLETE = "incomplete"

    @property
    def blocked(self) -> bool:
        return self.value.startswith("blocked_")


_ids = random.Random()  # seeded from os.urandom once: no system call per id


def new_request_id() -> str:
    """`sgr_`, the time in ms (12 hex digits), 48 random bits (12 more). Time-ordered, so each new
    audit row's primary key lands on the index's last page: a random id would dirty (and, in a
    large table, read from disk) a different page on every commit. Not a secret: it grants nothing."""
    return f"sgr_{time.time_ns() // 1_000_000:012x}{_ids.getrandbits(48):012x}"


@dataclass(slots=True)
class Timing:
    """Where the time went (perf_counter seconds). The pipeline adds each stage's time to `pre`
    (before the request leaves) or `post` (while its answer is settled)."""

    t0: float = field(default_factory=time.perf_counter)
    pre: float = 0.0
    post: float = 0.0
    first_chunk: float | None = None  # when the first streamed byte came from the upstream

    @property
    def overhead(self) -> float:
        return self.pre + self.post


@dataclass(slots=True)
class Hold:
    """The request's estimate, held against its caps until it is settled."""

    estimate_nusd: Nano
    refs: tuple[BudgetRef, ...] = ()
    remaining_nusd: int | None = None  # the tightest cap's headroom after this hold


@dataclass(slots=True)
class CapAsk:
    """What `Budgets` asks to hold before the request may go. `Record` takes it in the commit of the
    request's audit row (one round trip to the store, not two) and sets `result`; `BudgetAdmission`
    then admits, lowers the output limit or refuses."""

    request: ReserveRequest
    counted: Usage | None  # the exact estimate; None: an upper bound, counted exactly if it does not fit
    priced: bool = True  # False: nothing to price (a listing, an upgrade), only whether a cap is reached
    result: ReserveResult | None = None


@dataclass(slots=True)
class Metering:
    """What the request used, as the provider said or as estimated."""

    tap: StreamTap | None = None  # set for streamed answers
    added_usage: bool = False  # the gateway asked the stream for usage; the tap removes that event
    stream_bytes: int = 0
    usage: Usage | None = None
    source: UsageSource | None = None
    cost: Decimal | None = None
    cost_source: CostSource | None = None
    response_bytes: int = 0
    streamed_text: list[str] = field(default_factory=list)  # a WebSocket call's text (no tap), bounded
    streamed_bytes: int = 0


@dataclass(slots=True)
class Capture:
    """Prompt and completion kept for a key with content capture on (never for others)."""

    reason: str
    response: bytearray = field(default_factory=bytearray)


@dataclass(slots=True)
class AuditState:
    begun: bool = False  # its row was committed before the request went upstream
    begin_failed: str | None = None
    cut: set[str] = field(default_factory=set)  # columns cut to fit, over begin and completion
    row: AuditRow | None = None  # the completed row (metrics and alerts read it)


@dataclass
class Call:
    request_id: str
    provider: ProviderSettings
    host: str  # where the client's CONNECT went (normalised); the upstream override changes flow.request.host
    started_at: datetime = field(default_factory=utcnow)
    client_addr: str | None = None
    user_agent: str | None = None
    key: KeyRecord | None = None
    byok_key: str | None = field(default=None, repr=False)  # the client's own provider key (BYOK keys only)
    endpoint_kind: EndpointKind = EndpointKind.OTHER
    model_requested: str | None = None
    stream: bool = False
    max_output_tokens: int | None = None
    choices: int = 1  # answers asked for (n, best_of, candidateCount)
    thinking_budget: int = 0
    unmetered: str | None = None  # billable, but not priceable before it is sent (batches, fine_tuning, …)
    upgrade: bool = False  # a WebSocket upgrade: its model calls are admitted one by one (`Sockets`)
    body: dict[str, Any] | None = None  # the JSON body, or a form's text fields
    uploads: tuple[Upload, ...] = ()  # a form's files, measured
    body_bytes: int = 0  # the body's size once decoded (what its prompt can be at most)
    body_changed: bool = False  # a stage changed `body`: Forward re-encodes it
    output_limited: int | None = None  # the output limit the gateway lowered the request to
    request_bytes: int = 0
    outcome: Outcome | None = None  # set by a refusal, else when the request ends
    status_code: int | None = None
    error: str | None = None
    blocked: Blocked | None = None  # the cap that refused it
    ask: CapAsk | None = None
    hold: Hold | None = None
    metering: Metering = field(default_factory=Metering)
    capture: Capture | None = None
    audit: AuditState = field(default_factory=AuditState)
    timing: Timing = field(default_factory=Timing)
    finished: bool = False  # the pipeline ran every stage's `finish`

    @property
    def user(self) -> str | None:
        return self.key.user if self.key else None

    @property
    def byok_passthrough(self) -> bool:
        return self.byok_key is not None


def get_call(flow: http.HTTPFlow) -> Call | None:
    c = flow.metadata.get(META)
    return c if isinstance(c, Call) else None


def refuse(
    flow: http.HTTPFlow,
    call: Call,
    status: int,
    code: str,
    message: str,
    outcome: Outcome,
    headers: dict[str, str] | None = None,
) -> None:
    """Answer the client ourselves, in the provider's error shape; nothing goes upstream.

    Refused at its headers, the request is answered before its body is read (see `edge`), so a
    client waiting for `100 Continue` must not get one.
    """
    call.outcome = outcome
    call.status_code = status
    call.error = code
    flow.request.headers.pop("expect", None)
    flow.response = refusal_response(call, status, code, message, headers)


def refusal_response(call: Call, status: int, code: str, message: str,
                     headers: dict[str, str] | None = None) -> http.Response:
    hdrs = {"content-type": "application/json", REQUEST_ID_HEADER: call.request_id}
    if headers:
        hdrs.update(headers)
    return http.Response.make(status, error_body(call.provider.spec.family, status, code, message), hdrs)


def plain_response(status: int, text: str, headers: dict[str, str] | None = None) -> http.Response:
    """For answers that belong to no provider (CONNECT, other hosts): short text, with a request id."""
    hdrs = {"content-type": "text/plain", REQUEST_ID_HEADER: new_request_id()}
    if headers:
        hdrs.update(headers)
    return http.Response.make(status, f"Spendgate: {text}\n".encode(), hdrs)


def client_gone(flow: http.HTTPFlow) -> bool:
    msg = (flow.error.msg if flow.error else "").lower()
    return "client disconnected" in msg or flow.client_conn.state is ConnectionState.CLOSED
