"""The ``remote-gevent`` command line, run as a real subprocess."""

import json
import os
import re
import shutil
import signal
import subprocess
import sys

import pytest

from agent_helpers import WAIT, kill_quietly, read, run_cli, wait_log, write_config

import remote_gevent

BAD = """\
ident: "no spaces allowed"
amqp:
  heartbeat: often
remote:
  enabled: true
  server_id: xx99
  max_session: 0
  colour: blue
"""


def test_version():
    r = run_cli("--version")
    assert r.returncode == 0
    assert remote_gevent.__version__ in r.stdout


def test_check_config_ok(tmp_path):
    path = write_config(tmp_path)
    r = run_cli("check-config", "--config", path)
    assert r.returncode == 0, r.stderr
    lines = r.stdout.strip().splitlines()
    assert len(lines) == 1
    assert "OK" in lines[0] and "topic=remote.fr04.dev1" in lines[0]
    assert "test-token" not in r.stdout + r.stderr
    # --config before the subcommand, and the environment variable, work too.
    assert run_cli("--config", path, "check-config").returncode == 0
    env = dict(os.environ, REMOTE_GEVENT_CONFIG=path)
    r = run_cli("check-config", env=env)
    assert r.returncode == 0 and path in r.stdout


def test_check_config_lists_every_problem(tmp_path):
    path = tmp_path / "bad.yaml"
    path.write_text(BAD)
    r = run_cli("check-config", "--config", path)
    assert r.returncode == 1
    assert "Traceback" not in r.stderr
    for key, value in [("ident", "'no spaces allowed'"), ("amqp.heartbeat", "'often'"),
                       ("remote.server_id", "'xx99'"), ("remote.max_session", "0"),
                       ("remote.colour", "'blue'"), ("token", "required")]:
        line = [x for x in r.stderr.splitlines() if ": %s:" % key in x]
        assert line and value in line[0] and str(path) in line[0], (key, r.stderr)
    assert "6 problems" in r.stderr
    assert "fr04" in r.stderr


def test_missing_config_is_an_error_not_a_traceback(tmp_path):
    r = run_cli("--config", tmp_path / "absent.yaml", "--foreground")
    assert r.returncode == 1
    assert "cannot read config file" in r.stderr and "Traceback" not in r.stderr


def test_disabled_exits_zero_without_network(tmp_path):
    path = write_config(tmp_path, enabled="false")
    r = run_cli("--config", path, "--foreground")
    assert r.returncode == 0
    assert "remote plugin disabled in %s" % path in r.stderr
    assert not (tmp_path / "id_ed25519").exists()  # nothing started
    # Daemon mode too: no fork, no pidfile.
    pidfile = tmp_path / "agent.pid"
    log = tmp_path / "agent.log"
    r = run_cli("--config", path, "--pidfile", pidfile, "--log-file", log)
    assert r.returncode == 0
    assert not pidfile.exists()
    assert "remote plugin disabled" in read(str(log))


@pytest.mark.skipif(shutil.which("ssh-keygen") is None, reason="ssh-keygen not installed")
def test_pubkey_generates_key_and_matches_ssh_keygen(tmp_path):
    path = write_config(tmp_path)
    key = tmp_path / "id_ed25519"
    r = run_cli("pubkey", "--config", path)
    assert r.returncode == 0, r.stderr
    assert oct(key.stat().st_mode & 0o777) == "0o600"
    line = r.stdout.strip()
    assert re.match(r"^ssh-ed25519 AAAA\S+ dev1@\S+$", line), line
    assert line.endswith("dev1@" + os.uname()[1])
    ref = subprocess.run(["ssh-keygen", "-y", "-f", str(key)], capture_output=True,
                         text=True, timeout=30, check=True).stdout.split()
    assert line.split()[:2] == ref[:2]
    r = run_cli("pubkey", "--fingerprint", "--config", path)
    ref = subprocess.run(["ssh-keygen", "-lf", str(key)], capture_output=True, text=True,
                         timeout=30, check=True).stdout.split()[1]
    assert r.stdout.strip() == ref
    # Same key on the next call (loaded, not regenerated).
    assert run_cli("pubkey", "--config", path).stdout.strip() == line


def test_too_open_key_refused_cleanly(tmp_path):
    path = write_config(tmp_path)
    assert run_cli("pubkey", "--config", path).returncode == 0
    os.chmod(str(tmp_path / "id_ed25519"), 0o644)
    for args in (["pubkey", "--config", path], ["--config", path, "--foreground"]):
        r = run_cli(*args)
        assert r.returncode == 1
        assert "too open" in r.stderr and "Traceback" not in r.stderr


def test_rotate_key_without_agent_fails(tmp_path):
    r = run_cli("--pidfile", tmp_path / "none.pid", "rotate-key")
    assert r.returncode == 1
    assert "no running agent" in r.stderr


def test_bad_log_level_is_usage_error():
    r = run_cli("--log-level", "chatty", "check-config")
    assert r.returncode == 2 and "chatty" in r.stderr


# Argument lists the agent's own parser must read exactly as click does (or leave to click).
ARGVS = [
    [], ["--foreground"], ["--config", "a.yaml"], ["--config=a.yaml", "--foreground"],
    ["--log-level", "debug"], ["--log-level=Warning", "--pidfile", "p", "--log-file", "l"],
    ["--config", "a", "--config", "b"], ["--foreground", "--foreground"],
    ["--config", "-x"], ["--config"], ["--config", ""], ["--config=", "--foreground"],
    ["--log-level", "chatty"], ["--help"], ["-h"], ["--version"], ["check-config"],
    ["--config", "a", "pubkey"], ["--foreground=1"], ["--conf", "a"], ["--", "x"],
    ["--pidfile", "p", "rotate-key"], ["x"],
]


@pytest.mark.parametrize("argv", ARGVS, ids=lambda a: " ".join(a) or "(none)")
def test_agent_args_agree_with_click(argv, monkeypatch):
    """The click-free fast path for starting the agent never reads a command line
    differently from click: it either returns click's parameters or defers to click."""
    import click

    from remote_gevent.agent import cli

    monkeypatch.delenv("REMOTE_GEVENT_CONFIG", raising=False)
    mine = cli.agent_args(argv)
    if mine is None:
        return
    ctx = cli.command().make_context("remote-gevent", list(argv))
    assert isinstance(ctx.command, click.Group) and not ctx.args
    assert mine == ctx.params


def test_agent_args_leave_shell_completion_to_click(monkeypatch):
    from remote_gevent.agent import cli

    monkeypatch.setenv("_REMOTE_GEVENT_COMPLETE", "bash_source")
    assert cli.agent_args([]) is None


# Runs the real entry point and lists, at exit, every module the agent process imported.
MODULES_SCRIPT = r"""
import atexit, json, sys
out = sys.argv[1]
atexit.register(lambda: json.dump(sorted(sys.modules), open(out, "w")))
from remote_gevent.agent.cli import main
main(sys.argv[2:])
"""


def test_running_agent_imports_neither_click_nor_session_only_modules(tmp_path):
    """Memory: click (command line only), paramiko/sftp and the transfer service (loaded
    by the first @transfer/@sftp stream) stay out of the long-running agent."""
    path = write_config(tmp_path)
    log = tmp_path / "agent.log"
    out = tmp_path / "modules.json"
    proc = subprocess.Popen(
        [sys.executable, "-c", MODULES_SCRIPT, str(out), "--config", path, "--foreground",
         "--log-file", str(log)],
        stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        wait_log(str(log), "agent started")
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=WAIT) == 0, proc.stderr.read()
    finally:
        kill_quietly(proc.pid)
    modules = set(json.loads(out.read_text()))
    assert "remote_gevent.agent.runtime" in modules and "remote_gevent.agent.tunnels" in modules
    # nor the relay server or its splicer: the agent only dials (wire.rendezvous)
    assert "remote_gevent.wire.rendezvous" in modules
    for name in ("click", "paramiko", "remote_gevent.agent.files.sftp",
                 "remote_gevent.agent.files.transfer", "remote_gevent.relay.server",
                 "remote_gevent.relay.splicer", "remote_gevent.relay.pending"):
        assert name not in modules, name
