"""Smoke of the benchmark suite: ``python -m benchmarks.run --quick`` with tiny sizes.

Asserts only that the one command completes, writes a JSON file with every section and
numeric figures, and leaves no process behind — never anything about speed (benchmarks
are not timed tests; a busy CI machine must not fail this).
"""

from __future__ import annotations

import json
import math
import os
import shutil
import subprocess
import sys
from typing import Any, Dict, Iterator, List, Tuple

import pytest

pytestmark = [pytest.mark.e2e, pytest.mark.slow]

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TINY = ["--quick", "--seconds", "1", "--runs", "1", "--streams", "1,8,64",
        "--setup-runs", "3", "--rtt-rounds", "100", "--sessions", "12",
        "--relay-pairs", "20", "--cp-requests", "8"]


def _numbers(value: Any) -> Iterator[float]:
    if isinstance(value, bool):
        return
    if isinstance(value, (int, float)):
        yield float(value)
    elif isinstance(value, dict):
        for v in value.values():
            yield from _numbers(v)
    elif isinstance(value, list):
        for v in value:
            yield from _numbers(v)


def _children_named(words: List[str]) -> List[str]:
    """Command lines of live processes whose argv mentions our temporary directory."""
    out = []
    for pid in os.listdir("/proc"):
        if not pid.isdigit():
            continue
        try:
            with open("/proc/%s/cmdline" % pid, "rb") as f:
                cmd = f.read().replace(b"\0", b" ").decode("utf-8", "replace")
        except OSError:
            continue
        if any(w in cmd for w in words):
            out.append(cmd)
    return out


@pytest.mark.skipif(not (shutil.which("iperf3") and os.access("/usr/sbin/sshd", os.X_OK)
                         and shutil.which("ssh")),
                    reason="needs iperf3, /usr/sbin/sshd and ssh")
def test_quick_suite_completes_with_every_section(tmp_path):
    out = str(tmp_path / "bench.json")
    done = subprocess.run([sys.executable, "-m", "benchmarks.run", "--out", out] + TINY,
                          cwd=ROOT, capture_output=True, timeout=600,
                          env=dict(os.environ, TMPDIR=str(tmp_path)))
    text = (done.stdout + done.stderr).decode("utf-8", "replace")
    assert done.returncode == 0, text[-4000:]
    with open(out) as f:
        results = json.load(f)
    for section in ("machine", "throughput", "many_streams", "session_setup_ms", "latency_ms",
                    "memory", "control_plane"):
        assert section in results, (section, sorted(results))
    for section in ("throughput", "many_streams", "session_setup_ms", "latency_ms", "memory",
                    "control_plane"):
        values = list(_numbers(results[section]))
        assert values, section
        assert all(not math.isnan(v) for v in values), (section, results[section])
    openssh = {k + v for k in ("ssh_L", "ssh_reverse") for v in ("", "_aes128gcm", "_fastest")}
    for direction in ("up", "down"):
        tp = results["throughput"][direction]
        assert set(tp["gbit_s"]) == {"direct", "tunnel"} | openssh
        # CPU s/GiB of the agent next to sshd's, of the console next to ssh's (issue 17)
        assert {"agent", "console", "relay"} <= set(tp["cpu_s_per_gib"]["tunnel"])
        assert {"sshd", "ssh"} <= set(tp["cpu_s_per_gib"]["ssh_L_fastest"])
    assert results["machine"]["ssh_fastest_cipher"] in results["cipher_probe_gbit_s"]
    assert set(results["many_streams"]["tunnel_gbit_s"]) == {"1", "8", "64"}
    latency = results["latency_ms"]
    assert {"tunnel", "stdio", "stdio_via_master", "ssh_reverse_fastest",
            "floor_chain_gevent", "floor_chain_thread"} <= set(latency)
    # CPU per round trip of every process on our path, OpenSSH's and the floor chains
    assert {"agent", "console", "relay", "machine"} <= set(latency["tunnel"]["cpu_us_per_rt"])
    assert {"device_ssh_R", "bastion_sshd", "operator_ssh"} <= set(
        latency["ssh_reverse_fastest"]["cpu_us_per_rt"])
    assert {"agent_like", "relay_like", "console_like"} <= set(
        latency["floor_chain_gevent"]["cpu_us_per_rt"])
    assert {"warm", "cold"} <= set(results["session_setup_ms"])
    assert {"agent_idle_mib", "sessions_10", "sessions_many", "relay"} <= set(results["memory"])
    assert {"refuse", "accept_close"} <= set(results["control_plane"])
    # section 7: the bare forwarder's floor, every mode, in the same run (issue 17)
    assert set(results["cpu_floor_s_per_gib"]) == {
        "copy", "seal-libsodium", "seal-openssl", "open-libsodium", "open-openssl"}
    assert "| 7 CPU floor |" in text and "a bare forwarder pays" in text
    assert results["machine"]["cores"] >= 1 and results["machine"]["python"]
    assert "| target (issues 6, 17) |" in text
    # everything torn down: nothing that ran from the suite's temporary directory is left
    assert not _children_named([str(tmp_path)]), "stray processes after the suite"


def _script_lines(script: str, *args: str) -> Tuple[str, Dict[str, str]]:
    """Run ``benchmarks/<script>``; its whole output, and its figure lines (after the
    heading line) by their first word. Fails the test if the script fails."""
    done = subprocess.run([sys.executable, os.path.join(ROOT, "benchmarks", script)]
                          + list(args), cwd=ROOT, capture_output=True, timeout=120,
                          stdin=subprocess.DEVNULL)
    text = (done.stdout + done.stderr).decode("utf-8", "replace")
    assert done.returncode == 0, text[-4000:]
    return text, {line.split()[0]: line for line in done.stdout.decode().splitlines()[1:]}


@pytest.mark.skipif(not hasattr(os, "splice"), reason="the splice hops need Python 3.10+")
def test_bench_hop_prints_every_hop_kind():
    """``benchmarks/bench_hop.py`` with a handful of round trips: one line per proxy kind,
    each with its figures, and no proxy child left running."""
    text, lines = _script_lines("bench_hop.py", "--rounds", "50", "--runs", "1")
    assert set(lines) == {"direct", "greenlet-splice", "thread-splice", "greenlet-copy",
                          "thread-copy"}, text
    for kind, line in lines.items():
        assert "p50" in line and "added" in line, line
        if kind != "direct":
            assert "proxy CPU" in line, line
    assert not _children_named(["bench_hop.py --proxy"])


@pytest.mark.skipif(not hasattr(os, "splice"), reason="the relay hop needs Python 3.10+")
def test_bench_rtt_floor_prints_both_chains():
    """``benchmarks/bench_rtt_floor.py`` with a handful of round trips: direct and both
    chains (gevent and thread hops), each chain with the CPU of its three hops, and every
    hop process gone afterwards."""
    text, lines = _script_lines("bench_rtt_floor.py", "--rounds", "50", "--runs", "1")
    assert set(lines) == {"direct", "chain-gevent", "chain-thread"}, text
    for name, line in lines.items():
        assert "p50" in line and "added" in line, line
        if name != "direct":
            for role in ("agent_like", "relay_like", "console_like"):
                assert role in line, line
    assert not _children_named(["bench_rtt_floor.py --hop"])


def test_bench_floor_prints_every_mode():
    """``benchmarks/bench_floor.py`` with a few MiB: one line per mode with its CPU figure
    (never a speed), and no forwarder or source child left running."""
    text, lines = _script_lines("bench_floor.py", "--mib", "8", "--runs", "1")
    assert set(lines) == {"copy", "seal-libsodium", "seal-openssl", "open-libsodium",
                          "open-openssl"}, text
    for line in lines.values():
        assert math.isfinite(float(line.split()[1])), line
    assert not _children_named(["bench_floor.py --role"])
