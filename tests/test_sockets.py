"""common.sockets.recv_exact: the one "read exactly n bytes" every role uses (the resume
handshake, the PROXY header, the SOCKS5 greeting, the mux benchmark)."""

import socket
import time

import pytest

from remote_gevent.common.sockets import recv_exact


def test_recv_exact_joins_short_reads():
    a, b = socket.socketpair()
    with a, b:
        for piece in (b"ab", b"c", b"defg"):
            a.sendall(piece)
        a.sendall(b"hij")
        assert recv_exact(b, 7) == b"abcdefg"
        assert recv_exact(b, 3, time.monotonic() + 5) == b"hij"
        assert recv_exact(b, 0) == b""


def test_recv_exact_early_end_is_eof_error():
    a, b = socket.socketpair()
    with b:
        a.sendall(b"abc")
        a.close()
        with pytest.raises(EOFError, match="after 3 of 5 bytes"):
            recv_exact(b, 5)


def test_recv_exact_deadline_is_socket_timeout():
    a, b = socket.socketpair()
    with a, b:
        a.sendall(b"x")
        started = time.monotonic()
        with pytest.raises(socket.timeout):
            recv_exact(b, 2, started + 0.2)
        assert time.monotonic() - started < 2
        with pytest.raises(socket.timeout):  # a deadline already past: no read at all
            recv_exact(b, 1, started)
