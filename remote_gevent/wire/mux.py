"""Multiplexed, flow-controlled tunnel over one connected socket.

One ``Tunnel`` runs over one byte stream (in production a TLS socket to the relay,
already past the relay hello) carrying AEAD-sealed frames (docs/design.md, "Tunnel
framing").  Inside it any number of ``Stream`` objects carry TCP connections, each
with its own flow-control window, so one slow local reader never stalls the others
and no buffer grows without bound.

Why it is shaped this way:

- **One reader greenlet** (``run``) reads frames, authenticates them and dispatches.
  It never blocks on a local socket and never writes to the tunnel itself (replies
  such as PONG go through a spawned greenlet): a reader blocked on a full send buffer
  while the peer's reader is blocked the same way would deadlock both ends.  Incoming
  DATA is queued on its stream; the queue is bounded by the stream's window, and a
  peer overrunning the window is a protocol error.
- **Direct delivery.**  When a spliced stream's local writer is idle (nothing queued,
  no write in progress) the reader writes the payload to the local socket itself with
  one non-blocking ``os.write`` and queues only what the kernel did not take.  That
  skips an event, two greenlet switches and a second ``recv`` before the bytes move
  on: the 1-byte round trip is dominated by such per-hop work (docs/performance.md).
- **Writers share one lock.**  Frames must be sealed and sent in counter order, so
  ``seal`` + ``sendall`` happen under one ``gevent.lock.Semaphore``.  This was
  measured against a single writer greenlet fed by a bounded queue
  (benchmarks/bench_mux.py): the lock was faster (every frame costs two extra
  greenlet switches through a queue, and bulk frames are already 64 KiB so there is
  little to coalesce), see ``_send_frame``.
- **Half-close** as in sshuttle: EOF from a local socket becomes an EOF frame, the
  peer shuts down writing on its local socket and the other direction keeps flowing.
  A stream is finished once both directions saw EOF, or on RESET.  An error on a
  local socket resets that stream only.
- mux knows nothing about crypto: any exception from ``opener.open`` is a failed
  authentication and ends the tunnel with ``crypto_error``.  Sealer/opener are duck
  typed (tunnel_crypto.FrameSealer/FrameOpener or the plain variants): ``seal`` and
  ``open`` receive bytes-like objects (memoryviews of reused buffers, to avoid a copy
  per frame) and must return fresh objects that do not alias their input.
- Measured (benchmarks/bench_mux.py, 2 cores, loopback, 1 GiB, one stream, console
  and agent in two processes): plain ~9.5-10, AES-256-GCM ~7-8, XChaCha20-Poly1305
  ~4.3-5 Gbit/s.  The buffered reader (several frames per ``recv_into``) bought
  ~10-20%; batching WINDOW credit at 1/2, 1/4 or 1/8 of the window made no
  measurable difference.

- **What a peer can make us hold is bounded** (:mod:`remote_gevent.wire.mux_limits`):
  streams per session and per agent (OPEN_FAIL ``too_many_streams``), read buffers
  taken lazily from a small pool, queued bytes counted in real bytes against a
  session budget (small frames coalesced), control replies queued by the reader
  (it pauses reading above ASYNC_PENDING_MAX).  Codes from the peer (CLOSE,
  OPEN_FAIL) must be known ones, else ``protocol_error``; peer text is escaped
  (``logs.escape``) before any log line.

The tunnel does not enforce idle / ACK timeouts itself; the agent's GC greenlet asks
``check_timeouts`` (unit-testable with an explicit ``now``).
"""


import logging
import time
from typing import Any, Dict, List, Optional, Sequence, Tuple

import gevent
import gevent.event
import gevent.lock
import gevent.pool

from remote_gevent.wire import mux_limits
from remote_gevent.wire.codes import CloseCode
from remote_gevent.common.sockets import abort_quietly
from remote_gevent.wire.mux_frames import (
    CLOSE,
    CLOSE_JOIN_TIMEOUT,
    CLOSE_SEND_TIMEOUT,
    DATA,
    DEFAULT_HANDSHAKE_TIMEOUT,
    DEFAULT_KEEPALIVE_INTERVAL,
    DEFAULT_OPEN_TIMEOUT,
    HDR,
    HEADER_LEN,
    HELLO,
    INITIAL_WINDOW,
    LEGACY_WINDOW,
    MAX_DATA,
    MuxError,
    OPEN,
    OnOpen,
    PING,
    PROTOCOL_VERSION,
    RECV_BUFFER,
    RESET,
    ROLES,
    StreamRefused,
    StreamReset,
    TunnelClosed,
    TunnelFailure,
    U64,
    WINDOW_UPDATE_THRESHOLD,
    dump_json,
)
from remote_gevent.wire.mux_io import (
    os_err,
    send_frames,
    set_sockopts,
)
from remote_gevent.wire.mux_stream import (
    Stream,
)
from remote_gevent.wire.mux_receive import FrameReceiving
from remote_gevent.wire.mux_splice import StreamSplicing
from remote_gevent.wire.resume import ResumeSettings
from remote_gevent.wire.resume_tunnel import TunnelResume, shut_down_under_reader
from remote_gevent.crypto.interfaces import Opener, Sealer

log = logging.getLogger(__name__)

#: Seconds the reader has, after a send failed on a session that cannot resume, to read
#: what the peer sent before the failure (its CLOSE) before the session ends relay_lost.
SEND_FAILURE_GRACE = 2.0


class Tunnel(FrameReceiving, StreamSplicing, TunnelResume):
    """A multiplexed tunnel over one connected socket.

    ``role`` is ``"console"`` (opens streams) or ``"agent"`` (accepts them through
    ``on_open(target) -> connected socket``).  ``run()`` blocks for the whole session
    and returns ``(code, reason)``.

    Time stamps: ``started`` is wall-clock (``time.time()``) for history rows;
    ``last_ack`` and ``last_activity`` are ``time.monotonic()`` values.
    ``last_ack`` is the time of the last authenticated frame of any type from the
    peer: every such frame proves the peer is alive and in sync, and with keepalive
    on both sides an idle peer still sends a PING each interval.  ``last_activity``
    is the time of the last DATA frame either way (the idle GC's clock).

    Limits (agent side, see :mod:`remote_gevent.wire.mux_limits`): ``max_streams`` streams
    the peer may have open in this tunnel and ``agent_streams``, a
    ``mux_limits.StreamCounter`` shared by all tunnels of the agent (None: no agent-wide
    cap); an OPEN over either is refused OPEN_FAIL ``too_many_streams``.
    ``buffer_budget``: real bytes this tunnel may hold queued for its local sockets
    (``rx_buffered``); a DATA frame over it resets its stream (None: no budget beyond
    the per-stream windows; the agent always passes one).

    ``resume``: how to dial the relay again and prove the session keys (issue 12,
    :mod:`remote_gevent.wire.resume_tunnel`); None: the tunnel ends with its connection.
    """

    def __init__(
        self,
        sock: Any,
        sealer: Sealer,
        opener: Opener,
        role: str,
        on_open: Optional[OnOpen] = None,
        name: str = "",
        keepalive_interval: float = DEFAULT_KEEPALIVE_INTERVAL,
        handshake_timeout: float = DEFAULT_HANDSHAKE_TIMEOUT,
        max_streams: int = mux_limits.DEFAULT_MAX_STREAMS_PER_SESSION,
        agent_streams: Optional[mux_limits.StreamCounter] = None,
        buffer_budget: Optional[int] = None,
        resume: Optional[ResumeSettings] = None,
    ) -> None:
        if role not in ROLES:
            raise ValueError("role must be 'console' or 'agent', not %r" % (role,))
        if role == "console" and on_open is not None:
            raise ValueError("only the agent side accepts streams (on_open)")
        self._sock = sock
        self._sealer = sealer
        self._opener = opener
        self.role = role
        self.peer_role = "agent" if role == "console" else "console"
        self.name = name or "tunnel"
        self._on_open = on_open
        self.keepalive_interval = keepalive_interval
        self.handshake_timeout = handshake_timeout
        self.max_streams = max_streams
        self.agent_streams = agent_streams
        # None: no session budget (the console; each stream is still bounded by its
        # window).  The agent passes remote.max_buffered_per_session.
        self.buffer_budget = buffer_budget if buffer_budget is not None else 1 << 62
        self.rx_buffered = 0             # real bytes queued for local sockets (all streams)
        self.streams_refused = 0         # OPENs refused over a stream cap
        self._pool = mux_limits.BufferPool(HEADER_LEN + MAX_DATA)
        self._peek = bytearray(1)        # MSG_PEEK target of idle streams (content unused)
        self._async_pending = 0          # control frames queued by _send_async
        self._async_frames: List[Any] = []  # their plaintexts, sent by one flusher
        self._async_flushing = False     # the flusher greenlet is running
        self._async_drained = gevent.event.Event()
        self._async_drained.set()
        set_sockopts(sock, buffers=False)

        self._wlock = gevent.lock.Semaphore()
        self._group = gevent.pool.Group()
        self._streams: Dict[int, Stream] = {}
        self._next_id = 1            # console: next id to allocate
        self._last_peer_id = 0       # agent: highest id the peer opened
        self._hello_sent = False
        self.recv_window = INITIAL_WINDOW      # per-stream window we grant (our HELLO)
        self.window_update_threshold = min(WINDOW_UPDATE_THRESHOLD, self.recv_window)
        self.peer_window = LEGACY_WINDOW       # per-stream window the peer grants us
        self._up = gevent.event.Event()        # peer HELLO authenticated
        self._ready = gevent.event.Event()     # up or closed
        self._done = gevent.event.Event()      # close() finished
        self._close_code: Optional[str] = None
        self._close_reason = ""
        self._ping_seq = 0
        self._closing_by_peer = False
        self._rbuf = bytearray(RECV_BUFFER)
        self._rview = memoryview(self._rbuf)
        self._rstart = 0                 # unparsed bytes are _rbuf[_rstart:_rend]
        self._rend = 0
        self._rdrained = False           # the last recv_into was short: wait before the next

        self.started: Optional[float] = None
        now = time.monotonic()
        self.last_ack = now
        self.last_activity = now
        self.last_pong: Optional[float] = None
        self.rtt: Optional[float] = None
        self.bytes_in = 0
        self.bytes_out = 0
        self.streams_opened = 0
        self.close_sent = False  # our CLOSE went out (else a resuming peer waits for us)
        self._init_resume(resume)

    def __repr__(self) -> str:
        return "<Tunnel %s %s%s>" % (self.name, self.role, " closed" if self.closed else "")

    # -- state ------------------------------------------------------------------

    @property
    def closed(self) -> bool:
        return self._close_code is not None

    @property
    def is_up(self) -> bool:
        return self._up.is_set() and not self.closed

    @property
    def close_code(self) -> Optional[str]:
        return self._close_code

    @property
    def close_reason(self) -> str:
        return self._close_reason

    @property
    def active_streams(self) -> int:
        return len(self._streams)

    @property
    def buffers_held(self) -> int:
        """Read buffers currently held by streams (an idle stream holds none)."""
        return self._pool.held

    def wait_up(self, timeout: Optional[float] = None) -> bool:
        """Wait until the peer's HELLO authenticated; False if closed or timed out."""
        self._ready.wait(timeout)
        return self.is_up

    def check_timeouts(
        self, idle_timeout: Optional[float], ack_timeout: Optional[float],
        now: Optional[float] = None,
    ) -> Optional[str]:
        """Close code the GC should apply now, or None.

        ``now`` is a ``time.monotonic()`` value; a timeout of None or <= 0 is off.
        A lost peer (``ack_lost``) wins over an idle one.
        """
        if self.closed or self.resuming:  # resuming: resume_timeout bounds the wait
            return None
        if now is None:
            now = time.monotonic()
        if ack_timeout and ack_timeout > 0 and now - self.last_ack > ack_timeout \
                and not self.resume_enabled:  # a dead path resumes (the tunnel's own clock)
            return CloseCode.ACK_LOST
        if idle_timeout and idle_timeout > 0 and now - self.last_activity > idle_timeout:
            return CloseCode.IDLE_TIMEOUT
        return None

    # -- running ----------------------------------------------------------------

    def run(self) -> Tuple[str, str]:
        """Handshake, then read frames until the session ends; return (code, reason)."""
        self.started = time.time()
        code, reason = CloseCode.NORMAL, ""
        try:
            if self.closed:
                raise TunnelClosed("closed before run")
            hello = {"role": self.role, "version": PROTOCOL_VERSION, "window": self.recv_window}
            if self._resend is not None:
                hello["resume"] = True
            self._send_frame(HELLO, 0, dump_json(hello))
            self._hello_sent = True
            self._handshake()
            if self.keepalive_interval and self.keepalive_interval > 0:
                self._group.spawn(self._keepalive)
            self._read_until_end()
        except TunnelFailure as e:
            code, reason = e.code, e.reason
        except TunnelClosed as e:
            code, reason = CloseCode.RELAY_LOST, str(e)
        except OSError as e:
            code, reason = CloseCode.RELAY_LOST, "tunnel socket: %s" % (e.strerror or e,)
        if not self.closed:
            quiet = (CloseCode.NORMAL, CloseCode.RELAY_LOST)
            level = logging.INFO if code in quiet else logging.WARNING
            log.log(level, "%s: tunnel ends: %s (%s)", self.name, code, reason)
        self.close(code, reason)
        self._done.wait()
        assert self._close_code is not None
        return self._close_code, self._close_reason

    def close(self, code: str = CloseCode.NORMAL, reason: str = "") -> None:
        """End the session: CLOSE (best effort), reset all streams, close the socket.

        Idempotent; the first code wins.  Safe to call from any greenlet, including
        one of the tunnel's own.
        """
        if self._close_code is not None:
            return
        self._close_code = code
        self._close_reason = reason
        log.debug("%s: closing: %s (%s)", self.name, code, reason)
        try:
            if self._hello_sent and not self._closing_by_peer and not self._link_down:
                self._send_close_frame(code, reason)
            if self._resend is not None:
                self._resend.close()  # wakes DATA writers waiting for room
            for stream in list(self._streams.values()):
                self._mark_reset(stream, "tunnel closed: %s" % code)
                self._forget(stream)
            self._streams.clear()
            self._pool.clear()
            self._async_drained.set()
            if self.streams_refused:
                log.info("%s: %d stream(s) refused over the stream caps in this session",
                         self.name, self.streams_refused)
            self._ready.set()
            try:
                self._sock.close()
            except OSError:
                pass
            current = gevent.getcurrent()
            others = [g for g in list(self._group) if g is not current]
            for g in others:
                g.kill(block=False)
            if others and current not in self._group:
                gevent.joinall(others, timeout=CLOSE_JOIN_TIMEOUT)
        finally:
            self._done.set()

    def _send_close_frame(self, code: str, reason: str) -> None:
        payload = dump_json({"code": code, "reason": reason})
        frame_pt = HDR.pack(CLOSE, 0) + payload
        acquired = self._wlock.acquire(timeout=CLOSE_SEND_TIMEOUT)
        if not acquired:
            return
        try:
            with gevent.Timeout(CLOSE_SEND_TIMEOUT, False):
                self._sock.sendall(self._sealer.seal(frame_pt))
                self.close_sent = True
        except Exception as e:  # noqa: BLE001 - best effort, the socket is going away
            log.debug("%s: CLOSE not sent: %s", self.name, e)
        finally:
            self._wlock.release()

    # -- console side: opening streams ---------------------------------------

    def open_stream(self, target: str, timeout: Optional[float] = DEFAULT_OPEN_TIMEOUT) -> Stream:
        """Open a stream to ``target`` (console side); raise ``StreamRefused``."""
        if self.role != "console":
            raise MuxError("only the console opens streams")
        deadline = None if timeout is None else time.monotonic() + timeout
        if not self._ready.wait(timeout):
            raise StreamRefused(CloseCode.ERROR, "tunnel not up after %ss" % timeout)
        if self.closed:
            raise TunnelClosed("tunnel closed: %s" % self._close_code)
        sid = self._next_id
        self._next_id += 1
        stream = Stream(self, sid, target)
        self._streams[sid] = stream
        self._send_frame(OPEN, sid, dump_json({"target": target}))
        remaining = None if deadline is None else max(0.0, deadline - time.monotonic())
        if not stream._open_event.wait(remaining):
            self._reset_stream(stream, "open timed out", send=True)
            raise StreamRefused(CloseCode.ERROR,
                                "no answer to OPEN %s within %ss" % (target, timeout))
        if stream._open_error is not None:
            raise StreamRefused(*stream._open_error)
        if self.closed:
            raise TunnelClosed("tunnel closed: %s" % self._close_code)
        if stream._reset is not None:
            raise StreamReset("stream %d reset: %s" % (sid, stream._reset))
        self.streams_opened += 1
        log.debug("%s: stream %d open to %s", self.name, sid, target)
        return stream

    # -- splicing -------------------------------------------------------------

    def _send_frame(self, ftype: int, sid: int, payload: Any) -> None:
        self._send_plain(HDR.pack(ftype, sid) + payload)

    def _send_plain(self, plaintext: Any) -> None:
        self._send_plains((plaintext,))

    def _send_plains(self, plaintexts: Sequence[Any]) -> None:
        """Seal ``plaintexts`` in order and send them with one ``send`` (several small
        frames: the copy of the join costs less than a system call each).

        Sealing and sending under one lock keeps frames in counter order.  A single
        writer greenlet with a bounded queue was measured slower for DATA: two more
        switches per frame and nothing to coalesce at 64 KiB frames."""
        if self._close_code is not None:
            raise TunnelClosed("tunnel closed: %s" % self._close_code)
        with self._wlock:
            if self._close_code is not None:
                raise TunnelClosed("tunnel closed: %s" % self._close_code)
            plaintexts = self._piggyback_ack(plaintexts)
            frames = [self._seal_kept(plaintext) for plaintext in plaintexts]
            if self._resend is not None and self._link_down:
                return  # in the resend buffer: sent when the link is back
            try:
                send_frames(self._sock, frames[0] if len(frames) == 1 else b"".join(frames))
            except OSError as e:
                if self._link_failed_on_send():
                    return  # in the resend buffer; the reader resumes
                self._link_lost_on_send(e)
                raise TunnelClosed("tunnel send: %s" % os_err(e)) from None

    def _seal_kept(self, plaintext: Any) -> Any:
        """Seal one frame (write lock held); with resume on it is kept, as sealed, until
        the peer ACKs it."""
        try:
            frame = self._sealer.seal(plaintext)
        except Exception as e:  # noqa: BLE001 - any sealer failure ends the tunnel
            gevent.spawn(self.close, CloseCode.CRYPTO_ERROR, "seal failed: %s" % e)
            raise TunnelClosed("seal failed") from None
        if self._resend is not None:
            self._resend.add(frame)
        return frame

    def _link_lost_on_send(self, e: OSError) -> None:
        """A send failed and the session cannot resume: it ends ``relay_lost`` unless the
        peer's CLOSE is already queued on the socket (a peer that closed with our data
        unread resets the link right after its CLOSE). So the socket is shut down under
        the reader, which reads that CLOSE (the session ends as the peer said) or EOF
        (``relay_lost``); the close below only backs it up should the reader be stuck."""
        if self._close_code is not None:
            return
        shut_down_under_reader(self._sock)
        gevent.spawn_later(SEND_FAILURE_GRACE, self.close, CloseCode.RELAY_LOST,
                           "tunnel send: %s" % os_err(e))

    def _send_data_frame(self, stream: Stream, plaintext: Any, n: int) -> None:
        if self._resend is not None:
            self._resend.wait_room()  # full: stop reading local sockets, never drop
        stream._send_window -= n
        self._send_plain(plaintext)
        stream.bytes_out += n
        self.bytes_out += n
        self.last_activity = time.monotonic()

    def _send_data(self, stream: Stream, data: Any) -> None:
        self._send_data_frame(stream, HDR.pack(DATA, stream.id) + data, len(data))

    def _send_async(self, ftype: int, sid: int, payload: bytes) -> None:
        """Send from the reader without blocking it (see module docstring).

        Queued, and sent by one flusher greenlet: the control frames queued while it
        waits for its turn (typically an ACK and a WINDOW after the same DATA frame) are
        sealed one by one and go out in one ``send`` — one system call, one wake-up of
        the relay and of the peer instead of one each (docs/performance.md, issue 17).
        Counted: the reader stops reading while more than ASYNC_PENDING_MAX are queued
        (``_wait_async_drained``), so a peer that sends but never reads cannot make us
        hold replies without bound."""
        self._async_frames.append(HDR.pack(ftype, sid) + payload)
        self._async_pending += 1
        if self._async_pending > mux_limits.ASYNC_PENDING_MAX:
            self._async_drained.clear()
        if not self._async_flushing:
            self._async_flushing = True
            self._group.spawn(self._flush_async)

    def _flush_async(self) -> None:
        try:
            while self._async_frames:
                batch, self._async_frames = self._async_frames, []
                try:
                    self._send_plains(batch)
                except TunnelClosed:
                    self._async_frames = []
                    self._async_pending = 0
                    self._async_drained.set()
                    return
                self._async_pending -= len(batch)
                if self._async_pending <= mux_limits.ASYNC_PENDING_MAX // 2:
                    self._async_drained.set()
        finally:
            self._async_flushing = False

    def _wait_async_drained(self) -> None:
        """Reader: pause while too many control frames wait to be sent (back-pressure
        on a peer that does not read; the GC's ack timeout ends a peer that never does)."""
        while not self._async_drained.is_set() and not self.closed:
            self._async_drained.wait()

    # -- streams bookkeeping ----------------------------------------------------

    def _mark_reset(self, stream: Stream, reason: str) -> None:
        if stream._reset is None:
            stream._reset = reason
        stream._rx_chunks.clear()
        self.rx_buffered -= stream._rx_cost
        stream._rx_cost = 0
        stream._wake()
        local = stream._local
        if local is not None:
            abort_quietly(local)

    def _reset_stream(self, stream: Stream, reason: str, send: bool) -> None:
        """Abort one stream; the tunnel continues."""
        already = stream._reset is not None
        self._mark_reset(stream, reason)
        self._forget(stream)
        if already:
            return
        log.info("%s: stream %d reset: %s", self.name, stream.id, reason)
        if send and not self.closed:
            self._send_async(RESET, stream.id, dump_json({"reason": reason}))

    def _forget(self, stream: Stream) -> None:
        """``stream`` leaves the tunnel: out of the table, its stream-cap slot back."""
        if self._streams.get(stream.id) is stream:
            del self._streams[stream.id]
        if stream._counted:
            stream._counted = False
            if self.agent_streams is not None:
                self.agent_streams.release()
            mux_limits.note_streams_closed()

    def _maybe_forget(self, stream: Stream) -> None:
        if stream.finished and self._streams.get(stream.id) is stream:
            self._forget(stream)
            log.debug("%s: stream %d done (in %d, out %d)", self.name, stream.id,
                      stream.bytes_in, stream.bytes_out)

    # -- reading ----------------------------------------------------------------

    def _keepalive(self) -> None:
        while not self.closed:
            gevent.sleep(self.keepalive_interval)
            if self._keepalive_tick():
                self.ping()

    def ping(self) -> None:
        """Send one PING now (the keepalive greenlet does this every interval)."""
        self._ping_seq += 1
        try:
            self._send_frame(PING, 0, U64.pack(self._ping_seq))
        except TunnelClosed:
            pass
