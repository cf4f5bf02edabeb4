"""Every command line the demo banner, docs/demo.md and the README print actually runs
(issue 15, "Done when").

A platform like ``scripts/demo``'s (device ``demo``, directory ``…/demo-platform``, so the
docs' relative paths hold) on the suite's broker. Each printed line is run by ``bash``
as a user would paste it, with these substitutions only, made here and nowhere else:

- the fixed ports of the examples (2222, 1080, 8080, 8443) become free ones (other tests
  run in parallel), and ``0.0.0.0`` becomes ``127.0.0.1`` (tests stay on loopback);
- ``ssh``/``sftp`` get the options that make them non-interactive (``-F /dev/null``,
  ``BatchMode``, a known-hosts file, the test sshd's client key) and ssh the test sshd's
  port for ``127.0.0.1:22``; ``sftp`` a batch (``pwd``), ``ssh`` a command (``true``);
- the README's synopses: ``DEVICE``, ``LOCAL``, ``/remote/path``, ``SESSION_ID``, ``user``
  get real values, ``a | b`` is two commands, ``[optional]`` parts are run without and
  with (except ``[-L ...]``).

Commands that do not end by themselves (forward, socks, watch, master, the relay) are
stopped with Ctrl-C (SIGINT) or SIGTERM once they are ready and must exit 0 cleanly.
README lines not run are listed in ``NOT_RUN`` with the reason; any other line fails the
test until it is run or listed.
"""

from __future__ import annotations

import json
import os
import re
import shlex
import signal
import stat
import subprocess
import sys
import time
from typing import Dict, List, Optional

import pytest
from test_e2e import SSHD, WAIT, Sshd, free_port, unique, wait_for

from remote_gevent.demo.banner import banner_commands
from remote_gevent.demo.platform import DemoPlatform

pytestmark = [pytest.mark.e2e, pytest.mark.slow]

HERE = os.path.dirname(os.path.abspath(__file__))
REPO = os.path.dirname(HERE)

#: README lines deliberately not run here, with the reason (prefix match).
NOT_RUN = {
    "./scripts/demo": "starts its own broker; this test runs the same platform code",
    "./scripts/test": "runs the test suite, this test included",
    "remote-gevent [--config PATH] [--foreground]": "the daemon synopsis: tests/test_daemon.py",
    "remote-gevent [--pidfile PATH] rotate-key": "signals a daemonized agent: "
                                                 "tests/test_signals.py",
    "pip install": "installs system-wide",
    "install -m": "installs system-wide",
    "update-rc.d": "system service set-up: tests/test_initd.py",
    "service remote-gevent": "system service: tests/test_initd.py",
    "remote-gevent-relay --config /etc/alemca/relay.yaml": "needs a system config; the "
                                                           "--listen form is run",
    'eval "$(remote-gevent-console completion': "shell set-up: "
                                                 "tests/test_console_ux_tools.py",
    "scripts/bundle": "downloads wheels for another platform: tests/test_bundle.py",
    "tar xzf remote-gevent-": "on the device: tests/test_bundle.py unpacks a bundle",
    "sudo ./install.sh": "installs system-wide: tests/test_bundle.py runs it with --root",
    "systemctl": "system service: tests/test_console_ux_tools.py runs the unit's commands",
}

READY = {"forward": "forwarding ", "socks": "SOCKS5 on ", "master": "master of ",
         "watch": "fr04/"}


# --------------------------------------------------------------------------- extraction


def code_blocks(path: str) -> List[List[str]]:
    """The lines of each fenced code block of a Markdown file."""
    blocks, current = [], None
    with open(path) as f:
        for line in f:
            if line.startswith("```"):
                if current is None:
                    current = []
                else:
                    blocks.append(current)
                    current = None
            elif current is not None:
                current.append(line.rstrip("\n"))
    return blocks


def strip_comment(line: str) -> str:
    return re.split(r"\s{2,}#\s|^#", line, maxsplit=1)[0].rstrip()


def readme_commands() -> List[str]:
    """README code-block lines, continuation lines joined, comments removed."""
    out: List[str] = []
    for block in code_blocks(os.path.join(REPO, "README.md")):
        for raw in block:
            line = strip_comment(raw)
            if not line.strip():
                continue
            if raw.startswith(" ") and out:
                out[-1] += " " + line.strip()
            else:
                out.append(line.strip())
            if out[-1].endswith("\\"):  # a shell continuation: the next line joins it
                out[-1] = out[-1][:-1].rstrip()
    return out


def expand_synopsis(line: str) -> List[str]:
    """``a [-x] | b`` → ``a``, ``a -x``, ``PROG b`` (``[... ...]`` repeats are dropped)."""
    prog = line.split(" ", 1)[0]
    parts = [p.strip() for p in line.split(" | ")]
    out = []
    for i, part in enumerate(parts):
        if i:
            part = prog + " " + part
        part = re.sub(r"\s*\[[^]]*\.\.\.\]", "", part)
        bare = re.sub(r"\s*\[[^]]*\]", "", part)
        full = re.sub(r"\[([^]]*)\]", r"\1", part)
        out.extend([bare] if bare == full else [bare, full])
    return out


def demo_md_commands() -> List[str]:
    """docs/demo.md's "Using it" block: the ``C=…`` line and every command after it."""
    for block in code_blocks(os.path.join(REPO, "docs", "demo.md")):
        if block and block[0].startswith("C="):
            return [strip_comment(b) for b in block if strip_comment(b).strip()]
    raise AssertionError("docs/demo.md has no C=… block")


# --------------------------------------------------------------------------- the runner


class Runner:
    def __init__(self, platform: DemoPlatform, work: str, sshd: Optional[Sshd]) -> None:
        self.p = platform
        self.work = work
        self.sshd = sshd
        self.ran: List[str] = []
        bindir = os.path.join(work, "bin")
        os.makedirs(bindir, exist_ok=True)
        # The programs as installed, but this checkout's code (PYTHONPATH is kept).
        for prog, module in (("remote-gevent-console", "remote_gevent.console.cli"),
                             ("remote-gevent", "remote_gevent.agent.cli"),
                             ("remote-gevent-relay", "remote_gevent.relay.cli")):
            path = os.path.join(bindir, prog)
            with open(path, "w") as f:
                f.write("#!/bin/sh\nexec %s -m %s \"$@\"\n" % (shlex.quote(sys.executable),
                                                            module))
            os.chmod(path, stat.S_IRWXU)
        home = os.path.join(work, "home")
        os.makedirs(os.path.join(home, ".ssh"), exist_ok=True)  # for `ssh-config >> ~/.ssh/config`
        self.env = dict(os.environ, PATH=bindir + os.pathsep + os.environ["PATH"], HOME=home,
                        USER="root", REMOTE_GEVENT_CONSOLE_CONFIG=platform.console_config,
                        REMOTE_GEVENT_CONFIG=platform.agent_config)
        run = os.path.join(work, "run")  # the masters' sockets: ours, not the machine's
        os.makedirs(run, mode=0o700, exist_ok=True)
        self.env["XDG_RUNTIME_DIR"] = run
        with open(os.path.join(work, "some-file"), "w") as f:
            f.write("some file\n")

    # -- rewriting ---------------------------------------------------------------------
    def rewrite(self, line: str) -> str:
        for port in ("2222", "1080", "8080", "8443"):
            line = re.sub(r"(?<![\d.])%s(?=[:\s]|$)" % port, str(free_port()), line)
        line = line.replace("0.0.0.0:", "127.0.0.1:")
        line = re.sub(r"\bDEVICE\b", self.p.ident, line)
        line = line.replace("/remote/path", os.path.join(self.p.files_dir, "some-file"))
        line = re.sub(r"\buser@", "root@", line)
        if re.search(r"\bpush\b", line):
            line = re.sub(r"\bLOCAL\b", "./some-file", line)
        line = re.sub(r"\bLOCAL\b", "./copy", line)
        words = line.split(" ", 1)
        if words[0] == "ssh":
            assert self.sshd is not None
            s = self.sshd
            line = ("ssh -F /dev/null -i %s -o BatchMode=yes -o IdentitiesOnly=yes "
                    "-o StrictHostKeyChecking=no -o UserKnownHostsFile=%s -o LogLevel=ERROR %s"
                    " true" % (s.client_key, os.path.join(self.work, "known_hosts_ssh"),
                               words[1].replace("127.0.0.1:22", "127.0.0.1:%d" % s.port)))
        elif words[0] == "sftp":
            batch = os.path.join(self.work, "sftp-batch")
            with open(batch, "w") as f:
                f.write("pwd\n")
            line = ("sftp -F /dev/null -b %s -o BatchMode=yes -o StrictHostKeyChecking=no "
                    "-o UserKnownHostsFile=%s %s" % (batch, os.path.join(
                        self.work, "known_hosts_sftp"), words[1]))
        return line

    # -- running -----------------------------------------------------------------------
    def prepare(self, line: str) -> str:
        """Make the state the line expects (a file to pull, none to push onto, a session
        to close); returns the line with SESSION_ID filled in."""
        remote = os.path.join(self.p.files_dir, "some-file")
        overwrite = "--overwrite" in line
        if re.search(r"\bpush\b", line) and not overwrite and os.path.exists(remote):
            os.unlink(remote)
        if re.search(r"\bpull\b", line):
            with open(remote, "w") as f:
                f.write("remote file\n")
            copy = os.path.join(self.work, "copy")
            if not overwrite and os.path.exists(copy):
                os.unlink(copy)
        if "SESSION_ID" in line:
            line = line.replace("SESSION_ID", self.open_session())
        if re.search(r"\bmaster\b.*--stop", line):
            self.open_session()
        return line

    def open_session(self) -> str:
        """A master holding a session (its id); it ends when the session is closed."""
        def session_ids() -> List[str]:
            done = subprocess.run(self.p.console_argv("sessions", "--json", self.p.ident),
                                  capture_output=True, text=True, timeout=WAIT, env=self.env)
            return [s["session_id"] for s in json.loads(done.stdout)["sessions"]]

        # An earlier line's session may still be listed (e.g. one resuming on the agent
        # after its console was stopped): the master's own is the new one.
        earlier = set(session_ids())
        proc = subprocess.Popen(self.p.console_argv("master", self.p.ident, "--persist", "0"),
                                stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
                                stderr=subprocess.DEVNULL, start_new_session=True,
                                env=self.env)
        self.background = proc

        def listed() -> Optional[str]:
            new = [sid for sid in session_ids() if sid not in earlier]
            return new[0] if new else None

        return wait_for(listed, WAIT, interval=0.3, what="the master's session")

    def run(self, line: str, shell_prefix: str = "") -> None:
        line = self.prepare(self.rewrite(line))
        script = shell_prefix + "exec " + line
        words = shlex.split(line.replace("$C", "remote-gevent-console"))
        sub = next((w for w in words[1:] if w in READY), None)
        if sub and "--stop" not in words and words[0] in ("remote-gevent-console", "$C") \
                or words[0] == "remote-gevent-relay":
            self._run_until_ready(line, script, sub)
        else:
            env = self.env
            if sub is None and "keygen" in words:  # a new operator: no console config yet
                env = {k: v for k, v in env.items() if k != "REMOTE_GEVENT_CONSOLE_CONFIG"}
            done = subprocess.run(["bash", "-c", script], cwd=self.work, env=env,
                                  capture_output=True, text=True, timeout=120,
                                  stdin=subprocess.DEVNULL)
            assert done.returncode == 0, "%s\n-> exit %d\n%s%s" % (
                line, done.returncode, done.stdout[-2000:], done.stderr[-2000:])
            assert "Traceback" not in done.stderr, done.stderr
            if words[0] == "sftp":
                assert "Remote working directory: %s" % self.p.files_dir in done.stdout
        self._reap_background()
        self.ran.append(line)

    def _run_until_ready(self, line: str, script: str, sub: Optional[str]) -> None:
        log = os.path.join(self.work, "long-running.log")
        with open(log, "w") as out:
            proc = subprocess.Popen(["bash", "-c", script], cwd=self.work, env=self.env,
                                    stdin=subprocess.DEVNULL, stdout=out,
                                    stderr=subprocess.STDOUT, start_new_session=True)
        try:
            if sub is None:  # the relay: its port
                port = int(re.search(r"--listen \S+:(\d+)", line).group(1))
                from remote_gevent.demo.processes import port_open

                wait_for(lambda: port_open("127.0.0.1", port) or proc.poll() is not None,
                         WAIT, what="the relay's port")
            elif READY[sub] is not None:
                wait_for(lambda: READY[sub] in _read(log) or proc.poll() is not None, WAIT,
                         what="%r from %s" % (READY[sub], line))
            else:
                time.sleep(3.0)  # watch: runs until stopped
            assert proc.poll() is None, "%s exited early:\n%s" % (line, _read(log))
            os.killpg(proc.pid, signal.SIGTERM if sub is None else signal.SIGINT)
            code = proc.wait(WAIT)
        finally:
            if proc.poll() is None:
                os.killpg(proc.pid, signal.SIGKILL)
                proc.wait(WAIT)
        shown = _read(log)
        assert code == 0, "%s\n-> exit %d\n%s" % (line, code, shown[-2000:])
        assert "Traceback" not in shown and "KeyboardInterrupt" not in shown, shown

    def _reap_background(self) -> None:
        proc = getattr(self, "background", None)
        if proc is not None:
            try:
                proc.wait(WAIT)     # the close / --stop ended it
            finally:
                if proc.poll() is None:
                    proc.kill()
                    proc.wait(WAIT)
            self.background = None


def _read(path: str) -> str:
    with open(path, errors="replace") as f:
        return f.read()


# --------------------------------------------------------------------------- fixtures


@pytest.fixture(scope="module")
def demo(rabbit, tmp_path_factory):
    """Device ``demo`` in ``<tmp>/demo-platform``, as ``scripts/demo`` makes it."""
    base = str(tmp_path_factory.mktemp("docs-commands"))
    p = DemoPlatform(os.path.join(base, "demo-platform"), vhost=rabbit.vhost,
                     rabbit=rabbit.node, operator=unique("op"))
    p.start()
    yield p, base
    p.stop()


@pytest.fixture(scope="module")
def sshd_or_none(tmp_path_factory):
    if not os.access(SSHD, os.X_OK):
        yield None
        return
    server = Sshd(str(tmp_path_factory.mktemp("docs-sshd")))
    yield server
    server.stop()


@pytest.fixture
def runner(demo, sshd_or_none):
    p, base = demo
    return Runner(p, base, sshd_or_none)


def _needs_sshd(runner: Runner, line: str) -> None:
    if line.startswith("ssh ") and runner.sshd is None:
        pytest.skip("%s is not installed (openssh-server)" % SSHD)


# --------------------------------------------------------------------------- the tests


def test_banner_lists_the_commands_users_need(demo):
    p, _ = demo
    commands = banner_commands(p.usage())
    for sub in ("forward", "socks", "push", "pull", "devices", "watch", "sessions", "close",
                "master"):
        assert any(re.search(r" %s\b" % sub, c) for c in commands), (sub, commands)
    assert any(c.startswith("ssh ") for c in commands)
    assert any(c.startswith("sftp ") for c in commands)
    assert "Ctrl-C" not in p.usage().split("Try", 1)[0]


def test_every_banner_command_runs(runner):
    commands = banner_commands(runner.p.usage())
    assert len(commands) >= 12, commands
    for line in commands:
        if line.startswith("ssh ") and runner.sshd is None:
            continue
        runner.run(line)
    assert len(runner.ran) >= len(commands) - 1


def test_every_demo_md_command_runs(runner):
    lines = demo_md_commands()
    prefix = lines[0] + "; "       # C="remote-gevent-console -c demo-platform/console.yaml"
    for line in lines[1:]:
        if line.startswith("ssh ") and runner.sshd is None:
            continue
        runner.run(line, shell_prefix=prefix)
    assert len(runner.ran) >= 10, runner.ran


def test_every_readme_command_runs_or_is_listed(runner):
    lines = readme_commands()
    assert len(lines) >= 15, lines
    unlisted: Dict[str, str] = {}
    for line in lines:
        if any(line.startswith(prefix) for prefix in NOT_RUN):
            continue
        prog = line.split(" ", 1)[0]
        if prog not in ("remote-gevent-console", "remote-gevent", "remote-gevent-relay",
                        "ssh", "sftp"):
            unlisted[line] = "neither run nor in NOT_RUN"
            continue
        for command in expand_synopsis(line):
            if command.startswith("ssh ") and runner.sshd is None:
                continue
            if prog == "remote-gevent":
                command = command.replace("PATH", runner.p.agent_config)
            if prog == "remote-gevent-relay":
                # relay.pem / relay.key, as written, from the platform's PKI directory
                command = "cd %s && %s" % (shlex.quote(os.path.join(runner.p.dir, "pki")),
                                           command)
                runner.run(command.split(" && ", 1)[1], shell_prefix=command.split(
                    " && ", 1)[0] + " && ")
                continue
            runner.run(command)
    assert not unlisted, unlisted
    ran = " ".join(runner.ran)
    for sub in ("keygen", "devices", "watch", "forward", "socks", "push", "pull", "sessions",
                "close", "master", "check-config", "pubkey", "--listen"):
        assert sub in ran, (sub, runner.ran)
