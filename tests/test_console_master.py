"""ControlMaster / ControlPersist for the console (remote_gevent/console/master.py).

Real processes on loopback: a DemoPlatform (relay + agent) on the suite's RabbitMQ, a
``remote-gevent-console master`` process, ``stdio`` clients, stock OpenSSH ``ssh`` with
a ProxyCommand, and an echo target in this (monkey-patched) process. Every wait is
bounded. Fast unit tests of the import-free client half come first.
"""

from __future__ import annotations

import os
import shlex
import signal
import socket
import subprocess
import sys
import tempfile
import time
from typing import Dict, List

import gevent
import gevent.server
import pytest

from remote_gevent.console import master as cm
from test_e2e import (  # noqa: F401  (sshd: a fixture, used by name)
    WAIT,
    Procs,
    make_platform,
    sshd,
    wait_for,
)

HEAVY = ("gevent", "yaml", "click", "amqp", "nacl", "paramiko", "cryptography")


# --------------------------------------------------------------------------- unit


def test_cheap_settings_parse(tmp_path):
    cfg = tmp_path / "console.yaml"
    cfg.write_text("server_id: fr04  # platform\ncontrol_socket_dir: 'ctl'\n"
                   "amqp:\n  server_id: nested\n")
    s = cm.read_settings(str(cfg))
    assert s["control_socket_dir"] == "ctl" and s["server_id"] == "fr04"  # nested ignored
    assert cm.settings_socket(s, "dev1").startswith(str(tmp_path / "ctl" / "fr04-dev1-"))
    cfg.write_text("control_socket_dir: {a: 1}\n")
    assert cm.read_settings(str(cfg)) is None  # not understood: the full path decides
    cfg.write_text("control_socket_dir: null\n")
    assert cm.settings_socket(cm.read_settings(str(cfg)), "d").startswith(
        cm.default_control_dir())


def test_fast_argv_parse():
    p = cm._parse_fast_argv
    assert p(["-c", "x.yaml", "stdio", "dev", "127.0.0.1:22"]) == (
        "x.yaml", "dev", "127.0.0.1:22", None)
    assert p(["-vv", "--config=y", "stdio", "--master", "auto", "d", "@sftp"]) == (
        "y", "d", "@sftp", "auto")
    assert p(["stdio", "dev", "[::1]:22"]) is None          # normalized by the full path
    assert p(["forward", "dev", "-L", "1:a:2"]) is None
    assert p(["stdio", "dev", "h:99999"]) is None
    assert p(["stdio", "--master", "bogus", "d", "h:1"]) is None


def test_peer_credentials_checked():
    a, b = socket.socketpair(socket.AF_UNIX)
    try:
        assert cm.peer_cred(a)[0] == os.getpid()
        assert cm.peer_allowed(a)
        assert not cm.peer_allowed(a, uid=os.getuid() + 1)
    finally:
        a.close()
        b.close()


def test_control_dir_must_be_private(tmp_path):
    d = tmp_path / "ctl"
    cm.ensure_dir(str(d))
    assert (os.stat(str(d)).st_mode & 0o777) == 0o700
    os.chmod(str(d), 0o755)
    with pytest.raises(cm.ControlError, match="accessible by others"):
        cm.ensure_dir(str(d))
    with pytest.raises(cm.ControlError, match="too long"):
        cm.socket_path("/" + "x" * 120, "fr04", "dev", "0" * 16)


# --------------------------------------------------------------------------- platform


class Echo:
    """TCP echo target that greets each connection with one byte (like an sshd banner)."""

    GREETING = b"!"

    def __init__(self) -> None:
        self.server = gevent.server.StreamServer(("127.0.0.1", 0), self.handle)
        self.server.start()
        self.port = self.server.server_port
        self.target = "127.0.0.1:%d" % self.port

    def handle(self, sock: socket.socket, addr: object) -> None:
        sock.sendall(self.GREETING)
        while True:
            data = sock.recv(65536)
            if not data:
                sock.shutdown(socket.SHUT_WR)
                return
            sock.sendall(data)


@pytest.fixture(scope="module")
def echo():
    e = Echo()
    yield e
    e.server.stop()


@pytest.fixture(scope="module")
def ctl_dir():
    # Short on purpose: sun_path holds 107 bytes and pytest's tmp paths are long.
    d = tempfile.mkdtemp(prefix="rgcm-")
    yield os.path.join(d, "ctl")
    subprocess.run(["rm", "-rf", d], check=False)


@pytest.fixture(scope="module")
def platform(rabbit, tmp_path_factory, ctl_dir):
    p = make_platform(rabbit, str(tmp_path_factory.mktemp("cmplatform")),
                      console={"control_socket_dir": ctl_dir})
    p.start()
    yield p
    p.stop()


@pytest.fixture
def procs():
    p = Procs()
    yield p
    p.close()


def sock_path(p, ctl_dir: str) -> str:
    """The master socket of ``p``'s device, as the full path computes it."""
    from remote_gevent.console import config

    path = cm.config_socket(config.load(p.console_config), p.ident)
    assert os.path.dirname(path) == ctl_dir
    return path


def debug_env(**extra: str) -> Dict[str, str]:
    env = dict(os.environ, **extra)
    env[cm.ENV_DEBUG] = "1"
    return env


def start_master(procs: Procs, p, ctl_dir: str, *args: str) -> subprocess.Popen:
    proc = procs.start(p.console_argv("master", p.ident, *args))
    path = sock_path(p, ctl_dir)

    def up() -> bool:
        if proc.poll() is not None:
            raise AssertionError("master exited %s: %s" % (proc.returncode,
                                                           proc.stderr.read().decode()))
        return os.path.exists(path) and _connectable(path)

    wait_for(up, WAIT, what="the master's socket")
    return proc


def _connectable(path: str) -> bool:
    s = socket.socket(socket.AF_UNIX)
    try:
        s.connect(path)
        return True
    except OSError:
        return False
    finally:
        s.close()


def stdio_run(p, target: str, data: bytes, *extra: str, timeout: float = WAIT
              ) -> subprocess.CompletedProcess:
    return subprocess.run(p.console_argv("stdio", *extra, p.ident, target), input=data,
                          capture_output=True, timeout=timeout, env=debug_env())


def stop_master(proc: subprocess.Popen) -> str:
    proc.send_signal(signal.SIGTERM)
    _, err = proc.communicate(timeout=WAIT)
    assert proc.returncode == 0, err
    return err.decode()


def modules_of(stderr: bytes) -> List[str]:
    for line in stderr.decode().splitlines():
        if "debug: via master" in line:
            return line.split("modules: ", 1)[1].split()
    raise AssertionError("the client did not go through a master: %r" % stderr)


# --------------------------------------------------------------------------- end to end


@pytest.mark.e2e
def test_stdio_and_ssh_through_master_fast_path(platform, ctl_dir, echo, sshd, procs):  # noqa: F811
    m = start_master(procs, platform, ctl_dir, "--persist", "0")
    path = sock_path(platform, ctl_dir)
    assert os.stat(path).st_mode & 0o777 == 0o600
    assert os.stat(ctl_dir).st_mode & 0o777 == 0o700

    done = stdio_run(platform, echo.target, b"hello through the master")
    assert done.returncode == 0, done.stderr
    assert done.stdout == Echo.GREETING + b"hello through the master"
    loaded = modules_of(done.stderr)
    assert not [m for m in loaded if m.split(".")[0] in HEAVY], loaded

    # two concurrent clients on the one session
    a = procs.start(platform.console_argv("stdio", platform.ident, echo.target),
                    stdin=subprocess.PIPE, env=debug_env())
    b = procs.start(platform.console_argv("stdio", platform.ident, echo.target),
                    stdin=subprocess.PIPE, env=debug_env())
    for proc, word in ((a, b"alpha"), (b, b"bravo")):
        assert proc.stdout.read(1) == Echo.GREETING
        proc.stdin.write(word)
        proc.stdin.flush()
    for proc, word in ((a, b"alpha"), (b, b"bravo")):
        assert proc.stdout.read(len(word)) == word
        proc.stdin.close()
        assert proc.wait(WAIT) == 0
        assert modules_of(proc.stderr.read())

    # stock OpenSSH with the console as ProxyCommand, through the master
    proxy = " ".join(shlex.quote(x) for x in platform.console_argv(
        "stdio", "%n", "127.0.0.1:%d" % sshd.port))
    ran = subprocess.run(sshd.ssh_argv(proxy, platform.ident, "echo", "via-master"),
                         capture_output=True, timeout=WAIT, env=debug_env())
    assert ran.returncode == 0, ran.stderr
    assert ran.stdout.strip() == b"via-master"
    assert b"debug: via master" in ran.stderr

    # a target outside the device's allow-list: ERR target_not_permitted, exit 3
    s = socket.socket(socket.AF_UNIX)
    s.connect(path)
    s.sendall(b"OPEN 10.9.8.7:22\n")
    assert s.makefile("rb").readline().startswith(b"ERR target_not_permitted")
    s.close()
    refused = stdio_run(platform, "10.9.8.7:22", b"")
    assert refused.returncode == 3, refused.stderr
    assert b"target_not_permitted" in refused.stderr

    err = stop_master(m)
    assert "streams served" in err
    assert not os.path.exists(path)


@pytest.mark.e2e
def test_persist_timeout_ends_master_and_removes_socket(platform, ctl_dir, echo, procs):
    m = start_master(procs, platform, ctl_dir, "--persist", "1")
    done = stdio_run(platform, echo.target, b"x")
    assert done.stdout == Echo.GREETING + b"x"
    started = time.monotonic()
    assert m.wait(WAIT) == 0
    assert time.monotonic() - started < 20  # --persist 1, not the default 600 s (loaded box)
    assert "persist" in m.stderr.read().decode()
    assert not os.path.exists(sock_path(platform, ctl_dir))


@pytest.mark.e2e
def test_sigkill_leaves_stale_socket_fallback_and_replacement(platform, ctl_dir, echo, procs):
    path = sock_path(platform, ctl_dir)
    m = start_master(procs, platform, ctl_dir, "--persist", "0")
    m.kill()
    m.wait(WAIT)
    assert os.path.exists(path) and not _connectable(path)  # stale
    # stdio falls back to a session of its own, quietly
    done = stdio_run(platform, echo.target, b"own session")
    assert done.returncode == 0, done.stderr
    assert done.stdout == Echo.GREETING + b"own session"
    assert b"via master" not in done.stderr and b"Traceback" not in done.stderr
    # the next master replaces the stale socket
    m2 = start_master(procs, platform, ctl_dir, "--persist", "0")
    done = stdio_run(platform, echo.target, b"again")
    assert done.stdout == Echo.GREETING + b"again"
    assert modules_of(done.stderr)
    # a second master for the same device is refused while the first runs
    dup = subprocess.run(platform.console_argv("master", platform.ident), capture_output=True,
                         timeout=WAIT)
    assert dup.returncode == 1 and b"already runs" in dup.stderr
    stop = subprocess.run(platform.console_argv("master", platform.ident, "--stop"),
                          capture_output=True, timeout=WAIT)
    assert stop.returncode == 0, stop.stderr
    assert m2.wait(WAIT) == 0
    assert not os.path.exists(path)


@pytest.mark.e2e
def test_auto_starts_a_background_master(platform, ctl_dir, echo):
    path = sock_path(platform, ctl_dir)
    assert not os.path.exists(path)
    first = stdio_run(platform, echo.target, b"one", "--master", "auto")
    try:
        assert first.returncode == 0, first.stderr
        assert first.stdout == Echo.GREETING + b"one"
        assert modules_of(first.stderr)  # served by the new master
        assert _connectable(path)
        second = stdio_run(platform, echo.target, b"two")
        assert second.stdout == Echo.GREETING + b"two"
        assert modules_of(second.stderr)
    finally:
        subprocess.run(platform.console_argv("master", platform.ident, "--stop"),
                       capture_output=True, timeout=WAIT)
    wait_for(lambda: not os.path.exists(path), WAIT, what="the auto master to exit")


NOBODY_CONNECT = r"""
import os, socket, sys
os.setgid(65534); os.setuid(65534)
s = socket.socket(socket.AF_UNIX)
try:
    s.connect(sys.argv[1])
except OSError as exc:
    print("connect-error", exc.errno); sys.exit(0)
try:
    s.sendall(b"OPEN %s\n" % sys.argv[2].encode())
except OSError:
    pass  # the master may answer and close before reading the request
print(s.makefile("rb").readline().decode().strip())
"""


@pytest.mark.e2e
@pytest.mark.skipif(os.geteuid() != 0, reason="needs root to run a client as nobody")
def test_other_uid_cannot_use_the_socket(platform, ctl_dir, echo, procs):
    m = start_master(procs, platform, ctl_dir, "--persist", "0")
    path = sock_path(platform, ctl_dir)

    def as_nobody() -> str:
        r = subprocess.run([sys.executable, "-c", NOBODY_CONNECT, path, echo.target],
                           capture_output=True, text=True, timeout=WAIT)
        assert r.returncode == 0, r.stderr
        return r.stdout.strip()

    os.chmod(os.path.dirname(ctl_dir), 0o711)  # mkdtemp's 0700 would hide everything
    try:
        assert as_nobody().startswith("connect-error")  # 0700 directory
        os.chmod(ctl_dir, 0o711)
        assert as_nobody().startswith("connect-error")  # 0600 socket
        os.chmod(path, 0o666)                           # both opened by mistake:
        assert as_nobody().startswith("ERR permission_denied")  # SO_PEERCRED still says no
    finally:
        os.chmod(os.path.dirname(ctl_dir), 0o700)
        os.chmod(ctl_dir, 0o700)
        if os.path.exists(path):
            os.chmod(path, 0o600)
    stop_master(m)
