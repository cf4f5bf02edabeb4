"""One operator session: signed request → verified accept → relay → ``mux.Tunnel`` up.

Sequence (docs/protocol.md §8), with one round trip saved:

1. fresh curve25519 key pair and pairing ticket; the signed ``session.request`` is
   published (:meth:`ConsoleControl.start_request`);
2. **at once**, in parallel with waiting for the answer, we dial the relay (TLS, chain and
   host name verified) and present ``RG2 console <sid> <ticket>``: the relay holds us until
   the agent arrives, which it does right after its accept — so the pairing completes
   while the accept travels back through the broker. The relay hello is not a tunnel byte:
   nothing of the tunnel (HELLO frame included) is sent before the accept was verified
   against the pinned device key;
3. ``session.accept`` verified (signature by the pinned key, our session id, our epk) →
   keys derived (``tunnel_crypto.derive_keys("console", ...)``) → ``mux.Tunnel(role=
   "console")`` runs in a greenlet; we wait for the agent's authenticated HELLO.

If the device queues us longer than the relay's pairing timeout, the early dial times out;
we then dial again once the accept arrived. A relay that cannot be reached or verified
fails the session at once and a ``session.close`` tells the agent to free the slot.

``ConsoleSession`` is what ``forward``, ``socks``, ``stdio``, ``push`` and ``pull`` use
(``open_stream(target)``); it is also the object a ControlMaster-style control socket
(issue 6, ``control_socket_dir``) would share between console processes.
"""

from __future__ import annotations

import logging
import sys
import threading
from typing import Any, Callable, Dict, List, Optional, Sequence, Tuple

import gevent

from remote_gevent.console.config import (
    EXIT_CONFIG,
    EXIT_CONNECTION,
    EXIT_KEY,
    EXIT_OK,
    EXIT_REFUSED,
    EXIT_RELAY,
    ConsoleConfig,
    ConsoleError,
)
from remote_gevent.common.addresses import format_address
from remote_gevent.common.sockets import close_quietly
from remote_gevent.wire import rendezvous

log = logging.getLogger(__name__)

HANDSHAKE_SLACK = 2.0
#: Longest wait to publish session.close when the tunnel has no path (resuming).
CLOSE_VIA_BROKER_TIMEOUT = 10.0


class _Quiet:
    """A stderr that says nothing (closing through the broker is best effort)."""

    def write(self, text: str) -> int:
        return len(text)

    def flush(self) -> None:
        pass
#: Close codes after which the console exits 0.
CLEAN_CODES = ("normal", "closed_by_operator")


def close_exit_code(code: Optional[str]) -> int:
    """Exit code for a tunnel that ended with close ``code``."""
    if code is None or code in CLEAN_CODES:
        return EXIT_OK
    if code in ("refused", "target_refused", "revoked"):  # revoked: key left authorized_keys
        return EXIT_REFUSED
    return EXIT_CONNECTION


class ConsoleSession:
    """An open tunnel to a device (console side)."""

    def __init__(self, offer: Any, tunnel: Any, runner: gevent.Greenlet, peer_ip: str,
                 cfg: Optional[ConsoleConfig] = None) -> None:
        self.offer = offer
        self._cfg = cfg
        self.session_id: str = offer.session_id
        self.device: str = offer.device
        self.tunnel = tunnel
        self.peer_ip = peer_ip
        self._runner = runner

    def __repr__(self) -> str:
        return "<ConsoleSession %s %s%s>" % (self.session_id, self.device,
                                             " closed" if self.closed else "")

    @property
    def closed(self) -> bool:
        return self.tunnel.closed

    def open_stream(self, target: str, timeout: Optional[float] = 30.0) -> Any:
        """A new stream to ``target`` (``host:port``, ``@transfer``, ``@sftp``).

        Raises ``mux_frames.StreamRefused`` (``.code``/``.reason`` from the agent's OPEN_FAIL)
        or ``mux_frames.TunnelClosed``.
        """
        return self.tunnel.open_stream(target, timeout=timeout)

    def close(self, code: str = "closed_by_operator", reason: str = "") -> None:
        first = not self.tunnel.closed
        self.tunnel.close(code, reason or code)
        if first and self.tunnel.resume_enabled and not self.tunnel.close_sent:
            # No path (resuming) or no room: our CLOSE did not reach the agent, which
            # would wait for us until its resume_timeout.
            self._close_via_broker(reason or code)

    def _close_via_broker(self, reason: str) -> None:
        """Resume (issue 12): tell the agent through the broker, else it would wait for
        us until its resume_timeout (holding the slot). Best effort, bounded."""
        from remote_gevent.console.control import ConsoleControl

        if self._cfg is None:
            return
        control = None
        try:
            with gevent.Timeout(CLOSE_VIA_BROKER_TIMEOUT):
                control = ConsoleControl(self._cfg, err=_Quiet()).start()
                control.close_session(self.device, self.session_id, reason)
        except (ConsoleError, gevent.Timeout, OSError) as exc:
            log.info("session %s: close not sent through the broker: %s", self.session_id,
                     exc)
        finally:
            if control is not None:
                control.close()

    def wait(self, timeout: Optional[float] = None) -> Tuple[str, str]:
        """Block until the tunnel ends; ``(code, reason)``."""
        result = self._runner.get(timeout=timeout)
        return result

    @property
    def exit_code(self) -> int:
        return close_exit_code(self.tunnel.close_code)


#: Relay TLS client contexts of this console process, by ``relay_ca_file`` (None: the
#: system store). Building one loads and parses the CA file (~30-60 ms for the system
#: store), so it is done once per process, not per ``open_session``.
_RELAY_CONTEXTS: Dict[Optional[str], Any] = {}
_RELAY_CONTEXTS_LOCK = threading.Lock()


def relay_context(ca_file: Optional[str]) -> Any:
    """The cached relay ``SSLContext`` for ``ca_file`` (``tls.client_context``)."""
    from remote_gevent.common import tls

    ctx = _RELAY_CONTEXTS.get(ca_file)
    if ctx is None:
        with _RELAY_CONTEXTS_LOCK:
            ctx = _RELAY_CONTEXTS.get(ca_file)
            if ctx is None:
                ctx = _RELAY_CONTEXTS[ca_file] = tls.client_context(ca_file)
    return ctx


def _relay_error(exc: Any, relay: str = "") -> ConsoleError:
    from remote_gevent.console.relay_pool import RelayDown, is_down

    code = "relay_%s" % getattr(exc, "code", "error")
    if is_down(exc):  # refused, unreachable, TLS: another relay of a pool may do
        return RelayDown(str(exc), relay, code)
    return ConsoleError(str(exc), EXIT_RELAY, code)


def _retryable(exc: BaseException) -> bool:
    """An early dial that only timed out waiting for the (queued) agent (not one that
    could not even connect)."""
    return getattr(exc, "code", None) == "timeout" and getattr(exc, "reached", True)


class _RelayDial:
    """The console's leg of the relay, dialled as soon as the request is sent so that
    the dial overlaps the wait for the agent's offer. A dial that only timed out waiting
    for a queued agent is made once more; any other failure wakes the offer wait at once
    (fail now, not at the reply timeout)."""

    def __init__(self, cfg: ConsoleConfig, ctx: Any, pending: Any) -> None:
        self._host, self._port = _split(pending.relay)
        self._cfg, self._ctx, self._pending = cfg, ctx, pending
        self._sockets: List[Any] = []
        self._greenlet = gevent.spawn(self._early)
        self._greenlet.link(self._on_early_done)

    def _dial(self) -> Tuple[Any, str]:
        sock, peer_ip = rendezvous.dial_relay(
            self._host, self._port, self._ctx, self._host, "console",
            self._pending.session_id, self._pending.ticket, timeout=self._cfg.relay_timeout)
        self._sockets.append(sock)
        return sock, peer_ip

    def _early(self) -> Any:
        # An expected failure is returned, not raised: gevent prints a greenlet that
        # dies of an exception as a traceback on the terminal (issue 10, item 13).
        try:
            return self._dial()
        except rendezvous.RelayError as exc:
            return exc

    def _early_failure(self) -> Optional[BaseException]:
        g = self._greenlet
        return g.value if isinstance(g.value, rendezvous.RelayError) else g.exception

    def _on_early_done(self, _g: gevent.Greenlet) -> None:
        exc = self._early_failure()
        if exc is not None and not _retryable(exc):
            self._pending.replies.put(exc)

    def connected(self, session_id: str) -> Tuple[Any, str]:
        """The relay socket and the agent's address; ConsoleError if the relay refused."""
        self._greenlet.join()
        failure = self._early_failure()
        if failure is None:
            return self._greenlet.value
        if not _retryable(failure):
            raise _relay_error(failure, self._pending.relay)
        log.info("session %s: early relay dial timed out (queued); dialing again", session_id)
        try:
            return self._dial()
        except rendezvous.RelayError as exc:
            raise _relay_error(exc, self._pending.relay) from None

    def discard(self) -> None:
        """Stop a dial still under way and close what it connected (not handed over)."""
        if not self._greenlet.ready():
            self._greenlet.kill(block=True, timeout=2.0)
        for sock in self._sockets:
            close_quietly(sock)
        self._sockets = []

    def handed_over(self) -> None:
        """The tunnel owns the socket now."""
        self._sockets = []


def open_session(cfg: ConsoleConfig, device: str, targets: Sequence[str],
                 control: Any = None, err: Any = None) -> ConsoleSession:
    """Request a session on ``device`` for ``targets`` and bring its tunnel up.

    ``control``: a started :class:`ConsoleControl` to reuse (else one is made and
    closed once the tunnel is up: the tunnel does not need the broker). Raises
    :class:`ConsoleError` with the exit code for every expected failure.

    With a pool of relays (issue 13, console/relay_pool.py) the relay is picked among
    those not seen down; one that cannot be reached is remembered as down and the
    session is requested once more, under a new session id, on another relay.
    """
    from remote_gevent.common import tls
    from remote_gevent.console.control import ConsoleControl
    from remote_gevent.console.relay_pool import RelayDown, RelayPool

    err = err if err is not None else sys.stderr
    own = control is None
    if own:
        control = ConsoleControl(cfg, err=err).start()
    try:
        try:
            ctx = relay_context(cfg.relay_ca_file)
        except tls.TLSConfigError as exc:
            raise ConsoleError("relay_ca_file: %s" % exc, EXIT_CONFIG, "config") from None
        pool = RelayPool(cfg)
        relay = pool.pick()
        assert relay is not None
        try:
            return _open_via(cfg, device, targets, control, err, ctx, relay, pool.signed)
        except RelayDown as exc:
            if not pool.signed:
                raise  # a single relay: as before issue 13
            pool.mark_down(relay, exc.message)
            other = pool.pick(exclude=(relay,))
            if other is None:
                raise
            err.write("remote-gevent-console: relay %s is down (%s); trying relay %s\n"
                      % (relay, exc.message, other))
            err.flush()
            try:
                return _open_via(cfg, device, targets, control, err, ctx, other, pool.signed)
            except RelayDown as again:  # once only; remembered for the next command
                pool.mark_down(other, again.message)
                raise
    finally:
        if own:
            control.close()


def _open_via(cfg: ConsoleConfig, device: str, targets: Sequence[str], control: Any,
              err: Any, ctx: Any, relay: str, relay_pool: Sequence[str]) -> ConsoleSession:
    """One attempt of :func:`open_session` on ``relay``. A request that fails at the relay
    is abandoned (``session.close``): the agent frees its slot instead of waiting at the
    relay for a console that will not come."""
    dial: Optional[_RelayDial] = None
    try:
        pending = control.start_request(device, targets, relay, relay_pool)
        dial = _RelayDial(cfg, ctx, pending)
        try:
            offer = control.wait_offer(pending)
        except rendezvous.RelayError as exc:
            _abandon(control, device, pending.session_id, "console could not reach the relay")
            raise _relay_error(exc, relay) from None
        try:
            sock, peer_ip = dial.connected(offer.session_id)
        except ConsoleError:
            _abandon(control, device, pending.session_id, "console could not reach the relay")
            raise
        dial.handed_over()
        session = _start_tunnel(cfg, device, offer, sock, peer_ip,
                                _redialer(cfg, ctx, pending), err)
        log.info("session %s: tunnel to %s up via %s (%s, agent at %s)", offer.session_id,
                 device, pending.relay, offer.cipher, peer_ip)
        return session
    finally:
        if dial is not None:
            dial.discard()


def _redialer(cfg: ConsoleConfig, ctx: Any, pending: Any) -> Callable[[float], Any]:
    """Resume (issue 12): the relay again under the same session id and ticket; with a
    signed ``relay_pool`` (issue 13), a round of the pool walk (wire/relay_pool.py)."""
    from remote_gevent.wire import relay_pool as wire_pool

    def dial(host: str, port: int, pair_timeout: float) -> Any:
        sock, _peer_ip = rendezvous.dial_relay(
            host, port, ctx, host, "console", pending.session_id, pending.ticket,
            timeout=cfg.relay_timeout, pair_timeout=pair_timeout)
        log.info("session %s: paired again at relay %s", pending.session_id,
                 format_address(host, port))
        return sock

    host, port = _split(pending.relay)
    if pending.relay_pool:
        order = wire_pool.walk_order((host, port), wire_pool.parse_pool(pending.relay_pool))
        return wire_pool.pool_redialer(order, dial, "session %s" % pending.session_id)
    return lambda timeout: dial(host, port, max(
        1.0, min(rendezvous.DEFAULT_PAIRING_TIMEOUT + cfg.relay_timeout, timeout)))


def _announcer(device: str, err: Any) -> Callable[[str, float], None]:
    """One stderr line when the path is lost, one when it is back (``on_link``)."""
    def on_link(state: str, seconds: float) -> None:
        if state == "resuming":
            err.write("remote-gevent-console: connection to %s lost; resuming...\n" % device)
        else:
            err.write("remote-gevent-console: connection to %s back after %.1f s\n"
                      % (device, seconds))
        err.flush()
    return on_link


def _start_tunnel(cfg: ConsoleConfig, device: str, offer: Any, sock: Any,
                  peer_ip: str, redial: Optional[Callable[[float], Any]] = None,
                  err: Any = None) -> ConsoleSession:
    """Run the tunnel on ``sock`` (which it owns from here on) until the agent's HELLO."""
    from remote_gevent.wire import mux
    from remote_gevent.wire import mux_frames
    from remote_gevent.wire import resume
    from remote_gevent.crypto import tunnel_crypto

    tx, rx = tunnel_crypto.derive_keys("console", offer.console_pk, offer.console_sk,
                                       offer.agent_epk, offer.session_id)
    sealer, opener = tunnel_crypto.make_sealer_opener(tx, rx, offer.cipher)
    settings = None
    if redial is not None and cfg.resume_timeout > 0 and cfg.keepalive_interval > 0:
        settings = resume.ResumeSettings(
            offer.session_id, resume.ResumeKeys.from_session_keys(tx, rx), redial,
            cfg.resume_timeout)
    tunnel = mux.Tunnel(sock, sealer, opener, role="console", name=offer.session_id,
                        keepalive_interval=cfg.keepalive_interval, resume=settings)
    if err is not None:
        tunnel.on_link = _announcer(device, err)
    runner = gevent.spawn(tunnel.run)
    if not tunnel.wait_up(mux_frames.DEFAULT_HANDSHAKE_TIMEOUT + HANDSHAKE_SLACK):
        tunnel.close("error", "no HELLO from the agent")
        code, reason = runner.get()
        exit_code = EXIT_KEY if code == "crypto_error" else EXIT_CONNECTION
        raise ConsoleError("session %s: tunnel to %s did not come up: %s (%s)"
                           % (offer.session_id, device, code, reason), exit_code, code)
    return ConsoleSession(offer, tunnel, runner, peer_ip, cfg)


def _abandon(control: Any, device: str, session_id: str, reason: str) -> None:
    """Tell the agent to drop a session we will not complete (frees its slot early)."""
    try:
        control.close_session(device, session_id, reason)
    except ConsoleError as exc:
        log.debug("session %s: close not sent: %s", session_id, exc)


def _split(address: str) -> Tuple[str, int]:
    from remote_gevent.common.configschema import Invalid, split_host_port

    try:
        host, port = split_host_port(address)
    except Invalid as exc:
        raise ConsoleError("relay %s: %s" % (address, exc), EXIT_CONFIG, "config") from None
    assert port is not None
    return host, port
