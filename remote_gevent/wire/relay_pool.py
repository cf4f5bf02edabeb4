"""Resuming on another relay of a pool (issue 13; docs/protocol.md §4 ``relay_pool`` and
§7.5 "Re-pairing on a pool").

A ``session.request`` may carry ``relay_pool``: the console's relays in a fixed order,
signed with the rest of the request. When the session's path breaks, both ends walk the
same order — the session's relay first, then the others in the signed order — and, in
each round, dial the first relay that accepts TCP + TLS and wait there for the peer for
:data:`POOL_PAIRING_WAIT` (shorter than the relay's 30 s pairing timeout). Every round
starts again from the top, so two ends that see the same relays alive meet on the same
one, and two that diverged (one saw a relay down that the other reached) meet again in a
later round. A relay that is down costs one failed connect per round, nothing more. The
relay itself keeps no state for this: a resume is a new pairing with the same hello
(ticket included), wherever it happens.

Shared by the agent and the console (Python 3.6: the agent imports it).
"""

import logging
from typing import Any, Callable, List, Sequence, Tuple

from remote_gevent.common.addresses import AddressError, split_host_port
from remote_gevent.wire.envelope import MAX_RELAY_CHARS, MAX_RELAY_POOL  # noqa: F401
from remote_gevent.wire.rendezvous import RelayError

log = logging.getLogger(__name__)

#: How long one round waits for the peer at the relay it reached, seconds. Shorter than
#: the relay's pairing timeout (30 s), longer than the resume backoff's largest delay
#: (5 s): two ends cycling on the same relay always overlap in a wait.
POOL_PAIRING_WAIT = 8.0

Address = Tuple[str, int]
#: ``dial(host, port, pair_timeout)`` -> the paired socket; raises RelayError.
Dial = Callable[[str, int, float], Any]


def normal(address: Address) -> Address:
    """How two spellings of one relay compare (host case, trailing dot)."""
    return address[0].lower().rstrip("."), address[1]


def walk_order(session_relay: Address, pool: Sequence[Address]) -> List[Address]:
    """The session's relay, then the pool's other relays in the signed order (each once)."""
    order = [session_relay]
    seen = {normal(session_relay)}
    for address in pool:
        if normal(address) not in seen:
            seen.add(normal(address))
            order.append(address)
    return order


def parse_pool(entries: Sequence[str]) -> List[Address]:
    """``(host, port)`` of each ``host:port`` entry; ValueError naming a bad one."""
    out = []
    for entry in entries:
        try:
            host, port = split_host_port(entry)
        except AddressError as exc:
            raise ValueError("relay_pool entry %r: %s" % (entry[:80], exc)) from None
        if port is None:
            raise ValueError("relay_pool entry %r has no port" % (entry[:80],))
        out.append((host, port))
    return out


def is_down(exc: BaseException) -> bool:
    """A relay dial that failed before the relay heard our hello (refused, unreachable,
    connect or TLS timeout, TLS error): the relay is down or unusable."""
    return isinstance(exc, RelayError) and not exc.reached


def dial_round(order: Sequence[Address], dial: Dial, remaining: float,
               wait: float = POOL_PAIRING_WAIT, name: str = "session") -> Any:
    """One round of the walk: the first relay of ``order`` that accepts TCP + TLS, and a
    pairing wait there of ``min(wait, remaining)``.

    Returns what ``dial`` returns. Raises the RelayError of that relay (no peer in time,
    a refusal), or, when no relay of the order could be reached (or each one that could
    answered ``ERR busy``), a RelayError ``unreachable`` naming each one's failure."""
    failures = []  # type: List[str]
    for host, port in order:
        try:
            return dial(host, port, max(1.0, min(wait, remaining)))
        except RelayError as exc:
            # A relay at its limits (ERR busy) serves neither end: as good as down here.
            if not (is_down(exc) or (exc.remote and exc.code == "busy")):
                raise
            failures.append(str(exc))
            log.info("%s: %s; next relay of the pool", name, exc)
    raise RelayError("unreachable", "no relay of the pool usable: %s" % "; ".join(failures),
                     reached=False)


def pool_redialer(order: Sequence[Address], dial: Dial, name: str = "session"
                  ) -> Callable[[float], Any]:
    """``redial(remaining)`` for :class:`resume.ResumeSettings`: one :func:`dial_round`
    per call (the tunnel's backoff sleeps between rounds)."""
    fixed = list(order)

    def redial(remaining: float) -> Any:
        return dial_round(fixed, dial, remaining, name=name)
    return redial

