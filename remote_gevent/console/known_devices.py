"""Pinned device keys (trust on first use, like OpenSSH's ``known_hosts``).

One line per device::

    fr04/demo ssh-ed25519 AAAAC3NzaC1lZDI1NTE5AAAA... pinned=1767225600 via=tofu

``<server_id>/<ident>``, the device's ``ssh-ed25519`` public key, then ``key=value``
fields (``pinned`` = unix time the pin was written, ``via`` = ``tofu`` | ``rotation`` |
``manual``). ``#`` starts a comment line; unparsable lines are kept verbatim and reported.

Rules (docs/protocol.md §3 and the ``key`` message):

- first sight of a device's self-signed ``key`` announcement pins it (TOFU);
- afterwards a different key is pinned **only** through a rotation signed by the pinned
  key (:func:`remote_gevent.wire.protocol.verify_key_rotation`); anything else raises
  :class:`KeyChanged` — "device key changed without a valid rotation — possible
  impersonation" — and the pin stays;
- an operator may pin by hand (``pin DEVICE --key LINE``) after checking the fingerprint
  with ``remote-gevent pubkey`` on the device.

Writes take an exclusive ``flock`` on ``<file>.lock``, re-read the file, change one line
and replace the file atomically (temp file, fsync, rename, fsync of the directory), so two
consoles running at once never lose each other's pins and a crash never leaves half a file.

A console draining a status queue sets ``batch_first_sight``: first-sight (TOFU) pins are
then staged in memory — ``get`` sees them at once — and written together by ``flush``
(called by the console after each drain, every second by ``watch``, at close, and by
itself once 500 are staged or the oldest is 1 s old). One fsync'd write per batch instead
of one per device: the first ``devices`` of 5,000 new devices spent most of its 452 s in
5,000 fsyncs. A crash loses at most that batch of first-sight pins; the devices announce
their key again at their next connect, and nothing that was pinned is ever changed by a
batch (a conflicting pin written meanwhile by another console wins and is reported).
"""

from __future__ import annotations

import contextlib
import fcntl
import hmac
import logging
import os
import re
import time
from dataclasses import dataclass
from typing import Any, Dict, Iterator, List, Optional, Tuple

from remote_gevent.common import fsutil
from remote_gevent.crypto.identity import fingerprint_of, parse_ssh_ed25519_line, public_line_of

_DEVICE_RE = re.compile(r"^([A-Za-z0-9_-]{1,32})/([A-Za-z0-9_-]{1,64})$")
_FIELD_RE = re.compile(r"^[a-z_]{1,32}=[A-Za-z0-9_.:+/=-]{0,128}$")
HEADER = ("# remote-gevent known devices: <server_id>/<ident> ssh-ed25519 <key> [field=value...]\n"
          "# Written by remote-gevent-console; a changed key is accepted only through a\n"
          "# rotation signed by the pinned key.\n")

log = logging.getLogger(__name__)

BATCH_MAX_PINS = 500
BATCH_MAX_AGE = 1.0

VIA_TOFU = "tofu"
VIA_ROTATION = "rotation"
VIA_MANUAL = "manual"


class KnownDevicesError(Exception):
    """The known-devices file cannot be read or written (message names the file)."""


class KeyChanged(Exception):
    """A device announced a key that is neither pinned nor a valid rotation of the pin."""

    def __init__(self, device_id: str, pinned_fp: str, announced_fp: str, detail: str = ""
                 ) -> None:
        self.device_id = device_id
        self.pinned = pinned_fp
        self.announced = announced_fp
        message = ("device %s key changed without a valid rotation — possible impersonation: "
                   "pinned %s, announced %s%s. The pin was kept. If the device was re-keyed "
                   "on purpose, compare `remote-gevent pubkey` on the device and re-pin it "
                   "with `remote-gevent-console pin %s --key '<line>' --replace`."
                   % (device_id, pinned_fp, announced_fp, " (%s)" % detail if detail else "",
                      device_id.split("/", 1)[-1]))
        super().__init__(message)


@dataclass(frozen=True)
class Pin:
    server_id: str
    ident: str
    public_raw32: bytes
    fields: Tuple[Tuple[str, str], ...] = ()

    @property
    def device_id(self) -> str:
        return "%s/%s" % (self.server_id, self.ident)

    @property
    def fingerprint(self) -> str:
        return fingerprint_of(self.public_raw32)

    @property
    def via(self) -> str:
        return dict(self.fields).get("via", "")

    @property
    def pinned_at(self) -> Optional[float]:
        try:
            return float(dict(self.fields).get("pinned", ""))
        except ValueError:
            return None

    def line(self) -> str:
        parts = [self.device_id, public_line_of(self.public_raw32)]
        parts.extend("%s=%s" % kv for kv in self.fields)
        return " ".join(parts)


def device_id(server_id: str, ident: str) -> str:
    return "%s/%s" % (server_id, ident)


def parse_line(line: str) -> Optional[Pin]:
    """One file line → Pin; None for blank/comment lines; ValueError when malformed."""
    text = line.strip()
    if not text or text.startswith("#"):
        return None
    parts = text.split()
    if len(parts) < 3:
        raise ValueError("expected '<server_id>/<ident> ssh-ed25519 <key> [field=value...]'")
    m = _DEVICE_RE.match(parts[0])
    if not m:
        raise ValueError("bad device %r (expected <server_id>/<ident>)" % parts[0][:80])
    raw, _ = parse_ssh_ed25519_line("%s %s" % (parts[1], parts[2]))
    fields = []
    for item in parts[3:]:
        if not _FIELD_RE.match(item):
            raise ValueError("bad field %r" % item[:80])
        k, _, v = item.partition("=")
        fields.append((k, v))
    return Pin(m.group(1), m.group(2), raw, tuple(fields))


class KnownDevices:
    """The known-devices file at ``path`` (shared: re-read whenever it changed).

    Parsed again only when its ``stat`` (inode, size, mtime) changed: with a fleet of
    1,000 pinned devices, parsing it for every status-queue message (31 ms each) held
    the console to 17 alive messages/s (benchmarks/bench_fleet.py, issue 13).
    """

    def __init__(self, path: str) -> None:
        self.path = path
        self.warnings: List[str] = []
        self._cache: Optional[Tuple[Tuple[int, int, int], List[str], Dict[str, Pin]]] = None
        self.batch_first_sight = False
        self._staged: Dict[str, Pin] = {}  # first-sight pins not written yet (batch mode)
        self._staged_since = 0.0

    # ------------------------------------------------------------------ reading
    def _read(self) -> Tuple[List[str], Dict[str, Pin]]:
        """Lines and pins, copies the caller may edit."""
        lines, pins = self._current()
        return list(lines), dict(pins)

    def _current(self) -> Tuple[List[str], Dict[str, Pin]]:
        """Lines and pins as cached: read only, never edit them."""
        try:
            st = os.stat(self.path)
            stamp = (st.st_ino, st.st_size, st.st_mtime_ns)
        except OSError:
            stamp = None
        cached = self._cache
        if stamp is not None and cached is not None and cached[0] == stamp:
            return cached[1], cached[2]
        lines, pins = self._parse()
        if stamp is not None:
            self._cache = (stamp, lines, pins)
        return lines, pins

    def _parse(self) -> Tuple[List[str], Dict[str, Pin]]:
        try:
            with open(self.path, "r", encoding="utf-8", errors="replace") as fh:
                lines = fh.read().splitlines()
        except FileNotFoundError:
            return [], {}
        except OSError as exc:
            raise KnownDevicesError("cannot read %s: %s" % (self.path, exc.strerror)) from None
        pins: Dict[str, Pin] = {}
        warnings = []
        for no, line in enumerate(lines, 1):
            try:
                pin = parse_line(line)
            except ValueError as exc:
                warnings.append("%s:%d: ignored: %s" % (self.path, no, exc))
                continue
            if pin is None:
                continue
            old = pins.get(pin.device_id)
            if old is not None and old.public_raw32 != pin.public_raw32:
                raise KnownDevicesError(
                    "%s:%d: %s is pinned twice with different keys (%s, %s); remove one"
                    % (self.path, no, pin.device_id, old.fingerprint, pin.fingerprint))
            pins[pin.device_id] = pin
        self.warnings = warnings
        return lines, pins

    def get(self, server_id: str, ident: str) -> Optional[Pin]:
        did = device_id(server_id, ident)
        staged = self._staged.get(did)
        return staged if staged is not None else self._current()[1].get(did)

    def all(self) -> List[Pin]:
        pins = dict(self._current()[1])
        for did, pin in self._staged.items():
            pins.setdefault(did, pin)
        return sorted(pins.values(), key=lambda p: p.device_id)

    # ------------------------------------------------------------------ writing
    @contextlib.contextmanager
    def _locked(self) -> Iterator[None]:
        parent = os.path.dirname(os.path.abspath(self.path))
        try:
            os.makedirs(parent, mode=0o700, exist_ok=True)
            fd = os.open(self.path + ".lock", os.O_RDWR | os.O_CREAT, 0o600)
        except OSError as exc:
            raise KnownDevicesError("cannot lock %s: %s" % (self.path, exc.strerror)) from None
        try:
            fcntl.flock(fd, fcntl.LOCK_EX)
            yield
        finally:
            os.close(fd)  # releases the lock

    def _write(self, lines: List[str]) -> None:
        text = "\n".join(lines) + "\n"
        if not text.startswith("#"):
            text = HEADER + text
        try:
            fsutil.write_atomic(self.path, text, 0o644)
        except OSError as exc:
            raise KnownDevicesError("cannot write %s: %s"
                                    % (self.path, exc.strerror or exc)) from None

    def _put(self, pin: Pin, expect_raw: Optional[bytes], replace: bool) -> Pin:
        """Write ``pin`` under the lock. ``expect_raw``: the pin the caller based its
        decision on (None = unpinned); if the file changed meanwhile, re-decide."""
        self._staged.pop(pin.device_id, None)  # written now: a staged first sight is void
        with self._locked():
            lines, pins = self._read()
            current = pins.get(pin.device_id)
            if current is not None and current.public_raw32 == pin.public_raw32:
                return current
            if current is not None and not replace:
                cur = current.public_raw32
                if expect_raw is None or not hmac.compare_digest(cur, expect_raw):
                    raise KeyChanged(pin.device_id, current.fingerprint, pin.fingerprint,
                                     "already pinned" if expect_raw is None
                                     else "pinned by another console meanwhile")
            out: List[str] = []
            done = False
            for line in lines:
                try:
                    parsed = parse_line(line)
                except ValueError:
                    parsed = None
                if parsed is not None and parsed.device_id == pin.device_id:
                    if not done:
                        out.append(pin.line())
                        done = True
                    continue
                out.append(line)
            if not done:
                out.append(pin.line())
            self._write(out)
        return pin

    def _stage(self, pin: Pin) -> Pin:
        """Batch mode: keep a first-sight pin for the next :meth:`flush`."""
        if not self._staged:
            self._staged_since = time.monotonic()
        self._staged[pin.device_id] = pin
        if (len(self._staged) >= BATCH_MAX_PINS
                or time.monotonic() - self._staged_since >= BATCH_MAX_AGE):
            self.flush()
        return pin

    def flush(self) -> None:
        """Write the staged first-sight pins in one atomic write (under the lock, merged
        with what other consoles wrote meanwhile: their pin wins and is logged)."""
        if not self._staged:
            return
        staged, self._staged = self._staged, {}
        with self._locked():
            lines, pins = self._read()
            for did, pin in staged.items():
                current = pins.get(did)
                if current is None:
                    lines.append(pin.line())
                    pins[did] = pin
                elif not hmac.compare_digest(current.public_raw32, pin.public_raw32):
                    log.error("%s", KeyChanged(did, current.fingerprint, pin.fingerprint,
                                               "pinned by another console meanwhile"))
            self._write(lines)

    def pin(self, server_id: str, ident: str, public_raw32: bytes, via: str = VIA_MANUAL,
            replace: bool = False, now: Optional[float] = None) -> Pin:
        """Pin a key. An existing different pin is replaced only with ``replace=True``
        (else :class:`KeyChanged`)."""
        pin = Pin(server_id, ident, bytes(public_raw32),
                  (("pinned", str(int(time.time() if now is None else now))), ("via", via)))
        return self._put(pin, None, replace)

    def forget(self, server_id: str, ident: str) -> bool:
        did = device_id(server_id, ident)
        staged = self._staged.pop(did, None) is not None
        with self._locked():
            lines, pins = self._read()
            if did not in pins:
                return staged
            out = []
            for line in lines:
                try:
                    parsed = parse_line(line)
                except ValueError:
                    parsed = None
                if parsed is None or parsed.device_id != did:
                    out.append(line)
            self._write(out)
        return True

    def learn(self, message: Any, now: Optional[float] = None) -> Tuple[str, Pin]:
        """Process a ``key`` announcement (raw bytes or a decoded Message).

        Returns ``(outcome, pin)`` with outcome ``new`` (first sight: pinned), ``same``
        or ``rotated`` (valid rotation: new key pinned). Raises :class:`KeyChanged`
        (pin kept) or ``protocol.ProtocolError`` for a broken/self-inconsistent message.
        """
        from remote_gevent.wire import protocol

        ann = protocol.verify_key_announcement(message)
        current = self.get(ann.server_id, ann.ident)
        if current is None:
            if self.batch_first_sight:
                return "new", self._stage(Pin(ann.server_id, ann.ident, ann.public_raw32, (
                    ("pinned", str(int(time.time() if now is None else now))),
                    ("via", VIA_TOFU))))
            pin = self.pin(ann.server_id, ann.ident, ann.public_raw32, VIA_TOFU, now=now)
            return "new", pin
        try:
            new_raw = protocol.verify_key_rotation(message, current.public_raw32)
        except protocol.ProtocolError as exc:
            raise KeyChanged(current.device_id, current.fingerprint, ann.fingerprint,
                             exc.detail or exc.reason) from None
        if hmac.compare_digest(new_raw, current.public_raw32):
            return "same", current
        pin = Pin(ann.server_id, ann.ident, new_raw,
                  (("pinned", str(int(time.time() if now is None else now))),
                   ("via", VIA_ROTATION)))
        return "rotated", self._put(pin, current.public_raw32, replace=False)
