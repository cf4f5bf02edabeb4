"""The one retry helper: exponential backoff, capped, jittered, interruptible.

Every reconnect loop in the project (the AMQP link, supervisor restarts) uses
:class:`Backoff` for *how long* to wait and :func:`sleep_or_stop` for *waiting*, so that
a shutdown request breaks in at once instead of after a 60 s sleep.

Jitter matters: after a broker restart every device in the fleet reconnects; without
jitter they all come back in lock-step waves (kombu's ``retry_over_time`` has none).

- ``"full"`` (default): ``uniform(minimum, min(cap, first * factor**n))`` — AWS
  "full jitter"; the best spread, the expected delay is half the exponential one.
- ``"decorrelated"``: ``min(cap, uniform(first, previous * 3))`` — AWS "decorrelated
  jitter"; grows from the previous delay rather than from the attempt count (the very
  first delay is ``uniform(minimum, first)`` as with full jitter).
- ``"equal"``: half fixed, half random — never shorter than half the exponential delay.
- ``None``: plain capped exponential (tests, or when determinism is wanted).
"""

import random
import time
from typing import Any, Optional

import gevent

#: Longest single wait, so that even an object without a working ``wait`` (or a
#: missed wake-up) delays a shutdown by at most this much.
MAX_SLICE = 0.5

JITTERS = ("full", "decorrelated", "equal", None)


class Backoff:
    """Successive retry delays; call :meth:`next` before each retry, :meth:`reset` on success.

    ``first`` is the base of the first delay (kept between 0.5 and 1.0 s by callers that
    promise "first retry within about a second"), ``cap`` the longest delay, ``factor``
    the growth per attempt, ``minimum`` a floor so that full jitter never spins.
    """

    def __init__(self, first: float = 1.0, cap: float = 60.0, factor: float = 2.0,
                 jitter: Optional[str] = "full", minimum: float = 0.05,
                 rng: Optional[random.Random] = None) -> None:
        if first <= 0 or cap <= 0 or factor < 1:
            raise ValueError("backoff needs first > 0, cap > 0, factor >= 1")
        if jitter not in JITTERS:
            raise ValueError("jitter must be one of %r, not %r" % (JITTERS, jitter))
        self.first = float(first)
        self.cap = float(cap)
        self.factor = float(factor)
        self.jitter = jitter
        self.minimum = min(float(minimum), self.first, self.cap)
        self._rng = rng or random.Random()
        self.attempts = 0
        self._previous = self.first

    def reset(self) -> None:
        """Start over (call after a successful attempt)."""
        self.attempts = 0
        self._previous = self.first

    def _exponential(self) -> float:
        # Bound the exponent so factor**n never overflows on a very long outage.
        n = min(self.attempts, 64)
        return min(self.cap, self.first * (self.factor ** n))

    def next(self) -> float:
        """The delay before the next attempt, in seconds (always within [minimum, cap])."""
        if self.jitter == "decorrelated" and self.attempts == 0:
            # Same promise as full jitter: the first retry comes within ``first``.
            delay = self._rng.uniform(self.minimum, self.first)
        elif self.jitter == "decorrelated":
            upper = max(self.first, self._previous * 3)
            delay = min(self.cap, self._rng.uniform(self.first, upper))
        else:
            base = self._exponential()
            if self.jitter == "full":
                delay = self._rng.uniform(self.minimum, base)
            elif self.jitter == "equal":
                delay = base / 2 + self._rng.uniform(0, base / 2)
            else:
                delay = base
        delay = max(self.minimum, min(self.cap, delay))
        self._previous = delay
        self.attempts += 1
        return delay

    __next__ = next

    def __iter__(self) -> "Backoff":
        return self


def sleep_or_stop(delay: float, stop_event: Optional[Any] = None) -> bool:
    """Wait ``delay`` seconds unless ``stop_event`` gets set; True means "stop requested".

    ``stop_event`` is a ``gevent.event.Event`` (or anything with ``is_set`` and
    ``wait(timeout)``, e.g. a monkey-patched ``threading.Event``). The wait happens in
    slices of at most :data:`MAX_SLICE` so a shutdown breaks in immediately::

        while True:
            try:
                return connect()
            except OSError:
                if sleep_or_stop(backoff.next(), stop):
                    return None
    """
    if stop_event is None:
        gevent.sleep(max(0.0, delay))
        return False
    deadline = _now() + max(0.0, delay)
    while not stop_event.is_set():
        remaining = deadline - _now()
        if remaining <= 0:
            return False
        stop_event.wait(min(MAX_SLICE, remaining))
    return True


def _now() -> float:
    return time.monotonic()
