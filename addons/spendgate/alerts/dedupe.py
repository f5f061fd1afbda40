"""The event an alert is about, as a `DedupeKey` built and parsed only here.

The key is the primary key of the alert's "sent" mark, so the event is sent once however many
gateway instances see it.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime, timezone

from spendgate.periods import period_end, period_start

__all__ = ["DedupeKey", "resets_at"]


@dataclass(frozen=True)
class DedupeKey:
    """Names one alertable event; `str()` is the stored form, `parse()` reads it back.

    >>> k = DedupeKey.cap_blocked("user", "a:b", "day", datetime(2026, 11, 25, tzinfo=timezone.utc))
    >>> str(k), DedupeKey.parse(str(k)) == k
    ('cap_blocked:user:a:b:day:2026-11-25', True)
    """

    kind: str
    parts: tuple[str, ...]

    def __str__(self) -> str:
        return ":".join((self.kind, *self.parts))

    @classmethod
    def parse(cls, text: str) -> DedupeKey:
        kind, _, rest = text.partition(":")
        if kind not in _NAME_AT:
            return cls(kind, tuple(rest.split(":")) if rest else ())
        before, after = _NAME_AT[kind]
        head: list[str] = []
        for _ in range(before):
            part, _, rest = rest.partition(":")
            head.append(part)
        # A name may hold ":"; the parts after it (periods, dates, counts, providers) never do.
        if kind == "cap_blocked":
            pieces = rest.rsplit(":", after + 2)
            if len(pieces) == after + 3 and pieces[-2] == "summary":
                return cls(kind, (*head, *pieces))
        return cls(kind, (*head, *rest.rsplit(":", after)))

    @staticmethod
    def _day(d: datetime) -> str:
        return d.astimezone(timezone.utc).date().isoformat()

    @classmethod
    def threshold(cls, scope: str, name: str, period: str, start: datetime, threshold: int) -> DedupeKey:
        return cls("threshold", (scope, name, period, cls._day(start), str(threshold)))

    @classmethod
    def cap_blocked(cls, scope: str, name: str, period: str, start: datetime) -> DedupeKey:
        return cls("cap_blocked", (scope, name, period, cls._day(start)))

    def summary(self, hour: str) -> DedupeKey:
        """The hourly "N more blocked" that follows a cap-blocked alert."""
        return DedupeKey(self.kind, (*self.parts, "summary", hour))

    @property
    def is_summary(self) -> bool:
        return self.kind == "cap_blocked" and len(self.parts) == 6 and self.parts[4] == "summary"

    def cap_period(self) -> tuple[str, datetime] | None:
        """(period, period start) of a cap-blocked key; None for other kinds."""
        if self.kind != "cap_blocked" or self.is_summary or len(self.parts) != 4:
            return None
        try:
            start = datetime.fromisoformat(self.parts[3]).replace(tzinfo=timezone.utc)
        except ValueError:
            return None
        return self.parts[2], start

    @classmethod
    def spike(cls, user: str, episode: int) -> DedupeKey:
        return cls("spike", ("user", user, str(episode)))

    @classmethod
    def backstop(cls, what: str, provider: str, day: str) -> DedupeKey:
        return cls("backstop", (what, provider, day))

    @classmethod
    def shadow(cls, name: str, provider: str, day: str) -> DedupeKey:
        return cls("shadow_traffic", (name, provider, day))

    @classmethod
    def unpriced(cls, provider: str, model: str, day: str) -> DedupeKey:
        return cls("unpriced_model", (provider, model, day))

    @classmethod
    def store_failing(cls, hour: str) -> DedupeKey:
        return cls("store_failing", (hour,))


# Kinds whose parts hold a free-text name: (parts before it, parts after it).
_NAME_AT = {"threshold": (1, 3), "cap_blocked": (1, 2), "spike": (1, 1), "shadow_traffic": (0, 2),
            "unpriced_model": (1, 1)}


def resets_at(key: DedupeKey) -> datetime | None:
    """When the cap of a cap-blocked key resets."""
    found = key.cap_period()
    return period_end(found[0], period_start(found[0], found[1])) if found else None
