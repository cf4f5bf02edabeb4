"""What the console knows of each device from its ``alive``, ``key`` and ``close``
messages: online/offline (three missed health checks), the last event, and the
summary ``devices`` prints."""

from __future__ import annotations

import fcntl
import json
import logging
import os
import time
from dataclasses import dataclass, field
from typing import Any, Dict, List, Optional


from remote_gevent.common import fsutil
from remote_gevent.wire import protocol
from remote_gevent.wire import envelope
from remote_gevent.wire import alive_counters
from remote_gevent.console import alive_view
from remote_gevent.console.known_devices import KeyChanged, KnownDevices, KnownDevicesError

log = logging.getLogger("remote_gevent.console.control")


UP_KINDS = ("alive", "key", "close")


DEFAULT_HEALTH_CHECK = 600.0


MISSED_INTERVALS = 3


def _now() -> float:
    return time.time()


def device_status(entry: Dict[str, Any], now: Optional[float] = None) -> str:
    """``online``, ``offline`` or ``stopped`` for one state entry.

    The broker's view (``presence``, from :mod:`remote_gevent.console.presence`) wins
    when it is newer than the last ``alive``: ``gone`` is offline at once; ``connected``
    is online for as long as an alive would count (three intervals), then the alive
    rule applies again."""
    now = _now() if now is None else now
    last = entry.get("last_alive")
    presence, seen = entry.get("presence"), entry.get("presence_at")
    hc = float(entry.get("health_check") or DEFAULT_HEALTH_CHECK)
    if presence in ("connected", "gone") and seen is not None \
            and (last is None or float(seen) >= float(last)):
        if presence == "gone":
            return "stopped" if entry.get("event") == "stopping" else "offline"
        if now - float(seen) <= MISSED_INTERVALS * hc:
            return "online"
    if last is None:
        return "unknown"
    if entry.get("event") == "stopping":
        return "stopped"
    return "online" if now - float(last) <= MISSED_INTERVALS * hc else "offline"


def offline_at(entry: Dict[str, Any]) -> Optional[float]:
    last = entry.get("last_alive")
    if last is None or entry.get("event") == "stopping":
        return None
    return float(last) + MISSED_INTERVALS * float(entry.get("health_check")
                                                  or DEFAULT_HEALTH_CHECK)


class DeviceStates:
    """The console's device state file (JSON ``{"<sid>/<ident>": {...}}``).

    Kept in memory, merged into the file by :meth:`flush` under an ``flock`` (entry with
    the newer ``updated`` wins), written atomically.
    """

    def __init__(self, path: str) -> None:
        self.path = path
        self.devices: Dict[str, Dict[str, Any]] = {}
        self.dirty = False
        self.reload()

    def _read_file(self) -> Dict[str, Dict[str, Any]]:
        try:
            with open(self.path, "r", encoding="utf-8") as fh:
                data = json.load(fh)
        except FileNotFoundError:
            return {}
        except (OSError, ValueError) as exc:
            log.warning("ignoring unreadable device state %s: %s", self.path, exc)
            return {}
        if not isinstance(data, dict):
            return {}
        return {k: v for k, v in data.get("devices", {}).items() if isinstance(v, dict)}

    def reload(self) -> None:
        self.devices = self._read_file()

    def get(self, did: str) -> Dict[str, Any]:
        return self.devices.setdefault(did, {})

    def update(self, did: str, **values: Any) -> Dict[str, Any]:
        entry = self.get(did)
        entry.update(values)
        entry["updated"] = _now()
        self.dirty = True
        return entry

    def flush(self) -> None:
        if not self.dirty:
            return
        parent = os.path.dirname(os.path.abspath(self.path))
        try:
            os.makedirs(parent, mode=0o700, exist_ok=True)
            lock_fd = os.open(self.path + ".lock", os.O_RDWR | os.O_CREAT, 0o600)
        except OSError as exc:
            log.warning("cannot write device state %s: %s", self.path, exc.strerror)
            return
        try:
            fcntl.flock(lock_fd, fcntl.LOCK_EX)
            merged = self._read_file()
            for did, entry in self.devices.items():
                other = merged.get(did)
                if other is None or other.get("updated", 0) <= entry.get("updated", 0):
                    merged[did] = entry
            self.devices = merged
            fsutil.write_atomic(self.path, json.dumps({"version": 1, "devices": merged},
                                                      indent=1, sort_keys=True), 0o600)
            self.dirty = False
        except OSError as exc:
            log.warning("cannot write device state %s: %s", self.path, exc.strerror or exc)
        finally:
            os.close(lock_fd)


@dataclass
class DeviceEvent:
    """One thing learnt from the status queue (``watch`` prints these)."""

    device: str          # <sid>/<ident>
    kind: str            # alive | key | close | warning
    text: str
    transition: Optional[str] = None   # new state when online/offline changed
    entry: Dict[str, Any] = field(default_factory=dict)
    notes: List[str] = field(default_factory=list)  # sessions resuming / back (alive_view)


def handle_up_message(known: KnownDevices, states: DeviceStates, server_id: str, raw: bytes,
                      routing_key: str, properties: Dict[str, Any],
                      now: Optional[float] = None) -> Optional[DeviceEvent]:
    """Pure(ish) handler of one status-queue message; returns what happened (or None)."""
    now = _now() if now is None else now
    parts = routing_key.split(".")
    if len(parts) != 4 or parts[0] != "remote" or parts[1] != server_id \
            or parts[3] not in UP_KINDS:
        log.debug("status queue: unexpected routing key %s", envelope.short(routing_key))
        return None
    ident, kind = parts[2], parts[3]
    did = "%s/%s" % (server_id, ident)
    try:
        msg = protocol.decode(raw)
    except protocol.ProtocolError as exc:
        log.warning("%s: ignoring bad %s message: %s", did, kind, exc)
        return None
    body = msg.body
    if body.get("ident", ident) != ident or body.get("server_id", server_id) != server_id:
        log.warning("%s: ignoring %s naming another device (%s/%s)", did, kind,
                    envelope.short(body.get("server_id")), envelope.short(body.get("ident")))
        return None
    if kind == "key" and msg.type == protocol.MsgType.KEY:
        try:
            outcome, pin = known.learn(msg, now=now)
        except KeyChanged as exc:
            entry = states.update(did, key_warning=str(exc))
            return DeviceEvent(did, "warning", str(exc), entry=dict(entry))
        except protocol.ProtocolError as exc:
            log.warning("%s: ignoring bad key announcement: %s", did, exc)
            return None
        except KnownDevicesError as exc:
            log.error("%s: %s", did, exc)
            return None
        entry = states.update(did, fingerprint=pin.fingerprint, key_warning=None)
        text = {"new": "key pinned on first sight: %s" % pin.fingerprint,
                "same": "key %s (pinned)" % pin.fingerprint,
                "rotated": "key rotated to %s (signed by the previous key)" % pin.fingerprint
                }[outcome]
        return DeviceEvent(did, "key", text, entry=dict(entry))
    try:
        pinned = known.get(server_id, ident)
    except KnownDevicesError as exc:
        log.error("%s: %s", did, exc)
        return None
    verified = False
    if pinned is not None:
        try:
            protocol.verify(msg, pinned.public_raw32)
            verified = True
        except protocol.ProtocolError as exc:
            text = ("%s not signed by the pinned key %s — possible impersonation, ignored (%s)"
                    % (msg.type, pinned.fingerprint, exc.detail or exc.reason))
            return DeviceEvent(did, "warning", text)
    if kind == "alive" and msg.type == protocol.MsgType.ALIVE:
        before = states.get(did)
        old_status = device_status(before, now) if before else "unknown"
        hc = _health_check(properties, body, before)
        ts = min(float(body["ts"]), now)
        if before.get("last_alive") is not None and ts < float(before["last_alive"]):
            return None  # older than what we know (another console drained a newer one)
        old_counters = before.get("counters")
        counters = alive_counters.known_only(body.get("counters"))  # None: an older agent
        entry = states.update(
            did, last_alive=ts, health_check=hc, fingerprint=body["fingerprint"],
            version=body["version"], event=body["event"], seq=body["seq"],
            uptime=body["uptime"], sessions_active=body["sessions_active"],
            sessions_waiting=body["sessions_waiting"], max_session=body["max_session"],
            verified=verified, counters=counters or None)
        notes = alive_view.resume_notes(old_counters if isinstance(old_counters, dict)
                                        else None, counters,
                                        list(before.get("recent_closes") or [])
                                        ) if counters else []  # an older agent tells nothing
        new_status = device_status(entry, now)
        text = "alive (%s) v%s, %d/%d sessions%s" % (
            body["event"], body["version"], body["sessions_active"], body["max_session"],
            "" if verified else ", UNVERIFIED: key not pinned")
        return DeviceEvent(did, "alive", text,
                           transition=new_status if new_status != old_status else None,
                           entry=dict(entry), notes=notes)
    if kind == "close" and msg.type == protocol.MsgType.SESSION_CLOSE:
        last_close = {"session_id": body["session_id"], "code": body["code"],
                      "reason": body["reason"], "ts": body["ts"], "verified": verified}
        recent = [i for i in states.get(did).get("recent_closes") or [] if i != body["session_id"]]
        entry = states.update(did, last_close=last_close, recent_closes=(
            recent + [body["session_id"]])[-alive_view.RECENT_CLOSES:])
        return DeviceEvent(did, "close", "session %s closed: %s (%s)"
                           % (body["session_id"], body["code"], body["reason"]),
                           entry=dict(entry))
    log.debug("%s: %s on routing key %s ignored", did, msg.type, kind)
    return None


def _health_check(properties: Dict[str, Any], body: Dict[str, Any],
                  before: Dict[str, Any]) -> float:
    """The device's own health_check: alive ``expiration`` = 2 × health_check (ms)."""
    try:
        hc = int(properties.get("expiration") or 0) / 2000.0
    except (TypeError, ValueError):
        hc = 0.0
    if 1 <= hc <= 86400:
        return hc
    prev_seq, prev_ts = before.get("seq"), before.get("last_alive")
    if body.get("event") == "periodic" and prev_seq is not None and prev_ts is not None \
            and body["seq"] == prev_seq + 1 and 1 <= body["ts"] - prev_ts <= 86400:
        return float(body["ts"] - prev_ts)
    return float(before.get("health_check") or DEFAULT_HEALTH_CHECK)


def summarize(states: DeviceStates, known: KnownDevices, now: Optional[float] = None
              ) -> List[Dict[str, Any]]:
    """Rows for ``devices``: every pinned or seen device with its state."""
    now = _now() if now is None else now
    rows: Dict[str, Dict[str, Any]] = {}
    try:
        pins = {p.device_id: p for p in known.all()}
    except KnownDevicesError:
        pins = {}
    for did in sorted(set(states.devices) | set(pins)):
        entry = states.devices.get(did, {})
        pin = pins.get(did)
        rows[did] = {
            "device": did,
            "state": device_status(entry, now),
            "last_alive": entry.get("last_alive"),
            "health_check": entry.get("health_check"),
            "fingerprint": pin.fingerprint if pin else entry.get("fingerprint"),
            "pinned": pin is not None,
            "version": entry.get("version"),
            "sessions_active": entry.get("sessions_active"),
            "sessions_waiting": entry.get("sessions_waiting"),
            "max_session": entry.get("max_session"),
            "counters": entry.get("counters"),  # the alive's (None: an older agent)
            "key_warning": entry.get("key_warning"),
            "last_close": entry.get("last_close"),
        }
    return list(rows.values())
