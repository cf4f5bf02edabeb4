"""The relay's data plane: one OS thread moves every paired session's bytes with os.splice.

Why a thread and not greenlets: after pairing, the relay only moves already sealed bytes
from one socket to the other. Done in greenlets, each wake-up costs a pass through gevent's
hub (epoll dispatch, watcher callback, two greenlet switches) on top of the two ``splice``
calls; one forwarding hop added 40-43 us to a 1-byte round trip in greenlets against
35-37 us in this thread (``python benchmarks/bench_hop.py``, loopback, 2 cores,
docs/performance.md). So the gevent side keeps everything that needs greenlets
(TLS, hello, pairing, timeouts, logging) and hands each plain TCP pair to this thread.

How it works: one ``epoll`` (level-triggered) over both sockets of every pair. A direction
that has bytes to move splices socket → pipe → socket through the thread's scratch pipe,
which is empty again afterwards, so an idle pair holds no pipe. When the destination is
full the bytes stay in that pipe, which the direction keeps (the thread takes a fresh
scratch pipe); it stops reading and waits for ``EPOLLOUT`` on the destination: the
kernel's socket buffers and one pipe bound what a session holds. EOF (splice returns 0) is
passed on as ``shutdown(SHUT_WR)`` and the other direction keeps flowing (half-close).
A pair is finished when both directions saw EOF or one failed; the thread then removes both
descriptors from its epoll *before* telling the gevent side, which alone closes the sockets,
so a descriptor number is never reused under the thread. Aborting from the gevent side is
``shutdown(SHUT_RDWR)``, which the thread sees as EOF/HUP on both sockets.

Thread safety: new pairs and the stop request reach the thread through a lock-protected
list plus a wake-up pipe; finished pairs come back through a deque plus a gevent ``async``
watcher, whose ``send`` is the one libev call that is safe from another thread.
"""

from __future__ import annotations

import _socket
import collections
import errno
import logging
import os
import time
from typing import Any, Callable, Deque, Dict, List, Optional, Tuple

import gevent
from gevent import monkey
from gevent.hub import get_hub

log = logging.getLogger(__name__)

#: ``os.splice`` (Linux, Python 3.10+) or None; only called once checked not None.
SPLICE: Any = getattr(os, "splice", None)
_FLAGS = getattr(os, "SPLICE_F_MOVE", 0) | getattr(os, "SPLICE_F_NONBLOCK", 0)
_F_SETPIPE_SZ = 1031  # fcntl constants (Linux); fcntl.F_SETPIPE_SZ only from Python 3.10
_F_GETPIPE_SZ = 1032
#: How many spare pipes the pool keeps (the rest are closed).
SPARE_PIPES = 32
#: A direction lets the other pairs have a turn after moving this much in one wake-up.
BURST_BYTES = 4 * 1024 * 1024

_EPOLLIN = 0x001
_EPOLLOUT = 0x004
_EPOLLERR = 0x008
_EPOLLHUP = 0x010


class PipePool:
    """Pipes for ``os.splice``: the thread's scratch pipe, and one per direction whose
    destination is full (its bytes wait there).

    So an idle paired session costs its two sockets and no pipe: 5000 paired sessions hold
    10 000 socket fds plus 2 fds for the scratch pipe and 2 per direction waiting for room
    (+ a few spares). A pipe comes back only when empty; one that may still hold bytes
    (error mid-move) is closed. ``size`` asks the kernel for that capacity
    (``F_SETPIPE_SZ``).
    """

    def __init__(self, size: int, spare: int = SPARE_PIPES) -> None:
        self.want = size
        self.spare = spare
        self._free: List[Tuple[int, int, int]] = []
        self.allocated = 0

    def acquire(self) -> Tuple[int, int, int]:
        """``(read_fd, write_fd, capacity)``."""
        if self._free:
            return self._free.pop()
        r, w = _new_pipe()
        self.allocated += 1
        try:
            import fcntl
            fcntl.fcntl(w, _F_SETPIPE_SZ, self.want)
            size = fcntl.fcntl(w, _F_GETPIPE_SZ)
        except (ImportError, OSError):
            size = 65536  # over pipe-max-size or pipe-user-pages-soft: the default
        return r, w, size

    def release(self, r: int, w: int, size: int, clean: bool = True) -> None:
        if clean and len(self._free) < self.spare:
            self._free.append((r, w, size))
            return
        self.allocated -= 1
        for fd in (r, w):
            try:
                os.close(fd)
            except OSError:
                pass

    def close(self) -> None:
        while self._free:
            self.release(*self._free.pop(), clean=False)


def _new_pipe() -> Tuple[int, int]:
    pipe2 = getattr(os, "pipe2", None)
    if pipe2 is not None:
        return pipe2(os.O_NONBLOCK | os.O_CLOEXEC)
    r, w = os.pipe()
    os.set_blocking(r, False)
    os.set_blocking(w, False)
    return r, w


class _Direction:
    __slots__ = ("src", "dst", "name", "pipe", "pending", "blocked", "eof", "moved")

    def __init__(self, src: int, dst: int, name: str) -> None:
        self.src = src
        self.dst = dst
        self.name = name          # the role whose bytes these are ("agent", "console")
        self.pipe: Optional[Tuple[int, int, int]] = None
        self.pending = 0          # bytes in the pipe, not yet in dst
        self.blocked = False      # dst full: waiting for EPOLLOUT on dst
        self.eof = False
        self.moved = 0


class Pair:
    """One forwarded pair. Read by the gevent side; written by the thread."""

    def __init__(self, fd_a: int, name_a: str, fd_b: int, name_b: str,
                 on_done: Callable[["Pair"], None]) -> None:
        self.ab = _Direction(fd_a, fd_b, name_a)
        self.ba = _Direction(fd_b, fd_a, name_b)
        self.last_activity = time.monotonic()
        self.error = ""           # why forwarding failed ("" = both directions saw EOF)
        # A direction could not deliver (its destination failed) and the pair ended once
        # the other direction had moved what that side sent before (``_write_failed``):
        # the gevent side records it as an error but closes gently (no abort).
        self.write_error = ""
        self.nosplice = False     # splice refused these descriptors (EINVAL) before any byte
        self.on_done = on_done    # called in the hub once the thread let go of the fds

    def moved(self, name: str) -> int:
        """Bytes read from ``name``'s side so far."""
        return self.ab.moved if self.ab.name == name else self.ba.moved


class SplicePlane:
    """The data-plane thread. ``forward()`` from the hub; ``stop()`` once at the end."""

    def __init__(self, pipes: PipePool) -> None:
        if SPLICE is None:
            raise RuntimeError("os.splice is not available (Linux, Python 3.10+)")
        self.pipes = pipes
        self._epoll = monkey.get_original("select", "epoll")()
        self._lock = monkey.get_original("_thread", "allocate_lock")()
        self._wake_r, self._wake_w = _new_pipe()
        self._epoll.register(self._wake_r, _EPOLLIN)
        self._incoming: List[Pair] = []
        self._stopping = False
        self._fds: Dict[int, Tuple[Pair, _Direction, _Direction]] = {}
        self._masks: Dict[int, int] = {}
        self._scratch: Optional[Tuple[int, int, int]] = None  # empty between moves
        self._finished: Deque[Pair] = collections.deque()
        self._async = get_hub().loop.async_()
        self._async.start(self._deliver)
        self._thread_done = False
        self.native_id: Optional[int] = None  # the thread's kernel id (tests read its CPU)
        start = monkey.get_original("_thread", "start_new_thread")
        start(self._run, ())

    # ---- gevent side
    def forward(self, pair: Pair) -> None:
        with self._lock:
            self._incoming.append(pair)
        self._wake()

    @property
    def running(self) -> bool:
        return not self._thread_done

    def stop(self, timeout: float = 5.0) -> None:
        """Stop the thread (pairs still registered are dropped: abort them first)."""
        with self._lock:
            self._stopping = True
        self._wake()
        deadline = time.monotonic() + timeout
        while not self._thread_done and time.monotonic() < deadline:
            gevent.sleep(0.005)
        self._async.stop()
        self._async.close()

    def _wake(self) -> None:
        try:
            os.write(self._wake_w, b"x")
        except BlockingIOError:
            pass  # already pending

    def _deliver(self) -> None:
        while self._finished:
            pair = self._finished.popleft()
            try:
                pair.on_done(pair)
            except Exception:  # noqa: BLE001 - one pair's bookkeeping must not stop others
                log.exception("relay: finishing a forwarded pair failed")

    # ---- the thread
    def _run(self) -> None:
        self.native_id = monkey.get_original("threading", "get_native_id")()
        try:
            while self._loop_once():
                pass
        except Exception:  # noqa: BLE001 - logged; the pairs are handed back as failed
            log.exception("relay: the splice thread failed")
            for pair in {entry[0] for entry in self._fds.values()}:
                self._finish(pair, "relay splice thread failed")
        finally:
            if self._scratch is not None:
                self.pipes.release(*self._scratch)
                self._scratch = None
            self._epoll.close()
            for fd in (self._wake_r, self._wake_w):
                os.close(fd)
            self._thread_done = True

    def _loop_once(self) -> bool:
        for fd, events in self._epoll.poll():
            if fd == self._wake_r:
                if not self._take_incoming():
                    return False
                continue
            entry = self._fds.get(fd)
            if entry is None:
                continue  # its pair finished earlier in this batch
            pair, outgoing, incoming = entry
            acted = False
            if events & (_EPOLLOUT | _EPOLLERR | _EPOLLHUP) and incoming.blocked:
                acted = True
                self._flush(pair, incoming)
                if fd not in self._fds:
                    continue
            if events & (_EPOLLIN | _EPOLLERR | _EPOLLHUP) \
                    and not outgoing.eof and not outgoing.blocked:
                acted = True
                self._move(pair, outgoing)
            if not acted and events & _EPOLLERR and fd in self._fds:
                # A socket error (reset) that neither direction met: end the pair now
                # rather than be woken for it on every poll.
                self._finish(pair, "%s side: connection reset" % outgoing.name)
        return True

    def _take_incoming(self) -> bool:
        try:
            while os.read(self._wake_r, 4096):
                pass
        except BlockingIOError:
            pass
        with self._lock:
            pairs, self._incoming = self._incoming, []
            stopping = self._stopping
        for pair in pairs:
            a, b = pair.ab.src, pair.ba.src
            self._fds[a] = (pair, pair.ab, pair.ba)
            self._fds[b] = (pair, pair.ba, pair.ab)
            for fd in (a, b):
                self._masks[fd] = _EPOLLIN
                self._epoll.register(fd, _EPOLLIN)
        return not stopping

    def _move(self, pair: Pair, d: _Direction) -> None:
        """Move what ``d.src`` has now (up to a burst) into ``d.dst``.

        The hot path of every relayed byte, kept flat: one ``splice`` into the thread's
        scratch pipe, one (usually) out of it, no helper calls. The scratch pipe is empty
        between moves, so all pairs share it; only a direction whose destination is full
        keeps a pipe (its bytes wait there) and the thread takes a fresh scratch pipe."""
        pipe = self._scratch
        if pipe is None:
            pipe = self._scratch = self.pipes.acquire()
        r, w, size = pipe
        src = d.src
        dst = d.dst
        moved = 0
        left = 0
        try:
            while moved < BURST_BYTES:
                try:
                    n = SPLICE(src, w, size, None, None, _FLAGS)
                except BlockingIOError:
                    break
                except OSError as exc:
                    if exc.errno == errno.EINVAL and not d.moved:
                        pair.nosplice = True
                        self._finish(pair, "splice refused: %s" % exc)
                        return
                    if pair.write_error:
                        # d's source is the side that failed (its reset, now met by the
                        # read too): everything it sent before has been moved on, so
                        # end d like an EOF and let the healthy side read it all.
                        self._eof(pair, d)
                        return
                    self._finish(pair, "%s side: %s" % (d.name, _describe(exc)))
                    return
                if not n:
                    self._eof(pair, d)
                    return
                d.moved += n
                moved += n
                left = n
                try:
                    while left:
                        k = SPLICE(r, dst, left, None, None, _FLAGS)
                        if not k:
                            raise OSError(errno.EPIPE, "splice to the peer wrote nothing")
                        left -= k
                except BlockingIOError:
                    d.pipe, self._scratch = pipe, None  # the bytes wait in it for room
                    d.pending, left = left, 0
                    self._flush(pair, d)  # marks the direction blocked (or finishes it)
                    return
                except OSError as exc:
                    self._write_failed(pair, d, exc)
                    return
                if n < size:
                    break  # the socket is drained for now (epoll is level-triggered)
        finally:
            if moved:
                pair.last_activity = time.monotonic()
            if left and self._scratch is pipe:  # failed mid-move: bytes of a dead pair
                self.pipes.release(*pipe, clean=False)
                self._scratch = None

    def _flush(self, pair: Pair, d: _Direction) -> bool:
        """Write the pipe's bytes into ``d.dst``; False when it is full (now waiting)."""
        r = d.pipe[0] if d.pipe is not None else -1
        try:
            while d.pending:
                try:
                    k = SPLICE(r, d.dst, d.pending, flags=_FLAGS)
                except BlockingIOError:
                    if not d.blocked:
                        d.blocked = True
                        self._set_mask(d.src, self._masks[d.src] & ~_EPOLLIN)
                        self._set_mask(d.dst, self._masks[d.dst] | _EPOLLOUT)
                    return False
                if not k:
                    raise OSError(errno.EPIPE, "splice to the peer wrote nothing")
                d.pending -= k
        except OSError as exc:
            self._write_failed(pair, d, exc)
            return False
        if d.blocked:
            d.blocked = False
            self._set_mask(d.dst, self._masks[d.dst] & ~_EPOLLOUT)
            if not d.eof:
                self._set_mask(d.src, self._masks[d.src] | _EPOLLIN)
        if d.pipe is not None:
            self.pipes.release(*d.pipe)  # empty again: back to the pool
            d.pipe = None
        return True

    def _write_failed(self, pair: Pair, d: _Direction, exc: OSError) -> None:
        """Writing ``d``'s bytes into its destination failed: that side reset or is gone.

        Those bytes can never be delivered, but the failed side may have sent bytes of its
        own before it went away, still queued on its socket: typically a tunnel CLOSE
        followed by a reset (an operator's Ctrl-C while the device was still sending).
        Finishing the pair here would drop that CLOSE, and the far end would take the
        session for a lost link and keep it resuming. So only ``d`` ends (its pipe is
        discarded, its source no longer read); the other direction moves what is queued
        until it meets the error or EOF, which then finishes the pair."""
        other = pair.ba if d is pair.ab else pair.ab
        if not pair.write_error:
            pair.write_error = "%s side: %s" % (other.name, _describe(exc))
        d.eof = True
        if d.pipe is not None:
            self.pipes.release(*d.pipe, clean=False)
            d.pipe = None
        d.pending = 0
        d.blocked = False
        self._set_mask(d.src, self._masks[d.src] & ~_EPOLLIN)
        self._set_mask(d.dst, self._masks[d.dst] & ~_EPOLLOUT)
        if other.eof:
            self._finish(pair, "")

    def _eof(self, pair: Pair, d: _Direction) -> None:
        d.eof = True
        self._set_mask(d.src, self._masks[d.src] & ~_EPOLLIN)
        try:
            _shutdown_write(d.dst)
        except OSError:
            pass  # the other side is gone; its direction will notice
        other = pair.ba if d is pair.ab else pair.ab
        if other.eof:
            self._finish(pair, "")

    def _set_mask(self, fd: int, mask: int) -> None:
        """Change what we wait for on ``fd``. Nothing to wait for = out of the epoll set:
        epoll reports hang-ups whatever the mask, so a socket whose peer finished while
        its own direction waits for room elsewhere would otherwise wake us in a loop."""
        old = self._masks.get(fd)
        if old is None or old == mask:
            return
        self._masks[fd] = mask
        if not mask:
            self._epoll.unregister(fd)
        elif not old:
            self._epoll.register(fd, mask)
        else:
            self._epoll.modify(fd, mask)

    def _finish(self, pair: Pair, error: str) -> None:
        if pair.ab.src not in self._fds:
            return  # already finished
        pair.error = error
        for d in (pair.ab, pair.ba):
            self._fds.pop(d.src, None)
            if self._masks.pop(d.src, 0):
                try:
                    self._epoll.unregister(d.src)
                except (OSError, ValueError):
                    pass
            if d.pipe is not None:
                self.pipes.release(*d.pipe, clean=not d.pending)
                d.pipe = None
        self._finished.append(pair)
        self._async.send()


def _shutdown_write(fd: int) -> None:
    """``shutdown(fd, SHUT_WR)`` on a bare descriptor (the hub owns the socket object)."""
    sock = _socket.socket(fileno=fd)  # the C socket: no gevent object in this thread
    try:
        sock.shutdown(_socket.SHUT_WR)
    finally:
        sock.detach()


def _describe(exc: BaseException) -> str:
    return "%s: %s" % (type(exc).__name__, exc) if str(exc) else type(exc).__name__
