"""The fleet-wide revocation (issue 14): one KRL, signed by a CA the device trusts,
published once on the broker and applied by every device.

Where it is kept:

- **on the broker**, in each device's own queue ``<topic>.fleet`` (durable, at most one
  message, drop-head, unused for 30 days → deleted), bound to the exchange
  ``remote.fleet`` with ``<server_id>.revocation``: a publication reaches every online
  device at once, and waits in the queue of every offline one;
- **on the device**, in ``remote.fleet_revocation_path`` (0600, written atomically): the
  last valid revocation, applied again at every start.

On every (re)connect the control plane calls :meth:`FleetRevocation.setup` *before* it
consumes its command queue: the stored revocation, then whatever waits in
``<topic>.fleet``, are applied (and the sessions they revoke ended) before any request
is read. Then the queue is consumed for live publications.

A revocation is applied only if its SSHSIG (namespace ``remote-gevent-krl``) was made by
the key of a ``cert-authority`` line of this device and its KRL version
(``ssh-keygen -k -z VERSION``) is not older than the one in force, so neither a stranger
nor a replay of an older list can lift a revocation. Each publication replaces the
previous fleet list (it is the whole list, not a delta); ``remote.revoked_keys`` still
applies besides it.
"""

import logging
import os
from typing import Any, Optional

from amqp.exceptions import AccessRefused, NotFound

from remote_gevent.common import fsutil
from remote_gevent.common.logs import escape
from remote_gevent.crypto import sshsig
from remote_gevent.crypto.identity import fingerprint_of
from remote_gevent.crypto.krl import KRL_MAGIC, KrlError, parse_revocations
from remote_gevent.wire import fleet

log = logging.getLogger(__name__)

QUEUE_ARGS = {"x-max-length": 1, "x-overflow": "drop-head", "x-expires": 30 * 86400000}
MAX_WAITING = 10  # messages read at set-up (the queue holds one; bounded anyway)


class FleetError(ValueError):
    """A fleet revocation that is not applied (logged; the one in force stays)."""


class FleetRevocation:
    """The fleet revocation of one agent (``control``: its ControlPlane)."""

    def __init__(self, control: Any) -> None:
        self.control = control
        self.version: Optional[int] = None
        self.krl: Optional[bytes] = None
        self._stored_loaded = False

    @property
    def queue(self) -> str:
        return self.control.topic + ".fleet"

    def setup(self, link: Any) -> None:
        """Stored revocation, then the waiting one, then consume (see the module doc)."""
        if not self._stored_loaded:
            self._stored_loaded = True
            self._load_stored()
        if not self._bind(link):
            return
        for _ in range(MAX_WAITING):
            message = link.get(self.queue)
            if message is None:
                break
            self._on_message(link, message)
        link.consume(self.queue, lambda m: self._on_message(link, m))

    def _bind(self, link: Any) -> bool:
        """Declare and bind ``<topic>.fleet``; False (logged) on a platform that has no
        ``remote.fleet`` or does not let the device read it: the control plane must go on
        serving there (py-amqp reopens the channel the broker closed; its qos is restored)."""
        cfg = self.control.agent.cfg
        try:
            link.declare_queue(self.queue, durable=True, arguments=QUEUE_ARGS,
                               replace_mismatch=True)
            link.bind(self.queue, fleet.FLEET_EXCHANGE,
                      fleet.routing_key(cfg.remote.server_id))
        except (NotFound, AccessRefused) as exc:
            channel = link.channel
            if channel is not None and link.prefetch:
                channel.basic_qos(0, link.prefetch, False)
            log.error("no fleet revocation on this platform (%s): provision the exchange "
                      "%s and the device's read permission on it (docs/protocol.md)",
                      escape(str(exc)), fleet.FLEET_EXCHANGE)
            return False
        return True

    def _on_message(self, link: Any, message: Any) -> None:
        try:
            self.apply(bytes(message.body or b""))
        except FleetError as exc:
            log.warning("fleet revocation refused: %s", escape(str(exc)))
        link.ack(message)  # the queue only ever needs the latest one

    def _store(self, raw: bytes) -> None:
        """Keep it for the next start. A failure is logged, never raised: the revocation
        applies now anyway, and an OSError in a consumer would cut the control link."""
        path = self.control.agent.cfg.remote.fleet_revocation_path
        try:
            fsutil.write_atomic(path, raw, mode=0o600)
        except OSError as exc:
            log.error("fleet revocation applied but not stored in %s (%s): it will not "
                      "survive a restart until the next publication", path, exc.strerror)

    def _load_stored(self) -> None:
        path = self.control.agent.cfg.remote.fleet_revocation_path
        if not os.path.exists(path):
            return
        try:
            with open(path, "rb") as f:
                self.apply(f.read(fleet.MAX_MESSAGE_BYTES + 1), persist=False)
        except (OSError, FleetError) as exc:
            log.error("stored fleet revocation %s not applied: %s", path, escape(str(exc)))

    def apply(self, raw: bytes, persist: bool = True) -> bool:
        """Verify and apply one revocation message; True if it changed what is revoked."""
        server_id = self.control.agent.cfg.remote.server_id
        try:
            krl, sig = fleet.decode_revocation(raw, server_id)
            ca = sshsig.verify(sig, krl, fleet.SIG_NAMESPACE)
        except ValueError as exc:  # SigError too
            raise FleetError(str(exc)) from None
        ca_fp = fingerprint_of(ca)
        if self.control.trusted_keys().authority(ca_fp) is None:
            raise FleetError("signed by %s, not a cert-authority of this device" % ca_fp)
        if not krl.startswith(KRL_MAGIC):
            raise FleetError("not a KRL (a fleet revocation needs its version)")
        try:
            revoked = parse_revocations(krl, "fleet revocation")
        except KrlError as exc:
            raise FleetError(str(exc)) from None
        if self.version is not None and (revoked.version < self.version or (
                revoked.version == self.version and krl != self.krl)):
            raise FleetError("version %d is older than the one in force (%d)"
                             % (revoked.version, self.version))
        if krl == self.krl:
            return False
        if persist:
            self._store(raw)
        self.version, self.krl = revoked.version, krl
        self.control.revocation.set_fleet(revoked)
        self.control.trusted_keys()  # applies it now: revoked sessions end
        log.info("fleet revocation version %d by CA %s applied (%d entries)",
                 revoked.version, ca_fp, len(revoked))
        return True
