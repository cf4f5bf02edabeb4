"""The agent's ``alive`` messages (a mixin of :class:`~remote_gevent.agent.control.ControlPlane`).

The ``heartbeat`` service (:meth:`AliveSender.heartbeat_loop`) sends ``started`` once the
link is first up, then ``periodic`` every ``remote.health_check`` seconds (read live, so
SIGHUP changes the period); ``key_rotated`` and ``stopping`` are sent by the control
plane's rotation hook and the agent's stop hook.

Between two ``periodic`` alives, a session that starts or stops resuming (the tunnel
manager's ``on_sessions_changed`` → :meth:`AliveSender.poke_alive`) makes the heartbeat
send an alive with event ``sessions`` at once, so that ``watch`` shows it within a second
or two rather than after up to ``health_check`` (600 s by default). At most one such
alive per :data:`SESSIONS_ALIVE_INTERVAL`: pokes meanwhile are merged, so 100 sessions
that start resuming together cost one or two messages, never 100.

Every alive carries the agent's ``counters`` (agent/counters.py, docs/protocol.md §4),
and the same snapshot rewrites the node-exporter textfile when one is configured.
"""

import logging
import time
from typing import TYPE_CHECKING, Any

import gevent
import gevent.event
import gevent.lock

from remote_gevent.wire import protocol
from remote_gevent.agent import counters
from remote_gevent.agent.metrics_textfile import write_textfile
from remote_gevent.common.amqplink import NotConnected
from remote_gevent.common.broker_topology import EXCHANGE_UP

log = logging.getLogger("remote_gevent.agent.control")

EVENT_WAIT = 2.0  # s the "started" alive waits for the link
CONNECT_POLL = 1.0  # s slices of the heartbeat's wait for the first connection
HEARTBEAT_SLICE = 1.0  # s: the heartbeat re-reads health_check at least this often
SESSIONS_ALIVE_INTERVAL = 1.0  # s: at most one "sessions" alive per this period


class AliveSender:
    """``alive`` publishing; the control plane provides ``agent``, ``link``, ``topic``,
    ``counters`` and ``tunnels``, and calls :meth:`_init_alive` in its ``__init__``."""

    agent: Any
    link: Any
    counters: Any
    tunnels: Any
    _stopping: bool

    if TYPE_CHECKING:
        @property
        def topic(self) -> str: ...

    def _init_alive(self) -> None:
        self._seq = 0
        self._alive_lock = gevent.lock.Semaphore()
        self._started_sent = False
        self._poke = gevent.event.Event()
        self._last_sessions_alive = float("-inf")

    def poke_alive(self) -> None:
        """Ask for a ``sessions`` alive soon (any greenlet; never blocks, never sends)."""
        self._poke.set()

    def heartbeat_loop(self) -> None:
        """Service body: ``started`` once the link is first up, then ``periodic``, and
        ``sessions`` when poked (rate-limited)."""
        stop = self.agent.stop_event
        while not self.link.connected.is_set():
            if stop.wait(CONNECT_POLL):
                return
        if not self._started_sent:
            self._started_sent = True
            self._poke.clear()  # "started" carries the figures of now
            self.send_alive("started", wait=EVENT_WAIT)
        last = time.monotonic()
        while not stop.is_set():
            interval = float(self.agent.cfg.remote.health_check)
            due = last + interval
            now = time.monotonic()
            delay = due - now
            if delay > 0:
                self._wait_or_poke(min(delay, HEARTBEAT_SLICE), now)
                continue
            # Keep the cadence (no drift), but never send a burst to catch up.
            last = due if time.monotonic() - due < interval else time.monotonic()
            if not self._stopping:  # the stop hook sends "stopping" itself
                self._poke.clear()  # this alive carries the news too
                self.send_alive("periodic")

    def _wait_or_poke(self, timeout: float, now: float) -> None:
        """Wait up to ``timeout``; send a ``sessions`` alive if poked and allowed now.
        Always waits or sends: the heartbeat must never spin without yielding."""
        stop = self.agent.stop_event
        if self._stopping:  # the stop hook sends "stopping", with the final figures
            self._poke.clear()
            stop.wait(timeout)
            return
        allowed_at = self._last_sessions_alive + SESSIONS_ALIVE_INTERVAL
        if not self._poke.is_set():
            gevent.wait([stop, self._poke], timeout=timeout, count=1)
        elif now < allowed_at:  # poked, but too soon after the last one
            stop.wait(min(timeout, allowed_at - now))
        if self._poke.is_set() and not stop.is_set() and not self._stopping \
                and time.monotonic() >= allowed_at:
            self._poke.clear()
            self._last_sessions_alive = time.monotonic()
            self.send_alive("sessions")

    def send_alive(self, event: str, wait: float = 0.0) -> bool:
        """Publish one signed ``alive``; False (logged) if the link is down."""
        cfg = self.agent.cfg
        with self._alive_lock:
            self._seq += 1
            snap = counters.gather(self)
            raw = protocol.make_alive(
                self.agent.get_identity(), cfg.ident, cfg.remote.server_id, self.agent.version,
                self.agent.uptime, snap["open"] + snap["resuming"], snap["waiting"],
                cfg.remote.max_session, self._seq, event=event,
                counters=counters.for_alive(snap))
            try:
                self.link.publish(EXCHANGE_UP, self.topic + ".alive", raw, delivery_mode=1,
                                  expiration=2 * cfg.remote.health_check * 1000, wait=wait)
            except NotConnected as exc:
                self.counters["alive_dropped"] += 1
                log.debug("alive %d (%s) not sent: %s", self._seq, event, exc)
                snap["alive_dropped"] += 1
                write_textfile(cfg.remote.metrics_textfile, snap)
                return False
            self.counters["alive_sent"] += 1
            snap["alive_sent"] += 1
            write_textfile(cfg.remote.metrics_textfile, snap)
            return True
