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
import subprocess
import sys
import time
from typing import Any, Dict, List, Optional

import pytest

from remote_gevent.agent import history
from remote_gevent.demo.platform import DemoPlatform
from remote_gevent.demo.processes import port_open
from echo_server import EchoServer
from remote_gevent.wire import rendezvous

pytestmark = pytest.mark.e2e

SSHD = "/usr/sbin/sshd"
MIB = 1024 * 1024
WAIT = 30.0  # upper bound for any single wait


# --------------------------------------------------------------------------- helpers


def free_port() -> int:
    """A free port on 127.0.0.1 outside the ephemeral range (see demo.rabbit.free_port)."""
    from remote_gevent.demo.rabbit import free_port as pick

    return pick("127.0.0.1")


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


# --------------------------------------------------------------------------- console helpers


def read_exactly(stream, n: int, timeout: float = WAIT) -> bytes:
    """``n`` bytes from a (cooperative) pipe, or AssertionError after ``timeout``."""
    import gevent

    buf = b""
    with gevent.Timeout(timeout, AssertionError("timed out reading %d bytes (got %r)"
                                                % (n, buf[:80]))):
        while len(buf) < n:
            chunk = stream.read1(n - len(buf)) if hasattr(stream, "read1") else \
                stream.read(n - len(buf))
            if not chunk:
                raise AssertionError("EOF after %d of %d bytes: %r" % (len(buf), n, buf[:80]))
            buf += chunk
    return buf


def stdio(procs: Procs, p: DemoPlatform, target: str) -> subprocess.Popen:
    return procs.start(p.console_argv("stdio", p.ident, target), stdin=subprocess.PIPE)


def ssh_banner(proc: subprocess.Popen, timeout: float = WAIT) -> bytes:
    banner = read_exactly(proc.stdout, 8, timeout)
    assert banner.startswith(b"SSH-2.0-"), banner
    return banner


def finish(proc: subprocess.Popen, timeout: float = WAIT) -> "tuple[int, str]":
    """Wait for a console to exit; return (status, stderr)."""
    try:
        _, err = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        proc.kill()
        _, err = proc.communicate(timeout=10)
        raise AssertionError("console did not exit within %.0f s: %s"
                             % (timeout, err)) from None
    return proc.returncode, (err or b"").decode("utf-8", "replace")


# --------------------------------------------------------------------------- ssh via stdio


def test_ssh_through_stdio_runs_a_command_and_first_byte_is_fast(platform, sshd, procs):
    started = time.monotonic()
    proc = stdio(procs, platform, "127.0.0.1:%d" % sshd.port)
    ssh_banner(proc)
    ttfb = time.monotonic() - started
    proc.stdin.close()
    finish(proc)
    print("\nstdio time to first byte (process start -> sshd banner): %.3f s" % ttfb)
    done = subprocess.run(
        sshd.ssh_argv(proxy_command(platform, "127.0.0.1:%d" % sshd.port), platform.ident,
                      "echo", "hello-from-$(hostname)"), capture_output=True, timeout=WAIT)
    assert done.returncode == 0, done.stderr
    assert done.stdout.startswith(b"hello-from-"), done.stdout
    assert ttfb < 15.0  # typically ~1 s; a process start, broker and TLS on a loaded box


def test_ssh_256mib_each_way_sha256(platform, sshd, tmp_path):
    size = 256 * MIB
    src = str(tmp_path / "up.bin")
    digest = random_file(src, size)
    proxy = proxy_command(platform, "127.0.0.1:%d" % sshd.port)
    # upload: local file -> ssh stdin -> sha256sum on the "device"
    t0 = time.monotonic()
    with open(src, "rb") as fin:
        up = subprocess.run(sshd.ssh_argv(proxy, platform.ident, "sha256sum"), stdin=fin,
                            capture_output=True, timeout=180)
    t_up = time.monotonic() - t0
    assert up.returncode == 0, up.stderr
    assert up.stdout.split()[0].decode() == digest
    # download: the device cats the file, we hash what arrives
    t0 = time.monotonic()
    proc = subprocess.Popen(sshd.ssh_argv(proxy, platform.ident, "cat", shlex.quote(src)),
                            stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE)
    h = hashlib.sha256()
    got = 0
    while True:
        chunk = proc.stdout.read(1 * MIB)
        if not chunk:
            break
        h.update(chunk)
        got += len(chunk)
    assert proc.wait(60) == 0, proc.stderr.read()
    proc.stdout.close()
    proc.stderr.close()
    t_down = time.monotonic() - t0
    assert got == size and h.hexdigest() == digest
    print("\nssh 256 MiB through stdio: up %.2f s (%.0f MiB/s), down %.2f s (%.0f MiB/s)"
          % (t_up, 256 / t_up, t_down, 256 / t_down))


# --------------------------------------------------------------------------- socks / forward


def curl(port: int, url: str, *extra: str, socks: bool = True) -> List[str]:
    argv = ["curl", "-sS", "--fail", "--max-time", "60", "-o", "-"]
    if socks:
        argv += ["--socks5-hostname", "127.0.0.1:%d" % port]
    return argv + list(extra) + [url]


def test_socks_concurrent_streams_and_slow_reader(platform, web, procs):
    port = free_port()
    before = len(history_rows(platform))
    console = procs.start(platform.console_argv("socks", platform.ident,
                                                "-D", "127.0.0.1:%d" % port))
    wait_port(port, console)
    base = "http://127.0.0.1:%d/" % web.port
    # a slow reader on the big file, throttled to 256 KiB/s: it holds its stream open
    slow = procs.start(curl(port, base + "big.bin", "--limit-rate", "256k"),
                       stdout=subprocess.DEVNULL)
    time.sleep(1.0)
    # meanwhile, 8 concurrent fast streams in the same session, and one big one
    t0 = time.monotonic()
    fast = [procs.start(curl(port, base + "medium.bin")) for _ in range(8)]
    fast.append(procs.start(curl(port, base + "big.bin")))
    outs = [f.communicate(timeout=60) for f in fast]
    elapsed = time.monotonic() - t0
    for f, (_, err) in zip(fast, outs):
        assert f.returncode == 0, err
    for out, _ in outs[:8]:
        assert hashlib.sha256(out).hexdigest() == web.sha["medium.bin"]
    assert hashlib.sha256(outs[8][0]).hexdigest() == web.sha["big.bin"]
    assert slow.poll() is None, "the throttled reader should still be downloading"
    assert elapsed < 30, "fast streams took %.1f s next to a slow reader" % elapsed
    # a name the device's allow-list does not cover is refused by the SOCKS server
    out = subprocess.run(curl(port, "http://localhost:%d/index.html" % web.port),
                         capture_output=True, timeout=WAIT)
    assert out.returncode != 0 and not out.stdout
    kill_quietly(slow)
    console.send_signal(signal.SIGTERM)
    finish(console)
    row = wait_row(platform, lambda r: int(r["streams"] or 0) >= 10,
                   what="one session row with all the socks streams")
    assert row in new_rows(platform, before)
    print("\nsocks: 8 x 8 MiB + 48 MiB concurrent next to a 256 KiB/s reader: %.2f s"
          % elapsed)


def test_forward_L_with_curl(platform, web, procs):
    port = free_port()
    console = procs.start(platform.console_argv(
        "forward", platform.ident, "-L", "127.0.0.1:%d:127.0.0.1:%d" % (port, web.port)))
    wait_port(port, console)
    for name in ("small.bin", "medium.bin", "small.bin"):
        done = subprocess.run(curl(port, "http://127.0.0.1:%d/%s" % (port, name),
                                   socks=False), capture_output=True, timeout=WAIT)
        assert done.returncode == 0, done.stderr
        assert hashlib.sha256(done.stdout).hexdigest() == web.sha[name]


def test_target_not_permitted_is_refused(platform, procs):
    proc = stdio(procs, platform, "10.255.255.1:22")
    status, err = finish(proc)
    assert status != 0
    assert "target_not_permitted" in err or "not permitted" in err, err


# --------------------------------------------------------------------------- limits


@pytest.fixture(scope="module")
def limited(rabbit, tmp_path_factory):
    """max_session=2, short queue and ACK timeouts, 1 s keepalives on both sides; resume
    off (resume_timeout 0: a lost path ends the session; test_resume_e2e.py has it on)."""
    p = make_platform(rabbit, str(tmp_path_factory.mktemp("limited")),
                      remote={"max_session": 2, "queue_timeout": 4, "ack_timeout": 3,
                              "resume_timeout": 0},
                      console={"keepalive_interval": 1})
    p.start()
    yield p
    p.stop()


def agent_log(p: DemoPlatform) -> str:
    with open(p.agent_log, "rb") as f:
        return f.read().decode("utf-8", "replace")


def session_rows(p: DemoPlatform, before: int, code: str) -> List[Dict[str, str]]:
    return [r for r in new_rows(p, before) if r["close_code"] == code]


def test_max_session_queues_then_starts_then_times_out(limited, sshd, procs):
    p = limited
    target = "127.0.0.1:%d" % sshd.port
    first = stdio(procs, p, target)
    second = stdio(procs, p, target)
    ssh_banner(first)
    ssh_banner(second)
    before = len(history_rows(p))
    # a third request is queued (told so), and starts as soon as one tunnel closes
    queued = agent_log(p).count(": queued at position ")
    third = stdio(procs, p, target)
    # close the first as soon as the third is queued: its queue_timeout (4 s) runs from
    # there, so a fixed pause (a slow process start on a loaded box) would eat into it
    wait_for(lambda: agent_log(p).count(": queued at position ") > queued,
             what="the third request queued by the agent")
    assert third.poll() is None
    first.send_signal(signal.SIGTERM)
    finish(first)
    ssh_banner(third)
    # with two tunnels up again, a fourth waits queue_timeout (4 s) and is refused
    t0 = time.monotonic()
    fourth = stdio(procs, p, target)
    status, err = finish(fourth, timeout=30)
    waited = time.monotonic() - t0
    assert status != 0 and "queue_timeout" in err, (status, err)
    assert 3.0 <= waited < 20, waited
    wait_row(p, lambda r: r["close_code"] == "queue_timeout" and r in new_rows(p, before),
             what="a queue_timeout history row")
    for proc in (second, third):
        proc.send_signal(signal.SIGTERM)
        finish(proc)


def test_ack_lost_when_console_is_frozen(limited, sshd, procs):
    p = limited
    before = len(history_rows(p))
    console = stdio(procs, p, "127.0.0.1:%d" % sshd.port)
    ssh_banner(console)
    console.send_signal(signal.SIGSTOP)
    try:
        row = wait_row(p, lambda r: r in session_rows(p, before, "ack_lost"), timeout=20,
                       what="an ack_lost history row")
    finally:
        console.send_signal(signal.SIGCONT)
    assert float(row["duration_s"]) < 15


def test_relay_killed_mid_session(limited, sshd, procs):
    p = limited
    before = len(history_rows(p))
    console = stdio(procs, p, "127.0.0.1:%d" % sshd.port)
    ssh_banner(console)
    p.stop_relay(signal.SIGKILL)
    try:
        wait_row(p, lambda r: r in session_rows(p, before, "relay_lost"), timeout=20,
                 what="a relay_lost history row")
        status, _ = finish(console)
        assert status != 0
    finally:
        p.start_relay()


def test_agent_sigterm_writes_shutdown_rows(limited, sshd, procs):
    p = limited
    before = len(history_rows(p))
    consoles = [stdio(procs, p, "127.0.0.1:%d" % sshd.port) for _ in range(2)]
    for c in consoles:
        ssh_banner(c)
    try:
        assert p.stop_agent(signal.SIGTERM) == 0
        rows = session_rows(p, before, "shutdown")
        assert len(rows) == 2, new_rows(p, before)
        for c in consoles:
            status, _ = finish(c)
            assert status != 0
    finally:
        p.start_agent()


@pytest.fixture(scope="module")
def idle(rabbit, tmp_path_factory):
    p = make_platform(rabbit, str(tmp_path_factory.mktemp("idle")),
                      remote={"idle_timeout": 2}, console={"keepalive_interval": 1})
    p.start()
    yield p
    p.stop()


def test_idle_timeout(idle, sshd, procs):
    """Keepalives are not activity: a silent session ends with ``idle_timeout``."""
    before = len(history_rows(idle))
    console = stdio(procs, idle, "127.0.0.1:%d" % sshd.port)
    ssh_banner(console)
    row = wait_row(idle, lambda r: r in session_rows(idle, before, "idle_timeout"),
                   timeout=20, what="an idle_timeout history row")
    assert 2.0 <= float(row["duration_s"]) < 15
    status, _ = finish(console)
    assert status != 0


# --------------------------------------------------------------------------- at the relay


class HookedRelay:
    """An in-process relay (the product's class) recording every byte it forwards, and
    able to flip one bit of the console→agent direction once armed.

    It forwards with the relay's copy path (``splice=False``): spliced bytes never pass
    through Python, and the copy path hands each chunk to ``_send_chunk``, hooked here."""

    def __init__(self, cert_file: str, key_file: str) -> None:
        from remote_gevent.relay import server as relay
        from remote_gevent.relay.settings import RelaySettings

        outer = self
        self.captured = bytearray()
        self.tamper_armed = False
        self.tampered = False

        class _Relay(relay.Relay):
            def _send_chunk(self, d_sock, data, src_role):  # noqa: ANN001
                data = bytes(data)
                if (outer.tamper_armed and not outer.tampered and src_role == "console"
                        and len(data) > 8):
                    flipped = bytearray(data)
                    flipped[len(data) // 2] ^= 0x01
                    data = bytes(flipped)
                    outer.tampered = True
                outer.captured += data
                return super()._send_chunk(d_sock, memoryview(data), src_role)

        self.relay = _Relay(RelaySettings(
            host="127.0.0.1", port=0, cert_file=cert_file, key_file=key_file,
            # pairing_timeout: how long one leg waits for the other (agent accept, or the
            # console's redial after a broker hop): seconds on a loaded CI box
            pairing_timeout=6.0, grace=0.5), splice=False)  # < the 8 s pair_timeout below
        self.relay.start()
        self.port = self.relay.address[1]

    def session_ids(self) -> List[str]:
        return list(self.relay._sessions)

    def stop(self) -> None:
        self.relay.stop(grace=0)


@pytest.fixture(scope="module")
def hooked(rabbit, tmp_path_factory):
    """A platform whose relay runs in this process with the capture / tamper hook."""
    p = make_platform(rabbit, str(tmp_path_factory.mktemp("hooked")), start_relay=False)
    p.prepare()
    relay = HookedRelay(*p.relay_cert)
    p.relay_port = relay.port
    echo = EchoServer()
    try:
        p.start()
        yield p, relay, echo
    finally:
        p.stop()
        relay.stop()
        echo.stop()


def test_relay_never_sees_plaintext(hooked, procs):
    p, relay, echo = hooked
    marker = ("MARKER-%s-" % secrets.token_hex(16)).encode()
    payload = marker * 20000  # ~1 MiB of plaintext made of the marker
    start = len(relay.captured)
    console = stdio(procs, p, "127.0.0.1:%d" % echo.port)
    console.stdin.write(payload)
    console.stdin.flush()
    assert read_exactly(console.stdout, len(payload)) == payload
    console.stdin.close()
    finish(console)
    seen = bytes(relay.captured[start:])
    assert len(seen) >= 2 * len(payload), "the relay forwarded the data"
    assert marker not in seen
    assert marker[:16] not in seen


def test_tampered_frame_ends_tunnel_with_crypto_error(hooked, procs):
    p, relay, echo = hooked
    before = len(history_rows(p))
    console = stdio(procs, p, "127.0.0.1:%d" % echo.port)
    console.stdin.write(b"ping\n")
    console.stdin.flush()
    assert read_exactly(console.stdout, 5) == b"ping\n"
    relay.tamper_armed = True
    try:
        console.stdin.write(b"x" * 4096)
        console.stdin.flush()
        wait_row(p, lambda r: r in session_rows(p, before, "crypto_error"),
                 what="a crypto_error history row")
        assert relay.tampered
    finally:
        relay.tamper_armed = False
        relay.tampered = False
    status, _ = finish(console)
    assert status != 0


def test_wrong_ticket_at_the_relay_is_refused(hooked, procs):
    from remote_gevent.common import tls

    p, relay, echo = hooked
    console = stdio(procs, p, "127.0.0.1:%d" % echo.port)
    console.stdin.write(b"one\n")
    console.stdin.flush()
    assert read_exactly(console.stdout, 4) == b"one\n"
    live = relay.session_ids()
    assert live
    for role in ("console", "agent"):
        with pytest.raises(rendezvous.RelayError):
            rendezvous.dial_relay("127.0.0.1", relay.port, tls.client_context(p.ca.cert_file),
                                 None, role, live[-1], secrets.token_bytes(32), timeout=5,
                                 pair_timeout=8)
    # the legitimate session is untouched
    console.stdin.write(b"two\n")
    console.stdin.flush()
    assert read_exactly(console.stdout, 4) == b"two\n"
    console.stdin.close()
    assert finish(console)[0] == 0
