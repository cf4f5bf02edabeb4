"""PROXY protocol v1 and v2 on the relay's listener (HAProxy's spec, receiving side).

With ``proxy_protocol: true`` the relay sits behind a load balancer (haproxy
``send-proxy`` / ``send-proxy-v2``, AWS NLB, ...) that prefixes every connection with
the client's real address. The relay reads that header *before* TLS and uses its source
address wherever it would use the TCP peer's: log lines, the per-source pending cap
(``max_pending_per_ip``) and the ``OK <peer_ip>`` it tells the other leg.

Only enable it when nothing but the load balancer can reach the listener: whoever sends
the header chooses the address the relay believes. A connection without a valid header
is closed (no ``ERR`` line: the peer does not speak our protocol yet), counted
``refused_proxy_header``. Reading is bounded: v1 is one line of at most 107 bytes, v2 a
16-byte header plus at most :data:`MAX_V2_BODY` bytes of addresses and TLVs, all within
the caller's deadline; nothing after the header is consumed (the TLS ClientHello
follows). ``LOCAL`` (v2) and ``UNKNOWN`` (v1) connections — the balancer's own health
checks — keep the TCP peer's address.
"""

from __future__ import annotations

import ipaddress
import logging
import socket
import struct
import time
from typing import Optional, Tuple

from remote_gevent.common.sockets import close_quietly, recv_exact

log = logging.getLogger("remote_gevent.relay.server")

V2_SIGNATURE = b"\r\n\r\n\x00\r\nQUIT\n"
V1_PREFIX = b"PROXY "
V1_MAX = 107  # the spec's longest v1 line, CRLF included
#: v2 addresses + TLVs we accept (the spec allows up to 65535; haproxy sends < 256).
MAX_V2_BODY = 1024


class ProxyHeaderError(ValueError):
    """The connection did not start with a usable PROXY header (message says why)."""


def _parse_v1(line: bytes) -> Optional[Tuple[str, int]]:
    try:
        parts = line.decode("ascii").rstrip("\r\n").split(" ")
    except UnicodeDecodeError:
        raise ProxyHeaderError("PROXY v1 header is not ASCII") from None
    if len(parts) >= 2 and parts[1] == "UNKNOWN":
        return None
    if len(parts) != 6 or parts[1] not in ("TCP4", "TCP6"):
        raise ProxyHeaderError("malformed PROXY v1 header")
    try:
        src = ipaddress.ip_address(parts[2])
        port = int(parts[4])
    except ValueError:
        raise ProxyHeaderError("malformed PROXY v1 address") from None
    if (src.version == 4) != (parts[1] == "TCP4") or not 0 <= port <= 65535:
        raise ProxyHeaderError("malformed PROXY v1 address")
    return str(src), port


def _parse_v2(head: bytes, body: bytes) -> Optional[Tuple[str, int]]:
    version, command = head[12] >> 4, head[12] & 0x0F
    family = head[13]
    if version != 2 or command not in (0, 1):
        raise ProxyHeaderError("unsupported PROXY v2 version/command 0x%02x" % head[12])
    if command == 0:  # LOCAL: the balancer's own connection (health check)
        return None
    if family == 0x11 and len(body) >= 12:  # TCP over IPv4
        return str(ipaddress.IPv4Address(body[:4])), struct.unpack(">H", body[8:10])[0]
    if family == 0x21 and len(body) >= 36:  # TCP over IPv6
        return str(ipaddress.IPv6Address(body[:16])), struct.unpack(">H", body[32:34])[0]
    if family == 0x00:  # UNSPEC
        return None
    raise ProxyHeaderError("unsupported PROXY v2 address family 0x%02x" % family)


def read_header(sock: socket.socket, timeout: float) -> Optional[Tuple[str, int]]:
    """Consume one PROXY header from ``sock``; the client's ``(ip, port)``, or None when
    the header says to keep the TCP peer's (``LOCAL``/``UNKNOWN``/``UNSPEC``).

    Raises :class:`ProxyHeaderError`. Leaves the socket's timeout as it found it.
    """
    deadline = time.monotonic() + timeout
    previous = sock.gettimeout()
    try:
        first = recv_exact(sock, 8, deadline)
        if first == V2_SIGNATURE[:8]:
            head = first + recv_exact(sock, 8, deadline)
            if head[:12] != V2_SIGNATURE:
                raise ProxyHeaderError("bad PROXY v2 signature")
            length = struct.unpack(">H", head[14:16])[0]
            if length > MAX_V2_BODY:
                raise ProxyHeaderError("PROXY v2 header of %d bytes refused" % length)
            return _parse_v2(head, recv_exact(sock, length, deadline))
        if not first.startswith(V1_PREFIX):
            raise ProxyHeaderError("connection does not start with a PROXY header")
        line = first
        while not line.endswith(b"\r\n"):
            if len(line) >= V1_MAX:
                raise ProxyHeaderError("PROXY v1 line longer than %d bytes" % V1_MAX)
            line += recv_exact(sock, 1, deadline)
        return _parse_v1(line)
    except socket.timeout:
        raise ProxyHeaderError("no complete PROXY header in time") from None
    except EOFError:
        raise ProxyHeaderError("connection closed inside the PROXY header") from None
    finally:
        sock.settimeout(previous)


def client_ip(sock: socket.socket, peer_ip: str, timeout: float) -> Optional[str]:
    """The client's address for a connection from the load balancer at ``peer_ip``;
    None when its header is missing or unusable: then the connection is closed, logged
    once."""
    try:
        source = read_header(sock, timeout)
    except ProxyHeaderError as exc:
        log.info("closed a connection from %s: %s", peer_ip, exc)
        close_quietly(sock)
        return None
    return source[0] if source is not None else peer_ip
