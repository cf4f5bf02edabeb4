"""A peer's CLOSE must not be lost when our send fails first (issue 12, "lost CLOSE").

An operator interrupts a download: the console sends CLOSE and closes its socket with our
data unread, so its kernel (and then the relay) answers our next segment with a reset.
The agent's writer, busy sending, meets that reset before its reader has read the CLOSE
already queued on the socket. The writer used to close the socket under the reader (EBADF
on its next read): the agent resumed for ``resume_timeout`` (10 min by default) holding a
``max_session`` slot, then wrote ``link_lost``. Now the writer only shuts the connection
down; the reader reads what is queued: a CLOSE ends the session as the peer said.

In process (two real tunnels over socketpairs, as test_resume.py) for the mechanism; with
real processes (relay, agent, console interrupted during a bulk transfer) for the defect.
"""

from __future__ import annotations

import socket
import struct
from typing import Any, Tuple

import gevent
import gevent.monkey
import gevent.socket

from remote_gevent.wire import resume_tunnel
from test_resume import FakeRelay, _start, make_pair

_os_close = gevent.monkey.get_original("os", "close")


class TcpRelay(FakeRelay):
    """FakeRelay over loopback TCP pairs: a close with unread data is a real reset."""

    def pair(self) -> Tuple[socket.socket, socket.socket]:
        with gevent.socket.socket() as listener:
            listener.bind(("127.0.0.1", 0))
            listener.listen(1)
            a = gevent.socket.create_connection(listener.getsockname())
            b, _ = listener.accept()
        self.sockets += [a, b]
        return a, b


def _close_and_reset(console: Any) -> None:
    """The interrupted console, without yielding to the hub (so that the agent's reader
    cannot run): its CLOSE goes out, then its socket closes at once with a reset (SO_LINGER
    0, as when data is left unread)."""
    console._send_close_frame("closed_by_operator", "interrupted")
    assert console.close_sent
    _reset_now(console._sock)


def _reset_now(sock: socket.socket) -> None:
    """Close ``sock`` with a reset now: gevent defers the close of a socket (and its
    ``os.close``) to its loop, where the agent's reader would run first."""
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    _os_close(sock.detach())


def _send_until_it_fails(agent: Any) -> None:
    """An agent writer before its reader ran: PINGs (never blocking) until the reset has
    come back and a send fails: the frame stays buffered for a resume."""
    for _ in range(10000):
        agent.ping()
        if agent._link_down:
            return
    raise AssertionError("no send failed")


def test_close_queued_behind_a_reset_ends_the_session():
    """The agent's send fails on the reset before its reader has run: the CLOSE already in
    its socket must still end the session. No relay to resume on: without the fix the
    agent resumes for the whole resume timeout (60 s here), then ends ``link_lost``."""
    relay = TcpRelay()
    console, agent = make_pair(relay, timeout=60.0)
    runners = _start(console, agent)
    relay.down = True  # no path to resume on: only the queued CLOSE can end the agent
    _close_and_reset(console)
    _send_until_it_fails(agent)
    with gevent.Timeout(10, AssertionError("the agent did not read the queued CLOSE")):
        code, reason = runners[1].get()
    assert (code, reason) == ("closed_by_operator", "interrupted")
    assert agent.resumes == 0 and not agent.resuming
    console.close("normal")
    gevent.joinall(runners, timeout=5)


def test_reset_without_close_still_resumes():
    """No CLOSE queued: the agent's reader meets the end of the connection after the
    shutdown and resumes as before, nothing lost."""
    relay = TcpRelay()
    console, agent = make_pair(relay, timeout=60.0)
    runners = _start(console, agent)
    _reset_now(console._sock)  # the console's leg resets (no CLOSE): both ends resume
    _send_until_it_fails(agent)
    with gevent.Timeout(20, AssertionError("no resume")):
        while agent.resumes < 1 or console.resumes < 1:
            gevent.sleep(0.05)
    assert not agent.closed and not console.closed
    console.close("normal")
    gevent.joinall(runners, timeout=5)
    assert runners[0].get()[0] == "normal"


def test_shut_down_under_reader_keeps_queued_bytes_readable():
    """The mechanism itself: queued bytes, then EOF; the descriptor stays open."""
    a, b = gevent.socket.socketpair()
    try:
        b.sendall(b"queued CLOSE")
        got = []

        def reader() -> None:
            while True:
                chunk = a.recv(100)
                got.append(chunk)
                if not chunk:
                    return

        g = gevent.spawn(reader)
        gevent.sleep(0)
        resume_tunnel.shut_down_under_reader(a)
        g.join(5)
        assert g.successful(), g.exception
        assert b"".join(got) == b"queued CLOSE" and got[-1] == b""
        assert a.fileno() >= 0  # not closed: the tunnel's own close does that
        b.close()
        resume_tunnel.shut_down_under_reader(a)  # reset / ENOTCONN: quiet
        a.close()
        resume_tunnel.shut_down_under_reader(a)  # closed already: nothing to do
    finally:
        a.close()
        b.close()


def test_shut_down_under_reader_wakes_a_waiting_reader_with_eof():
    """A reader blocked with nothing queued wakes up with EOF (not EBADF thrown in by
    gevent's own shutdown), so the tunnel's reader resumes at once."""
    a, b = gevent.socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        g = gevent.spawn(a.recv, 100)
        gevent.sleep(0.05)  # the reader waits on the hub
        resume_tunnel.shut_down_under_reader(a)
        assert g.get(timeout=5) == b""
    finally:
        a.close()
        b.close()
