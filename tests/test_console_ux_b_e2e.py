"""Operator experience through the real programs (issue 15, items 4, 6, 7, 8, 10).

The console runs as a process against the demo platform (agent and relay processes, the
suite's RabbitMQ node); the interactive behaviours (progress bar, Ctrl-C) run it under a
pseudo-terminal and assert on what the user sees, as typed: ``\\x03`` written to the
terminal, which sends SIGINT to the console's process group.
"""

from __future__ import annotations

import json
import os
import pty
import re
import select
import subprocess
import time
from typing import Callable, List, Optional, Tuple

import pytest
import yaml
from echo_server import EchoServer
from platform_helpers import console, sftp_batch
from test_e2e import MIB, WAIT, free_port, make_platform, random_file, sha256_file, wait_for

from remote_gevent.console.progress import _human
from remote_gevent.wire.transfer_lines import part_name

pytestmark = pytest.mark.e2e

NOISE = ("Traceback", "KeyboardInterrupt", "Greenlet", "WARNING", "Error:")


@pytest.fixture(scope="module")
def platform(rabbit, tmp_path_factory):
    p = make_platform(rabbit, str(tmp_path_factory.mktemp("ux-b-platform")))
    p.start()
    yield p
    p.stop()


def in_pty(argv: List[str], interrupt_when: Callable[[str], bool],
           timeout: float = 60) -> Tuple[str, int]:
    """Run ``argv`` on a new pseudo-terminal; type Ctrl-C once ``interrupt_when(output)``.

    Returns (everything the terminal showed, exit status)."""
    pid, fd = pty.fork()
    if pid == 0:  # the child: exec at once
        try:
            os.execvp(argv[0], argv)
        finally:
            os._exit(127)
    out = b""
    sent = False
    deadline = time.monotonic() + timeout
    try:
        while time.monotonic() < deadline:
            if not sent and interrupt_when(out.decode("utf-8", "replace")):
                os.write(fd, b"\x03")
                sent = True
            ready, _, _ = select.select([fd], [], [], 0.05)
            if ready:
                try:
                    data = os.read(fd, 65536)
                except OSError:  # EIO: the child closed the terminal
                    break
                if not data:
                    break
                out += data
        else:
            os.kill(pid, 9)
            raise AssertionError("timed out; the terminal showed %r" % out[-2000:])
    finally:
        _, status = os.waitpid(pid, 0)
        os.close(fd)
    assert sent, "never interrupted; the terminal showed %r" % out[-2000:]
    return out.decode("utf-8", "replace"), os.waitstatus_to_exitcode(status)


def assert_clean(shown: str) -> None:
    for word in NOISE:
        assert word not in shown, shown[-3000:]
    # no bare "2026-11-30T10:00:00Z <Greenlet …> failed" line from gevent's hub
    assert not re.search(r"(?m)^\d{4}-\d\d-\d\dT\d\d:\d\d", shown), shown[-3000:]


# --------------------------------------------------------------------------- item 4


def test_ctrl_c_during_pull_keeps_partial_and_resume_continues(platform, tmp_path):
    size = 256 * MIB
    remote = os.path.join(platform.files_dir, "ctrl-c.bin")
    digest = random_file(remote, size)
    local = str(tmp_path / "ctrl-c.bin")
    partial = str(tmp_path / part_name("ctrl-c.bin"))

    def partial_grew(shown: str) -> bool:
        return "%" in shown and os.path.exists(partial) and os.path.getsize(partial) > 8 * MIB

    shown, status = in_pty(platform.console_argv("pull", platform.ident, remote, local),
                           partial_grew)
    assert status == 130, shown[-2000:]
    assert_clean(shown)
    last = shown.strip().splitlines()[-1]
    assert last.startswith("remote-gevent-console pull: interrupted; the partial download "
                           "%s (" % partial), last
    assert last.endswith("is kept: run the same command with --resume to continue"), last
    kept = os.path.getsize(partial)
    assert 0 < kept < size and not os.path.exists(local)
    done = console(platform, "pull", "--resume", platform.ident, remote, local)
    assert done.returncode == 0, done.stderr
    assert sha256_file(local) == digest and not os.path.exists(partial)
    # only the rest came over the wire (the summary line, printed off a terminal too)
    assert done.stderr.startswith("pull: 1 file(s), %s in " % _human(size - kept)), done.stderr
    os.unlink(remote)


def test_ctrl_c_during_push_keeps_the_device_partial_and_resume_continues(platform,
                                                                          tmp_path):
    size = 256 * MIB
    src = str(tmp_path / "up.bin")
    digest = random_file(src, size)
    remote = os.path.join(platform.files_dir, "ctrl-c-up.bin")
    partial = os.path.join(platform.files_dir, part_name("ctrl-c-up.bin"))

    def partial_grew(shown: str) -> bool:
        return "%" in shown and os.path.exists(partial) and os.path.getsize(partial) > 8 * MIB

    shown, status = in_pty(platform.console_argv("push", platform.ident, src, remote),
                           partial_grew)
    assert status == 130, shown[-2000:]
    assert_clean(shown)
    assert shown.strip().splitlines()[-1] == (
        "remote-gevent-console push: interrupted; the device keeps the partial upload: run "
        "the same command with --resume to continue"), shown[-500:]
    kept = wait_for(lambda: os.path.exists(partial) and os.path.getsize(partial), WAIT,
                    what="the device's partial")
    assert not os.path.exists(remote)
    done = console(platform, "push", "--resume", platform.ident, src, remote)
    assert done.returncode == 0, done.stderr
    assert sha256_file(remote) == digest and not os.path.exists(partial)
    sent = re.match(r"^push: 1 file\(s\), (.+) in ", done.stderr)
    assert sent and sent.group(1) != _human(size), done.stderr   # not from zero
    assert 0 < kept < size
    os.unlink(remote)


@pytest.mark.parametrize("command", ["forward", "socks"])
def test_ctrl_c_of_forward_and_socks_is_one_clean_line(platform, command):
    echo = EchoServer()
    port = free_port()
    spec = (["-L", "%d:127.0.0.1:%d" % (port, echo.port)] if command == "forward"
            else ["-D", str(port)])
    banner = "forwarding" if command == "forward" else "SOCKS5 on"
    held: list = []

    def listening_with_a_stream(shown: str) -> bool:
        if banner not in shown:
            return False
        if not held and command == "forward":  # a stream open when Ctrl-C comes
            import socket

            s = socket.create_connection(("127.0.0.1", port), timeout=WAIT)
            s.sendall(b"ping")
            assert s.recv(4) == b"ping"
            held.append(s)
        return True

    try:
        shown, status = in_pty(platform.console_argv(command, platform.ident, *spec),
                               listening_with_a_stream)
    finally:
        for s in held:
            s.close()
        echo.stop()
    assert status == 0, shown
    assert_clean(shown)
    lines = shown.replace("\r", "").strip().splitlines()
    assert lines[-1] in ("^Cremote-gevent-console: interrupted",
                         "remote-gevent-console: interrupted"), lines
    assert banner in lines[0] and len(lines) == 2, lines


def test_ctrl_c_while_waiting_for_the_device_is_one_line(platform):
    """Any command (here ``sessions``, waiting for a device that does not answer: its
    agent is stopped with SIGSTOP) ends on Ctrl-C with one line, exit 130."""
    import signal

    platform.agent_proc.send_signal(signal.SIGSTOP)
    t0 = time.monotonic()
    try:
        shown, status = in_pty(platform.console_argv("sessions", platform.ident),
                               lambda shown: time.monotonic() - t0 > 3.0)
    finally:
        platform.agent_proc.send_signal(signal.SIGCONT)
    assert status == 130, shown
    assert_clean(shown)
    assert shown.replace("\r", "").strip() in ("^Cremote-gevent-console: interrupted",
                                                "remote-gevent-console: interrupted"), shown


# --------------------------------------------------------------------------- item 6


def test_overwrite_works_in_the_demo_and_pull_refuses_like_push(platform, tmp_path):
    src = tmp_path / "ow.txt"
    src.write_text("one\n")
    remote = os.path.join(platform.files_dir, "ow.txt")
    assert console(platform, "push", platform.ident, str(src), remote).returncode == 0
    src.write_text("two\n")
    done = console(platform, "push", platform.ident, str(src), remote)
    assert done.returncode == 3 and "use --overwrite" in done.stderr, done.stderr
    done = console(platform, "push", "--overwrite", platform.ident, str(src), remote)
    assert done.returncode == 0, done.stderr
    with open(remote) as f:
        assert f.read() == "two\n"
    local = tmp_path / "back.txt"
    local.write_text("mine\n")
    done = console(platform, "pull", platform.ident, remote, str(local))
    assert done.returncode == 3, done.stderr
    assert "exists: %s already exists; use --overwrite" % local in done.stderr
    assert local.read_text() == "mine\n"
    done = console(platform, "pull", "--overwrite", platform.ident, remote, str(local))
    assert done.returncode == 0, done.stderr
    assert local.read_text() == "two\n"
    os.unlink(remote)


# --------------------------------------------------------------------------- item 7


def test_stock_sftp_put_without_cd_lands_in_the_root(platform, tmp_path):
    src = tmp_path / "nocd.txt"
    src.write_text("no cd needed\n")
    done = sftp_batch(platform, tmp_path, ["pwd", "put %s" % src])
    assert done.returncode == 0, done.stderr + done.stdout
    assert "Remote working directory: %s" % platform.files_dir in done.stdout
    landed = os.path.join(platform.files_dir, "nocd.txt")
    with open(landed) as f:
        assert f.read() == "no cd needed\n"
    os.unlink(landed)


# --------------------------------------------------------------------------- item 8


def _config_copy(platform, name: str, **changes) -> str:
    with open(platform.console_config) as f:
        data = yaml.safe_load(f)
    data.update(changes)
    path = os.path.join(os.path.dirname(platform.console_config), name)
    with open(os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600), "w") as f:
        yaml.safe_dump(data, f)
    return path


def test_broker_unreachable_names_the_key_and_devices_says_stale(platform):
    with open(platform.console_config) as f:
        amqp = yaml.safe_load(f)["amqp"]
    amqp["urls"] = ["amqps://127.0.0.1:%d/" % free_port()]
    down = _config_copy(platform, "broker-down.yaml", amqp=amqp)
    done = console(platform, "sessions", platform.ident, config=down)
    assert done.returncode == 8, done.stderr
    assert "(the broker: check amqp.urls in %s and that the broker runs)" % down \
        in done.stderr, done.stderr
    assert console(platform, "devices").returncode == 0       # a state to be stale about
    done = console(platform, "devices", config=down)
    assert done.returncode == 8
    assert "stale: the broker was not reached; states (marked ?) are as of " in done.stderr
    row = [ln for ln in done.stdout.splitlines() if platform.ident in ln]
    assert len(row) == 1 and re.search(r"\s(online|offline|stopped|unknown)\?\s", row[0]), \
        done.stdout
    done = console(platform, "devices", "--json", config=down)
    assert json.loads(done.stdout)["stale"] is True


def test_refusals_name_the_roots_and_the_rule(platform):
    done = console(platform, "push", platform.ident, platform.console_config, "/etc/rg-ux-x")
    assert done.returncode == 3
    assert "outside_root: /etc/rg-ux-x is outside the transfer roots; allowed: %s (rw)" \
        % platform.files_dir in done.stderr, done.stderr
    done = console(platform, "forward", platform.ident, "-L",
                   "%d:10.255.255.1:22" % free_port())
    assert done.returncode == 3
    assert "target_not_permitted (10.255.255.1:22 not permitted by the device's " \
           "remote.allow)" in done.stderr, done.stderr


def test_relay_mismatch_exits_12_with_the_key_to_fix(platform):
    port = platform.relay_address.rsplit(":", 1)[1]
    other = _config_copy(platform, "other-relay.yaml", relay="localhost:%s" % port)
    done = console(platform, "forward", platform.ident, "-L",
                   "%d:127.0.0.1:9" % free_port(), config=other)
    assert done.returncode == 12, done.stderr
    assert "is not this device's relay" in done.stderr
    assert "the console's `relay` key must name the relay in the device's remote.relays" \
        in done.stderr


def test_close_of_an_unknown_session_fails(platform):
    done = console(platform, "close", platform.ident, "0" * 32)
    assert done.returncode == 1, done.stderr
    assert "no session %s on %s" % ("0" * 32, platform.ident) in done.stderr


def test_close_of_an_open_session_still_works(platform):
    def session_ids() -> List[str]:
        done = console(platform, "sessions", "--json", platform.ident)
        return [s["session_id"] for s in json.loads(done.stdout)["sessions"]]

    # The platform is shared: an earlier test's session may still be listed (e.g. one
    # resuming on the agent after its console was interrupted): close the master's own.
    earlier = set(session_ids())
    proc = subprocess.Popen(platform.console_argv("master", platform.ident, "--persist", "0"),
                            stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
                            stderr=subprocess.PIPE, text=True)
    try:
        def session_id() -> Optional[str]:
            new = [sid for sid in session_ids() if sid not in earlier]
            return new[0] if new else None

        sid = wait_for(session_id, WAIT, interval=0.5, what="the master's session")
        done = console(platform, "close", platform.ident, sid)
        assert done.returncode == 0, done.stderr
        assert proc.wait(WAIT) is not None
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait(WAIT)
        proc.stderr.close()


# --------------------------------------------------------------------------- item 10


def test_transfer_summary_in_a_script_and_quiet(platform, tmp_path):
    src = tmp_path / "sum.bin"
    random_file(str(src), MIB)
    remote = os.path.join(platform.files_dir, "sum.bin")
    done = console(platform, "push", platform.ident, str(src), remote)
    assert done.returncode == 0
    assert re.match(r"^push: 1 file\(s\), 1\.0 MiB in \d+\.\ds \(.+/s\)\n$", done.stderr), \
        done.stderr
    done = console(platform, "pull", "-q", platform.ident, remote, str(tmp_path / "q.bin"))
    assert done.returncode == 0 and done.stderr == "" and done.stdout == ""
    os.unlink(remote)
