"""``stdio`` ends with a normal close on SIGHUP, SIGTERM, EOF on stdin and a closed
stdout (issue 12): an ``ssh`` logout through a ProxyCommand must be told apart from a
lost relay in the agent's history. Real processes: relay, agent, console, OpenSSH.

Without the fix, SIGHUP (what ``ssh`` sends its ProxyCommand when it exits) killed the
console before it sent CLOSE: the agent recorded ``relay_lost``; a closed stdout was
noticed only at the next write, which an idle ssh session never makes.
"""

from __future__ import annotations

import signal
import subprocess
import time
from typing import Dict, List

import pytest

from platform_helpers import script_server
from test_e2e import (  # noqa: F401 - fixtures used by name
    Procs,
    WAIT,
    finish,
    history_rows,
    make_platform,
    procs,
    proxy_command,
    read_exactly,
    ssh_banner,
    sshd,
    stdio,
    wait_for,
)

pytestmark = pytest.mark.e2e


@pytest.fixture(scope="module")
def plat(rabbit, tmp_path_factory):
    p = make_platform(rabbit, str(tmp_path_factory.mktemp("stdio-close")))
    p.start()
    yield p
    p.stop()


def _one_new_row(p, before: int) -> Dict[str, str]:
    rows: List[Dict[str, str]] = wait_for(lambda: history_rows(p)[before:], timeout=WAIT,
                                          what="the session's history row")
    time.sleep(0.3)  # a second row (a bug) would show up by now
    rows = history_rows(p)[before:]
    assert len(rows) == 1, rows
    return rows[0]


@pytest.mark.parametrize("sig", [signal.SIGHUP, signal.SIGTERM])
def test_signal_ends_stdio_with_normal_close(plat, sshd, procs: Procs, sig):  # noqa: F811 (fixtures)
    before = len(history_rows(plat))
    console = stdio(procs, plat, "127.0.0.1:%d" % sshd.port)
    ssh_banner(console)
    console.send_signal(sig)
    finish(console)
    row = _one_new_row(plat, before)
    assert row["close_code"] == "normal", row


def test_stdin_eof_ends_stdio_with_normal_close(plat, sshd, procs: Procs):  # noqa: F811 (fixtures)
    before = len(history_rows(plat))
    console = stdio(procs, plat, "127.0.0.1:%d" % sshd.port)
    ssh_banner(console)
    console.stdin.close()
    status, err = finish(console)
    assert status == 0, err
    assert _one_new_row(plat, before)["close_code"] == "normal"


ECHO_SERVER = """
import socketserver, sys
class Echo(socketserver.BaseRequestHandler):
    def handle(self):
        while True:
            data = self.request.recv(65536)
            if not data:
                return
            self.request.sendall(data)
server = socketserver.ThreadingTCPServer(("127.0.0.1", 0), Echo)
print(server.server_address[1], flush=True)
server.serve_forever()
"""


@pytest.fixture(scope="module")
def echo_port():
    with script_server(ECHO_SERVER) as port:
        yield port


def test_closed_stdout_ends_stdio_with_normal_close(plat, echo_port, procs: Procs):  # noqa: F811 (fixtures)
    """An idle stream writes nothing to our stdout, yet its reader going away must end
    the session (and soon): nothing else would ever notice."""
    before = len(history_rows(plat))
    console = stdio(procs, plat, "127.0.0.1:%d" % echo_port)
    console.stdin.write(b"ping\n")
    console.stdin.flush()
    assert read_exactly(console.stdout, 5) == b"ping\n"
    console.stdout.close()
    # stdin stays open (communicate() would close it: an EOF that ends the stream too)
    assert console.wait(10) == 0, console.stderr.read()
    assert _one_new_row(plat, before)["close_code"] == "normal"


def test_ssh_logout_through_proxycommand_is_a_normal_close(plat, sshd):  # noqa: F811 (fixtures)
    before = len(history_rows(plat))
    done = subprocess.run(
        sshd.ssh_argv(proxy_command(plat, "127.0.0.1:%d" % sshd.port), plat.ident,
                      "echo", "bye"), capture_output=True, timeout=WAIT)
    assert done.returncode == 0, done.stderr
    assert done.stdout == b"bye\n"
    assert _one_new_row(plat, before)["close_code"] == "normal"
