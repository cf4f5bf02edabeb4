"""``stdio DEVICE host:port``: one stream on stdin/stdout (an ssh ``ProxyCommand``).

    ssh -o ProxyCommand='remote-gevent-console stdio %n 127.0.0.1:22' user@DEVICE

stdin and stdout are switched to non-blocking mode and read/written with
``gevent.os.nb_read`` / ``nb_write`` (they wait on the hub when the pipe is empty/full,
so both directions and the tunnel's own greenlets run concurrently); the original flags
are restored at the end (a terminal must not stay non-blocking). Regular files never
block and work too.

Half-close: EOF on stdin becomes the stream's EOF (the target sees a FIN, the other
direction keeps flowing); the stream's EOF closes our stdout (ssh sees EOF). We exit
when both directions are done, or at once when the stream or the tunnel is reset.
"""

from __future__ import annotations

import fcntl
import os
import sys
from typing import Any, Optional

import gevent

from remote_gevent.console.config import EXIT_CONNECTION, EXIT_OK, EXIT_REFUSED, ConsoleError
from remote_gevent.console.master import close_stdout

CHUNK = 65536


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


def pump_stdin(fd: int, stream: Any) -> None:
    """stdin → stream, then the stream's EOF (half-close)."""
    from gevent import os as gos

    from remote_gevent.wire import mux_frames

    try:
        while True:
            data = gos.nb_read(fd, CHUNK)
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
    with _NonBlocking(stdin_fd), _NonBlocking(stdout_fd):
        up = gevent.spawn(pump_stdin, stdin_fd, stream)
        code = EXIT_OK
        try:
            while True:
                chunk = stream.recv()
                if not chunk:
                    break
                _write_all(stdout_fd, chunk)
        except (mux_frames.StreamReset, mux_frames.TunnelClosed) as exc:
            if not session.closed or session.exit_code:
                err.write("remote-gevent-console stdio: stream to %s lost: %s\n" % (target, exc))
            code = EXIT_CONNECTION
            up.kill(block=False)
        except OSError as exc:  # our stdout went away (ssh exited): abort the stream
            stream.close()
            up.kill(block=False)
            if exc.errno not in (32, 9):  # EPIPE, EBADF: the reader is gone, not an error
                err.write("remote-gevent-console stdio: stdout: %s\n" % exc)
                code = EXIT_CONNECTION
        close_stdout(stdout_fd)
        up.join()
    return code
