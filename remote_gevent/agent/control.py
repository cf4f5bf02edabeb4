"""Agent side of the control plane: consume requests, reply, close, status, alive, key.

One :class:`ControlPlane` per agent, on one :class:`~remote_gevent.common.amqplink.AmqpLink`
logged in with the device's ``ident``/``token``. Two supervised services:

- ``control`` (:meth:`ControlPlane.run`): the link's greenlet. On every (re)connect
  :meth:`_setup` passive-declares ``remote.down``/``remote.up`` (the platform declares
  them; a missing one is a one-line error naming it), declares ``<topic>.cmd``
  (arguments of docs/protocol.md §1), binds ``<topic>.session``/``.close``/``.status``,
  consumes it (prefetch 10) and publishes the ``key`` announcement.
- ``heartbeat`` (:meth:`ControlPlane.heartbeat_loop`, agent/alive.py): ``alive`` with
  event ``started``, then ``periodic`` every ``remote.health_check`` seconds, ``sessions``
  at once (rate-limited) when a session starts or stops resuming; ``key_rotated`` and
  ``stopping`` are sent by :meth:`on_key_rotated` and the agent's stop hook.

Consumer rules (docs/protocol.md §1, §4): a delivery is dispatched on its routing-key
suffix after a size check (16 KiB, *before* any parsing). It is acked once handled and
rejected without requeue when refused; every refusal is logged with its reason code,
the session id when one can be read safely and a digest of the body (never the body).
A refused ``session``/``status`` request with a valid ``reply_to`` gets a signed
``session.refuse`` (for a status request its ``session_id`` is the ``request_id``).
An exception while handling one message is logged and rejects that message only: the
consumer keeps serving. The callbacks run in the link's greenlet and never block:
:meth:`TunnelManager.submit` spawns the session's greenlet and returns.

Publishing goes only through :meth:`AmqpLink.publish` (the link's single, locked write
path). Tunnels do not depend on the link: losing it stops requests and heartbeats,
never an open tunnel; ``session.close`` messages published while it is down wait in the
link's bounded outbox.
"""

import collections
import json
import logging
import re
from typing import Any, Callable, Dict, List, Optional, Tuple

import amqp
import gevent
from amqp.exceptions import NotFound

from remote_gevent.wire import protocol
from remote_gevent.wire import envelope
from remote_gevent.common.amqplink import AmqpLink, LinkError, NotConnected
from remote_gevent.crypto.authkeys import AuthorizedKeys, AuthorizedKeysError, trust_stamp
from remote_gevent.common.logs import escape
from remote_gevent.wire.protocol import MsgType, ProtocolError, Refused
from remote_gevent.wire.codes import Reason
from remote_gevent.wire.envelope import CloseCode
from remote_gevent.agent.tunnels import TunnelManager, device_allow
from remote_gevent.agent.command_queue import declare_command_queue, drop_legacy_queue
from remote_gevent.agent.alive import AliveSender
from remote_gevent.common.broker_topology import (
    EXCHANGE_DOWN,
    EXCHANGE_REPLY,
    EXCHANGE_UP,
    command_queue,
)
from remote_gevent.agent.revocation import CERT_REFUSE_TEXT, Revocation

log = logging.getLogger(__name__)

PREFETCH = 10
REPLY_EXPIRATION_MS = 60000
UP_EXPIRATION_MS = 600000  # key, close
REPLY_WAIT = 2.0  # s a reply from a session greenlet waits for a reconnecting link
RECENT_MAX = 1000  # submitted session ids remembered to drop broker redeliveries
REPLY_TO_PREFIX = "amq.gen-"  # consoles' server-named reply queues (docs/protocol.md §1)
#: Refusals of ``check_session_request`` that come *after* the signature, time window
#: and replay checks: the request is a trusted operator's, fresh and seen once, so its
#: refusal gets a history row (close code ``refused``). Earlier refusals (malformed,
#: wrong device, unknown operator, bad signature, expired, replayed, rate limited) are
#: only logged: anyone can send those, and a replay could repeat one without end.
RECORDED_REFUSALS = (Reason.TARGET_NOT_PERMITTED, Reason.OPERATOR_LIMIT)

_SID_RE = re.compile(r"^[0-9a-f]{32}\Z")
_CORRELATION_RE = re.compile(r"^[\x21-\x7e]{1,200}\Z")

#: Text of a ``session.refuse`` per reason: fixed phrases, never an echo of the request
#: (the detail, which may quote parts of it, goes to the log only).
REFUSE_TEXT = {
    Reason.TOO_LARGE: "message over %d bytes" % protocol.MAX_MESSAGE_BYTES,
    Reason.MALFORMED: "malformed message",
    Reason.WRONG_DEVICE: "request is for another device",
    Reason.UNKNOWN_OPERATOR: "operator key not trusted by this device",
    Reason.BAD_SIGNATURE: "signature does not verify",
    Reason.EXPIRED: "request expired or not yet valid (check clocks)",
    Reason.REPLAYED: "request already seen",
    Reason.TARGET_NOT_PERMITTED: "target not permitted",
    Reason.SHUTTING_DOWN: "agent is stopping",
    Reason.RATE_LIMITED: "too many recent requests",
    Reason.QUEUE_TIMEOUT: "no free session slot",
    Reason.OPERATOR_LIMIT: "this operator already holds its share of the device's sessions "
                           "(remote.max_session_per_operator); close one first",
    Reason.OPERATOR_RATE: "too many requests from this operator (remote.operator_rate); "
                          "retry in a minute",
    Reason.NOT_OWNER: "session belongs to another operator", **CERT_REFUSE_TEXT,
}


#: ``content_encoding`` values a control message may carry (absent = UTF-8 too).
ACCEPTED_ENCODINGS = ("utf-8", "utf8")


def _body_bytes(message: amqp.Message) -> bytes:
    """The delivery's body: raw bytes, refused when too large *before* anything reads it.

    The link keeps bodies raw (it never decodes them by ``content_encoding``: a
    ``punycode`` body costs seconds per megabyte) and does not even buffer one over
    ``protocol.MAX_MESSAGE_BYTES`` (its ``body_size`` says how large it was, ``problem``
    why it is unusable). Control messages are UTF-8 JSON: any other ``content_encoding``
    is refused.
    """
    body = message.body
    if not isinstance(body, (bytes, bytearray, memoryview)):
        raise Refused(Reason.MALFORMED, "body of type %s" % type(body).__name__)
    size = max(len(body), int(getattr(message, "body_size", 0) or 0))
    if size > protocol.MAX_MESSAGE_BYTES:
        raise Refused(Reason.TOO_LARGE, "%d bytes > %d" % (size, protocol.MAX_MESSAGE_BYTES))
    problem = getattr(message, "problem", None)
    if problem:
        raise Refused(Reason.MALFORMED, problem)
    encoding = message.properties.get("content_encoding")
    if encoding and str(encoding).lower() not in ACCEPTED_ENCODINGS:
        raise Refused(Reason.MALFORMED, "content_encoding %s refused (UTF-8 only)"
                      % escape(encoding, 40))
    return bytes(body)


class ControlPlane(AliveSender):
    """The agent's control plane (see the module docstring).

    ``agent`` provides ``cfg``, ``topic``, ``version``, ``uptime``, ``stop_event``,
    ``get_identity()`` and the ``on_key_rotated`` hook list; ``tunnels`` is the
    :class:`~remote_gevent.agent.tunnels.TunnelManager` (settable after construction, since
    the manager needs :meth:`publish_close`). ``link`` defaults to the device's link
    from the config.
    """

    def __init__(self, agent: Any, tunnels: Optional[TunnelManager] = None,
                 link: Optional[AmqpLink] = None) -> None:
        self.agent = agent
        self.tunnels = tunnels
        self.link = link if link is not None else AmqpLink.from_config(
            agent.cfg, stop_event=agent.stop_event, prefetch=PREFETCH,
            max_body=protocol.MAX_MESSAGE_BYTES,
            on_connect=self._on_connect, on_disconnect=self._on_disconnect)
        self.replay = protocol.ReplayCache()
        self.status_replay = protocol.ReplayCache()
        self.counters: Dict[str, int] = collections.Counter()
        self._trusted = AuthorizedKeys(source=agent.cfg.remote.authorized_keys)
        self._trusted_stamp: Optional[Tuple[Any, ...]] = None
        self.revocation = Revocation(self)  # revoked_keys + fleet revocation (issue 14)
        ident = agent.get_identity()
        self._key_message = protocol.make_key_announcement(
            ident, agent.cfg.ident, agent.cfg.remote.server_id)
        self._unsent_keys: List[bytes] = []  # rotations not yet written to a live link
        self._init_alive()
        self._stopping = False
        self._link_greenlet: Optional[gevent.Greenlet] = None
        self._recent: "collections.OrderedDict[str, None]" = collections.OrderedDict()
        agent.on_key_rotated.append(self.on_key_rotated)

    # ------------------------------------------------------------------ helpers
    @property
    def topic(self) -> str:
        return self.agent.topic

    @property
    def queue(self) -> str:
        return command_queue(self.topic)

    def _in_link_greenlet(self) -> bool:
        return gevent.getcurrent() is self._link_greenlet

    def trusted_keys(self, force: bool = False) -> AuthorizedKeys:
        """The operator keys in force, re-read when the file (or its configured path) changes.

        Two ``stat`` calls per trust decision (each request, each stream open, each GC
        pass; see :func:`~remote_gevent.crypto.authkeys.trust_stamp`): editing, replacing or
        ``chmod``-ing ``remote.authorized_keys`` or its directory takes effect without a
        restart; ``force`` (SIGHUP) re-reads it anyway. An unusable or unsafe (group- or
        world-writable) file trusts nobody (logged once per change). Whenever the keys
        are re-read, the sessions of operators no longer trusted end at once
        (:meth:`TunnelManager.apply_trust`, close code ``revoked``).
        """
        path = self.agent.cfg.remote.authorized_keys
        stamp = trust_stamp(path)
        if self.revocation.refresh(force) or stamp != self._trusted_stamp or force:
            self._trusted_stamp = stamp
            try:
                self._trusted = AuthorizedKeys.load(path)
                log.info("trusting %d operator key(s) from %s", len(self._trusted), path)
            except AuthorizedKeysError as exc:
                log.error("%s: no operator is trusted until this is fixed", exc)
                self._trusted = AuthorizedKeys(source=path)
            self._trusted = self.revocation.apply(self._trusted)
            if self.tunnels is not None:
                self.tunnels.apply_trust(self._trusted)
        return self._trusted

    def _stats(self) -> Tuple[int, int]:
        if self.tunnels is None:
            return 0, 0
        try:
            active, waiting = self.tunnels.stats()
            return int(active), int(waiting)
        except Exception:  # noqa: BLE001 - a heartbeat must not die of a stats bug
            log.exception("tunnel stats failed")
            return 0, 0

    # ------------------------------------------------------------------ services
    def run(self) -> None:
        """Service body: the link's connect/setup/drain loop until the agent stops."""
        self._link_greenlet = gevent.getcurrent()
        try:
            self.link.run(self._setup)
        finally:
            self._link_greenlet = None

    def _setup(self, link: AmqpLink) -> None:
        """Topology, consumer and key publication; runs on every (re)connect."""
        vhost = link.url.vhost if link.url is not None else "?"
        for exchange in (EXCHANGE_DOWN, EXCHANGE_UP, EXCHANGE_REPLY):
            try:
                link.declare_exchange(exchange, passive=True)
            except NotFound:
                raise LinkError("exchange %s does not exist on vhost %r: the platform has not "
                                "provisioned it" % (exchange, vhost)) from None
        # Per-connection queue on this node; the durable queue of older versions goes
        # first (a refused delete reopens the channel: no consumer may exist yet).
        drop_legacy_queue(link, self.topic)
        declare_command_queue(link, self.topic)
        self.revocation.fleet.setup(link)  # issue 14: before any request is read
        link.consume(self.queue, self._on_message, handles_problems=True)
        for raw in list(self._unsent_keys) or [self._key_message]:
            link.publish(EXCHANGE_UP, self.topic + ".key", raw, expiration=UP_EXPIRATION_MS)
        self._unsent_keys = []
        log.info("control plane ready: consuming %s, key %s published", self.queue,
                 self.agent.get_identity().fingerprint)

    def _on_connect(self, link: AmqpLink) -> None:
        self.counters["connects"] += 1

    def _on_disconnect(self, link: AmqpLink, exc: Optional[BaseException]) -> None:
        if exc is not None and not self.agent.stop_event.is_set():
            active, waiting = self._stats()
            log.warning("control link lost (%d tunnel(s) open keep running, %d waiting)",
                        active, waiting)

    def begin_stop(self) -> None:
        """From now on session requests are refused with ``shutting_down``."""
        self._stopping = True

    # ------------------------------------------------------------------ publishing
    def publish_close(self, session_id: str, code: str, reason: str = "") -> None:
        """``session.close`` on ``remote.up`` ``<topic>.close`` (the tunnel manager's
        callback). Queued in the link's outbox while it is down; never raises."""
        try:
            raw = protocol.make_session_close(self.agent.get_identity(), session_id, code,
                                              reason)
            self.link.publish(EXCHANGE_UP, self.topic + ".close", raw,
                              expiration=UP_EXPIRATION_MS, outbox=True)
        except (ProtocolError, LinkError, ValueError) as exc:
            log.error("session %s: cannot publish session.close %s: %s", session_id, code, exc)

    def _reply(self, reply_to: str, correlation_id: str, raw: bytes, what: str) -> bool:
        wait = 0.0 if self._in_link_greenlet() else REPLY_WAIT
        try:
            return self.link.publish(EXCHANGE_REPLY, reply_to, raw, correlation_id=correlation_id,
                                     expiration=REPLY_EXPIRATION_MS, delivery_mode=1,
                                     wait=wait)
        except NotConnected as exc:
            log.warning("%s: reply not sent: %s", what, exc)
            return False

    def make_reply(self, message: amqp.Message, session_id: str) -> Callable[[bytes], bool]:
        """``reply(raw)`` bound to a request's ``reply_to``/``correlation_id`` (any greenlet)."""
        reply_to = message.properties["reply_to"]
        correlation_id = self._correlation_id(message, session_id)

        def reply(raw: bytes) -> bool:
            return self._reply(reply_to, correlation_id, raw, "session %s" % session_id)

        return reply

    @staticmethod
    def _correlation_id(message: amqp.Message, fallback: str) -> str:
        cid = message.properties.get("correlation_id")
        return cid if isinstance(cid, str) and _CORRELATION_RE.match(cid) else fallback

    def on_key_rotated(self, old: Any, new: Any) -> None:
        """``agent.on_key_rotated`` hook: publish the new key, signed by it, with the old
        key's rotation signature; then an ``alive`` with event ``key_rotated``."""
        cfg = self.agent.cfg
        raw = protocol.make_key_announcement(new, cfg.ident, cfg.remote.server_id,
                                             previous_key=old)
        self._key_message = raw
        try:
            if self._unsent_keys or not self.link.connected.is_set():
                # Runs in the agent's main greenlet: never wait here (a SIGTERM must not
                # queue behind a dead link), and never overtake an unsent rotation.
                raise NotConnected("control link down")
            self.link.publish(EXCHANGE_UP, self.topic + ".key", raw,
                              expiration=UP_EXPIRATION_MS)
        except NotConnected:
            # Published (after any earlier unsent rotation: the chain must stay whole)
            # by the next _setup.
            self._unsent_keys.append(raw)
            log.warning("key rotation %s -> %s will be published when the control link is "
                        "back", old.fingerprint, new.fingerprint)
        else:
            log.info("published rotated key %s (previous %s)", new.fingerprint,
                     old.fingerprint)
        self.send_alive("key_rotated")  # the next periodic alive carries the new key too

    # ------------------------------------------------------------------ consuming
    def _on_message(self, message: amqp.Message) -> None:
        """Consumer callback (link greenlet): dispatch, then ack or reject. Never raises."""
        routing_key = message.delivery_info.get("routing_key") or ""
        prefix = self.topic + "."
        kind = routing_key[len(prefix):] if routing_key.startswith(prefix) else ""
        body = message.body
        # What a refusal's digest and session id are taken from (never over 16 KiB: the
        # link does not buffer a larger body).
        raw = bytes(body) if isinstance(body, (bytes, bytearray)) \
            and len(body) <= protocol.MAX_MESSAGE_BYTES else b""
        try:
            raw = _body_bytes(message)  # size first, before anything parses it
            if kind == "session":
                self._handle_session(message, raw)
            elif kind == "close":
                self._handle_close(message, raw)
            elif kind == "status":
                self._handle_status(message, raw)
            else:
                raise Refused(Reason.MALFORMED, "unexpected routing key %s"
                              % envelope.short(routing_key))
        except ProtocolError as exc:
            self._refuse(message, raw, kind, exc)
        except Exception:  # noqa: BLE001 - boundary: one message must not stop the consumer
            self.counters["errors"] += 1
            log.exception("error handling %s message (digest %s); rejecting it",
                          kind or "unknown", protocol.request_digest(raw))
            self.link.reject(message, requeue=False)

    def _require_reply_to(self, message: amqp.Message) -> str:
        reply_to = message.properties.get("reply_to")
        if not _usable_reply_to(reply_to):
            raise Refused(Reason.MALFORMED, "missing or invalid reply_to")
        return reply_to

    def _handle_session(self, message: amqp.Message, raw: bytes) -> None:
        sid = protocol.best_effort_session_id(raw)
        if sid is not None and message.delivery_info.get("redelivered") \
                and sid in self._recent:
            # The broker redelivers what we had not acked when the link dropped: a
            # request we already submitted is dropped, not refused as a replay. (A
            # replay by a publisher is never flagged redelivered: it is refused.)
            log.info("session %s: duplicate delivery of a request already handled; dropped",
                     sid)
            self.link.ack(message)
            return
        if self.tunnels is None:
            raise Refused(Reason.SHUTTING_DOWN, "agent is stopping")
        self._require_reply_to(message)
        cfg = self.agent.cfg
        try:
            request = protocol.check_session_request(
                raw, cfg.ident, cfg.remote.server_id, self.trusted_keys(), device_allow(cfg),
                self.replay)
        except Refused as exc:
            if exc.reason in RECORDED_REFUSALS:
                self._record_refusal(raw, exc.reason, exc.detail)
            raise
        if self._stopping:  # checked after trust: a trusted request's refusal is recorded
            self._record_refusal(raw, Reason.SHUTTING_DOWN, "")
            raise Refused(Reason.SHUTTING_DOWN, "agent is stopping")
        sid = request.session_id
        self._recent[sid] = None
        while len(self._recent) > RECENT_MAX:
            self._recent.popitem(last=False)
        log.info("session %s: request from operator %s for %s via relay %s", sid,
                 request.operator.fingerprint, ", ".join(str(t) for t in request.targets),
                 request.relay)
        try:  # refuses (operator_limit, operator_rate_limited) before any session exists
            self.tunnels.submit(request, self.make_reply(message, sid))
        except Refused as exc:
            if exc.reason in RECORDED_REFUSALS:
                self._record_refusal(raw, exc.reason, exc.detail)
            raise
        self.counters["sessions"] += 1
        self.link.ack(message)

    def _record_refusal(self, raw: bytes, refusal: str, detail: str) -> None:
        """History row (via the tunnel manager) for a trusted, fresh request refused here.

        Only for requests that passed checks 1-6 of docs/protocol.md §4 (see
        RECORDED_REFUSALS); everything else is only logged. Never raises."""
        if self.tunnels is None:
            return
        try:
            body = protocol.decode(raw).body  # validated already: cannot fail here
            text = REFUSE_TEXT.get(refusal, refusal)
            if refusal == Reason.TARGET_NOT_PERMITTED:
                text = _targets_text(detail) or text
            self.tunnels.record_refusal(body["session_id"], body["operator"], body["targets"],
                                        refusal, text)
        except (ProtocolError, KeyError, TypeError, ValueError) as exc:
            log.error("cannot record refused request in history: %s", exc)

    def _handle_close(self, message: amqp.Message, raw: bytes) -> None:
        msg = protocol.decode(raw)
        if msg.type != MsgType.SESSION_CLOSE:
            raise Refused(Reason.MALFORMED, "expected session.close, got %s" % msg.type)
        op = envelope.verify_with_authorized(msg, self.trusted_keys(), self.agent.cfg.ident)
        sid = msg.body["session_id"]
        found = False
        owner = self.tunnels.operator_of(sid) if self.tunnels is not None else None
        if owner is not None and owner != op.fingerprint and not op.admin:
            # Logged once by _refuse; the session goes on. (No reply: a close has none.)
            raise Refused(Reason.NOT_OWNER, "session %s: close by operator %s refused: the "
                          "session is operator %s's" % (sid, op.fingerprint, owner))
        if self.tunnels is not None:
            found = bool(self.tunnels.close(sid, CloseCode.CLOSED_BY_OPERATOR,
                                            "closed by operator %s" % op.fingerprint))
        log.info("session %s: close requested by operator %s (%s)", sid, op.fingerprint,
                 "closing" if found else "no such session")
        self.counters["closes"] += 1
        self.link.ack(message)

    def _handle_status(self, message: amqp.Message, raw: bytes) -> None:
        reply_to = self._require_reply_to(message)
        cfg = self.agent.cfg
        request = protocol.check_status_request(raw, cfg.ident, cfg.remote.server_id,
                                                self.trusted_keys(), self.status_replay)
        active, waiting = self._stats()
        # An operator sees its own sessions only; an admin key (remote-gevent-admin) all.
        entries = self._status_entries(None if request.operator.admin
                                       else request.operator.fingerprint)
        identity = self.agent.get_identity()
        args = (identity, request.request_id, cfg.ident, cfg.remote.server_id,
                self.agent.version, self.agent.uptime, active, waiting, cfg.remote.max_session)
        try:
            body = protocol.make_status(*args, entries)
        except ProtocolError as exc:  # a tunnel reported something the schema refuses
            log.error("status %s: session list unusable (%s); answering without it",
                      request.request_id, exc)
            body = protocol.make_status(*args, [])
        log.info("status %s: requested by operator %s (%d active, %d waiting)",
                 request.request_id, request.operator.fingerprint, active, waiting)
        self._reply(reply_to, self._correlation_id(message, request.request_id), body,
                    "status %s" % request.request_id)
        self.counters["status"] += 1
        self.link.ack(message)

    def _status_entries(self, operator: Optional[str] = None) -> List[Dict[str, Any]]:
        """The sessions for a status reply: all, or only ``operator``'s when given."""
        if self.tunnels is None:
            return []
        out = []
        for s in self.tunnels.sessions():
            sid = s.get("session_id") or s.get("id")
            if not isinstance(sid, str) or not _SID_RE.match(sid):
                continue
            if operator is not None and s.get("operator") != operator:
                continue
            out.append({
                "session_id": sid,
                "state": str(s.get("state") or "active")[:16],
                "since": float(s.get("since") or s.get("start") or 0.0),
                "operator": str(s.get("operator") or "")[:64],
                "targets": [str(t)[:300] for t in list(s.get("targets") or ())[:32]],
                "remote_ip": str(s.get("remote_ip") or "")[:64],
                "bytes_in": max(0, int(s.get("bytes_in") or 0)),
                "bytes_out": max(0, int(s.get("bytes_out") or 0)),
            })
        return out

    def _refuse(self, message: amqp.Message, raw: bytes, kind: str,
                exc: ProtocolError) -> None:
        """Log, answer (session/status requests with a usable reply_to) and reject."""
        reason = exc.reason if exc.reason in Reason.ALL else Reason.MALFORMED
        self.counters["refused:" + reason] += 1
        sid = protocol.best_effort_session_id(raw) if kind == "session" else None
        if kind == "status":
            sid = _status_request_id(raw)
        if sid is None and kind in ("session", "status"):
            cid = message.properties.get("correlation_id")
            sid = cid if isinstance(cid, str) and _SID_RE.match(cid) else None
        log.warning("refused %s %s: %s (%s) [digest %s, %d bytes]", kind or "message",
                    sid or "-", reason, escape(exc.detail or "-"),
                    protocol.request_digest(raw),
                    max(len(raw), int(getattr(message, "body_size", 0) or 0)))
        # Settled before the reply: should the broker refuse the reply and close the
        # channel, the refused message must not come back (redelivered) to do it again.
        self.link.reject(message, requeue=False)
        reply_to = message.properties.get("reply_to")
        if kind in ("session", "status") and sid and _usable_reply_to(reply_to):
            text = REFUSE_TEXT.get(reason, reason)
            if reason == Reason.TARGET_NOT_PERMITTED:
                text = _targets_text(exc.detail) or text
            try:
                refusal = protocol.make_session_refuse(self.agent.get_identity(), sid, reason,
                                                       text)
            except ProtocolError as err:  # cannot happen with our codes; never crash here
                log.error("cannot build session.refuse for %s: %s", sid, err)
            else:
                self._reply(reply_to, self._correlation_id(message, sid), refusal,
                            "%s %s" % (kind, sid))


def _usable_reply_to(name: Any) -> bool:
    """A ``reply_to`` we may publish a reply to: a queue-like name with the prefix of the
    consoles' server-named reply queues. The broker lets a device publish on
    ``remote.reply`` only under that prefix and closes the channel on any other routing
    key, so replying to any other name would let a stranger's message cut the control
    link (and, redelivered, do it again and again)."""
    return protocol.is_valid_reply_to(name) and name.startswith(REPLY_TO_PREFIX)


def _status_request_id(raw: bytes) -> Optional[str]:
    """``body.request_id`` of a status request that failed validation, if readable."""
    try:
        if len(raw) > protocol.MAX_MESSAGE_BYTES:
            return None
        rid = json.loads(raw.decode("utf-8"))["body"]["request_id"]
    except (ValueError, TypeError, KeyError, RecursionError):
        return None
    return rid if isinstance(rid, str) and _SID_RE.match(rid) else None


def _targets_text(detail: str) -> str:
    """``<targets> not permitted`` from check_session_request's detail (validated targets,
    not raw request text); '' if the detail has another shape."""
    m = re.match(r"^session [0-9a-f]{32}: (.+) not permitted for SHA256:\S+"
                 r"(?: by (the device's remote\.allow|this operator's permitopen in the "
                 r"device's authorized_keys))?$", detail or "")
    if not m:
        return ""
    return "%s not permitted%s" % (m.group(1), " by " + m.group(2) if m.group(2) else "")

