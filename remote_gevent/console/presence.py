"""Online/offline as fast as the broker knows it: probing the devices' command queues.

A connected agent consumes its per-connection queue ``<topic>.conn``
(:mod:`remote_gevent.common.broker_topology`); the broker deletes that queue when the
agent's connection ends — at once when the agent's socket closes (a crash, SIGKILL),
within two AMQP heartbeats when the device silently vanishes (power, network). So a
passive ``queue.declare`` tells whether a device is connected: consumer count > 0 →
connected; ``NOT_FOUND`` (or no consumer) → not connected. ``alive`` messages keep
carrying the device's own figures; its period (``health_check``, 600 s by default) no
longer decides when a device is shown offline.

The probe uses a connection of its own (operator login, no heartbeat: it is used in
bursts and re-opened after any error), read only by the greenlet that probes, so it
never competes with the console's link. A passive declare needs no permission; a
``NOT_FOUND`` closes the channel, which py-amqp reopens (one more round trip per
offline device). Cost: one round trip per connected device, two per offline one.
"""

from __future__ import annotations

import logging
import time
from typing import Any, Callable, Dict, Iterable, List, Optional, Tuple

import gevent.event
from amqp.exceptions import AMQPError, NotFound

from remote_gevent.common.amqplink import AmqpLink, LinkError
from remote_gevent.common.broker_topology import command_queue
from remote_gevent.console.device_states import DeviceEvent, DeviceStates, device_status
from remote_gevent.console.known_devices import KnownDevices, KnownDevicesError

log = logging.getLogger(__name__)

CONNECTED = "connected"
GONE = "gone"


class PresenceProbe:
    """Passive declares of device queues on a private connection (one greenlet only)."""

    def __init__(self, link: AmqpLink) -> None:
        self.link = link

    def _channel(self):  # type: ignore[no-untyped-def]
        if self.link.channel is None or self.link.connection is None:
            self.link.connect()
        return self.link.channel

    def probe(self, queues: Iterable[Tuple[str, str]]) -> Dict[str, Optional[str]]:
        """``{device: CONNECTED | GONE | None}`` for ``(device, queue name)`` pairs.

        None means unknown (the broker could not be asked); the connection is then
        dropped and re-opened at the next call.
        """
        out: Dict[str, Optional[str]] = {}
        pending = list(queues)
        for i, (device, queue) in enumerate(pending):
            try:
                channel = self._channel()
                ok = channel.queue_declare(queue, passive=True)
                out[device] = CONNECTED if int(ok.consumer_count or 0) > 0 else GONE
            except NotFound:
                out[device] = GONE
            except (LinkError, AMQPError, OSError) as exc:
                log.warning("presence probe failed (%s); %d device(s) not probed", exc,
                            len(pending) - i)
                self.close()
                for rest, _ in pending[i:]:
                    out[rest] = None
                break
        return out

    def close(self) -> None:
        self.link.close()


def probe_link(cfg: Any) -> AmqpLink:
    """The probe's own connection, with the console's login and broker settings."""
    a = cfg.amqp
    return AmqpLink(a.urls, cfg.user or "", cfg.password or "", ca_file=a.ca_file,
                    cert_file=a.cert_file, key_file=a.key_file, heartbeat=0,
                    connect_timeout=a.connect_timeout, name="console %s presence" % cfg.user,
                    prefetch=0)


def known_device_ids(cfg: Any, states: DeviceStates, known: KnownDevices) -> List[str]:
    """``<sid>/<ident>`` of every device of our server id seen or pinned."""
    ids = set(states.devices)
    try:
        ids.update(p.device_id for p in known.all())
    except KnownDevicesError as exc:
        log.warning("presence: %s", exc)
    prefix = cfg.server_id + "/"
    return sorted(d for d in ids if d.startswith(prefix))


def update_presence(cfg: Any, states: DeviceStates, known: KnownDevices,
                    probe: PresenceProbe, now: Optional[float] = None) -> List[DeviceEvent]:
    """Probe every known device; record ``presence``/``presence_at``; return the
    online/offline transitions (as ``presence`` events)."""
    ids = known_device_ids(cfg, states, known)
    pairs = [(did, command_queue(cfg.topic(did.split("/", 1)[1]))) for did in ids]
    results = probe.probe(pairs)
    now = time.time() if now is None else now
    events = []
    for did, presence in results.items():
        if presence is None:
            continue
        before = states.devices.get(did) or {}
        old = device_status(before, now) if before else "unknown"
        entry = states.update(did, presence=presence, presence_at=now)
        new = device_status(entry, now)
        if new != old:
            text = ("connected to the broker" if presence == CONNECTED else
                    "not connected to the broker (its command queue is gone)")
            events.append(DeviceEvent(did, "presence", text, transition=new,
                                      entry=dict(entry)))
    return events


def presence_loop(cfg: Any, states: DeviceStates, known: KnownDevices,
                  on_event: Optional[Callable[[DeviceEvent], None]],
                  stop: "gevent.event.Event", interval: Optional[float] = None) -> None:
    """``watch``: probe every ``interval`` s (default: half the AMQP heartbeat, so a
    device's loss shows within the broker's own detection time plus that)."""
    if interval is None:
        interval = max(1.0, float(cfg.amqp.heartbeat or 30) / 2.0)
    probe = PresenceProbe(probe_link(cfg))
    try:
        while True:
            for event in update_presence(cfg, states, known, probe):
                if on_event is not None:
                    on_event(event)
            if stop.wait(interval):
                return
    finally:
        probe.close()
