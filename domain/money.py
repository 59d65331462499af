"""Money is an integer count of minor units plus an ISO 4217 currency. Never floats."""

from __future__ import annotations

from dataclasses import dataclass

MAX_INT64 = 2**63 - 1
# The largest integer every JSON reader holds exactly (a double's 53 bits: JavaScript's
# Number.MAX_SAFE_INTEGER); the OpenAPI document's bounds are doubles too.
MAX_JSON_INTEGER = 2**53 - 1


@dataclass(frozen=True)
class Currency:
    code: str
    exponent: int
    # Largest single payment we accept, in major units: guards against fat-finger amounts.
    max_major: int = 1_000_000

    @property
    def max_minor(self) -> int:
        return int(self.max_major * 10**self.exponent)


def _table(*rows: tuple[str, int, int]) -> dict[str, Currency]:
    return {code: Currency(code, exponent, max_major) for code, exponent, max_major in rows}


# ISO 4217 exponents (minor-unit digits). Limits scale with the unit's typical value.
CURRENCIES: dict[str, Currency] = _table(
    ("USD", 2, 1_000_000),
    ("EUR", 2, 1_000_000),
    ("GBP", 2, 1_000_000),
    ("CHF", 2, 1_000_000),
    ("CAD", 2, 1_000_000),
    ("AUD", 2, 1_000_000),
    ("NZD", 2, 1_000_000),
    ("SEK", 2, 10_000_000),
    ("NOK", 2, 10_000_000),
    ("DKK", 2, 10_000_000),
    ("PLN", 2, 5_000_000),
    ("CZK", 2, 25_000_000),
    ("MXN", 2, 20_000_000),
    ("BRL", 2, 5_000_000),
    ("INR", 2, 100_000_000),
    ("CNY", 2, 10_000_000),
    ("HKD", 2, 10_000_000),
    ("SGD", 2, 1_000_000),
    ("ZAR", 2, 20_000_000),
    ("JPY", 0, 150_000_000),
    ("KRW", 0, 1_000_000_000),
    ("CLP", 0, 1_000_000_000),
    ("ISK", 0, 150_000_000),
    ("VND", 0, 25_000_000_000),
    ("BHD", 3, 400_000),
    ("KWD", 3, 300_000),
    ("OMR", 3, 400_000),
    ("JOD", 3, 700_000),
    ("TND", 3, 3_000_000),
)


# The largest amount any currency accepts in one payment: the bound of every amount a client
# sends (a payment's own currency may allow less; a refund or dispute never returns more).
MAX_PAYMENT_MINOR = max(c.max_minor for c in CURRENCIES.values())


class UnknownCurrency(ValueError):
    pass


def currency(code: str) -> Currency:
    try:
        return CURRENCIES[code]
    except KeyError:
        raise UnknownCurrency(f"currency {code!r} is not supported") from None


@dataclass(frozen=True)
class Money:
    amount_minor: int
    currency: str

    def __post_init__(self) -> None:
        if not isinstance(self.amount_minor, int) or isinstance(self.amount_minor, bool):
            raise TypeError("money is an integer number of minor units")
        currency(self.currency)

    def __str__(self) -> str:
        exp = CURRENCIES[self.currency].exponent
        sign = "-" if self.amount_minor < 0 else ""
        major, minor = divmod(abs(self.amount_minor), 10**exp)
        return (
            f"{sign}{major}.{minor:0{exp}d} {self.currency}"
            if exp
            else f"{sign}{major} {self.currency}"
        )
