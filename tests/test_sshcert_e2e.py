"""Operator certificates end to end (issue 14): the demo platform (relay and agent
processes, real console processes) set up as ``scripts/demo`` does — a CA from stock
``ssh-keygen``, the device trusting the CA only, the operator's ``-cert.pub`` beside its
key — then a revocation by serial with ``ssh-keygen -k -u`` and SIGHUP."""

import os
import signal
import socket
import subprocess

import pytest

from echo_server import EchoServer
from remote_gevent.crypto import sshcert
from tests.sshcert_helpers import keygen, krl
from tests.test_e2e import WAIT, Procs, finish, free_port, make_platform, wait_for, \
    wait_port, wait_row

pytestmark = pytest.mark.e2e


@pytest.fixture
def certp(rabbit, tmp_path):
    p = make_platform(rabbit, str(tmp_path / "platform"))
    p.start()
    yield p
    p.stop()


@pytest.fixture
def echo():
    server = EchoServer()
    yield server
    server.stop()


@pytest.fixture
def procs():
    p = Procs()
    yield p
    p.close()


def _cert(p):
    with open(p.operator_key_path + "-cert.pub") as f:
        return sshcert.parse_certificate_line(f.read())


def _echo_once(port, payload=b"ping\n"):
    s = socket.create_connection(("127.0.0.1", port), timeout=WAIT)
    s.sendall(payload)
    got = b""
    while len(got) < len(payload):
        chunk = s.recv(64)
        assert chunk, "connection closed"
        got += chunk
    assert got == payload
    return s


def test_certificate_session_revoked_by_serial_then_near_expiry_warning(certp, echo, procs):
    p = certp
    with open(p.authorized_keys) as f:
        assert f.read().startswith('cert-authority,principals="demo-fleet" ')
    cert = _cert(p)
    port = free_port()
    console = procs.start(p.console_argv(
        "forward", p.ident, "-L", "127.0.0.1:%d:127.0.0.1:%d" % (port, echo.port)))
    wait_port(port, console)
    conn = _echo_once(port)

    def agent_log():
        with open(p.agent_log) as f:
            return f.read()
    wait_for(lambda: 'key id "%s@demo-platform" serial %d' % (p.operator, cert.serial)
             in agent_log(), what="key id and serial in the agent log")

    # The administrator revokes the certificate's serial: the open session ends.
    ca_pub = os.path.join(p.pki_dir, "operator_ca.pub")
    krl(os.path.join(p.agent_dir, "revoked_keys"), ca_pub,
        specs=["serial: %d" % cert.serial], update=True)
    os.kill(p.agent_proc.pid, signal.SIGHUP)
    row = wait_row(p, lambda r: r["close_code"] == "revoked", timeout=WAIT)
    assert (row["cert_key_id"], row["cert_serial"]) == (
        "%s@demo-platform" % p.operator, str(cert.serial))
    conn.settimeout(WAIT)
    try:
        assert conn.recv(64) == b""
    except ConnectionResetError:
        pass
    conn.close()

    # A new console says clearly why.
    status, err = finish(procs.start(p.console_argv("stdio", p.ident,
                                                    "127.0.0.1:%d" % echo.port)))
    assert status == 3, err
    assert "revoked" in err and "has been revoked on this device" in err, err

    # A new certificate (new serial) that expires in 5 minutes: served, with a warning.
    keygen("-s", os.path.join(p.pki_dir, "operator_ca"), "-I", "short", "-n", "demo-fleet",
           "-V", "-1m:+5m", "-z", str(cert.serial + 1), p.operator_key_path + ".pub")
    proc = procs.start(p.console_argv("stdio", p.ident, "127.0.0.1:%d" % echo.port),
                       stdin=subprocess.PIPE)
    proc.stdin.write(b"pong\n")
    proc.stdin.flush()
    assert proc.stdout.readline() == b"pong\n"
    proc.stdin.close()
    status, err = finish(proc)
    assert "operator certificate" in err and "expires in" in err, err
    assert "ask for a new one" in err, err


def test_fleet_revocation_published_by_the_console_ends_the_session(certp, echo, procs,
                                                                      tmp_path):
    """`ssh-keygen -k -z` + `ssh-keygen -Y sign` by the CA, `revoke-fleet` by the console:
    the device (provisioned as the demo does) ends the certificate's open session."""
    p = certp
    cert = _cert(p)
    port = free_port()
    console = procs.start(p.console_argv(
        "forward", p.ident, "-L", "127.0.0.1:%d:127.0.0.1:%d" % (port, echo.port)))
    wait_port(port, console)
    conn = _echo_once(port)
    ca = os.path.join(p.pki_dir, "operator_ca")
    path = krl(tmp_path / "fleet.krl", ca + ".pub", specs=["serial: %d" % cert.serial])
    keygen("-k", "-u", "-z", "1", "-f", path)
    keygen("-Y", "sign", "-n", "remote-gevent-krl", "-f", ca, path)
    status, err = finish(procs.start(p.console_argv("revoke-fleet", path)))
    assert status == 0 and "published" in err, err
    try:
        row = wait_row(p, lambda r: r["close_code"] == "revoked", timeout=WAIT)
    except AssertionError:
        with open(p.agent_log) as f:
            raise AssertionError(f.read()[-3000:]) from None
    assert row["cert_serial"] == str(cert.serial)
    conn.close()
