"""The LSB init script, run for real with bash: start, status, reload, stop, status."""

import os
import shutil
import subprocess

import pytest

from agent_helpers import (WAIT, cli_executable, kill_quietly, pid_alive, read, wait_for,
                           wait_log, write_config)

from remote_gevent.agent import daemon

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SCRIPT = os.path.join(REPO, "scripts", "init.d", "remote-gevent")
PLAIN_PATH = "/usr/local/bin:/usr/bin:/bin"


def test_lsb_header():
    text = open(SCRIPT).read()
    assert text.startswith("#!/bin/sh\n")
    assert "### BEGIN INIT INFO" in text and "### END INIT INFO" in text
    for field in ("Provides:", "Required-Start:", "Default-Start:", "Short-Description:"):
        assert "# " + field in text


@pytest.fixture
def initd(tmp_path):
    cfg = write_config(tmp_path)
    pidfile = str(tmp_path / "run" / "remote-gevent.pid")
    os.mkdir(str(tmp_path / "run"))
    log = str(tmp_path / "agent.log")
    defaults = tmp_path / "defaults"
    exe = cli_executable(tmp_path)

    def run(action, use_ssd="auto", path=None):
        defaults.write_text(
            'DAEMON="%s"\nCONFIG="%s"\nPIDFILE="%s"\nDAEMON_OPTS="--log-file %s"\n'
            "STOP_TIMEOUT=10\nUSE_SSD=%s\n" % (exe, cfg, pidfile, log, use_ssd))
        env = dict(os.environ, REMOTE_GEVENT_DEFAULTS=str(defaults))
        if path is not None:
            env["PATH"] = path
        return subprocess.run(["bash", SCRIPT, action], capture_output=True, text=True,
                              timeout=WAIT + 15, env=env, stdin=subprocess.DEVNULL)

    yield {"run": run, "cfg": cfg, "pidfile": pidfile, "log": log}
    kill_quietly(daemon.read_pid(pidfile))


def cycle(initd, **kw):
    run = initd["run"]
    r = run("status", **kw)
    assert r.returncode == 3, r.stdout + r.stderr

    r = run("start", **kw)
    assert r.returncode == 0, r.stdout + r.stderr
    pid = daemon.read_pid(initd["pidfile"])
    assert pid and pid_alive(pid), r.stdout + r.stderr
    assert "started (pid %d)" % pid in r.stdout
    wait_log(initd["log"], "agent started")

    r = run("status", **kw)
    assert r.returncode == 0 and "running (pid %d)" % pid in r.stdout

    r = run("start", **kw)  # idempotent
    assert r.returncode == 0 and "already running" in r.stdout

    with open(initd["cfg"]) as fh:
        text = fh.read()
    with open(initd["cfg"], "w") as fh:
        fh.write(text.replace("max_session: 10", "max_session: 12"))
    r = run("reload", **kw)
    assert r.returncode == 0, r.stdout + r.stderr
    wait_log(initd["log"], "reload: applied remote.max_session")
    assert daemon.read_pid(initd["pidfile"]) == pid  # same process

    r = run("stop", **kw)
    assert r.returncode == 0, r.stdout + r.stderr
    wait_for(lambda: not pid_alive(pid), what="agent exit")
    assert not os.path.exists(initd["pidfile"])
    assert "agent stopped (exit 0)" in read(initd["log"])

    r = run("status", **kw)
    assert r.returncode == 3, r.stdout + r.stderr
    r = run("reload", **kw)
    assert r.returncode == 7


@pytest.mark.skipif(shutil.which("start-stop-daemon") is None,
                    reason="start-stop-daemon not installed")
def test_cycle_with_start_stop_daemon(initd):
    cycle(initd, use_ssd="auto")


def test_cycle_plain_shell(initd):
    if shutil.which("start-stop-daemon", path=PLAIN_PATH):
        pytest.skip("start-stop-daemon cannot be hidden from PATH here")
    cycle(initd, use_ssd="auto", path=PLAIN_PATH)


def test_restart_and_configtest(initd):
    run = initd["run"]
    assert run("start").returncode == 0
    first = daemon.read_pid(initd["pidfile"])
    r = run("restart")
    assert r.returncode == 0, r.stdout + r.stderr
    second = daemon.read_pid(initd["pidfile"])
    assert second and second != first and pid_alive(second)
    assert not pid_alive(first)
    r = run("force-reload")
    assert r.returncode == 0
    third = daemon.read_pid(initd["pidfile"])
    assert third != second and pid_alive(third)
    assert run("stop").returncode == 0

    r = run("configtest")
    assert r.returncode == 0 and "OK" in r.stdout
    with open(initd["cfg"], "a") as fh:
        fh.write("  bogus_key: 1\n")
    r = run("configtest")
    assert r.returncode == 1 and "remote.bogus_key" in r.stderr
    # start refuses too, with the reason.
    r = run("start")
    assert r.returncode == 1 and "remote.bogus_key" in r.stderr + r.stdout


def test_usage(initd):
    r = initd["run"]("frobnicate")
    assert r.returncode == 2 and "Usage" in r.stderr
