"""Operator experience, fast tier (issue 15, items 4, 6, 7, 8, 10): no broker needed.

The same behaviours through the real programs and a platform are in
``test_console_ux_b_e2e.py``; here the pieces are driven directly (an in-process
console/agent pair over a socketpair, the stock ``sftp`` against ``serve_sftp``).
"""

from __future__ import annotations

# ruff: noqa: F811  (the env and server fixtures are imported from their modules)

import io
import logging
import os
import re
import subprocess
import sys

import pytest
from test_sftp import needs_sftp, run_batch, server  # noqa: F401 - fixture
from test_transfer import MIB, env, sha_file, write_random  # noqa: F401 - fixture

import remote_gevent
from remote_gevent.agent import control as agent_control
from remote_gevent.agent.files import roots as roots_mod
from remote_gevent.common import logs
from remote_gevent.console import transfer as ct
from remote_gevent.console.progress import Progress
from remote_gevent.wire import codes
from remote_gevent.wire.transfer_lines import TransferError


# --------------------------------------------------------------------------- item 4


class InterruptAfter(Progress):
    """Ctrl-C (KeyboardInterrupt in the main greenlet) once ``limit`` bytes arrived."""

    def __init__(self, limit):
        super().__init__(enabled=False)
        self.limit = limit

    def update(self, n):
        super().update(n)
        if self.done >= self.limit:
            raise KeyboardInterrupt


def _no_escape(fn):
    try:
        return fn()
    except KeyboardInterrupt:
        pytest.fail("KeyboardInterrupt escaped run_push/run_pull")


def test_interrupted_pull_keeps_partial_and_resume_continues(env):
    size = 12 * MIB
    remote = env.rw / "i.bin"
    write_random(str(remote), size)
    local = env.local / "i.bin"
    err = io.StringIO()
    code = _no_escape(lambda: ct.run_pull(env.pair().factory, str(remote), str(local),
                                          err=err, progress=InterruptAfter(4 * MIB)))
    assert code == codes.EXIT_INTERRUPTED == 130
    part = env.local / ".i.bin.rgpart"
    kept = part.stat().st_size
    assert 0 < kept < size and not local.exists()
    lines = err.getvalue().splitlines()
    assert len(lines) == 1 and "interrupted" in lines[0] and str(part) in lines[0] \
        and "--resume" in lines[0], lines
    out = ct.pull(env.pair().factory, str(remote), str(local), resume=True)
    assert out["bytes"] == size - kept          # continued from the kept partial
    assert sha_file(str(local)) == sha_file(str(remote)) and not part.exists()


def test_interrupted_push_says_resume(env):
    src = env.local / "u.bin"
    write_random(str(src), 8 * MIB)
    err = io.StringIO()
    code = _no_escape(lambda: ct.run_push(env.pair().factory, str(src), str(env.rw / "u.bin"),
                                          err=err, progress=InterruptAfter(2 * MIB)))
    assert code == 130
    assert err.getvalue().count("\n") == 1 and "--resume" in err.getvalue()


# --------------------------------------------------------------------------- item 6


def test_pull_refuses_existing_local_file_unless_overwrite(env):
    remote = env.rw / "o.bin"
    remote.write_bytes(b"new contents\n")
    local = env.local / "o.bin"
    local.write_bytes(b"precious\n")
    with pytest.raises(TransferError) as ei:
        ct.pull(env.pair().factory, str(remote), str(local))
    assert ei.value.code == "exists" and "--overwrite" in ei.value.message
    assert ct.exit_code(ei.value.code) == ct.EXIT_REFUSED
    assert local.read_bytes() == b"precious\n"
    assert not (env.local / ".o.bin.rgpart").exists()
    ct.pull(env.pair().factory, str(remote), str(local), overwrite=True)
    assert local.read_bytes() == b"new contents\n"


def test_pull_never_clobbers_a_file_that_appears_during_the_download(env):
    """The check before the download is repeated atomically at the end (link, not
    rename): a file created meanwhile is kept, and the download is refused."""
    remote = env.rw / "race.bin"
    write_random(str(remote), 2 * MIB)
    local = env.local / "race.bin"

    class AppearAfter(Progress):
        def update(self, n):
            super().update(n)
            if not local.exists():
                local.write_bytes(b"appeared\n")

    with pytest.raises(TransferError) as ei:
        ct.pull(env.pair().factory, str(remote), str(local), progress=AppearAfter(enabled=False))
    assert ei.value.code == "exists"
    assert local.read_bytes() == b"appeared\n"


def test_recursive_pull_refuses_existing_files_too(env):
    (env.rw / "tree").mkdir()
    (env.rw / "tree" / "a.txt").write_bytes(b"remote\n")
    back = env.local / "back"
    back.mkdir()
    (back / "a.txt").write_bytes(b"local\n")
    with pytest.raises(TransferError) as ei:
        ct.pull(env.pair().factory, str(env.rw / "tree"), str(back), recursive=True)
    assert ei.value.code == "exists"
    assert (back / "a.txt").read_bytes() == b"local\n"
    ct.pull(env.pair().factory, str(env.rw / "tree"), str(back), recursive=True,
            overwrite=True)
    assert (back / "a.txt").read_bytes() == b"remote\n"


# --------------------------------------------------------------------------- item 10


def test_transfer_summary_off_a_terminal_and_quiet(env):
    remote = env.rw / "s.bin"
    write_random(str(remote), MIB)
    err = io.StringIO()      # not a terminal: no progress bar, but the summary line
    assert ct.run_pull(env.pair().factory, str(remote), str(env.local / "s1"), err=err) == 0
    assert err.getvalue().startswith("pull: 1 file(s), 1.0 MiB in "), err.getvalue()
    assert "\r" not in err.getvalue()
    err = io.StringIO()
    assert ct.run_pull(env.pair().factory, str(remote), str(env.local / "s2"), err=err,
                       quiet=True) == 0
    assert err.getvalue() == ""
    err = io.StringIO()
    assert ct.run_push(env.pair().factory, str(env.local / "s1"), str(env.rw / "s3"),
                       err=err, quiet=True) == 0
    assert err.getvalue() == ""


def test_console_logging_user_facing_unless_verbose(capsys):
    root = logging.getLogger()
    saved = root.handlers[:], root.level
    try:
        logs.setup_console("remote-gevent-console", 0)
        logging.getLogger("remote_gevent.wire.mux").warning("tunnel x: reset by peer")
        logging.getLogger("remote_gevent.console.control").warning("ignoring \x1b[2J reply")
        try:
            raise ValueError("boom")
        except ValueError:
            logging.getLogger("remote_gevent.wire.mux").exception("tunnel x failed")
        err = capsys.readouterr().err.splitlines()
        assert err == ["remote-gevent-console: warning: ignoring \\x1b[2J reply",
                       "remote-gevent-console: tunnel x failed (run with -v for details)"]
        logs.setup_console("remote-gevent-console", 1)
        logging.getLogger("remote_gevent.wire.mux").warning("tunnel x: reset by peer")
        assert capsys.readouterr().err == \
            "remote-gevent-console: WARNING remote_gevent.wire.mux: tunnel x: reset by peer\n"
    finally:
        for h in root.handlers[:]:
            root.removeHandler(h)
        for h in saved[0]:
            root.addHandler(h)
        root.setLevel(saved[1])


@pytest.mark.parametrize("module,prog", [
    ("remote_gevent.agent.cli", "remote-gevent"),
    ("remote_gevent.relay.cli", "remote-gevent-relay"),
    ("remote_gevent.console.cli", "remote-gevent-console"),
])
def test_one_version_format(module, prog):
    done = subprocess.run([sys.executable, "-m", module, "--version"], capture_output=True,
                          text=True, timeout=60)
    assert done.returncode == 0, done.stderr
    assert done.stdout == "%s %s\n" % (prog, remote_gevent.__version__)


def test_detached_banner_does_not_say_ctrl_c():
    from remote_gevent.demo import banner

    log_text = ("demo: starting …\n%s /x\n  broker  amqps://…\n\nTry:\n  cmd  # note\n\n"
                "%s (or scripts/demo --dir /x --stop) tears it all down.\n"
                % (banner.BANNER_START, banner.ATTACHED_HINT))
    shown = banner.detached_banner(log_text)
    assert shown.startswith(banner.BANNER_START) and "cmd  # note" in shown
    assert "Ctrl-C" not in shown and "tears it all down" not in shown


# --------------------------------------------------------------------------- item 7


@needs_sftp
def test_sftp_starts_in_the_writable_root(server):
    s = server
    (s.local / "up.txt").write_bytes(b"hello\n")
    done = run_batch(s, ["pwd", "put %s up.txt" % (s.local / "up.txt"), "ls"])
    assert done.returncode == 0, done.stderr + done.stdout
    assert "Remote working directory: %s" % s.rw in done.stdout
    assert (s.rw / "up.txt").read_bytes() == b"hello\n"


@needs_sftp
def test_sftp_starts_in_the_only_root_even_read_only(server):
    s = server
    s.roots.roots[:] = [r for r in s.roots.roots if not r.writable]
    done = run_batch(s, ["pwd", "get readme.txt %s" % (s.local / "got.txt")])
    assert done.returncode == 0, done.stderr + done.stdout
    assert "Remote working directory: %s" % s.ro in done.stdout
    assert (s.local / "got.txt").read_bytes() == b"read only\n"


@needs_sftp
def test_sftp_starts_in_virtual_root_with_several_read_only_roots(server):
    s = server
    s.roots.roots[:] = [r for r in s.roots.roots if not r.writable] + [
        roots_mod.Root(str(s.outside), writable=False)]
    done = run_batch(s, ["pwd"])
    assert done.returncode == 0, done.stderr + done.stdout
    assert "Remote working directory: /\n" in done.stdout


# --------------------------------------------------------------------------- item 8


def test_outside_root_and_read_only_name_the_roots(tmp_path):
    rw, ro = tmp_path / "rw", tmp_path / "ro"
    rw.mkdir()
    ro.mkdir()
    r = roots_mod.Roots([roots_mod.Root(str(rw), writable=True),
                         roots_mod.Root(str(ro), writable=False)])
    with pytest.raises(TransferError) as ei:
        r.resolve("/etc/passwd")
    assert ei.value.code == "outside_root"
    assert "allowed: %s (rw), %s (ro)" % (rw, ro) in ei.value.message
    with pytest.raises(TransferError) as ei:
        r.resolve(str(ro / "x"), want_write=True)
    assert ei.value.code == "read_only" and "writable: %s" % rw in ei.value.message
    many = roots_mod.Roots([roots_mod.Root(str(tmp_path / ("d%d" % i))) for i in range(20)])
    with pytest.raises(TransferError) as ei:
        many.resolve("/nowhere")
    assert "and 12 more" in ei.value.message


def test_target_not_permitted_names_the_rule():
    from test_protocol import check, request

    import nacl  # noqa: F401 - test_protocol needs it
    from remote_gevent.crypto import authkeys as ak
    from remote_gevent.crypto import identity
    from remote_gevent.wire import protocol as p

    free, limited = identity.IdentityKey.generate(), identity.IdentityKey.generate()
    trusted = ak.AuthorizedKeys.parse("%s a\npermitopen=\"127.0.0.1:22\" %s b\n" % (
        ak.ssh_pubkey_line(free.public_bytes), ak.ssh_pubkey_line(limited.public_bytes)))
    for signer, target, rule in (
            (free, "10.0.0.1:22", "the device's remote.allow"),
            (limited, "127.0.0.1:80", "this operator's permitopen in the device's "
                                      "authorized_keys")):
        _, raw = request(signer, targets=[target])
        with pytest.raises(p.Refused) as ei:
            check(raw, trusted)
        assert ei.value.reason == "target_not_permitted"
        assert ei.value.detail.endswith(" by " + rule), ei.value.detail
        # what the agent sends in session.refuse / records in the history
        assert agent_control._targets_text(ei.value.detail) == \
            "%s not permitted by %s" % (target, rule)


def test_relay_mismatch_refusal_is_a_relay_exit():
    code, hint = codes.refusal_exit("malformed", "relay localhost:1 %s"
                                    % codes.RELAY_MISMATCH_TEXT)
    assert code == codes.EXIT_RELAY == 12 and "relay" in hint
    assert codes.refusal_exit("malformed", "malformed message") == (codes.EXIT_REFUSED, "")
    assert codes.refusal_exit("target_not_permitted", "x") == (codes.EXIT_REFUSED, "")


def _console_md() -> str:
    here = os.path.dirname(os.path.abspath(__file__))
    with open(os.path.join(here, "..", "docs", "console.md")) as f:
        return f.read()


def test_master_log_file_is_where_the_docs_say(tmp_path):
    """``stdio --master auto`` starts a master whose log is the file docs/console.md
    names (a master that cannot start still leaves its reason there)."""
    from remote_gevent.console import master

    control = tmp_path / "ctl"
    path = master.socket_path(str(control), "fr04", "dev1", "0123456789abcdef")
    code, message = master.start_background(str(tmp_path / "missing.yaml"), "dev1", path,
                                            1.0, [])
    assert code != 0, message
    documented = re.search(r"its log in\s+`([^`]+)` beside the socket", _console_md())
    assert documented, "docs/console.md no longer says where the master logs"
    name = documented.group(1).replace("<server_id>", "fr04").replace("<DEVICE>", "dev1") \
        .replace("<identity>", "0123456789abcdef")
    assert sorted(os.listdir(str(control))) == [name], os.listdir(str(control))
    with open(str(control / name)) as f:
        assert "missing.yaml" in f.read()


def test_docs_say_what_the_programs_do():
    console_md = _console_md()
    assert "--quiet" in console_md and "pull DEVICE REMOTE LOCAL [--overwrite]" in console_md


def test_next_step_hints(monkeypatch, tmp_path):
    from remote_gevent.console.cli_base import _next_step
    from remote_gevent.console.config import ConsoleError

    monkeypatch.setenv("REMOTE_GEVENT_CONSOLE_CONFIG", str(tmp_path / "c.yaml"))
    cases = [
        (codes.EXIT_BROKER, "cannot connect to 127.0.0.1:5671: connection refused",
         " (the broker: check amqp.urls in %s and that the broker runs)" % (tmp_path / "c.yaml")),
        (codes.EXIT_BROKER, "127.0.0.1:5671: certificate verify failed: self-signed",
         " (broker TLS: check amqp.ca_file and the host in amqp.urls in %s)"
         % (tmp_path / "c.yaml")),
        (codes.EXIT_RELAY, "cannot connect to 127.0.0.1:8443: timed out",
         " (the relay: check relay and relay_ca_file in %s)" % (tmp_path / "c.yaml")),
        (codes.EXIT_BROKER, "broker 127.0.0.1:5671: access refused", ""),  # says "broker"
        (codes.EXIT_REFUSED, "device demo refused the session: x", ""),
    ]
    for exit_code, message, hint in cases:
        assert _next_step(ConsoleError(message, exit_code)) == hint, message
