"""Issue 15 item 9 without a broker: shell completion (real bash), man pages generated
from the click definitions (rendered by groff), and the systemd unit (``systemd-analyze
verify``; its ExecStartPre/ExecStart/ExecReload command lines run for real)."""

from __future__ import annotations

import configparser
import os
import shlex
import shutil
import signal
import subprocess
import sys

import pytest

from agent_helpers import WAIT, cli_executable, pid_alive, wait_for, wait_log, write_config
from remote_gevent.agent import daemon

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
UNIT = os.path.join(REPO, "scripts", "systemd", "remote-gevent.service")
CONSOLE = [sys.executable, "-m", "remote_gevent.console.cli"]
ENV = dict(os.environ, PYTHONPATH=REPO + os.pathsep + os.environ.get("PYTHONPATH", ""))


def console_script(tmp_path) -> str:
    """A ``remote-gevent-console`` on PATH running this checkout (completion keys on the
    program name)."""
    bindir = tmp_path / "bin"
    bindir.mkdir(exist_ok=True)
    script = bindir / "remote-gevent-console"
    script.write_text("#!/bin/sh\nexec %s -m remote_gevent.console.cli \"$@\"\n"
                      % sys.executable)
    script.chmod(0o755)
    return str(bindir)


@pytest.mark.parametrize("words,expected", [
    ("remote-gevent-console ss", ["ssh-config"]),
    ("remote-gevent-console ssh-config --ma", ["--master"]),
    ("remote-gevent-console stdio --master a", ["auto"]),
])
def test_bash_completion(tmp_path, words, expected):
    bindir = console_script(tmp_path)
    env = dict(ENV, PATH=bindir + os.pathsep + os.environ["PATH"])
    source = subprocess.run(["remote-gevent-console", "completion", "bash"], env=env,
                            capture_output=True, text=True, timeout=WAIT)
    assert source.returncode == 0, source.stderr
    script = tmp_path / "completion.bash"
    script.write_text(source.stdout)
    cword = len(words.split()) - 1
    probe = ("source %s\nCOMP_WORDS=(%s)\nCOMP_CWORD=%d\n"
             "_remote_gevent_console_completion remote-gevent-console\n"
             "printf '%%s\\n' \"${COMPREPLY[@]}\"\n" % (shlex.quote(str(script)), words, cword))
    done = subprocess.run(["bash", "-c", probe], env=env, capture_output=True, text=True,
                          timeout=WAIT)
    assert done.returncode == 0, done.stderr
    assert done.stdout.split() == expected, done.stdout + done.stderr


def test_zsh_completion_script_is_generated():
    done = subprocess.run(CONSOLE + ["completion", "zsh"], env=ENV, capture_output=True,
                          text=True, timeout=WAIT)
    assert done.returncode == 0 and "#compdef remote-gevent-console" in done.stdout
    if shutil.which("zsh"):
        check = subprocess.run(["zsh", "-n"], input=done.stdout, text=True,
                               capture_output=True, timeout=WAIT)
        assert check.returncode == 0, check.stderr


def test_man_pages_from_click(tmp_path):
    if shutil.which("groff") is None:
        pytest.skip("groff is not installed")
    out = tmp_path / "man"
    done = subprocess.run([sys.executable, os.path.join(REPO, "scripts", "manpages"), str(out)],
                          env=ENV, capture_output=True, text=True, timeout=WAIT)
    assert done.returncode == 0, done.stderr
    pages = sorted(os.listdir(str(out)))
    assert pages == ["remote-gevent-console.1", "remote-gevent-relay.1", "remote-gevent.1"]
    for page in pages:
        render = subprocess.run(["groff", "-man", "-Tutf8", "-ww", str(out / page)],
                                capture_output=True, text=True, timeout=WAIT,
                                env=dict(ENV, GROFF_NO_SGR="1"))
        assert render.returncode == 0 and not render.stderr, (page, render.stderr)
    console = subprocess.run(["groff", "-man", "-Tascii", "-P-cbou",
                              str(out / "remote-gevent-console.1")], capture_output=True,
                             text=True, timeout=WAIT).stdout
    for command in ("ssh-config", "doctor", "check-config", "completion", "sessions",
                    "stdio", "master", "push", "pull"):
        assert "   %s " % command in console, command
    assert "--target HOST:PORT" in console  # options come from the click declarations
    agent = (out / "remote-gevent.1").read_text()
    assert "check\\-config" in agent and "rotate\\-key" in agent


# --------------------------------------------------------------------------- systemd


def unit() -> configparser.RawConfigParser:
    parser = configparser.RawConfigParser(strict=False, interpolation=None)
    parser.optionxform = str  # type: ignore[assignment,method-assign]
    parser.read(UNIT)
    return parser


def test_systemd_unit_verifies(tmp_path):
    if shutil.which("systemd-analyze") is None:
        pytest.skip("systemd-analyze is not installed")
    exe = cli_executable(tmp_path)
    copy = tmp_path / "remote-gevent.service"
    copy.write_text(open(UNIT).read().replace("/usr/local/bin/remote-gevent", exe))
    done = subprocess.run(["systemd-analyze", "verify", str(copy)], capture_output=True,
                          text=True, timeout=WAIT)
    assert done.returncode == 0, done.stderr
    assert "remote-gevent.service" not in done.stderr, done.stderr  # no unknown key, no typo


def test_systemd_unit_commands_run_the_agent(tmp_path):
    """The unit's contract, exercised without systemd: ExecStartPre validates, ExecStart
    returns once the daemon runs and its pid is in PIDFile, ExecReload's SIGHUP reloads,
    KillSignal stops it and the pidfile goes."""
    service = unit()["Service"]
    assert service["Type"] == "forking"
    for option in ("NoNewPrivileges", "ProtectSystem", "PrivateTmp", "ProtectKernelTunables",
                   "RestrictAddressFamilies", "SystemCallFilter", "CapabilityBoundingSet"):
        assert service.get(option), option
    pidfile = service["PIDFile"]
    assert "--pidfile %s" % pidfile in service["ExecStart"]
    cfg = write_config(tmp_path)
    mine = str(tmp_path / "remote-gevent.pid")
    log = str(tmp_path / "agent.log")
    exe = cli_executable(tmp_path)

    def command(line: str):
        words = shlex.split(line.replace("${CONFIG}", cfg).replace(pidfile, mine))
        assert words[0] == "/usr/local/bin/remote-gevent"
        return [exe] + words[1:]

    pre = subprocess.run(command(service["ExecStartPre"]), capture_output=True, text=True,
                         timeout=WAIT, env=ENV)
    assert pre.returncode == 0, pre.stderr
    start = subprocess.run(command(service["ExecStart"]) + ["--log-file", log],
                           capture_output=True, text=True, timeout=WAIT, env=ENV)
    assert start.returncode == 0, start.stderr
    pid = daemon.read_pid(mine)
    try:
        assert pid and pid_alive(pid)
        wait_log(log, "agent started")
        assert service["ExecReload"] == "/bin/kill -HUP $MAINPID"
        os.kill(pid, signal.SIGHUP)
        wait_log(log, "reload")
        assert pid_alive(pid)
        assert service["KillSignal"] == "SIGTERM"
        os.kill(pid, signal.SIGTERM)
        wait_for(lambda: not pid_alive(pid), WAIT, what="the agent to stop")
        assert not os.path.exists(mine)
    finally:
        if pid and pid_alive(pid):
            os.kill(pid, signal.SIGKILL)
