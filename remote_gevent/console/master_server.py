"""The console master (gevent): one session to a device held open, serving stdio
streams to local clients over a private unix socket (``console master``); the client
side and the fast path live in :mod:`master`, which imports nothing heavy."""

from __future__ import annotations

import errno
import os
import socket
import sys
from typing import Any, Optional
from remote_gevent.wire.codes import (
    EXIT_OK,
)
from remote_gevent.console.master import (
    CHUNK,
    ControlError,
    ERR_BAD_REQUEST,
    ERR_NOT_PERMITTED,
    ERR_TUNNEL_CLOSED,
    IDLE_TICK,
    LINE_MAX,
    PROG,
    REQUEST_TIMEOUT,
    _TARGET_RE,
    ensure_dir,
    peer_allowed,
    peer_cred,
)


class Master:
    """Serve one :class:`~remote_gevent.console.session.ConsoleSession` on a Unix socket.

    Gevent-based (the caller has monkey-patched). ``serve()`` returns an exit code once
    the tunnel ended, the persist time ran out without clients, or :meth:`stop`.
    """

    def __init__(self, path: str, persist: float, err: Any = None) -> None:
        import gevent.event

        self.session: Any = None  # set once lock() succeeded and the session is up
        self.path = path
        self.persist = persist
        self.err = err if err is not None else sys.stderr
        self.clients = 0
        self.served = 0
        self.listener: Optional[socket.socket] = None
        self._lock_fd: Optional[int] = None
        self._ino: Optional[int] = None
        self._stop = gevent.event.Event()
        self.reason = ""

    # -- socket life cycle ----------------------------------------------------

    def lock(self) -> bool:
        """Take ``<socket>.lock`` (held for life); False if another master holds it."""
        return self._lock_fd is not None or self._take_lock()

    def _take_lock(self) -> bool:
        import fcntl

        lock_path = self.path + ".lock"
        ensure_dir(os.path.dirname(self.path))
        for _ in range(10):
            fd = os.open(lock_path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except OSError as exc:
                os.close(fd)
                if exc.errno in (errno.EWOULDBLOCK, errno.EAGAIN):
                    return False
                raise
            try:
                same = os.fstat(fd).st_ino == os.stat(lock_path).st_ino
            except FileNotFoundError:
                same = False
            if same:
                self._lock_fd = fd
                return True
            os.close(fd)  # the previous master removed the file while we waited: retry
        raise ControlError("cannot lock %s" % lock_path)

    def bind(self) -> None:
        """Listen on the socket path, replacing a stale socket (we hold the lock)."""
        assert self._lock_fd is not None, "lock() first"
        try:
            os.unlink(self.path)  # stale: its master is dead, or the lock would be held
        except FileNotFoundError:
            pass
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        old = os.umask(0o177)
        try:
            sock.bind(self.path)
        except OSError:
            sock.close()
            raise
        finally:
            os.umask(old)
        os.chmod(self.path, 0o600)
        sock.listen(64)
        self._ino = os.stat(self.path).st_ino
        self.listener = sock

    def cleanup(self) -> None:
        """Remove our socket (only if still ours) and release the lock."""
        if self.listener is not None:
            self.listener.close()
            self.listener = None
        if self._ino is not None:
            try:
                if os.stat(self.path).st_ino == self._ino:
                    os.unlink(self.path)
            except OSError:
                pass
            self._ino = None
        if self._lock_fd is not None:
            try:
                os.unlink(self.path + ".lock")
            except OSError:
                pass
            os.close(self._lock_fd)
            self._lock_fd = None

    # -- serving --------------------------------------------------------------

    def stop(self, reason: str = "stopped") -> None:
        if not self._stop.is_set():
            self.reason = reason
            self._stop.set()

    def serve(self) -> int:
        import time

        import gevent
        import gevent.pool

        assert self.listener is not None, "bind() first"
        group = gevent.pool.Group()
        group.spawn(self._accept_loop, group)
        waiter = gevent.spawn(self._wait_tunnel)
        idle_since = time.monotonic()
        try:
            while not self._stop.wait(IDLE_TICK):
                now = time.monotonic()
                if self.clients:
                    idle_since = now
                elif self.persist > 0 and now - idle_since >= self.persist:
                    self.stop("no client for %gs (persist)" % self.persist)
        finally:
            if self.listener is not None:
                self.listener.close()
            self.cleanup()
            waiter.kill(block=False)
            group.kill(block=True, timeout=2.0)
        return self.session.exit_code if self.session.closed else EXIT_OK

    def _wait_tunnel(self) -> None:
        code, reason = self.session.wait()
        self.stop("tunnel ended: %s (%s)" % (code, reason))

    def _accept_loop(self, group: Any) -> None:
        import gevent

        delay = 0.01
        while not self._stop.is_set():
            listener = self.listener
            if listener is None:
                return
            try:
                conn, _ = listener.accept()
            except OSError as exc:
                if self._stop.is_set() or self.listener is None:
                    return
                self.err.write("%s: master: accept: %s\n" % (PROG, exc))
                gevent.sleep(delay)
                delay = min(1.0, delay * 2)
                continue
            delay = 0.01
            self.clients += 1
            group.spawn(self._client, conn)

    def _client(self, conn: socket.socket) -> None:
        try:
            self._serve_client(conn)
        finally:
            self.clients -= 1
            try:
                conn.close()
            except OSError:
                pass

    def _serve_client(self, conn: socket.socket) -> None:
        import gevent

        from remote_gevent.wire import mux_frames

        if not peer_allowed(conn):
            _send_quietly(conn, b"ERR %s only uid %d may use this socket\n"
                          % (ERR_NOT_PERMITTED.encode(), os.getuid()))
            return
        buf = b""
        with gevent.Timeout(REQUEST_TIMEOUT, False):
            while b"\n" not in buf and len(buf) <= LINE_MAX:
                chunk = conn.recv(CHUNK)
                if not chunk:
                    return
                buf += chunk
        if b"\n" not in buf:
            _send_quietly(conn, b"ERR %s no request line\n" % ERR_BAD_REQUEST.encode())
            return
        line, rest = buf.split(b"\n", 1)
        verb, _, arg = line.decode("utf-8", "replace").rstrip("\r").partition(" ")
        if verb == "WAIT" and not arg:
            self._serve_wait(conn)
            return
        if verb == "STOP" and not arg:
            _send_quietly(conn, b"OK\n")
            self.stop("stopped by a client (pid %d)" % peer_cred(conn)[0])
            return
        if verb != "OPEN" or not _TARGET_RE.match(arg):
            _send_quietly(conn, b"ERR %s expected OPEN host:port\n" % ERR_BAD_REQUEST.encode())
            return
        try:
            stream = self.session.open_stream(arg)
        except mux_frames.StreamRefused as exc:
            _send_quietly(conn, ("ERR %s %s\n" % (exc.code, _one_line(exc.reason))).encode())
            return
        except (mux_frames.MuxError, OSError) as exc:
            _send_quietly(conn, ("ERR %s %s\n" % (ERR_TUNNEL_CLOSED, _one_line(str(exc))))
                          .encode())
            return
        self.served += 1
        try:
            conn.sendall(b"OK\n")
            if rest:
                stream.send(rest)
        except (mux_frames.MuxError, OSError):
            stream.close()
            return
        self.session.tunnel.splice(stream, conn)

    def _serve_wait(self, conn: socket.socket) -> None:
        """``WAIT``: hold the connection (a client, for persist) until the tunnel ends."""
        import gevent

        try:
            conn.sendall(("OK %s\n" % self.session.session_id).encode())
        except OSError:
            return
        reader = gevent.spawn(_drain, conn)  # the client closing ends the wait
        try:
            gevent.wait([reader, self._stop], count=1)
        finally:
            reader.kill(block=False)
        if self.session.closed:
            code = self.session.tunnel.close_code or "normal"
            reason = self.session.tunnel.close_reason or code
            _send_quietly(conn, ("CLOSED %s %s\n" % (code, _one_line(reason))).encode())


def _drain(conn: socket.socket) -> None:
    try:
        while conn.recv(CHUNK):
            pass
    except OSError:
        pass


def _one_line(text: str) -> str:
    return " ".join(str(text).split())[:400]


def _send_quietly(conn: socket.socket, data: bytes) -> None:
    try:
        conn.sendall(data)
    except OSError:
        pass
