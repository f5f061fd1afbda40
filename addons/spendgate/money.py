"""Money: the only conversions between USD and the gateway's integer nano-USD.

Amounts are kept as integer nano-USD (`Nano`) from genai-prices to the database: exact on SQLite
and PostgreSQL, summable, and far below BIGINT for any real cap. `Decimal` USD exists only at the
edges: prices, config and CLI input, and what people read.
"""

from __future__ import annotations

from decimal import Decimal, InvalidOperation
from typing import NewType

Nano = NewType("Nano", int)

NANO_PER_USD = 1_000_000_000
_PER_USD = Decimal(NANO_PER_USD)
MAX_NANO = Nano(2**62)  # fits BIGINT with room for sums


def parse_amount(value: object) -> Decimal:
    """A non-negative USD amount from config or CLI text; ValueError otherwise.

    >>> parse_amount(2.1), parse_amount("12.50")
    (Decimal('2.1'), Decimal('12.50'))
    """
    # str() first: Decimal(2.1) would carry the float's binary error into every bill.
    if isinstance(value, bool) or not isinstance(value, (int, float, str, Decimal)):
        raise ValueError(f"not an amount: {value!r}")
    try:
        result = Decimal(str(value).strip())
    except InvalidOperation:
        raise ValueError(f"not an amount: {value!r}") from None
    if not result.is_finite() or result < 0:
        raise ValueError(f"not an amount: {value!r}")
    return result


def to_nano(usd: Decimal) -> Nano:
    """USD (any precision) to nano-USD, rounded half-even.

    >>> to_nano(Decimal("0.0000125"))
    12500
    """
    return Nano(int((usd * _PER_USD).to_integral_value()))


def parse_usd(text: str) -> Nano:
    """USD text (CLI, config) to nano-USD, exactly; ValueError for anything else.

    >>> parse_usd("0.05")
    50000000
    """
    amount = parse_amount(text)
    try:
        nano = to_nano(amount)
    except ArithmeticError:  # "1e400000000000": beyond what Decimal computes with
        raise ValueError(f"not an amount: {text!r}") from None
    if nano > MAX_NANO:  # would not fit the database's BIGINT
        raise ValueError(f"not an amount: {text!r} (too large)")
    return nano


def usd(nano: Nano | int) -> Decimal:
    """Nano-USD as exact USD, without trailing zeros.

    >>> usd(12500), usd(0), usd(1_000_000_000_000)
    (Decimal('0.0000125'), Decimal('0'), Decimal('1000'))
    """
    d = (Decimal(int(nano)) / _PER_USD).normalize()
    if not d:
        return Decimal(0)
    exponent = d.as_tuple().exponent
    return d.quantize(Decimal(1)) if isinstance(exponent, int) and exponent > 0 else d  # 1000, not 1E+3


def usd_text(nano: Nano | int, places: int | None = None) -> str:
    """Nano-USD as plain decimal text (never `1E+3`), exact or rounded to `places`.

    >>> usd_text(1_234_500_000), usd_text(1_000_000_000_000), usd_text(1_234_567, places=6)
    ('1.2345', '1000', '0.001235')
    """
    d = usd(nano)
    if places is not None:
        d = usd(to_nano(d.quantize(Decimal(1).scaleb(-places))))
    return format(d, "f")


def as_float(nano: Nano | int) -> float:
    """For Prometheus, which only has floats."""
    return int(nano) / NANO_PER_USD


def dollars(nano: Nano | int) -> str:
    """For people (Slack): cents when exact, else up to 6 decimals.

    >>> dollars(800_000_000), dollars(12_500_000_000), dollars(1234), dollars(-50_000_000)
    ('$0.80', '$12.50', '$0.000001', '-$0.05')
    """
    amount = usd(nano)
    cents = amount.quantize(Decimal("0.01"))
    if cents == amount or abs(amount) >= 100:
        return f"${cents:,.2f}" if amount >= 0 else f"-${-cents:,.2f}"
    fine = amount.quantize(Decimal("0.000001"))
    if fine == 0 and amount != 0:
        fine = Decimal("0.000001") if amount > 0 else Decimal("-0.000001")
    text = format(fine.normalize(), "f")
    if "." not in text or len(text.split(".")[1]) < 2:
        text = format(fine.quantize(Decimal("0.01")), "f")
    return f"${text}" if fine >= 0 else f"-${text[1:]}"
