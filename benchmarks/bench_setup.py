"""Warm session set-up, alone, and where its milliseconds go (issue 17).

    python benchmarks/bench_setup.py                 # 50 warm set-ups: p50/p99
    python benchmarks/bench_setup.py --trace         # + per-step timeline (console, relay, agent)
    python benchmarks/bench_setup.py --runs 200 --json out.json

The same measurement as ``python -m benchmarks.run --only warm`` (section 3a): this
process runs a console (``ConsoleControl`` started, i.e. its AMQP link is up), then
``open_session(cfg, "demo", [banner], control=…)``, ``open_stream`` and the first byte of
a banner server, ``close``; the first 3 warm caches up. It brings up only what that needs
(the demo platform: private TLS RabbitMQ node, relay, agent; the banner server), so it
takes ~15 s instead of the suite's minutes, and it can run the code of another checkout
for a before/after comparison: the package comes from ``PYTHONPATH``
(``PYTHONPATH=/work/main python benchmarks/bench_setup.py``); the helpers next to this
file are loaded from here.

``--trace``: every process (this console, the relay, the agent) records when each step of
:data:`setup_trace.POINTS` begins and ends (``benchmarks/setup_trace.py``, wall clock,
loaded through a generated ``sitecustomize``); the table gives, per step, the median start
after the request began and the median duration over the runs. Tracing costs a few µs per
step: take timings from a run without it.
"""

import os
import sys

if "--trace" in sys.argv:  # before the monkey patch, so that it wraps gevent's socket too
    sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
    import setup_trace

    setup_trace.early_install()

from gevent import monkey

monkey.patch_all()

# ruff: noqa: E402  (imports follow the monkey patch)
import argparse
import json
import shutil
import statistics
import subprocess
import tempfile
import time
from typing import Any, Dict, List, Optional, Sequence, Tuple

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)  # setup_trace, suite_targets: from this checkout, whatever PYTHONPATH

import setup_trace  # noqa: E402

import gevent


def percentile(values: Sequence[float], q: float) -> float:
    data = sorted(values)
    if not data:
        return float("nan")
    k = (len(data) - 1) * q / 100.0
    lo = int(k)
    hi = min(lo + 1, len(data) - 1)
    return data[lo] + (data[hi] - data[lo]) * (k - lo)


def cpu_ns(pid: int) -> int:
    """CPU time of every thread of ``pid`` so far, in ns (schedstat: no 10 ms ticks)."""
    total = 0
    for task in os.listdir("/proc/%d/task" % pid):
        try:
            with open("/proc/%d/task/%s/schedstat" % (pid, task)) as f:
                total += int(f.read().split()[0])
        except (OSError, ValueError, IndexError):
            pass  # a thread that just ended
    return total


def descendants(pid: int, name: str) -> List[int]:
    """Pids of the processes called ``name`` under ``pid`` (the broker's ``beam.smp``)."""
    parent: Dict[int, int] = {}
    comm: Dict[int, str] = {}
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                with open("/proc/%s/stat" % entry) as f:
                    data = f.read()
            except OSError:
                continue
            comm[int(entry)] = data[data.index("(") + 1:data.rindex(")")]
            parent[int(entry)] = int(data.rsplit(")", 1)[1].split()[1])
    out = []
    for p, c in comm.items():
        q = p
        while q in parent and q != pid and q > 1:
            q = parent[q]
        if q == pid and c == name:
            out.append(p)
    return out


def _sitecustomize(directory: str) -> None:
    with open(os.path.join(directory, "sitecustomize.py"), "w") as f:
        f.write("import sys\nsys.path.insert(0, %r)\nimport setup_trace\nsetup_trace.install()\n"
                "del sys.path[0]\n" % HERE)


def _banner() -> Tuple[subprocess.Popen, int]:
    proc = subprocess.Popen([sys.executable, os.path.join(HERE, "suite_targets.py"), "banner"],
                            stdout=subprocess.PIPE, start_new_session=True)
    assert proc.stdout is not None
    with gevent.Timeout(30, RuntimeError("banner server did not start")):
        return proc, int(proc.stdout.readline())


def measure(cfg: Any, control: Any, device: str, target: str, runs: int,
            warmup: int = 3) -> Dict[str, Any]:
    from remote_gevent.console.session import open_session

    up: List[float] = []
    first: List[float] = []
    for i in range(runs + warmup):
        setup_trace.mark("M", "setup.begin")
        t0 = time.perf_counter()
        session = open_session(cfg, device, [target], control=control)
        t1 = time.perf_counter()
        stream = session.open_stream(target)
        data = stream.recv()
        t2 = time.perf_counter()
        setup_trace.mark("M", "setup.first_byte")
        if data != b"x":
            raise RuntimeError("banner server sent %r" % data)
        session.close()
        session.wait(10)
        if i >= warmup:
            up.append((t1 - t0) * 1000.0)
            first.append((t2 - t0) * 1000.0)
    return {"runs": runs, "first_byte_p50": percentile(first, 50),
            "first_byte_p99": percentile(first, 99), "tunnel_up_p50": percentile(up, 50),
            "tunnel_up_p99": percentile(up, 99), "first_byte_ms": first, "tunnel_up_ms": up}


def serve(cfg: Any, control: Any, device: str, target: str, burst: int) -> None:
    """``--serve``: one burst of set-ups per ``go`` line on stdin (the last timed: it
    follows a set-up of its own, as in :func:`measure`), one JSON line back."""
    from gevent.socket import wait_read

    print("ready", flush=True)
    while True:
        wait_read(sys.stdin.fileno())
        line = sys.stdin.readline().strip()
        if line != "go":
            return
        r = measure(cfg, control, device, target, 1, warmup=burst - 1)
        print(json.dumps({"first": r["first_byte_ms"][0], "up": r["tunnel_up_ms"][0]}),
              flush=True)


def compare(dirs: Sequence[str], rounds: int, burst: int) -> Dict[str, Any]:
    """Two platforms, one per checkout in ``dirs``, taking turns set-up by set-up (the
    order swapped every round), so that the machine's load hits both alike."""
    children = []
    try:
        for d in dirs:
            env = dict(os.environ, PYTHONPATH=d)
            children.append(subprocess.Popen(
                [sys.executable, os.path.abspath(__file__), "--serve", "--burst", str(burst)],
                stdin=subprocess.PIPE, stdout=subprocess.PIPE, env=env, text=True))
        for child in children:
            assert child.stdout is not None
            for line in child.stdout:
                if line.strip() == "ready":
                    break
            else:
                raise RuntimeError("a --serve child ended before it was ready")
        samples: List[List[float]] = [[] for _ in dirs]
        for i in range(rounds):
            order = range(len(dirs)) if i % 2 == 0 else reversed(range(len(dirs)))
            for k in order:
                child = children[k]
                assert child.stdin is not None and child.stdout is not None
                child.stdin.write("go\n")
                child.stdin.flush()
                samples[k].append(json.loads(child.stdout.readline())["first"])
    finally:
        for child in children:
            if child.stdin is not None:
                child.stdin.close()
        for child in children:
            child.wait(60)
    diffs = [b - a for a, b in zip(samples[0], samples[1])]
    out = {"dirs": list(dirs), "rounds": rounds,
           "p50": [percentile(x, 50) for x in samples],
           "p99": [percentile(x, 99) for x in samples],
           "paired_diff_p50": percentile(diffs, 50),
           "second_faster": sum(1 for d in diffs if d < 0), "samples": samples}
    for d, x in zip(dirs, samples):
        print("%-40s first byte p50 %.2f ms p99 %.2f ms" % (d, percentile(x, 50),
                                                            percentile(x, 99)))
    print("paired difference (second - first) p50 %.2f ms; second faster in %d of %d rounds"
          % (out["paired_diff_p50"], out["second_faster"], rounds))
    return out


def _intervals(rows: List[List[Any]]) -> List[Tuple[int, str, int, int]]:
    """``(pid, label, begin_ns, end_ns)`` from B/E pairs of one greenlet."""
    open_: Dict[Tuple[int, int, str], List[int]] = {}
    out = []
    for t, pid, g, kind, label in rows:
        key = (pid, g, label)
        if kind == "B":
            open_.setdefault(key, []).append(t)
        elif kind == "E" and open_.get(key):
            out.append((pid, label, open_[key].pop(), t))
    return out


def timeline(path: str, roles: Dict[int, str], warmup: int = 3) -> List[Dict[str, Any]]:
    """Per (role, step, occurrence): median start after ``setup.begin`` and duration."""
    rows = setup_trace.read(path)
    marks = [(r[0], r[4]) for r in rows if r[3] == "M"]
    windows = []
    begin = None
    for t, label in marks:
        if label == "setup.begin":
            begin = t
        elif label == "setup.first_byte" and begin is not None:
            windows.append((begin, t))
            begin = None
    windows = windows[warmup:]
    spans = sorted(_intervals(rows), key=lambda x: x[2])
    per: Dict[Tuple[str, str, int], Dict[str, List[float]]] = {}
    for w0, w1 in windows:
        seen: Dict[Tuple[str, str], int] = {}
        for pid, label, b, e in spans:
            if b < w0 or b > w1:
                continue
            role = roles.get(pid, str(pid))
            n = seen[(role, label)] = seen.get((role, label), 0) + 1
            d = per.setdefault((role, label, n), {"start": [], "dur": []})
            d["start"].append((b - w0) / 1e6)
            d["dur"].append((e - b) / 1e6)
    total = [(w1 - w0) / 1e6 for w0, w1 in windows]
    out = [{"role": role, "step": label + ("#%d" % n if n > 1 else ""), "n": len(d["start"]),
            "start_p50": statistics.median(d["start"]), "dur_p50": statistics.median(d["dur"])}
           for (role, label, n), d in per.items() if len(d["start"]) >= len(windows) // 2]
    out.sort(key=lambda x: x["start_p50"])
    out.append({"role": "console", "step": "request → first byte", "n": len(total),
                "start_p50": 0.0, "dur_p50": statistics.median(total) if total else 0.0})
    return out


def main(argv: Optional[Sequence[str]] = None) -> int:
    p = argparse.ArgumentParser(description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--runs", type=int, default=50)
    p.add_argument("--trace", action="store_true", help="per-step timeline")
    p.add_argument("--json", help="write the figures here")
    p.add_argument("--keep", action="store_true", help="keep the temporary directory")
    p.add_argument("--compare", nargs=2, metavar="CHECKOUT",
                   help="two checkouts (PYTHONPATH of each), set-ups taken in turns")
    p.add_argument("--rounds", type=int, default=60, help="--compare: set-ups of each")
    p.add_argument("--burst", type=int, default=2,
                   help="--compare: set-ups per turn, the last one timed (default 2)")
    p.add_argument("--serve", action="store_true", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.compare:
        out = compare(args.compare, args.rounds, args.burst)
        if args.json:
            with open(args.json, "w") as f:
                json.dump(out, f, indent=1)
        return 0
    workdir = tempfile.mkdtemp(prefix="rg-setup-")
    trace_path = os.path.join(workdir, "trace.txt")
    if args.trace:
        site = os.path.join(workdir, "site")
        os.makedirs(site)
        _sitecustomize(site)
        os.environ["PYTHONPATH"] = os.pathsep.join(
            [site] + [x for x in os.environ.get("PYTHONPATH", "").split(os.pathsep) if x])
        os.environ[setup_trace.ENV] = trace_path
        setup_trace.install(trace_path)

    import remote_gevent
    from remote_gevent.console import config as cconfig
    from remote_gevent.console.control import ConsoleControl
    from remote_gevent.demo.platform import DemoPlatform

    print("code under test: %s" % os.path.dirname(remote_gevent.__file__),
          file=sys.stderr if args.serve else sys.stdout, flush=True)
    platform = DemoPlatform(os.path.join(workdir, "platform"),
                            remote={"max_session": 100, "operator_rate": 0})
    banner = None
    control = None
    try:
        platform.start()
        banner, port = _banner()
        cfg = cconfig.load(platform.console_config)
        control = ConsoleControl(cfg).start()
        gevent.sleep(1.0)  # let the agent's start-up work (alive, key, trim) settle
        if args.serve:
            serve(cfg, control, platform.ident, "127.0.0.1:%d" % port, args.burst)
            return 0
        assert platform.agent_proc is not None and platform.relay_proc is not None
        pids = {"console": os.getpid(), "agent": platform.agent_proc.pid,
                "relay": platform.relay_proc.pid}
        for beam in descendants(os.getpid(), "beam.smp"):
            pids["broker"] = beam
        print("pids: %s" % json.dumps(pids), file=sys.stderr if args.serve else sys.stdout,
              flush=True)
        before = {k: cpu_ns(v) for k, v in pids.items()}
        result = measure(cfg, control, platform.ident, "127.0.0.1:%d" % port, args.runs)
        result["cpu_ms_per_setup"] = {
            k: (cpu_ns(v) - before[k]) / 1e6 / (args.runs + 3) for k, v in pids.items()}
        result["loadavg"] = os.getloadavg()[0]
        print("warm set-up, %d runs: first byte p50 %.2f ms p99 %.2f ms; tunnel up p50 %.2f "
              "ms p99 %.2f ms (load %.2f)" % (
                  result["runs"], result["first_byte_p50"], result["first_byte_p99"],
                  result["tunnel_up_p50"], result["tunnel_up_p99"], result["loadavg"]),
              flush=True)
        print("CPU ms per set-up: %s" % ", ".join(
            "%s %.2f" % kv for kv in result["cpu_ms_per_setup"].items()), flush=True)
        if args.trace:
            assert platform.agent_proc is not None and platform.relay_proc is not None
            roles = {os.getpid(): "console", platform.agent_proc.pid: "agent",
                     platform.relay_proc.pid: "relay"}
            steps = timeline(trace_path, roles)
            result["timeline"] = steps
            print("%-8s %-42s %4s %9s %9s" % ("role", "step", "n", "start p50", "dur p50"))
            for s in steps:
                print("%-8s %-42s %4d %9.3f %9.3f" % (s["role"], s["step"], s["n"],
                                                       s["start_p50"], s["dur_p50"]))
        if args.json:
            with open(args.json, "w") as f:
                json.dump(result, f, indent=1)
    finally:
        if control is not None:
            control.close()
        platform.stop()
        if banner is not None:
            banner.terminate()
            banner.wait(10)
        if not args.keep:
            shutil.rmtree(workdir, ignore_errors=True)
        else:
            print("kept %s" % workdir)
    return 0


if __name__ == "__main__":
    sys.exit(main())
