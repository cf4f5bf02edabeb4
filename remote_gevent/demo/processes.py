"""Process and file helpers of the demo platform: children that die with their parent,
how to run an entry point, waiting for a port, terminating by pid, the pids file, and
whether a pid is still one of ours."""

from __future__ import annotations

if __name__ == "__main__":  # run as a program: patch before socket/ssl/amqp load
    from gevent import monkey

    monkey.patch_all()

# ruff: noqa: E402  (imports follow the monkey patch when run as a program)

import ctypes
import logging
import os
import signal
import socket
import subprocess
import sys
from typing import Any, Dict, List, Optional, Tuple


from remote_gevent.common import fsutil
from remote_gevent.demo import rabbit as demo_rabbit

log = logging.getLogger("remote_gevent.demo.platform")


PR_SET_PDEATHSIG = 1


def die_with_parent() -> None:  # pragma: no cover - runs in the child between fork and exec
    """Child dies with us (SIGTERM) even if we are SIGKILLed: no stray agent or relay."""
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        libc.prctl(PR_SET_PDEATHSIG, signal.SIGTERM, 0, 0, 0)
    except (OSError, AttributeError):
        pass


def entry_argv(script: str, module: str) -> List[str]:
    """The command running ``script`` with *this* interpreter and *this* package.

    The console script next to ``sys.executable`` when installed there, else
    ``python -m module`` (the package is then found through ``PYTHONPATH``/cwd).
    """
    candidate = os.path.join(os.path.dirname(sys.executable), script)
    if os.access(candidate, os.X_OK):
        return [candidate]
    return [sys.executable, "-m", module]


def port_open(host: str, port: int, timeout: float = 0.5) -> bool:
    try:
        with socket.create_connection((host, port), timeout=timeout):
            return True
    except OSError:
        return False


def _tail(path: str, size: int = 2000) -> str:
    try:
        with open(path, "rb") as f:
            f.seek(0, os.SEEK_END)
            f.seek(max(0, f.tell() - size))
            return f.read().decode("utf-8", "replace")
    except OSError:
        return ""


def _write_text(path: str, text: str, mode: int = 0o644) -> None:
    fsutil.write_atomic(path, text, mode)


def _deep_merge(base: Dict[str, Any], extra: Optional[Dict[str, Any]]) -> Dict[str, Any]:
    out = dict(base)
    for k, v in (extra or {}).items():
        if isinstance(v, dict) and isinstance(out.get(k), dict):
            out[k] = _deep_merge(out[k], v)
        else:
            out[k] = v
    return out


def _user_defs(vhost: str, user: str, password: str, perms: Dict[str, Any]
               ) -> Dict[str, List[Dict[str, Any]]]:
    return {
        "users": [{"name": user, "password_hash": demo_rabbit.rabbit_password_hash(password),
                   "hashing_algorithm": "rabbit_password_hashing_sha256", "tags": [],
                   "limits": {}}],
        "permissions": [{"user": user, "vhost": vhost, "configure": perms["configure"],
                         "write": perms["write"], "read": perms["read"]}],
        "topic_permissions": [dict(tp, user=user, vhost=vhost) for tp in perms["topic"]],
    }


def _terminate(proc: Optional[subprocess.Popen], sig: int, timeout: float) -> Optional[int]:
    """Signal a process (its whole group), wait ``timeout``, then SIGKILL the group."""
    if proc is None:
        return None
    if proc.poll() is None:
        try:
            os.killpg(proc.pid, sig)
        except OSError:
            pass
        try:
            proc.wait(timeout)
        except subprocess.TimeoutExpired:
            log.warning("pid %d did not end within %.0f s of signal %d: killing it",
                        proc.pid, timeout, sig)
    try:
        os.killpg(proc.pid, signal.SIGKILL)  # stragglers of its group, if any
    except OSError:
        pass
    return proc.wait(10.0)


def _read_pids(path: str) -> List[Tuple[str, int]]:
    """``(name, pid)`` of the pids file (see :func:`read_entries`)."""
    return [(name, pid) for name, pid, _ in read_entries(path)]


def _alive(pid: int) -> bool:
    try:
        with open("/proc/%d/stat" % pid) as f:
            state = f.read().rsplit(")", 1)[-1].split()[0]
        return state != "Z"
    except (OSError, IndexError):
        try:
            os.kill(pid, 0)
        except ProcessLookupError:
            return False
        except PermissionError:
            return True
        return True


def _ours(pid: int) -> bool:
    """Does ``pid`` still run one of our programs (not a recycled pid)?"""
    try:
        with open("/proc/%d/cmdline" % pid, "rb") as f:
            cmd = f.read().decode("utf-8", "replace")
    except OSError:
        return False
    return any(word in cmd for word in ("remote_gevent", "remote-gevent", "rabbit", "beam",
                                        "epmd", "erl"))

def _running_platform(directory: str) -> Optional[int]:
    for name, pid, started in read_entries(os.path.join(directory, "pids")):
        if name == "platform" and still_ours(pid, started):
            return pid
    return None


def say(text: str) -> None:
    """Print for the user; a closed terminal (SIGHUP, EIO) must not stop the teardown."""
    try:
        print(text, flush=True)
    except (OSError, ValueError):
        pass


# --------------------------------------------------------------------------- previous runs
#
# A pid alone is not an identity: a pid recorded by a run killed hours ago may name an
# unrelated process now. Each ``DIR/pids`` line therefore carries the process's start
# time (``/proc/<pid>/stat`` field 22, clock ticks since boot): a pid is ours only while
# the process it names still has that start time.


def start_time(pid: int) -> Optional[int]:
    """The start time of ``pid`` (clock ticks since boot), None if it does not exist."""
    try:
        with open("/proc/%d/stat" % pid) as f:
            fields = f.read().rsplit(")", 1)[1].split()
        return int(fields[19])  # field 22 of stat; the list starts at field 3
    except (OSError, IndexError, ValueError):
        return None


Entry = Tuple[str, int, Optional[int]]


def read_entries(path: str) -> List[Entry]:
    """``DIR/pids`` lines ``name pid [start_time]``."""
    out: List[Entry] = []
    try:
        with open(path) as f:
            for line in f:
                parts = line.split()
                if len(parts) in (2, 3) and all(p.isdigit() for p in parts[1:]):
                    out.append((parts[0], int(parts[1]),
                                int(parts[2]) if len(parts) == 3 else None))
    except OSError:
        pass
    return out


def format_entries(entries: List[Tuple[str, int]]) -> str:
    return "".join("%s %d %s\n" % (name, pid, start_time(pid) or 0) for name, pid in entries)


def still_ours(pid: int, started: Optional[int]) -> bool:
    """``pid`` runs and is the process recorded (same start time; else: our programs)."""
    if pid <= 1 or pid == os.getpid() or not _alive(pid):
        return False
    if started:
        return start_time(pid) == started
    return _ours(pid)


def end_process(pid: int, started: Optional[int], grace: float = 5.0) -> None:
    """SIGTERM the process group of ``pid`` (its own session), then SIGKILL after ``grace``."""
    import time

    for sig in (signal.SIGTERM, signal.SIGKILL):
        if not still_ours(pid, started):
            return
        try:
            os.killpg(pid, sig)
        except OSError:
            try:
                os.kill(pid, sig)
            except OSError:
                return
        end = time.monotonic() + grace
        while still_ours(pid, started) and time.monotonic() < end:
            time.sleep(0.05)


def end_leftovers(entries: List[Entry], say: Any = None, grace: float = 5.0) -> List[str]:
    """End every recorded process but the supervisor that still runs; their names."""
    ended = []
    for name, pid, started in entries:
        if name == "platform" or not still_ours(pid, started):
            continue
        if say is not None:
            say("demo: %s (pid %d) still running: ending it" % (name, pid))
        end_process(pid, started, grace)
        ended.append(name)
    return ended


def reap_previous(directory: str, say: Any = None) -> List[str]:
    """Before a start: end what a dead supervisor's run left (its pids file lists it)."""
    pids_file = os.path.join(directory, "pids")
    entries = read_entries(pids_file)
    if any(n == "platform" and still_ours(p, s) for n, p, s in entries):
        return []  # a live platform: the caller refuses to start
    ended = end_leftovers(entries, say)
    try:
        os.unlink(pids_file)
    except OSError:
        pass
    return ended


class Watchdog:
    """A small process (``python -m remote_gevent.demo.watchdog``, own session) that ends
    the processes we tell it about as soon as we die, however we die (SIGKILL included):
    it reads ``name pid start`` lines from a pipe whose only write end we hold, and the
    kernel closes that end with our last breath. The broker needs it: PR_SET_PDEATHSIG
    does not reach the Erlang VM (started through a shell script) nor its epmd."""

    def __init__(self, log_path: str) -> None:
        read_end, self._write_end = os.pipe()  # both non-inheritable: children never hold it
        try:
            with open(log_path, "ab") as log_file:
                self.proc = subprocess.Popen(
                    [sys.executable, "-m", "remote_gevent.demo.watchdog"], stdin=read_end,
                    stdout=log_file, stderr=subprocess.STDOUT, start_new_session=True)
        except OSError:
            os.close(self._write_end)
            raise
        finally:
            os.close(read_end)

    def track(self, name: str, pid: int) -> None:
        try:
            os.write(self._write_end, ("%s %d %d\n" % (name, pid, start_time(pid) or 0))
                     .encode())
        except OSError as exc:  # the watchdog died: nothing else to do than say it
            log.warning("demo watchdog: cannot track %s (pid %d): %s", name, pid, exc)

    def close(self, timeout: float = 15.0) -> None:
        """Orderly end (after our own teardown): EOF, it checks and exits."""
        if self._write_end >= 0:
            os.close(self._write_end)
            self._write_end = -1
        try:
            self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait(5.0)


def stop_detached(directory: str, timeout: float = 60.0) -> int:
    """``--stop``: SIGTERM the platform supervisor, wait; end what ``pids`` still lists
    (a supervisor killed by SIGKILL left them: only the recorded processes, checked by
    their start time)."""
    import time

    pids_file = os.path.join(directory, "pids")
    entries = read_entries(pids_file)
    if not entries:
        print("demo: no platform running in %s (no %s)" % (directory, pids_file))
        return 1
    for name, pid, started in entries:
        if name == "platform" and still_ours(pid, started):
            os.kill(pid, signal.SIGTERM)
            deadline = time.monotonic() + timeout
            while still_ours(pid, started) and time.monotonic() < deadline:
                time.sleep(0.1)
    end_leftovers(entries, say=print)
    try:
        os.unlink(pids_file)
    except OSError:
        pass
    print("demo: platform in %s stopped" % directory)
    return 0
