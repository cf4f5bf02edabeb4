"""The relay after pairing: each leg goes plain (TLS shut down), the pair is handed to
the splice thread (or copied in greenlets where splice is unavailable), idle pairs are
swept, and each session ends with one log line."""

from __future__ import annotations

import logging
import socket
import ssl
import time
from typing import TYPE_CHECKING, Dict, List, Optional

import gevent
import gevent.event
import gevent.pool
import gevent.socket
from gevent.hub import get_hub

from remote_gevent.relay import splicer
from remote_gevent.common.sockets import close_quietly
from remote_gevent.wire.rendezvous import (
    PROTOCOL_VERSION,
    set_nodelay,
)

if TYPE_CHECKING:  # the server owns connections and sessions; annotations only
    from remote_gevent.relay.server import Conn, PairedSession
    from remote_gevent.relay.settings import RelaySettings

# The relay logs as one component: "remote_gevent.relay.server" (filters and tests rely on it).
log = logging.getLogger("remote_gevent.relay.server")

SPARE_BUFFERS = 32


class _DeliveryFailed(Exception):
    """The copy loop could not write into its destination (that side reset or is gone)."""

    def __init__(self, error: OSError) -> None:
        super().__init__(str(error))
        self.error = error


class BufferPool:
    """Large forwarding buffers lent to whichever direction is moving data right now.

    Idle directions hold none, so memory follows the number of *active* transfers, not the
    number of sessions. At most ``spare`` buffers are kept when returned.
    """

    def __init__(self, size: int, spare: int = SPARE_BUFFERS) -> None:
        self.size = size
        self.spare = spare
        self._free: List[bytearray] = []
        self.allocated = 0

    def acquire(self) -> bytearray:
        if self._free:
            return self._free.pop()
        self.allocated += 1
        return bytearray(self.size)

    def release(self, buf: bytearray) -> None:
        if len(self._free) < self.spare:
            self._free.append(buf)
        else:
            self.allocated -= 1


def _tcp_abort(sock: socket.socket) -> None:
    """Shut down both ways at the TCP level; wakes every greenlet blocked on ``sock``."""
    for klass in type(sock).__mro__:
        if "SSLSocket" in klass.__name__:
            continue
        if "shutdown" in klass.__dict__:
            try:
                klass.shutdown(sock, socket.SHUT_RDWR)  # type: ignore[attr-defined]
            except OSError:
                pass
            return


def _describe(exc: BaseException) -> str:
    return "%s: %s" % (type(exc).__name__, exc) if str(exc) else type(exc).__name__


class Forwarding:
    """Methods of :class:`server.Relay` for a paired session (a mixin).

    The annotations declare the state :class:`server.Relay` sets in ``__init__`` that
    these methods use, for readers and the type checker; they create nothing at run time.
    """

    settings: RelaySettings
    splice: bool
    buffers: BufferPool
    pipes: splicer.PipePool
    _plane: Optional[splicer.SplicePlane]
    _sessions: Dict[str, PairedSession]
    _stopping: bool
    _drained: gevent.event.Event

    def _observe(self, event: str, session: PairedSession) -> None:
        raise NotImplementedError  # Relay._observe (metrics hook)

    def _run_leg(self, session: PairedSession, conn: Conn) -> None:
        """Forward ``conn``'s bytes to its peer; the last leg to finish ends the session."""
        src_role = conn.hello.role if conn.hello else "?"
        dst = session.console if conn is session.agent else session.agent
        try:
            if self._go_plain(session, conn, src_role):
                if self.splice:
                    self._forward_in_thread(session, conn)  # may set session.copy
                if session.copy or not self.splice:
                    self._pump(session, conn, dst, src_role)
        except _DeliveryFailed as exc:
            # Only this direction ends: the failed side may still have bytes queued for
            # the other one (a tunnel CLOSE sent just before its reset), which the other
            # leg moves on until it meets the error or EOF (splicer._write_failed).
            if isinstance(exc.error, socket.timeout):
                self._abort(session, "timeout (peer stopped reading)")
            elif not session.write_error:
                dst_role = "console" if src_role == "agent" else "agent"
                session.write_error = "%s side: %s" % (dst_role, _describe(exc.error))
        except socket.timeout:
            self._abort(session, "timeout (peer stopped reading)")
        except (ssl.SSLError, OSError) as exc:
            if not session.outcome:
                self._abort(session, "error (%s side: %s)" % (src_role, _describe(exc)))
        finally:
            session.running -= 1
            if session.running == 0:
                self._finish(session)
            else:
                # Keep our socket open for the other direction until it is done too.
                session.done.wait()

    def _go_plain(self, session: PairedSession, conn: Conn, role: str) -> bool:
        """Shut TLS down on ``conn`` (close_notify both ways), swap in the plain socket,
        then wait until the other leg is plain too. False: the session is over."""
        if conn.early:
            self._abort(session, "refused (%s sent bytes before OK, which %s forbids)"
                        % (role, PROTOCOL_VERSION))
            session.plain.set()
            return False
        sock = conn.sock
        timeout = self.settings.handshake_timeout
        try:
            sock.settimeout(timeout)
            with gevent.Timeout(timeout, socket.timeout("timed out")):
                sock.unwrap()
            plain = gevent.socket.socket(sock.family, sock.type, sock.proto,
                                         fileno=sock.detach())
            conn.sock = plain
            set_nodelay(plain)
        except (ssl.SSLError, OSError, ValueError) as exc:  # socket.timeout is an OSError
            log.warning("session %s: TLS shutdown (close_notify) with the %s from %s failed "
                        "within %.0fs: %s", session.session_id, role, conn.ip, timeout,
                        _describe(exc))
            self._abort(session, "error (%s side: TLS shutdown failed: %s)"
                        % (role, _describe(exc)))
            session.plain.set()
            return False
        session.unwrapped += 1
        if session.unwrapped == 2:
            session.plain.set()
        session.plain.wait()  # the other leg's unwrap is bounded the same way
        return not session.outcome

    def _sweep_idle(self) -> None:
        """End sessions that moved no byte for ``idle_timeout``.

        One timer for the whole relay rather than one armed and cancelled around every
        wait for readability. ``_abort`` shuts both sockets down, which wakes whatever
        forwards them. A session ends between ``idle_timeout`` and 1.25 x
        ``idle_timeout`` after its last byte.
        """
        idle = self.settings.idle_timeout
        period = min(idle / 4, 5.0)
        while True:
            gevent.sleep(period)
            now = time.monotonic()
            for session in list(self._sessions.values()):
                pair = session.pair
                last = pair.last_activity if pair is not None else session.last_activity
                if not session.outcome and now - last >= idle:
                    self._abort(session, "timeout (idle %.0fs)" % idle)

    def _forward_in_thread(self, session: PairedSession, conn: Conn) -> None:
        """Both legs come here; the agent's hands the pair to the splice thread, both wait
        until the thread is done with it. ``session.copy`` if splice refused the sockets."""
        if conn is session.agent:
            if self._plane is None or not self._plane.running:
                self._plane = splicer.SplicePlane(self.pipes)  # first pair, or it failed
            session.pair = splicer.Pair(
                session.agent.sock.fileno(), "agent", session.console.sock.fileno(),
                "console", on_done=lambda _pair: session.forwarded.set())
            self._plane.forward(session.pair)
        session.forwarded.wait()
        pair = session.pair
        assert pair is not None
        session.bytes["agent"] = pair.moved("agent")
        session.bytes["console"] = pair.moved("console")
        if pair.nosplice:
            log.info("session %s: os.splice refused (%s); copying instead",
                     session.session_id, pair.error)
            session.copy = True
        elif pair.error and not session.outcome:
            self._abort(session, "error (%s)" % pair.error)
        elif pair.write_error and not session.write_error:
            session.write_error = pair.write_error  # ends as an error, closed gently

    def _pump(self, session: PairedSession, src: Conn, dst: Conn, src_role: str) -> None:
        """One direction in greenlets (no splice): wait holding nothing, then copy what is
        there through a pooled buffer and give it back; EOF → ``SHUT_WR``."""
        s_sock = src.sock
        d_sock = dst.sock
        s_sock.settimeout(self.settings.idle_timeout)
        d_sock.settimeout(self.settings.idle_timeout)
        hub = get_hub()
        readable = hub.loop.io(s_sock.fileno(), 1)
        try:
            while True:
                hub.wait(readable)  # no timer per wait: _sweep_idle ends idle sessions
                if session.outcome:
                    return
                eof = self._move_copy(session, s_sock, d_sock, src_role)
                if session.outcome:
                    return
                if eof:
                    break
        finally:
            readable.close()
        try:
            d_sock.shutdown(socket.SHUT_WR)
        except OSError:
            pass  # the other side is gone; its own leg will notice

    def _move_copy(self, session: PairedSession, s_sock: socket.socket, d_sock: socket.socket,
                   src_role: str) -> bool:
        """The fallback: one ``recv_into`` a pooled buffer, ``sendall``; True at EOF."""
        buf = self.buffers.acquire()
        try:
            try:
                n = s_sock.recv_into(buf)
            except BlockingIOError:
                return False
            if not n:
                return True
            try:
                self._send_chunk(d_sock, memoryview(buf)[:n], src_role)
            except OSError as exc:
                raise _DeliveryFailed(exc) from exc
        finally:
            self.buffers.release(buf)
        session.bytes[src_role] += n
        session.last_activity = time.monotonic()
        return False

    def _send_chunk(self, d_sock: socket.socket, data: memoryview, src_role: str) -> None:
        """Copy path only (tests hook it to look at the bytes the relay forwards)."""
        d_sock.sendall(data)

    def _abort(self, session: PairedSession, outcome: str) -> None:
        if session.outcome:
            return
        session.outcome = outcome
        for conn in (session.agent, session.console):
            _tcp_abort(conn.sock)

    def _finish(self, session: PairedSession) -> None:
        if not session.outcome:
            session.outcome = ("error (%s)" % session.write_error if session.write_error
                               else "normal")
        if self._sessions.get(session.session_id) is session:  # not a resumed successor
            del self._sessions[session.session_id]
        close_quietly(session.agent.sock)
        close_quietly(session.console.sock)
        session.done.set()
        self._observe("ended", session)
        log.info("session %s ended: %s; agent %s, console %s; agent->console %d bytes, "
                 "console->agent %d bytes; %.1fs", session.session_id, session.outcome,
                 session.agent.ip, session.console.ip, session.bytes["agent"],
                 session.bytes["console"], time.monotonic() - session.started)
        if self._stopping and not self._sessions:
            self._drained.set()
