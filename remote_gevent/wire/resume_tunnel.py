"""The resuming half of a tunnel, mixed into :class:`mux.Tunnel` (issue 12; the wire and
its security are in :mod:`remote_gevent.wire.resume` and docs/protocol.md §7.5).

Resume is on when we were given :class:`resume.ResumeSettings` and the peer's HELLO says
``"resume": true``. Then every sealed frame goes into the resend buffer (under the write
lock, so in counter order); a failed relay connection does not end the tunnel: the reader
greenlet (:meth:`_read_until_end`) marks the link down (writers keep sealing into the
buffer, DATA writers wait once it is full), dials the relay again with backoff, proves key
possession, swaps the socket in and sends again what the peer did not get. Local sockets
and streams never notice, apart from the pause.
"""

import _socket
import logging
import os
import socket
import time
from typing import Any, Callable, List, Optional, Sequence

import gevent

from remote_gevent.common.sockets import abort_quietly, close_quietly
from remote_gevent.wire import resume
from remote_gevent.wire.codes import CloseCode
from remote_gevent.wire.mux_frames import (
    ACK,
    HDR,
    HEADER_LEN,
    TunnelClosed,
    TunnelFailure,
    U64,
    protocol_error,
)
from remote_gevent.wire.mux_io import os_err, send_all, set_sockopts
from remote_gevent.wire.mux_state import TunnelState

log = logging.getLogger("remote_gevent.wire.mux")

#: ``on_link(state, seconds)``: "resuming" (seconds 0) when the path is lost, "back"
#: (seconds: the outage) when it is up again.
OnLink = Callable[[str, float], None]


def shut_down_under_reader(sock: Any) -> None:
    """End ``sock``'s connection both ways (``SHUT_RDWR``) but keep its descriptor, so
    that the reader greenlet still reads what is already queued, then EOF.

    Closing (``abort_quietly``) would drop that: the reader's next read fails with EBADF.
    gevent's own ``socket.shutdown`` would too: it throws EBADF into the greenlet waiting
    to read. So the shutdown goes to the kernel through a duplicate of the descriptor (a
    shutdown acts on the connection, not on one descriptor); the kernel wakes the reader.
    A reset connection answers ENOTCONN, and is already shut down: fine. Anything but a
    plain socket is aborted as before."""
    try:
        fd = sock.fileno()
    except (OSError, AttributeError, ValueError):
        fd = -2
    if fd == -1:
        return  # closed already: nobody can read it
    try:
        dup = os.dup(fd)
    except (OSError, TypeError):
        abort_quietly(sock)
        return
    try:
        twin = _socket.socket(sock.family, sock.type, sock.proto, dup)
    except (OSError, AttributeError, ValueError):
        os.close(dup)
        abort_quietly(sock)
        return
    try:
        twin.shutdown(socket.SHUT_RDWR)
    except OSError:
        pass  # ENOTCONN: reset by the peer, the kernel shut it down already
    finally:
        twin.close()


class TunnelResume(TunnelState):
    """Resume state and methods of :class:`mux.Tunnel`."""

    resuming: bool
    resumes: int
    resume_time: float
    on_link: Optional[OnLink]
    _resume_cfg: Optional[resume.ResumeSettings]
    _resend: Optional[resume.ResendBuffer]
    _link_down: bool
    _peer_resume: bool
    _rx_unacked: int

    def _init_resume(self, settings: Optional[resume.ResumeSettings]) -> None:
        if settings is not None and settings.timeout <= 0:
            settings = None  # resume_timeout 0: resume off
        self._resume_cfg = settings
        self._resend = resume.ResendBuffer(settings.buffer) if settings is not None else None
        self._link_down = False       # writers buffer, do not send (resuming)
        self._peer_resume = False     # both HELLOs asked for resume
        self._rx_unacked = 0          # frames opened since our last ACK
        self.resuming = False
        self.resumes = 0
        self.resume_time = 0.0
        self.on_link = None

    @property
    def resume_enabled(self) -> bool:
        """Resume negotiated: the session survives the loss of its relay connection."""
        return self._peer_resume

    @property
    def resend_buffered(self) -> int:
        """Bytes of sealed frames held for a resend (memory cost of resume)."""
        return self._resend.bytes if self._resend is not None else 0

    def _negotiate_resume(self, hello: dict) -> None:
        """The peer's HELLO: resume on if both asked, else the buffer goes."""
        if self._resend is not None and hello.get("resume") is True:
            self._peer_resume = True
        elif self._resend is not None:
            self._resend.close()
            self._resend = None

    # -- acknowledgements -----------------------------------------------------------

    def _note_received(self) -> None:
        """Reader, after each frame: a standalone ACK every ACK_EVERY frames (most go
        out earlier with our own frames, :meth:`_piggyback_ack`)."""
        self._rx_unacked += 1
        if self._rx_unacked >= resume.ACK_EVERY and self._peer_resume:
            self._send_ack()

    def _send_ack(self) -> None:
        self._rx_unacked = 0
        self._send_async(ACK, 0, U64.pack(self._opener.counter))

    def _piggyback_ack(self, plaintexts: Sequence[Any]) -> Sequence[Any]:
        """Writer, under the write lock: ``plaintexts`` with an ACK in front once
        ACK_PIGGYBACK frames are unacknowledged, so it costs a seal and 33 bytes in a
        ``send`` we make anyway instead of its own ``send``, relay move and peer wake-up
        (the 1-byte round trip, docs/performance.md)."""
        if self._rx_unacked < resume.ACK_PIGGYBACK or not self._peer_resume:
            return plaintexts
        self._rx_unacked = 0
        return [HDR.pack(ACK, 0) + U64.pack(self._opener.counter), *plaintexts]

    def _on_ack(self, sid: int, pt: Any) -> None:
        if sid != 0 or len(pt) != HEADER_LEN + 8 or self._resend is None:
            raise protocol_error("bad ACK")
        try:
            self._resend.ack(U64.unpack_from(pt, HEADER_LEN)[0], stale_ok=True)
        except resume.ResumeError as exc:
            raise protocol_error("ACK: %s" % exc) from None

    def _keepalive_tick(self) -> bool:
        """Keepalive greenlet, each interval: False to skip the PING (link down). A path
        with no frame from the peer for ``dead_after`` is declared dead (the reader then
        resumes); pending acknowledgements go out."""
        if not self._peer_resume:
            return True
        if self._link_down:
            return False
        silent = time.monotonic() - self.last_ack
        if silent > resume.dead_after(self.keepalive_interval):
            log.info("%s: nothing from the %s for %.1f s: path dead, resuming", self.name,
                        self.peer_role, silent)
            abort_quietly(self._sock)  # the reader fails and resumes
            return False
        if self._rx_unacked:
            self._send_ack()
        return True

    # -- the link -------------------------------------------------------------------

    def _can_resume(self) -> bool:
        return self._peer_resume and not self.closed

    def _link_failed_on_send(self) -> bool:
        """A send failed (write lock held): True if the frame is safe in the buffer and
        the reader will resume; False: the tunnel ends as before.

        The socket is shut down, not closed: what the peer sent before the failure may
        still be in its receive queue, above all its CLOSE (a console interrupted during
        a download closes with our data unread: its kernel, then the relay's, answer our
        next segment with a reset). The reader reads that out, then EOF: a CLOSE ends
        the session as the peer said, no CLOSE resumes (issue 12, "lost CLOSE")."""
        if not self._can_resume():
            return False
        self._link_down = True
        shut_down_under_reader(self._sock)
        return True

    def _read_until_end(self) -> None:
        """The read loop, resumed after each relay connection failure while resume is on."""
        while True:
            try:
                self._read_loop()
                return
            except TunnelFailure as exc:
                if exc.code != CloseCode.RELAY_LOST or not self._can_resume():
                    raise
                why = exc.reason
            except OSError as exc:
                if not self._can_resume():
                    raise
                why = "tunnel socket: %s" % os_err(exc)
            self._resume_link(why)

    def _resume_link(self, why: str) -> None:
        """Get a new path to the peer within the resume timeout; TunnelFailure if not."""
        cfg = self._resume_cfg
        assert cfg is not None
        abort_quietly(self._sock)  # a writer blocked in send() fails now
        with self._wlock:
            self._link_down = True
        started = time.monotonic()
        self.resuming = True
        log.info("%s: relay connection lost (%s); resuming (up to %.0f s)", self.name,
                    why, cfg.timeout)
        self._announce("resuming", 0.0)
        backoff = resume.Backoff(started + cfg.timeout)
        try:
            while not self._try_rejoin(backoff):
                backoff.sleep()
        finally:
            self.resuming = False
            outage = time.monotonic() - started
            self.resume_time += outage
        self.resumes += 1
        now = time.monotonic()
        self.last_ack = now
        self.last_activity += outage  # an outage is not the user's inactivity
        log.info("%s: resumed after %.1f s (resume #%d)", self.name, outage, self.resumes)
        self._announce("back", outage)

    def _try_rejoin(self, backoff: resume.Backoff) -> bool:
        """One dial + handshake + resend; False: try again later."""
        cfg = self._resume_cfg
        assert cfg is not None
        if self.closed:
            raise TunnelClosed("closed while resuming")
        remaining = backoff.remaining()
        if remaining <= 0:
            raise TunnelFailure(CloseCode.LINK_LOST, "no path to the %s within %.0f s"
                                % (self.peer_role, cfg.timeout))
        sock = self._redial(remaining)
        if sock is None:
            return False
        try:
            peer_received = resume.handshake(sock, cfg.session_id, self.role, cfg.keys,
                                             self._opener.counter)
        except resume.ResumeLost as exc:
            log.info("%s: resume attempt failed: %s", self.name, exc)
            close_quietly(sock)
            return False
        except resume.ResumeRefused as exc:
            close_quietly(sock)
            raise TunnelFailure(CloseCode.CRYPTO_ERROR, "resume refused: %s" % exc) from None
        return self._swap_in(sock, peer_received)

    def _redial(self, remaining: float) -> Any:
        """A new socket paired at the relay, or None (the failure logged)."""
        cfg = self._resume_cfg
        assert cfg is not None

        def attempt() -> Any:
            # Returned, not raised: gevent prints greenlets that die of an exception.
            try:
                return cfg.redial(remaining)
            except (Exception, gevent.Timeout) as exc:  # noqa: BLE001 - any dial failure: try again
                return exc

        g = self._group.spawn(attempt)  # close() kills it
        g.join()
        value = g.value
        if isinstance(value, BaseException) or value is None:
            if value is not None and not isinstance(value, gevent.GreenletExit):
                log.info("%s: relay dial while resuming failed: %s", self.name,
                         resume.describe(value))
            return None
        return value

    def _swap_in(self, sock: Any, peer_received: int) -> bool:
        """Make ``sock`` the tunnel's socket and send the unacknowledged frames on it.

        The resend runs in its own greenlet holding the write lock (no new frame can
        overtake it) while the reader reads again at once: both ends resend at the same
        time, and two ends that each wait for their resend to finish before reading would
        deadlock on full socket buffers."""
        assert self._resend is not None
        self._wlock.acquire()
        try:
            frames = self._resend.unacked(peer_received)
        except resume.ResumeRefused as exc:
            self._wlock.release()
            close_quietly(sock)
            raise TunnelFailure(CloseCode.CRYPTO_ERROR, "resume refused: %s" % exc) from None
        set_sockopts(sock, buffers=False)
        old, self._sock = self._sock, sock
        self._rstart = self._rend = 0  # a partial frame of the old path is void
        self._link_down = False
        close_quietly(old)
        self._group.spawn(self._resend_frames, sock, frames, peer_received)
        return True

    def _resend_frames(self, sock: Any, frames: List[Any], peer_received: int) -> None:
        """Resend greenlet: owns the write lock until every frame is on ``sock``."""
        try:
            for frame in frames:
                send_all(sock.send, frame)
            log.info("%s: resent %d frame(s), %d bytes; the %s had %d", self.name,
                     len(frames), sum(len(f) for f in frames), self.peer_role, peer_received)
        except OSError as exc:
            log.info("%s: resend failed: %s", self.name, os_err(exc))
            self._link_down = True  # frames stay buffered; the reader resumes again
            shut_down_under_reader(sock)  # (the reader reads what the peer sent first)
        finally:
            self._wlock.release()

    def _announce(self, state: str, seconds: float) -> None:
        if self.on_link is not None:
            try:
                self.on_link(state, seconds)
            except Exception:  # noqa: BLE001 - a display hook must not end the tunnel
                log.debug("%s: on_link hook failed", self.name, exc_info=True)
