"""ControlMaster / ControlPersist for the console: later commands reuse a running session.

A *master* (``remote-gevent-console master DEVICE``, or started in the background by
``stdio``/``forward --master auto``) holds one session to a device, requested for
``*:*`` plus any virtual target named (``@sftp``, ``@transfer``), and listens on
``<control_socket_dir>/<server_id>-<device>-<identity>.sock`` (:mod:`control_paths`:
the identity digests broker, operator, server id and device, so a console with another
config never rides this master). Each connection to that socket is one stream
(docs/console.md, "Session reuse"):

    client → master   OPEN host:port\\n          (or @sftp / @transfer; or WAIT\\n)
    master → client   OK\\n   |   ERR <code> <reason>\\n
    then raw bytes both ways; shutdown(SHUT_WR) on the socket ↔ EOF on the stream.

``WAIT`` (used by ``forward`` through a master) answers ``OK <session_id>\\n`` and
stays open until the tunnel ends, then sends ``CLOSED <code> <reason>\\n``.

Why it is shaped this way:

- **Cold start is the point** (issue 6): ``stdio`` runs once per ``ssh`` connection as a
  ProxyCommand. The client half of this module (:func:`fast_stdio` and what it calls)
  imports only the standard library's ``os``/``socket``/``selectors`` — no gevent, amqp,
  nacl, yaml or click — and ``console/cli.py`` calls it before its monkey patch.
- **Who may connect**: the directory is 0700 and must be ours, the socket 0600, and
  both ends check ``SO_PEERCRED`` (a client refuses a master of another uid too).
- **Exactly one master per socket**: a master holds an ``flock`` on ``<socket>.lock``
  for its whole life, so "stale" is decidable: a socket whose lock is free was left by
  a dead master (SIGKILL) and is replaced. Clients see such a socket as
  ``ECONNREFUSED`` and fall back to a session of their own.
- **ControlPersist**: the master exits ``persist`` seconds after its last client left
  (0: never), and at once when its tunnel ends; it removes its socket on the way out.
"""

from __future__ import annotations

import errno
import os
import re
import socket
import struct
import sys
from typing import Any, List, Optional, Tuple
from remote_gevent.console.control_paths import (  # noqa: F401  (re-exported)
    DEFAULT_CONFIG,
    ENV_CONFIG,
    ControlError,
    check_dir,
    config_socket,
    default_control_dir,
    ensure_dir,
    read_settings,
    settings_socket,
    socket_path,
)
from remote_gevent.wire.codes import (
    EXIT_CONNECTION,
    EXIT_ERROR,
    EXIT_OK,
    EXIT_REFUSED,
    EXIT_USAGE,
    VIRTUAL_TARGETS,
)

PROG = "remote-gevent-console"
#: Printed by a fast-path client that used a master, to stderr, when this is set (tests).
ENV_DEBUG = "REMOTE_GEVENT_CONSOLE_DEBUG_MODULES"

MODES = ("use", "auto", "no")
DEFAULT_MODE = "use"
DEFAULT_PERSIST = 600.0
SESSION_TARGETS = ("*:*",)
LINE_MAX = 1024
CHUNK = 65536
ANSWER_TIMEOUT = 60.0       # client: longest wait for OK/ERR (the agent's OPEN timeout is 30 s)
REQUEST_TIMEOUT = 10.0      # master: a client must send its request line within this
READY_TIMEOUT = 600.0       # auto start: bound on the wait for a new master (queue_wait)
IDLE_TICK = 0.5             # master: how often the persist deadline is checked

# ERR codes of the master itself (the agent's OPEN_FAIL codes pass through unchanged).
ERR_BAD_REQUEST = "bad_request"
ERR_NOT_PERMITTED = "permission_denied"
ERR_TUNNEL_CLOSED = "tunnel_closed"
ERR_OPEN_FAILED = "open_failed"
_FALLBACK_CODES = (ERR_TUNNEL_CLOSED, ERR_NOT_PERMITTED)


_DEVICE_RE = re.compile(r"^[A-Za-z0-9_-]{1,64}$")
_SIMPLE_TARGET_RE = re.compile(r"^[A-Za-z0-9_.-]{1,253}:[0-9]{1,5}$")
_TARGET_RE = re.compile(r"^[^\s\x00-\x1f]{1,300}$")


def _say(text: str) -> None:
    try:
        os.write(2, ("%s: %s\n" % (PROG, text)).encode("utf-8", "replace"))
    except OSError:
        pass


_PEERCRED = struct.Struct("3i")  # struct ucred: pid, uid, gid


def peer_cred(sock: Any) -> Tuple[int, int, int]:
    """``(pid, uid, gid)`` of the process at the other end of a Unix socket."""
    raw = sock.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, _PEERCRED.size)
    pid, uid, gid = _PEERCRED.unpack(raw)
    return pid, uid, gid


def peer_allowed(sock: Any, uid: Optional[int] = None) -> bool:
    """Whether the peer runs as ``uid`` (default: ours). Root is not special-cased."""
    try:
        return peer_cred(sock)[1] == (os.getuid() if uid is None else uid)
    except OSError:
        return False


# --------------------------------------------------------------------------- client


class _Fallback(Exception):
    """No usable master: the caller opens a session of its own."""


def _connect(path: str, timeout: Optional[float] = 5.0) -> socket.socket:
    """Connected socket to a live master of our uid, else _Fallback."""
    s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    s.settimeout(timeout)
    try:
        s.connect(path)
    except OSError:  # ENOENT: none; ECONNREFUSED: stale (master killed); EACCES: not ours
        s.close()
        raise _Fallback() from None
    if not peer_allowed(s):
        s.close()
        _say("control socket %s is served by another user; ignored" % path)
        raise _Fallback()
    return s


def _request(s: socket.socket, line: str) -> Tuple[str, bytes]:
    """Send one request line; return (answer line, bytes already received after it)."""
    s.sendall(line.encode("utf-8") + b"\n")
    buf = b""
    while b"\n" not in buf:
        try:
            chunk = s.recv(CHUNK)
        except OSError:
            chunk = b""
        if not chunk:
            raise _Fallback()  # master died between accept and answer
        buf += chunk
        if len(buf) > LINE_MAX and b"\n" not in buf[:LINE_MAX]:
            raise _Fallback()
    answer, rest = buf.split(b"\n", 1)
    return answer.decode("utf-8", "replace"), rest


def parse_err(answer: str) -> Tuple[str, str]:
    parts = answer.split(" ", 2)
    return (parts[1] if len(parts) > 1 else "error"), (parts[2] if len(parts) > 2 else "")


def close_stdout(fd: int) -> None:
    """EOF for whoever reads our stdout, keeping ``fd`` valid (-> /dev/null).

    Kept here, free of gevent, because the fast ``stdio`` path imports this module."""
    try:
        null = os.open(os.devnull, os.O_WRONLY)
    except OSError:
        return
    try:
        os.dup2(null, fd)
    except OSError:
        pass
    finally:
        os.close(null)


def _write_all(fd: int, data: bytes) -> None:
    view = memoryview(data)
    while view:
        view = view[os.write(fd, view):]


def pump(s: socket.socket, first: bytes, stdin_fd: int = 0, stdout_fd: int = 1) -> int:
    """stdin → socket, socket → stdout, half-close both ways; blocking fds, one selector."""
    import selectors

    s.settimeout(None)
    # poll, not epoll: epoll refuses regular files (``stdio … < file``).
    sel = getattr(selectors, "PollSelector", selectors.DefaultSelector)()
    try:
        if first:
            _write_all(stdout_fd, first)
        try:
            sel.register(stdin_fd, selectors.EVENT_READ)
        except (OSError, ValueError):
            s.shutdown(socket.SHUT_WR)  # no usable stdin (closed): EOF at once
        sel.register(s, selectors.EVENT_READ)
        while sel.get_map():
            for key, _ in sel.select():
                if key.fileobj is s:
                    try:
                        data = s.recv(CHUNK)
                    except OSError as exc:
                        _say("stdio: master connection lost: %s" % exc)
                        return EXIT_CONNECTION
                    if not data:
                        sel.unregister(s)  # stdin keeps flowing (half-close)
                        close_stdout(stdout_fd)
                        continue
                    try:
                        _write_all(stdout_fd, data)
                    except OSError as exc:  # our reader (ssh) went away
                        if exc.errno not in (errno.EPIPE, errno.EBADF):
                            _say("stdio: stdout: %s" % exc)
                            return EXIT_CONNECTION
                        return EXIT_OK
                else:
                    try:
                        data = os.read(stdin_fd, CHUNK)
                    except OSError:
                        data = b""
                    if data:
                        try:
                            s.sendall(data)
                        except OSError as exc:
                            _say("stdio: master connection lost: %s" % exc)
                            return EXIT_CONNECTION
                        continue
                    sel.unregister(stdin_fd)
                    try:
                        s.shutdown(socket.SHUT_WR)
                    except OSError:
                        pass
        return EXIT_OK
    finally:
        sel.close()
        s.close()


def open_via_master(path: str, target: str) -> Tuple[socket.socket, bytes]:
    """Connect and ``OPEN target``: (socket, early bytes); _Fallback or ControlRefused."""
    s = _connect(path, timeout=ANSWER_TIMEOUT)
    try:
        answer, rest = _request(s, "OPEN %s" % target)
    except socket.timeout:
        s.close()
        raise _Fallback() from None
    except BaseException:
        s.close()
        raise
    if answer == "OK":
        return s, rest
    s.close()
    code, reason = parse_err(answer) if answer.startswith("ERR") else (ERR_OPEN_FAILED, answer)
    if code in _FALLBACK_CODES:
        raise _Fallback()
    raise ControlRefused(code, reason)


class ControlRefused(Exception):
    """The master answered ``ERR code reason`` (a refusal by the agent, usually)."""

    def __init__(self, code: str, reason: str) -> None:
        super().__init__("%s%s" % (code, " (%s)" % reason if reason else ""))
        self.code = code
        self.reason = reason


#: :func:`stdio_via_master`: a master runs, but its session lacks the virtual target
#: asked for (``ssh`` started it, now ``sftp`` wants ``@sftp``): use an own session.
OWN_SESSION = -1


def stdio_via_master(path: str, device: str, target: str) -> Optional[int]:
    """Run ``stdio`` through the master at ``path``: exit code, None (no master) or
    :data:`OWN_SESSION`."""
    try:
        s, rest = open_via_master(path, target)
    except _Fallback:
        return None
    except ControlRefused as exc:
        if exc.code == "target_not_permitted" and target in VIRTUAL_TARGETS:
            return OWN_SESSION  # that master's session was not opened for this target
        _say("stream to %s refused by %s: %s" % (target, device, exc))
        return EXIT_USAGE if exc.code == ERR_BAD_REQUEST else EXIT_REFUSED
    if os.environ.get(ENV_DEBUG):
        _say("debug: via master %s; modules: %s" % (path, " ".join(sorted(sys.modules))))
    return pump(s, rest)


# --------------------------------------------------------------------------- auto start


def stop_master(path: str) -> bool:
    """Ask the master at ``path`` to exit (``master --stop``); False if none answered."""
    try:
        s = _connect(path)
    except _Fallback:
        return False
    try:
        answer, _ = _request(s, "STOP")
    except (_Fallback, OSError):
        return False
    finally:
        s.close()
    return answer == "OK"


def master_argv(config_path: str, device: str, persist: float, targets: List[str]) -> List[str]:
    return [sys.executable, "-m", "remote_gevent.console.cli", "-c", config_path, "master",
            device, "--persist", "%g" % persist] + targets


def start_background(config_path: str, device: str, path: str, persist: float,
                     targets: List[str]) -> Tuple[int, str]:
    """Start a detached master and wait until it listens: ``(0, "")`` or (exit code, message).

    Its stderr goes to ``<socket>.log``. A master that finds another one already
    running reports success (the socket is usable).
    """
    import subprocess

    directory = os.path.dirname(path)
    try:
        ensure_dir(directory)
    except ControlError as exc:
        return EXIT_ERROR, str(exc)
    r, w = os.pipe()
    try:
        log = os.open(path[:-len(".sock")] + ".log",
                      os.O_WRONLY | os.O_CREAT | os.O_APPEND | os.O_CLOEXEC, 0o600)
    except OSError:
        log = os.open(os.devnull, os.O_WRONLY | os.O_CLOEXEC)
    try:
        subprocess.Popen(master_argv(config_path, device, persist, targets) + [
            "--ready-fd", str(w)], stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
            stderr=log, pass_fds=(w,), close_fds=True, start_new_session=True)
    except OSError as exc:
        os.close(r)
        return EXIT_ERROR, "cannot start a master: %s" % exc
    finally:
        os.close(w)
        os.close(log)
    data = b""
    try:
        while b"\n" not in data:
            chunk = os.read(r, 4096)
            if not chunk:
                break
            data += chunk
    finally:
        os.close(r)
    line = data.split(b"\n", 1)[0].decode("utf-8", "replace")
    if line == "OK":
        return 0, ""
    if line.startswith("ERR "):
        code_s, _, message = line[4:].partition(" ")
        return int(code_s) if code_s.isdigit() else EXIT_ERROR, message
    return EXIT_ERROR, "the master exited before listening (see %s.log)" % path[:-len(".sock")]


def auto_targets(target: str) -> List[str]:
    """Extra session targets of an auto-started master (virtual ones are not in ``*:*``)."""
    return [target] if target.startswith("@") else []


def run_stdio_client(path: str, device: str, target: str, mode: str, config_path: str,
                     persist: float) -> Optional[int]:
    """``stdio`` by way of a master (mode ``use``/``auto``): exit code, or None."""
    if mode == "no":
        return None
    code = stdio_via_master(path, device, target)
    if code == OWN_SESSION:
        return None
    if code is not None or mode != "auto":
        return code
    started, message = start_background(config_path, device, path, persist,
                                        auto_targets(target))
    if started:
        _say(message)
        return started
    code = stdio_via_master(path, device, target)
    return None if code == OWN_SESSION else code


# --------------------------------------------------------------------------- fast path


def _parse_fast_argv(args: List[str]) -> Optional[Tuple[Optional[str], str, str, Optional[str]]]:
    """``[-c PATH] [-v…] stdio [--master MODE] DEVICE TARGET`` → (config, device, target, mode)."""
    config: Optional[str] = None
    mode: Optional[str] = None
    i = 0
    while i < len(args) and args[i] != "stdio":
        a = args[i]
        if a in ("-c", "--config") and i + 1 < len(args):
            config = args[i + 1]
            i += 2
            continue
        if a.startswith("--config="):
            config = a[len("--config="):]
        elif a.startswith("-c") and len(a) > 2:
            config = a[2:]
        elif not re.match(r"^-v+$|^--verbose$", a):
            return None
        i += 1
    rest = args[i + 1:]
    if i >= len(args):
        return None
    positional: List[str] = []
    j = 0
    while j < len(rest):
        a = rest[j]
        if a == "--master" and j + 1 < len(rest):
            mode = rest[j + 1]
            j += 2
            continue
        if a.startswith("--master="):
            mode = a[len("--master="):]
        elif a.startswith("-"):
            return None
        else:
            positional.append(a)
        j += 1
    if len(positional) != 2 or (mode is not None and mode not in MODES):
        return None
    device, target = positional
    if not _DEVICE_RE.match(device):
        return None
    if target not in VIRTUAL_TARGETS:
        if not _SIMPLE_TARGET_RE.match(target) or not 0 < int(target.rsplit(":", 1)[1]) < 65536:
            return None  # IPv6 and other forms are normalized by the full path
    return config, device, target, mode


def fast_stdio(argv: List[str]) -> Optional[int]:
    """The import-light ``stdio``: an exit code if a master served it, else None.

    Called by ``console/cli.py`` before gevent is imported; anything it does not
    understand (other commands, unusual options, a config it cannot read cheaply, no
    master running) returns None and the full command line takes over.
    """
    parsed = _parse_fast_argv(argv[1:])
    if parsed is None:
        return None
    config, device, target, mode = parsed
    settings = read_settings(config)
    if settings is None:
        return None
    mode = mode or DEFAULT_MODE
    path = settings_socket(settings, device)
    if path is None:
        return None
    if mode == "use" and not os.path.exists(path):
        return None
    return run_stdio_client(path, device, target, mode, settings["_path"], DEFAULT_PERSIST)


def is_console_entry(argv0: str) -> bool:
    """Whether this process runs the console's command line (script or ``-m``)."""
    base = os.path.basename(argv0)
    return base == PROG or argv0.endswith(os.path.join("console", "cli.py"))


# --------------------------------------------------------------------------- master (gevent)

