"""Operator side of the control plane: session requests, status, close, device state.

``ConsoleControl(cfg)`` owns one :class:`remote_gevent.common.amqplink.AmqpLink` logged in with
the operator's broker user. On every (re)connect its ``setup``:

- declares an exclusive, auto-delete, server-named **reply queue** (``x-expires`` 10 min,
  docs/protocol.md §1) and consumes it: replies (``session.queued`` / ``accept`` /
  ``refuse``, ``status``) are routed by ``correlation_id`` to the waiting request;
- only for the commands that need it (``devices``, ``watch``, ``pin``, and a session to a
  device whose key is not pinned yet), declares and consumes the operator's durable
  **status queue** (``console.<user>.status`` by default; bounded by ``x-max-length``
  with drop-head and ``x-message-ttl``, unused for 30 days → deleted) bound to
  ``remote.up`` ``remote.<sid>.*.alive`` / ``.key`` / ``.close``. Other commands do not
  depend on the node it lives on; if that node is down, a temporary queue serves the run.

Session and status requests are published ``mandatory``: a device that is not connected
has no ``<topic>.conn`` queue, the broker returns the request at once and the console
fails with "device ... is not connected" instead of waiting for a reply timeout.

Nothing a device says is believed unless it is signed by the key pinned in
``known_devices`` (``key`` announcements: TOFU or a valid rotation signature, see
:mod:`remote_gevent.console.known_devices`); the routing key must also name the device
the body names (broker topic permissions make the routing key the device's own).

Device state (``state_file``, JSON, atomic writes, merged under a lock): per device the
last ``alive`` (device time ``ts``, capped at our clock), its ``health_check`` interval as
the device reports it (the ``alive`` message's AMQP ``expiration`` is ``2 × health_check``
s, protocol.md §1; fallback: the spacing of consecutive ``periodic`` alives, else 600 s),
fingerprint, version, sessions, last close. A device is **offline** three missed
intervals after its last alive (or at once after an ``alive`` with event ``stopping``).

A console process is short-lived: connection failures before the first successful setup
are not retried but turned into one-line :class:`ConsoleError`\\ s (wrong password, TLS,
unreachable). ``watch`` keeps the link's normal reconnect loop.
"""

from __future__ import annotations

import base64
import contextlib
import logging
import os
import sys
import time
from dataclasses import dataclass, field
from typing import Any, Callable, Dict, Optional, Sequence, Tuple

import gevent
import gevent.event
import gevent.queue

from remote_gevent.wire import protocol
from remote_gevent.wire import envelope
from remote_gevent.wire.codes import refusal_exit
from remote_gevent.common.amqplink import AmqpLink, LinkConfigError, LinkError, LoginRefused
from remote_gevent.console.config import (
    EXIT_BROKER,
    EXIT_CONFIG,
    EXIT_KEY,
    EXIT_LOGIN,
    EXIT_OFFLINE,
    EXIT_REFUSED,
    ConsoleConfig,
    ConsoleError,
)
from remote_gevent.console import certs
from remote_gevent.console.known_devices import KnownDevices, KnownDevicesError, Pin
from remote_gevent.console import presence
from remote_gevent.console.status_queue import (  # noqa: F401 - DRAIN_*: re-exported
    DRAIN_IDLE,
    DRAIN_MAX,
    STATUS_QUEUE_EXPIRES_MS,
    StatusQueueMixin,
    _raw_body,
)

from remote_gevent.console.device_states import (
    DeviceEvent,
    DeviceStates,
    device_status,
    handle_up_message,
    summarize,
)

log = logging.getLogger(__name__)

EXCHANGE_DOWN = "remote.down"
EXCHANGE_UP = "remote.up"
EXCHANGE_REPLY = "remote.reply"  # devices answer here, keyed by our reply queue name
REPLY_QUEUE_EXPIRES_MS = 600000
START_SLACK = 5.0


def link_error(exc: BaseException) -> ConsoleError:
    """A link failure as a console error with the right exit code."""
    if isinstance(exc, LoginRefused):
        return ConsoleError("%s (check user/password in the console config)" % exc, EXIT_LOGIN,
                            "login_refused")
    if isinstance(exc, LinkConfigError):
        return ConsoleError(str(exc), EXIT_CONFIG, "config")
    return ConsoleError(str(exc) or type(exc).__name__, EXIT_BROKER, "broker")


# --------------------------------------------------------------------------- device state


# --------------------------------------------------------------------------- requests


@dataclass
class PendingSession:
    """A published session request, before its answer."""

    session_id: str
    device: str
    server_id: str
    targets: Tuple[str, ...]
    relay: str
    ticket: bytes = field(repr=False)
    console_pk: bytes = field(repr=False)
    console_sk: bytes = field(repr=False)
    pin: Pin = field(repr=False)
    replies: "gevent.queue.Queue[bytes]" = field(repr=False, default=None)  # type: ignore
    relay_pool: Tuple[str, ...] = ()  # signed resume order (issue 13); () = none


@dataclass
class Offer:
    """A verified ``session.accept``: everything needed to build the tunnel."""

    session_id: str
    device: str
    server_id: str
    targets: Tuple[str, ...]
    relay: str
    ticket: bytes = field(repr=False)
    console_pk: bytes = field(repr=False)
    console_sk: bytes = field(repr=False)
    agent_epk: bytes = field(repr=False)
    cipher: str = "xchacha20poly1305"
    device_fingerprint: str = ""
    queued: bool = False


class _ConsoleLink(AmqpLink):
    """AmqpLink that gives up (instead of retrying) until it was up once."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.ever_up = False
        self.first_error: Optional[BaseException] = None

    def connect(self) -> None:
        try:
            super().connect()
        except LinkError as exc:
            if not self.ever_up:
                self.first_error = exc
                self.stop()
            raise


class ConsoleControl(StatusQueueMixin):
    """The console's control-plane client (see the module docstring).

    ``on_event(DeviceEvent)`` is called (in the link greenlet) for every status-queue
    message handled; ``err`` receives the human lines (queued position, warnings).
    """

    def __init__(self, cfg: ConsoleConfig, operator_key: Any = None,
                 consume_status: bool = False,
                 on_event: Optional[Callable[[DeviceEvent], None]] = None,
                 err: Any = None) -> None:
        cfg.require_broker()
        self.cfg = cfg
        self._operator_key = operator_key
        self.consume_status = consume_status
        self.on_event = on_event
        self.err = err if err is not None else sys.stderr
        self.known = KnownDevices(cfg.known_devices)
        self.known.batch_first_sight = True  # flushed after each drain and at close
        self.states = DeviceStates(cfg.state_file)
        self.reply_queue: Optional[str] = None
        self.status_queue = cfg.status_queue_name
        # devices/pin probe presence once per sync_status, watch all along.
        self.probe_presence = consume_status
        self.watch_presence = consume_status and on_event is not None
        self._presence: Optional[gevent.Greenlet] = None
        self._closing = gevent.event.Event()
        self.status_backlog = 0
        self.status_handled = 0
        self._last_status = 0.0
        self._status_tag: Optional[str] = None
        self._waiters: Dict[str, "gevent.queue.Queue[bytes]"] = {}
        self._ready = gevent.event.Event()
        self._greenlet: Optional[gevent.Greenlet] = None
        self._setup_error: Optional[BaseException] = None
        a = cfg.amqp
        try:
            self.link = _ConsoleLink(
                a.urls, cfg.user or "", cfg.password or "", ca_file=a.ca_file,
                cert_file=a.cert_file, key_file=a.key_file, heartbeat=a.heartbeat,
                connect_timeout=a.connect_timeout, reconnect_max_delay=a.reconnect_max_delay,
                name="console %s" % cfg.user, prefetch=64, on_return=self._on_return)
        except LinkError as exc:
            raise link_error(exc) from None

    # ------------------------------------------------------------------ lifecycle
    @property
    def operator_key(self) -> Any:
        if self._operator_key is None:
            self._operator_key = load_operator_key(self.cfg)
        return self._operator_key

    def start(self, timeout: Optional[float] = None) -> "ConsoleControl":
        """Connect and set up; raise ConsoleError if that fails (no retry)."""
        if self._greenlet is not None:
            return self
        if timeout is None:
            timeout = self.cfg.amqp.connect_timeout * len(self.cfg.amqp.urls) + START_SLACK
        self._greenlet = gevent.spawn(self._run)
        gevent.wait([self._ready, self._greenlet], count=1, timeout=timeout)
        if self._ready.is_set() and self.link.connected.is_set():
            if self.watch_presence:  # watch: online/offline from the broker (presence.py)
                self._presence = gevent.spawn(presence.presence_loop, self.cfg, self.states,
                                              self.known, self.on_event, self._closing)
            return self
        error = self.link.first_error or self._setup_error
        if error is None and self._greenlet.dead and self._greenlet.exception is not None:
            error = self._greenlet.exception
        self.close()
        if isinstance(error, ConsoleError):
            raise error
        if isinstance(error, (LinkError, OSError)):
            raise link_error(error)
        if error is not None:
            raise ConsoleError("broker setup failed: %s" % (error,), EXIT_BROKER, "broker")
        raise ConsoleError("no connection to the broker within %.0f s (%s)"
                           % (timeout, self.link.last_error or "no answer"), EXIT_BROKER,
                           "broker")

    def _run(self) -> None:
        try:
            self.link.run(self._setup)
        except LinkConfigError as exc:
            self.link.first_error = self.link.first_error or exc

    def close(self) -> None:
        self._closing.set()
        if self._presence is not None:
            self._presence.kill(block=True, timeout=3.0)
        self.flush_known()
        self.states.flush()
        self.link.stop()
        g = self._greenlet
        if g is not None and not g.dead:
            # The link greenlet sits in drain_events(timeout=1): interrupt it rather than
            # wait; its finally still closes the connection gracefully (bounded).
            g.kill(block=True, timeout=3.0)

    def __enter__(self) -> "ConsoleControl":
        return self.start()

    def __exit__(self, *exc: Any) -> None:
        self.close()

    def _setup(self, link: AmqpLink) -> None:
        try:
            # The status queue first: should its home node be down, the refused declare
            # reopens the channel, which would cancel a consumer registered before it.
            if self.consume_status:
                self._declare_status_queue(link)
            self.reply_queue = link.declare_queue(
                "", durable=False, exclusive=True, auto_delete=True,
                arguments={"x-expires": REPLY_QUEUE_EXPIRES_MS})
            link.bind(self.reply_queue, EXCHANGE_REPLY, self.reply_queue)
            link.consume(self.reply_queue, self._on_reply, exclusive=True)
            if self.consume_status:
                self._status_tag = link.consume(self.status_queue, self._on_status)
        except Exception as exc:
            if not self.link.ever_up:
                self._setup_error = exc
                self.link.stop()
            raise
        self.link.ever_up = True
        self._ready.set()

    # ------------------------------------------------------------------ replies
    def _on_reply(self, message: Any) -> None:
        self.link.ack(message)
        corr = message.properties.get("correlation_id")
        queue = self._waiters.get(corr) if isinstance(corr, str) else None
        if queue is None:
            log.debug("reply for unknown request %s dropped", envelope.short(corr))
            return
        queue.put(_raw_body(message))

    def _on_return(self, message: Any) -> None:
        """A ``mandatory`` request came back unroutable: no ``<topic>.conn`` queue is
        bound, i.e. the device is not connected to the broker (link greenlet)."""
        corr = message.properties.get("correlation_id")
        queue = self._waiters.get(corr) if isinstance(corr, str) else None
        routing_key = str(message.delivery_info.get("routing_key") or "")
        device = routing_key.split(".")[2] if routing_key.count(".") >= 3 else "?"
        if queue is None:
            log.debug("returned message for unknown request %s dropped", envelope.short(corr))
            return
        queue.put(ConsoleError(  # type: ignore[arg-type]
            "device %s is not connected to the broker (request returned unroutable: no "
            "command queue; see `remote-gevent-console devices`)" % device, EXIT_OFFLINE,
            "not_connected"))

    def _publish(self, routing_key: str, raw: bytes, correlation_id: Optional[str] = None,
                 reply_to: Optional[str] = None, mandatory: bool = False) -> None:
        try:
            self.link.publish(EXCHANGE_DOWN, routing_key, raw, correlation_id=correlation_id,
                              reply_to=reply_to, expiration=self.cfg.request_ttl * 1000,
                              delivery_mode=1, wait=self.cfg.amqp.connect_timeout,
                              mandatory=mandatory)
        except LinkError as exc:
            raise link_error(exc) from None

    # ------------------------------------------------------------------ pins
    def require_pin(self, device: str, learn: bool = True) -> Pin:
        """The device's pinned key; learn it from the status queue first if needed."""
        try:
            pin = self.known.get(self.cfg.server_id, device)
            if pin is None and learn:
                self.sync_status()
                pin = self.known.get(self.cfg.server_id, device)
        except KnownDevicesError as exc:
            raise ConsoleError(str(exc), EXIT_CONFIG, "known_devices") from None
        if pin is None:
            raise ConsoleError(
                "device %s/%s has no pinned key in %s and no key announcement of it was "
                "seen; pin it by hand after checking `remote-gevent pubkey` on the device: "
                "remote-gevent-console pin %s --key 'ssh-ed25519 AAAA...' (or run "
                "`remote-gevent-console pin %s --wait 60` and restart its agent)"
                % (self.cfg.server_id, device, self.cfg.known_devices, device, device),
                EXIT_KEY, "not_pinned")
        return pin

    # ------------------------------------------------------------------ sessions
    def start_request(self, device: str, targets: Sequence[str],
                      relay: Optional[str] = None,
                      relay_pool: Sequence[str] = ()) -> PendingSession:
        """Sign and publish a ``session.request``; return what the answer is matched to.
        ``relay_pool``: where the session may resume (console/relay_pool.py)."""
        from remote_gevent.crypto import tunnel_crypto

        pin = self.require_pin(device)
        pk, sk = tunnel_crypto.kx_keypair()
        ticket = protocol.new_ticket()
        relay = relay or self.cfg.relay_address
        try:
            sid, raw = protocol.make_session_request(
                self.operator_key, device, self.cfg.server_id, pk, list(targets), relay,
                ticket, ttl=self.cfg.request_ttl, cipher=self.cfg.cipher,
                relay_pool=relay_pool)
        except (protocol.ProtocolError, ValueError) as exc:
            raise ConsoleError("cannot build the session request: %s" % exc, EXIT_CONFIG,
                               "malformed") from None
        pending = PendingSession(sid, device, self.cfg.server_id, tuple(targets), relay,
                                 ticket, pk, sk, pin, gevent.queue.Queue(), tuple(relay_pool))
        self._waiters[sid] = pending.replies
        self._publish(self.cfg.topic(device) + ".session", raw, correlation_id=sid,
                      reply_to=self.reply_queue, mandatory=True)
        log.info("session %s: requested %s on %s via relay %s", sid, ",".join(targets),
                 device, relay)
        return pending

    def wait_offer(self, pending: PendingSession) -> Offer:
        """Wait for ``queued`` / ``accept`` / ``refuse``; return the verified Offer."""
        sid = pending.session_id
        deadline = time.monotonic() + self.cfg.reply_timeout
        queued = False
        try:
            while True:
                remaining = deadline - time.monotonic()
                try:
                    raw = pending.replies.get(timeout=max(0.0, remaining))
                except gevent.queue.Empty:
                    if queued:
                        raise ConsoleError(
                            "session %s: still queued on %s after %.0f s; giving up"
                            % (sid, pending.device, self.cfg.queue_wait), EXIT_OFFLINE,
                            "queue_timeout") from None
                    raise ConsoleError(
                        "device %s did not answer within %.0f s: offline or not consuming "
                        "(see `remote-gevent-console devices`)"
                        % (pending.device, self.cfg.reply_timeout), EXIT_OFFLINE,
                        "no_reply") from None
                if isinstance(raw, BaseException):
                    raise raw  # the early relay dial failed for good (session.py)
                try:
                    msg = protocol.decode(raw)
                except protocol.ProtocolError as exc:
                    log.warning("session %s: ignoring undecodable reply: %s", sid, exc)
                    continue
                if msg.type == protocol.MsgType.SESSION_ACCEPT:
                    return self._verify_accept(pending, msg, queued)
                if msg.type not in (protocol.MsgType.SESSION_QUEUED,
                                    protocol.MsgType.SESSION_REFUSE):
                    log.warning("session %s: ignoring unexpected %s reply", sid, msg.type)
                    continue
                try:
                    protocol.verify(msg, pending.pin.public_raw32)
                except protocol.ProtocolError as exc:
                    self.err.write("remote-gevent-console: warning: ignoring a %s for session "
                                   "%s not signed by the pinned key of %s: %s\n"
                                   % (msg.type, sid, pending.device, exc))
                    continue
                if msg.body.get("session_id") != sid:
                    continue
                if msg.type == protocol.MsgType.SESSION_QUEUED:
                    queued = True
                    deadline = time.monotonic() + self.cfg.queue_wait
                    self.err.write("session %s: queued at position %d on %s (device at "
                                   "max_session)\n" % (sid, msg.body["position"],
                                                       pending.device))
                    self.err.flush()
                    continue
                code, reason = msg.body["code"], msg.body.get("reason", "")
                exit_code, hint = refusal_exit(code, reason)  # issue 15: relay mismatch → 12
                raise ConsoleError("device %s refused the session: %s%s%s%s"
                                   % (pending.device, code, " (%s)" % reason if reason else "",
                                      hint, certs.refusal_hint(code)), exit_code, code)
        finally:
            self._waiters.pop(sid, None)

    def _verify_accept(self, pending: PendingSession, msg: protocol.Message,
                       queued: bool) -> Offer:
        pin = pending.pin
        try:
            acc = protocol.verify_session_accept(msg, pin.public_raw32, pending.session_id,
                                                 pending.console_pk)
        except protocol.ProtocolError as exc:
            # A legitimate rotation we have not followed yet? Drain the status queue once.
            newer = None
            if msg.body.get("device_key") != pin.fingerprint:
                with contextlib.suppress(ConsoleError):
                    self.sync_status()
                newer = self.known.get(pin.server_id, pin.ident)
            if newer is None or newer.public_raw32 == pin.public_raw32:
                raise ConsoleError(
                    "session %s: the accept from %s is not signed by its pinned key %s (%s) — "
                    "possible impersonation; no byte was sent"
                    % (pending.session_id, pending.device, pin.fingerprint, exc.detail
                       or exc.reason), EXIT_KEY, "bad_signature") from None
            pending.pin = newer
            return self._verify_accept(pending, msg, queued)
        return Offer(pending.session_id, pending.device, pending.server_id, pending.targets,
                     pending.relay, pending.ticket, pending.console_pk, pending.console_sk,
                     acc.epk, acc.cipher, pin.fingerprint, queued)

    def request_session(self, device: str, targets: Sequence[str],
                        relay: Optional[str] = None) -> Offer:
        return self.wait_offer(self.start_request(device, targets, relay))

    # ------------------------------------------------------------------ status / close
    def status(self, device: str) -> Dict[str, Any]:
        """The device's signed ``status`` (sessions list) body."""
        pin = self.require_pin(device)
        rid, raw = protocol.make_status_request(self.operator_key, device, self.cfg.server_id,
                                                ttl=self.cfg.request_ttl)
        replies: "gevent.queue.Queue[bytes]" = gevent.queue.Queue()
        self._waiters[rid] = replies
        try:
            self._publish(self.cfg.topic(device) + ".status", raw, correlation_id=rid,
                          reply_to=self.reply_queue, mandatory=True)
            deadline = time.monotonic() + self.cfg.reply_timeout
            while True:
                try:
                    data = replies.get(timeout=max(0.0, deadline - time.monotonic()))
                except gevent.queue.Empty:
                    raise ConsoleError("device %s did not answer the status request within "
                                       "%.0f s: offline or not consuming"
                                       % (device, self.cfg.reply_timeout), EXIT_OFFLINE,
                                       "no_reply") from None
                if isinstance(data, BaseException):
                    raise data
                try:
                    msg = protocol.decode(data)
                    protocol.verify(msg, pin.public_raw32)
                except protocol.ProtocolError as exc:
                    log.warning("status %s: ignoring reply: %s", rid, exc)
                    continue
                if msg.type == protocol.MsgType.SESSION_REFUSE \
                        and msg.body["session_id"] == rid:
                    raise ConsoleError("device %s refused the status request: %s (%s)"
                                       % (device, msg.body["code"], msg.body["reason"]),
                                       EXIT_REFUSED, msg.body["code"])
                if msg.type == protocol.MsgType.STATUS:
                    try:
                        return protocol.verify_status(msg, pin.public_raw32, rid)
                    except protocol.ProtocolError as exc:
                        log.warning("status %s: ignoring reply: %s", rid, exc)
        finally:
            self._waiters.pop(rid, None)

    def close_session(self, device: str, session_id: str, reason: str = "") -> None:
        """Ask the device to close a session (``session.close`` on ``remote.down``)."""
        raw = protocol.make_session_close(self.operator_key, session_id,
                                          envelope.CloseCode.CLOSED_BY_OPERATOR,
                                          reason or "closed by operator")
        self._publish(self.cfg.topic(device) + ".close", raw, correlation_id=session_id)

def load_operator_key(cfg: ConsoleConfig) -> Any:
    from remote_gevent.crypto import identity

    try:
        key = identity.load(cfg.operator_key)
    except identity.IdentityError as exc:
        hint = ""
        if not os.path.exists(cfg.operator_key):
            hint = " (create it with `remote-gevent-console keygen`)"
        raise ConsoleError("%s%s" % (exc, hint), EXIT_CONFIG, "operator_key") from None
    return certs.attach_certificate(key, cfg)  # <key>-cert.pub or operator_cert (issue 14)


def b64(data: bytes) -> str:
    return base64.b64encode(data).decode("ascii")


__all__ = ["ConsoleControl", "Offer", "PendingSession", "DeviceStates", "DeviceEvent",
           "device_status", "handle_up_message", "summarize", "load_operator_key"]
