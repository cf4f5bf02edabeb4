"""Supervision of the agent's greenlets.

Long-lived *services* (AMQP consumer, heartbeat, GC, …) are added with
``add(name, func)``; ``func`` is called without arguments and is expected to run
until ``supervisor.stop_event`` is set.  A service that raises is logged with its
traceback and restarted after a short, capped backoff; one that fails
``max_failures`` times within ``failure_window`` seconds (or any failure of a
service added with ``restart=False``) makes the supervisor give up: it calls
``on_fatal(exit_code)`` so the agent shuts down cleanly with a nonzero exit.
A service that returns while the agent is not stopping is logged and restarted
the same way: it never disappears silently.

*Transient* greenlets (one-off jobs such as the start-up memory release; tunnels run
in the TunnelManager's own greenlets) go into ``self.transients``, a
``gevent.pool.Group``: ``spawn_transient(name, func, *args)`` logs their error and
ends only that greenlet.
"""

import logging
import time
from collections import deque
from typing import Any, Callable, Deque, Dict, List, Optional

import gevent
import gevent.event
import gevent.pool

from remote_gevent.common.retry import Backoff
from remote_gevent.wire.codes import AGENT_EXIT_SERVICE_FAILED

log = logging.getLogger(__name__)

BACKOFF_INITIAL = 0.1  # seconds before the first restart
BACKOFF_MAX = 5.0  # cap of the restart backoff
MAX_FAILURES = 5  # failures within FAILURE_WINDOW that shut the agent down
FAILURE_WINDOW = 60.0
KILL_TIMEOUT = 2.0  # seconds to wait for killed greenlets to unwind


class Service:
    """Book-keeping for one supervised service."""

    def __init__(self, name: str, func: Callable[[], Any], restart: bool) -> None:
        self.name = name
        self.func = func
        self.restart = restart
        self.greenlet: Optional[gevent.Greenlet] = None
        self.failures: Deque[float] = deque()
        self.restarts = 0
        self.running = False


class Supervisor:
    def __init__(self, on_fatal: Optional[Callable[[int], None]] = None,
                 max_failures: int = MAX_FAILURES, failure_window: float = FAILURE_WINDOW,
                 backoff_initial: float = BACKOFF_INITIAL,
                 backoff_max: float = BACKOFF_MAX) -> None:
        self.stop_event = gevent.event.Event()
        self.transients = gevent.pool.Group()
        self.services: Dict[str, Service] = {}
        self.on_fatal = on_fatal
        self.max_failures = max_failures
        self.failure_window = failure_window
        self.backoff_initial = backoff_initial
        self.backoff_max = backoff_max
        self.failed: Optional[str] = None  # name of the service that made us give up

    # ------------------------------------------------------------------ services

    def add(self, name: str, func: Callable[[], Any], restart: bool = True) -> "Service":
        """Start ``func`` as the supervised service ``name``."""
        if name in self.services:
            raise ValueError("service %r already added" % name)
        if self.stop_event.is_set():
            raise RuntimeError("supervisor is stopping; cannot add %r" % name)
        svc = Service(name, func, restart)
        self.services[name] = svc
        svc.greenlet = gevent.spawn(self._run, svc)
        svc.greenlet.name = "service:%s" % name
        svc.greenlet.link_exception(self._runner_crashed)
        return svc

    def _run(self, svc: "Service") -> None:
        backoff = Backoff(first=self.backoff_initial, cap=self.backoff_max, jitter="equal",
                          minimum=min(0.01, self.backoff_initial))
        while not self.stop_event.is_set():
            started = time.monotonic()
            svc.running = True
            try:
                svc.func()
            except gevent.GreenletExit:
                raise
            except Exception:
                svc.running = False
                if self.stop_event.is_set():
                    log.exception("service %s failed while stopping", svc.name)
                    return
                log.exception("service %s crashed", svc.name)
            else:
                svc.running = False
                if self.stop_event.is_set():
                    log.debug("service %s stopped", svc.name)
                    return
                log.error("service %s returned unexpectedly", svc.name)
            if not svc.restart:
                self._give_up(svc, "service %s ended and is not restartable" % svc.name)
                return
            now = time.monotonic()
            if now - started > self.failure_window:
                backoff.reset()  # it ran fine for a while: start over
            svc.failures.append(now)
            while svc.failures and now - svc.failures[0] > self.failure_window:
                svc.failures.popleft()
            if len(svc.failures) >= self.max_failures:
                self._give_up(svc, "service %s failed %d times within %gs" % (
                    svc.name, len(svc.failures), self.failure_window))
                return
            delay = backoff.next()
            log.warning("restarting service %s in %.2fs", svc.name, delay)
            if self.stop_event.wait(delay):
                return
            svc.restarts += 1

    def _give_up(self, svc: "Service", reason: str) -> None:
        log.critical("%s: shutting the agent down", reason)
        if self.failed is None:
            self.failed = svc.name
            if self.on_fatal is not None:
                self.on_fatal(AGENT_EXIT_SERVICE_FAILED)

    def _runner_crashed(self, greenlet: gevent.Greenlet) -> None:
        # Only a bug in _run itself gets here; still never lose it silently.
        log.critical("supervisor runner %s died: %r", greenlet.name, greenlet.exception)
        if self.failed is None:
            self.failed = greenlet.name
            if self.on_fatal is not None:
                self.on_fatal(AGENT_EXIT_SERVICE_FAILED)

    # ------------------------------------------------------------------ transients

    def spawn_transient(self, name: str, func: Callable[..., Any], *args: Any,
                        **kwargs: Any) -> gevent.Greenlet:
        """Run ``func(*args, **kwargs)`` in the transient group; its error ends only it."""

        def guarded() -> Any:
            try:
                return func(*args, **kwargs)
            except gevent.GreenletExit:
                raise
            except Exception:
                log.exception("%s failed", name)
                return None

        g = self.transients.spawn(guarded)
        g.name = name
        return g

    # ------------------------------------------------------------------ stopping

    def greenlets(self) -> List[gevent.Greenlet]:
        alive = [s.greenlet for s in self.services.values() if s.greenlet is not None]
        return [g for g in alive + list(self.transients) if not g.dead]

    def stop(self, grace: float, force: Optional[gevent.event.Event] = None) -> bool:
        """Set ``stop_event``, wait up to ``grace`` s (or until ``force`` is set), then kill.

        Returns True if every greenlet ended by itself within the grace period.
        """
        self.stop_event.set()
        deadline = time.monotonic() + grace
        while True:
            pending = self.greenlets()
            if not pending:
                return True
            left = deadline - time.monotonic()
            if left <= 0 or (force is not None and force.is_set()):
                break
            objs: List[Any] = list(pending)
            if force is not None:
                objs.append(force)
            gevent.wait(objs, timeout=min(left, 0.5), count=1)
        names = sorted(g.name for g in pending)
        log.warning("killing %d greenlet(s) still running: %s", len(pending), ", ".join(names))
        gevent.killall(pending, block=True, timeout=KILL_TIMEOUT)
        left_over = [g.name for g in pending if not g.dead]
        if left_over:
            log.error("greenlet(s) ignored the kill: %s", ", ".join(sorted(left_over)))
        return False
