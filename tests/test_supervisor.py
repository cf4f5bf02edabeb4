"""Supervisor: restart with backoff, give up after N failures, transient isolation."""

import logging

import gevent
import pytest

from remote_gevent.agent.supervisor import Supervisor
from remote_gevent.wire.codes import AGENT_EXIT_SERVICE_FAILED


def make(**kw):
    fatal = []
    sup = Supervisor(on_fatal=fatal.append, backoff_initial=0.01, backoff_max=0.05, **kw)
    return sup, fatal


def test_crashing_service_is_logged_and_restarted(caplog):
    sup, fatal = make(max_failures=100)
    runs = []

    def flaky():
        runs.append(1)
        if len(runs) < 3:
            raise RuntimeError("boom %d" % len(runs))
        sup.stop_event.wait()

    with caplog.at_level(logging.WARNING, logger="remote_gevent.agent.supervisor"):
        sup.add("flaky", flaky)
        with gevent.Timeout(5):
            while len(runs) < 3:
                gevent.sleep(0.01)
        assert sup.stop(grace=2) is True
    assert len(runs) == 3 and not fatal
    crashes = [r for r in caplog.records if "service flaky crashed" in r.getMessage()]
    assert len(crashes) == 2 and crashes[0].exc_info is not None
    assert sup.services["flaky"].restarts == 2


def test_repeated_failure_shuts_down_with_nonzero_exit(caplog):
    sup, fatal = make(max_failures=3, failure_window=60)

    def always():
        raise ValueError("nope")

    with caplog.at_level(logging.CRITICAL, logger="remote_gevent.agent.supervisor"):
        sup.add("bad", always)
        with gevent.Timeout(5):
            while not fatal:
                gevent.sleep(0.01)
    assert fatal == [AGENT_EXIT_SERVICE_FAILED]
    assert sup.failed == "bad"
    assert any("failed 3 times" in r.getMessage() for r in caplog.records)
    sup.stop(grace=1)


def test_unexpected_return_is_logged(caplog):
    sup, fatal = make(max_failures=2)
    with caplog.at_level(logging.ERROR, logger="remote_gevent.agent.supervisor"):
        sup.add("quitter", lambda: None)
        with gevent.Timeout(5):
            while not fatal:
                gevent.sleep(0.01)
    assert any("returned unexpectedly" in r.getMessage() for r in caplog.records)
    sup.stop(grace=1)


def test_non_restartable_failure_is_fatal():
    sup, fatal = make()

    def once():
        raise RuntimeError("x")

    sup.add("once", once, restart=False)
    with gevent.Timeout(5):
        while not fatal:
            gevent.sleep(0.01)
    assert fatal == [AGENT_EXIT_SERVICE_FAILED]


def test_transient_error_ends_only_that_greenlet(caplog):
    sup, fatal = make()
    ticks = []

    def service():
        while not sup.stop_event.wait(0.01):
            ticks.append(1)

    def tunnel(n):
        gevent.sleep(0.01)
        raise ConnectionResetError("tunnel %d" % n)

    sup.add("svc", service)
    with caplog.at_level(logging.ERROR, logger="remote_gevent.agent.supervisor"):
        bad = sup.spawn_transient("tunnel-1", tunnel, 1)
        good = sup.spawn_transient("tunnel-2", gevent.sleep, 0.05)
        gevent.joinall([bad, good], timeout=5)
    assert bad.dead and good.dead and good.successful()
    assert any("tunnel-1 failed" in r.getMessage() for r in caplog.records)
    n = len(ticks)
    with gevent.Timeout(10, False):  # bounded: a loaded CI machine may delay its next tick
        while len(ticks) <= n:
            gevent.sleep(0.01)
    assert len(ticks) > n  # the service kept running
    assert not fatal
    assert sup.stop(grace=2) is True


def test_stop_waits_for_grace_then_kills():
    sup, _ = make()
    ended = []

    def slow_to_stop():
        sup.stop_event.wait()
        gevent.sleep(0.1)
        ended.append("slow")

    def stubborn():
        try:
            gevent.sleep(60)
        finally:
            ended.append("killed")

    sup.add("slow", slow_to_stop)
    sup.spawn_transient("stubborn", stubborn)
    gevent.sleep(0)
    t0 = gevent.get_hub().loop.now()
    assert sup.stop(grace=0.5) is False
    elapsed = gevent.get_hub().loop.now() - t0
    assert "slow" in ended and "killed" in ended
    assert 0.4 <= elapsed < 3


def test_stop_breaks_out_on_force():
    sup, _ = make()
    force = gevent.event.Event()
    sup.spawn_transient("stubborn", gevent.sleep, 60)
    gevent.spawn_later(0.1, force.set)
    with gevent.Timeout(5):
        assert sup.stop(grace=30, force=force) is False


def test_add_twice_refused():
    sup, _ = make()
    sup.add("a", sup.stop_event.wait)
    with pytest.raises(ValueError):
        sup.add("a", sup.stop_event.wait)
    sup.stop(grace=1)
    with pytest.raises(RuntimeError):
        sup.add("b", sup.stop_event.wait)
