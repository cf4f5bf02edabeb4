"""The console's relay pool (issue 13): which relay a new session uses, and which relays
were seen down lately.

``relay:`` in console.yaml may list several relays. Each session picks one at random
among those not seen down in the last :data:`DEAD_FOR` seconds (so operators spread
over the pool without coordinating), and signs the whole pool, in the configured order,
into its request as ``relay_pool``: where both ends resume if that relay dies
(:mod:`remote_gevent.wire.relay_pool`). A relay whose dial fails before our hello
reached it (refused, unreachable, connect or TLS timeout, TLS error) is remembered as
down — in this process and in a small file beside the console's state file
(``relays-down.json``), so the next CLI invocation avoids it too — and the session is
tried once more, under a new session id, on another relay (``session.open_session``).

A console with one relay behaves exactly as before: no ``relay_pool`` in its requests
(so agents from before issue 13, which refuse an unknown field as malformed, still
serve it), nothing remembered, no retry.
"""

from __future__ import annotations

import json
import logging
import os
import random
import threading
import time
from typing import Callable, Dict, Optional, Sequence, Tuple

from remote_gevent.common.fsutil import write_atomic
from remote_gevent.console.config import EXIT_RELAY, ConsoleConfig, ConsoleError
from remote_gevent.wire import relay_pool as wire_pool

log = logging.getLogger(__name__)

#: How long a relay seen down is avoided by new sessions, seconds.
DEAD_FOR = 60.0
STATE_NAME = "relays-down.json"
#: Entries kept in the file at most (a pool has at most 8 relays; old ones expire).
MAX_REMEMBERED = 64

_LOCK = threading.Lock()
#: Relays seen down by this process: address -> unix time until which it is avoided.
_DOWN: Dict[str, float] = {}


class RelayDown(ConsoleError):
    """The session's relay could not be reached (connect or TLS level): another relay
    of the pool may serve a new attempt."""

    def __init__(self, message: str, relay: str, code: str = "relay_down") -> None:
        super().__init__(message, EXIT_RELAY, code)
        self.relay = relay


def state_path(cfg: ConsoleConfig) -> str:
    """The file of relays seen down: beside the console's state file."""
    return os.path.join(os.path.dirname(os.path.abspath(cfg.state_file)), STATE_NAME)


class RelayPool:
    """The configured relays of one console, with what is known of their health."""

    def __init__(self, cfg: ConsoleConfig, rng: Optional[random.Random] = None,
                 clock: Optional[Callable[[], float]] = None) -> None:
        self.relays: Tuple[str, ...] = cfg.relay_pool
        self._cfg = cfg
        self._rng = rng or random.Random()
        self._clock = clock or time.time

    @property
    def path(self) -> str:
        return state_path(self._cfg)

    @property
    def signed(self) -> Tuple[str, ...]:
        """What goes into ``session.request`` as ``relay_pool``: the pool in the configured
        order, or nothing for a single relay (as before issue 13)."""
        return self.relays if len(self.relays) > 1 else ()

    def down(self) -> Dict[str, float]:
        """Relays seen down and not yet expired (this process's and the file's)."""
        now = self._clock()
        with _LOCK:
            seen = dict(_DOWN)
        for relay, until in self._read().items():
            seen[relay] = max(until, seen.get(relay, 0.0))
        return {r: u for r, u in seen.items() if u > now}

    def pick(self, exclude: Sequence[str] = ()) -> Optional[str]:
        """A relay for a new session: random among those not seen down (and not in
        ``exclude``); when all are down, random among all not excluded (a relay may be
        back: better a try than no session). None when nothing is left."""
        candidates = [r for r in self.relays if r not in exclude]
        if len(candidates) <= 1:
            return candidates[0] if candidates else None
        down = self.down()
        alive = [r for r in candidates if r not in down]
        return self._rng.choice(alive or candidates)

    def mark_down(self, relay: str, why: str) -> None:
        """Avoid ``relay`` for :data:`DEAD_FOR` seconds, here and in later invocations."""
        until = self._clock() + DEAD_FOR
        with _LOCK:
            _DOWN[relay] = until
        log.info("relay %s marked down for %.0f s: %s", relay, DEAD_FOR, why)
        entries = self._read()
        entries[relay] = until
        now = self._clock()
        keep = sorted(((u, r) for r, u in entries.items() if u > now), reverse=True)
        data = json.dumps({r: u for u, r in keep[:MAX_REMEMBERED]}, sort_keys=True)
        try:
            write_atomic(self.path, data + "\n", 0o600)
        except OSError as exc:  # the in-process memory still works
            log.warning("cannot write %s: %s", self.path, exc)

    def _read(self) -> Dict[str, float]:
        try:
            with open(self.path, encoding="utf-8") as fh:
                data = json.load(fh)
        except (OSError, ValueError):
            return {}
        if not isinstance(data, dict):
            return {}
        return {str(r): float(u) for r, u in data.items()
                if isinstance(u, (int, float)) and not isinstance(u, bool)}


def is_down(exc: BaseException) -> bool:
    """A relay dial that failed before the relay heard our hello."""
    return wire_pool.is_down(exc)

