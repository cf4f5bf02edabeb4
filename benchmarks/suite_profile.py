"""py-spy profiles of the throughput path (``benchmarks/run.py --profile DIR``).

While one iperf3 run goes through our tunnel, ``py-spy record --format raw`` samples the
agent, the relay and the ``forward`` console at 100 Hz (``--nonblocking``: the process is
not paused, so the figure measured at the same time stays meaningful). The raw files
(collapsed stacks, one ``frame;frame;… count`` per line) stay in DIR for flame graphs
(``flamegraph.pl`` or speedscope); here we summarise where the *active* samples go (py-spy
drops samples of a thread waiting in the kernel, so idle time is not counted): the
share of samples whose innermost Python frame is each function ("self") and the share
that pass through each function anywhere on the stack ("total").
"""

from __future__ import annotations

import os
import re
import subprocess
from typing import Any, Dict, List, Tuple

RATE = 100
TOP = 12


def start(pids: Dict[str, int], directory: str, label: str, seconds: int
          ) -> List[Tuple[str, str, subprocess.Popen]]:
    recs = []
    for name, pid in pids.items():
        path = os.path.join(directory, "%s-%s.txt" % (name, label))
        proc = subprocess.Popen(["py-spy", "record", "-p", str(pid), "-d", str(seconds),
                                 "-r", str(RATE), "-f", "raw", "--nonblocking", "-o", path],
                                stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
                                stderr=subprocess.PIPE)
        recs.append((name, path, proc))
    return recs


_FRAME = re.compile(r"^(?P<func>.*?) \((?P<file>[^()]*?)(?::(?P<line>\d+))?\)$")


def _short(frame: str) -> str:
    """``func (path/to/remote_gevent/wire/mux.py:123)`` → ``mux.py:func``."""
    m = _FRAME.match(frame.strip())
    if not m:
        return frame.strip()
    return "%s:%s" % (os.path.basename(m.group("file")), m.group("func"))


def summarise(path: str, seconds: int) -> Dict[str, Any]:
    self_counts: Dict[str, int] = {}
    total_counts: Dict[str, int] = {}
    samples = 0
    try:
        with open(path) as f:
            for line in f:
                stack, _, count = line.rstrip("\n").rpartition(" ")
                if not stack or not count.isdigit():
                    continue
                n = int(count)
                samples += n
                frames = [_short(fr) for fr in stack.split(";") if fr]
                frames = [fr for fr in frames if not fr.startswith("process ")
                          and not fr.startswith("thread ")]
                if not frames:
                    continue
                self_counts[frames[-1]] = self_counts.get(frames[-1], 0) + n
                for fr in set(frames):
                    total_counts[fr] = total_counts.get(fr, 0) + n
    except OSError:
        return {"samples": 0, "error": "no profile written"}

    def top(counts: Dict[str, int]) -> List[Tuple[str, float]]:
        ranked = sorted(counts.items(), key=lambda kv: -kv[1])[:TOP]
        return [(k, round(100.0 * v / max(samples, 1), 1)) for k, v in ranked]

    return {"samples": samples, "busy_pct": round(100.0 * samples / (seconds * RATE), 1),
            "self_pct": top(self_counts), "total_pct": top(total_counts), "raw": path}


def finish(recs: List[Tuple[str, str, subprocess.Popen]]) -> Dict[str, Any]:
    out: Dict[str, Any] = {}
    for name, path, proc in recs:
        try:
            _, err = proc.communicate(timeout=120)
        except subprocess.TimeoutExpired:
            proc.kill()
            _, err = proc.communicate()
        m = re.search(r"-d (\d+)", " ".join(proc.args))
        seconds = int(m.group(1)) if m else 1
        out[name] = summarise(path, seconds)
        if proc.returncode:
            out[name]["py_spy_error"] = (err or b"").decode("utf-8", "replace")[-300:]
    return out


def report(result: Dict[str, Any]) -> str:
    lines = []
    for direction, data in result.items():
        if "rtt_p50_ms_while_profiled" in data:
            lines.append("-- %s: 1-byte round trips, p50 %.3f ms while profiled"
                         % (direction, data["rtt_p50_ms_while_profiled"]))
        else:
            lines.append("-- %s: %.2f Gbit/s while profiled"
                         % (direction, data["gbit_s_while_profiled"]))
        for name, prof in data["processes"].items():
            lines.append("  %s: %s samples, busy %s%% of one core"
                         % (name, prof.get("samples"), prof.get("busy_pct")))
            for fn, pct in prof.get("self_pct", [])[:8]:
                lines.append("      self %5.1f%%  %s" % (pct, fn))
    return "\n".join(lines)


def profile_paths(bench: Any, directory: str) -> None:
    """py-spy of agent, relay and console during a tunnel iperf3 run each way and 1-byte
    round trips (``python -m benchmarks.run --profile DIR``)."""
    import time

    import gevent

    os.makedirs(directory, exist_ok=True)
    pids = {"agent": bench.agent_pid, "relay": bench.relay_proc.pid,
            "console": bench.forward_proc.pid}
    seconds = max(4, int(bench.opt("seconds")))
    out: Dict[str, Any] = {}
    for direction in ("up", "down"):
        rec = start(pids, directory, direction, seconds)
        gevent.sleep(0.5)
        gbit = bench.iperf(bench.ports["tunnel"], reverse=direction == "down",
                           seconds=seconds)
        out[direction] = {"gbit_s_while_profiled": gbit,
                          "processes": finish(rec)}
    # The latency path too: where a 1-byte round trip spends its time in each process.
    rec = start(pids, directory, "rtt", seconds)
    gevent.sleep(0.5)
    rtt: Dict[str, float] = {}
    deadline = time.monotonic() + seconds - 1
    while time.monotonic() < deadline:
        rtt = bench.rtt(bench.ports["echo_tunnel"])
    out["rtt"] = {"rtt_p50_ms_while_profiled": rtt.get("p50", float("nan")),
                  "processes": finish(rec)}
    bench.results["profile"] = out
    bench.say(report(out))
