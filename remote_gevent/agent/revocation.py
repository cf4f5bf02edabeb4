"""The agent's revoked keys and certificates (``remote.revoked_keys``, issue 14).

``remote.revoked_keys`` names an OpenSSH KRL (``ssh-keygen -k``) or a plain list of public
keys, as OpenSSH's ``RevokedKeys`` does (:mod:`remote_gevent.crypto.krl`). It is consulted
at every trust decision with the same cheap ``stat`` as ``authorized_keys``
(:func:`~remote_gevent.crypto.authkeys.trust_stamp`): an edit, a replacement or a SIGHUP
applies at once, and the control plane then ends the sessions of every operator the new
list revokes (:meth:`TunnelManager.apply_trust`, close code ``revoked``), exactly as a key
removed from ``authorized_keys``.

Fail closed, as OpenSSH: a configured file that is missing, unsafe (group- or
world-writable, like ``authorized_keys``), unreadable or not a valid KRL/key list trusts
nobody until fixed (logged once per change).

The fleet-wide revocation (:mod:`remote_gevent.agent.fleet_revocation`, ``.fleet``) is
merged in by :meth:`Revocation.set_fleet`.
"""

import logging
import os
import stat
from typing import Any, Callable, Optional, Tuple

from remote_gevent.agent.fleet_revocation import FleetRevocation
from remote_gevent.common import fsutil
from remote_gevent.crypto.authkeys import AuthorizedKeys, trust_stamp
from remote_gevent.crypto.krl import MAX_REVOCATION_BYTES, KrlError, Revocations, \
    parse_revocations
from remote_gevent.wire.codes import Reason

log = logging.getLogger(__name__)

_UNSAFE_MODE = stat.S_IWGRP | stat.S_IWOTH

#: ``session.refuse`` texts of the certificate refusals (merged into control.REFUSE_TEXT):
#: fixed phrases; the detail (which field, how long ago) is logged only.
CERT_REFUSE_TEXT = {
    Reason.UNKNOWN_CA: "certificate not signed by a CA this device trusts",
    Reason.CERT_INVALID: "certificate not usable here",
    Reason.CERT_EXPIRED: "certificate expired",
    Reason.CERT_NOT_YET_VALID: "certificate not yet valid (check clocks)",
    Reason.PRINCIPAL: "certificate principal not accepted by this device",
    Reason.REVOKED: "key or certificate revoked",
}


def load_revocations(path: str) -> "Revocations":
    """Read ``path`` (a KRL or a key list); KrlError if it cannot be used."""
    def check(st: os.stat_result) -> None:
        if not stat.S_ISREG(st.st_mode):
            raise KrlError("%s: not a regular file" % path)
        if st.st_mode & _UNSAFE_MODE:
            raise KrlError("%s: refusing a group- or world-writable file (mode %04o)"
                           % (path, stat.S_IMODE(st.st_mode)))
        if st.st_size > MAX_REVOCATION_BYTES:
            raise KrlError("%s: over %d bytes" % (path, MAX_REVOCATION_BYTES))

    try:
        data = fsutil.read_checked(path, check, follow_symlinks=True)
    except OSError as exc:
        raise KrlError("%s: cannot open: %s" % (path, exc.strerror)) from None
    return parse_revocations(data, path)


class Revocation:
    """What the device holds revoked now: the local file and the fleet revocation."""

    def __init__(self, control: Any) -> None:
        """``control``: the agent's ControlPlane (its config and its trusted keys)."""
        self._get_path: Callable[[], Optional[str]] = \
            lambda: control.agent.cfg.remote.revoked_keys
        self.fleet = FleetRevocation(control)
        self._stamp: Optional[Tuple[Any, ...]] = None
        self._local: Optional[Revocations] = None
        self._fleet: Optional[Revocations] = None
        self._error: Optional[str] = None
        self._changed = False

    def refresh(self, force: bool = False) -> bool:
        """Re-read the local file if it changed (or ``force``); True when what is revoked
        may have changed since the last call (the keys must then be re-applied)."""
        path = self._get_path()
        stamp = trust_stamp(path) if path else None
        changed, self._changed = self._changed, False
        if stamp == self._stamp and not force:
            return changed
        self._stamp = stamp
        self._local, self._error = None, None
        if path:
            try:
                self._local = load_revocations(path)
                log.info("revocations: %d entries from %s", len(self._local), path)
            except KrlError as exc:
                self._error = str(exc)
                log.error("revoked_keys %s: no operator is trusted until this is fixed",
                          exc)
        return True

    def set_fleet(self, revoked: "Revocations") -> None:
        """The fleet-wide revocation now in force (applied at the next trust decision)."""
        self._fleet = revoked
        self._changed = True

    def apply(self, keys: AuthorizedKeys) -> AuthorizedKeys:
        """``keys`` with the revocations in force (no key at all when the file is bad)."""
        if self._error is not None:
            return AuthorizedKeys(source=keys.source, warnings=[self._error])
        merged: Optional[Revocations] = None
        for part in (self._local, self._fleet):
            if part is not None:
                merged = part if merged is None else merged.merge(part)
        return keys.with_revocations(merged) if merged is not None else keys
