from __future__ import annotations

import pytest
import tenacity

from outbox.relay import delay_for, exponential_backoff


def test_exponential_wait_doubles_then_stops_at_the_cap() -> None:
    wait = tenacity.wait_exponential(multiplier=1, min=1, max=300)
    delays = [delay_for(wait, attempt) for attempt in range(1, 12)]
    assert delays == [1, 2, 4, 8, 16, 32, 64, 128, 256, 300, 300]


def test_multiplier_and_minimum_are_honoured() -> None:
    wait = tenacity.wait_exponential(multiplier=0.5, min=2, max=10)
    assert [delay_for(wait, a) for a in range(1, 7)] == [2, 2, 2, 4, 8, 10]


def test_default_backoff_grows_with_jitter_below_the_cap() -> None:
    wait = exponential_backoff()
    for attempt in range(1, 15):
        base = min(2 ** (attempt - 1), 300)
        samples = [delay_for(wait, attempt) for _ in range(20)]
        assert all(base <= d <= base + 0.5 for d in samples), (attempt, samples)
    # Jitter: not every sample is the same.
    assert len({delay_for(wait, 3) for _ in range(50)}) > 1


def test_fixed_and_chained_waits() -> None:
    assert delay_for(tenacity.wait_fixed(3), 1) == 3
    assert delay_for(tenacity.wait_fixed(3), 9) == 3
    chain = tenacity.wait_chain(tenacity.wait_fixed(1), tenacity.wait_fixed(5))
    assert [delay_for(chain, a) for a in (1, 2, 3)] == [1, 5, 5]


def test_negative_waits_become_zero() -> None:
    assert delay_for(tenacity.wait_fixed(-5), 1) == 0.0


@pytest.mark.parametrize("attempt", [1, 2, 40])
def test_result_is_a_float(attempt: int) -> None:
    assert isinstance(delay_for(tenacity.wait_exponential(max=60), attempt), float)
