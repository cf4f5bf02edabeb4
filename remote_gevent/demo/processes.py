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
    out = []
    try:
        with open(path) as f:
            for line in f:
                parts = line.split()
                if len(parts) == 2 and parts[1].isdigit():
                    out.append((parts[0], int(parts[1])))
    except OSError:
        pass
    return out



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
    for name, pid in _read_pids(os.path.join(directory, "pids")):
        if name == "platform" and _alive(pid) and _ours(pid):
            return pid
    return None
