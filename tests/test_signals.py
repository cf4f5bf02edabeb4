"""Signals on a real foreground agent: SIGTERM/SIGINT, forced stop, SIGHUP, SIGUSR1."""

import os
import signal
import subprocess
import sys
import time

import pytest

from agent_helpers import (CLI, WAIT, kill_quietly, read, run_cli, wait_for, wait_log,
                           write_config)

from remote_gevent.crypto import identity

# An agent with one extra service, to exercise the graceful and the forced stop.
SCRIPT = r"""
from gevent import monkey; monkey.patch_all()
import sys, gevent
from remote_gevent.agent import config
from remote_gevent.common import logs
from remote_gevent.agent.runtime import Agent

mode, path, log_file = sys.argv[1:4]

class TestAgent(Agent):
    def _start_services(self):
        super()._start_services()
        if mode == "stubborn":
            # Ignores stop_event: only the forced exit (or the kill) ends it.
            self.supervisor.add("stubborn", lambda: gevent.sleep(3600))
        elif mode == "slow":
            def slow():
                self.stop_event.wait()
                gevent.sleep(0.5)   # in-flight work finishing
                self.log_done()
            self.supervisor.add("slow", slow)

    def log_done(self):
        import logging
        logging.getLogger("test").info("slow service finished its work")

logs.setup("DEBUG", log_file)
sys.exit(TestAgent(config.load(path)).run())
"""


def start_agent(tmp_path, *extra, script_mode=None):
    cfg = write_config(tmp_path)
    log = str(tmp_path / "agent.log")
    if script_mode:
        cmd = [sys.executable, "-c", SCRIPT, script_mode, cfg, log]
    else:
        cmd = CLI + ["--config", cfg, "--foreground", "--log-file", log] + list(extra)
    proc = subprocess.Popen(cmd, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)
    try:
        wait_log(log, "agent started")
    except AssertionError:
        kill_quietly(proc.pid)
        raise
    return proc, cfg, log


@pytest.fixture
def procs():
    started = []
    yield started
    for p in started:
        kill_quietly(p.pid)
        p.wait(timeout=WAIT)


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT])
def test_graceful_stop_exits_zero(tmp_path, procs, sig):
    proc, _, log = start_agent(tmp_path)
    procs.append(proc)
    t0 = time.monotonic()
    proc.send_signal(sig)
    assert proc.wait(timeout=WAIT) == 0
    assert time.monotonic() - t0 < 10
    assert "agent stopped (exit 0)" in read(log)
    assert "Traceback" not in proc.stderr.read()


def test_graceful_stop_lets_services_finish(tmp_path, procs):
    proc, _, log = start_agent(tmp_path, script_mode="slow")
    procs.append(proc)
    t0 = time.monotonic()
    proc.send_signal(signal.SIGTERM)
    assert proc.wait(timeout=WAIT) == 0
    elapsed = time.monotonic() - t0
    assert 0.4 < elapsed < 10
    assert "slow service finished its work" in read(log)
    assert "killing" not in read(log)


def test_second_signal_forces_exit(tmp_path, procs):
    proc, _, log = start_agent(tmp_path, script_mode="stubborn")
    procs.append(proc)
    proc.send_signal(signal.SIGTERM)
    wait_log(log, "stopping (grace")
    time.sleep(0.5)
    assert proc.poll() is None  # waiting for the stubborn service (grace is 10 s)
    t0 = time.monotonic()
    proc.send_signal(signal.SIGTERM)
    code = proc.wait(timeout=WAIT)
    assert time.monotonic() - t0 < 5
    assert code == 2
    assert "forced exit" in read(log)


def test_sighup_reload_valid_and_invalid(tmp_path, procs):
    proc, cfg, log = start_agent(tmp_path)
    procs.append(proc)
    text = open(cfg).read()
    # Live keys applied; restart-only keys reported (by name only).
    new = (text.replace("max_session: 10", "max_session: 20")
               .replace("idle_timeout: 1800", "idle_timeout: 60")
               .replace("ident: dev1", "ident: dev2")
               .replace("token: test-token", "token: other-secret"))
    with open(cfg, "w") as fh:
        fh.write(new)
    proc.send_signal(signal.SIGHUP)
    wait_log(log, "reload: applied")
    out = read(log)
    assert "reload: applied remote.idle_timeout, remote.max_session" in out
    assert "ident changed; needs a restart" in out
    assert "token changed; needs a restart" in out
    assert "other-secret" not in out and "test-token" not in out
    # Lowering max_session applies live too (running sessions are not cut; new ones wait
    # for the lower cap: tests/test_tunnels.py::test_shrinking_max_session_...).
    applied = read(log).count("reload: applied remote.max_session")
    with open(cfg, "w") as fh:
        fh.write(new.replace("max_session: 20", "max_session: 5"))
    proc.send_signal(signal.SIGHUP)
    wait_for(lambda: read(log).count("reload: applied remote.max_session") > applied)
    assert "needs a restart; keeping" not in read(log)
    # An invalid file is refused and the agent keeps running.
    with open(cfg, "w") as fh:
        fh.write(text.replace("max_session: 10", "max_session: many"))
    proc.send_signal(signal.SIGHUP)
    wait_log(log, "reload refused, keeping the running config")
    assert "remote.max_session" in read(log).split("reload refused")[1]
    time.sleep(0.2)
    assert proc.poll() is None
    proc.send_signal(signal.SIGTERM)
    assert proc.wait(timeout=WAIT) == 0


def test_rotate_key_via_pidfile(tmp_path, procs):
    pidfile = str(tmp_path / "fg.pid")
    proc, cfg, log = start_agent(tmp_path, "--pidfile", pidfile)
    procs.append(proc)
    key_path = str(tmp_path / "id_ed25519")
    before = identity.load(key_path).fingerprint
    assert open(pidfile).read().strip() == str(proc.pid)
    r = run_cli("--pidfile", pidfile, "rotate-key")
    assert r.returncode == 0, r.stderr
    wait_log(log, "identity key rotated")
    after = identity.load(key_path).fingerprint
    assert after != before
    assert "%s -> %s" % (before, after) in read(log)
    proc.send_signal(signal.SIGTERM)
    assert proc.wait(timeout=WAIT) == 0
    wait_for(lambda: not os.path.exists(pidfile), what="pidfile removed")
