"""Pidfile semantics, and real daemonization through the CLI."""

import errno
import os
import signal
import subprocess
import sys

import pytest

from agent_helpers import (WAIT, kill_quietly, pid_alive, read, run_cli, wait_for, wait_log,
                           write_config)

from remote_gevent.agent import daemon


def dead_pid():
    """A pid that certainly names no process now."""
    p = subprocess.Popen([sys.executable, "-c", "pass"])
    p.wait(timeout=WAIT)
    return p.pid


# ------------------------------------------------------------------ pidfile unit tests


def test_write_read_remove(tmp_path):
    path = str(tmp_path / "x.pid")
    daemon.write_pidfile(path)
    assert daemon.read_pid(path) == os.getpid()
    assert open(path).read() == "%d\n" % os.getpid()
    assert os.listdir(str(tmp_path)) == ["x.pid"]  # no temp file left behind
    assert daemon.remove_pidfile(path) is True
    assert not os.path.exists(path)
    assert daemon.remove_pidfile(path) is False


def test_live_pid_refused(tmp_path):
    path = str(tmp_path / "x.pid")
    sleeper = subprocess.Popen(["sleep", "30"])
    try:
        daemon.write_pidfile(path, sleeper.pid)
        with pytest.raises(daemon.PidfileError, match="already running as pid %d" % sleeper.pid):
            daemon.write_pidfile(path)
        assert daemon.read_pid(path) == sleeper.pid
    finally:
        sleeper.kill()
        sleeper.wait(timeout=WAIT)


def test_stale_and_garbage_pidfiles_replaced(tmp_path):
    path = tmp_path / "x.pid"
    path.write_text("%d\n" % dead_pid())
    daemon.write_pidfile(str(path))
    assert daemon.read_pid(str(path)) == os.getpid()
    path.write_text("not a pid\n")
    assert daemon.read_pid(str(path)) is None
    daemon.write_pidfile(str(path))
    assert daemon.read_pid(str(path)) == os.getpid()


def test_eperm_means_alive(monkeypatch):
    def fake_kill(pid, sig):
        raise OSError(errno.EPERM, "Operation not permitted")

    monkeypatch.setattr(daemon.os, "kill", fake_kill)
    assert daemon.pid_alive(12345) is True

    def gone(pid, sig):
        raise OSError(errno.ESRCH, "No such process")

    monkeypatch.setattr(daemon.os, "kill", gone)
    assert daemon.pid_alive(12345) is False


def test_remove_only_if_ours(tmp_path):
    path = tmp_path / "x.pid"
    path.write_text("1\n")
    assert daemon.remove_pidfile(str(path)) is False
    assert path.read_text() == "1\n"


# ------------------------------------------------------------------ real daemon


def proc_status(pid):
    fields = {}
    with open("/proc/%d/status" % pid) as fh:
        for line in fh:
            k, _, v = line.partition(":")
            fields[k] = v.strip()
    return fields


def session_id(pid):
    with open("/proc/%d/stat" % pid) as fh:
        return int(fh.read().rsplit(")", 1)[1].split()[3])


@pytest.fixture
def daemon_env(tmp_path):
    env = {"cfg": write_config(tmp_path), "pidfile": str(tmp_path / "agent.pid"),
           "log": str(tmp_path / "agent.log"), "pids": []}
    yield env
    pid = daemon.read_pid(env["pidfile"])
    for p in env["pids"] + ([pid] if pid else []):
        kill_quietly(p)


def start(env, *extra):
    return run_cli("--config", env["cfg"], "--pidfile", env["pidfile"], "--log-file",
                   env["log"], *extra)


def test_daemonize_lifecycle(daemon_env):
    env = daemon_env
    r = start(env)
    assert r.returncode == 0, r.stderr
    # The launcher returns only once the daemon is ready: the pidfile is there now.
    pid = daemon.read_pid(env["pidfile"])
    assert pid is not None and pid_alive(pid)
    env["pids"].append(pid)
    wait_log(env["log"], "agent started")
    status = proc_status(pid)
    assert status["Umask"] == "0022"
    assert session_id(pid) != pid  # not a session leader: cannot reacquire a tty
    assert os.readlink("/proc/%d/cwd" % pid) == "/"
    for fd in (0, 1, 2):
        assert os.readlink("/proc/%d/fd/%d" % (pid, fd)) == "/dev/null"

    # A second start is refused while the first runs.
    r = start(env)
    assert r.returncode == 1
    assert "already running as pid %d" % pid in r.stderr
    assert daemon.read_pid(env["pidfile"]) == pid

    os.kill(pid, signal.SIGTERM)
    wait_for(lambda: not pid_alive(pid), what="daemon exit")
    assert not os.path.exists(env["pidfile"])
    assert "agent stopped (exit 0)" in read(env["log"])


def test_stale_pidfile_replaced_by_daemon(daemon_env):
    env = daemon_env
    stale = dead_pid()
    with open(env["pidfile"], "w") as fh:
        fh.write("%d\n" % stale)
    r = start(env)
    assert r.returncode == 0, r.stderr
    pid = daemon.read_pid(env["pidfile"])
    assert pid != stale and pid_alive(pid)
    env["pids"].append(pid)
    os.kill(pid, signal.SIGTERM)
    wait_for(lambda: not pid_alive(pid), what="daemon exit")


def test_pidfile_not_removed_if_not_ours(daemon_env):
    env = daemon_env
    assert start(env).returncode == 0
    pid = daemon.read_pid(env["pidfile"])
    env["pids"].append(pid)
    wait_log(env["log"], "agent started")
    with open(env["pidfile"], "w") as fh:
        fh.write("1\n")  # someone else's now
    os.kill(pid, signal.SIGTERM)
    wait_for(lambda: not pid_alive(pid), what="daemon exit")
    assert open(env["pidfile"]).read() == "1\n"
    os.unlink(env["pidfile"])


def test_daemon_start_failure_reported_to_launcher(daemon_env, tmp_path):
    env = daemon_env
    # Unwritable pidfile directory: the launcher must say so and exit 1.
    r = run_cli("--config", env["cfg"], "--pidfile", str(tmp_path / "missing" / "x.pid"),
                "--log-file", env["log"])
    assert r.returncode == 1
    assert "cannot write pidfile" in r.stderr
