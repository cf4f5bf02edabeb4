"""The relay's table of pending connections: accepted, not paired yet.

Two limits bound it: ``max_pending`` in all and ``max_pending_per_ip`` per source address.
A connection is *half-open* from its accept until it has sent a valid hello (TLS handshake
in progress, or TLS up and no hello yet), then *authenticated* (it knows a session id and a
well-formed ticket and waits for its peer).

Why eviction rather than refusal: a half-open connection costs its sender one TCP connect,
so refusing newcomers while the table is full of them let one address (or many devices
behind one NAT address) hold its own legitimate sessions out for as long as the hello
deadline, again and again (issue 10, item 12: 55 half-open connections from one IP refused
that IP's sessions for up to 30 s). So when a source, or the table, is full, the *oldest
half-open* connection in the way is evicted (closed) and the newcomer takes its place;
the newcomer is refused (``ERR busy``) only when everything in the way is authenticated.
A connection that has sent a valid hello and waits for its peer is never displaced by
half-open ones. A legitimate client completes TLS and its hello in a few round trips, so
it is the newest half-open connection, not the oldest, while a flood arrives.
"""

from __future__ import annotations

from collections import OrderedDict
from typing import Dict, Hashable, List, Optional


class PendingTable:
    """Counts of pending connections per source and in all, and the half-open ones in
    arrival order. Entries are any hashable objects (the relay's connections)."""

    def __init__(self, max_total: int, max_per_source: int) -> None:
        self.max_total = max_total
        self.max_per_source = max_per_source
        self._counts: Dict[str, int] = {}
        self._sources: Dict[Hashable, str] = {}
        # Half-open entries, oldest first: in all, and per source.
        self._half_open: "OrderedDict[Hashable, str]" = OrderedDict()
        self._half_open_by_source: Dict[str, "OrderedDict[Hashable, None]"] = {}

    @property
    def total(self) -> int:
        return len(self._sources)

    @property
    def half_open(self) -> int:
        return len(self._half_open)

    def count(self, source: str) -> int:
        return self._counts.get(source, 0)

    def make_room(self, source: str) -> Optional[List[Hashable]]:
        """The entries to evict so that one more connection from ``source`` fits (often
        none), or None when it cannot fit because everything in the way is authenticated.
        Nothing is changed: the caller evicts (:meth:`remove`) and then :meth:`add`\\ s."""
        victims: List[Hashable] = []
        if self.count(source) >= self.max_per_source:
            mine = self._half_open_by_source.get(source)
            if not mine:
                return None
            victims.append(next(iter(mine)))
        if self.total - len(victims) >= self.max_total:
            oldest = next((e for e in self._half_open if e not in victims), None)
            if oldest is None:
                return None
            victims.append(oldest)
        return victims

    def add(self, entry: Hashable, source: str) -> None:
        """A newly accepted connection: pending and half-open."""
        self._sources[entry] = source
        self._counts[source] = self._counts.get(source, 0) + 1
        self._half_open[entry] = source
        self._half_open_by_source.setdefault(source, OrderedDict())[entry] = None

    def authenticated(self, entry: Hashable) -> None:
        """``entry`` sent a valid hello: still pending, no longer evictable."""
        source = self._half_open.pop(entry, None)
        if source is None:
            return
        mine = self._half_open_by_source[source]
        del mine[entry]
        if not mine:
            del self._half_open_by_source[source]

    def remove(self, entry: Hashable) -> bool:
        """``entry`` is paired, refused, evicted or gone; False if it was not pending."""
        source = self._sources.pop(entry, None)
        if source is None:
            return False
        self.authenticated(entry)
        left = self._counts[source] - 1
        if left:
            self._counts[source] = left
        else:
            del self._counts[source]
        return True
