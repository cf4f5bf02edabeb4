"""Hostile-input tier: the relay rendezvous lines (remote_gevent.relay.server) under fuzzing.

Relay side: ``parse_hello`` reads the first line anyone on the internet sends; it returns
a ``Hello`` or raises ``_BadHello`` (answered ``ERR bad_hello``), nothing else. Client
side: ``_read_line`` reads the relay's answer (a bounded line or OSError/timeout) and
``parse_peer_ip`` accepts only an IP address in ``OK <ip>`` (else ``RelayError`` code
``protocol``). Valid hellos round-trip through ``build_hello``.
"""

from __future__ import annotations

import base64
import ipaddress
import socket
import time

from fuzz_settings import examples
from hypothesis import example, given
from hypothesis import strategies as st

from remote_gevent.wire import rendezvous

SID = "0123456789abcdef0123456789abcdef"
VALID = rendezvous.build_hello("agent", SID, bytes(range(32)))[:-1]


def _parse(line: bytes):
    try:
        hello = rendezvous.parse_hello(line)
    except rendezvous.BadHello as exc:
        assert str(exc)
        return None
    assert hello.role in rendezvous.ROLES
    assert len(hello.ticket) == rendezvous.TICKET_BYTES
    assert rendezvous.build_hello(hello.role, hello.session_id, hello.ticket)  # re-encodable
    return hello


@examples(300)
@given(st.binary(max_size=rendezvous.MAX_HELLO))
@example(b"")
@example(b"RG1 agent x y")
@example(b"RG99999999999999999999 agent")
@example(VALID + b" ")
@example(VALID.replace(b"agent", b"AGENT"))
@example(b"RG2 console " + SID.encode() + b" " + b"=" * 44)
@example(b"\xff" * 10)
def test_parse_hello_any_bytes(line):
    _parse(line)


_PIECES = st.one_of(
    st.sampled_from([b"RG2", b"RG1", b"RG3", b"agent", b"console", SID.encode(),
                     SID.upper().encode(), base64.b64encode(bytes(32)),
                     base64.b64encode(bytes(31)), base64.b64encode(bytes(33)), b"", b"\t",
                     b"\x00", b"\xc3\xa9"]),
    st.binary(max_size=50),
)


@examples(300)
@given(st.lists(_PIECES, max_size=6), st.sampled_from([b" ", b"  ", b"\t", b""]))
def test_parse_hello_near_valid(pieces, sep):
    _parse(sep.join(pieces))


@examples(150)
@given(st.sampled_from(rendezvous.ROLES), st.from_regex(r"\A[0-9a-f]{32}\Z"),
       st.binary(min_size=32, max_size=32))
def test_valid_hello_round_trips(role, sid, ticket):
    line = rendezvous.build_hello(role, sid, ticket)
    assert line.endswith(b"\n") and len(line) <= rendezvous.MAX_HELLO
    assert rendezvous.parse_hello(line[:-1]) == rendezvous.Hello(role, sid, ticket)


@examples(300)
@given(st.text(max_size=60))
@example("::1")
@example("1.2.3.4%eth0")
@example("fe80::1%eth0")
@example("=HYPERLINK(\"x\")")
@example("1.2.3.4\n5")
def test_peer_ip(value):
    try:
        ip = rendezvous.parse_peer_ip(value, "relay.example:8443")
    except rendezvous.RelayError as exc:
        assert exc.code == "protocol" and not exc.remote
        return
    assert str(ipaddress.ip_address(ip)) == ip
    assert all(c in "0123456789abcdef.:" for c in ip), ip


class _FakeSock:
    """Answers ``recv(1)`` from a script, then EOF (or silence: a timeout)."""

    def __init__(self, data: bytes, eof: bool) -> None:
        self.data = data
        self.eof = eof

    def settimeout(self, t) -> None:
        pass

    def recv(self, n: int) -> bytes:
        if self.data:
            out, self.data = self.data[:n], self.data[n:]
            return out
        if self.eof:
            return b""
        raise socket.timeout("timed out")


@examples(200)
@given(st.binary(max_size=rendezvous.MAX_HELLO + 20), st.booleans())
@example(b"OK 1.2.3.4\nrest", True)
@example(b"x" * (rendezvous.MAX_HELLO + 5), False)
def test_read_answer_line(data, eof):
    sock = _FakeSock(data, eof)
    try:
        line = rendezvous._read_line(sock, time.monotonic() + 5)
    except OSError:  # socket.timeout is an OSError: no line, closed, or too long
        return
    assert "\n" not in line and len(line) < rendezvous.MAX_HELLO
    assert len(line) == data.index(b"\n")  # exactly the first line, nothing after it
