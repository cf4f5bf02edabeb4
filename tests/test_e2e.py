"""End to end: real processes, real clients, loopback only (issue 4).

The platform is :class:`remote_gevent.demo.platform.DemoPlatform` — the same code as
``scripts/demo`` — on the suite's private RabbitMQ node (``rabbit`` fixture): a relay
process (or an in-process relay with a capture/fault hook), the agent process, and
``remote-gevent-console`` processes driven by stock OpenSSH ``ssh``/``sftp`` and
``curl``. An ``sshd`` and an HTTP server started by the tests are the device's services.

Every wait is bounded. Close codes are checked in the agent's history
(``history.read``), the product's own record of how each session ended.
"""

from __future__ import annotations

import hashlib
import http.server
import os
import secrets
import shlex
import signal
import socket
import subprocess
import sys
import time
from typing import Any, Dict, List, Optional

import pytest

from remote_gevent import history
from remote_gevent.demo.platform import DemoPlatform, port_open

pytestmark = pytest.mark.e2e

SSHD = "/usr/sbin/sshd"
MIB = 1024 * 1024
WAIT = 30.0  # upper bound for any single wait


# --------------------------------------------------------------------------- helpers


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_for(predicate, timeout: float = WAIT, interval: float = 0.05, what: str = "condition"):
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError("timed out after %.1f s waiting for %s" % (timeout, what))
        time.sleep(interval)


def wait_port(port: int, proc: Optional[subprocess.Popen] = None, timeout: float = WAIT) -> None:
    def ready() -> bool:
        if proc is not None and proc.poll() is not None:
            raise AssertionError("process exited with %s before listening on %d: %s" % (
                proc.returncode, port, _output(proc)))
        return port_open("127.0.0.1", port, timeout=0.2)

    wait_for(ready, timeout, what="127.0.0.1:%d to listen" % port)


def _output(proc: subprocess.Popen) -> str:
    for stream in (proc.stderr, proc.stdout):
        if stream is not None and proc.poll() is not None:
            try:
                return stream.read().decode("utf-8", "replace")[-2000:]
            except (OSError, ValueError):
                pass
    return ""


def sha256_file(path: str) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while True:
            chunk = f.read(4 * MIB)
            if not chunk:
                return h.hexdigest()
            h.update(chunk)


def random_file(path: str, size: int) -> str:
    """Write ``size`` random bytes; return their sha256."""
    h = hashlib.sha256()
    block = 4 * MIB
    with open(path, "wb") as f:
        left = size
        while left:
            chunk = os.urandom(min(block, left))
            h.update(chunk)
            f.write(chunk)
            left -= len(chunk)
    return h.hexdigest()


def history_rows(p: DemoPlatform) -> List[Dict[str, str]]:
    return history.read(p.history_path)


def wait_row(p: DemoPlatform, predicate, timeout: float = WAIT, what: str = "history row"
             ) -> Dict[str, str]:
    def find():
        for row in history_rows(p):
            if predicate(row):
                return row
        return None

    return wait_for(find, timeout, interval=0.1, what=what)


def new_rows(p: DemoPlatform, before: int) -> List[Dict[str, str]]:
    return history_rows(p)[before:]


def kill_quietly(proc: Optional[subprocess.Popen], sig: int = signal.SIGTERM) -> None:
    if proc is None or proc.poll() is not None:
        return
    try:
        proc.send_signal(signal.SIGCONT)
        proc.send_signal(sig)
        proc.wait(10)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait(10)


class Procs:
    """Console processes of one test: all ended at teardown, whatever happened."""

    def __init__(self) -> None:
        self.procs: List[subprocess.Popen] = []

    def start(self, argv: List[str], **kwargs: Any) -> subprocess.Popen:
        kwargs.setdefault("stdin", subprocess.DEVNULL)
        kwargs.setdefault("stdout", subprocess.PIPE)
        kwargs.setdefault("stderr", subprocess.PIPE)
        proc = subprocess.Popen(argv, **kwargs)
        self.procs.append(proc)
        return proc

    def close(self) -> None:
        for proc in self.procs:
            kill_quietly(proc)
            for stream in (proc.stdin, proc.stdout, proc.stderr):
                if stream is not None:
                    stream.close()


@pytest.fixture
def procs():
    p = Procs()
    yield p
    p.close()


def unique(prefix: str) -> str:
    return "%s-%s" % (prefix, secrets.token_hex(3))


def make_platform(rabbit, directory: str, **kwargs: Any) -> DemoPlatform:
    """A platform on the suite's broker: own device ident and operator, short keepalive."""
    remote = {"keepalive_interval": 1}
    remote.update(kwargs.pop("remote", {}))
    p = DemoPlatform(directory, ident=unique("e2e"), vhost=rabbit.vhost, rabbit=rabbit.node,
                     operator=unique("op"), remote=remote, **kwargs)
    return p


# --------------------------------------------------------------------------- services


class Sshd:
    """A real OpenSSH server on 127.0.0.1 that accepts one test client key (root ok)."""

    def __init__(self, directory: str) -> None:
        self.dir = directory
        self.port = free_port()
        self.client_key = os.path.join(directory, "client_ed25519")
        self.known_hosts = os.path.join(directory, "known_hosts")
        host_key = os.path.join(directory, "host_ed25519")
        for path in (host_key, self.client_key):
            subprocess.run(["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-f", path],
                           check=True, timeout=WAIT)
        authorized = os.path.join(directory, "authorized_keys")
        with open(self.client_key + ".pub") as src, open(authorized, "w") as dst:
            dst.write(src.read())
        self.config = os.path.join(directory, "sshd_config")
        with open(self.config, "w") as f:
            f.write("\n".join([
                "HostKey %s" % host_key,
                "AuthorizedKeysFile %s" % authorized,
                "PidFile %s" % os.path.join(directory, "sshd.pid"),
                "PermitRootLogin prohibit-password",
                "PubkeyAuthentication yes",
                "PasswordAuthentication no",
                "KbdInteractiveAuthentication no",
                "UsePAM no",
                "StrictModes no",
                "Subsystem sftp internal-sftp",
                "LogLevel ERROR",
                "",
            ]))
        if os.geteuid() == 0:
            os.makedirs("/run/sshd", mode=0o755, exist_ok=True)  # privilege separation dir
        self.proc = subprocess.Popen(
            [SSHD, "-D", "-e", "-f", self.config, "-p", str(self.port),
             "-o", "ListenAddress=127.0.0.1"],
            stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
        wait_port(self.port, self.proc)

    def ssh_argv(self, proxy_command: Optional[str], host: str, *command: str) -> List[str]:
        """Stock ``ssh`` to ``root@host``; through ``proxy_command``, or direct when None."""
        argv = ["ssh", "-F", "/dev/null", "-i", self.client_key, "-o", "BatchMode=yes",
                "-o", "IdentitiesOnly=yes", "-o", "StrictHostKeyChecking=no",
                "-o", "UserKnownHostsFile=%s" % self.known_hosts, "-o", "LogLevel=ERROR"]
        if proxy_command is None:
            argv += ["-p", str(self.port)]
        else:
            argv += ["-o", "ProxyCommand=%s" % proxy_command]
        return argv + ["root@%s" % host] + list(command)

    def stop(self) -> None:
        kill_quietly(self.proc)
        if self.proc.stderr is not None:
            self.proc.stderr.close()


@pytest.fixture(scope="module")
def sshd(tmp_path_factory):
    if not os.access(SSHD, os.X_OK):
        pytest.skip("%s is not installed (openssh-server)" % SSHD)
    server = Sshd(str(tmp_path_factory.mktemp("sshd")))
    yield server
    server.stop()


class _QuietHandler(http.server.SimpleHTTPRequestHandler):
    def log_message(self, fmt: str, *args: Any) -> None:
        pass


class HttpServer:
    """``python -m http.server`` on 127.0.0.1 serving a directory with a few random files."""

    def __init__(self, directory: str) -> None:
        self.dir = directory
        self.sha: Dict[str, str] = {}
        for name, size in (("small.bin", 64 * 1024), ("medium.bin", 8 * MIB),
                           ("big.bin", 48 * MIB)):
            self.sha[name] = random_file(os.path.join(directory, name), size)
        with open(os.path.join(directory, "index.html"), "w") as f:
            f.write("<h1>device web ui</h1>\n")
        self.port = free_port()
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "http.server", str(self.port), "--bind", "127.0.0.1",
             "--directory", directory],
            stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        wait_port(self.port, self.proc)

    def stop(self) -> None:
        kill_quietly(self.proc)


@pytest.fixture(scope="module")
def web(tmp_path_factory):
    server = HttpServer(str(tmp_path_factory.mktemp("www")))
    yield server
    server.stop()


# --------------------------------------------------------------------------- platforms


@pytest.fixture(scope="module")
def platform(rabbit, tmp_path_factory):
    """The shared platform: default limits, relay process, agent process."""
    p = make_platform(rabbit, str(tmp_path_factory.mktemp("platform")))
    p.start()
    yield p
    p.stop()


def proxy_command(p: DemoPlatform, target: str) -> str:
    return " ".join(shlex.quote(a) for a in p.console_argv("stdio", "%n", target))


# --------------------------------------------------------------------------- sshd sanity


def test_sshd_fixture_direct(sshd):
    """The test sshd itself works (so a failure below is the tunnel's, not the fixture's)."""
    done = subprocess.run(sshd.ssh_argv(None, "127.0.0.1", "echo", "direct-ok"),
                          capture_output=True, timeout=WAIT)
    assert done.stdout.strip() == b"direct-ok", done.stderr


# --------------------------------------------------------------------------- scripts/demo


def _alive(pid: int) -> bool:
    try:
        with open("/proc/%d/stat" % pid) as f:
            return f.read().rsplit(")", 1)[-1].split()[0] != "Z"
    except (OSError, IndexError):
        return False


def test_scripts_demo_detach_and_stop(tmp_path):
    """``scripts/demo --detach`` returns ready (pids written, agent consuming); ``--stop``
    leaves no process behind; a second ``--detach`` on a running DIR is refused."""
    script = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))),
                          "scripts", "demo")
    directory = str(tmp_path / "demo")
    env = dict(os.environ, PYTHON=sys.executable)
    up = subprocess.run([script, "--dir", directory, "--detach"], capture_output=True,
                        text=True, timeout=150, env=env, stdin=subprocess.DEVNULL)
    pids: Dict[str, int] = {}
    try:
        assert up.returncode == 0, up.stderr + up.stdout
        assert "ProxyCommand=" in up.stdout and " forward demo -L " in up.stdout
        with open(os.path.join(directory, "pids")) as f:
            pids = {name: int(pid) for name, pid in (line.split() for line in f)}
        assert set(pids) == {"platform", "rabbit", "epmd", "relay", "agent"}
        assert all(_alive(pid) for pid in pids.values()), pids
        for name in ("agent.yaml", "console.yaml", "operator_ed25519", "pki/ca.pem",
                     "agent/authorized_keys"):
            assert os.path.exists(os.path.join(directory, name)), name
        again = subprocess.run([script, "--dir", directory, "--detach"], capture_output=True,
                               text=True, timeout=30, env=env, stdin=subprocess.DEVNULL)
        assert again.returncode == 1 and "already runs" in again.stderr
    finally:
        down = subprocess.run([script, "--dir", directory, "--stop"], capture_output=True,
                              text=True, timeout=120, env=env, stdin=subprocess.DEVNULL)
    assert down.returncode == 0, down.stderr + down.stdout
    wait_for(lambda: not any(_alive(pid) for pid in pids.values()), 10,
             what="every platform process to exit")
    assert not os.path.exists(os.path.join(directory, "pids"))
