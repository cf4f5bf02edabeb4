"""Relays of a pool route each session to one owner relay by its session id (issue 13).

Behind one round-robin address (haproxy ``balance roundrobin``, DNS with several records)
the agent's and the console's legs of a session land on different relays, which used to
pair only within their own table. With ``pool_peers`` set, every relay computes the same
*owner* for a session id by rendezvous (highest-random-weight) hashing over the peers it
believes alive: ``blake2b(peer | session_id)``, highest wins. A leg that lands on its
owner pairs there as always. A leg that lands elsewhere is *forwarded*: its entry relay
dials the owner's direct address (TLS, owner certificate verified against
``pool_ca_file``), sends a forwarded hello authenticated with the pool's shared secret,
passes the owner's answer (``OK <peer_ip>`` / ``ERR <code>``) back to the client, shuts
TLS down on both connections and splices client <-> owner with the relay's ordinary
forwarding (splice thread or copy loop). After ``OK`` every byte is an end-to-end AEAD
frame (docs/protocol.md section 7), so the extra hop sees and can do no more than the
relay itself.

Why a shared secret (HMAC over the forwarded hello) rather than client certificates:
mutual TLS would make the listener ask every agent and console for a certificate (or run
a second listener) and need a client certificate per relay; the forwarded hello travels
inside TLS to a verified owner, so the secret itself never crosses the network and a
forwarded line can be neither read nor replayed by anyone on the path. A relay without
the secret (or a client) that sends one is refused ``ERR bad_hello``. A forwarded hello
is always handled locally by its receiver: it is never forwarded again (no loops, even
while relays disagree about who is alive).

Liveness: every ``pool_probe_interval`` (1 s) each peer gets a TCP connect (preceded by
``PROXY UNKNOWN`` when the pool's listeners expect a PROXY header), closed at once; two
misses in a row mark it down, one success up again. A failed dial to an owner marks it
down at once and the leg is routed again among the live ones. While two relays disagree
(the second after a death), the legs of one session may be routed to different owners;
each waits there until its pairing timeout or its client's resume retry, by which time
both agree.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import ipaddress
import logging
import socket
import ssl
import time
from typing import TYPE_CHECKING, Dict, List, Optional, Sequence, Tuple

import gevent
import gevent.socket

from remote_gevent.common import tls
from remote_gevent.common.addresses import AddressError, format_address, split_host_port
from remote_gevent.common.configschema import ConfigError
from remote_gevent.common.logs import escape
from remote_gevent.common.sockets import close_quietly
from remote_gevent.wire.rendezvous import (
    ERROR_CODES,
    BadHello,
    Hello,
    RelayError,
    _read_line,
    allow_half_close,
    parse_hello,
    parse_peer_ip,
    set_nodelay,
)

if TYPE_CHECKING:
    from remote_gevent.relay.server import Conn, PairedSession, Relay

log = logging.getLogger("remote_gevent.relay.server")

FORWARD_VERB = "RG2F"
#: Longest wait for TCP + TLS to an owner: a dead one refuses at once on a LAN, a
#: black-holed one must not hold the client's hello deadline.
DIAL_TIMEOUT = 2.0
MISSES_DOWN = 2
MIN_SECRET = 16


def peer_name(value: str) -> str:
    """``host:port`` normalised (every relay must hash the same spelling)."""
    host, port = split_host_port(value.strip())
    assert port is not None
    return format_address(host, port)


def owner(session_id: str, peers: Sequence[str]) -> Optional[str]:
    """The peer with the highest ``blake2b(peer|session_id)``: stable, and a dead peer's
    sessions alone move (each to the next highest) when it leaves the list."""
    best, best_score = None, b""
    for peer in peers:
        score = hashlib.blake2b(("%s|%s" % (peer, session_id)).encode("utf-8"),
                                digest_size=16).digest()
        if best is None or score > best_score:
            best, best_score = peer, score
    return best


def _mac(secret: bytes, body: str) -> str:
    return hmac.new(secret, body.encode("ascii"), hashlib.sha256).hexdigest()


def forwarded_line(secret: bytes, hello: Hello, ticket_b64: str, client_ip: str) -> bytes:
    """``RG2F <role> <sid> <ticket_b64> <client_ip> <hmac-sha256 hex>\\n``."""
    body = "%s %s %s %s %s" % (FORWARD_VERB, hello.role, hello.session_id, ticket_b64,
                               client_ip.split("%", 1)[0])
    return ("%s %s\n" % (body, _mac(secret, body))).encode("ascii")


def parse_forwarded(line: bytes, secret: Optional[bytes]) -> Tuple[Hello, str]:
    """A forwarded hello (without its newline) → (hello, client IP); ``BadHello`` unless
    it is well formed *and* its MAC is the pool's (checked before anything else in it)."""
    try:
        text = line.decode("ascii")
    except UnicodeDecodeError:
        raise BadHello("forwarded hello is not ascii") from None
    parts = text.split(" ")
    if len(parts) != 6 or parts[0] != FORWARD_VERB:
        raise BadHello("not a %s hello" % FORWARD_VERB)
    if not secret:
        raise BadHello("forwarded hello, and this relay has no pool secret")
    if not hmac.compare_digest(_mac(secret, " ".join(parts[:5])).encode("ascii"),
                               parts[5].encode("ascii")):
        raise BadHello("forwarded hello with a wrong MAC (not from a pool peer)")
    hello = parse_hello(("RG2 %s %s %s" % tuple(parts[1:4])).encode("ascii"))
    try:
        ip = str(ipaddress.ip_address(parts[4]))
    except ValueError:
        raise BadHello("forwarded hello with a bad client address") from None
    return hello, ip


def check_pool(peers: Sequence[str], self_name: Optional[str],
               secret_file: Optional[str]) -> Tuple[Tuple[str, ...], str, bytes]:
    """(peers, self, secret) normalised, or ConfigError listing every problem."""
    problems: List[str] = []
    names: List[str] = []
    for value in peers:
        try:
            names.append(peer_name(value))
        except AddressError as exc:
            problems.append("pool_peers: %r: %s" % (value, exc))
    me = ""
    try:
        me = peer_name(self_name or "")
    except AddressError:
        problems.append("pool_self: required with pool_peers (this relay's host:port as "
                        "written in pool_peers)")
    if me and names and me not in names:
        problems.append("pool_self: %s is not one of pool_peers" % me)
    secret = b""
    if not secret_file:
        problems.append("pool_secret_file: required with pool_peers")
    else:
        try:
            with open(secret_file, "rb") as fh:
                secret = fh.read().strip()
        except OSError as exc:
            problems.append("pool_secret_file: %s" % exc)
        else:
            if len(secret) < MIN_SECRET:
                problems.append("pool_secret_file: at least %d bytes of secret" % MIN_SECRET)
    if problems:
        raise ConfigError(problems)
    return tuple(dict.fromkeys(names)), me, secret


def _proxy_v1(ip: str) -> bytes:
    family, dst = ("TCP6", "::") if ":" in ip else ("TCP4", "0.0.0.0")
    return ("PROXY %s %s %s 0 0\r\n" % (family, ip, dst)).encode("ascii")


class Router:
    """One relay's view of its pool: who is alive, who owns a session, forwarding."""

    def __init__(self, relay: "Relay") -> None:
        s = relay.settings
        self.relay = relay
        self.peers, self.me, self.secret = check_pool(s.pool_peers, s.pool_self,
                                                      s.pool_secret_file)
        self.context = allow_half_close(tls.client_context(s.pool_ca_file))
        self.alive: Dict[str, bool] = {p: True for p in self.peers}  # until probed
        self.misses: Dict[str, int] = {p: 0 for p in self.peers}
        self._prober: Optional[gevent.Greenlet] = None

    def start(self) -> None:
        self._prober = gevent.spawn(self._probe_forever)
        log.info("relay pool: %d peers, this relay is %s", len(self.peers), self.me)

    def stop(self) -> None:
        if self._prober is not None:
            self._prober.kill(block=False)

    def live(self) -> List[str]:
        return [p for p in self.peers if p == self.me or self.alive[p]]

    def states(self) -> Dict[str, bool]:
        return {p: p == self.me or self.alive[p] for p in self.peers}

    # ---- liveness
    def _set(self, peer: str, up: bool, why: str) -> None:
        if self.alive[peer] != up:
            log.warning("pool peer %s is %s (%s)", peer, "up" if up else "down", why)
        self.alive[peer] = up

    def mark_down(self, peer: str, why: str) -> None:
        self.misses[peer] = MISSES_DOWN
        self._set(peer, False, why)

    def _probe_forever(self) -> None:
        interval = self.relay.settings.pool_probe_interval
        while True:
            started = time.monotonic()
            probes = [gevent.spawn(self._probe, p, interval) for p in self.peers if p != self.me]
            gevent.joinall(probes, timeout=interval + 1)
            gevent.sleep(max(0.0, interval - (time.monotonic() - started)))

    def _probe(self, peer: str, timeout: float) -> None:
        host, port = split_host_port(peer)
        try:
            sock = gevent.socket.create_connection((host, port), timeout=timeout)
            try:
                if self.relay.settings.proxy_protocol:
                    sock.sendall(b"PROXY UNKNOWN\r\n")
            finally:
                close_quietly(sock)
        except OSError as exc:
            self.misses[peer] += 1
            if self.misses[peer] >= MISSES_DOWN:
                self._set(peer, False, "%d probes missed: %s" % (self.misses[peer], exc))
            return
        self.misses[peer] = 0
        self._set(peer, True, "probe answered")

    # ---- the server's hooks
    def parse(self, conn: "Conn", line: bytes) -> Hello:
        """The hello of ``conn``: an ordinary one, or a peer's forwarded one (then the
        connection takes the client's address, for logs, limits and the OK)."""
        if not line.startswith(FORWARD_VERB.encode("ascii") + b" "):
            return parse_hello(line)
        hello, ip = parse_forwarded(line, self.secret)
        table = self.relay._table
        if table.remove(conn):  # count it against the client's address, not the peer's
            table.add(conn, ip)
        conn.via, conn.ip = conn.ip, ip
        self.relay._count("forwarded_in")
        return hello

    def forward(self, conn: "Conn") -> bool:
        """Forward ``conn`` to its session's owner; False: this relay owns it (or is the
        only one alive, or the leg was forwarded to us): pair it here."""
        hello = conn.hello
        assert hello is not None
        if conn.via:
            return False
        ticket_b64 = base64.b64encode(hello.ticket).decode("ascii")
        for _ in range(len(self.peers)):
            target = owner(hello.session_id, self.live())
            if target is None or target == self.me:
                return False
            if len(self.relay._sessions) >= self.relay.settings.max_paired:
                self.relay._refuse(conn.sock, "busy", conn.ip, hello.session_id,
                                   "max_paired reached")
                return True
            if self._forward_to(conn, target, ticket_b64):
                return True
        return False

    # ---- forwarding
    def _dial(self, conn: "Conn", target: str, line: bytes) -> ssl.SSLSocket:
        host, port = split_host_port(target)
        timeout = min(DIAL_TIMEOUT, self.relay.settings.handshake_timeout)
        raw = gevent.socket.create_connection((host, port), timeout=timeout)
        sock = None
        try:
            set_nodelay(raw)
            if self.relay.settings.proxy_protocol:
                raw.sendall(_proxy_v1(conn.ip))
            sock = self.context.wrap_socket(raw, server_hostname=host,
                                            do_handshake_on_connect=False)
            sock.settimeout(timeout)
            sock.do_handshake()
            sock.sendall(line)
            return sock
        except BaseException:
            close_quietly(sock)
            close_quietly(raw)
            raise

    def _forward_to(self, conn: "Conn", target: str, ticket_b64: str) -> bool:
        """True when the leg is dealt with (spliced, or refused with the owner's answer);
        False when the owner is unreachable or died before answering (marked down)."""
        relay = self.relay
        hello = conn.hello
        assert hello is not None
        sid = hello.session_id
        line = forwarded_line(self.secret, hello, ticket_b64, conn.ip)
        try:
            sock = self._dial(conn, target, line)
        except (OSError, ssl.SSLError) as exc:  # socket.timeout is an OSError
            self.mark_down(target, "dial failed: %s" % exc)
            return False
        s = relay.settings
        answer = gevent.spawn(_read_line, sock, time.monotonic() + s.pairing_timeout
                              + s.handshake_timeout)
        watcher = gevent.spawn(relay._read_early, conn)  # client left, or spoke too early
        gevent.wait([answer, watcher], count=1)
        if not answer.ready():
            answer.kill(block=True)
            close_quietly(sock)  # the owner frees its waiter at once
            if conn.early:
                relay._refuse(conn.sock, "bad_hello", conn.ip, sid, "bytes before OK")
            return True
        watcher.kill(block=True)
        if conn.early or conn.gone:
            close_quietly(sock)
            return True
        if not answer.successful():
            close_quietly(sock)
            if isinstance(answer.exception, socket.timeout):
                relay._refuse(conn.sock, "timeout", conn.ip, sid, "owner %s did not answer"
                              % target)
                return True
            self.mark_down(target, "lost before answering: %s" % answer.exception)
            return False
        return self._answer(conn, target, sock, answer.value)

    def _answer(self, conn: "Conn", target: str, sock: ssl.SSLSocket, text: str) -> bool:
        relay = self.relay
        hello = conn.hello
        assert hello is not None
        sid = hello.session_id
        parts = text.split(" ")
        if len(parts) != 2 or parts[0] != "OK":
            close_quietly(sock)
            code = parts[1] if len(parts) >= 2 and parts[0] == "ERR" else ""
            if code not in ERROR_CODES:
                code = "busy"
            detail = escape(parts[2], 20) if len(parts) == 3 and code == "bad_hello" else ""
            relay._refuse(conn.sock, code, conn.ip, sid, "answer of the owner %s" % target,
                          detail=detail)
            return True
        try:
            peer_ip = parse_peer_ip(parts[1], target)
        except RelayError as exc:
            close_quietly(sock)
            log.warning("session %s: %s", sid, exc)
            return True
        self._splice(conn, target, sock, peer_ip)
        return True

    def _splice(self, conn: "Conn", target: str, sock: ssl.SSLSocket, peer_ip: str) -> None:
        from remote_gevent.relay.server import Conn

        relay = self.relay
        hello = conn.hello
        assert hello is not None
        other = "console" if hello.role == "agent" else "agent"
        far = Conn(sock, peer_ip)
        far.hello = Hello(other, hello.session_id, hello.ticket)
        far.via = target
        # Keyed by session id *and* role: both legs of a session may enter through the
        # same relay and be forwarded side by side.
        key = "%s/%s" % (hello.session_id, hello.role)
        if not relay._send_ok(conn, peer_ip):
            close_quietly(sock)
            return

        def start_far(session: "PairedSession") -> None:
            log.info("session %s: %s from %s forwarded to its owner %s", hello.session_id,
                     hello.role, conn.ip, target)
            relay._pool.spawn(relay._run_leg, session, far)

        relay._register_pair(key, conn, far, "forwarded", start_far)
