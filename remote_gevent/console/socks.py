"""``socks DEVICE -D [bind_address:]port``: a SOCKS5 server whose connections are streams.

RFC 1928 subset: no authentication (method 0x00), ``CONNECT`` only, address types IPv4,
IPv6 and domain name. A domain name is **not** resolved here: ``name:port`` is the
stream target and the agent resolves it on the device (so ``curl --socks5-hostname``
reaches names only the device can resolve). The session asks for ``*:*``; each
``CONNECT`` is then checked by the agent against the device allow-list and the
operator's ``permitopen`` (a refusal comes back as OPEN_FAIL).

OPEN_FAIL → SOCKS5 reply: ``target_not_permitted`` → 0x02 (not allowed by ruleset);
connection refused → 0x05; network unreachable → 0x03; host unreachable, name not
resolved or timed out → 0x04; anything else → 0x01 (general failure).
"""

from __future__ import annotations

import ipaddress
import socket
import struct
import sys
from typing import Any

import gevent

from remote_gevent.console.forward import (
    SpecError,
    accept_connections,
    bound_address,
    make_target,
)
from remote_gevent.common.sockets import close_quietly, recv_exact

SOCKS_VERSION = 5
METHOD_NO_AUTH = 0x00
METHOD_NONE_ACCEPTABLE = 0xFF
CMD_CONNECT = 0x01
ATYP_IPV4 = 0x01
ATYP_DOMAIN = 0x03
ATYP_IPV6 = 0x04

REP_SUCCEEDED = 0x00
REP_GENERAL_FAILURE = 0x01
REP_NOT_ALLOWED = 0x02
REP_NETWORK_UNREACHABLE = 0x03
REP_HOST_UNREACHABLE = 0x04
REP_CONNECTION_REFUSED = 0x05
REP_TTL_EXPIRED = 0x06
REP_COMMAND_NOT_SUPPORTED = 0x07
REP_ADDRESS_NOT_SUPPORTED = 0x08

#: The whole handshake (greeting + request) must arrive within this many seconds.
HANDSHAKE_TIMEOUT = 30.0
SESSION_TARGETS = ("*:*",)


class SocksError(Exception):
    """The client broke the protocol or asked for something we do not do.

    ``reply`` is the SOCKS5 reply code already sent (None: nothing could be sent).
    """

    def __init__(self, message: str, reply: Any = None) -> None:
        super().__init__(message)
        self.reply = reply


def send_reply(sock: Any, rep: int) -> None:
    """Reply with BND.ADDR 0.0.0.0:0 (the agent's local address is not known here)."""
    sock.sendall(struct.pack("!BBBB4sH", SOCKS_VERSION, rep, 0, ATYP_IPV4, b"\0" * 4, 0))


def negotiate(sock: Any) -> str:
    """Run the SOCKS5 greeting and read the CONNECT request; return the stream target.

    Sends the method selection and, on a request we cannot serve, the error reply
    (then raises SocksError). On success nothing is sent yet: the caller replies
    after the stream opened (:func:`send_reply`).
    """
    try:
        return _negotiate(sock)
    except EOFError:
        raise SocksError("client closed the connection during the handshake") from None


def _negotiate(sock: Any) -> str:
    ver, nmethods = recv_exact(sock, 2)
    if ver != SOCKS_VERSION:
        raise SocksError("not SOCKS5 (version byte %d)" % ver)
    methods = recv_exact(sock, nmethods) if nmethods else b""
    if METHOD_NO_AUTH not in methods:
        sock.sendall(bytes((SOCKS_VERSION, METHOD_NONE_ACCEPTABLE)))
        raise SocksError("client offers no acceptable method (only no-auth is supported)")
    sock.sendall(bytes((SOCKS_VERSION, METHOD_NO_AUTH)))
    ver, cmd, _rsv, atyp = recv_exact(sock, 4)
    if ver != SOCKS_VERSION:
        raise SocksError("bad request version %d" % ver)
    if atyp == ATYP_IPV4:
        host = str(ipaddress.IPv4Address(recv_exact(sock, 4)))
    elif atyp == ATYP_IPV6:
        host = str(ipaddress.IPv6Address(recv_exact(sock, 16)))
    elif atyp == ATYP_DOMAIN:
        (length,) = recv_exact(sock, 1)
        raw = recv_exact(sock, length) if length else b""
        host = _domain(raw)
        if host is None:
            recv_exact(sock, 2)
            send_reply(sock, REP_ADDRESS_NOT_SUPPORTED)
            raise SocksError("bad domain name %r" % raw[:64], REP_ADDRESS_NOT_SUPPORTED)
    else:
        send_reply(sock, REP_ADDRESS_NOT_SUPPORTED)
        raise SocksError("address type %d not supported" % atyp, REP_ADDRESS_NOT_SUPPORTED)
    (port,) = struct.unpack("!H", recv_exact(sock, 2))
    if cmd != CMD_CONNECT:
        send_reply(sock, REP_COMMAND_NOT_SUPPORTED)
        raise SocksError("command %d not supported (CONNECT only)" % cmd,
                         REP_COMMAND_NOT_SUPPORTED)
    if port == 0:
        send_reply(sock, REP_ADDRESS_NOT_SUPPORTED)
        raise SocksError("port 0", REP_ADDRESS_NOT_SUPPORTED)
    try:
        return make_target(host, port)
    except SpecError as exc:
        send_reply(sock, REP_ADDRESS_NOT_SUPPORTED)
        raise SocksError(str(exc), REP_ADDRESS_NOT_SUPPORTED) from None


def _domain(raw: bytes) -> Any:
    try:
        name = raw.decode("ascii")
    except UnicodeDecodeError:
        return None
    if not name or len(name) > 253 or any(c.isspace() or ord(c) < 33 or c in "/[]@"
                                          for c in name):
        return None
    if ":" in name:  # an IPv6 literal sent as a "domain"
        try:
            return str(ipaddress.IPv6Address(name))
        except ValueError:
            return None
    return name.rstrip(".") or None


def reply_for_refusal(code: str, reason: str = "") -> int:
    """SOCKS5 reply code for an OPEN_FAIL ``code`` / ``reason`` from the agent."""
    if code == "target_not_permitted":
        return REP_NOT_ALLOWED
    text = (reason or "").upper()
    if "ECONNREFUSED" in text or "CONNECTION REFUSED" in text:
        return REP_CONNECTION_REFUSED
    if "ENETUNREACH" in text or "NETWORK IS UNREACHABLE" in text:
        return REP_NETWORK_UNREACHABLE
    if any(s in text for s in ("EHOSTUNREACH", "NO ROUTE TO HOST", "HOST IS UNREACHABLE",
                               "NAME OR SERVICE NOT KNOWN", "NODENAME NOR SERVNAME",
                               "TEMPORARY FAILURE IN NAME", "NO ADDRESS ASSOCIATED",
                               "ETIMEDOUT", "TIMED OUT", "EAI_")):
        return REP_HOST_UNREACHABLE
    return REP_GENERAL_FAILURE


class SocksServer:
    """SOCKS5 front end of one session."""

    def __init__(self, session: Any, err: Any = None, verbose: bool = False) -> None:
        import gevent.pool

        self.session = session
        self.err = err if err is not None else sys.stderr
        self.verbose = verbose
        self.group = gevent.pool.Group()
        self.connections = 0

    def say(self, text: str) -> None:
        self.err.write("%s\n" % text)
        self.err.flush()

    def serve(self, listener: socket.socket) -> None:
        self.group.spawn(self._accept_loop, listener)

    def _accept_loop(self, listener: socket.socket) -> None:
        accept_connections(self.session, listener, self._accepted, self.say, "socks: accept")

    def _accepted(self, conn: socket.socket) -> None:
        self.connections += 1
        self.group.spawn(self.handle, conn)

    def handle(self, conn: Any) -> None:
        """One client: handshake, open the stream, reply, splice."""
        from remote_gevent.wire import mux_frames

        try:
            with gevent.Timeout(HANDSHAKE_TIMEOUT, SocksError("handshake timed out")):
                target = negotiate(conn)
        except (SocksError, OSError) as exc:
            if self.verbose:
                self.say("socks: %s" % exc)
            close_quietly(conn)
            return
        try:
            stream = self.session.open_stream(target)
        except mux_frames.StreamRefused as exc:
            rep = reply_for_refusal(exc.code, exc.reason)
            self.say("socks: %s refused by %s: %s%s" % (target, self.session.device, exc.code,
                                                       " (%s)" % exc.reason if exc.reason
                                                       else ""))
            _reply_and_close(conn, rep)
            return
        except (mux_frames.MuxError, OSError) as exc:
            self.say("socks: cannot open a stream to %s: %s" % (target, exc))
            _reply_and_close(conn, REP_GENERAL_FAILURE)
            return
        try:
            send_reply(conn, REP_SUCCEEDED)
        except OSError:
            stream.close()
            close_quietly(conn)
            return
        self.session.tunnel.splice(stream, conn)

    def stop(self) -> None:
        self.group.kill(block=False)


def _reply_and_close(conn: Any, rep: int) -> None:
    try:
        send_reply(conn, rep)
    except OSError:
        pass
    close_quietly(conn)


def run_socks(session: Any, listener: socket.socket, err: Any = None,
              verbose: bool = False) -> int:
    """Serve SOCKS5 on ``listener`` until the tunnel ends; return the exit code."""
    server = SocksServer(session, err, verbose)
    server.serve(listener)
    server.say("SOCKS5 on %s -> %s (session %s; names are resolved on the device)"
               % (bound_address(listener), session.device, session.session_id))
    try:
        code, reason = session.wait()
    finally:
        server.stop()
        listener.close()
    if session.exit_code:
        server.say("session %s ended: %s (%s)" % (session.session_id, code, reason))
    return session.exit_code
