"""Daemonization and pidfile handling.

``daemonize()`` is the classic double fork (fork, setsid, fork; chdir /, umask 022,
stdio on /dev/null) with one addition: the original process waits, on a pipe,
until the daemon says it is ready (pidfile written) or failed, so that the
command that started it (the init script) exits 0 only for a running daemon and
otherwise prints the reason and exits 1.

Pidfile rules (as in gunicorn): written atomically; a pidfile naming a live
process refuses the start (EPERM from ``kill(pid, 0)`` means alive); a stale one
is replaced; at exit it is removed only if it still holds our pid.
"""

import errno
import os
import sys
import time
from typing import Optional

import gevent
from gevent import monkey

from remote_gevent.common import fsutil

READY_TIMEOUT = 30.0  # seconds the launching process waits for the daemon


def _original(module: str, name: str):  # type: ignore[no-untyped-def]
    """The unpatched function: the launcher must not depend on gevent's child watcher.

    gevent's cooperative ``fork``/``waitpid`` track children through a SIGCHLD
    watcher; a short-lived intermediate child can exit before it is armed and the
    cooperative ``waitpid`` then never returns.  Daemonizing uses the plain calls
    and re-initialises the hub itself (``gevent.reinit()``) in each child.
    """
    return monkey.get_original(module, name)


class PidfileError(Exception):
    """The pidfile names a running process, or cannot be written."""


def read_pid(path: str) -> Optional[int]:
    """The pid in ``path``, or None if the file is missing or does not hold a pid."""
    try:
        with open(path) as fh:
            text = fh.read(64).strip()
    except FileNotFoundError:
        return None
    except OSError:
        return None
    if not text.isdigit() or int(text) <= 0:
        return None
    return int(text)


def pid_alive(pid: int) -> bool:
    """True if a process ``pid`` exists (EPERM: it exists but is not ours)."""
    if pid <= 0:
        return False
    try:
        os.kill(pid, 0)
    except OSError as exc:
        if exc.errno == errno.ESRCH:
            return False
        if exc.errno == errno.EPERM:
            return True
        raise
    return True


def running_pid(path: str) -> Optional[int]:
    """The pid named by the pidfile if that process is alive, else None."""
    pid = read_pid(path)
    if pid is not None and pid != os.getpid() and pid_alive(pid):
        return pid
    return None


def check_pidfile(path: str) -> None:
    """Raise PidfileError if the pidfile names a live process (other than us)."""
    pid = running_pid(path)
    if pid is not None:
        raise PidfileError("already running as pid %d (pidfile %s)" % (pid, path))


def write_pidfile(path: str, pid: Optional[int] = None) -> None:
    """Atomically write ``pid`` (default: ours) to ``path``; refuse if a live pid is there."""
    check_pidfile(path)
    pid = os.getpid() if pid is None else pid
    try:
        fsutil.write_atomic(path, "%d\n" % pid, 0o644)
    except OSError as exc:
        raise PidfileError("cannot write pidfile %s: %s" % (path, exc.strerror or exc)) from None

def remove_pidfile(path: str, pid: Optional[int] = None) -> bool:
    """Remove ``path`` only if it still holds ``pid`` (default: ours). True if removed."""
    pid = os.getpid() if pid is None else pid
    if read_pid(path) != pid:
        return False
    try:
        os.unlink(path)
    except FileNotFoundError:
        return False
    return True


def _redirect_stdio() -> None:
    devnull = os.open(os.devnull, os.O_RDWR)
    for fd in (0, 1, 2):
        os.dup2(devnull, fd)
    if devnull > 2:
        os.close(devnull)


class Readiness:
    """The daemon's side of the readiness pipe: ``ok()`` or ``fail(message)`` once."""

    def __init__(self, fd: int) -> None:
        self._fd = fd

    def _send(self, data: bytes) -> None:
        if self._fd < 0:
            return
        try:
            os.write(self._fd, data)
        except OSError:
            pass
        finally:
            os.close(self._fd)
            self._fd = -1

    def ok(self) -> None:
        self._send(b"OK\n")

    def fail(self, message: str) -> None:
        self._send(("ERR %s\n" % message).encode("utf-8", "replace"))


def _wait_ready(fd: int, timeout: float) -> int:
    """In the launching process: relay the daemon's verdict as an exit status."""
    data = b""
    deadline = time.monotonic() + timeout
    eof = False
    while not data.endswith(b"\n"):
        left = deadline - time.monotonic()
        if left <= 0:
            break
        ready, _, _ = _original("select", "select")([fd], [], [], min(left, 1.0))
        if ready:
            chunk = os.read(fd, 4096)
            if not chunk:
                eof = True
                break
            data += chunk
    os.close(fd)
    text = data.decode("utf-8", "replace").strip()
    if text == "OK":
        return 0
    if text.startswith("ERR "):
        sys.stderr.write("remote-gevent: %s\n" % text[4:])
    elif eof:
        sys.stderr.write("remote-gevent: the daemon exited before it was ready (see its log)\n")
    else:
        sys.stderr.write("remote-gevent: the daemon did not report ready within %gs\n"
                         % timeout)
    return 1


def daemonize(ready_timeout: float = READY_TIMEOUT) -> "Readiness":
    """Double fork; returns (in the daemon) the Readiness to report to the launcher.

    The launching process never returns: it exits 0 once the daemon calls ``ok()``,
    1 if it calls ``fail()``, dies, or stays silent for ``ready_timeout`` seconds.
    Call before any greenlet or thread is started.
    """
    sys.stdout.flush()
    sys.stderr.flush()
    fork = _original("os", "fork")
    rfd, wfd = os.pipe()
    pid = fork()
    if pid > 0:  # launcher
        os.close(wfd)
        code = _wait_ready(rfd, ready_timeout)
        try:
            _original("os", "waitpid")(pid, 0)  # the intermediate child exits at once
        except ChildProcessError:
            pass
        os._exit(code)
    gevent.reinit()
    os.close(rfd)
    os.setsid()
    pid = fork()
    if pid > 0:  # intermediate session leader: let the grandchild be reparented
        os._exit(0)
    gevent.reinit()
    os.chdir("/")
    os.umask(0o022)
    _redirect_stdio()
    return Readiness(wfd)
