"""What to alert, and when: a background evaluator that turns budgets, audit rows and finished
requests into Slack alerts (worded by `messages`, delivered by `slack`).

Every second or so it reads the budgets and sends one alert per (scope, threshold, period),
the first cap block of a scope per period (later blocks are counted and summarised hourly),
spend spikes per user (window vs the user's own baseline, once per episode), shadow traffic
(raw provider keys seen) and audit store failures. Each alert is first marked in the database
(`alerts_sent`, primary key = the event's dedupe key): the instance whose insert succeeds
sends it, so several gateways and restarts still send each alert once.

The request path only calls `observe_cap_block()` / `observe_shadow()` (through the `AlertFeed`
stage): a deque append, O(1), never raising.
"""

from __future__ import annotations

import collections
import logging
import os
import socket
import threading
from datetime import datetime, timedelta, timezone
from typing import Callable

from spendgate.alerts import messages as render
from spendgate.alerts.backstop import Backstop
from spendgate.alerts.dedupe import DedupeKey, resets_at
from spendgate.alerts.events import CapEvent, Event, ShadowEvent, UnpricedEvent
from spendgate.alerts.messages import Alert, alert_from_row
from spendgate.alerts.slack import SlackSender
from spendgate.alerts.spikes import find_spikes
from spendgate.periods import period_start
from spendgate.settings import Settings
from spendgate.store.alerts import AlertMarks
from spendgate.store.budgets import Blocked
from spendgate.store.models import utcnow
from spendgate.store.reports import Reports

log = logging.getLogger(__name__)

TICK_SECONDS = 1.0
SUMMARY_EVERY_SECONDS = 60.0
RETRY_EVERY_SECONDS = 30.0
MAX_DELIVERY_ATTEMPTS = 3
RETRY_BACKOFF = timedelta(seconds=60)
STALE_SENDING = timedelta(minutes=10)
MAX_EVENTS = 10_000
MAX_UNPRICED_A_DAY = 50  # distinct unpriced models alerted per instance per day


def instance_name() -> str:
    return f"{socket.gethostname()}:{os.getpid()}"


class AlertEvaluator:
    """Decides which alerts to send; `send` hands an alert to the Slack sender (normally `SlackSender.submit`).

    Args:
        settings: thresholds (`[alerts.slack].thresholds`) and spike settings (`[alerts.spike]`).
        marks: the `alerts_sent` marks ("sent once" across instances).
        reports: budgets past a threshold and recent activity per user.
        team_of: a user's team, for the message.
        send: non-blocking hand-off of an alert that this instance won the right to send.
        writer_healthy: whether the audit writer's last commit succeeded (ends a store-failing episode).
    """

    def __init__(
        self,
        settings: Settings,
        marks: AlertMarks,
        reports: Reports,
        team_of: Callable[[str], str | None],
        send: Callable[[Alert], object],
        *,
        writer_healthy: Callable[[], bool] = lambda: True,
        clock: Callable[[], datetime] = utcnow,
        interval: float = TICK_SECONDS,
        instance: str | None = None,
    ) -> None:
        self.settings = settings
        self.marks = marks
        self.reports = reports
        self.team_of = team_of
        self.send = send
        self.writer_healthy = writer_healthy
        self.clock = clock
        self.interval = interval
        self.instance = instance or instance_name()
        self.sender: SlackSender | None = None
        self.backstop: Backstop | None = None
        self._events: collections.deque[Event] = collections.deque(maxlen=MAX_EVENTS)
        self._known: set[str] = set()  # dedupe keys already claimed (by anyone): no INSERT per tick
        self._store_error: str | None = None
        self._store_alerted = False
        self._last_run: dict[str, datetime] = {}  # slower checks: spikes, summaries, retries
        self._failing: set[str] = set()
        self._unpriced_day = ""
        self._unpriced_seen: set[tuple[str, str]] = set()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    # -- inputs (any thread; O(1), never raise) --------------------------------

    def observe_cap_block(self, cap: Blocked, user: str | None, team: str | None, provider: str) -> None:
        """A request a cap refused."""
        self._events.append(CapEvent(cap, user, team, provider))

    def observe_shadow(self, user: str | None, team: str | None, provider: str, passthrough: bool,
                       at: datetime) -> None:
        """A request that carried the client's own provider key (passed through for BYOK keys, else refused)."""
        self._events.append(ShadowEvent(user, team, provider, passthrough, at))

    def observe_unpriced(self, provider: str, model: str) -> None:
        """A request served whose model has no known price (its cost is recorded as unknown)."""
        self._events.append(UnpricedEvent(provider, model))

    def on_store_error(self, error: str) -> None:
        """AuditWriter callback: a batch commit failed."""
        self._store_error = error

    # -- the loop ---------------------------------------------------------------

    def start(self) -> None:
        self._thread = threading.Thread(target=self._run, name="spendgate-alerting", daemon=True)
        self._thread.start()
        if self.sender is not None:
            self.sender.start()
        if self.backstop is not None:
            self.backstop.start()

    def stop(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(5)
            self._thread = None
        if self.backstop is not None:
            self.backstop.stop()
        if self.sender is not None:
            self.sender.stop()

    def _run(self) -> None:
        while not self._stop.wait(self.interval):
            self.tick()

    def tick(self, now: datetime | None = None) -> list[Alert]:
        """One evaluation pass; returns the alerts this instance sent. Each part fails on its own."""
        now = now or self.clock()
        sent: list[Alert] = []
        events = self._drain()
        parts: list[tuple[str, Callable[[], list[Alert]]]] = [
            ("store", lambda: self._store_failing(now)),
            ("thresholds", lambda: self._thresholds(now)),
            ("cap_blocked", lambda: self._cap_blocked([e for e in events if isinstance(e, CapEvent)], now)),
            ("shadow", lambda: self._shadow([e for e in events if isinstance(e, ShadowEvent)], now)),
            ("unpriced", lambda: self._unpriced([e for e in events if isinstance(e, UnpricedEvent)], now)),
        ]
        if self._due("spike", now, self.spike_every):
            parts.append(("spike", lambda: self._spikes(now)))
        if self._due("summaries", now, SUMMARY_EVERY_SECONDS):
            parts.append(("summaries", lambda: self._summaries(now)))
        if self._due("retries", now, RETRY_EVERY_SECONDS):
            parts.append(("retries", lambda: self._retries(now)))
        for name, part in parts:
            try:
                sent += part()
                if name in self._failing:
                    self._failing.discard(name)
                    log.info("alerting: %s checks work again", name)
            except Exception as e:
                if name not in self._failing:
                    self._failing.add(name)
                    log.warning("alerting: %s check failed: %s: %s", name, type(e).__name__, str(e)[:200])
        return sent

    def _due(self, part: str, now: datetime, every: float) -> bool:
        last = self._last_run.get(part)
        if last is not None and timedelta(0) <= now - last < timedelta(seconds=every):
            return False
        self._last_run[part] = now
        return True

    @property
    def spike_every(self) -> float:
        return min(15.0, max(1.0, self.settings.alerts.spike.window_seconds / 5))

    def _drain(self) -> list[Event]:
        out = []
        while True:
            try:
                out.append(self._events.popleft())
            except IndexError:
                return out

    # -- sending ----------------------------------------------------------------

    def emit(self, alert: Alert, now: datetime | None = None) -> bool:
        """Mark the alert in the database and, if this instance won the mark, send it."""
        if alert.dedupe_key in self._known:
            return False
        won = self._claim(alert, now)
        if won:
            self.send(alert)
        return won

    def _claim(self, alert: Alert, now: datetime | None, status: str = "sending") -> bool:
        """Insert the alert's "sent" mark; True if this instance won it."""
        won = self.marks.claim(alert.dedupe_key, alert.kind, alert.scope, alert.name, alert.text, alert.blocks_json(),
                               now=now, status=status)
        self._remember(alert.dedupe_key)
        return won

    def _remember(self, key: str) -> None:
        if len(self._known) > 50_000:
            self._known.clear()
        self._known.add(key)

    # -- thresholds -------------------------------------------------------------

    def _thresholds(self, now: datetime) -> list[Alert]:
        thresholds = sorted(self.settings.alerts.slack.thresholds, reverse=True)
        sent: list[Alert] = []
        if not thresholds:
            return sent
        # Zero caps are left out: they block everything, and the cap-blocked alert says so.
        for b in self.reports.crossed_budgets(now, thresholds[-1]):
            cap, spent = int(b["cap_nusd"]), int(b["spent_nusd"])
            crossed = [t for t in thresholds if spent * 100 >= t * cap]
            if not crossed:
                continue
            keys = {t: str(DedupeKey.threshold(b["scope"], b["name"], b["period"], b["period_start"], t))
                    for t in crossed}
            if all(k in self._known for k in keys.values()):
                continue
            team = self.team_of(b["name"]) if b["scope"] == "user" else None
            # The highest threshold crossed is sent; lower ones crossed in the same jump are folded
            # into it (marked, not sent), so one big request does not post three messages.
            top_done = False
            for t in crossed:
                if keys[t] in self._known:
                    top_done = True
                    continue
                alert = render.threshold_alert(b["scope"], b["name"], b["period"], t, spent, cap,
                                               b["period_start"], b["resets_at"], team)
                status = "folded" if top_done else "sending"
                won = self._claim(alert, now, status)
                if won and status == "sending":
                    self.send(alert)
                    sent.append(alert)
                top_done = True
        return sent

    # -- cap blocked --------------------------------------------------------------

    def _cap_blocked(self, events: list[CapEvent], now: datetime) -> list[Alert]:
        if not events:
            return []
        groups: dict[str, list[CapEvent]] = {}
        for e in events:
            start = period_start(e.cap.period, e.cap.resets_at - timedelta(microseconds=1))
            groups.setdefault(str(DedupeKey.cap_blocked(e.cap.scope, e.cap.name, e.cap.period, start)), []).append(e)
        sent: list[Alert] = []
        for key, evs in groups.items():
            n = len(evs)
            if key not in self._known:
                e, c = evs[0], evs[0].cap
                start = period_start(c.period, c.resets_at - timedelta(microseconds=1))
                team = e.team if c.scope == "user" else None
                alert = render.cap_blocked_alert(c.scope, c.name, c.period, c.spent_nusd, c.cap_nusd, start,
                                                 c.resets_at, e.user, team, e.provider)
                if self.emit(alert, now):
                    sent.append(alert)
                    n -= 1
            if n > 0:
                self.marks.bump(key, n, now)
        return sent

    def _summaries(self, now: datetime) -> list[Alert]:
        """At most hourly per cap: "N more requests blocked", sent by whichever instance claims the hour."""
        bucket = now.astimezone(timezone.utc).strftime("%Y-%m-%dT%H")
        sent: list[Alert] = []
        for row in self.marks.unreported("cap_blocked", now - timedelta(days=32)):
            key = DedupeKey.parse(row.dedupe_key)
            if key.is_summary or row.sent_at.strftime("%Y-%m-%dT%H") == bucket:
                continue  # the first alert went out this hour; summarise from the next one
            found = key.cap_period()
            period = found[0] if found else ""
            resets = resets_at(key)
            if resets is not None and resets <= now:
                continue  # that period is over: its cap no longer blocks anything
            new = row.count - row.reported_count
            alert = render.cap_blocked_summary(key, row.scope, row.name, period, new, row.count, row.sent_at,
                                               resets, bucket)
            if alert.dedupe_key in self._known:
                continue
            won = self._claim(alert, now)
            if won and self.marks.mark_reported(row.dedupe_key, row.reported_count, row.count):
                self.send(alert)
                sent.append(alert)
        return sent

    # -- shadow traffic -------------------------------------------------------------

    def _shadow(self, events: list[ShadowEvent], now: datetime) -> list[Alert]:
        if not events:
            return []
        groups: dict[tuple[str | None, str], list[ShadowEvent]] = {}
        for e in events:
            groups.setdefault((e.user, e.provider), []).append(e)
        day = now.astimezone(timezone.utc).date().isoformat()
        sent: list[Alert] = []
        for (user, provider), evs in groups.items():
            passthrough = sum(1 for e in evs if e.passthrough)
            alert = render.shadow_alert(user, provider, passthrough, len(evs) - passthrough, day, evs[0].team)
            n = len(evs)
            if alert.dedupe_key not in self._known and self.emit(alert, now):
                sent.append(alert)
                n -= 1  # the mark counts the first occurrence
            if n:
                self.marks.bump(alert.dedupe_key, n, now)
        return sent

    # -- unpriced models -----------------------------------------------------------------

    def _unpriced(self, events: list[UnpricedEvent], now: datetime) -> list[Alert]:
        """One alert per (provider, model) a day, gateway-wide; later requests are counted on its mark."""
        if not events:
            return []
        counts = collections.Counter((e.provider, e.model[:100]) for e in events)
        day = now.astimezone(timezone.utc).date().isoformat()
        if self._unpriced_day != day:
            self._unpriced_day, self._unpriced_seen = day, set()
        sent: list[Alert] = []
        for (provider, model), n in counts.items():
            if (provider, model) not in self._unpriced_seen:
                if len(self._unpriced_seen) >= MAX_UNPRICED_A_DAY:
                    continue  # model names come from clients: a flood of made-up ones is not a flood of alerts
                self._unpriced_seen.add((provider, model))
            alert = render.unpriced_alert(provider, model, n, day)
            if alert.dedupe_key not in self._known and self.emit(alert, now):
                sent.append(alert)
                n -= 1
            if n:
                self.marks.bump(alert.dedupe_key, n, now)
        return sent

    # -- audit store failing ----------------------------------------------------------

    def _store_failing(self, now: datetime) -> list[Alert]:
        error = self._store_error
        if error is None:
            return []
        if self.writer_healthy():
            # Writes succeed again: the episode is over; a new failure may alert again.
            self._store_error = None
            self._store_alerted = False
            return []
        if self._store_alerted:
            return []
        self._store_alerted = True
        alert = render.store_failing_alert(error, self.instance, now.astimezone(timezone.utc).strftime("%Y-%m-%dT%H"))
        try:
            won = self._claim(alert, now)
        except Exception:
            won = True  # the store itself is down, so no shared mark: each instance says so once
        if won:
            self.send(alert)
            return [alert]
        return []

    # -- spend spikes ---------------------------------------------------------------------

    def _spikes(self, now: datetime) -> list[Alert]:
        sp = self.settings.alerts.spike
        window = timedelta(seconds=sp.window_seconds)
        sent: list[Alert] = []
        for s in find_spikes(sp, self.reports, now):
            latest = self.marks.latest("spike", "user", s.user)
            if latest is not None and latest.last_at >= now - window:
                self.marks.bump(latest.dedupe_key, 1, now)  # the same episode goes on
                continue
            episode = self.marks.count("spike", "user", s.user) + 1
            alert = render.spike_alert(s.user, episode, sp.window_seconds, s.requests, s.cost_nusd, s.usual_requests,
                                       s.usual_cost_nusd, s.reasons, now - window, self.team_of(s.user))
            if self.emit(alert, now):
                sent.append(alert)
        return sent

    # -- failed deliveries ------------------------------------------------------------------

    def _retries(self, now: datetime) -> list[Alert]:
        sent: list[Alert] = []
        for row in self.marks.retryable(now, MAX_DELIVERY_ATTEMPTS, RETRY_BACKOFF, STALE_SENDING):
            if self.marks.reclaim(row.dedupe_key, row.status, row.attempts, now):
                alert = alert_from_row(row.kind, row.dedupe_key, row.scope, row.name, row.text, row.blocks)
                self.send(alert)
                sent.append(alert)
        return sent
