"""The relay rendezvous as its clients speak it (docs/protocol.md, section 6).

The agent and the console dial the relay with :func:`dial_relay`: TLS (chain and host
name verified), one hello line ``RG2 <role> <session_id> <ticket_b64>``, wait for
``OK <peer_ip>`` (or ``ERR <code>``), then TLS shut down cleanly and the plain TCP socket
handed back for the tunnel's end-to-end sealed frames. The relay server
(:mod:`remote_gevent.relay.server`) parses the same hello with :func:`parse_hello` and
answers with :func:`ok_line`. Living here, the client half costs an agent or a console
nothing of the relay server or its splicer.
"""

import base64
import binascii
import ipaddress
import re
import socket
import ssl
import time
from typing import Any, Dict, NamedTuple, Optional, Tuple, Union

from remote_gevent.common import tls
from remote_gevent.common.addresses import format_address
from remote_gevent.common.logs import escape
from remote_gevent.common.sockets import close_quietly, connect_tcp

PROTOCOL_VERSION = "RG2"
ROLES = ("agent", "console")
MAX_HELLO = 512
TICKET_BYTES = 32
ERROR_CODES = ("bad_hello", "timeout", "busy", "ticket_mismatch", "duplicate")

# How long a relay waits for the second party of a session by default; the client waits
# that long (plus its own timeout) for OK.
DEFAULT_PAIRING_TIMEOUT = 30.0

_SESSION_ID_RE = re.compile(r"\A[0-9a-f]{32}\Z")

#: OpenSSL 3 treats an EOF without close_notify as a fatal error that also kills *writing*;
#: this option makes it an ordinary EOF. Since RG2 the tunnel runs over plain TCP, so this
#: only matters while TLS is up (a relay's ``ERR`` line followed by a bare FIN) and for
#: other TLS-only streams (benchmarks). Python < 3.10 lacks the constant; with OpenSSL
#: 1.1.1 the behaviour is already the lenient one.
OP_IGNORE_UNEXPECTED_EOF = getattr(ssl, "OP_IGNORE_UNEXPECTED_EOF", 0) or (
    0x80 if ssl.OPENSSL_VERSION_INFO >= (3, 0) else 0)


def allow_half_close(ctx: ssl.SSLContext) -> ssl.SSLContext:
    """Make ``ctx`` accept a TCP FIN as end of stream while still allowing writes."""
    if OP_IGNORE_UNEXPECTED_EOF and not ctx.options & OP_IGNORE_UNEXPECTED_EOF:
        ctx.options |= OP_IGNORE_UNEXPECTED_EOF
    return ctx


class RelayError(Exception):
    """Dialing the relay failed; ``code`` says why.

    Codes sent by the relay (``remote`` True): ``bad_hello``, ``timeout``, ``busy``,
    ``ticket_mismatch``, ``duplicate``. Local codes (``remote`` False): ``unreachable``
    (TCP connect failed), ``timeout`` (no answer in time), ``tls`` (handshake or
    certificate verification failed), ``protocol`` (the relay answered nonsense or hung up).

    ``reached`` is False when the failure came before the hello could be sent (TCP
    connect or TLS handshake): the relay is down or unusable, not merely without a peer
    (a relay pool skips it, issue 13).
    """

    def __init__(self, code: str, message: str, remote: bool = False,
                 reached: bool = True) -> None:
        super().__init__(message)
        self.code = code
        self.remote = remote
        self.reached = reached


def half_close(sock: socket.socket) -> None:
    """Shut down writing at the TCP level (FIN) and keep the socket readable.

    Since RG2 :func:`dial_relay` returns a plain TCP socket, for which this is just
    ``sock.shutdown(socket.SHUT_WR)`` (which works again). For a TLS socket this
    deliberately bypasses ``SSLSocket.shutdown`` (which would drop the TLS state and make
    the socket unreadable): the peer sees a ragged EOF, ``recv() == b""``.
    """
    for klass in type(sock).__mro__:
        if "SSLSocket" in klass.__name__:
            continue
        if "shutdown" in klass.__dict__:
            klass.shutdown(sock, socket.SHUT_WR)  # type: ignore[attr-defined]
            return
    sock.shutdown(socket.SHUT_WR)


def set_nodelay(sock: socket.socket) -> None:
    if sock.family in (socket.AF_INET, socket.AF_INET6):
        try:
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        except OSError:
            pass


class Hello(NamedTuple):
    role: str
    session_id: str
    ticket: bytes

    def __repr__(self) -> str:  # a traceback or a debug line must never show the ticket
        return "Hello(role=%r, session_id=%r, ticket=<%d bytes>)" % (
            self.role, self.session_id, len(self.ticket))


class BadHello(Exception):
    pass


class BadVersion(BadHello):
    """Another protocol version: refused with ``ERR bad_hello RG2`` (names ours)."""


def parse_hello(line: bytes) -> "Hello":
    """Parse one hello line (without the newline); raises ``BadHello``."""
    try:
        text = line.decode("ascii")
    except UnicodeDecodeError:
        raise BadHello("not ascii") from None
    parts = text.split(" ")
    if re.match(r"\ARG[0-9]+\Z", parts[0]) and parts[0] != PROTOCOL_VERSION:
        raise BadVersion("%s hello; this relay speaks %s only"
                          % (escape(parts[0], 20), PROTOCOL_VERSION))
    if len(parts) != 4 or parts[0] != PROTOCOL_VERSION:
        raise BadHello("not an %s hello" % PROTOCOL_VERSION)
    _, role, session_id, ticket_b64 = parts
    if role not in ROLES:
        raise BadHello("unknown role")
    if not _SESSION_ID_RE.match(session_id):
        raise BadHello("bad session id")
    try:
        ticket = base64.b64decode(ticket_b64.encode("ascii"), validate=True)
    except (binascii.Error, ValueError):
        raise BadHello("ticket is not base64") from None
    if len(ticket) != TICKET_BYTES:
        raise BadHello("ticket is not %d bytes" % TICKET_BYTES)
    return Hello(role, session_id, ticket)


def build_hello(role: str, session_id: str, ticket: Union[bytes, str]) -> bytes:
    """The hello line a client sends; validates its inputs (``ValueError``)."""
    if role not in ROLES:
        raise ValueError("relay role must be one of %s, not %r" % (", ".join(ROLES), role))
    if not _SESSION_ID_RE.match(session_id or ""):
        raise ValueError("session id must be 32 lowercase hex digits")
    if isinstance(ticket, str):
        ticket_b64 = ticket
    else:
        ticket_b64 = base64.b64encode(ticket).decode("ascii")
    line = ("%s %s %s %s\n" % (PROTOCOL_VERSION, role, session_id, ticket_b64)).encode("ascii")
    try:
        parse_hello(line[:-1])  # the relay would refuse it: refuse it here
    except BadHello as exc:
        raise ValueError("invalid relay hello: %s" % exc) from None
    return line


# --------------------------------------------------------------------------- client


def dial_relay(host: str, port: int, ssl_context: ssl.SSLContext,
               server_hostname: Optional[str], role: str, session_id: str,
               ticket: Union[bytes, str], timeout: float = 10.0,
               pair_timeout: Optional[float] = None) -> Tuple[socket.socket, str]:
    """Connect to a relay, present ``role``/``session_id``/``ticket``, wait to be paired.

    ``timeout`` bounds TCP connect, TLS handshake, sending the hello and the TLS shutdown
    after ``OK``; ``pair_timeout`` (default: the relay's default pairing timeout +
    ``timeout``) bounds the wait for ``OK``. The certificate chain and host name
    (``server_hostname``, default ``host``) are verified by ``ssl_context`` (use
    ``tls.client_context``). After ``OK`` both ends shut TLS down (close_notify both ways)
    and this returns the **plain TCP socket** in blocking mode (no timeout, TCP_NODELAY on)
    and the peer's IP as the relay saw it: from here on the caller's bytes must be
    end-to-end sealed (the tunnel's AEAD frames) — TLS protected only the rendezvous.
    Half-close it with ``sock.shutdown(socket.SHUT_WR)`` (or :func:`half_close`).
    Raises :class:`RelayError` (message names host:port) or ``ValueError`` for bad input.
    """
    hello = build_hello(role, session_id, ticket)
    allow_half_close(ssl_context)
    where = format_address(host, port)
    if pair_timeout is None:
        pair_timeout = DEFAULT_PAIRING_TIMEOUT + timeout
    try:
        raw = connect_tcp(host, port, timeout)
    except socket.timeout:
        raise RelayError("timeout", "relay %s: no TCP connection within %.1fs"
                         % (where, timeout), reached=False) from None
    except OSError as exc:
        raise RelayError("unreachable", "relay %s unreachable: %s" % (where, exc),
                         reached=False) from None
    sock = None
    handed_over = False
    try:
        set_nodelay(raw)
        name = server_hostname or host
        try:
            sock = ssl_context.wrap_socket(raw, server_hostname=name,
                                           do_handshake_on_connect=False,
                                           session=_tls_session(ssl_context, name, host, port))
            sock.settimeout(timeout)
            sock.do_handshake()
        except socket.timeout:
            raise RelayError("timeout", "relay %s: no TLS handshake within %.1fs"
                             % (where, timeout), reached=False) from None
        except tls.HANDSHAKE_ERRORS as exc:
            if tls.is_verify_error(exc):
                raise RelayError("tls", "relay %s: %s" % (where, tls.describe_verify_error(exc)),
                                 reached=False) from None
            raise RelayError("tls", "relay %s: TLS handshake failed: %s" % (where, exc),
                             reached=False) from None
        try:
            sock.sendall(hello)
            line = _read_line(sock, time.monotonic() + pair_timeout)
        except socket.timeout:
            raise RelayError("timeout", "relay %s: not paired within %.1fs"
                             % (where, pair_timeout)) from None
        except (ssl.SSLError, OSError) as exc:
            raise RelayError("protocol", "relay %s: connection lost before pairing: %s"
                             % (where, exc)) from None
        parts = line.split(" ")
        if len(parts) == 2 and parts[0] == "OK" and parts[1]:
            peer_ip = parse_peer_ip(parts[1], where)
            _keep_tls_session(ssl_context, name, host, port, sock)
            plain = _unwrap(sock, where, timeout)
            plain.settimeout(None)
            set_nodelay(plain)
            handed_over = True
            return plain, peer_ip
        if len(parts) in (2, 3) and parts[0] == "ERR" and parts[1]:
            code = escape(parts[1], 40)  # the relay's text: one of ERROR_CODES, normally
            extra = ""
            if len(parts) == 3 and code == "bad_hello":
                extra = " (the relay speaks %s, we speak %s)" % (escape(parts[2], 20),
                                                                  PROTOCOL_VERSION)
            raise RelayError(code, "relay %s refused the %s: %s%s" % (where, role, code, extra),
                             remote=True)
        raise RelayError("protocol", "relay %s: unexpected answer '%s'"
                         % (where, escape(line, 80)))
    finally:
        if not handed_over:
            close_quietly(sock)
            close_quietly(raw)  # no-op once wrap_socket has taken its descriptor over


#: The TLS session of the last successful dial, by (server name, host, port), with the
#: context it belongs to: the next dial there resumes it (TLS 1.3 PSK with a new ECDHE
#: key; a ticket of TLS 1.2), which skips the relay's certificate signature and our
#: chain and host name verification — done once, in the full handshake that made the
#: session, for the same name and context. A session the relay no longer accepts (restart,
#: another relay behind the name, expiry) costs nothing: the handshake is a full one.
_TLS_SESSIONS: Dict[Tuple[str, str, int], Tuple[ssl.SSLContext, Any]] = {}
_TLS_SESSIONS_MAX = 64  # relays one process dials (a pool is a few)


def _tls_session(ctx: ssl.SSLContext, name: str, host: str, port: int) -> Any:
    kept = _TLS_SESSIONS.get((name, host, port))
    return kept[1] if kept is not None and kept[0] is ctx else None


def _keep_tls_session(ctx: ssl.SSLContext, name: str, host: str, port: int,
                      sock: ssl.SSLSocket) -> None:
    """Remember ``sock``'s session (its TLS 1.3 ticket came before the relay's OK)."""
    session = sock.session
    if session is None:
        return
    if len(_TLS_SESSIONS) >= _TLS_SESSIONS_MAX:
        _TLS_SESSIONS.clear()
    _TLS_SESSIONS[(name, host, port)] = (ctx, session)


def ok_line(peer_ip: str) -> bytes:
    """The relay's ``OK <peer_ip>`` answer. An IPv6 scope id (``fe80::1%eth0``) is the
    relay's interface name, meaningless to the client, which refuses any ``%``: dropped."""
    return ("OK %s\n" % peer_ip.split("%", 1)[0]).encode("ascii")


def parse_peer_ip(value: str, where: str = "relay") -> str:
    """The IP address in the relay's ``OK <peer_ip>`` answer, normalised.

    It ends up in the history's ``remote_ip`` column and in status replies, so anything
    but an IPv4 or IPv6 address is a protocol failure of the pairing (issue 10, item 7)."""
    try:
        if "%" in value:  # an IPv6 scope id (Python 3.9+) is free text: '::1%\x1b[31m'
            raise ValueError(value)
        return str(ipaddress.ip_address(value))
    except ValueError:
        raise RelayError("protocol", "relay %s: OK carries no IP address but '%s'"
                         % (where, escape(value, 80))) from None


def _unwrap(sock: ssl.SSLSocket, where: str, timeout: float) -> socket.socket:
    """close_notify both ways after ``OK``; the plain socket (same descriptor)."""
    try:
        sock.settimeout(timeout)
        sock.unwrap()
        return socket.socket(sock.family, sock.type, sock.proto, fileno=sock.detach())
    except socket.timeout:
        raise RelayError("timeout", "relay %s: no TLS close_notify within %.1fs after OK"
                         % (where, timeout)) from None
    except (ssl.SSLError, OSError, ValueError) as exc:
        raise RelayError("protocol", "relay %s: TLS shutdown after OK failed: %s"
                         % (where, exc)) from None


def _read_line(sock: ssl.SSLSocket, deadline: float, limit: int = MAX_HELLO) -> str:
    """One ``\\n``-terminated line, byte by byte so nothing after it is consumed."""
    data = bytearray()
    while len(data) < limit:
        remaining = deadline - time.monotonic()
        if remaining <= 0:
            raise socket.timeout("timed out")
        sock.settimeout(remaining)
        byte = sock.recv(1)
        if not byte:
            raise OSError("connection closed by the relay")
        if byte == b"\n":
            return data.decode("ascii", "replace")
        data += byte
    raise OSError("answer longer than %d bytes" % limit)
