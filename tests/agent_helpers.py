"""Helpers for tests that run the real agent CLI in subprocesses (loopback only)."""

import os
import shutil
import stat
import subprocess
import sys
import textwrap
import time

# The agent must not reach any network in these tests: port 1 on loopback refuses.
AGENT_CONFIG = """\
ident: {ident}
token: test-token
unrelated_plugin: {{anything: [1, 2, 3]}}
amqp:
  urls: ["amqp://127.0.0.1:1/"]
  connect_timeout: 1
  reconnect_max_delay: 1
remote:
  enabled: {enabled}
  key_path: {dir}/id_ed25519
  history_path: {dir}/history.csv
  authorized_keys: {dir}/authorized_keys
  relays: {{fr04: "127.0.0.1:1"}}
  max_session: {max_session}
  idle_timeout: 1800
"""

CLI = [sys.executable, "-m", "remote_gevent.agent.cli"]
WAIT = 20.0  # upper bound for any wait on a subprocess


def write_config(tmp_path, enabled="true", ident="dev1", max_session=10, name="config.yaml"):
    path = tmp_path / name
    path.write_text(AGENT_CONFIG.format(dir=tmp_path, enabled=enabled, ident=ident,
                                        max_session=max_session))
    return str(path)


def run_cli(*args, env=None, timeout=WAIT):
    return subprocess.run(CLI + [str(a) for a in args], capture_output=True, text=True,
                          timeout=timeout, env=env, stdin=subprocess.DEVNULL)


def cli_executable(tmp_path):
    """The installed ``remote-gevent`` script, or a wrapper running this interpreter."""
    found = shutil.which("remote-gevent")
    if found:
        return found
    wrapper = tmp_path / "remote-gevent"
    wrapper.write_text("#!/bin/sh\nexec %s -m remote_gevent.agent.cli \"$@\"\n" % sys.executable)
    wrapper.chmod(wrapper.stat().st_mode | stat.S_IXUSR)
    return str(wrapper)


def wait_for(predicate, timeout=WAIT, interval=0.05, what="condition"):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(interval)
    raise AssertionError("timed out after %gs waiting for %s" % (timeout, what))


def read(path):
    try:
        with open(path) as fh:
            return fh.read()
    except FileNotFoundError:
        return ""


def wait_log(path, text, timeout=WAIT, count=1):
    wait_for(lambda: read(path).count(text) >= count, timeout,
             what="%r in %s:\n%s" % (text, path, textwrap.indent(read(path)[-3000:], "  ")))


def pid_alive(pid):
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    # A zombie is not alive for our purpose.
    try:
        with open("/proc/%d/stat" % pid) as fh:
            return fh.read().rsplit(")", 1)[1].split()[0] != "Z"
    except FileNotFoundError:
        return False
    return True


def kill_quietly(pid):
    try:
        os.kill(pid, 9)
    except (ProcessLookupError, TypeError):
        pass
