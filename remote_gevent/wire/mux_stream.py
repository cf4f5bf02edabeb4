"""One multiplexed stream: its receive queue, send window and half-close state."""

import collections
import logging
from typing import Any, Deque, Optional, TYPE_CHECKING, Tuple

import gevent
import gevent.event
import gevent.lock
import gevent.pool

from remote_gevent.wire.mux_limits import CHUNK_OVERHEAD, COALESCE_BELOW
from remote_gevent.wire.mux_frames import (
    EOF,
    MAX_DATA,
    StreamReset,
    TunnelClosed,
    U32,
    WINDOW,
)

if TYPE_CHECKING:  # the tunnel owns its streams; imported for annotations only
    from remote_gevent.wire.mux import Tunnel

# One logger for the whole tunnel (its modules are one concern): "remote_gevent.wire.mux".
log = logging.getLogger("remote_gevent.wire.mux")


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
                self.tunnel._send_async(WINDOW, self.id, U32.pack(credit))
            else:
                self.tunnel._send_frame(WINDOW, self.id, U32.pack(credit))

    def _wake(self) -> None:
        self._tx_event.set()
        self._rx_event.set()
        self._open_event.set()
