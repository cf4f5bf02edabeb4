"""Serving and splicing streams on the agent side (a mixin of :class:`mux.Tunnel`)."""


import logging
import os
import socket
from typing import TYPE_CHECKING, Any, Optional, cast


from remote_gevent.common.logs import escape
from remote_gevent.wire.codes import STREAM_TOO_MANY, CloseCode
from remote_gevent.common.sockets import close_quietly
from remote_gevent.wire.mux_frames import (
    DATA,
    HDR,
    HEADER_LEN,
    MAX_DATA,
    OPEN_FAIL,
    OPEN_OK,
    StreamReset,
    TunnelClosed,
    dump_json,
    json_payload,
    json_str,
    protocol_error,
)
from remote_gevent.wire.mux_io import (
    os_err,
    send_all,
    set_sockopts,
)
from remote_gevent.wire.mux_stream import (
    Stream,
)

from remote_gevent.wire.mux_state import TunnelState

if TYPE_CHECKING:
    from remote_gevent.wire.mux import Tunnel

# One logger for the whole tunnel (its modules are one concern): "remote_gevent.wire.mux".
log = logging.getLogger("remote_gevent.wire.mux")


class StreamSplicing(TunnelState):
    """The agent's half of streams, mixed into :class:`Tunnel`: serve a peer's OPEN
    (``on_open`` → a local socket) and splice a stream to a local socket, both ways,
    half-close aware, with direct delivery to an idle local socket."""

    def splice(self, stream: Stream, sock: Any) -> None:
        """Pump ``stream`` <-> ``sock`` both ways until both directions are done.

        Half-close aware; an error on ``sock`` resets this stream only.  Closes
        ``sock`` at the end.  The tunnel->local direction runs in the calling
        greenlet, local->tunnel in one spawned into the tunnel's group.
        """
        stream._local = sock
        if stream._reset is not None or self.closed:
            close_quietly(sock)
            return
        set_sockopts(sock, buffers=True)
        up = self._group.spawn(self._pump_up, stream, sock)
        try:
            self._pump_down(stream, sock)
            up.join()
        finally:
            if not up.dead:
                up.kill(block=False)
                if not stream.finished:
                    self._reset_stream(stream, "splice interrupted", send=True)
            stream._local = None
            close_quietly(sock)

    def _pump_up(self, stream: Stream, sock: Any) -> None:
        """local socket -> tunnel (DATA frames, then EOF).

        The read buffer is taken from the tunnel's pool only while there is something
        to read (mux_limits): an idle stream waits for readability with a 1-byte
        ``MSG_PEEK`` and holds no buffer; while data flows, non-blocking ``os.readv``
        fills the buffer (no copy: the sealer gets a view of it), and a read that would
        block, or an exhausted send window, gives it back.  Objects other than plain
        sockets (test doubles) keep one buffer for the whole stream.
        """
        pool = self._pool
        plain = type(sock) is socket.socket
        buf: Optional[bytearray] = None
        view: Any = None
        recv_into = getattr(sock, "recv_into", None)
        # After a short read the socket is (nearly always) drained: wait for readability
        # in the hub straight away instead of trying one more read that fails with
        # EAGAIN (one system call and a buffer round trip less per interactive message).
        wait_readable = getattr(sock, "_wait", None) if plain else None
        drained = False
        try:
            while True:
                if buf is not None and plain and (drained or stream._send_window <= 0):
                    pool.give(buf)
                    buf = view = None
                allowed = stream._wait_window()
                want = allowed if allowed < MAX_DATA else MAX_DATA
                try:
                    if buf is None:
                        if drained and wait_readable is not None:
                            wait_readable(sock._read_event)
                        elif plain and sock.recv_into(self._peek, 1, socket.MSG_PEEK) == 0:
                            stream.shutdown_write()
                            return
                        drained = False
                        buf = pool.take()
                        view = memoryview(buf)
                        HDR.pack_into(buf, 0, DATA, stream.id)
                    if plain:
                        try:
                            n = os.readv(sock.fileno(), (view[HEADER_LEN:HEADER_LEN + want],))
                        except BlockingIOError:
                            pool.give(buf)
                            buf = view = None
                            continue
                        drained = n < want
                    elif recv_into is not None:
                        n = recv_into(view[HEADER_LEN:HEADER_LEN + want], want)
                    else:
                        data = sock.recv(want)
                        n = len(data)
                        view[HEADER_LEN:HEADER_LEN + n] = data
                except OSError as e:
                    if stream._reset is None and not self.closed:
                        self._reset_stream(stream, "local read: %s" % os_err(e), send=True)
                    return
                if n == 0:
                    stream.shutdown_write()
                    return
                # The sealer copies into its own output frame: pass a view, no copy.
                self._send_data_frame(stream, view[:HEADER_LEN + n], n)
        except (StreamReset, TunnelClosed):
            return
        except Exception:  # noqa: BLE001 - a stream's bug ends that stream only
            log.exception("%s: stream %d: local->tunnel failed", self.name, stream.id)
            self._reset_stream(stream, "internal error", send=True)
        finally:
            if buf is not None:
                view = None
                pool.give(buf)

    def _pump_down(self, stream: Stream, sock: Any) -> None:
        """tunnel -> local socket (sendall, credit back, shutdown(SHUT_WR) at EOF)."""
        send = getattr(sock, "send", None)
        if send is None:  # a file-like test double
            sendall = sock.sendall
        else:
            def sendall(data: Any) -> None:
                send_all(send, data)
        try:
            while True:
                chunk = stream._rx_pop()
                if chunk is None:
                    try:
                        sock.shutdown(socket.SHUT_WR)
                    except (OSError, AttributeError):
                        pass
                    return
                n = len(chunk)
                stream._writing = True
                try:
                    sendall(chunk)
                except OSError as e:
                    if stream._reset is None and not self.closed:
                        self._reset_stream(stream, "local write: %s" % os_err(e), send=True)
                    return
                finally:
                    stream._writing = False
                    stream._rx_done(chunk)
                stream.bytes_in += n
                self.bytes_in += n
                stream._consumed(n)
        except (StreamReset, TunnelClosed):
            return
        except Exception:  # noqa: BLE001 - a stream's bug ends that stream only
            log.exception("%s: stream %d: tunnel->local failed", self.name, stream.id)
            self._reset_stream(stream, "internal error", send=True)

    # -- sending ----------------------------------------------------------------

    def _on_peer_open(self, sid: int, payload: bytes) -> None:
        if self.role != "agent":
            raise protocol_error("OPEN received by the console")
        if sid <= self._last_peer_id:
            raise protocol_error("OPEN reuses stream id %d" % sid)
        info = json_payload(payload, "OPEN")
        target = json_str(info, "target", "OPEN")
        self._last_peer_id = sid
        refusal = None
        if len(self._streams) >= self.max_streams:
            refusal = ("%d streams open in this session (remote.max_streams_per_session)"
                       % len(self._streams))
        elif self.agent_streams is not None and not self.agent_streams.try_acquire():
            refusal = ("%d streams open on this device (remote.max_streams)"
                       % self.agent_streams.count)
        if refusal is not None:
            self._refuse_open(sid, target, refusal)
            return
        stream = Stream(cast("Tunnel", self), sid, target)  # this half is a Tunnel's
        stream._counted = True
        self._streams[sid] = stream
        self.streams_opened += 1
        self._group.spawn(self._serve_open, stream)

    def _refuse_open(self, sid: int, target: str, reason: str) -> None:
        """OPEN over a stream cap: OPEN_FAIL too_many_streams; the first one of the
        session is logged, the others counted (the total is logged at close)."""
        self.streams_refused += 1
        if self.streams_refused == 1:
            log.warning("%s: stream %d to %s refused: %s (%s); further refusals in this "
                        "session are counted", self.name, sid, escape(target),
                        STREAM_TOO_MANY, reason)
        self._send_async(OPEN_FAIL, sid, dump_json({"code": STREAM_TOO_MANY,
                                                "reason": reason}))

    def _serve_open(self, stream: Stream) -> None:
        """Agent side: connect the target through ``on_open`` and splice it."""
        assert self._on_open is not None
        sid, target = stream.id, stream.target
        try:
            sock = self._on_open(target)
        except Exception as e:  # noqa: BLE001 - every refusal becomes OPEN_FAIL
            code = getattr(e, "code", None)
            if isinstance(code, str):
                reason = str(getattr(e, "reason", "") or e)
            elif isinstance(e, OSError):
                code, reason = CloseCode.TARGET_REFUSED, os_err(e)
            else:
                log.exception("%s: stream %d: on_open(%s) failed", self.name, sid,
                              escape(target))
                code, reason = CloseCode.ERROR, "internal error"
            log.info("%s: stream %d to %s refused: %s (%s)", self.name, sid, escape(target),
                     code, escape(reason))
            stream._reset = "refused"
            self._forget(stream)
            if not self.closed:
                try:
                    self._send_frame(OPEN_FAIL, sid, dump_json({"code": code, "reason": reason}))
                except TunnelClosed:
                    pass
            return
        if stream._reset is not None or self.closed:
            close_quietly(sock)
            return
        log.info("%s: stream %d open to %s", self.name, sid, escape(target))
        try:
            self._send_frame(OPEN_OK, sid, b"")
        except TunnelClosed:
            close_quietly(sock)
            return
        self.splice(stream, sock)
        log.debug("%s: stream %d to %s done (in %d, out %d)", self.name, sid, escape(target),
                  stream.bytes_in, stream.bytes_out)

    # -- keepalive --------------------------------------------------------------
