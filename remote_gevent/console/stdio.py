"""``stdio DEVICE host:port``: one stream on stdin/stdout (an ssh ``ProxyCommand``).

    ssh -o ProxyCommand='remote-gevent-console stdio %n 127.0.0.1:22' user@DEVICE

stdin and stdout are switched to non-blocking mode; stdin is read through one io
watcher for the session (:class:`_Reader`), stdout written with ``gevent.os.nb_write``
(both wait on the hub when the pipe is empty/full, so both directions and the tunnel's
own greenlets run concurrently); the original flags
are restored at the end (a terminal must not stay non-blocking). Regular files never
block and work too.

Half-close: EOF on stdin becomes the stream's EOF (the target sees a FIN, the other
direction keeps flowing); the stream's EOF closes our stdout (ssh sees EOF). We exit
when both directions are done, or at once when the stream or the tunnel is reset.

Ending on the user's side is a normal close (issue 12), so the device's history tells a
logout from a failure: ``ssh`` ends its ProxyCommand with SIGHUP, a supervisor with
SIGTERM (both: :func:`install_close_signals`, the caller then closes the session
``normal``); a reader of our stdout that goes away is noticed by :func:`_watch_stdout`
even when nothing is being written (an idle ssh session writes nothing).
"""

from __future__ import annotations

import errno
import fcntl
import os
import select
import signal
import stat
import sys
from typing import Any, Optional

import gevent

from remote_gevent.console.config import EXIT_CONNECTION, EXIT_OK, EXIT_REFUSED, ConsoleError
from remote_gevent.console.master import close_stdout

CHUNK = 65536
#: How often :func:`_watch_stdout` looks whether our stdout's reader is still there.
STDOUT_CHECK_INTERVAL = 0.5


def install_close_signals() -> None:
    """SIGHUP (``ssh`` exiting ends its ProxyCommand so) and SIGTERM end ``stdio`` like
    Ctrl-C: KeyboardInterrupt in the main greenlet, whose caller closes the session with
    ``normal``. Without this SIGHUP killed us before the CLOSE: ``relay_lost`` in the
    device's history for every ssh logout."""
    main = gevent.getcurrent()
    for sig in (signal.SIGHUP, signal.SIGTERM):
        gevent.signal_handler(sig, gevent.kill, main, KeyboardInterrupt)


def _reader_gone(fd: int) -> bool:
    """True once nobody can read ``fd`` any more (a pipe's or socket's reader closed):
    the kernel reports POLLERR/POLLHUP on the writing end. A file or tty never does."""
    poller = _original_poll()
    poller.register(fd, select.POLLOUT)
    try:
        events = poller.poll(0)
    except OSError:
        return False
    return any(ev & (select.POLLERR | select.POLLHUP) for _fd, ev in events)


def _original_poll() -> Any:
    from gevent import monkey

    return monkey.get_original("select", "poll")()


class _StdoutWatch:
    """Ends the stream once our stdout's reader is gone (``gone`` tells the main loop
    that the reset which follows is ours, a normal end). Checked every
    STDOUT_CHECK_INTERVAL for the life of the stdio session (killed at its end)."""

    def __init__(self, fd: int, stream: Any) -> None:
        self.gone = False
        self._fd, self._stream = fd, stream
        self.greenlet = gevent.spawn(self._run)

    def _run(self) -> None:
        from remote_gevent.wire import mux_frames

        while not _reader_gone(self._fd):
            gevent.sleep(STDOUT_CHECK_INTERVAL)
        self.gone = True
        try:
            self._stream.close()
        except (mux_frames.MuxError, OSError):
            pass


class _NonBlocking:
    """Context manager: ``O_NONBLOCK`` on an fd, previous flags restored on exit."""

    def __init__(self, fd: int) -> None:
        self.fd = fd
        self.flags: Optional[int] = None

    def __enter__(self) -> "_NonBlocking":
        try:
            self.flags = fcntl.fcntl(self.fd, fcntl.F_GETFL)
            fcntl.fcntl(self.fd, fcntl.F_SETFL, self.flags | os.O_NONBLOCK)
        except OSError:
            self.flags = None
        return self

    def __exit__(self, *exc: Any) -> None:
        if self.flags is not None:
            try:
                fcntl.fcntl(self.fd, fcntl.F_SETFL, self.flags)
            except OSError:
                pass


def _write_all(fd: int, data: bytes) -> None:
    from gevent import os as gos

    view = memoryview(data)
    while view:
        n = gos.nb_write(fd, view)
        view = view[n:]


class _Reader:
    """Non-blocking reads of one descriptor with one io watcher for its whole life.

    ``gevent.os.nb_read`` makes a watcher per call (registered and dropped in the
    event loop each time) and, for an interactive byte, first tries a read that fails
    with EAGAIN. Here, after a read shorter than asked (a pipe or tty is then nearly
    always drained), we wait for readability first: per keystroke one wake-up and one
    ``read`` (issue 17, the added round trip through ``stdio``). A regular file is read
    straight on (it never blocks; epoll cannot watch it)."""

    def __init__(self, fd: int) -> None:
        self.fd = fd
        try:
            self._pollable = not stat.S_ISREG(os.fstat(fd).st_mode)
        except OSError:
            self._pollable = False
        self._watcher: Any = None
        self._drained = False

    def read(self, n: int) -> bytes:
        while True:
            if self._drained and self._pollable:
                self._wait()
            try:
                data = os.read(self.fd, n)
            except BlockingIOError:  # whatever fstat said: wait, never spin
                self._wait()
                continue
            self._drained = 0 < len(data) < n
            return data

    def _wait(self) -> None:
        hub = gevent.get_hub()
        if self._watcher is None:
            self._watcher = hub.loop.io(self.fd, 1)
        hub.wait(self._watcher)

    def close(self) -> None:
        if self._watcher is not None:
            self._watcher.close()
            self._watcher = None


def pump_stdin(fd: int, stream: Any) -> None:
    """stdin → stream, then the stream's EOF (half-close)."""
    from remote_gevent.wire import mux_frames

    reader = _Reader(fd)
    try:
        while True:
            data = reader.read(CHUNK)
            if not data:
                stream.shutdown_write()
                return
            stream.send(data)
    except (mux_frames.StreamReset, mux_frames.TunnelClosed):
        return
    except OSError:
        try:
            stream.close()
        except (mux_frames.MuxError, OSError):
            pass
    finally:
        reader.close()


def _pump_stdout(session: Any, target: str, stream: Any, fd: int, watch: _StdoutWatch,
                 err: Any) -> int:
    """stream → stdout until EOF; the exit code."""
    from remote_gevent.wire import mux_frames

    try:
        while True:
            chunk = stream.recv()
            if not chunk:
                return EXIT_OK
            _write_all(fd, chunk)
    except (mux_frames.StreamReset, mux_frames.TunnelClosed) as exc:
        if watch.gone:  # our own reset: nobody reads our stdout any more (a normal end)
            return EXIT_OK
        if not session.closed or session.exit_code:
            err.write("remote-gevent-console stdio: stream to %s lost: %s\n" % (target, exc))
        return EXIT_CONNECTION
    except OSError as exc:  # our stdout went away (ssh exited): abort the stream
        stream.close()
        if exc.errno in (errno.EPIPE, errno.EBADF):  # the reader is gone: not an error
            return EXIT_OK
        err.write("remote-gevent-console stdio: stdout: %s\n" % exc)
        return EXIT_CONNECTION


def run_stdio(session: Any, target: str, stdin_fd: int = 0, stdout_fd: int = 1,
              err: Any = None) -> int:
    """Open one stream to ``target`` and connect it to stdin/stdout; return the exit code."""

    from remote_gevent.wire import mux_frames

    err = err if err is not None else sys.stderr
    try:
        stream = session.open_stream(target)
    except mux_frames.StreamRefused as exc:
        raise ConsoleError("stream to %s refused by %s: %s%s" % (
            target, session.device, exc.code, " (%s)" % exc.reason if exc.reason else ""),
            EXIT_REFUSED, exc.code) from None
    except (mux_frames.MuxError, OSError) as exc:
        raise ConsoleError("cannot open a stream to %s: %s" % (target, exc), EXIT_CONNECTION,
                           "relay_lost") from None
    session.tunnel.on_link = None  # stderr stays quiet under ssh (resume or not)
    with _NonBlocking(stdin_fd), _NonBlocking(stdout_fd):
        up = gevent.spawn(pump_stdin, stdin_fd, stream)
        watch = _StdoutWatch(stdout_fd, stream)
        try:
            code = _pump_stdout(session, target, stream, stdout_fd, watch, err)
        finally:
            up.kill(block=False)
            watch.greenlet.kill(block=True)
        close_stdout(stdout_fd)
        up.join()
    return code
