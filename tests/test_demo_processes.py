"""``scripts/demo`` leaves no process behind, however its supervisor ends (issue 15 item 3).

Real runs of ``scripts/demo`` (a private RabbitMQ node, relay, agent) in a temporary
DIR: the supervisor killed by SIGKILL (the watchdog ends the rest), supervisor *and*
watchdog killed (the next start, or ``--stop``, ends what the pids file lists), and an
attached demo whose terminal closed (SIGHUP). Every process of the old run is checked
by pid; a unit test shows a recycled pid (another start time) is never touched.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from typing import Dict

import pytest

from remote_gevent.demo import processes
from test_e2e import wait_for

SCRIPT = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))),
                      "scripts", "demo")
ENV = dict(os.environ, PYTHON=sys.executable)
CHILDREN = ("watchdog", "rabbit", "epmd", "relay", "agent")


def alive(pid: int) -> bool:
    try:
        with open("/proc/%d/stat" % pid) as f:
            return f.read().rsplit(")", 1)[-1].split()[0] != "Z"
    except (OSError, IndexError):
        return False


def demo(directory: str, *args: str, timeout: float = 150) -> subprocess.CompletedProcess:
    return subprocess.run([SCRIPT, "--dir", directory] + list(args), capture_output=True,
                          text=True, timeout=timeout, env=ENV, stdin=subprocess.DEVNULL)


def read_pids(directory: str) -> Dict[str, int]:
    return {name: pid for name, pid, _ in
            processes.read_entries(os.path.join(directory, "pids"))}


def gone(pids: Dict[str, int], timeout: float = 30.0) -> None:
    wait_for(lambda: not any(alive(p) for p in pids.values()), timeout,
             what="every process of %s to end" % sorted(n for n, p in pids.items() if alive(p)))


# --------------------------------------------------------------------------- unit


def test_recycled_pid_is_not_ours():
    child = subprocess.Popen(["sleep", "30"], start_new_session=True)
    try:
        started = processes.start_time(child.pid)
        assert started and processes.still_ours(child.pid, started)
        assert not processes.still_ours(child.pid, started + 1)  # another process now
        processes.end_process(child.pid, started + 1, grace=0.5)
        assert child.poll() is None  # untouched
        processes.end_process(child.pid, started, grace=2.0)
        assert child.wait(5) == -signal.SIGTERM
    finally:
        if child.poll() is None:
            child.kill()
            child.wait()


def test_stop_ends_what_a_killed_run_recorded(tmp_path):
    """``--stop`` with a dead supervisor: every recorded process (own process groups,
    like the broker's) is ended; a pid whose start time differs is left alone."""
    kids = [subprocess.Popen(["sleep", "60"], start_new_session=True) for _ in range(3)]
    try:
        dead = subprocess.Popen(["true"])
        dead.wait()
        lines = ["platform %d %d" % (dead.pid, 1)]
        lines += ["%s %d %d" % (name, k.pid, processes.start_time(k.pid))
                  for name, k in zip(("rabbit", "epmd"), kids)]
        lines.append("agent %d %d" % (kids[2].pid, processes.start_time(kids[2].pid) + 7))
        (tmp_path / "pids").write_text("\n".join(lines) + "\n")
        assert processes.stop_detached(str(tmp_path), timeout=1) == 0
        assert kids[0].wait(10) == -signal.SIGTERM and kids[1].wait(10) == -signal.SIGTERM
        assert kids[2].poll() is None  # recorded start time differs: not ours
        assert not (tmp_path / "pids").exists()
    finally:
        for k in kids:
            if k.poll() is None:
                k.kill()
                k.wait()


# --------------------------------------------------------------------------- real runs


@pytest.mark.e2e
@pytest.mark.slow
def test_sigkill_of_the_supervisor_leaves_nothing(tmp_path):
    directory = str(tmp_path / "demo")
    up = demo(directory, "--detach")
    pids = read_pids(directory)
    try:
        assert up.returncode == 0, up.stderr + up.stdout
        assert set(pids) == {"platform"} | set(CHILDREN), pids
        os.kill(pids["platform"], signal.SIGKILL)
        gone(pids)  # the watchdog ended broker, epmd, relay and agent, then itself
        assert "ended" in (tmp_path / "demo" / "watchdog.log").read_text()
    finally:
        down = demo(directory, "--stop", timeout=120)
    assert down.returncode == 0, down.stderr + down.stdout
    gone(pids, 5)


@pytest.mark.e2e
@pytest.mark.slow
def test_next_start_and_stop_end_a_dead_runs_processes(tmp_path):
    """Supervisor and watchdog both SIGKILLed: agent and relay follow (PDEATHSIG), the
    broker and its epmd would stay; the next start ends them by their recorded pids.

    Also the plain life of a detached demo, on the second (healthy) run: ``--detach``
    returns ready (pids written and alive, the files made, the lines to try printed), a
    further ``--detach`` on the running DIR is refused, and ``--stop`` leaves no process
    behind and removes the pids file (one demo run fewer than a test of its own)."""
    directory = str(tmp_path / "demo")
    up = demo(directory, "--detach")
    old = read_pids(directory)
    new: Dict[str, int] = {}
    try:
        assert up.returncode == 0, up.stderr + up.stdout
        for name in ("platform", "watchdog"):
            os.kill(old[name], signal.SIGKILL)
        time.sleep(2.0)
        assert alive(old["rabbit"]) and alive(old["epmd"])  # what used to leak
        again = demo(directory, "--detach")
        assert again.returncode == 0, again.stderr + again.stdout
        assert "rabbit (pid %d) still running: ending it" % old["rabbit"] in again.stdout
        gone(old, 10)
        new = read_pids(directory)
        assert set(new) == {"platform"} | set(CHILDREN), new
        assert new["platform"] != old["platform"] and all(alive(p) for p in new.values())
        assert "ProxyCommand=" in again.stdout and " forward demo -L " in again.stdout
        for name in ("agent.yaml", "console.yaml", "operator_ed25519", "pki/ca.pem",
                     "agent/authorized_keys"):
            assert os.path.exists(os.path.join(directory, name)), name
        third = demo(directory, "--detach", timeout=30)
        assert third.returncode == 1 and "already runs" in third.stderr, third.stderr
    finally:
        down = demo(directory, "--stop", timeout=120)
    assert down.returncode == 0, down.stderr + down.stdout
    gone(dict(old, **{"new-" + n: p for n, p in new.items()}), 10)
    assert not os.path.exists(os.path.join(directory, "pids"))


@pytest.mark.e2e
@pytest.mark.slow
def test_sighup_of_an_attached_demo_tears_it_down(tmp_path):
    """The terminal of an attached demo closes: SIGHUP to the supervisor, whose output
    goes nowhere any more; it still tears everything down in order."""
    directory = str(tmp_path / "demo")
    proc = subprocess.Popen([SCRIPT, "--dir", directory], stdin=subprocess.DEVNULL,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, env=ENV,
                            start_new_session=True)
    pids: Dict[str, int] = {}
    try:
        wait_for(lambda: proc.poll() is not None or "platform" in read_pids(directory), 150,
                 what="the attached demo to be up")
        assert proc.poll() is None
        pids = read_pids(directory)
        proc.stdout.close()  # the terminal is gone: writes now fail (EPIPE)
        os.kill(proc.pid, signal.SIGHUP)
        assert proc.wait(90) == 0
        gone(pids, 10)
        assert not os.path.exists(os.path.join(directory, "pids"))
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
        demo(directory, "--stop", timeout=120)
