"""What one tunnel peer can make the other side hold: streams, buffers, memory.

Issue 10 item 3: a trusted operator opened 4,000 idle streams (84 KiB and one fd each,
allocated eagerly, not given back after close), and 1-byte DATA frames to a target
that never reads cost ~406 bytes of memory per payload byte, because the flow-control
window counts payload only.  :mod:`remote_gevent.wire.mux` uses what is here to bound both:

- **Stream caps.**  ``max_streams`` per session (a ``Tunnel`` argument) and one
  :class:`StreamCounter` shared by every tunnel of the agent.  An OPEN over either cap
  is answered OPEN_FAIL ``too_many_streams`` with a reason naming the limit; the session
  goes on.  Every stream holds one file descriptor (its target connection), and the
  common soft ``RLIMIT_NOFILE`` is 1024: the agent-wide default (512) leaves the rest
  to the broker link, the history, transfers and the relay connections, and the
  per-session default (256) is far above what interactive use opens (a browser behind
  SOCKS keeps a few dozen) while letting two busy sessions coexist under the agent cap.
- **Lazy buffers.**  The 64 KiB buffer a stream reads its local socket into comes from a
  small per-tunnel :class:`BufferPool` when the socket is readable and goes back when
  it would block: an idle stream holds none.
- **Real-byte budget.**  Data queued for a slow local reader is counted per session as
  payload plus :data:`CHUNK_OVERHEAD` per queued chunk, and payloads below
  :data:`COALESCE_BELOW` are copied into one growing buffer instead of each keeping its
  own frame (so 1-byte frames cost about a byte each).  A DATA frame that would take the
  session over ``buffer_budget`` resets its stream (RESET "receive buffer budget
  exceeded"); the window still bounds each stream as before.
- **Memory back after a burst of closes.**  :func:`note_streams_closed` schedules one
  :func:`remote_gevent.common.memory.release` (``gc.collect`` + glibc ``malloc_trim``) a moment
  after :data:`TRIM_AFTER_CLOSES` streams ended, at most once per
  :data:`TRIM_MIN_INTERVAL`: freed stream memory sits in malloc's arenas otherwise.
"""

import logging
import time
from typing import List, Optional

import gevent

log = logging.getLogger(__name__)

DEFAULT_MAX_STREAMS_PER_SESSION = 256
DEFAULT_MAX_STREAMS = 512            # per agent, all sessions together
DEFAULT_BUFFER_BUDGET = 16 << 20     # bytes queued for local sockets, per session
MIN_BUFFER_BUDGET = 1 << 20

# Memory one queued chunk costs beyond its payload bytes: the frame's plaintext
# bytearray header and its 5-byte frame header, the memoryview on it, the deque slot and
# malloc's own overhead (measured with tracemalloc on CPython 3.11: ~290 bytes; rounded
# up).  Payloads shorter than COALESCE_BELOW are copied into the tail chunk instead, so
# the overhead is paid once per up to 64 KiB for them, and at most
# CHUNK_OVERHEAD / COALESCE_BELOW (~8 %) for larger frames.
CHUNK_OVERHEAD = 320
COALESCE_BELOW = 4096

POOL_KEEP = 8                        # idle read buffers a tunnel keeps for reuse

# Control frames the reader has queued for sending (WINDOW, PONG, RESET, OPEN_FAIL):
# above this the reader stops reading until they drained, so a peer that sends but
# never reads cannot make us queue replies without bound.
ASYNC_PENDING_MAX = 1024

TRIM_AFTER_CLOSES = 128
TRIM_DELAY = 1.0                     # seconds after the burst, so that it has ended
TRIM_MIN_INTERVAL = 5.0


class StreamCounter:
    """Streams open across every tunnel of one agent, against ``limit``.

    The TunnelManager passes one instance to all its tunnels; ``limit`` may be changed
    at any time (config reload): streams already open stay, new ones are checked.
    """

    def __init__(self, limit: int = DEFAULT_MAX_STREAMS) -> None:
        self.limit = limit
        self.count = 0

    def try_acquire(self) -> bool:
        if self.count >= self.limit:
            return False
        self.count += 1
        return True

    def release(self) -> None:
        if self.count > 0:
            self.count -= 1


class BufferPool:
    """Reusable read buffers of one size; at most ``keep`` idle ones are kept."""

    def __init__(self, size: int, keep: int = POOL_KEEP) -> None:
        self.size = size
        self.keep = keep
        self.held = 0                # buffers taken and not given back
        self._free: List[bytearray] = []

    def take(self) -> bytearray:
        self.held += 1
        if self._free:
            return self._free.pop()
        return bytearray(self.size)

    def give(self, buf: bytearray) -> None:
        self.held -= 1
        if len(self._free) < self.keep:
            self._free.append(buf)

    def clear(self) -> None:
        del self._free[:]


class _Trimmer:
    def __init__(self) -> None:
        self.closed = 0
        self.last = 0.0
        self.pending: Optional[gevent.Greenlet] = None

    def note(self, n: int) -> None:
        self.closed += n
        if self.closed < TRIM_AFTER_CLOSES or self.pending is not None:
            return
        delay = max(TRIM_DELAY, self.last + TRIM_MIN_INTERVAL - time.monotonic())
        self.pending = gevent.spawn_later(delay, self._run)

    def _run(self) -> None:
        from remote_gevent.common import memory

        self.pending = None
        self.closed = 0
        self.last = time.monotonic()
        before = memory.rss_kib()
        if memory.release():
            log.debug("memory released after a burst of stream closes: RSS %s -> %s KiB",
                      before, memory.rss_kib())


_trimmer = _Trimmer()


def note_streams_closed(n: int = 1) -> None:
    """``n`` streams ended: after a burst, hand their memory back (see module doc)."""
    _trimmer.note(n)
