"""Relay ("exit node"): pairs an agent and a console by session id + ticket, then splices.

Wire protocol (docs/protocol.md, section 6): after TLS the client sends one line
``RG2 <role> <session_id> <ticket_b64>\\n`` (at most 512 bytes) and nothing else. The relay
pairs the two roles that present the same session id *and* the same ticket and answers each
side ``OK <peer_ip>\\n``. Then both ends shut TLS down cleanly (``close_notify`` both ways,
``SSLSocket.unwrap()``) and the relay forwards the plain TCP bytes, both ways, half-close
aware, with ``os.splice`` through a pipe (kernel to kernel, no copy into Python) where
available. Errors are ``ERR <code>\\n`` then close: ``bad_hello`` (``ERR bad_hello RG2``
when the version is not ours), ``timeout``, ``busy``, ``ticket_mismatch``, ``duplicate``.

The relay never parses or logs payload (it is end-to-end encrypted anyway) and never logs a
ticket. It is stateless apart from the in-memory pairing table; a pool behind one
round-robin address routes each session to one owner relay (relay/routing.py).

Why things are the way they are:

* **TLS for the rendezvous only.** TLS authenticates the relay to both clients and keeps
  the hello (session id, ticket) secret. After pairing, every byte is one of the tunnel's
  AEAD frames (confidential, authenticated, counter-nonced end to end: a tampered,
  injected, dropped or reordered byte ends the tunnel with ``crypto_error``), so TLS on
  the two legs would be a second and third encryption that protects nothing more against
  the network: an on-path attacker still sees only lengths and timing (TLS records leak
  those too) and can still only break the connection (an RST does that too). Dropping it
  after ``OK`` is what lets the relay splice in the kernel (issue 6, docs/performance.md).
* **Nothing before OK.** A client must not send anything after its hello until it has
  read ``OK`` and unwrapped TLS (:func:`dial_relay` returns only then). Bytes seen before
  pairing are refused with ``ERR bad_hello``; bytes that arrive between ``OK`` and the
  client's ``close_notify`` are discarded by TLS, and the tunnel's AEAD then ends the
  session. OpenSSL reads records exactly (CPython never enables read-ahead, and turns it
  off explicitly in ``unwrap``), so no plain byte sent after ``close_notify`` is swallowed
  into the TLS layer. ``unwrap`` is bounded by ``handshake_timeout``.
* **Pairing policy.** The first arrival for a session id waits (``pairing_timeout``). A
  newcomer whose ticket does not match the waiter's gets ``ERR ticket_mismatch`` and is
  closed; the waiter keeps waiting, so a stranger can neither be paired nor kick a legitimate
  waiter out. Same role + same ticket is ``ERR duplicate`` (again the waiter stays). A party
  that knows a session id but not its ticket could still *squat* on it by arriving first: the
  legitimate party then gets ``ticket_mismatch`` until the squatter's pairing timeout. We
  accept that: the session id is as secret as the ticket (both travel only in the signed
  session request), squatting is bounded by the pairing timeout and the per-IP pending
  limit, and the alternative (several candidate waiters per id) would let a stranger hold
  more relay state per guessed id.
* **Pending slots** (:mod:`relay_pending`): ``max_pending`` in all and
  ``max_pending_per_ip`` per source bound the connections not paired yet. TLS + hello must
  finish within ``hello_timeout`` (5 s). At a limit, the oldest connection that has not sent
  a valid hello is evicted for the newcomer; ``ERR busy`` only when every pending one has
  sent its hello, so a waiter is never displaced and half-open connections from one
  address (a flood, or a NAT) cannot hold that address's sessions out.
* **Splice, in one thread.** After pairing, the relay only moves sealed bytes, so the
  greenlets hand each plain TCP pair to the data-plane thread of :mod:`splicer`: one OS
  thread with a level-triggered epoll that moves bytes socket → pipe → socket with
  ``os.splice`` (an idle paired session costs its two sockets and nothing else). EOF is
  passed on as ``shutdown(SHUT_WR)`` and the other direction keeps flowing. A wake-up
  there costs no pass through gevent's hub: one hop adds 35-37 us to a 1-byte round trip
  there against 40-43 us in greenlets (``benchmarks/bench_hop.py``,
  docs/performance.md). TLS, pairing, timeouts and logging stay in greenlets; one sweeper
  greenlet ends idle sessions. Where ``os.splice`` is missing (Python < 3.10, not Linux)
  or refuses the descriptors (``EINVAL``), or ``REMOTE_GEVENT_RELAY_SPLICE=0`` /
  ``Relay(splice=False)``, each direction is a greenlet copying through a pooled buffer
  (``recv_into`` + ``sendall``).
* **TCP_NODELAY** is set on both legs (and by :func:`dial_relay`): the tunnel carries
  small interactive frames (keystrokes, pings) that Nagle + delayed ACK would hold for
  40 ms; bulk transfers lose nothing because we always write large chunks.
"""

from __future__ import annotations

import hmac
import logging
import os
import socket
import ssl
import time
from typing import Any, Callable, Dict, List, Optional, Tuple

import gevent
import gevent.event
import gevent.pool
import gevent.socket
from gevent.server import StreamServer

from remote_gevent.relay import pending as relay_pending
from remote_gevent.relay import proxy_protocol
from remote_gevent.relay.routing import Router
from remote_gevent.relay import splicer
from remote_gevent.common import tls
from remote_gevent.common.addresses import format_address
from remote_gevent.common.sockets import close_quietly
from remote_gevent.wire.rendezvous import (
    MAX_HELLO,
    PROTOCOL_VERSION,
    BadHello,
    BadVersion,
    Hello,
    allow_half_close,
    half_close,
    ok_line,
    parse_hello,
    set_nodelay,
)

from remote_gevent.relay.forwarding import BufferPool, Forwarding, _tcp_abort
from remote_gevent.relay.settings import RelaySettings

log = logging.getLogger(__name__)


#: Connections that are only being told ``ERR busy`` (TLS handshake + one line); beyond this
#: many at once, an over-limit connection is closed without TLS.
REJECT_SLOTS = 64
#: Longest time spent telling an over-limit client ``ERR busy``.
REJECT_TIMEOUT = 5.0
#: After ``ERR <code>`` we read and discard what the client still sends (bounded), so that
#: closing does not turn into a TCP RST that would destroy the error line in flight.
LINGER_TIMEOUT = 1.0
LINGER_MAX_BYTES = 64 * 1024
#: How many spare copy buffers the pool keeps (the rest are freed).


def splice_available() -> bool:
    """Whether the relay forwards with ``os.splice`` (its data-plane thread) by default.

    Linux with Python >= 3.10; ``REMOTE_GEVENT_RELAY_SPLICE=0`` turns it off."""
    return splicer.SPLICE is not None \
        and os.environ.get("REMOTE_GEVENT_RELAY_SPLICE", "1") != "0"

# --------------------------------------------------------------------------- relay


class Conn:
    """One accepted connection from handshake to close."""

    __slots__ = ("sock", "ip", "hello", "early", "event", "peer", "failed", "pending",
                 "claimed", "gone", "evicted", "since", "via")

    def __init__(self, sock: socket.socket, ip: str) -> None:
        #: The TLS socket until the pair goes plain (``Forwarding._go_plain``), then the
        #: plain socket under it.
        self.sock: Any = sock
        self.ip = ip
        self.hello: Optional[Hello] = None
        self.early = False  # sent bytes before OK (forbidden since RG2)
        self.event: Optional[gevent.event.Event] = None
        self.peer: Optional[PairedSession] = None  # set when paired
        self.failed = ""  # set when the waiter must give up (shutdown)
        self.pending = False
        self.claimed = False  # a newcomer took us out of the table and is sending our OK
        self.gone = False  # the client went away while waiting
        self.evicted = False  # closed half-open to make room for a newcomer
        self.since = time.monotonic()
        self.via = ""  # a pool peer's address: forwarded to us, or by us (relay/routing.py)


class PairedSession:
    __slots__ = ("session_id", "agent", "console", "started", "last_activity", "bytes",
                 "outcome", "running", "done", "unwrapped", "plain", "pair", "forwarded",
                 "copy", "write_error")

    def __init__(self, session_id: str, agent: Conn, console: Conn) -> None:
        self.session_id = session_id
        self.agent = agent
        self.console = console
        self.started = time.monotonic()
        self.last_activity = self.started
        self.bytes = {"agent": 0, "console": 0}  # bytes read from that role's side
        self.outcome = ""
        self.running = 2
        self.done = gevent.event.Event()
        self.pair: Optional[splicer.Pair] = None  # forwarded by the splice thread
        self.forwarded = gevent.event.Event()  # the splice thread let go of the sockets
        self.copy = False  # forward in greenlets (copy loop), not in the splice thread
        self.write_error = ""  # a direction could not deliver (forwarding._DeliveryFailed)
        self.unwrapped = 0  # legs whose TLS is shut down
        self.plain = gevent.event.Event()  # both legs plain (or the session failed)


class Relay(Forwarding):
    """The relay server. ``start()``, then ``stop()``; ``pending``/``paired`` for tests.

    ``ssl_context`` defaults to ``tls.server_context(cert_file, key_file)``. ``splice``
    (default :func:`splice_available`) chooses ``os.splice`` forwarding; False forces the
    ``recv_into``/``sendall`` copy loop.
    """

    def __init__(self, settings: RelaySettings,
                 ssl_context: Optional[ssl.SSLContext] = None,
                 splice: Optional[bool] = None) -> None:
        self.settings = settings
        if ssl_context is None:
            if not settings.cert_file or not settings.key_file:
                raise ValueError("the relay needs a certificate and a key (TLS is mandatory)")
            ssl_context = tls.server_context(settings.cert_file, settings.key_file)
        self.ssl_context = allow_half_close(ssl_context)
        self.buffers = BufferPool(settings.buffer_size)
        self.pipes = splicer.PipePool(settings.buffer_size)
        if splice is None:
            splice = splice_available()
        self.splice = bool(splice) and splicer.SPLICE is not None
        self._plane: Optional[splicer.SplicePlane] = None  # started at the first pair
        self._waiting: Dict[str, Conn] = {}
        self._sessions: Dict[str, PairedSession] = {}
        self._table = relay_pending.PendingTable(settings.max_pending,
                                                 settings.max_pending_per_ip)
        self._rejecting = 0
        self._stopping = False
        self._drained = gevent.event.Event()
        self._sweeper: Optional[gevent.Greenlet] = None
        self.counters: Dict[str, int] = {"accepted": 0, "sessions": 0}
        self.observers: List[Callable[[str, PairedSession], None]] = []  # relay/metrics.py
        size = settings.max_pending + 2 * settings.max_paired + REJECT_SLOTS
        self._pool = gevent.pool.Pool(size)
        self.router = Router(self) if settings.pool_peers else None  # route by session id
        self._server = StreamServer((settings.host, settings.port), self._handle,
                                    spawn=self._pool, backlog=1024)

    # ---- public
    @property
    def address(self) -> Tuple[str, int]:
        return self._server.address[:2]

    @property
    def pending(self) -> int:
        """Connections accepted but not paired yet (TLS handshake, hello, waiting)."""
        return self._table.total

    @property
    def paired(self) -> int:
        """Paired sessions currently forwarding."""
        return len(self._sessions)

    def start(self) -> None:
        self._server.start()
        self._sweeper = gevent.spawn(self._sweep_idle)
        if self.router is not None:
            self.router.start()
        log.info("relay listening on %s", format_address(*self.address))

    def stop(self, grace: Optional[float] = None) -> None:
        """Stop accepting, refuse waiters, let paired sessions drain for ``grace``, close."""
        if grace is None:
            grace = self.settings.grace
        self._stopping = True
        self._server.close()
        if self.router is not None:
            self.router.stop()
        for conn in list(self._waiting.values()):
            conn.failed = "busy"
            if conn.event is not None:
                conn.event.set()
        if self._sessions:
            log.info("relay stopping: waiting up to %.0fs for %d session(s) to finish",
                     grace, len(self._sessions))
            self._drained.clear()
            self._drained.wait(timeout=grace)
        for session in list(self._sessions.values()):
            self._abort(session, "shutdown")
        self._pool.join(timeout=max(self.settings.handshake_timeout, 1.0))
        if self._plane is not None:
            # Before killing legs: a killed leg closes its sockets, which the thread must
            # no longer be watching.
            self._plane.stop()
            self._plane = None
        self._pool.kill(block=True, timeout=1)
        if self._sweeper is not None:
            self._sweeper.kill(block=False)
        self.pipes.close()
        log.info("relay stopped")

    def stats(self) -> Dict[str, int]:
        out = dict(self.counters)
        out.update(pending=self._table.total, half_open=self._table.half_open,
                   paired=len(self._sessions),
                   buffers=self.buffers.allocated, pipes=self.pipes.allocated)
        return out

    # ---- connection handling
    def _count(self, key: str) -> None:
        self.counters[key] = self.counters.get(key, 0) + 1

    def _observe(self, event: str, session: PairedSession) -> None:
        for observer in self.observers:
            try:
                observer(event, session)
            except Exception:  # noqa: BLE001 - metrics must never end a session
                log.exception("relay observer failed on %s", event)

    def _handle(self, raw: socket.socket, address: tuple) -> None:
        ip = address[0]
        self._count("accepted")
        s = self.settings
        if s.proxy_protocol:  # the client's address from the load balancer's header
            ip = proxy_protocol.client_ip(raw, ip, s.hello_timeout)
            if ip is None:  # logged and closed
                self._count("refused_proxy_header")
                return
        if self._stopping or len(self._sessions) >= s.max_paired:
            self._reject_busy(raw, ip, "relay stopping" if self._stopping
                              else "max_paired %d reached" % s.max_paired)
            return
        victims = self._table.make_room(ip)
        if victims is None:
            self._reject_busy(raw, ip, self._full_reason(ip))
            return
        for victim in victims:
            assert isinstance(victim, Conn)
            self._evict(victim)
        conn = Conn(raw, ip)
        self._enter_pending(conn)
        try:
            self._serve(conn)
        finally:
            self._leave_pending(conn)
            close_quietly(conn.sock)

    def _enter_pending(self, conn: Conn) -> None:
        conn.pending = True
        self._table.add(conn, conn.ip)

    def _leave_pending(self, conn: Conn) -> None:
        if not conn.pending:
            return
        conn.pending = False
        self._table.remove(conn)

    def _full_reason(self, ip: str) -> str:
        s = self.settings
        if self._table.count(ip) >= s.max_pending_per_ip:
            return ("max_pending_per_ip %d reached, every one has sent its hello"
                    % s.max_pending_per_ip)
        return "max_pending %d reached, every one has sent its hello" % s.max_pending

    def _evict(self, conn: Conn) -> None:
        """Close a half-open connection (no valid hello yet) to make room for a newcomer:
        its slot is free at once, its greenlet notices the closed socket and just ends."""
        self._count("evicted")
        per_ip = self._table.count(conn.ip) >= self.settings.max_pending_per_ip
        log.info("evicted a half-open connection from %s (%.1fs without a hello): %s full",
                 conn.ip, time.monotonic() - conn.since,
                 "max_pending_per_ip %d" % self.settings.max_pending_per_ip if per_ip
                 else "max_pending %d" % self.settings.max_pending)
        conn.evicted = True
        self._leave_pending(conn)
        _tcp_abort(conn.sock)

    def _reject_busy(self, raw: socket.socket, ip: str, why: str) -> None:
        self._count("refused_busy")
        if self._rejecting >= REJECT_SLOTS:
            log.debug("refused %s: busy (no TLS, too many refusals in progress)", ip)
            return
        self._rejecting += 1
        try:
            sock = self._tls_accept(raw, time.monotonic() + REJECT_TIMEOUT)
            if sock is not None:
                self._refuse(sock, "busy", ip, None, why)
                close_quietly(sock)
        finally:
            self._rejecting -= 1

    def _tls_accept(self, raw: socket.socket, deadline: float,
                    conn: Optional[Conn] = None) -> Optional[ssl.SSLSocket]:
        """TLS handshake in this connection's greenlet, bounded by ``deadline``."""
        set_nodelay(raw)
        sock = None
        try:
            sock = self.ssl_context.wrap_socket(raw, server_side=True,
                                                do_handshake_on_connect=False)
            if conn is not None:
                conn.sock = sock  # raw's descriptor is sock's now: evict through sock
            sock.settimeout(max(deadline - time.monotonic(), 0.01))
            sock.do_handshake()
            return sock
        except (ssl.SSLError, OSError) as exc:  # socket.timeout is an OSError
            log.debug("TLS handshake with %s failed: %s", raw_peer(sock or raw), exc)
            # wrap_socket took raw's descriptor: close it here. Relying on garbage
            # collection left it open on Python 3.8 (the traceback keeps ``sock`` alive),
            # so a client that never starts TLS held its connection past the timeout.
            close_quietly(sock)
            return None

    def _read_hello(self, sock: ssl.SSLSocket, deadline: float) -> Tuple[bytes, bytes]:
        data = b""
        while b"\n" not in data:
            if len(data) >= MAX_HELLO:
                raise BadHello("longer than %d bytes" % MAX_HELLO)
            sock.settimeout(max(deadline - time.monotonic(), 0.01))
            chunk = sock.recv(MAX_HELLO - len(data))
            if not chunk:
                raise BadHello("closed before the end of the hello")
            data += chunk
        line, _, rest = data.partition(b"\n")
        return line, rest

    def _serve(self, conn: Conn) -> None:
        s = self.settings
        hello_timeout = min(s.hello_timeout, s.handshake_timeout)
        deadline = time.monotonic() + hello_timeout
        sock = self._tls_accept(conn.sock, deadline, conn)
        if sock is None:
            return
        try:
            line, rest = self._read_hello(sock, deadline)
            hello = self.router.parse(conn, line) if self.router else parse_hello(line)
            if rest:
                raise BadHello("%d byte(s) after the hello before OK (%s forbids them)"
                                % (len(rest), PROTOCOL_VERSION))
        except (BadHello, ssl.SSLError, OSError) as exc:
            if conn.evicted:
                return  # logged by _evict; the socket is shut down
            self._bad_hello(conn, exc, hello_timeout)
            return
        if conn.evicted:
            return
        conn.hello = hello
        self._table.authenticated(conn)
        if self.router is None or not self.router.forward(conn):
            self._pair(conn)

    def _bad_hello(self, conn: Conn, exc: Exception, hello_timeout: float) -> None:
        """Refuse a connection whose hello failed (one log line, in ``_refuse``)."""
        sock = conn.sock
        if isinstance(exc, BadVersion):
            self._refuse(sock, "bad_hello", conn.ip, None, str(exc), detail=PROTOCOL_VERSION)
        elif isinstance(exc, BadHello):
            self._refuse(sock, "bad_hello", conn.ip, None, str(exc))
        elif isinstance(exc, socket.timeout):
            self._refuse(sock, "timeout", conn.ip, None, "no hello within %.1fs"
                         % hello_timeout)
        else:
            log.debug("connection from %s lost before its hello: %s", conn.ip, exc)

    def _pair(self, conn: Conn) -> None:
        hello = conn.hello
        assert hello is not None
        sid = hello.session_id
        while True:
            waiter = self._waiting.get(sid)
            if waiter is not None and waiter.gone:
                del self._waiting[sid]  # its greenlet is about to notice and close it
                continue
            if waiter is None:
                if self._stopping:
                    self._refuse(conn.sock, "busy", conn.ip, sid, "relay stopping")
                    return
                self._wait_for_peer(conn)
                return
            assert waiter.hello is not None
            if not hmac.compare_digest(waiter.hello.ticket, hello.ticket):
                log.warning("session %s: %s from %s presented a wrong ticket; the waiting %s "
                            "stays", sid, hello.role, conn.ip, waiter.hello.role)
                self._refuse(conn.sock, "ticket_mismatch", conn.ip, sid)
                return
            if waiter.hello.role == hello.role:
                self._refuse(conn.sock, "duplicate", conn.ip, sid,
                             "a %s is already waiting" % hello.role)
                return
            if len(self._sessions) >= self.settings.max_paired:
                self._refuse(conn.sock, "busy", conn.ip, sid, "max_paired reached")
                return
            del self._waiting[sid]
            waiter.claimed = True
            if self._send_ok(waiter, conn.ip) and self._send_ok(conn, waiter.ip):
                break
            # The waiter vanished while waiting (or we did): release it, try again.
            waiter.failed = "gone"
            if waiter.event is not None:
                waiter.event.set()
            if conn.failed:
                return
        assert waiter.event is not None
        wake = waiter.event
        self._register_pair(sid, conn, waiter, "sessions", lambda session: wake.set(),
                            observed=True)

    def _register_pair(self, key: str, conn: Conn, other: Conn, counter: str,
                       start_other: Callable[[PairedSession], None],
                       observed: bool = False) -> None:
        """The one pairing of ``conn`` (this greenlet's leg) with ``other``, local or
        forwarded (relay/routing.py): a new :class:`PairedSession` under ``key`` ends any
        older pairing there, is counted under ``counter`` (``sessions`` for a pairing here,
        ``forwarded`` for a leg sent to its owner) and shown to the observers if
        ``observed`` (not a forwarded leg: its owner observes the pairing), leaves
        pending; then ``start_other`` gets the other leg running and this greenlet runs
        ``conn``'s."""
        assert conn.hello is not None
        agent, console = (conn, other) if conn.hello.role == "agent" else (other, conn)
        session = PairedSession(key, agent, console)
        self._supersede(key)
        self._sessions[key] = session
        self._count(counter)
        if observed:
            self._observe("paired", session)
        for c in (agent, console):
            c.peer = session
            self._leave_pending(c)
        start_other(session)
        self._run_leg(session, conn)

    def _supersede(self, sid: str) -> None:
        """Both ends paired again under a session id still spliced here: they resumed
        (issue 12) after losing a path this relay may not have noticed (a silent one).
        Only the ticket's holders get this far, so the old pair is theirs: ended now."""
        old = self._sessions.pop(sid, None)
        if old is not None:
            log.info("session %s: paired again (resumed); the previous pairing ends", sid)
            self._abort(old, "superseded (the session resumed on a new pairing)")

    def _send_ok(self, conn: Conn, peer_ip: str) -> bool:
        try:
            conn.sock.settimeout(self.settings.handshake_timeout)
            conn.sock.sendall(ok_line(peer_ip))
            return True
        except (ssl.SSLError, OSError) as exc:
            log.debug("session %s: %s from %s lost before pairing: %s",
                      conn.hello.session_id if conn.hello else "-", conn.hello.role
                      if conn.hello else "-", conn.ip, exc)
            conn.failed = "gone"
            return False

    def _wait_for_peer(self, conn: Conn) -> None:
        """First arrival: wait for the peer, noticing if our own client goes away.

        A helper greenlet watches the client meanwhile: EOF there means the client gave up,
        and the session id is freed at once instead of after the pairing timeout (a retry
        would otherwise be refused as a duplicate); any byte there breaks RG2's "nothing
        before OK" and is refused with ``ERR bad_hello``.
        """
        hello = conn.hello
        assert hello is not None
        sid = hello.session_id
        conn.event = gevent.event.Event()
        self._waiting[sid] = conn
        reader = gevent.spawn(self._read_early, conn)
        try:
            gevent.wait([conn.event, reader], count=1, timeout=self.settings.pairing_timeout)
        finally:
            if self._waiting.get(sid) is conn:
                del self._waiting[sid]
        if conn.claimed and not conn.event.is_set():
            # A newcomer took us out of the table and is sending the OKs right now.
            conn.event.wait(timeout=self.settings.handshake_timeout)
        reader.kill(block=True)
        if conn.peer is not None:
            self._run_leg(conn.peer, conn)
            return
        if conn.early:
            self._refuse(conn.sock, "bad_hello", conn.ip, sid,
                         "bytes before OK (%s forbids them)" % PROTOCOL_VERSION)
            return
        if conn.failed == "gone" or conn.gone:
            log.debug("session %s: waiting %s from %s left", sid, hello.role, conn.ip)
            return
        if conn.failed:
            self._refuse(conn.sock, conn.failed, conn.ip, sid, "relay stopping")
            return
        self._refuse(conn.sock, "timeout", conn.ip, sid,
                     "no peer within %.0fs" % self.settings.pairing_timeout)

    def _read_early(self, conn: Conn) -> None:
        try:
            conn.sock.settimeout(None)
            while True:
                try:
                    chunk = conn.sock.recv(4096)
                except socket.timeout:
                    continue
                if chunk:
                    conn.early = True  # refused (or, if paired meanwhile, aborted)
                elif not conn.claimed:
                    conn.gone = True  # (after OK, EOF here is the client's close_notify)
                return
        except (ssl.SSLError, OSError):
            if not conn.claimed:
                conn.gone = True

    def _refuse(self, sock: socket.socket, code: str, ip: str, sid: Optional[str],
                why: str = "", detail: str = "") -> None:
        self._count("refused_" + code)
        log.info("refused %s from %s (session %s)%s", code, ip, sid or "-",
                 ": " + why if why else "")
        try:
            sock.settimeout(LINGER_TIMEOUT)
            line = "ERR %s %s\n" % (code, detail) if detail else "ERR %s\n" % code
            sock.sendall(line.encode("ascii"))
            half_close(sock)
            deadline = time.monotonic() + LINGER_TIMEOUT
            drained = 0
            while drained < LINGER_MAX_BYTES and time.monotonic() < deadline:
                sock.settimeout(max(deadline - time.monotonic(), 0.01))
                chunk = sock.recv(16384)
                if not chunk:
                    break
                drained += len(chunk)
        except (ssl.SSLError, OSError):
            pass

    # ---- TLS off, then splice
def raw_peer(sock: socket.socket) -> str:
    try:
        return str(sock.getpeername()[0])
    except OSError:
        return "?"
