"""The console's status queue (a mixin of :class:`~remote_gevent.console.control.ConsoleControl`).

Declared only by the commands that need it (``devices``, ``watch``, ``pin``, a session to
a device not pinned yet); drained into the device state file and the pins; after a
drain, ``devices`` and ``pin`` also probe presence (:mod:`remote_gevent.console.presence`).
See console/control.py's docstring and docs/protocol.md §1.
"""

from __future__ import annotations

import logging
import time
from typing import Any, Callable, Dict, Optional

import gevent
from amqp.exceptions import NotFound, PreconditionFailed

from remote_gevent.common.amqplink import AmqpLink, LinkError
from remote_gevent.console import presence
from remote_gevent.console.config import ConsoleConfig
from remote_gevent.console.device_states import (
    UP_KINDS,
    DeviceEvent,
    DeviceStates,
    handle_up_message,
)
from remote_gevent.console.known_devices import KnownDevices, KnownDevicesError

log = logging.getLogger("remote_gevent.console.control")

EXCHANGE_UP = "remote.up"
STATUS_QUEUE_EXPIRES_MS = 30 * 86400 * 1000
#: Draining the status queue stops after this long without a delivery ...
DRAIN_IDLE = 0.3
#: ... or after this long in total.
DRAIN_MAX = 5.0


def _raw_body(message: Any) -> bytes:
    body = message.body
    if isinstance(body, str):
        return body.encode("utf-8", "surrogateescape")
    return bytes(body)


class StatusQueueMixin:
    """What ConsoleControl provides to these methods, declared."""

    cfg: ConsoleConfig
    link: Any
    known: KnownDevices
    states: DeviceStates
    on_event: Optional[Callable[[DeviceEvent], None]]
    consume_status: bool
    probe_presence: bool
    status_queue: str
    status_backlog: int
    status_handled: int
    _last_status: float
    _status_tag: Optional[str]

    def _status_args(self) -> Dict[str, Any]:
        return {"x-max-length": self.cfg.status_queue_max_length, "x-overflow": "drop-head",
                "x-message-ttl": self.cfg.status_queue_ttl * 1000,
                "x-expires": STATUS_QUEUE_EXPIRES_MS}

    def _declare_status_queue(self, link: AmqpLink) -> None:
        """The operator's durable status queue, or (its home node down) a temporary one.

        Only ``devices``, ``watch``, ``pin`` and a session to a device not pinned yet
        need it (docs/protocol.md §1). A durable classic queue lives on one node: when
        that node is down the broker answers ``NOT_FOUND``; this run then collects into
        a server-named exclusive queue on the node we are connected to (announcements
        sent while no console ran are not seen until that node is back; presence probes
        still give online/offline).

        Not auto-delete (py-amqp's default): earlier versions' queue was, so it vanished
        when the first ``devices`` ended and announcements between runs were lost; one
        found with those arguments is re-created.
        """
        name, args = self.cfg.status_queue_name, self._status_args()
        with link.lock:
            channel = link.channel
            assert channel is not None
            try:
                try:
                    ok = channel.queue_declare(name, durable=True, auto_delete=False,
                                               arguments=args)
                except PreconditionFailed as exc:
                    log.warning("status queue %s re-created (%s)", name, exc)
                    channel.basic_qos(0, link.prefetch, False)
                    channel.queue_delete(name)
                    ok = channel.queue_declare(name, durable=True, auto_delete=False,
                                               arguments=args)
            except NotFound as exc:
                log.warning("status queue %s unavailable (%s); using a temporary queue for "
                            "this run", name, exc)
                channel.basic_qos(0, link.prefetch, False)
                ok = channel.queue_declare("", durable=False, exclusive=True,
                                           auto_delete=True, arguments=args)
                name = ok.queue
        self.status_queue = name
        self.status_backlog = int(getattr(ok, "message_count", 0) or 0)
        for kind in UP_KINDS:
            link.bind(name, EXCHANGE_UP, "remote.%s.*.%s" % (self.cfg.server_id, kind))


    # ------------------------------------------------------------------ status queue
    def start_status_consumer(self) -> None:
        """Consume the status queue; declared here (``nowait``: from this greenlet the
        link only writes) when this console was not started with ``consume_status``."""
        if self._status_tag is None:
            declared, self.consume_status = self.consume_status, True
            try:
                if not declared:
                    self.link.declare_queue(self.status_queue, durable=True,
                                            auto_delete=False, arguments=self._status_args())
                    for kind in UP_KINDS:
                        self.link.bind(self.status_queue, EXCHANGE_UP,
                                       "remote.%s.*.%s" % (self.cfg.server_id, kind))
                self._status_tag = self.link.consume(self.status_queue, self._on_status)
            except LinkError as exc:
                from remote_gevent.console.control import link_error

                raise link_error(exc) from None

    def sync_status(self, idle: float = DRAIN_IDLE, limit: float = DRAIN_MAX) -> int:
        """Consume what the status queue holds now (until ``idle`` s without a message,
        at most ``limit`` s); update pins and the state file. Returns messages handled."""
        before = self.status_handled
        expected = max(0, self.status_backlog - self.status_handled)
        self.start_status_consumer()
        start = time.monotonic()
        self._last_status = start
        while time.monotonic() - start < limit:
            gevent.sleep(min(idle, 0.05))
            quiet = time.monotonic() - self._last_status
            if quiet >= idle and (self.status_handled - before >= expected or quiet >= 3 * idle):
                break
        if self.probe_presence:
            probe = presence.PresenceProbe(presence.probe_link(self.cfg))
            try:
                presence.update_presence(self.cfg, self.states, self.known, probe)
            finally:
                probe.close()
        self.flush_known()
        self.states.flush()
        return self.status_handled - before

    def flush_known(self) -> None:
        """Write the first-sight pins staged while draining (one write for many)."""
        try:
            self.known.flush()
        except KnownDevicesError as exc:
            log.error("%s", exc)

    def _on_status(self, message: Any) -> None:
        try:
            event = self.handle_up_message(_raw_body(message),
                                           message.delivery_info.get("routing_key") or "",
                                           message.properties)
        finally:
            self.link.ack(message)
            self.status_handled += 1
            self._last_status = time.monotonic()
        if event is not None and self.on_event is not None:
            self.on_event(event)

    def handle_up_message(self, raw: bytes, routing_key: str,
                          properties: Optional[Dict[str, Any]] = None,
                          now: Optional[float] = None) -> Optional[DeviceEvent]:
        """Handle one ``alive`` / ``key`` / ``close`` message from ``remote.up``."""
        return handle_up_message(self.known, self.states, self.cfg.server_id, raw,
                                 routing_key, properties or {}, now)


