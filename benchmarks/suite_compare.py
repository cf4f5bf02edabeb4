"""OpenSSH at its fastest next to our tunnel: cipher probe, paths, CPU per GiB (issue 17).

An experienced user runs ``ssh -c aes128-gcm@openssh.com`` (or whatever is fastest on
their CPU), not OpenSSH's default chacha20-poly1305. So the suite (``benchmarks/run.py``)
sets up every OpenSSH path three ways — default cipher, ``aes128-gcm@openssh.com`` and the
cipher a short probe found fastest on this machine (1 s each way through ``ssh -L`` with
each candidate) — and measures each of them in the same interleaved runs as our tunnel.

CPU seconds per GiB come from ``/proc/<pid>/stat`` (utime + stime, all threads) of each
process on a path, read just before and after every iperf3 run: our agent, console
(``forward``) and relay; sshd (every process under the listening sshd: the privilege
separated children do the crypto) and the ``ssh`` client; on the reverse path the
device's ``ssh -R``, the bastion's sshd and the operator's ``ssh -L``.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from typing import Any, Dict, List, Sequence, Tuple

from benchmarks import bench_rtt_floor, suite_ssh
from benchmarks.suite_common import cpu_seconds, median, percentile

GIB = float(1 << 30)

#: candidates of the probe, in OpenSSH's names; only those ``ssh -Q cipher`` lists are tried
PROBE_CIPHERS = ("aes128-gcm@openssh.com", "aes256-gcm@openssh.com",
                 "chacha20-poly1305@openssh.com", "aes128-ctr")
AES128_GCM = "aes128-gcm@openssh.com"

#: path name suffix → which cipher ("" = OpenSSH's default, no ``-c``)
VARIANTS = ("", "_aes128gcm", "_fastest")

#: the roles whose CPU is read on each kind of path
TUNNEL_ROLES = ("agent", "console", "relay")
SSH_L_ROLES = ("sshd", "ssh")
REVERSE_ROLES = ("device_ssh_R", "bastion_sshd", "operator_ssh")
#: the floor chains of the latency section (benchmarks/bench_rtt_floor.py)
FLOOR_STYLES = bench_rtt_floor.STYLES


def ssh_ciphers() -> List[str]:
    done = subprocess.run(["ssh", "-Q", "cipher"], capture_output=True, timeout=10)
    return done.stdout.decode().split()


def _children() -> Dict[int, List[int]]:
    kids: Dict[int, List[int]] = {}
    for name in os.listdir("/proc"):
        if not name.isdigit():
            continue
        try:
            with open("/proc/%s/stat" % name) as f:
                ppid = int(f.read().rsplit(")", 1)[1].split()[1])
        except (OSError, ValueError, IndexError):
            continue
        kids.setdefault(ppid, []).append(int(name))
    return kids


def tree(root: int, kids: Dict[int, List[int]]) -> List[int]:
    out = [root]
    for pid in out:
        out.extend(kids.get(pid, ()))
    return out


class CpuMeter:
    """CPU seconds of named process groups, read from /proc before and after a run."""

    def __init__(self, groups: Dict[str, Tuple[int, bool]]) -> None:
        self.groups = groups  # role -> (pid, with its descendants)
        self.before: Dict[int, float] = {}

    def _read(self) -> Dict[int, float]:
        kids = _children() if any(t for _, t in self.groups.values()) else {}
        now: Dict[int, float] = {}
        for pid, with_tree in self.groups.values():
            for p in (tree(pid, kids) if with_tree else [pid]):
                try:
                    now[p] = cpu_seconds(p)
                except (OSError, IndexError, ValueError):
                    pass
        return now

    def start(self) -> None:
        self.before = self._read()

    def stop(self) -> Dict[str, float]:
        after = self._read()
        kids = _children()
        out: Dict[str, float] = {}
        for role, (pid, with_tree) in self.groups.items():
            pids = tree(pid, kids) if with_tree else [pid]
            out[role] = sum(after.get(p, 0.0) - self.before.get(p, 0.0) for p in pids
                            if p in after)
        return out


def probe_fastest(bench: Any, target_port: int) -> Tuple[str, Dict[str, float]]:
    """The OpenSSH cipher with the highest ``ssh -L`` rate here (1 s up + 1 s down each)."""
    available = set(ssh_ciphers())
    rates: Dict[str, float] = {}
    for cipher in PROBE_CIPHERS:
        if cipher not in available:
            continue
        port, proc = suite_ssh.local_forward_proc(bench.procs, bench.sshd, target_port,
                                                  ["-c", cipher])
        try:
            up = bench.iperf(port, seconds=1)
            down = bench.iperf(port, reverse=True, seconds=1)
        finally:
            bench.procs.stop(proc)
        rates[cipher] = (up + down) / 2.0
        bench.say("  cipher probe %-30s %6.2f Gbit/s (mean of 1 s up, 1 s down)"
                  % (cipher, rates[cipher]))
    fastest = max(rates, key=lambda c: rates[c]) if rates else AES128_GCM
    return fastest, rates


def cipher_options(variant: str, fastest: str) -> List[str]:
    if variant == "":
        return []
    return ["-c", AES128_GCM if variant == "_aes128gcm" else fastest]


def setup_openssh_paths(bench: Any, fastest: str) -> None:
    """``ssh -L`` and reverse paths (iperf3 and echo) for each cipher variant.

    When the fastest cipher is aes128-gcm, the ``_fastest`` names share the aes128-gcm
    paths (same ports, measured once)."""
    for variant in VARIANTS:
        if variant == "_fastest" and fastest == AES128_GCM:
            for kind in ("ssh_L", "ssh_reverse"):
                for prefix in ("", "echo_"):
                    bench.ports[prefix + kind + variant] = bench.ports[prefix + kind +
                                                                       "_aes128gcm"]
                for prefix in ("", "echo_"):
                    bench.cpu_groups[prefix + kind + variant] = bench.cpu_groups[
                        prefix + kind + "_aes128gcm"]
            continue
        opts = cipher_options(variant, fastest)
        # the iperf3 paths (throughput) and the echo paths (latency), each with its
        # processes for the CPU figures
        for prefix, l_target, r_target in (("", "iperf_ssh_L", "iperf_reverse"),
                                           ("echo_", "echo", "echo")):
            port, ssh = suite_ssh.local_forward_proc(bench.procs, bench.sshd,
                                                     bench.ports[l_target], opts)
            bench.ports[prefix + "ssh_L" + variant] = port
            bench.cpu_groups[prefix + "ssh_L" + variant] = {
                "sshd": (bench.sshd.proc.pid, True), "ssh": (ssh.pid, False)}
            port, device, operator = suite_ssh.reverse_path_procs(
                bench.procs, bench.bastion, bench.ports[r_target], opts)
            bench.ports[prefix + "ssh_reverse" + variant] = port
            bench.cpu_groups[prefix + "ssh_reverse" + variant] = {
                "device_ssh_R": (device.pid, False),
                "bastion_sshd": (bench.bastion.proc.pid, True),
                "operator_ssh": (operator.pid, False)}


def throughput_paths() -> List[str]:
    return (["direct", "tunnel"] + ["ssh_L" + v for v in VARIANTS]
            + ["ssh_reverse" + v for v in VARIANTS])


def throughput(bench: Any) -> None:
    """One stream each way through every path, interleaved; CPU s/GiB of each process."""
    paths = throughput_paths()
    samples: Dict[str, Dict[str, List[float]]] = {d: {p: [] for p in paths}
                                                  for d in ("up", "down")}
    cpu: Dict[str, Dict[str, Dict[str, List[float]]]] = {d: {} for d in ("up", "down")}
    runs = int(bench.opt("runs"))
    for run in range(runs):
        for name in paths:  # interleaved: drift hits every path
            port = bench.ports["iperf_direct" if name == "direct" else name]
            alias = [p for p in paths if p != name and bench.ports.get(p) == port
                     and paths.index(p) < paths.index(name)]
            for direction in ("up", "down"):
                if alias:  # same path under another name: measured once
                    samples[direction][name].append(samples[direction][alias[0]][-1])
                    cpu[direction][name] = cpu[direction][alias[0]]
                    continue
                meter = CpuMeter(bench.cpu_groups.get(name, {}))
                meter.start()
                gbit, nbytes = bench.iperf_run(port, reverse=direction == "down")
                used = meter.stop()
                samples[direction][name].append(gbit)
                per = cpu[direction].setdefault(name, {})
                for role, seconds in used.items():
                    per.setdefault(role, []).append(seconds / (nbytes / GIB))
                bench.say("  throughput run %d/%d %-21s %-4s %6.2f Gbit/s%s"
                          % (run + 1, runs, name, direction, gbit, "".join(
                              "  %s %.2f s/GiB" % (r, s / (nbytes / GIB))
                              for r, s in used.items())))
    out: Dict[str, Any] = {}
    for direction, per_path in samples.items():
        med = {name: median(v) for name, v in per_path.items()}
        out[direction] = {
            "gbit_s": med,
            "runs": per_path,
            "ratio_tunnel_vs": {name: med["tunnel"] / med[name] for name in paths
                                if name != "tunnel"},
            "cpu_s_per_gib": {name: {role: median(v) for role, v in roles.items()}
                              for name, roles in cpu[direction].items()},
        }
    out["seconds_per_run"] = int(bench.opt("seconds"))
    bench.results["throughput"] = out


def many_streams(bench: Any) -> None:
    counts = [int(c) for c in str(bench.opt("streams")).split(",") if c.strip()]
    runs = int(bench.opt("runs"))
    names = ["tunnel", "ssh_L_fastest", "ssh_reverse", "ssh_reverse_fastest"]
    out: Dict[str, Any] = {"streams": counts}
    for name in names:
        out[name + "_gbit_s"] = {}
    for n in counts:
        for name in names:
            values = [bench.iperf(bench.ports[name], parallel=n) for _ in range(runs)]
            out[name + "_gbit_s"][str(n)] = median(values)
            bench.say("  %2d streams %-21s %6.2f Gbit/s (median of %d)"
                      % (n, name, median(values), runs))
    bench.results["many_streams"] = out


def _samples(done: "subprocess.CompletedProcess[bytes]", what: str) -> Dict[str, float]:
    if done.returncode != 0:
        raise RuntimeError("%s client failed: %s" % (what, done.stderr[-500:]))
    samples = json.loads(done.stdout)["samples_ms"]
    samples = samples[min(50, len(samples) // 10):]  # warm-up (and a stdio's session set-up)
    return {"p50": percentile(samples, 50), "p99": percentile(samples, 99)}


def rtt(bench: Any, port: int) -> Dict[str, float]:
    """1-byte round trips over TCP to ``port`` (TCP_NODELAY)."""
    rounds = int(bench.opt("rtt_rounds"))
    return _samples(subprocess.run([sys.executable, bench.targets_script, "rtt", str(port),
                                    str(rounds)], capture_output=True, timeout=300), "rtt")


def machine_busy_seconds() -> float:
    """CPU seconds every core of the machine spent busy so far (/proc/stat: all but
    idle and iowait)."""
    with open("/proc/stat") as f:
        ticks = [int(v) for v in f.readline().split()[1:]]
    return (sum(ticks) - ticks[3] - ticks[4]) / os.sysconf("SC_CLK_TCK")


def rtt_with_cpu(bench: Any, port: int, groups: Dict[str, Tuple[int, bool]]
                 ) -> Dict[str, Any]:
    """:func:`rtt`, and the CPU microseconds each process of the path spent per round
    trip (``cpu_us``), and the whole machine's (``machine_us``: the client and the echo
    server too, the same on every path; and whatever else ran). On a 2-core machine the
    round trip is a chain of wake-ups, one process after the other: its latency follows
    what each hop costs in CPU (docs/performance.md)."""
    meter = CpuMeter(groups)
    meter.start()
    busy = machine_busy_seconds()
    r: Dict[str, Any] = dict(rtt(bench, port))
    busy = machine_busy_seconds() - busy
    rounds = int(bench.opt("rtt_rounds"))
    r["cpu_us"] = {role: s / rounds * 1e6 for role, s in meter.stop().items()}
    r["machine_us"] = busy / rounds * 1e6
    return r


def rtt_cmd(bench: Any, argv: Sequence[str]) -> Dict[str, float]:
    """1-byte round trips through a ``stdio`` console's stdin/stdout (ProxyCommand path)."""
    rounds = int(bench.opt("rtt_rounds"))
    done = subprocess.run([sys.executable, bench.targets_script, "rtt-cmd", str(rounds)]
                          + list(argv), capture_output=True, timeout=300)
    return _samples(done, "rtt-cmd")


def _rtt_path(bench: Any, how: Any) -> Dict[str, Any]:
    """One latency run of a path: a port name (TCP round trips, with the CPU of the
    path's processes when known) or a console command line (``stdio``)."""
    if not isinstance(how, str):
        return rtt_cmd(bench, how)
    if how in bench.cpu_groups:
        return rtt_with_cpu(bench, bench.ports[how], bench.cpu_groups[how])
    return bench.rtt(bench.ports[how])


def latency(bench: Any) -> None:
    """Added 1-byte RTT: forward, stdio (own session and via a master), every ssh path."""
    echo = "127.0.0.1:%d" % bench.ports["echo"]
    ident = bench.platform.ident
    paths: Dict[str, Any] = {"direct": "echo", "tunnel": "echo_tunnel",
                             "stdio": bench.platform.console_argv("stdio", "--master", "no",
                                                                  ident, echo),
                             "stdio_via_master": bench.platform.console_argv(
                                 "stdio", "--master", "use", ident, echo)}
    for kind in ("ssh_L", "ssh_reverse"):
        for v in VARIANTS:
            paths[kind + v] = "echo_" + kind + v
    for style in FLOOR_STYLES:
        if "echo_floor_chain_" + style in bench.ports:
            paths["floor_chain_" + style] = "echo_floor_chain_" + style
    per: Dict[str, Dict[str, List[float]]] = {n: {"p50": [], "p99": []} for n in paths}
    cpu: Dict[str, Dict[str, List[float]]] = {}
    master = bench._console_master()
    try:
        for _ in range(int(bench.opt("runs"))):
            done: Dict[Any, Dict[str, float]] = {}
            for name, how in paths.items():
                key = bench.ports[how] if isinstance(how, str) else name
                if key not in done:  # the same path under another name: measured once
                    done[key] = _rtt_path(bench, how)
                r = done[key]
                per[name]["p50"].append(r["p50"])
                per[name]["p99"].append(r["p99"])
                if "cpu_us" in r:
                    roles = cpu.setdefault(name, {})
                    for role, us in list(r["cpu_us"].items()) + [("machine", r["machine_us"])]:
                        roles.setdefault(role, []).append(us)
    finally:
        bench.procs.stop(master)
    out: Dict[str, Any] = {name: {q: median(v) for q, v in qs.items()}
                           for name, qs in per.items()}
    for name, roles in cpu.items():
        out[name]["cpu_us_per_rt"] = {role: median(v) for role, v in roles.items()}
    for name in paths:
        if name != "direct":
            out[name]["added_p50"] = out[name]["p50"] - out["direct"]["p50"]
            out[name]["added_p99"] = out[name]["p99"] - out["direct"]["p99"]
    out["rounds"] = int(bench.opt("rtt_rounds"))
    bench.results["latency_ms"] = out
    for name in paths:
        per_rt = out[name].get("cpu_us_per_rt", {})
        bench.say("  rtt %-21s p50 %.3f ms  p99 %.3f ms%s" % (
            name, out[name]["p50"], out[name]["p99"],
            "  CPU us per round trip: " + ", ".join("%s %.0f" % kv for kv in per_rt.items())
            if per_rt else ""))
