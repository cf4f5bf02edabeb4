"""The receiving half of a tunnel, mixed into :class:`mux.Tunnel`: the key-confirming
HELLO, reading and opening frames, and dispatching each frame to its stream (with the
receive budget and the known-code checks of docs/protocol.md, section 7)."""

import logging
import socket
import time
from typing import Any, Optional

import gevent
import gevent.event
import gevent.lock
import gevent.pool

from remote_gevent.common.logs import escape
from remote_gevent.wire.mux_limits import CHUNK_OVERHEAD
from remote_gevent.wire.codes import CloseCode
from remote_gevent.wire.mux_frames import (
    ACK,
    CLOSE,
    CLOSE_CODES,
    DATA,
    EOF,
    FRAME_NAMES,
    HDR,
    HEADER_LEN,
    HELLO,
    LEGACY_WINDOW,
    MAX_DATA,
    MAX_FRAME_LEN,
    MAX_WINDOW,
    OPEN,
    OPEN_FAIL,
    OPEN_FAIL_CODES,
    OPEN_OK,
    PING,
    PONG,
    PROTOCOL_VERSION,
    RECV_BUFFER,
    RESET,
    RESET_BUDGET,
    TunnelClosed,
    TunnelFailure,
    U32,
    WINDOW,
    json_payload,
    json_str,
    protocol_error,
)
from remote_gevent.wire.mux_io import (
    write_now,
)
from remote_gevent.wire.mux_stream import (
    Stream,
)

from remote_gevent.wire.mux_state import TunnelState

# One logger for the whole tunnel (its modules are one concern): "remote_gevent.wire.mux".
log = logging.getLogger("remote_gevent.wire.mux")


class FrameReceiving(TunnelState):
    """Methods of :class:`mux.Tunnel` that read from the tunnel socket (its reader
    greenlet); they use the tunnel's state and its sending half."""

    def _fill(self, need: int) -> None:
        """Make ``need`` bytes available at ``_rstart`` in the receive buffer.

        One ``recv_into`` takes whatever the kernel has (up to RECV_BUFFER), so
        several frames are usually parsed per system call.
        """
        view = self._rview
        if self._rstart == self._rend:
            self._rstart = self._rend = 0
        elif self._rstart + need > RECV_BUFFER:
            # compact: move the partial frame to the front (at most one frame)
            left = self._rend - self._rstart
            view[:left] = view[self._rstart:self._rend]
            self._rstart, self._rend = 0, left
        sock = self._sock
        # A short read means the kernel had no more: the next recv would fail with
        # EAGAIN before gevent waits, so wait for readability first (one system call
        # less per wake-up; a plain gevent socket only — TLS may hold buffered bytes).
        # Then read straight from the C socket under it (gevent's Python ``recv_into``
        # wrapper costs ~1.5 us a call): EAGAIN there means wait, then read again.
        wait = getattr(sock, "_wait", None) if type(sock) is socket.socket else None
        raw = getattr(sock, "_sock", None) if wait is not None else None
        recv_into = raw.recv_into if raw is not None else sock.recv_into
        while self._rend - self._rstart < need:
            if self._rdrained and wait is not None:
                wait(sock._read_event)
            space = RECV_BUFFER - self._rend
            try:
                k = recv_into(view[self._rend:], space)
            except BlockingIOError:  # the C socket, nothing there yet
                self._rdrained = True
                continue
            if not k:
                if self._close_code is None:
                    raise TunnelFailure(CloseCode.RELAY_LOST,
                                         "tunnel socket closed without CLOSE")
                raise TunnelClosed("closed")
            self._rdrained = k < space
            self._rend += k

    def _read_frame(self) -> Any:
        """Next authenticated plaintext frame (a fresh object from the opener)."""
        if self._rend - self._rstart < 4:
            self._fill(4)
        start = self._rstart
        n = U32.unpack_from(self._rbuf, start)[0]
        if n > MAX_FRAME_LEN or n < HEADER_LEN:
            raise protocol_error("frame length %d out of bounds" % n)
        if self._rend - start < 4 + n:
            self._fill(4 + n)
            start = self._rstart
        view = self._rview
        self._rstart = start + 4 + n
        try:
            # The opener gets views of the reused receive buffer (no copy) and
            # returns a fresh plaintext object (tunnel_crypto: a bytearray).
            return self._opener.open(view[start:start + 4], view[start + 4:start + 4 + n])
        except Exception as e:  # noqa: BLE001 - mux treats any opener failure as crypto
            raise TunnelFailure(CloseCode.CRYPTO_ERROR,
                                 "frame failed authentication (%s)" % type(e).__name__) from None

    def _handshake(self) -> None:
        timer = gevent.Timeout(self.handshake_timeout)
        timer.start()
        try:
            pt = self._read_frame()
        except gevent.Timeout as t:
            if t is not timer:
                raise
            raise protocol_error("no HELLO within %ss" % self.handshake_timeout) from None
        finally:
            timer.close()
        if len(pt) < HEADER_LEN:
            raise protocol_error("short frame")
        ftype, sid = HDR.unpack_from(pt)
        if ftype != HELLO or sid != 0:
            raise protocol_error("first frame is %s, not HELLO"
                                  % FRAME_NAMES.get(ftype, ftype))
        hello = json_payload(pt[HEADER_LEN:], "HELLO")
        role = hello.get("role")
        version = hello.get("version")
        if role != self.peer_role:
            raise protocol_error("peer role %s, expected %r" % (escape(repr(role), 60),
                                                                  self.peer_role))
        if version != PROTOCOL_VERSION:
            raise protocol_error("peer protocol version %s, expected %d"
                                  % (escape(repr(version), 60), PROTOCOL_VERSION))
        window = hello.get("window", LEGACY_WINDOW)
        if type(window) is not int or not MAX_DATA <= window <= MAX_WINDOW:
            raise protocol_error("peer window %s not in [%d, %d]"
                                  % (escape(repr(window), 60), MAX_DATA, MAX_WINDOW))
        self.peer_window = window
        self._negotiate_resume(hello)
        self.last_ack = time.monotonic()
        self._up.set()
        self._ready.set()
        log.debug("%s: tunnel up (%s)", self.name, self.role)

    def _read_loop(self) -> None:  # noqa: C901 - one branch per frame type on the hot path; a dispatch table costs a call per frame
        monotonic = time.monotonic
        drained = self._async_drained
        while True:
            if not drained.is_set():
                self._wait_async_drained()
            pt = self._read_frame()
            if len(pt) < HEADER_LEN:
                raise protocol_error("short frame")
            ftype, sid = HDR.unpack_from(pt)
            now = monotonic()
            self.last_ack = now
            self._note_received()
            if ftype == DATA:
                stream = self._peer_stream(sid, ftype)
                if stream is None:
                    continue
                payload = memoryview(pt)[HEADER_LEN:]
                n = len(payload)
                if n > stream._rx_allowed:
                    raise protocol_error("stream %d: %d bytes beyond window %d"
                                          % (sid, n, stream._rx_allowed))
                if stream._eof_received:
                    raise protocol_error("stream %d: DATA after EOF" % sid)
                stream._rx_allowed -= n
                self.last_activity = now
                if n:
                    local = stream._local
                    if local is not None and not stream._writing and not stream._rx_chunks:
                        k = write_now(local, payload)
                        if k:
                            stream.bytes_in += k
                            self.bytes_in += k
                            stream._consumed(k, from_reader=True)
                            if k == n:
                                continue
                            payload = payload[k:]
                    if self.rx_buffered + len(payload) + CHUNK_OVERHEAD > self.buffer_budget:
                        self._over_budget(stream)
                        continue
                    stream._rx_queue(payload)
                    stream._rx_event.set()
            elif ftype == WINDOW:
                stream = self._peer_stream(sid, ftype)
                if stream is None:
                    continue
                if len(pt) != HEADER_LEN + 4:
                    raise protocol_error("WINDOW payload size")
                credit = U32.unpack_from(pt, HEADER_LEN)[0]
                if credit == 0 or stream._send_window + credit > self.peer_window:
                    raise protocol_error("stream %d: bad window credit %d" % (sid, credit))
                stream._send_window += credit
                stream._tx_event.set()
            elif ftype == EOF:
                stream = self._peer_stream(sid, ftype)
                if stream is None:
                    continue
                if stream._eof_received:
                    raise protocol_error("stream %d: second EOF" % sid)
                stream._eof_received = True
                stream._rx_event.set()
                self._maybe_forget(stream)
            elif ftype == PING:
                if sid != 0 or len(pt) != HEADER_LEN + 8:
                    raise protocol_error("bad PING")
                self._send_async(PONG, 0, pt[HEADER_LEN:])
            elif ftype == PONG:
                if sid != 0 or len(pt) != HEADER_LEN + 8:
                    raise protocol_error("bad PONG")
                self.last_pong = now
            elif ftype == OPEN:
                self._on_peer_open(sid, pt[HEADER_LEN:])
            elif ftype == OPEN_OK or ftype == OPEN_FAIL:
                self._on_open_reply(ftype, sid, pt[HEADER_LEN:])
            elif ftype == RESET:
                stream = self._peer_stream(sid, ftype)
                info = json_payload(pt[HEADER_LEN:], "RESET")
                if stream is not None:
                    reason = escape(info.get("reason", ""))
                    log.info("%s: stream %d reset by peer: %s", self.name, sid, reason)
                    self._mark_reset(stream, "by peer: %s" % reason)
                    self._forget(stream)
            elif ftype == CLOSE:
                if sid != 0:
                    raise protocol_error("CLOSE on stream %d" % sid)
                info = json_payload(pt[HEADER_LEN:], "CLOSE")
                code = json_str(info, "code", "CLOSE")
                reason = escape(info.get("reason", ""))
                if code not in CLOSE_CODES:
                    log.warning("%s: peer closed the tunnel with an unknown code %s (%s): "
                                "recorded as %s", self.name, escape(code), reason,
                                CloseCode.PROTOCOL_ERROR)
                    code, reason = CloseCode.PROTOCOL_ERROR, "peer closed with an unknown code"
                else:
                    log.info("%s: peer closed the tunnel: %s (%s)", self.name, code, reason)
                self._closing_by_peer = True
                raise TunnelFailure(code, reason)
            elif ftype == ACK:
                self._on_ack(sid, pt)
            elif ftype == HELLO:
                raise protocol_error("second HELLO")
            else:
                raise protocol_error("unknown frame type %d" % ftype)

    def _over_budget(self, stream: Stream) -> None:
        """A DATA frame would take the queued bytes over ``buffer_budget``: the stream
        is reset (its queue freed), the session goes on."""
        log.warning("%s: stream %d: %d bytes queued for local sockets, budget %d: "
                    "resetting the stream", self.name, stream.id, self.rx_buffered,
                    self.buffer_budget)
        self._reset_stream(stream, RESET_BUDGET, send=True)

    def _peer_stream(self, sid: int, ftype: int) -> Optional[Stream]:
        """The stream a per-stream frame refers to; None for late frames of a
        stream we already finished; protocol error for ids never opened."""
        stream = self._streams.get(sid)
        if stream is not None:
            return stream
        known = self._next_id - 1 if self.role == "console" else self._last_peer_id
        if sid == 0 or sid > known:
            raise protocol_error("%s for unknown stream %d" % (FRAME_NAMES[ftype], sid))
        return None

    def _on_open_reply(self, ftype: int, sid: int, payload: bytes) -> None:
        if self.role != "console":
            raise protocol_error("%s received by the agent" % FRAME_NAMES[ftype])
        stream = self._peer_stream(sid, ftype)
        if stream is None:
            return
        if stream._open_event.is_set():
            raise protocol_error("stream %d: second OPEN reply" % sid)
        if ftype == OPEN_FAIL:
            info = json_payload(payload, "OPEN_FAIL")
            code = json_str(info, "code", "OPEN_FAIL", CloseCode.TARGET_REFUSED)
            reason = escape(info.get("reason", ""))
            if code not in OPEN_FAIL_CODES:
                log.warning("%s: stream %d: OPEN_FAIL with an unknown code %s (%s): taken as %s",
                            self.name, sid, escape(code), reason, CloseCode.PROTOCOL_ERROR)
                code = CloseCode.PROTOCOL_ERROR
            stream._open_error = (code, reason)
            stream._reset = "open refused: %s" % code
            self._forget(stream)
        elif payload:
            raise protocol_error("OPEN_OK with payload")
        stream._open_event.set()
