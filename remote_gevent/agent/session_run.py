"""One admitted session from start to end: confirm the relay, dial it, run the tunnel,
open each stream's target (trust and permitopen re-checked every time), and finish with
one close code, one session.close and one history row."""

import logging
import socket
import time
from typing import TYPE_CHECKING, Any, Callable, Dict, List, Optional, Tuple

import gevent
import gevent.event
import gevent.lock
import gevent.pool

from remote_gevent.crypto import authkeys
from remote_gevent.wire import mux
from remote_gevent.wire import protocol
from remote_gevent.wire import envelope
from remote_gevent.common.addresses import format_address
from remote_gevent.common import tls
from remote_gevent.crypto import tunnel_crypto
from remote_gevent.agent.relay_accept import (
    RelayNotAdmitted,
    admit_relay,
    admitted_relays,
    resume_order,
)
from remote_gevent.agent.history import cert_fields, record_safely
from remote_gevent.wire.codes import RELAY_MISMATCH_TEXT, Reason
from remote_gevent.wire.envelope import CloseCode
from remote_gevent.common.sockets import close_quietly, connect_tcp
from remote_gevent.wire import relay_pool
from remote_gevent.wire import rendezvous
from remote_gevent.wire import resume

if TYPE_CHECKING:
    from remote_gevent.agent.config import AgentConfig
    from remote_gevent.agent.history import History
    from remote_gevent.wire.mux_limits import StreamCounter

# The agent's tunnel lines keep one logger name: "remote_gevent.agent.tunnels".
log = logging.getLogger("remote_gevent.agent.tunnels")


CONNECT_TIMEOUT = 10.0  # seconds to connect a TCP target for one stream


RELAY_CONNECT_TIMEOUT = 10.0  # seconds for TCP connect + TLS handshake + hello to the relay


PAIRING_TIMEOUT = 60.0


PAIRING_GRACE = 5.0


DIAL_BOUND = RELAY_CONNECT_TIMEOUT + PAIRING_TIMEOUT + PAIRING_GRACE


REPLY_TIMEOUT = 10.0  # seconds a reply() publish may take before the session gives up


WAITING = "waiting"  # for a slot


ADMITTED = "admitted"  # slot taken, accept being sent / keys derived


DIALING = "dialing"  # TLS to the relay and pairing


RUNNING = "running"  # tunnel handshake and streams


ENDED = "ended"


_REFUSE_FOR_CLOSE = {
    CloseCode.QUEUE_TIMEOUT: Reason.QUEUE_TIMEOUT,
    CloseCode.SHUTDOWN: Reason.SHUTTING_DOWN,
    # A request naming another relay is malformed for this device; a session the
    # operator closed while it waited needs no refusal (the operator knows).
    CloseCode.RELAY_REFUSED: Reason.MALFORMED,
    CloseCode.REVOKED: Reason.UNKNOWN_OPERATOR,
}


REVOKED_TEXT = "operator key no longer trusted"


class TargetNotPermitted(Exception):
    """Raised by ``on_open``: the mux turns ``.code`` / ``.reason`` into OPEN_FAIL."""

    code = Reason.TARGET_NOT_PERMITTED

    def __init__(self, target: str, rule: str = "") -> None:
        self.reason = "%s not permitted%s" % (envelope.short(target),
                                              " by " + rule if rule else "")
        super().__init__(self.reason)


class OperatorRevoked(Exception):
    """Raised by ``on_open`` when the session's operator is no longer trusted."""

    code = CloseCode.REVOKED
    reason = REVOKED_TEXT


Reply = Callable[[bytes], Any]


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
    if cfg.remote.transfer.roots:
        allow += tuple(sorted(authkeys.VIRTUAL_TARGETS))
    return allow


def configured_relay(cfg: Any) -> Tuple[str, int]:
    """``(host, port)`` of the (first) relay configured for our server id."""
    return admitted_relays(cfg)[0]


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


def _returned(g: gevent.Greenlet) -> bool:
    """The greenlet returned normally (a killed one is "successful" with GreenletExit)."""
    return g.successful() and not isinstance(g.value, BaseException)


class ManagerState:
    """The state :class:`tunnels.TunnelManager` sets in ``__init__`` and the methods of
    it that :class:`SessionRun` calls, written down for readers and the type checker
    (declarations only: the annotations create nothing at run time and the methods exist
    only for the checker, so a call always reaches the manager's own method)."""

    _cfg: "AgentConfig"
    _get_identity: Callable[[], Any]
    _history: "Optional[History]"
    _publish_close: Callable[..., None]
    _relay_context: Any
    _sessions: "Dict[str, _Session]"
    _waiting: "List[_Session]"
    _device_allow: Tuple[str, ...]
    _shutting_down: bool
    _agent_streams: "StreamCounter"

    if TYPE_CHECKING:
        def _admit(self, s: "_Session") -> None: ...
        def _trusted_now(self) -> Any: ...
        def _request_close(self, s: "_Session", code: str, reason: str) -> None: ...
        def _release_slot(self, s: "_Session") -> None: ...
        def _on_link(self, s: "_Session", state: str) -> None: ...
        def _note_ended(self, s: "_Session") -> None: ...


class SessionRun(ManagerState):
    """Methods of :class:`tunnels.TunnelManager` that run one session (a mixin)."""

    def _session_main(self, s: "_Session") -> None:
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

    def _serve(self, s: "_Session") -> Tuple[str, str]:
        req = s.request
        cfg = self._cfg
        if self._shutting_down:
            self._refuse(s, CloseCode.SHUTDOWN, "agent stopping")
        try:  # the relay the request names, if remote.relays lists it (a pool: issue 13)
            relay_addr = admit_relay(cfg, req.relay)
        except RelayNotAdmitted as e:
            log.warning("session %s: refused: %s", s.id, e)
            self._refuse(s, CloseCode.RELAY_REFUSED, "relay %s %s"
                         % (envelope.short(req.relay, 80), RELAY_MISMATCH_TEXT))
        except (KeyError, ValueError) as e:
            self._refuse(s, CloseCode.RELAY_REFUSED, "no relay configured: %s" % e)

        self._admit(s)
        s.state = ADMITTED
        self._check_close(s)

        # The relay dial (TCP, TLS, hello, pairing: the longest step) starts now and runs
        # while we make the keys and sign and publish the accept (issue 17): the relay
        # holds us until the console, which dialled when it sent the request, is there.
        dialer = self._start_dial(s, relay_addr)
        try:
            sealer, opener, resume_keys = self._accept(s)
        except BaseException:
            self._drop_dial(dialer)
            raise
        sock = self._wait_dial(s, dialer, relay_addr)
        try:
            self._check_close(s)
        except _End:
            close_quietly(sock)
            raise
        tunnel = mux.Tunnel(
            sock, sealer, opener, "agent", on_open=lambda target: self._open_target(s, target),
            name="session %s" % s.id, keepalive_interval=float(cfg.remote.keepalive_interval),
            max_streams=cfg.remote.max_streams_per_session, agent_streams=self._agent_streams,
            buffer_budget=cfg.remote.max_buffered_per_session,
            resume=resume.ResumeSettings(
                s.id, resume_keys, self._redialer(s, relay_addr),
                float(cfg.remote.resume_timeout), cfg.remote.resend_buffer))
        s.tunnel = tunnel
        tunnel.on_link = lambda state, _seconds: self._on_link(s, state)  # alive at once
        s.state = RUNNING
        if s.close_request is not None:  # raced with the assignment above
            tunnel.close(*s.close_request)
        return tunnel.run()

    def _accept(self, s: "_Session") -> Tuple[Any, Any, Any]:
        """Ephemeral keys, then the signed ``session.accept`` to the console; returns the
        sealer, the opener and the resume keys (raises _End)."""
        req = s.request
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
        resume_keys = resume.ResumeKeys.from_session_keys(tx, rx)
        del tx, rx
        # Signed by the identity in force *now*: a rotation applies to new sessions.
        accept = protocol.make_session_accept(self._get_identity(), s.id, pk, req.epk, cipher)
        if not self._send_reply(s, accept, "accept"):
            raise _End(CloseCode.ERROR, "could not send session.accept")
        log.info("session %s: accepted for %s (%s), targets %s", s.id, s.operator, cipher,
                 " ".join(s.targets))
        self._check_close(s)
        return sealer, opener, resume_keys

    def _check_close(self, s: "_Session") -> None:
        if s.close_request is not None:
            raise _End(*s.close_request)

    def _refuse(self, s: "_Session", code: str, reason: str,
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

    def _send_reply(self, s: "_Session", raw: bytes, what: str) -> bool:
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

    def _relay_ssl_context(self) -> Any:
        if self._relay_context is None:
            r = self._cfg.remote
            self._relay_context = tls.client_context(r.relay_ca_file or self._cfg.amqp.ca_file)
        return self._relay_context

    def _start_dial(self, s: "_Session", addr: Tuple[str, int]) -> gevent.Greenlet:
        """Start TLS to the relay, hello and the wait for the pairing, in a greenlet whose
        value is ``(socket, peer_ip)`` or the expected error (see :meth:`_wait_dial`)."""
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
                ctx = self._relay_ssl_context()
                return rendezvous.dial_relay(host, port, ctx, host, "agent", s.id, ticket,
                                             RELAY_CONNECT_TIMEOUT, PAIRING_TIMEOUT)
            except (rendezvous.RelayError, ValueError, tls.TLSConfigError) as e:
                return e

        dialer = gevent.spawn(dial)
        gevent.sleep(0)  # let it connect: the relay accepts while we sign the accept
        return dialer

    @staticmethod
    def _drop_dial(dialer: gevent.Greenlet) -> None:
        """The session ends before its tunnel: stop the dial, close what it connected."""
        if not dialer.ready():
            dialer.kill()  # dial_relay closes its sockets on the way out
        if _returned(dialer):
            close_quietly(dialer.value[0])

    def _wait_dial(self, s: "_Session", dialer: gevent.Greenlet, addr: Tuple[str, int]) -> Any:
        """The paired relay socket of :meth:`_start_dial`, or raise _End."""
        gevent.wait([dialer, s.wake], count=1)
        if not dialer.ready():
            dialer.kill()
        if _returned(dialer):
            sock, peer_ip = dialer.value
            if s.close_request is not None:
                close_quietly(sock)
                raise _End(*s.close_request)
            s.remote_ip = str(peer_ip)
            log.info("session %s: paired at relay %s with %s", s.id, format_address(*addr),
                     peer_ip)
            return sock
        if s.close_request is not None:
            raise _End(*s.close_request)
        exc = dialer.value if dialer.successful() else dialer.exception
        if isinstance(exc, tls.TLSConfigError):
            raise _End(CloseCode.RELAY_REFUSED, str(exc))
        if isinstance(exc, rendezvous.RelayError):
            if exc.code == "protocol" and not exc.remote:
                raise _End(CloseCode.RELAY_LOST, str(exc))
            if exc.code == "timeout" and exc.remote:
                raise _End(CloseCode.RELAY_REFUSED, "console never came to the relay: %s"
                           % exc)
            raise _End(CloseCode.RELAY_REFUSED, str(exc))
        raise _End(CloseCode.ERROR, "relay dial failed: %r" % (exc,))

    def _redialer(self, s: "_Session", addr: Tuple[str, int]) -> Callable[[float], Any]:
        """Resume (issue 12): ``redial(remaining)``. Without a signed ``relay_pool``, the
        session's relay again; with one (issue 13), a round of the pool walk
        (:mod:`wire.relay_pool`) over the relays this device admits."""
        name = "session %s" % s.id
        order = resume_order(self._cfg, addr, s.request.relay_pool, name)
        if len(order) < 2:
            return lambda timeout: self._redial(s, addr[0], addr[1],
                                                max(1.0, min(PAIRING_TIMEOUT, timeout)))
        return relay_pool.pool_redialer(
            order, lambda host, port, wait: self._redial(s, host, port, wait), name)

    def _redial(self, s: "_Session", host: str, port: int, pair_timeout: float) -> Any:
        """The relay ``host:port`` again, same session id and ticket; the socket.
        Raises RelayError (the tunnel logs it and tries again with backoff)."""
        sock, peer_ip = rendezvous.dial_relay(
            host, port, self._relay_ssl_context(), host, "agent", s.id, s.request.ticket,
            RELAY_CONNECT_TIMEOUT, pair_timeout)
        log.info("session %s: paired again at relay %s", s.id, format_address(host, port))
        if peer_ip != s.remote_ip:
            log.info("session %s: the console is now at %s (was %s)", s.id, peer_ip,
                     s.remote_ip)
        return sock

    # -- streams --------------------------------------------------------------------

    def _open_target(self, s: "_Session", target: str) -> Any:
        """``on_open`` of the tunnel: permission at stream time, then the connection.

        Trust, the key's permitopen and the device allow-list are those in force now."""
        trusted = self._trusted_now()
        op = s.request.operator if trusted is None else trusted.current(s.request.operator)
        if op is None:
            self._request_close(s, CloseCode.REVOKED, REVOKED_TEXT)
            raise OperatorRevoked()
        # Name the rule that refused (issue 15), so the operator knows what to change.
        if not s.request.permits(target):
            raise TargetNotPermitted(target, "this session's targets (request it when "
                                             "opening the session)")
        if not authkeys.permits(self._device_allow, target):
            raise TargetNotPermitted(target, "the device's remote.allow")
        if op.permitopen and not authkeys.permits(op.permitopen, target):
            raise TargetNotPermitted(target, "this operator's permitopen")
        if target in authkeys.VIRTUAL_TARGETS:
            return self._open_virtual(s, target)
        host, port = authkeys.Target.parse(target).address
        sock = connect_tcp(host, port, CONNECT_TIMEOUT)
        try:
            sock.settimeout(None)
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        except OSError:
            close_quietly(sock)
            raise
        return sock

    def _open_virtual(self, s: "_Session", target: str) -> Any:
        from remote_gevent.agent.files import dispatch

        def on_result(result: Dict[str, Any]) -> None:
            s.transfers += 1
            log.info("session %s: %s %s %s: %s (%s bytes)", s.id, target, result.get("op"),
                     envelope.short(result.get("path")), result.get("code"),
                     result.get("bytes"))

        # Raises TransferError (code target_refused) when transfer is disabled.
        return dispatch.open_virtual_target(
            target, self._cfg.remote.transfer, self._get_identity, on_result=on_result,
            log_ctx="session %s" % s.id, preempt=lambda: self._end_stale_sessions(s))

    def _end_stale_sessions(self, s: "_Session") -> int:
        """End the other sessions of ``s``'s operator whose relay path is down (resuming):
        they hold what the operator now asks for again (an upload's partial file), and a
        console that comes back for them would find the files it left in a new session."""
        stale = [o for o in self._sessions.values() if o is not s and o.operator == s.operator
                 and o.tunnel is not None and o.tunnel.resuming]
        for o in stale:
            log.info("session %s: ended: superseded by session %s of the same operator "
                     "while its path was down", o.id, s.id)
            self._request_close(o, CloseCode.LINK_LOST, "superseded by session %s" % s.id)
        return len(stale)

    # -- the end --------------------------------------------------------------------

    def _finish(self, s: "_Session", code: str, reason: str) -> None:
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
            streams=t.streams_opened if t else 0, reason=reason,
            resumes=t.resumes if t else 0, resume_s=t.resume_time if t else 0.0,
            **cert_fields(s.request.operator))
        if self._sessions.get(s.id) is s:
            del self._sessions[s.id]
        try:
            self._publish_close(s.id, code, reason)
        except Exception as e:  # noqa: BLE001 - the broker link's errors vary
            log.error("session %s: cannot publish close %s: %s", s.id, code, e)
        self._note_ended(s)  # after the close: a console reads it before the next alive
