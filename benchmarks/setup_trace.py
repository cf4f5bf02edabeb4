"""Timestamps of the session set-up path in console, relay and agent (benchmark only).

``python benchmarks/bench_setup.py --trace`` writes a ``sitecustomize.py`` that calls
:func:`install` into a directory it puts first on the children's ``PYTHONPATH``: every
process of the platform then wraps the functions of :data:`POINTS` as their modules are
imported (an import hook, so nothing is imported earlier than the product imports it:
``monkey.patch_all()`` still comes first) and appends one line per call and return to the
file named by ``RG_SETUP_TRACE``::

    <time_ns> <pid> <greenlet id> B|E <label>

Nothing of the product knows about it; without ``RG_SETUP_TRACE`` nothing is installed.
The wall clock (``time.time_ns``) is shared by the processes of one machine, so the
console's, the relay's and the agent's steps line up on one time axis.
"""

import importlib.abc
import importlib.machinery
import os
import sys
import time
from typing import Any, Callable, Dict, List, Optional, Sequence

ENV = "RG_SETUP_TRACE"

#: module → functions or ``Class.method`` to time.
POINTS: Dict[str, Sequence[str]] = {
    "remote_gevent.console.session": ["open_session", "_start_tunnel", "_RelayDial._early",
                                      "relay_context"],
    "remote_gevent.console.control": ["ConsoleControl.start_request",
                                      "ConsoleControl.require_pin",
                                      "ConsoleControl.wait_offer", "ConsoleControl._on_reply",
                                      "ConsoleControl._verify_accept"],
    "remote_gevent.wire.protocol": ["make_session_request", "verify_session_accept",
                                    "check_session_request", "make_session_accept"],
    "remote_gevent.wire.envelope": ["operator_of", "verify_raw", "decode", "encode"],
    "remote_gevent.common.amqplink": ["AmqpLink._send"],
    "remote_gevent.wire.rendezvous": ["dial_relay", "_read_line", "_unwrap"],
    "remote_gevent.crypto.tunnel_crypto": ["kx_keypair", "derive_keys", "make_sealer_opener"],
    "remote_gevent.wire.resume": ["ResumeKeys.from_session_keys"],
    "remote_gevent.wire.mux": ["Tunnel.__init__", "Tunnel.run", "Tunnel.open_stream",
                               "Tunnel.wait_up"],
    "remote_gevent.wire.mux_receive": ["FrameReceiving._handshake",
                                       "FrameReceiving._on_open_reply"],
    "remote_gevent.wire.mux_splice": ["StreamSplicing._serve_open"],
    "remote_gevent.agent.control": ["ControlPlane._on_message", "ControlPlane._handle_session",
                                    "ControlPlane.trusted_keys"],
    "remote_gevent.agent.tunnels": ["TunnelManager.submit", "TunnelManager._admit"],
    # _dial: before issue 17; _start_dial/_wait_dial after (a missing one is only noted)
    "remote_gevent.agent.session_run": ["SessionRun._session_main", "SessionRun._send_reply",
                                        "SessionRun._dial", "SessionRun._start_dial",
                                        "SessionRun._wait_dial", "SessionRun._open_target"],
    "remote_gevent.relay.server": ["Relay._handle", "Relay._tls_accept", "Relay._read_hello",
                                   "Relay._pair", "Relay._send_ok", "Relay._wait_for_peer"],
    "remote_gevent.relay.forwarding": ["Forwarding._go_plain", "Forwarding._forward_in_thread"],
    "remote_gevent.agent.history": ["History._write"],
    "gevent.ssl": ["SSLSocket.do_handshake", "SSLSocket.unwrap"],
    "gevent.socket": ["create_connection"],
    "gevent._socketcommon": ["getaddrinfo"],
    "gevent.baseserver": ["BaseServer._do_read"],
}

_fd: Optional[int] = None
_short: Dict[str, str] = {}


def _greenlet_id() -> int:
    try:
        import greenlet
    except ImportError:
        return 0
    return id(greenlet.getcurrent())


def mark(kind: str, label: str) -> None:
    """One line: now, our pid, the current greenlet, ``B``/``E``/``M`` and ``label``."""
    if _fd is None:
        return
    os.write(_fd, ("%d %d %d %s %s\n" % (time.time_ns(), os.getpid(), _greenlet_id(), kind,
                                          label)).encode())


def _wrap(fn: Callable[..., Any], label: str) -> Callable[..., Any]:
    def traced(*args: Any, **kwargs: Any) -> Any:
        mark("B", label)
        try:
            return fn(*args, **kwargs)
        finally:
            mark("E", label)
    traced.__wrapped__ = fn  # type: ignore[attr-defined]
    traced.__name__ = getattr(fn, "__name__", label)
    traced.__doc__ = getattr(fn, "__doc__", None)
    return traced


def _patch(module: Any) -> None:
    short = module.__name__.rsplit(".", 1)[-1]
    for name in POINTS.get(module.__name__, ()):
        owner: Any = module
        parts = name.split(".")
        for part in parts[:-1]:
            owner = getattr(owner, part, None)
            if owner is None:
                break
        attr = parts[-1]
        if owner is None or attr not in vars(owner):
            sys.stderr.write("setup_trace: %s.%s not in this checkout\n" % (module.__name__,
                                                                            name))
            continue
        raw = vars(owner)[attr]
        label = "%s.%s" % (short, name)
        if isinstance(raw, classmethod):
            setattr(owner, attr, classmethod(_wrap(raw.__func__, label)))
        elif isinstance(raw, staticmethod):
            setattr(owner, attr, staticmethod(_wrap(raw.__func__, label)))
        else:
            setattr(owner, attr, _wrap(raw, label))


class _Loader(importlib.abc.Loader):
    def __init__(self, inner: Any) -> None:
        self.inner = inner

    def create_module(self, spec: Any) -> Any:
        return self.inner.create_module(spec)

    def exec_module(self, module: Any) -> None:
        self.inner.exec_module(module)
        _patch(module)


class _Finder(importlib.abc.MetaPathFinder):
    def find_spec(self, fullname: str, path: Any, target: Any = None) -> Any:
        if fullname not in POINTS:
            return None
        spec = importlib.machinery.PathFinder.find_spec(fullname, path)
        if spec is not None and spec.loader is not None:
            spec.loader = _Loader(spec.loader)
        return spec


_hooked = False


def early_install() -> None:
    """Wrap the :data:`POINTS` (those imported already and, through an import hook, the
    others when they are imported); they record nothing until :func:`install`."""
    global _hooked
    if _hooked:
        return
    _hooked = True
    for name in POINTS:
        if name in sys.modules:
            _patch(sys.modules[name])
    sys.meta_path.insert(0, _Finder())


def install(path: Optional[str] = None) -> bool:
    """Start tracing into ``path`` (default: ``$RG_SETUP_TRACE``); False if neither."""
    global _fd
    path = path or os.environ.get(ENV)
    if not path or _fd is not None:
        return False
    early_install()
    _fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o600)
    return True


def read(path: str) -> List[List[Any]]:
    """The trace as ``[t_ns, pid, greenlet, kind, label]`` rows, in time order."""
    rows = []
    with open(path) as f:
        for line in f:
            t, pid, g, kind, label = line.split(" ", 4)
            rows.append([int(t), int(pid), int(g), kind, label.strip()])
    rows.sort(key=lambda r: r[0])
    return rows
