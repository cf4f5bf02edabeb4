
import random
import time

import gevent
import pytest
from gevent.event import Event

from remote_gevent.common.retry import Backoff, sleep_or_stop


def test_plain_exponential_is_capped():
    b = Backoff(first=0.5, cap=4.0, factor=2, jitter=None)
    assert [b.next() for _ in range(6)] == [0.5, 1.0, 2.0, 4.0, 4.0, 4.0]
    b.reset()
    assert b.next() == 0.5


@pytest.mark.parametrize("jitter", ["full", "decorrelated", "equal"])
def test_jittered_delays_stay_in_bounds(jitter):
    b = Backoff(first=1.0, cap=60.0, jitter=jitter, rng=random.Random(7))
    delays = [b.next() for _ in range(200)]
    assert all(b.minimum <= d <= 60.0 for d in delays)
    assert delays[0] <= 1.0  # first retry within about a second
    assert len(set(delays[:10])) == 10  # really random, not a fixed schedule
    assert max(delays[20:]) > 30  # it does grow towards the cap


def test_full_jitter_spreads_a_fleet():
    # 100 devices reconnecting after a broker restart must not retry in lock-step.
    firsts = sorted(Backoff(first=1.0, rng=random.Random(i)).next() for i in range(100))
    assert firsts[0] < 0.2 and firsts[-1] > 0.8


def test_huge_attempt_count_does_not_overflow():
    b = Backoff(first=1.0, cap=60.0, jitter=None)
    b.attempts = 10 ** 6
    assert b.next() == 60.0


def test_bad_arguments_refused():
    with pytest.raises(ValueError):
        Backoff(first=0)
    with pytest.raises(ValueError):
        Backoff(jitter="bogus")


def test_sleep_or_stop_sleeps_full_delay_without_stop():
    t0 = time.monotonic()
    assert sleep_or_stop(0.2, Event()) is False
    assert 0.18 <= time.monotonic() - t0 < 1.0
    assert sleep_or_stop(0.01) is False


def test_sleep_or_stop_breaks_in_on_stop():
    stop = Event()
    gevent.spawn_later(0.1, stop.set)
    t0 = time.monotonic()
    assert sleep_or_stop(60.0, stop) is True
    assert time.monotonic() - t0 < 0.5


def test_sleep_or_stop_already_stopped_returns_at_once():
    stop = Event()
    stop.set()
    t0 = time.monotonic()
    assert sleep_or_stop(30.0, stop) is True
    assert time.monotonic() - t0 < 0.05
