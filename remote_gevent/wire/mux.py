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

from __future__ import annotations

import collections
import errno
import json
import logging
import os
import socket
import struct
import time
from typing import Any, Callable, Deque, Dict, Optional, Tuple

import gevent
import gevent.event
import gevent.lock
import gevent.pool

from remote_gevent.wire import mux_limits
from remote_gevent.common.logs import escape
from remote_gevent.wire.mux_limits import CHUNK_OVERHEAD, COALESCE_BELOW
from remote_gevent.wire.codes import STREAM_TOO_MANY, CloseCode, Reason
from remote_gevent.common.sockets import abort_quietly, close_quietly

log = logging.getLogger(__name__)

PROTOCOL_VERSION = 1

# Frame types (docs/design.md, "Tunnel framing").
HELLO = 1
OPEN = 2
OPEN_OK = 3
OPEN_FAIL = 4
DATA = 5
WINDOW = 6
EOF = 7
RESET = 8
PING = 9
PONG = 10
CLOSE = 11

FRAME_NAMES = {
    HELLO: "HELLO", OPEN: "OPEN", OPEN_OK: "OPEN_OK", OPEN_FAIL: "OPEN_FAIL",
    DATA: "DATA", WINDOW: "WINDOW", EOF: "EOF", RESET: "RESET", PING: "PING",
    PONG: "PONG", CLOSE: "CLOSE",
}

MAX_DATA = 65536                       # largest DATA payload
HEADER_LEN = 5                         # type:u8 | stream:u32be
MAX_FRAME_LEN = MAX_DATA + HEADER_LEN + 64   # bound on the wire ``len`` (AEAD overhead)
# Per-stream flow-control window: a bound on the bytes buffered per stream on the
# receiving side (chunks queued until the local socket takes them), not preallocated.
# Each side announces the window it grants in its HELLO ("window"); a peer that does not
# (before this field existed) gets and grants LEGACY_WINDOW, so mixed versions interoperate.
LEGACY_WINDOW = 1 << 20
INITIAL_WINDOW = 4 << 20               # receive window we grant per stream, bytes
MAX_WINDOW = 1 << 30                   # largest window a peer may announce
# Credit is granted back in batches: one WINDOW frame per this many consumed bytes.
# Must stay <= the window (else a sender could wait for credit never sent).
WINDOW_UPDATE_THRESHOLD = INITIAL_WINDOW // 4
MAX_CONTROL_PAYLOAD = 4096             # JSON payloads (HELLO, OPEN, OPEN_FAIL, RESET, CLOSE)

DEFAULT_KEEPALIVE_INTERVAL = 15.0
DEFAULT_HANDSHAKE_TIMEOUT = 10.0
DEFAULT_OPEN_TIMEOUT = 30.0
CLOSE_SEND_TIMEOUT = 1.0               # best-effort CLOSE must not hang on a full socket
CLOSE_JOIN_TIMEOUT = 5.0
LOCAL_SOCKET_BUFFER = 4 * MAX_DATA     # SO_SNDBUF/SO_RCVBUF hint for spliced sockets
RECV_BUFFER = 2 * MAX_FRAME_LEN        # tunnel receive buffer (~128 KiB: per-session RSS)

ROLES = ("console", "agent")

# Codes a peer may send: CLOSE carries a close code; OPEN_FAIL a close code, a refusal
# reason (target_not_permitted) or too_many_streams.  Anything else becomes
# protocol_error: a peer's text never becomes a code (history rows, session.close).
CLOSE_CODES = CloseCode.ALL
OPEN_FAIL_CODES = CloseCode.ALL | Reason.ALL | frozenset({STREAM_TOO_MANY})
RESET_BUDGET = "receive buffer budget exceeded"

_HDR = struct.Struct(">BI")
_U32 = struct.Struct(">I")
_U64 = struct.Struct(">Q")

OnOpen = Callable[[str], Any]


class MuxError(Exception):
    """Base class of the tunnel's own errors."""


class StreamRefused(MuxError):
    """The far side refused to open a stream (OPEN_FAIL).

    Agents' ``on_open`` callbacks may raise it (or any exception with a ``code``
    attribute) to refuse with a specific code.
    """

    def __init__(self, code: str, reason: str = "") -> None:
        super().__init__("%s: %s" % (code, reason) if reason else code)
        self.code = code
        self.reason = reason


class TunnelClosed(MuxError, ConnectionError):
    """The tunnel is closed (or closing); nothing more can be sent."""


class StreamReset(MuxError, ConnectionResetError):
    """The stream was aborted (RESET from the peer, a local error, or tunnel close)."""


class _TunnelFailure(Exception):
    """Internal: ends the read loop with a close code."""

    def __init__(self, code: str, reason: str) -> None:
        super().__init__(reason)
        self.code = code
        self.reason = reason


def _protocol_error(reason: str) -> _TunnelFailure:
    return _TunnelFailure(CloseCode.PROTOCOL_ERROR, reason)


def _json_payload(payload: bytes, what: str) -> Dict[str, Any]:
    if len(payload) > MAX_CONTROL_PAYLOAD:
        raise _protocol_error("%s payload too large" % what)
    try:
        obj = json.loads(bytes(payload).decode("utf-8"))
    except (UnicodeDecodeError, ValueError, RecursionError) as e:  # nesting: 2 bytes a level
        raise _protocol_error("%s payload is not JSON: %s" % (what, e)) from None
    if not isinstance(obj, dict):
        raise _protocol_error("%s payload is not a JSON object" % what)
    return obj


def _json_str(obj: Dict[str, Any], key: str, what: str, default: Optional[str] = None) -> str:
    value = obj.get(key, default)
    if not isinstance(value, str):
        raise _protocol_error("%s: %r must be a string" % (what, key))
    return value


def _dump(obj: Dict[str, Any]) -> bytes:
    data = json.dumps(obj, separators=(",", ":")).encode("utf-8")
    if len(data) > MAX_CONTROL_PAYLOAD:
        # Only reasons can be long; cut them rather than send an invalid frame.
        obj = dict(obj)
        obj["reason"] = str(obj.get("reason", ""))[:256]
        data = json.dumps(obj, separators=(",", ":")).encode("utf-8")
    return data


def _set_sockopts(sock: Any, buffers: bool) -> None:
    """Best effort: TCP_NODELAY (interactive streams) and socket buffer sizes."""
    try:
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    except (OSError, AttributeError, ValueError):
        pass  # not TCP (socketpair, pipe-like object)
    if buffers:
        for opt in (socket.SO_SNDBUF, socket.SO_RCVBUF):
            try:
                if sock.getsockopt(socket.SOL_SOCKET, opt) < LOCAL_SOCKET_BUFFER:
                    sock.setsockopt(socket.SOL_SOCKET, opt, LOCAL_SOCKET_BUFFER)
            except (OSError, AttributeError, ValueError):
                pass


class Stream:
    """One bidirectional byte stream inside a tunnel.

    Either spliced with a local socket (``Tunnel.splice``, and automatically on the
    agent side) or used programmatically with ``send`` / ``recv`` /
    ``shutdown_write`` / ``close``: one sending and one receiving greenlet at a time.
    """

    def __init__(self, tunnel: "Tunnel", stream_id: int, target: str) -> None:
        self.tunnel = tunnel
        self.id = stream_id
        self.target = target
        self.bytes_in = 0          # payload delivered to the local side
        self.bytes_out = 0         # payload sent into the tunnel
        # send side
        self._send_window = tunnel.peer_window
        self._tx_event = gevent.event.Event()
        self._tx_event.set()
        self._eof_sent = False
        # receive side
        self._rx_chunks: Deque[Any] = collections.deque()
        self._rx_event = gevent.event.Event()
        self._rx_allowed = tunnel.recv_window   # bytes the peer may still send
        self._rx_unacked = 0                # consumed, credit not yet granted
        self._rx_cost = 0                   # real bytes queued (payload + per-chunk cost)
        self._eof_received = False
        self._counted = False               # holds a slot of the agent's StreamCounter
        # lifecycle
        self._open_event = gevent.event.Event()
        self._open_error: Optional[Tuple[str, str]] = None
        self._reset: Optional[str] = None
        self._local: Any = None             # spliced local socket
        self._writing = False               # _pump_down is inside a write to _local

    def __repr__(self) -> str:
        return "<Stream %s#%d %s>" % (self.tunnel.name, self.id, self.target)

    @property
    def finished(self) -> bool:
        return self._reset is not None or (self._eof_sent and self._eof_received)

    @property
    def reset_reason(self) -> Optional[str]:
        return self._reset

    # -- programmatic API -------------------------------------------------------

    def send(self, data: bytes) -> None:
        """Send all of ``data``, blocking while the peer's window is exhausted."""
        view = memoryview(data)
        total = len(view)
        pos = 0
        while pos < total:
            allowed = self._wait_window()
            n = min(allowed, total - pos, MAX_DATA)
            self.tunnel._send_data(self, view[pos:pos + n])
            pos += n

    def recv(self) -> bytes:
        """Next chunk from the peer; ``b""`` at EOF; raises ``StreamReset`` if aborted."""
        chunk = self._rx_pop()
        if chunk is None:
            return b""
        self._rx_done(chunk)
        n = len(chunk)
        self.bytes_in += n
        self.tunnel.bytes_in += n
        self._consumed(n)
        return bytes(chunk)

    def shutdown_write(self) -> None:
        """Half-close: tell the peer we will send nothing more (EOF frame)."""
        if self._eof_sent or self._reset is not None:
            return
        self._eof_sent = True
        self.tunnel._send_frame(EOF, self.id, b"")
        self.tunnel._maybe_forget(self)

    def close(self) -> None:
        """Finish the stream: EOF if only our side is open, RESET if data may be lost."""
        if self.finished:
            return
        if self._eof_received:
            try:
                self.shutdown_write()
            except TunnelClosed:
                pass
        else:
            self.tunnel._reset_stream(self, "closed", send=True)

    # -- internals --------------------------------------------------------------

    def _check_alive(self) -> None:
        if self._reset is not None:
            raise StreamReset("stream %d reset: %s" % (self.id, self._reset))
        if self.tunnel.closed:
            raise TunnelClosed("tunnel closed")

    def _wait_window(self) -> int:
        """Block until at least one byte of send window; return the window."""
        while True:
            self._check_alive()
            if self._eof_sent:
                raise StreamReset("stream %d: write side already shut down" % self.id)
            if self._send_window > 0:
                return self._send_window
            self._tx_event.clear()
            self._tx_event.wait()

    def _rx_queue(self, payload: Any) -> None:
        """Queue ``payload`` for the local side, counted in real bytes (mux_limits).

        Small payloads are copied into the tail chunk (a bytearray of ours, never
        exported while queued) rather than each keeping its own frame object alive."""
        n = len(payload)
        chunks = self._rx_chunks
        if n < COALESCE_BELOW:
            tail = chunks[-1] if chunks else None
            if type(tail) is bytearray and len(tail) + n <= MAX_DATA:
                tail += payload
                cost = n
            else:
                chunks.append(bytearray(payload))
                cost = n + CHUNK_OVERHEAD
        else:
            chunks.append(payload)
            cost = n + CHUNK_OVERHEAD
        self._rx_cost += cost
        self.tunnel.rx_buffered += cost

    def _rx_done(self, chunk: Any) -> None:
        """A popped chunk left our hands (written out or returned by ``recv``): it no
        longer counts against the budget.  Until then it does, in flight included."""
        cost = min(len(chunk) + CHUNK_OVERHEAD, self._rx_cost)
        self._rx_cost -= cost
        self.tunnel.rx_buffered -= cost

    def _rx_pop(self) -> Any:
        """Next received chunk (a memoryview/bytes), or None at EOF."""
        while True:
            if self._rx_chunks:
                return self._rx_chunks.popleft()
            if self._reset is not None:
                raise StreamReset("stream %d reset: %s" % (self.id, self._reset))
            if self._eof_received:
                return None
            if self.tunnel.closed:
                raise TunnelClosed("tunnel closed")
            self._rx_event.clear()
            self._rx_event.wait()

    def _consumed(self, n: int, from_reader: bool = False) -> None:
        """``n`` bytes left our buffer: grant credit back in batches.

        The reader greenlet (direct delivery) must not write to the tunnel itself, so
        its WINDOW frames go through ``_send_async``."""
        self._rx_unacked += n
        if self._rx_unacked >= self.tunnel.window_update_threshold \
                and not self._eof_received \
                and self._reset is None:
            credit = self._rx_unacked
            self._rx_unacked = 0
            self._rx_allowed += credit
            if from_reader:
                self.tunnel._send_async(WINDOW, self.id, _U32.pack(credit))
            else:
                self.tunnel._send_frame(WINDOW, self.id, _U32.pack(credit))

    def _wake(self) -> None:
        self._tx_event.set()
        self._rx_event.set()
        self._open_event.set()


class Tunnel:
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
    """

    def __init__(
        self,
        sock: Any,
        sealer: Any,
        opener: Any,
        role: str,
        on_open: Optional[OnOpen] = None,
        name: str = "",
        keepalive_interval: float = DEFAULT_KEEPALIVE_INTERVAL,
        handshake_timeout: float = DEFAULT_HANDSHAKE_TIMEOUT,
        max_streams: int = mux_limits.DEFAULT_MAX_STREAMS_PER_SESSION,
        agent_streams: Optional[mux_limits.StreamCounter] = None,
        buffer_budget: Optional[int] = None,
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
        self._async_drained = gevent.event.Event()
        self._async_drained.set()
        _set_sockopts(sock, buffers=False)

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

        self.started: Optional[float] = None
        now = time.monotonic()
        self.last_ack = now
        self.last_activity = now
        self.last_pong: Optional[float] = None
        self.rtt: Optional[float] = None
        self.bytes_in = 0
        self.bytes_out = 0
        self.streams_opened = 0

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
        if self.closed:
            return None
        if now is None:
            now = time.monotonic()
        if ack_timeout and ack_timeout > 0 and now - self.last_ack > ack_timeout:
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
            self._send_frame(HELLO, 0, _dump({"role": self.role, "version": PROTOCOL_VERSION,
                                              "window": self.recv_window}))
            self._hello_sent = True
            self._handshake()
            if self.keepalive_interval and self.keepalive_interval > 0:
                self._group.spawn(self._keepalive)
            self._read_loop()
        except _TunnelFailure as e:
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
            if self._hello_sent and not self._closing_by_peer:
                self._send_close_frame(code, reason)
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
        payload = _dump({"code": code, "reason": reason})
        frame_pt = _HDR.pack(CLOSE, 0) + payload
        acquired = self._wlock.acquire(timeout=CLOSE_SEND_TIMEOUT)
        if not acquired:
            return
        try:
            with gevent.Timeout(CLOSE_SEND_TIMEOUT, False):
                self._sock.sendall(self._sealer.seal(frame_pt))
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
        self._send_frame(OPEN, sid, _dump({"target": target}))
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
        _set_sockopts(sock, buffers=True)
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
        try:
            while True:
                if buf is not None and plain and stream._send_window <= 0:
                    pool.give(buf)
                    buf = view = None
                allowed = stream._wait_window()
                want = allowed if allowed < MAX_DATA else MAX_DATA
                try:
                    if buf is None:
                        if plain and sock.recv_into(self._peek, 1, socket.MSG_PEEK) == 0:
                            stream.shutdown_write()
                            return
                        buf = pool.take()
                        view = memoryview(buf)
                        _HDR.pack_into(buf, 0, DATA, stream.id)
                    if plain:
                        try:
                            n = os.readv(sock.fileno(), (view[HEADER_LEN:HEADER_LEN + want],))
                        except BlockingIOError:
                            pool.give(buf)
                            buf = view = None
                            continue
                    elif recv_into is not None:
                        n = recv_into(view[HEADER_LEN:HEADER_LEN + want], want)
                    else:
                        data = sock.recv(want)
                        n = len(data)
                        view[HEADER_LEN:HEADER_LEN + n] = data
                except OSError as e:
                    if stream._reset is None and not self.closed:
                        self._reset_stream(stream, "local read: %s" % _err(e), send=True)
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
                _send_all(send, data)
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
                        self._reset_stream(stream, "local write: %s" % _err(e), send=True)
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

    def _send_frame(self, ftype: int, sid: int, payload: Any) -> None:
        self._send_plain(_HDR.pack(ftype, sid) + payload)

    def _send_plain(self, plaintext: Any) -> None:
        # Sealing and sending under one lock keeps frames in counter order.  A
        # single writer greenlet with a bounded queue was measured slower: two
        # more switches per frame and nothing to coalesce at 64 KiB frames.
        if self._close_code is not None:
            raise TunnelClosed("tunnel closed: %s" % self._close_code)
        with self._wlock:
            if self._close_code is not None:
                raise TunnelClosed("tunnel closed: %s" % self._close_code)
            try:
                frame = self._sealer.seal(plaintext)
            except Exception as e:  # noqa: BLE001 - any sealer failure ends the tunnel
                gevent.spawn(self.close, CloseCode.CRYPTO_ERROR, "seal failed: %s" % e)
                raise TunnelClosed("seal failed") from None
            try:
                _send_all(self._sock.send, frame)
            except OSError as e:
                if self._close_code is None:
                    gevent.spawn(self.close, CloseCode.RELAY_LOST, "tunnel send: %s" % _err(e))
                raise TunnelClosed("tunnel send: %s" % _err(e)) from None

    def _send_data_frame(self, stream: Stream, plaintext: Any, n: int) -> None:
        stream._send_window -= n
        self._send_plain(plaintext)
        stream.bytes_out += n
        self.bytes_out += n
        self.last_activity = time.monotonic()

    def _send_data(self, stream: Stream, data: Any) -> None:
        self._send_data_frame(stream, _HDR.pack(DATA, stream.id) + data, len(data))

    def _send_async(self, ftype: int, sid: int, payload: bytes) -> None:
        """Send from the reader without blocking it (see module docstring).

        Counted: the reader stops reading while more than ASYNC_PENDING_MAX are queued
        (``_wait_async_drained``), so a peer that sends but never reads cannot make us
        hold replies without bound."""
        def send() -> None:
            try:
                self._send_frame(ftype, sid, payload)
            except TunnelClosed:
                pass
            finally:
                self._async_pending -= 1
                if self._async_pending <= mux_limits.ASYNC_PENDING_MAX // 2:
                    self._async_drained.set()
        self._async_pending += 1
        if self._async_pending > mux_limits.ASYNC_PENDING_MAX:
            self._async_drained.clear()
        self._group.spawn(send)

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
            self._send_async(RESET, stream.id, _dump({"reason": reason}))

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
        recv_into = self._sock.recv_into
        while self._rend - self._rstart < need:
            k = recv_into(view[self._rend:], RECV_BUFFER - self._rend)
            if not k:
                if self._close_code is None:
                    raise _TunnelFailure(CloseCode.RELAY_LOST,
                                         "tunnel socket closed without CLOSE")
                raise TunnelClosed("closed")
            self._rend += k

    def _read_frame(self) -> Any:
        """Next authenticated plaintext frame (a fresh object from the opener)."""
        if self._rend - self._rstart < 4:
            self._fill(4)
        start = self._rstart
        n = _U32.unpack_from(self._rbuf, start)[0]
        if n > MAX_FRAME_LEN or n < HEADER_LEN:
            raise _protocol_error("frame length %d out of bounds" % n)
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
            raise _TunnelFailure(CloseCode.CRYPTO_ERROR,
                                 "frame failed authentication (%s)" % type(e).__name__) from None

    def _handshake(self) -> None:
        timer = gevent.Timeout(self.handshake_timeout)
        timer.start()
        try:
            pt = self._read_frame()
        except gevent.Timeout as t:
            if t is not timer:
                raise
            raise _protocol_error("no HELLO within %ss" % self.handshake_timeout) from None
        finally:
            timer.close()
        if len(pt) < HEADER_LEN:
            raise _protocol_error("short frame")
        ftype, sid = _HDR.unpack_from(pt)
        if ftype != HELLO or sid != 0:
            raise _protocol_error("first frame is %s, not HELLO"
                                  % FRAME_NAMES.get(ftype, ftype))
        hello = _json_payload(pt[HEADER_LEN:], "HELLO")
        role = hello.get("role")
        version = hello.get("version")
        if role != self.peer_role:
            raise _protocol_error("peer role %s, expected %r" % (escape(repr(role), 60),
                                                                  self.peer_role))
        if version != PROTOCOL_VERSION:
            raise _protocol_error("peer protocol version %s, expected %d"
                                  % (escape(repr(version), 60), PROTOCOL_VERSION))
        window = hello.get("window", LEGACY_WINDOW)
        if type(window) is not int or not MAX_DATA <= window <= MAX_WINDOW:
            raise _protocol_error("peer window %s not in [%d, %d]"
                                  % (escape(repr(window), 60), MAX_DATA, MAX_WINDOW))
        self.peer_window = window
        self.last_ack = time.monotonic()
        self._up.set()
        self._ready.set()
        log.debug("%s: tunnel up (%s)", self.name, self.role)

    def _read_loop(self) -> None:
        monotonic = time.monotonic
        drained = self._async_drained
        while True:
            if not drained.is_set():
                self._wait_async_drained()
            pt = self._read_frame()
            if len(pt) < HEADER_LEN:
                raise _protocol_error("short frame")
            ftype, sid = _HDR.unpack_from(pt)
            now = monotonic()
            self.last_ack = now
            if ftype == DATA:
                stream = self._peer_stream(sid, ftype)
                if stream is None:
                    continue
                payload = memoryview(pt)[HEADER_LEN:]
                n = len(payload)
                if n > stream._rx_allowed:
                    raise _protocol_error("stream %d: %d bytes beyond window %d"
                                          % (sid, n, stream._rx_allowed))
                if stream._eof_received:
                    raise _protocol_error("stream %d: DATA after EOF" % sid)
                stream._rx_allowed -= n
                self.last_activity = now
                if n:
                    local = stream._local
                    if local is not None and not stream._writing and not stream._rx_chunks:
                        k = _write_now(local, payload)
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
                    raise _protocol_error("WINDOW payload size")
                credit = _U32.unpack_from(pt, HEADER_LEN)[0]
                if credit == 0 or stream._send_window + credit > self.peer_window:
                    raise _protocol_error("stream %d: bad window credit %d" % (sid, credit))
                stream._send_window += credit
                stream._tx_event.set()
            elif ftype == EOF:
                stream = self._peer_stream(sid, ftype)
                if stream is None:
                    continue
                if stream._eof_received:
                    raise _protocol_error("stream %d: second EOF" % sid)
                stream._eof_received = True
                stream._rx_event.set()
                self._maybe_forget(stream)
            elif ftype == PING:
                if sid != 0 or len(pt) != HEADER_LEN + 8:
                    raise _protocol_error("bad PING")
                self._send_async(PONG, 0, pt[HEADER_LEN:])
            elif ftype == PONG:
                if sid != 0 or len(pt) != HEADER_LEN + 8:
                    raise _protocol_error("bad PONG")
                self.last_pong = now
            elif ftype == OPEN:
                self._on_peer_open(sid, pt[HEADER_LEN:])
            elif ftype == OPEN_OK or ftype == OPEN_FAIL:
                self._on_open_reply(ftype, sid, pt[HEADER_LEN:])
            elif ftype == RESET:
                stream = self._peer_stream(sid, ftype)
                info = _json_payload(pt[HEADER_LEN:], "RESET")
                if stream is not None:
                    reason = escape(info.get("reason", ""))
                    log.info("%s: stream %d reset by peer: %s", self.name, sid, reason)
                    self._mark_reset(stream, "by peer: %s" % reason)
                    self._forget(stream)
            elif ftype == CLOSE:
                if sid != 0:
                    raise _protocol_error("CLOSE on stream %d" % sid)
                info = _json_payload(pt[HEADER_LEN:], "CLOSE")
                code = _json_str(info, "code", "CLOSE")
                reason = escape(info.get("reason", ""))
                if code not in CLOSE_CODES:
                    log.warning("%s: peer closed the tunnel with an unknown code %s (%s): "
                                "recorded as %s", self.name, escape(code), reason,
                                CloseCode.PROTOCOL_ERROR)
                    code, reason = CloseCode.PROTOCOL_ERROR, "peer closed with an unknown code"
                else:
                    log.info("%s: peer closed the tunnel: %s (%s)", self.name, code, reason)
                self._closing_by_peer = True
                raise _TunnelFailure(code, reason)
            elif ftype == HELLO:
                raise _protocol_error("second HELLO")
            else:
                raise _protocol_error("unknown frame type %d" % ftype)

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
            raise _protocol_error("%s for unknown stream %d" % (FRAME_NAMES[ftype], sid))
        return None

    def _on_open_reply(self, ftype: int, sid: int, payload: bytes) -> None:
        if self.role != "console":
            raise _protocol_error("%s received by the agent" % FRAME_NAMES[ftype])
        stream = self._peer_stream(sid, ftype)
        if stream is None:
            return
        if stream._open_event.is_set():
            raise _protocol_error("stream %d: second OPEN reply" % sid)
        if ftype == OPEN_FAIL:
            info = _json_payload(payload, "OPEN_FAIL")
            code = _json_str(info, "code", "OPEN_FAIL", CloseCode.TARGET_REFUSED)
            reason = escape(info.get("reason", ""))
            if code not in OPEN_FAIL_CODES:
                log.warning("%s: stream %d: OPEN_FAIL with an unknown code %s (%s): taken as %s",
                            self.name, sid, escape(code), reason, CloseCode.PROTOCOL_ERROR)
                code = CloseCode.PROTOCOL_ERROR
            stream._open_error = (code, reason)
            stream._reset = "open refused: %s" % code
            self._forget(stream)
        elif payload:
            raise _protocol_error("OPEN_OK with payload")
        stream._open_event.set()

    def _on_peer_open(self, sid: int, payload: bytes) -> None:
        if self.role != "agent":
            raise _protocol_error("OPEN received by the console")
        if sid <= self._last_peer_id:
            raise _protocol_error("OPEN reuses stream id %d" % sid)
        info = _json_payload(payload, "OPEN")
        target = _json_str(info, "target", "OPEN")
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
        stream = Stream(self, sid, target)
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
        self._send_async(OPEN_FAIL, sid, _dump({"code": STREAM_TOO_MANY,
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
                code, reason = CloseCode.TARGET_REFUSED, _err(e)
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
                    self._send_frame(OPEN_FAIL, sid, _dump({"code": code, "reason": reason}))
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

    def _keepalive(self) -> None:
        while not self.closed:
            gevent.sleep(self.keepalive_interval)
            self.ping()

    def ping(self) -> None:
        """Send one PING now (the keepalive greenlet does this every interval)."""
        self._ping_seq += 1
        try:
            self._send_frame(PING, 0, _U64.pack(self._ping_seq))
        except TunnelClosed:
            pass


def _err(e: OSError) -> str:
    if e.errno is not None and e.errno in errno.errorcode:
        return "%s %s" % (errno.errorcode[e.errno], e.strerror or "")
    return str(e) or type(e).__name__


def _send_all(send: Callable[[Any], int], data: Any) -> None:
    """``sendall`` without gevent's per-call ``getsockopt(SO_SNDBUF)`` and chunking:
    the first ``send`` nearly always takes the whole frame."""
    sent = send(data)
    total = len(data)
    if sent < total:
        view = memoryview(data)
        while sent < total:
            sent += send(view[sent:])


def _write_now(sock: Any, data: Any) -> int:
    """Bytes of ``data`` the kernel takes right now from a non-blocking ``os.write`` to
    ``sock`` (gevent keeps its sockets' descriptors non-blocking); 0 if it would block,
    on any error (the stream's writer meets it again and resets the stream), and for
    anything but a plain socket.  ``fileno()`` is asked every time: a closed socket
    answers -1, so a descriptor number reused after a close is never written to."""
    if type(sock) is not socket.socket:
        return 0
    fd = sock.fileno()
    if fd < 0:
        return 0
    try:
        return os.write(fd, data)
    except OSError:
        return 0



