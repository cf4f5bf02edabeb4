"""Smoke of ``benchmarks/bench_setup.py --trace`` (issue 17): a few warm set-ups.

Asserts only that the one command completes with figures and a per-step timeline from
the three processes, and that nothing it started is left running — never anything about
speed (a busy CI machine must not fail this).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time

import pytest

from remote_gevent.demo import rabbit as demo_rabbit
from test_benchmarks_smoke import _children_named

pytestmark = pytest.mark.e2e

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SCRIPT = os.path.join(ROOT, "benchmarks", "bench_setup.py")


@pytest.mark.slow
@pytest.mark.skipif(not demo_rabbit.available(), reason="needs RabbitMQ")
def test_bench_setup_trace_completes(tmp_path):
    out = str(tmp_path / "setup.json")
    done = subprocess.run([sys.executable, SCRIPT, "--runs", "4", "--trace", "--json", out],
                          cwd=ROOT, capture_output=True, timeout=300, stdin=subprocess.DEVNULL,
                          env=dict(os.environ, TMPDIR=str(tmp_path), PYTHONPATH=ROOT))
    text = (done.stdout + done.stderr).decode("utf-8", "replace")
    assert done.returncode == 0, text[-4000:]
    with open(out) as f:
        result = json.load(f)
    assert result["runs"] == 4 and result["first_byte_p50"] > 0
    assert set(result["cpu_ms_per_setup"]) == {"console", "agent", "relay", "broker"}
    steps = {(s["role"], s["step"]) for s in result["timeline"]}
    for step in (("console", "protocol.make_session_request"),
                 ("agent", "protocol.check_session_request"),
                 ("agent", "rendezvous.dial_relay"), ("relay", "server.Relay._pair"),
                 ("console", "mux.Tunnel.open_stream")):
        assert step in steps, (step, sorted(steps))
    # a process SIGKILLed by the benchmark's last clean-up may take a moment to go: a
    # leak is one still there after a generous bound
    deadline = time.monotonic() + 30
    while _children_named([str(tmp_path)]) and time.monotonic() < deadline:
        time.sleep(0.2)
    assert not _children_named([str(tmp_path)]), "stray processes after the benchmark"
