"""The agent on the old Pythons of field gateways (issue 16): a real agent process under
CPython 3.6 (and 3.7), the suite's private TLS RabbitMQ node, a relay process and
``remote-gevent-console`` processes (and the stock OpenSSH ``sftp``) on the main Python.

The old interpreters come from ``REMOTE_GEVENT_TEST_PY36`` / ``REMOTE_GEVENT_TEST_PY37``:
a ``python`` with the package's dependencies installed (``.ci/run`` makes these venvs
for its 3.6/3.7 tiers and exports the variables). Without one the tests skip, saying so.
"""

import os
import shlex
import shutil
import signal
import subprocess
from typing import Dict, List

import pytest
from echo_server import EchoServer
from test_e2e import (
    WAIT,
    Procs,
    finish,
    make_platform,
    random_file,
    read_exactly,
    sha256_file,
    wait_for,
)

from remote_gevent.agent import history
from remote_gevent.agent.files import fsops

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
VERSIONS = ("3.6", "3.7")
AGENT_DEPS = "import gevent, greenlet, amqp, nacl, paramiko, yaml, click, dataclasses"


def old_python(version: str) -> str:
    """The interpreter for ``version`` with the agent's dependencies, or skip (why)."""
    var = "REMOTE_GEVENT_TEST_PY%s" % version.replace(".", "")
    python = os.environ.get(var)
    if not python:
        pytest.skip("no Python %s to run the agent under: set %s to a python%s with the "
                    "agent's dependencies (.ci/run makes one)" % (version, var, version))
    try:
        out = subprocess.run(
            [python, "-c", "import sys; %s; print('%%d.%%d' %% sys.version_info[:2])"
             % AGENT_DEPS], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
            timeout=WAIT, env=old_env())
    except OSError as exc:
        pytest.skip("%s=%s cannot run: %s" % (var, python, exc))
    if out.returncode != 0:
        pytest.skip("%s=%s lacks the agent's dependencies: %s"
                    % (var, python, out.stderr.decode(errors="replace").strip()[-300:]))
    assert out.stdout.decode().strip() == version, "%s=%s is Python %s" % (
        var, python, out.stdout.decode().strip())
    return python


def old_env() -> Dict[str, str]:
    """This checkout's package first on the path of the old interpreter."""
    env = dict(os.environ)
    env["PYTHONPATH"] = REPO + os.pathsep + env.get("PYTHONPATH", "")
    return env


@pytest.mark.parametrize("version", VERSIONS)
@pytest.mark.parametrize("role", ["console", "relay"])
def test_console_and_relay_refuse_old_python_in_one_line(version, role):
    python = old_python(version)
    done = subprocess.run([python, "-m", "remote_gevent.%s.cli" % role, "--help"],
                          stdout=subprocess.PIPE, stderr=subprocess.PIPE, timeout=WAIT,
                          env=old_env())
    err = done.stderr.decode()
    assert done.returncode == 1
    assert err.splitlines() == [
        "remote-gevent-%s needs Python 3.8 or newer (this is %s); only the agent, "
        "remote-gevent, runs on 3.6 and 3.7" % (role, version)], err


@pytest.mark.parametrize("takes_fd", [True, False], ids=["scandir-fd", "listdir-3.6"])
def test_scan_dir_both_paths(tmp_path, monkeypatch, takes_fd):
    """The partial-upload sweep lists a directory by descriptor: ``os.scandir(fd)`` from
    3.7, ``listdir`` + ``lstat`` on 3.6 (it raised TypeError there and failed every
    upload). Both paths give the same names and types, symlinks not followed."""
    if takes_fd and not fsops.SCANDIR_TAKES_FD:
        pytest.skip("os.scandir takes no descriptor on this Python")
    monkeypatch.setattr(fsops, "SCANDIR_TAKES_FD", takes_fd)
    (tmp_path / "sub").mkdir()
    (tmp_path / "file.rgpart").write_bytes(b"x")
    (tmp_path / "link-to-sub").symlink_to(tmp_path / "sub")
    dfd = os.open(str(tmp_path), os.O_RDONLY | os.O_DIRECTORY)
    try:
        entries = fsops.scan_dir(dfd)
        got = sorted((e.name, e.is_dir(follow_symlinks=False)) for e in entries)
    finally:
        os.close(dfd)
    assert got == [("file.rgpart", False), ("link-to-sub", False), ("sub", True)]
    kinds = {type(e).__name__ for e in entries}
    assert kinds == ({"DirEntry"} if takes_fd else {"FdDirEntry"})


@pytest.fixture
def procs():
    p = Procs()
    yield p
    p.close()


def rows_with(path: str, code: str) -> List[Dict[str, str]]:
    return [r for r in history.read(path) if r["close_code"] == code]


@pytest.mark.e2e
@pytest.mark.broker  # the broker is asked for in the body: none boots for a skip
@pytest.mark.parametrize("version", VERSIONS)
def test_agent_session_transfer_and_sigterm(version, request, tmp_path, procs):
    python = old_python(version)
    rabbit = request.getfixturevalue("rabbit")
    p = make_platform(rabbit, str(tmp_path / "platform"), start_agent=False)
    p.start()
    echo = EchoServer()
    try:
        # The agent: this checkout under the old interpreter, as DemoPlatform runs it.
        with open(p.agent_log, "ab") as out:
            p.agent_proc = subprocess.Popen(
                [python, "-m", "remote_gevent.agent.cli", "--foreground", "--config",
                 p.agent_config, "--log-level", "INFO"],
                stdin=subprocess.DEVNULL, stdout=out, stderr=subprocess.STDOUT, cwd=p.dir,
                env=old_env(), start_new_session=True)
        p.wait_agent_ready()
        exe = os.path.realpath("/proc/%d/exe" % p.agent_proc.pid)
        assert os.path.basename(exe).startswith("python" + version), exe

        # A session carries data both ways (the console on this Python, the agent on the
        # old one: also proves the cipher both agree on, XChaCha20 with PyNaCl 1.5).
        payload = os.urandom(256 * 1024)
        console = procs.start(p.console_argv("stdio", p.ident, "127.0.0.1:%d" % echo.port),
                              stdin=subprocess.PIPE)
        console.stdin.write(payload)
        console.stdin.flush()
        assert read_exactly(console.stdout, len(payload)) == payload
        console.stdin.close()
        status, err = finish(console)
        assert status == 0, err
        wait_for(lambda: history.read(p.history_path), WAIT, what="the session's history row")

        # A transfer lands, whole.
        src = str(tmp_path / "upload.bin")
        digest = random_file(src, 3 * 1024 * 1024 + 17)
        remote = os.path.join(p.files_dir, "upload.bin")
        done = subprocess.run(p.console_argv("push", p.ident, src, remote),
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, timeout=120,
                              stdin=subprocess.DEVNULL)
        assert done.returncode == 0, done.stderr.decode(errors="replace")
        assert sha256_file(remote) == digest

        # The agent's SFTP server (paramiko 3.5 there) with the stock OpenSSH client:
        # the pushed file read back, listed.
        if shutil.which("sftp"):
            back = str(tmp_path / "back.bin")
            batch = tmp_path / "batch"
            batch.write_text("cd %s\nls\nget upload.bin %s\n" % (p.files_dir, back))
            proxy = " ".join(shlex.quote(a) for a in p.console_argv("stdio", "%n", "@sftp"))
            done = subprocess.run(
                ["sftp", "-F", "/dev/null", "-b", str(batch), "-o", "BatchMode=yes",
                 "-o", "StrictHostKeyChecking=no",
                 "-o", "UserKnownHostsFile=%s" % (tmp_path / "known_hosts"),
                 "-o", "ProxyCommand=%s" % proxy, "x@%s" % p.ident],
                stdout=subprocess.PIPE, stderr=subprocess.STDOUT, timeout=120,
                stdin=subprocess.DEVNULL)
            assert done.returncode == 0, done.stdout.decode(errors="replace")
            assert b"upload.bin" in done.stdout
            assert sha256_file(back) == digest

        # SIGTERM with a session open: graceful exit, the session's row says shutdown.
        held = procs.start(p.console_argv("stdio", p.ident, "127.0.0.1:%d" % echo.port),
                           stdin=subprocess.PIPE)
        held.stdin.write(b"ping")
        held.stdin.flush()
        assert read_exactly(held.stdout, 4) == b"ping"
        assert not rows_with(p.history_path, "shutdown")
        assert p.stop_agent(signal.SIGTERM) == 0
        rows = rows_with(p.history_path, "shutdown")
        assert len(rows) == 1, history.read(p.history_path)
        assert rows[0]["targets"] == "127.0.0.1:%d" % echo.port
        status, _ = finish(held)
        assert status != 0
    finally:
        echo.stop()
        p.stop()
    with open(p.agent_log, errors="replace") as f:
        log = f.read()
    assert "Traceback" not in log, log[-3000:]

