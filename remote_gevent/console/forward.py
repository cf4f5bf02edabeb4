"""``forward DEVICE -L [bind_address:]port:host:hostport`` (repeatable), like ``ssh -L``.

All listeners share one session: each accepted local connection becomes one stream to
its target, spliced with ``Tunnel.splice`` (half-close aware, per-stream flow control).
Listeners are bound *before* the session is requested, so a port already in use fails
at once without taking a slot on the device.

Spec syntax (ssh's): ``port:host:hostport`` binds 127.0.0.1; ``bind:port:host:hostport``
with ``bind`` an address or name, ``*`` or empty for every interface; IPv6 addresses in
brackets (``[::1]:8022:[fe80::1]:22``). Bind port 0 picks a free port (printed).
"""

from __future__ import annotations

import socket
import sys
from dataclasses import dataclass
from typing import Any, Callable, List, Optional, Sequence, Tuple

import gevent
import gevent.pool

from remote_gevent.common.addresses import format_address

DEFAULT_BIND = "127.0.0.1"
# Accept queue of the console's listeners (``forward -L``, ``socks -D``): a browser or a
# parallel job opens connections in bursts, and a console busy sealing a bulk stream
# accepts late; with 128 a burst of 200 overflowed it and the kernel dropped connections
# the clients believed open (nstat TcpExtListenOverflows). The kernel caps it at
# net.core.somaxconn (4096 on current kernels).
LISTEN_BACKLOG = 1024
ACCEPT_RETRY = 0.1  # s after a failed accept (e.g. EMFILE): neither spin nor stall


class SpecError(ValueError):
    """A -L / -D / target spec is malformed (message says how)."""


def accept_connections(session: Any, listener: socket.socket,
                       on_connection: Callable[[socket.socket], None],
                       say: Callable[[str], None], what: str) -> None:
    """Accept on ``listener`` until ``session`` closes; hand each connection on.

    The one accept loop of the console's listeners (``forward -L``, ``socks -D``)."""
    while not session.closed:
        try:
            conn, _ = listener.accept()
        except OSError as exc:
            if session.closed:
                return
            say("%s failed: %s" % (what, exc))
            gevent.sleep(ACCEPT_RETRY)
            continue
        on_connection(conn)


@dataclass(frozen=True)
class ForwardSpec:
    bind_host: str       # address to bind ("" = every interface)
    bind_port: int       # 0 = any free port
    target: str          # host:port as sent to the agent ([v6]:port)

    def __str__(self) -> str:
        return "%s -> %s" % (format_address(self.bind_host or "*", self.bind_port), self.target)


def split_fields(spec: str) -> List[str]:
    """Split on ``:`` outside ``[...]``; brackets are removed from the fields."""
    fields: List[str] = []
    cur = ""
    i = 0
    while i < len(spec):
        c = spec[i]
        if c == "[":
            end = spec.find("]", i)
            if end < 0:
                raise SpecError("unbalanced [ in %r" % spec)
            if cur:
                raise SpecError("[ must start a field in %r" % spec)
            cur = spec[i + 1:end]
            if not cur:
                raise SpecError("empty [] in %r" % spec)
            i = end + 1
            if i < len(spec) and spec[i] != ":":
                raise SpecError("expected : after ] in %r" % spec)
            cur = "[" + cur  # remember it was bracketed (an IPv6 address)
            continue
        if c == ":":
            fields.append(cur)
            cur = ""
        elif c == "]":
            raise SpecError("unbalanced ] in %r" % spec)
        else:
            cur += c
        i += 1
    fields.append(cur)
    return fields


def _port(text: str, what: str, allow_zero: bool = False) -> int:
    if not text.isdigit() or len(text) > 5:
        raise SpecError("bad %s %r (expected a number)" % (what, text))
    port = int(text)
    if not (0 if allow_zero else 1) <= port <= 65535:
        raise SpecError("%s %d out of range" % (what, port))
    return port


def _host(field: str, what: str) -> str:
    bracketed = field.startswith("[")
    host = field[1:] if bracketed else field
    if not host or any(c.isspace() or ord(c) < 32 for c in host) or "/" in host:
        raise SpecError("bad %s %r" % (what, host))
    if ":" in host and not bracketed:
        raise SpecError("IPv6 %s %s must be written in brackets: [%s]" % (what, host, host))
    return host


def make_target(host: str, port: int) -> str:
    """``host:port`` as the agent expects it: IPv6 in brackets, names lowercased."""
    host = host.lower()
    target = "[%s]:%d" % (host, port) if ":" in host else "%s:%d" % (host, port)
    from remote_gevent.crypto.authkeys import Target, TargetError

    try:
        return str(Target.parse(target))
    except TargetError as exc:
        raise SpecError(str(exc)) from None


def _bind_host(field: str) -> str:
    if field in ("", "*"):
        return ""
    host = _host(field, "bind address")
    return "127.0.0.1" if host == "localhost" else host


def parse_forward_spec(spec: str) -> ForwardSpec:
    """``[bind_address:]port:host:hostport`` → ForwardSpec; raise SpecError."""
    fields = split_fields(spec.strip())
    if len(fields) == 3:
        bind, (port, host, hostport) = DEFAULT_BIND, fields
    elif len(fields) == 4:
        bind, port, host, hostport = _bind_host(fields[0]), fields[1], fields[2], fields[3]
    else:
        raise SpecError("bad -L %r: expected [bind_address:]port:host:hostport" % spec)
    if port.startswith("["):
        raise SpecError("bad -L %r: the listen port is not an address" % spec)
    return ForwardSpec(bind, _port(port, "listen port", allow_zero=True),
                       make_target(_host(host, "target host"), _port(hostport, "target port")))


def parse_listen_spec(spec: str) -> Tuple[str, int]:
    """``[bind_address:]port`` (``-D``) → (bind host, port); raise SpecError."""
    fields = split_fields(spec.strip())
    if len(fields) == 1:
        bind, port = DEFAULT_BIND, fields[0]
    elif len(fields) == 2:
        bind, port = _bind_host(fields[0]), fields[1]
    else:
        raise SpecError("bad -D %r: expected [bind_address:]port" % spec)
    return bind, _port(port, "listen port", allow_zero=True)


def listen(host: str, port: int) -> socket.socket:
    """A listening TCP socket (``""`` = every interface, IPv6 dual stack when possible)."""
    candidates: List[Tuple[Any, socket.AddressFamily]]
    if host == "":
        candidates = [("::", socket.AF_INET6), ("0.0.0.0", socket.AF_INET)]
    else:
        infos = socket.getaddrinfo(host, port, 0, socket.SOCK_STREAM, 0, socket.AI_PASSIVE)
        candidates = [(info[4][0], info[0]) for info in infos[:1]]
    error: Optional[OSError] = None
    for addr, family in candidates:
        sock = socket.socket(family, socket.SOCK_STREAM)
        try:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            if family == socket.AF_INET6 and host == "":
                sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 0)
            sock.bind((addr, port))
            sock.listen(LISTEN_BACKLOG)
            return sock
        except OSError as exc:
            sock.close()
            error = exc
    assert error is not None
    raise error


def bound_address(sock: socket.socket) -> str:
    addr = sock.getsockname()
    return format_address(addr[0], addr[1])


def _describe_refusal(exc: Any) -> str:
    code = getattr(exc, "code", "") or type(exc).__name__
    reason = getattr(exc, "reason", "") or ""
    return "%s (%s)" % (code, reason) if reason else code


class Forwarder:
    """Accept loops of several listeners, each connection spliced into ``session``."""

    def __init__(self, session: Any, err: Any = None) -> None:
        self.session = session
        self.err = err if err is not None else sys.stderr
        self.group = gevent.pool.Group()
        self.connections = 0

    def say(self, text: str) -> None:
        self.err.write("%s\n" % text)
        self.err.flush()

    def serve(self, listener: socket.socket, target: str) -> None:
        """Start accepting on ``listener``; each connection → a stream to ``target``."""
        self.group.spawn(self._accept_loop, listener, target)

    def _accept_loop(self, listener: socket.socket, target: str) -> None:
        accept_connections(self.session, listener, lambda conn: self._accepted(conn, target),
                           self.say, "accept on %s" % bound_address(listener))

    def _accepted(self, conn: socket.socket, target: str) -> None:
        self.connections += 1
        self.group.spawn(self._handle, conn, target)

    def _handle(self, conn: socket.socket, target: str) -> None:
        from remote_gevent.wire import mux_frames

        try:
            stream = self.session.open_stream(target)
        except mux_frames.StreamRefused as exc:
            self.say("session %s: stream to %s refused by %s: %s"
                     % (self.session.session_id, target, self.session.device,
                        _describe_refusal(exc)))
            conn.close()
            return
        except (mux_frames.MuxError, OSError) as exc:
            self.say("session %s: cannot open a stream to %s: %s"
                     % (self.session.session_id, target, exc))
            conn.close()
            return
        self.session.tunnel.splice(stream, conn)

    def stop(self) -> None:
        self.group.kill(block=False)


def run_forward(session: Any, listeners: Sequence[Tuple[socket.socket, ForwardSpec]],
                err: Any = None) -> int:
    """Serve every listener until the tunnel ends; return the exit code."""
    fw = Forwarder(session, err)
    for sock, spec in listeners:
        fw.serve(sock, spec.target)
        fw.say("forwarding %s -> %s on %s (session %s)"
               % (bound_address(sock), spec.target, session.device, session.session_id))
    try:
        code, reason = session.wait()
    finally:
        fw.stop()
        for sock, _ in listeners:
            sock.close()
    if session.exit_code:
        fw.say("session %s ended: %s (%s)" % (session.session_id, code, reason))
    return session.exit_code
