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

import os
import signal
import socket
import struct
import time
from typing import Any, Tuple

import gevent
import gevent.monkey
import gevent.socket
import pytest

from remote_gevent.crypto import tunnel_crypto
from remote_gevent.wire import mux, mux_frames, resume_tunnel
from test_e2e import (  # noqa: F401 - fixtures used by name
    WAIT,
    history_rows,
    make_platform,
    procs,
    wait_for,
)
from platform_helpers import script_server
from test_resume import FakeRelay, _start, _start_plain, make_pair

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


def _close_and_reset(closer: Any) -> None:
    """The interrupted end, without yielding to the hub (so that the other end's reader
    cannot run): its CLOSE goes out, then its socket closes at once with a reset
    (SO_LINGER 0, as when data is left unread)."""
    closer._send_close_frame("closed_by_operator", "interrupted")
    assert closer.close_sent
    _reset_now(closer._sock)


def _reset_now(sock: socket.socket) -> None:
    """Close ``sock`` with a reset now: gevent defers the close of a socket (and its
    ``os.close``) to its loop, where the agent's reader would run first."""
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    _os_close(sock.detach())


def _send_until_it_fails(tunnel: Any) -> None:
    """A writer before the reader ran: PINGs (never blocking) until the reset has come
    back and a send fails: the frame stays buffered for a resume."""
    for _ in range(10000):
        tunnel.ping()
        if tunnel._link_down:
            return
    raise AssertionError("no send failed")


@pytest.mark.parametrize("sender", ["agent", "console"])
def test_close_queued_behind_a_reset_ends_the_session(sender):
    """One end's send fails on the reset before its reader has run: the CLOSE already in
    its socket must still end the session. The agent downloading to an interrupted
    console, or the console uploading (``push``) to an agent that ends the session. No
    relay to resume on: without the fix the sender resumes for the whole resume timeout
    (60 s here), then ends ``link_lost``."""
    relay = TcpRelay()
    console, agent = make_pair(relay, timeout=60.0)
    runners = _start(console, agent)
    relay.down = True  # no path to resume on: only the queued CLOSE can end the sender
    tunnel, closer, runner = (agent, console, runners[1]) if sender == "agent" else \
        (console, agent, runners[0])
    _close_and_reset(closer)
    _send_until_it_fails(tunnel)
    with gevent.Timeout(10, AssertionError("the %s did not read the queued CLOSE" % sender)):
        code, reason = runner.get()
    assert (code, reason) == ("closed_by_operator", "interrupted")
    assert tunnel.resumes == 0 and not tunnel.resuming
    closer.close("normal")
    gevent.joinall(runners, timeout=5)


@pytest.mark.parametrize("sender", ["agent", "console"])
def test_close_queued_behind_a_reset_ends_a_session_without_resume(sender):
    """The same race with resume off (``resume_timeout: 0``, or a peer without resume):
    the failed send used to close the socket under the reader, the queued CLOSE was lost
    and the history said ``relay_lost`` instead of the peer's code."""
    relay = TcpRelay()
    a, b = relay.pair()
    cpk, csk = tunnel_crypto.kx_keypair()
    apk, ask = tunnel_crypto.kx_keypair()
    sid = "ab" * 16
    ctx, crx = tunnel_crypto.derive_keys("console", cpk, csk, apk, sid)
    atx, arx = tunnel_crypto.derive_keys("agent", apk, ask, cpk, sid)
    cipher = tunnel_crypto.XCHACHA20POLY1305
    console = mux.Tunnel(a, *tunnel_crypto.make_sealer_opener(ctx, crx, cipher), "console")
    agent = mux.Tunnel(b, *tunnel_crypto.make_sealer_opener(atx, arx, cipher), "agent")
    runners = _start_plain(console, agent)
    tunnel, closer, runner = (agent, console, runners[1]) if sender == "agent" else \
        (console, agent, runners[0])
    _close_and_reset(closer)
    for _ in range(10000):  # a writer before the reader ran, until a send fails
        try:
            tunnel._send_frame(mux_frames.PING, 0, b"\0" * 8)
        except mux.TunnelClosed:
            break
    else:
        raise AssertionError("no send failed")
    with gevent.Timeout(10, AssertionError("the %s did not end" % sender)):
        code, reason = runner.get()
    assert (code, reason) == ("closed_by_operator", "interrupted")
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


# --------------------------------------------------------------------------- real processes

BULK_SERVER = """
import socket, socketserver
class Bulk(socketserver.BaseRequestHandler):
    def handle(self):
        block = b"x" * 65536
        try:
            while True:
                self.request.sendall(block)
        except OSError:
            return
server = socketserver.ThreadingTCPServer(("127.0.0.1", 0), Bulk)
server.daemon_threads = True
print(server.server_address[1], flush=True)
server.serve_forever()
"""

#: How long the agent may take to end the interrupted session (the resume timeout is 600 s).
PROMPT = 20.0
ROUNDS = 3


@pytest.fixture(scope="module")
def bulk_port():
    """A device-side service that writes as fast as it can to whoever connects."""
    with script_server(BULK_SERVER) as port:
        yield port


@pytest.fixture(scope="module")
def plat(rabbit, tmp_path_factory):
    """One session at a time, resume on with a long timeout on both ends (a session the
    agent wrongly keeps resuming would hold the only slot for 10 minutes)."""
    p = make_platform(rabbit, str(tmp_path_factory.mktemp("lost-close")),
                      remote={"max_session": 1, "queue_timeout": 5, "resume_timeout": 600},
                      console={"keepalive_interval": 1, "resume_timeout": 600})
    p.start()
    yield p
    p.stop()


class Download:
    """``console stdio`` from the bulk service, its output read (and dropped) at once."""

    def __init__(self, runner: Any, p: Any, port: int) -> None:
        self.proc = runner.start(p.console_argv("stdio", "--master", "no", p.ident,
                                               "127.0.0.1:%d" % port), bufsize=0)
        self.received = 0
        self._reader = gevent.spawn(self._read)

    def _read(self) -> None:
        while True:
            chunk = self.proc.stdout.read(1 << 20)
            if not chunk:
                return
            self.received += len(chunk)

    def flowing(self, n: int) -> None:
        wait_for(lambda: self.received >= n, what="%d bytes downloaded" % n)

    def interrupt(self, sig: int = signal.SIGINT) -> None:
        """The operator's Ctrl-C; the console must exit (its output ends first)."""
        self.proc.send_signal(sig)
        self._reader.join(WAIT)
        assert self._reader.ready(), "the console's output did not end"
        self.proc.wait(WAIT)


def _log_since(path: str, offset: int) -> str:
    with open(path, "rb") as f:
        f.seek(offset)
        return f.read().decode("utf-8", "replace")


@pytest.mark.e2e
def test_interrupted_download_ends_promptly_and_frees_the_slot(plat, bulk_port, procs):  # noqa: F811
    """Ctrl-C on a console that is downloading: its CLOSE, then a reset (data unread). The
    agent's session must end within seconds with the console's close code, not resume for
    the resume timeout holding the only ``max_session`` slot. A few rounds: which of the
    agent's writer (reset) and reader (CLOSE) runs first is a race the writer often wins.

    The relay had the same defect on its side (a failed write to the console ended both
    directions before the console's queued CLOSE was forwarded: relay/splicer.py); now
    the relay moves the CLOSE on first (tests/test_relay.py
    ``test_bytes_queued_before_a_reset_still_reach_the_other_side``)."""
    p = plat
    for _round in range(ROUNDS):
        before = len(history_rows(p))
        log_offset = os.path.getsize(p.agent_log)
        download = Download(procs, p, bulk_port)
        download.flowing(32 << 20)  # at full speed now
        download.interrupt()
        t0 = time.monotonic()
        try:
            rows = wait_for(lambda before=before: history_rows(p)[before:],
                            timeout=PROMPT, what="the interrupted session's history row")
        except AssertionError:
            agent_log = _log_since(p.agent_log, log_offset)
            raise AssertionError("the agent did not end the session within %.0f s: %s"
                                 % (PROMPT, agent_log[-3000:])) from None
        assert len(rows) == 1, rows
        assert rows[0]["close_code"] == "normal", rows[0]  # stdio's Ctrl-C: normal
        assert rows[0]["resumes"] in ("", "0"), rows[0]
        print("round %d: %s %.1f s after the console's exit"
              % (_round, rows[0]["close_code"], time.monotonic() - t0))
    # the only slot is free: one more session starts at once (queued for at most 5 s)
    download = Download(procs, p, bulk_port)
    download.flowing(1 << 20)
    download.interrupt(signal.SIGTERM)
