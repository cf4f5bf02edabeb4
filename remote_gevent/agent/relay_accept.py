"""Which relay a session may use: the one a signed request names, if this device's
config admits it (issue 13, relay pools).

``remote.relays`` maps the server id to one ``host:port`` or to a list of them. The
console signs the exact relay into ``session.request`` (docs/protocol.md §4); the agent
dials that relay only if it is in the list (host compared case-insensitively, without a
trailing dot; port exactly), and verifies its certificate as for a single relay
(``relay_ca_file``, host name checked). So a platform can run several relays for one
server id and each console (or each request) can use any of them, while a request can
never send the device to a relay its owner did not list.
"""

import logging
from typing import Any, List, Sequence, Tuple

from remote_gevent.common.addresses import AddressError, split_host_port
from remote_gevent.wire.relay_pool import walk_order

log = logging.getLogger("remote_gevent.agent.tunnels")


class RelayNotAdmitted(ValueError):
    """The request names a relay this device's config does not list."""


def _normal(host: str, port: int) -> Tuple[str, int]:
    return host.lower().rstrip("."), port


def admitted_relays(cfg: Any) -> List[Tuple[str, int]]:
    """``(host, port)`` of every relay configured for our server id (KeyError if none)."""
    value = cfg.remote.relays[cfg.remote.server_id]
    out = []
    for item in ([value] if isinstance(value, str) else list(value)):
        host, port = split_host_port(item)
        assert port is not None
        out.append((host, port))
    return out


def admit_relay(cfg: Any, named: str) -> Tuple[str, int]:
    """The ``(host, port)`` to dial for a request naming ``named``; raises
    :class:`RelayNotAdmitted` (one-line message) or KeyError (no relay configured)."""
    admitted = admitted_relays(cfg)
    try:
        host, port = split_host_port(named)
    except AddressError:
        raise RelayNotAdmitted("relay %r is not host:port" % (named[:80],)) from None
    wanted = _normal(host, port or -1)
    for relay in admitted:
        if _normal(*relay) == wanted:
            return relay
    raise RelayNotAdmitted("relay %s is not one of this device's relays (%s)" % (
        named[:80], ", ".join("%s:%d" % r for r in admitted)))


def resume_order(cfg: Any, session_relay: Tuple[str, int], pool: Sequence[str],
                 name: str) -> List[Tuple[str, int]]:
    """Where this session may resume (docs/protocol.md §7.5): the session's relay, then
    the signed ``relay_pool`` entries this device admits, in the signed order. Entries
    ``remote.relays`` does not list are skipped (logged once, here): a request can never
    send the device to a relay its owner did not list, pool or not."""
    admitted, skipped = [], []
    for entry in pool:
        try:
            admitted.append(admit_relay(cfg, entry))
        except (RelayNotAdmitted, KeyError):
            skipped.append(entry[:80])
    if skipped:
        log.info("%s: relay_pool entries not in remote.relays, never dialled: %s", name,
                 ", ".join(skipped))
    return walk_order(session_relay, admitted)
