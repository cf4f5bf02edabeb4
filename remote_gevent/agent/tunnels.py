"""Agent side of the tunnels: admission, relay dial, stream targets, garbage collection.

``TunnelManager`` is what the control plane hands accepted session requests to
(docs/design.md, "Agent runtime"). Its shape:

- ``submit(request, reply)`` never blocks the AMQP consumer: each session runs in its
  own greenlet in one ``gevent.pool.Group``. A session greenlet catches everything its
  session can throw, so an error ends that session only (logged with the session id,
  close code ``error``) and still writes its history row and publishes its close.
- Admission is a ``gevent.lock.BoundedSemaphore(max_session)``. At the cap the
  requester is told ``session.queued`` (with the number of sessions waiting ahead of
  it) and the session waits at most ``queue_timeout``; it is never dropped silently.
  Blocking waits (the slot, the relay pairing) run in a child greenlet that the
  session greenlet watches together with its own wake-up event, so an operator close,
  the GC or a shutdown can end a waiting session at once and cleanly, without
  throwing exceptions into code that holds a socket or a permit.
- The relay is the one configured for our server id, never one the request names
  freely: a request is only a way to *confirm* that relay, so an operator key cannot
  make the device dial an arbitrary host (``relay_refused`` otherwise).
- Streams are checked at open time against the session's effective targets
  (request ∩ device allow ∩ operator permitopen, fixed when the request was
  accepted) *and* the live device allow-list *and* the operator's key as
  ``authorized_keys`` holds it now (a SIGHUP or an edit that narrows the allow-list or
  the key's ``permitopen`` applies to new streams of running sessions).
- Trust is live: :meth:`TunnelManager.apply_trust` (called whenever the trusted keys
  change, and the GC consults them every pass) ends every running and waiting
  session of an operator that is no longer trusted, close code ``revoked``.
- Fairness (:mod:`remote_gevent.agent.fairness`): :meth:`TunnelManager.submit` refuses a
  request beyond the operator's share of ``max_session`` (``operator_limit``) or its
  request rate (``operator_rate_limited``), before any session exists.
- Exactly one history row and one ``publish_close`` per submitted session, whatever
  the path: refused before the tunnel, orphaned at the relay, timed out, closed.
  A trusted, fresh request the control plane refuses before submitting it gets one row
  too (:meth:`TunnelManager.record_refusal`, close code ``refused``), but no close.

Close code for the paths that never reach a tunnel: wrong relay, relay refused,
unreachable or not pairing in time → ``relay_refused``; pairing connection dropped →
``relay_lost``; queue → ``queue_timeout``; shutdown → ``shutdown``.
"""

from __future__ import annotations

import logging
import socket
import time
from typing import Any, Callable, Dict, List, Optional, Sequence, Tuple

import gevent
import gevent.event
import gevent.lock
import gevent.pool

from remote_gevent.crypto import authkeys
from remote_gevent.agent import fairness
from remote_gevent.wire import mux
from remote_gevent.wire import mux_limits
from remote_gevent.wire import protocol
from remote_gevent.wire import envelope
from remote_gevent.common.addresses import format_address
from remote_gevent.common import tls
from remote_gevent.crypto import tunnel_crypto
from remote_gevent.agent.history import History, record_safely
from remote_gevent.wire.protocol import Reason, Refused
from remote_gevent.wire.envelope import CloseCode
from remote_gevent.common.sockets import close_quietly
from remote_gevent.wire import rendezvous

log = logging.getLogger(__name__)

CONNECT_TIMEOUT = 10.0  # seconds to connect a TCP target for one stream
RELAY_CONNECT_TIMEOUT = 10.0  # seconds for TCP connect + TLS handshake + hello to the relay
# Seconds we wait for the relay's OK (the console to arrive). Longer than the relay's
# own pairing timeout (rendezvous.DEFAULT_PAIRING_TIMEOUT, 30 s) so that normally the relay
# says "ERR timeout" first and we know why.
PAIRING_TIMEOUT = 60.0
PAIRING_GRACE = 5.0
# GC backstop: a session still dialing after this is an orphan, whatever the relay does.
DIAL_BOUND = RELAY_CONNECT_TIMEOUT + PAIRING_TIMEOUT + PAIRING_GRACE
GC_MIN_INTERVAL = 0.2  # seconds; GC period bounds
GC_MAX_INTERVAL = 5.0
GC_FRACTION = 4  # GC period = smallest timeout / GC_FRACTION, within the bounds
REPLY_TIMEOUT = 10.0  # seconds a reply() publish may take before the session gives up
SHUTDOWN_KILL_TIMEOUT = 2.0  # seconds for killed session greenlets to unwind

# Session states (``sessions()`` reports them).
WAITING = "waiting"  # for a slot
ADMITTED = "admitted"  # slot taken, accept being sent / keys derived
DIALING = "dialing"  # TLS to the relay and pairing
RUNNING = "running"  # tunnel handshake and streams
ENDED = "ended"

# ``session.refuse`` must carry a refusal reason (protocol.Reason), not a close code.
# Close codes without a refusal counterpart get one if protocol.py grows it; until then
# a wrong relay is a malformed request and an operator's close of a waiting session
# is answered by session.close only (the operator asked for it).
_REFUSE_FOR_CLOSE = {
    CloseCode.QUEUE_TIMEOUT: Reason.QUEUE_TIMEOUT,
    CloseCode.SHUTDOWN: Reason.SHUTTING_DOWN,
    CloseCode.RELAY_REFUSED: getattr(Reason, "RELAY_REFUSED", Reason.MALFORMED),
    CloseCode.CLOSED_BY_OPERATOR: getattr(Reason, "CLOSED_BY_OPERATOR", None),
    CloseCode.REVOKED: Reason.UNKNOWN_OPERATOR,
}
REVOKED_TEXT = "operator key no longer trusted"

Reply = Callable[[bytes], Any]
PublishClose = Callable[[str, str, str], Any]


class TargetNotPermitted(Exception):
    """Raised by ``on_open``: the mux turns ``.code`` / ``.reason`` into OPEN_FAIL."""

    code = Reason.TARGET_NOT_PERMITTED

    def __init__(self, target: str) -> None:
        self.reason = "%s not permitted" % envelope.short(target)
        super().__init__(self.reason)


class OperatorRevoked(Exception):
    """Raised by ``on_open`` when the session's operator is no longer trusted."""

    code = CloseCode.REVOKED
    reason = REVOKED_TEXT


class _End(Exception):
    """Ends a session before its tunnel runs, with a close code."""

    def __init__(self, code: str, reason: str) -> None:
        super().__init__("%s: %s" % (code, reason))
        self.code = code
        self.reason = reason


def device_allow(cfg: Any) -> Tuple[str, ...]:
    """The device allow-list as the agent enforces it.

    ``remote.allow`` plus the virtual targets ``@transfer`` and ``@sftp`` when the
    device has transfer roots configured (configuring a root is the device owner's
    consent to file transfer; ``remote.allow`` holds ``host:port`` items only).
    The control plane should pass the same list to ``check_session_request``.
    """
    allow = tuple(cfg.remote.allow)
    transfer = getattr(cfg.remote, "transfer", None)
    if transfer is not None and getattr(transfer, "roots", ()):
        allow += tuple(sorted(authkeys.VIRTUAL_TARGETS))
    return allow


def configured_relay(cfg: Any) -> Tuple[str, int]:
    """``(host, port)`` of the relay configured for our server id."""
    from remote_gevent.agent.config import split_host_port

    host, port = split_host_port(cfg.remote.relays[cfg.remote.server_id])
    assert port is not None
    return host, port


def _same_relay(named: str, configured: Tuple[str, int]) -> bool:
    from remote_gevent.agent.config import Invalid, split_host_port

    try:
        host, port = split_host_port(named)
    except Invalid:
        return False
    return host.lower().rstrip(".") == configured[0].lower().rstrip(".") \
        and port == configured[1]


def gc_interval(cfg: Any) -> float:
    """GC period: a fraction of the shortest timeout, within [GC_MIN, GC_MAX]."""
    shortest = min(cfg.remote.idle_timeout, cfg.remote.ack_timeout)
    return max(GC_MIN_INTERVAL, min(GC_MAX_INTERVAL, float(shortest) / GC_FRACTION))


class _Session:
    """Book-keeping for one submitted session (owned by its greenlet)."""

    def __init__(self, request: Any, reply: Reply) -> None:
        self.request = request
        self.reply = reply
        self.id: str = request.session_id
        self.since = time.time()
        self.state = WAITING
        self.admitted = False
        self.sem: Optional[Any] = None  # the semaphore we hold a permit of, if any
        self.close_request: Optional[Tuple[str, str]] = None
        self.wake = gevent.event.Event()
        self.tunnel: Optional[mux.Tunnel] = None
        self.remote_ip = ""
        self.dial_started: Optional[float] = None
        self.transfers = 0
        self.greenlet: Optional[gevent.Greenlet] = None

    @property
    def operator(self) -> str:
        return self.request.operator.fingerprint

    @property
    def targets(self) -> List[str]:
        return [str(t) for t in self.request.targets]


class TunnelManager:
    """All agent-side sessions of one agent process (see the module docstring)."""

    def __init__(self, cfg: Any, get_identity: Callable[[], Any], history: Optional[History],
                 publish_close: PublishClose, relay_context: Any = None,
                 trusted_keys: Optional[Callable[[], Any]] = None) -> None:
        self._cfg = cfg
        #: ``() -> AuthorizedKeys`` in force now (the control plane's ``trusted_keys``,
        #: which calls :meth:`apply_trust` when they change); None: the keys of the
        #: requests are trusted for the sessions' lifetime (tests).
        self.trusted_keys = trusted_keys
        self._rates = fairness.OperatorRates()
        self._get_identity = get_identity
        self._history = history
        self._publish_close = publish_close
        self._relay_context = relay_context
        self._sem = gevent.lock.BoundedSemaphore(cfg.remote.max_session)
        self._resized = gevent.event.Event()  # set (and replaced) when _sem is replaced
        self._group = gevent.pool.Group()
        self._sessions: Dict[str, _Session] = {}
        self._waiting: List[_Session] = []
        self._device_allow = device_allow(cfg)
        self._shutting_down = False
        # Streams of all tunnels together against remote.max_streams (mux_limits).
        self._agent_streams = mux_limits.StreamCounter(cfg.remote.max_streams)

    # ------------------------------------------------------------------ public API

    @property
    def cfg(self) -> Any:
        return self._cfg

    def submit(self, request: Any, reply: Reply) -> None:
        """Serve an accepted ``protocol.SessionRequest``; returns at once.

        ``reply(raw)`` publishes a signed reply (queued / accept / refuse) to the
        requester; it is called from the session's greenlet.
        """
        sid = request.session_id
        if sid in self._sessions:  # the replay cache should make this impossible
            log.warning("session %s: duplicate request ignored", sid)
            return
        self._check_fair_share(request)
        s = _Session(request, reply)
        self._sessions[sid] = s
        s.greenlet = self._group.spawn(self._session_main, s)

    def _check_fair_share(self, request: Any) -> None:
        """Raise Refused if ``request``'s operator is over its rate or its share."""
        r = self._cfg.remote
        fp = request.operator.fingerprint
        if not self._rates.take(fp, int(getattr(r, "operator_rate", 0) or 0),
                                int(getattr(r, "operator_burst", 1) or 1)):
            raise Refused(Reason.OPERATOR_RATE, "session %s: operator %s over %s requests "
                          "per minute (burst %s)" % (request.session_id, fp, r.operator_rate,
                                                     r.operator_burst))
        trusted = self._trusted_now()
        share = fairness.operator_share(self._cfg, len(trusted) if trusted is not None else 1)
        if share is None:
            return
        held = sum(1 for s in self._sessions.values() if s.operator == fp and s.state != ENDED)
        if held >= share:
            raise Refused(Reason.OPERATOR_LIMIT, "session %s: operator %s already holds %d "
                          "session(s), its share (%d) of max_session %d"
                          % (request.session_id, fp, held, share, r.max_session))

    def operator_of(self, session_id: str) -> Optional[str]:
        """Fingerprint of the operator of a live session; None if there is none."""
        s = self._sessions.get(session_id)
        return None if s is None or s.state == ENDED else s.operator

    def apply_trust(self, trusted: Any) -> int:
        """End every live session whose operator ``trusted`` no longer holds (close code
        ``revoked``: running tunnels are closed, waiters refused). Returns how many."""
        revoked = 0
        for s in list(self._sessions.values()):
            if s.state == ENDED or s.close_request is not None:
                continue
            if trusted.get(s.operator) is None:
                log.warning("session %s: operator %s is no longer trusted: revoked", s.id,
                            s.operator)
                self._request_close(s, CloseCode.REVOKED, REVOKED_TEXT)
                revoked += 1
        return revoked

    def _trusted_now(self) -> Any:
        """The trusted keys in force (consulting them may revoke sessions), or None."""
        if self.trusted_keys is None:
            return None
        return self.trusted_keys()

    def close(self, session_id: str, code: str = CloseCode.CLOSED_BY_OPERATOR,
              reason: str = "") -> bool:
        """End a session (running, dialing or waiting); False if there is none."""
        s = self._sessions.get(session_id)
        if s is None or s.state == ENDED:
            return False
        log.info("session %s: close requested: %s %s", session_id, code, reason)
        self._request_close(s, code, reason or code)
        return True

    def stats(self) -> Tuple[int, int]:
        """``(active, waiting)``: admitted sessions and sessions waiting for a slot."""
        active = sum(1 for s in self._sessions.values() if s.admitted and s.state != ENDED)
        return active, len(self._waiting)

    def sessions(self) -> List[Dict[str, Any]]:
        """One dict per live session, oldest first (for ``status`` replies)."""
        out = []
        for s in sorted(self._sessions.values(), key=lambda x: x.since):
            t = s.tunnel
            out.append({
                "id": s.id, "since": s.since, "state": s.state, "operator": s.operator,
                "targets": s.targets, "remote_ip": s.remote_ip,
                "bytes_in": t.bytes_in if t else 0, "bytes_out": t.bytes_out if t else 0,
                "streams": t.streams_opened if t else 0,
            })
        return out

    def record_refusal(self, session_id: str, operator: str, targets: Sequence[str],
                       refusal: str, text: str) -> None:
        """History row for a request refused *before* admission (close code ``refused``).

        The control plane calls it only for requests that passed every trust check
        (trusted operator's signature, time window, replay cache) and were then refused
        (``target_not_permitted``, ``shutting_down``): so there is at most one row per
        session id, and strangers, forgers and replayers, who are only logged, cannot
        fill the disk. Duration 0, no remote IP; ``reason`` = ``<refusal>: <text>``.
        """
        if session_id in self._sessions:  # admitted already: its own row will follow
            return
        reason = "%s: %s" % (refusal, text) if text else refusal
        record_safely(self._history, start=time.time(), session_id=session_id, remote_ip="",
                      duration=0.0, close_code=CloseCode.REFUSED, operator=operator,
                      targets=[str(t) for t in targets], reason=reason)

    def apply_config(self, cfg: Any) -> None:
        """Apply a reloaded config (SIGHUP).

        Live: the allow-list (new streams of running sessions too), idle/ack/queue
        timeouts, keepalive of new tunnels, transfer roots, the relay for new sessions.
        ``max_session``: a new semaphore of the new size replaces the old one; the
        running sessions are carried over to it in start order (one permit each while
        permits last; when shrinking, the surplus sessions keep running without a
        permit and a permit freed later goes to them first, so the number of running
        sessions never exceeds the new cap for new admissions); waiters re-queue on the
        new semaphore. No running session is cut.
        """
        old = self._cfg
        self._cfg = cfg
        self._device_allow = device_allow(cfg)
        self._agent_streams.limit = cfg.remote.max_streams  # new streams; open ones stay
        if (cfg.remote.relays.get(cfg.remote.server_id)
                != old.remote.relays.get(old.remote.server_id)
                or cfg.remote.relay_ca_file != old.remote.relay_ca_file):
            self._relay_context = None
        if cfg.remote.max_session != old.remote.max_session:
            self._resize(cfg.remote.max_session)

    def gc_loop(self, stop_event: gevent.event.Event) -> None:
        """The garbage collector service: runs until ``stop_event`` is set."""
        while not stop_event.wait(gc_interval(self._cfg)):
            try:
                self._trusted_now()  # a stat; an edit or chmod revokes without a request
            except Exception:  # noqa: BLE001 - the GC must go on whatever trust does
                log.exception("consulting the trusted keys failed")
            self.collect()

    def collect(self, now: Optional[float] = None) -> int:
        """One GC pass (``now``: ``time.monotonic()``); returns how many it closed."""
        if now is None:
            now = time.monotonic()
        r = self._cfg.remote
        closed = 0
        for s in list(self._sessions.values()):
            if s.close_request is not None or s.state == ENDED:
                continue
            code: Optional[str] = None
            reason = ""
            if s.state == RUNNING and s.tunnel is not None:
                code = s.tunnel.check_timeouts(r.idle_timeout, r.ack_timeout, now)
                if code == CloseCode.IDLE_TIMEOUT:
                    reason = "idle for %s s" % r.idle_timeout
                elif code == CloseCode.ACK_LOST:
                    reason = "no frame from the console for %s s" % r.ack_timeout
            elif s.state == DIALING and s.dial_started is not None \
                    and now - s.dial_started > DIAL_BOUND:
                code = CloseCode.RELAY_REFUSED
                reason = "not paired within %d s" % DIAL_BOUND
            if code is not None:
                log.info("session %s: gc: %s (%s)", s.id, code, reason)
                self._request_close(s, code, reason)
                closed += 1
        return closed

    def shutdown(self, grace: float) -> bool:
        """Refuse waiters (``shutting_down``), close every tunnel (``shutdown``) and wait
        up to ``grace`` s for the sessions to end and write their rows.

        New submissions are refused from now on. Returns True if all ended in time
        (the stragglers are then killed; their rows are still written).
        """
        self._shutting_down = True
        for s in list(self._sessions.values()):
            if s.state != ENDED:
                self._request_close(s, CloseCode.SHUTDOWN, "agent stopping")
        done = self._group.join(timeout=grace)
        if not done:
            log.warning("%d session(s) still ending after %.1f s: killing them",
                        len(self._group), grace)
            self._group.kill(timeout=SHUTDOWN_KILL_TIMEOUT)
        return bool(done)

    # ------------------------------------------------------------------ internals

    def _request_close(self, s: _Session, code: str, reason: str) -> None:
        if s.close_request is None:
            s.close_request = (code, reason)
        s.wake.set()
        t = s.tunnel
        if t is not None and not t.closed:
            # Tunnel.close may wait for its greenlets (bounded): not in the caller's.
            self._group.spawn(t.close, s.close_request[0], s.close_request[1])

    def _resize(self, size: int) -> None:
        new = gevent.lock.BoundedSemaphore(size)
        running = sorted((s for s in self._sessions.values() if s.admitted and s.state != ENDED),
                         key=lambda x: x.since)
        for s in running:
            s.sem = new if new.acquire(blocking=False) else None
        self._sem = new
        resized, self._resized = self._resized, gevent.event.Event()
        resized.set()
        log.info("max_session now %d (%d running)", size, len(running))

    def _release_slot(self, s: _Session) -> None:
        sem, s.sem = s.sem, None
        s.admitted = False
        if sem is None or sem is not self._sem:
            return  # no permit, or one of a semaphore replaced by _resize
        for other in sorted(self._sessions.values(), key=lambda x: x.since):
            if other is not s and other.admitted and other.sem is None \
                    and other.state != ENDED:
                other.sem = sem  # a surplus session (after shrinking) takes the permit
                return
        sem.release()

    def _session_main(self, s: _Session) -> None:
        code, reason = CloseCode.ERROR, "internal error"
        try:
            code, reason = self._serve(s)
        except _End as e:
            code, reason = e.code, e.reason
        except gevent.GreenletExit:
            code, reason = s.close_request or (CloseCode.SHUTDOWN, "killed")
            raise
        except Exception:  # noqa: BLE001 - a session's bug ends that session only
            log.exception("session %s: failed", s.id)
            code, reason = CloseCode.ERROR, "internal error"
        finally:
            self._finish(s, code, reason)

    def _serve(self, s: _Session) -> Tuple[str, str]:
        req = s.request
        cfg = self._cfg
        if self._shutting_down:
            self._refuse(s, CloseCode.SHUTDOWN, "agent stopping")
        try:
            relay_addr = configured_relay(cfg)
        except (KeyError, ValueError) as e:
            self._refuse(s, CloseCode.RELAY_REFUSED, "no relay configured: %s" % e)
        if not _same_relay(req.relay, relay_addr):
            log.warning("session %s: refused: relay %s is not %s:%d (configured for %s)",
                        s.id, envelope.short(req.relay), relay_addr[0], relay_addr[1],
                        cfg.remote.server_id)
            self._refuse(s, CloseCode.RELAY_REFUSED, "relay %s is not this device's relay"
                         % envelope.short(req.relay, 80))

        self._admit(s)
        s.state = ADMITTED
        self._check_close(s)

        # Keys: ephemeral, fresh per session; the secret never leaves this frame.
        pk, sk = tunnel_crypto.kx_keypair()
        cipher = tunnel_crypto.choose_cipher(req.cipher)
        try:
            tx, rx = tunnel_crypto.derive_keys("agent", pk, sk, req.epk, s.id)
        except Exception as e:  # noqa: BLE001 - nacl CryptoError / ValueError: bad epk
            self._refuse(s, CloseCode.CRYPTO_ERROR, "console key unusable (%s)"
                         % type(e).__name__, Reason.MALFORMED)
        del sk
        sealer, opener = tunnel_crypto.make_sealer_opener(tx, rx, cipher)
        # Signed by the identity in force *now*: a rotation applies to new sessions.
        accept = protocol.make_session_accept(self._get_identity(), s.id, pk, req.epk, cipher)
        if not self._send_reply(s, accept, "accept"):
            raise _End(CloseCode.ERROR, "could not send session.accept")
        log.info("session %s: accepted for %s (%s), targets %s", s.id, s.operator, cipher,
                 " ".join(s.targets))
        self._check_close(s)

        sock = self._dial(s, relay_addr)
        try:
            self._check_close(s)
        except _End:
            close_quietly(sock)
            raise
        tunnel = mux.Tunnel(
            sock, sealer, opener, "agent", on_open=lambda target: self._open_target(s, target),
            name="session %s" % s.id, keepalive_interval=float(cfg.remote.keepalive_interval),
            max_streams=cfg.remote.max_streams_per_session, agent_streams=self._agent_streams,
            buffer_budget=cfg.remote.max_buffered_per_session)
        s.tunnel = tunnel
        s.state = RUNNING
        if s.close_request is not None:  # raced with the assignment above
            tunnel.close(*s.close_request)
        return tunnel.run()

    def _check_close(self, s: _Session) -> None:
        if s.close_request is not None:
            raise _End(*s.close_request)

    def _refuse(self, s: _Session, code: str, reason: str,
                refusal: Optional[str] = None) -> None:
        """Answer ``session.refuse`` (when a refusal reason fits) and end with ``code``."""
        refusal = refusal or _REFUSE_FOR_CLOSE.get(code)
        if refusal is not None:
            try:
                raw = protocol.make_session_refuse(self._get_identity(), s.id, refusal, reason)
            except protocol.ProtocolError as e:
                log.error("session %s: cannot build refusal: %s", s.id, e)
            else:
                self._send_reply(s, raw, "refuse")
        log.info("session %s: refused: %s (%s)", s.id, code, reason)
        raise _End(code, reason)

    def _send_reply(self, s: _Session, raw: bytes, what: str) -> bool:
        try:
            with gevent.Timeout(REPLY_TIMEOUT):
                s.reply(raw)
            return True
        except gevent.Timeout:
            log.error("session %s: %s reply timed out", s.id, what)
        except Exception as e:  # noqa: BLE001 - the broker link's errors vary
            log.error("session %s: cannot send %s reply: %s", s.id, what, e)
        return False

    # -- admission --------------------------------------------------------------

    def _admit(self, s: _Session) -> None:
        """Take a slot, or wait for one (``session.queued``); raise _End if we don't get one."""
        if self._sem.acquire(blocking=False):
            s.sem, s.admitted = self._sem, True
            return
        position = len(self._waiting)
        self._waiting.append(s)
        try:
            log.info("session %s: queued at position %d (max_session %d)", s.id, position,
                     self._cfg.remote.max_session)
            self._send_reply(s, protocol.make_session_queued(self._get_identity(), s.id,
                                                             position), "queued")
            queue_timeout = float(self._cfg.remote.queue_timeout)
            deadline = time.monotonic() + queue_timeout
            while True:
                if s.close_request is not None:
                    self._refuse(s, *s.close_request)
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    self._refuse(s, CloseCode.QUEUE_TIMEOUT,
                                 "no free session slot within %g s" % queue_timeout)
                sem, resized = self._sem, self._resized
                acquirer = gevent.spawn(sem.acquire, True, remaining)
                gevent.wait([acquirer, s.wake, resized], count=1)
                if not acquirer.ready():
                    acquirer.kill()
                if _returned(acquirer) and acquirer.value is True:
                    if sem is self._sem and s.close_request is None:
                        s.sem, s.admitted = sem, True
                        log.info("session %s: admitted after %.1f s in the queue", s.id,
                                 queue_timeout - (deadline - time.monotonic()))
                        return
                    sem.release()
        finally:
            if s in self._waiting:
                self._waiting.remove(s)

    # -- relay --------------------------------------------------------------------

    def _relay_ssl_context(self) -> Any:
        if self._relay_context is None:
            r = self._cfg.remote
            self._relay_context = tls.client_context(r.relay_ca_file or self._cfg.amqp.ca_file)
        return self._relay_context

    def _dial(self, s: _Session, addr: Tuple[str, int]) -> Any:
        """TLS to the relay, hello, wait for the pairing; return the socket or raise _End."""
        try:
            ctx = self._relay_ssl_context()
        except tls.TLSConfigError as e:
            raise _End(CloseCode.RELAY_REFUSED, str(e)) from None
        host, port = addr
        s.state = DIALING
        s.dial_started = time.monotonic()
        ticket = s.request.ticket

        def dial() -> Any:
            # A closure, not spawn(dial_relay, ..., ticket): gevent prints a greenlet that
            # dies of an exception with its repr, call arguments (the ticket) included. An
            # expected failure is returned instead, so it prints nothing: _finish logs it
            # once, with the session id and the reason (issue 10, item 13).
            try:
                return rendezvous.dial_relay(host, port, ctx, host, "agent", s.id, ticket,
                                        RELAY_CONNECT_TIMEOUT, PAIRING_TIMEOUT)
            except (rendezvous.RelayError, ValueError) as e:
                return e

        dialer = gevent.spawn(dial)
        gevent.wait([dialer, s.wake], count=1)
        if not dialer.ready():
            dialer.kill()
        if _returned(dialer):
            sock, peer_ip = dialer.value
            if s.close_request is not None:
                close_quietly(sock)
                raise _End(*s.close_request)
            s.remote_ip = str(peer_ip)
            log.info("session %s: paired at relay %s with %s", s.id,
                     format_address(host, port), peer_ip)
            return sock
        if s.close_request is not None:
            raise _End(*s.close_request)
        exc = dialer.value if dialer.successful() else dialer.exception
        if isinstance(exc, rendezvous.RelayError):
            if exc.code == "protocol" and not exc.remote:
                raise _End(CloseCode.RELAY_LOST, str(exc))
            if exc.code == "timeout" and exc.remote:
                raise _End(CloseCode.RELAY_REFUSED, "console never came to the relay: %s"
                           % exc)
            raise _End(CloseCode.RELAY_REFUSED, str(exc))
        raise _End(CloseCode.ERROR, "relay dial failed: %r" % (exc,))

    # -- streams --------------------------------------------------------------------

    def _open_target(self, s: _Session, target: str) -> Any:
        """``on_open`` of the tunnel: permission at stream time, then the connection.

        Trust, the key's permitopen and the device allow-list are those in force now."""
        trusted = self._trusted_now()
        op = s.request.operator if trusted is None else trusted.get(s.operator)
        if op is None:
            self._request_close(s, CloseCode.REVOKED, REVOKED_TEXT)
            raise OperatorRevoked()
        if not s.request.permits(target) or not authkeys.permits(self._device_allow, target) \
                or (op.permitopen and not authkeys.permits(op.permitopen, target)):
            raise TargetNotPermitted(target)
        if target in authkeys.VIRTUAL_TARGETS:
            return self._open_virtual(s, target)
        host, port = authkeys.Target.parse(target).address
        sock = socket.create_connection((host, port), timeout=CONNECT_TIMEOUT)
        try:
            sock.settimeout(None)
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        except OSError:
            close_quietly(sock)
            raise
        return sock

    def _open_virtual(self, s: _Session, target: str) -> Any:
        from remote_gevent.agent.files import dispatch

        def on_result(result: Dict[str, Any]) -> None:
            s.transfers += 1
            log.info("session %s: %s %s %s: %s (%s bytes)", s.id, target, result.get("op"),
                     envelope.short(result.get("path")), result.get("code"),
                     result.get("bytes"))

        # Raises TransferError (code target_refused) when transfer is disabled.
        return dispatch.open_virtual_target(target, self._cfg, self._get_identity,
                                            on_result=on_result, log_ctx="session %s" % s.id)

    # -- the end --------------------------------------------------------------------

    def _finish(self, s: _Session, code: str, reason: str) -> None:
        """Exactly once per session: slot, history row, close publication."""
        t = s.tunnel
        if t is not None and not t.closed:
            t.close(code, reason)
        s.state = ENDED
        if s in self._waiting:
            self._waiting.remove(s)
        self._release_slot(s)
        duration = max(0.0, time.time() - s.since)
        log.info("session %s: ended: %s (%s) after %.1f s, in %d out %d bytes, %d streams",
                 s.id, code, reason, duration, t.bytes_in if t else 0, t.bytes_out if t else 0,
                 t.streams_opened if t else 0)
        record_safely(
            self._history, start=s.since, session_id=s.id, remote_ip=s.remote_ip,
            duration=duration, close_code=code, operator=s.operator, targets=s.targets,
            bytes_in=t.bytes_in if t else 0, bytes_out=t.bytes_out if t else 0,
            streams=t.streams_opened if t else 0, reason=reason)
        if self._sessions.get(s.id) is s:
            del self._sessions[s.id]
        try:
            self._publish_close(s.id, code, reason)
        except Exception as e:  # noqa: BLE001 - the broker link's errors vary
            log.error("session %s: cannot publish close %s: %s", s.id, code, e)


def _returned(g: gevent.Greenlet) -> bool:
    """The greenlet returned normally (a killed one is "successful" with GreenletExit)."""
    return g.successful() and not isinstance(g.value, BaseException)

