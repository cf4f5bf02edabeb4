"""Smoke of ``benchmarks/bench_transfer.py`` (issue 5): 8 MiB, one run of each command.

Asserts only that the one command completes, that every row of its JSON has a positive
figure and a passed sha256 check, and that nothing it started is left running — never
anything about speed (a busy CI machine must not fail this).
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import time

import pytest

from remote_gevent.demo import rabbit as demo_rabbit
from test_benchmarks_smoke import _children_named

pytestmark = pytest.mark.e2e

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SCRIPT = os.path.join(ROOT, "benchmarks", "bench_transfer.py")
ROWS = {"push", "pull", "scp_up", "scp_down", "sftp_put", "sftp_get"}


@pytest.mark.skipif(not (demo_rabbit.available() and os.access("/usr/sbin/sshd", os.X_OK)
                         and shutil.which("scp") and shutil.which("sftp")),
                    reason="needs RabbitMQ, /usr/sbin/sshd, scp and sftp")
def test_bench_transfer_completes_with_verified_rows(tmp_path):
    out = str(tmp_path / "bench_transfer.json")
    done = subprocess.run([sys.executable, SCRIPT, "--size-mib", "8", "--repeat", "1",
                           "--json", out],
                          cwd=ROOT, capture_output=True, timeout=600, stdin=subprocess.DEVNULL,
                          env=dict(os.environ, TMPDIR=str(tmp_path)))
    text = (done.stdout + done.stderr).decode("utf-8", "replace")
    assert done.returncode == 0, text[-4000:]
    with open(out) as f:
        results = json.load(f)
    rows = results["rows"]
    assert set(rows) == ROWS
    for key, row in rows.items():
        assert row["mib_s"] > 0 and row["median_seconds"] > 0, (key, row)
        assert row["sha256_ok"] is True and row["verified_copies"] == 1, (key, row)
    assert results["sha256_all_ok"] is True
    assert results["machine"]["cores"] >= 1 and results["machine"]["openssh"]
    # torn down: nothing started from the run's temporary directory is still alive
    # a process SIGKILLed by the benchmark's last clean-up may take a moment to go: a
    # leak is one still there after a generous bound
    deadline = time.monotonic() + 30
    while _children_named([str(tmp_path)]) and time.monotonic() < deadline:
        time.sleep(0.2)
    assert not _children_named([str(tmp_path)]), "stray processes after the benchmark"
