"""The subscription's calendar and money rules (domain/subscription.py), pure: no stack."""

from __future__ import annotations

import re
from datetime import UTC, date, datetime

import pytest
from pydantic import ValidationError

from domain.payment import PAYMENT_ID_PATTERN
from domain.subscription import (
    Interval,
    SubscriptionRequest,
    SubscriptionState,
    SubscriptionStatus,
    boundary_date,
    change_adjustment,
    first_period,
    monthly_recurring_revenue,
    period_index_at,
    prorated,
    renewal_payment_id,
    round_half_up,
    subscription_id_for,
    total_over_limit,
)


def test_a_31st_anchor_bills_on_the_last_day_of_shorter_months_and_comes_back_to_the_31st() -> None:
    anchor = date(2026, 1, 31)
    dates = [boundary_date(anchor, Interval.MONTH, 1, k) for k in range(6)]
    assert dates == [
        date(2026, 1, 31),
        date(2026, 2, 28),
        date(2026, 3, 31),
        date(2026, 4, 30),
        date(2026, 5, 31),
        date(2026, 6, 30),
    ]
    # A leap year's February has its 29th.
    assert boundary_date(date(2028, 1, 31), Interval.MONTH, 1, 1) == date(2028, 2, 29)
    # Counted from the anchor, never from the clamped boundary before it.
    assert boundary_date(anchor, Interval.MONTH, 2, 1) == date(2026, 3, 31)
    assert boundary_date(anchor, Interval.MONTH, 1, -2) == date(2025, 11, 30)


def test_a_29_february_anchor_renews_yearly_on_28_february_until_the_next_leap_year() -> None:
    anchor = date(2024, 2, 29)
    assert [boundary_date(anchor, Interval.YEAR, 1, k) for k in range(5)] == [
        date(2024, 2, 29),
        date(2025, 2, 28),
        date(2026, 2, 28),
        date(2027, 2, 28),
        date(2028, 2, 29),
    ]


def test_days_and_weeks_are_fixed_lengths() -> None:
    anchor = date(2026, 3, 1)
    assert boundary_date(anchor, Interval.DAY, 3, 2) == date(2026, 3, 7)
    assert boundary_date(anchor, Interval.WEEK, 2, 1) == date(2026, 3, 15)


@pytest.mark.parametrize("interval", list(Interval))
@pytest.mark.parametrize("anchor", [date(1, 1, 1), date(2026, 1, 31), date(9999, 12, 31)])
def test_the_period_containing_a_day_is_found_for_any_anchor(
    interval: Interval, anchor: date
) -> None:
    for day in (date(2026, 2, 28), date(2026, 3, 1), date(2026, 12, 31)):
        k = period_index_at(anchor, interval, 1, day)
        assert (
            boundary_date(anchor, interval, 1, k) <= day < boundary_date(anchor, interval, 1, k + 1)
        )


def test_rounding_is_half_up_in_integers() -> None:
    assert [round_half_up(n, 2) for n in (1, 3, 5, -1, -3)] == [1, 2, 3, -1, -2]
    assert round_half_up(10, 3) == 3 and round_half_up(20, 3) == 7
    with pytest.raises(ValueError):
        round_half_up(1, 0)


def test_proration_is_the_days_left_share_rounded_half_up() -> None:
    assert prorated(1000, 15, 30) == 500
    assert prorated(999, 1, 30) == 33  # 33.3 → 33
    assert prorated(1001, 15, 30) == 501  # 500.5 → 501
    assert prorated(1000, 0, 30) == 0
    assert prorated(1000, 45, 30) == 1000  # never more than the whole period


def test_a_change_charges_the_new_part_and_credits_the_old_each_rounded_on_its_own() -> None:
    start, end = date(2026, 4, 1), date(2026, 5, 1)  # 30 days
    change_day = date(2026, 4, 21)  # 10 days left, the change day included
    up = change_adjustment(1000, 2500, change_day, start, end)
    assert up == prorated(2500, 10, 30) - prorated(1000, 10, 30) == 833 - 333
    down = change_adjustment(2500, 1000, change_day, start, end)
    assert down == -up  # a downgrade is the upgrade's credit exactly
    assert change_adjustment(1000, 1000, change_day, start, end) == 0
    # On the period's last day one day is left; past its end nothing is.
    assert change_adjustment(1000, 4000, date(2026, 4, 30), start, end) == 133 - 33
    assert change_adjustment(1000, 4000, end, start, end) == 0


def test_mrr_brings_every_interval_to_a_month() -> None:
    assert monthly_recurring_revenue(1000, Interval.MONTH, 1) == 1000
    assert monthly_recurring_revenue(3000, Interval.MONTH, 3) == 1000
    assert monthly_recurring_revenue(12_000, Interval.YEAR, 1) == 1000
    assert monthly_recurring_revenue(1000, Interval.WEEK, 1) == 4333  # 52 / 12
    assert monthly_recurring_revenue(100, Interval.DAY, 1) == 3042  # 365 / 12


def test_the_first_period_contains_the_trial_end_and_defaults_to_a_full_one() -> None:
    trial_end = datetime(2026, 2, 10, 9, 30, tzinfo=UTC)
    k, start, end = first_period(trial_end.date(), Interval.MONTH, 1, trial_end)
    assert (k, start, end) == (0, date(2026, 2, 10), date(2026, 3, 10))
    k, start, end = first_period(date(2026, 1, 31), Interval.MONTH, 1, trial_end)
    assert (start, end) == (date(2026, 1, 31), date(2026, 2, 28))


def _body(**overrides: object) -> dict[str, object]:
    body: dict[str, object] = {
        "customer_id": "cus_1",
        "merchant_id": "mer_1",
        "payment_method": "pm_card_visa",
        "unit_amount": 1000,
        "currency": "USD",
        "interval": "month",
    }
    body.update(overrides)
    return body


def test_the_request_takes_json_dates_and_intervals_and_refuses_what_the_schema_refuses() -> None:
    request = SubscriptionRequest.model_validate(_body(billing_anchor="2026-01-31", trial_days=14))
    assert request.billing_anchor == date(2026, 1, 31) and request.interval is Interval.MONTH
    for bad in (
        {"unit_amount": 0},
        {"unit_amount": 10.5},
        {"quantity": 0},
        {"interval": "fortnight"},
        {"trial_days": 731},
        {"currency": "usd"},
        {"payment_method": "4242424242424242"},
        {"extra": 1},
        {"billing_anchor": "2026-02-30"},
        {"billing_anchor": 0},
        {"billing_anchor": "1700000000"},
        {"billing_anchor": "2026-02-01T00:00:00"},
    ):
        with pytest.raises(ValidationError):
            SubscriptionRequest.model_validate(_body(**bad))
    # One unit over the currency's per-payment limit is refused; a product over it is the API's
    # 409 (a renewal is one payment), which JSON Schema cannot state.
    with pytest.raises(ValidationError):
        SubscriptionRequest.model_validate(_body(unit_amount=100_000_001))
    assert total_over_limit("USD", 100_000_000, 1) is None
    assert total_over_limit("USD", 50_000_001, 2) == 100_000_000


def test_the_fingerprint_tells_bodies_apart() -> None:
    one = SubscriptionRequest.model_validate(_body())
    assert one.fingerprint() == SubscriptionRequest.model_validate(_body()).fingerprint()
    assert one.fingerprint() != SubscriptionRequest.model_validate(_body(quantity=2)).fingerprint()


def test_ids_are_deterministic_scoped_and_renewals_are_payment_ids() -> None:
    sub = subscription_id_for("client-a", "key-00000001")
    assert sub == subscription_id_for("client-a", "key-00000001")
    assert sub != subscription_id_for("client-b", "key-00000001")
    ids = {renewal_payment_id(sub, period, attempt) for period in range(3) for attempt in range(3)}
    assert len(ids) == 9
    assert all(re.fullmatch(PAYMENT_ID_PATTERN, i) for i in ids)
    assert renewal_payment_id(sub, 1, 0) == renewal_payment_id(sub, 1, 0)


def test_mrr_counts_only_while_earning() -> None:
    now = datetime(2026, 1, 1, tzinfo=UTC)
    state = SubscriptionState(
        id="sub_x",
        client_id="c",
        request=SubscriptionRequest.model_validate(_body(quantity=3)),
        fingerprint="f",
        status=SubscriptionStatus.ACTIVE,
        created_at=now,
        updated_at=now,
        trial_end=now,
        billing_anchor=now.date(),
        unit_amount=1000,
        quantity=3,
        payment_method="pm_card_visa",
    )
    assert state.mrr == 3000
    for status in (
        SubscriptionStatus.TRIALING,
        SubscriptionStatus.PAUSED,
        SubscriptionStatus.CANCELED,
    ):
        assert state.model_copy(update={"status": status}).mrr == 0
    assert state.model_copy(update={"status": SubscriptionStatus.PAST_DUE}).mrr == 3000
