"""spendgate.money: the only conversions between USD and nano-USD, exact both ways."""

from __future__ import annotations

from decimal import Decimal

import pytest

from spendgate.money import (
    MAX_NANO,
    NANO_PER_USD,
    Nano,
    as_float,
    dollars,
    parse_amount,
    parse_usd,
    to_nano,
    usd,
    usd_text,
)

NANO = NANO_PER_USD
CENT = NANO // 100


@pytest.mark.parametrize(("value", "amount"), [
    (2.1, Decimal("2.1")),  # through str(): no binary float error
    (0.1, Decimal("0.1")),
    ("12.50", Decimal("12.50")),
    (" 3 ", Decimal("3")),
    (7, Decimal(7)),
    (0, Decimal(0)),
    (Decimal("0.000000001"), Decimal("0.000000001")),
])
def test_parse_amount(value: object, amount: Decimal) -> None:
    got = parse_amount(value)
    assert got == amount and isinstance(got, Decimal)


@pytest.mark.parametrize("value", [-1, "-0.01", "nan", "inf", "Infinity", "", "ten", "1,000", True, None, [1], b"1"])
def test_parse_amount_refuses_what_is_not_an_amount(value: object) -> None:
    with pytest.raises(ValueError, match="not an amount"):
        parse_amount(value)


@pytest.mark.parametrize(("amount", "nano"), [
    (Decimal("1"), NANO),
    (Decimal("0.0000125"), 12_500),
    (Decimal("0.000000001"), 1),
    (Decimal("0.0000000005"), 0),  # half-even: ties go to the even neighbour
    (Decimal("0.0000000015"), 2),
    (Decimal("0.0000000025"), 2),
    (Decimal("1000"), 1000 * NANO),
    (Decimal("1E+3"), 1000 * NANO),
    (Decimal(0), 0),
])
def test_to_nano(amount: Decimal, nano: int) -> None:
    got = to_nano(amount)
    assert got == nano and type(got) is int


@pytest.mark.parametrize(("text", "nano"), [
    ("0.05", 50_000_000),
    ("12.50", 12 * NANO + 50 * CENT),
    ("1000", 1000 * NANO),
    ("0", 0),
    ("0.123456789", 123_456_789),
])
def test_parse_usd(text: str, nano: int) -> None:
    assert parse_usd(text) == nano


@pytest.mark.parametrize("text", ["-5", "five", "", "nan", "inf", "$5", "5 USD", "1e400000000000", "1e30"])
def test_parse_usd_errors(text: str) -> None:
    # ValueError only, which the CLI turns into "not a non-negative amount in USD" for the option
    with pytest.raises(ValueError, match="not an amount"):
        parse_usd(text)


def test_parse_usd_takes_up_to_the_largest_amount() -> None:
    assert parse_usd(usd_text(MAX_NANO)) == MAX_NANO
    with pytest.raises(ValueError):
        parse_usd(usd_text(MAX_NANO + 1))


@pytest.mark.parametrize(("nano", "amount", "text"), [
    (1000 * NANO, Decimal("1000"), "1000"),  # not 1E+3
    (10**6 * NANO, Decimal("1000000"), "1000000"),
    (NANO, Decimal("1"), "1"),
    (12_500, Decimal("0.0000125"), "0.0000125"),
    (1_234_500_000, Decimal("1.2345"), "1.2345"),
    (50 * CENT, Decimal("0.5"), "0.5"),
    (0, Decimal("0"), "0"),
    (-50 * CENT, Decimal("-0.5"), "-0.5"),
])
def test_usd_is_exact_and_plain(nano: int, amount: Decimal, text: str) -> None:
    got = usd(nano)
    assert got == amount and isinstance(got, Decimal)
    assert str(got) == text  # what a CLI prints or a JSON encoder writes
    assert usd_text(nano) == text
    assert to_nano(got) == nano  # and back, exactly


def test_usd_of_a_nano_dollar_is_exact_and_usd_text_plain() -> None:
    assert usd(1) == Decimal("0.000000001") and to_nano(usd(1)) == 1
    assert usd_text(1) == "0.000000001"  # str(Decimal) itself writes amounts this small as 1E-9


def test_usd_of_1000_prints_as_1000() -> None:
    assert usd(Nano(1_000_000_000_000)) == Decimal("1000")
    assert str(usd(1_000_000_000_000)) == "1000"
    assert f"{usd(1_000_000_000_000)}" == "1000"


@pytest.mark.parametrize(("nano", "places", "text"), [
    (1_234_567, 6, "0.001235"),  # rounded half-even, as budget messages show it
    (1_234_500, 6, "0.001234"),
    (1_234_567, 2, "0"),
    (1_234_567, None, "0.001234567"),
    (1000 * NANO, 6, "1000"),  # rounding never brings the exponent back
    (1000 * NANO + 1, 6, "1000"),
    (125 * CENT, 1, "1.2"),
    (NANO - 1, 6, "1"),
    (0, 6, "0"),
])
def test_usd_text_places(nano: int, places: int | None, text: str) -> None:
    assert usd_text(nano, places) == text
    assert "E" not in usd_text(nano, places)


@pytest.mark.parametrize(("nano", "text"), [
    (0, "$0.00"),
    (800_000_000, "$0.80"),
    (NANO, "$1.00"),
    (1_234_500_000, "$1.2345"),
    (1234, "$0.000001"),  # never "$0.00" for something that is not nothing
    (12_345 * NANO, "$12,345.00"),
    (to_nano(Decimal("12.5")), "$12.50"),  # USD amounts go through to_nano first
    (to_nano(Decimal("0.123456789")), "$0.123457"),
    (-50_000_000, "-$0.05"),
    (-1234, "-$0.000001"),
    (123_456_789 * NANO // 1000, "$123,456.79"),  # from $100 on, cents
])
def test_dollars(nano: int, text: str) -> None:
    assert dollars(nano) == text


def test_as_float_is_for_prometheus_only() -> None:
    assert as_float(1_250_000_000) == 1.25
    assert isinstance(as_float(Nano(1)), float)

