"""The benchmark suite: remote-gevent side by side with OpenSSH (issues 6 and 17).

    python -m benchmarks.run                     # full suite (~12 min), table + JSON
    python -m benchmarks.run --quick             # CI smoke (~70 s): tiny sizes, one run
    python -m benchmarks.run --profile DIR       # also py-spy the throughput path

On 127.0.0.1 only, in a temporary directory: the demo platform (private TLS RabbitMQ
node, relay, agent for device ``demo``), an ``sshd`` (one-hop ``ssh -L``, fresh
``ssh … true``), a "bastion" ``sshd`` (the device's ``ssh -R`` + the operator's ``ssh -L``
through it), iperf3 servers, a banner server and an echo server. Measures:

1. throughput, one stream each way: direct, our tunnel (``forward -L``), ``ssh -L``,
   the OpenSSH reverse path, each OpenSSH path at the default cipher, aes128-gcm and the
   fastest cipher here (``suite_compare``); CPU s/GiB of every process on each path;
2. aggregate throughput of 1, 8 and 64 streams in one session;
3. session set-up p50/p99: warm (``open_session`` in this running console process,
   request → first byte) and cold (``stdio`` launch → first byte) next to ``ssh … true``;
4. added latency: 1-byte round trips through ``forward`` and ``stdio`` vs direct and every
   OpenSSH path, with the CPU each process spends per round trip, and the floor: the same
   three-process chain with the least work per message (``bench_rtt_floor``);
5. memory: agent RSS idle, with 10 and N open sessions, relay RSS with M paired sessions;
6. control plane: session requests per second the agent refuses and accepts (+ close).
7. CPU floor: a bare forwarder's read + AEAD + write per GiB (``bench_floor``).

Every figure is a median over repeated runs; every run records the machine. Figures only,
no assertions: a CI smoke may run ``--quick``, never assert on speed. Everything started
is torn down at the end, on error and on Ctrl-C/SIGTERM too.
"""

from __future__ import annotations

from gevent import monkey

monkey.patch_all()

# ruff: noqa: E402  (imports follow the monkey patch)
import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from typing import Any, Callable, Dict, List, Optional, Sequence, Tuple

if __package__ in (None, ""):  # run as ``python benchmarks/run.py``
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import gevent
import gevent.pool

from benchmarks import bench_floor, bench_rtt_floor, suite_compare, suite_ssh
from benchmarks.suite_report import _per_cpu, table
from benchmarks.suite_common import (
    Procs,
    cpu_seconds,
    exit_on_sigterm,
    free_port,
    machine,
    open_fds,
    percentile,
    raise_nofile,
    rss_kib,
    wait_port,
)

HERE = os.path.dirname(os.path.abspath(__file__))
TARGETS_SCRIPT = os.path.join(HERE, "suite_targets.py")

#: name → (full, quick) defaults; every one can be overridden on the command line.
PRESETS: Dict[str, Tuple[Any, Any]] = {
    "seconds": (5, 1),          # iperf3 -t per run
    "runs": (3, 1),             # repetitions (medians)
    "streams": ("1,8,64", "1,8,64"),
    "setup_runs": (60, 6),      # warm and cold session set-ups (each)
    "rtt_rounds": (5000, 200),  # round trips per latency run
    "sessions": (1000, 30),     # open sessions for the memory figure
    "relay_pairs": (5000, 100),
    "cp_requests": (400, 20),   # control-plane requests per kind
}

DEVICE_TIMEOUT = 60.0


def say(text: str) -> None:
    print(text, flush=True)


class Bench:
    """One run of the suite: what it started (torn down by :meth:`close`) and the results."""

    def __init__(self, args: argparse.Namespace) -> None:
        self.args = args
        self.quick = args.quick
        self.procs = Procs()
        self.workdir = tempfile.mkdtemp(prefix="rg-bench-")
        self.platform: Any = None
        self.control: Any = None
        self.cfg: Any = None
        self.results: Dict[str, Any] = {}
        self.ports: Dict[str, int] = {}
        #: path -> role -> (pid, with descendants): whose CPU time each path's runs read
        self.cpu_groups: Dict[str, Dict[str, Tuple[int, bool]]] = {}
        self.targets_script = TARGETS_SCRIPT
        self.say = say

    def opt(self, name: str) -> Any:
        value = getattr(self.args, name)
        if value is None:
            value = PRESETS[name][1 if self.quick else 0]
        return value

    # ------------------------------------------------------------------ bring-up
    def start(self) -> None:
        from remote_gevent.demo.platform import DemoPlatform
        from remote_gevent.demo.processes import entry_argv

        raise_nofile()
        sessions = int(self.opt("sessions"))
        relay_port = free_port()
        # Our own control socket directory: a master of another checkout's device "demo"
        # in the default /tmp/remote-gevent-<uid> must never serve our stdio runs.
        # Unix socket paths are short (108 bytes, and ssh -M binds a longer temporary name
        # first): the control sockets live in a short directory of their own.
        self.control_dir = tempfile.mkdtemp(prefix="rgb-", dir="/tmp")
        p = DemoPlatform(os.path.join(self.workdir, "platform"),
                         # the suite opens ~1500 sessions in minutes: no per-operator rate
                         remote={"max_session": max(sessions + 50, 100), "operator_rate": 0},
                         console={"control_socket_dir": self.control_dir},
                         start_relay=False, relay_port=relay_port)
        p.prepare()
        # Our own relay process: the product's relay with pairing limits raised, so the
        # memory and control-plane phases measure the agent, not the relay's per-IP cap.
        conf = os.path.join(self.workdir, "relay.yaml")
        with open(conf, "w") as f:
            f.write("max_pending: 20000\nmax_pending_per_ip: 20000\nmax_paired: 20000\n")
        relay_log = open(os.path.join(self.workdir, "relay.log"), "ab")
        self.relay_proc = self.procs.start(
            entry_argv("remote-gevent-relay", "remote_gevent.relay.cli")
            + ["--config", conf, "--listen", p.relay_address, "--cert", p.relay_cert[0],
               "--key", p.relay_cert[1], "--log-level", "warning"],
            stdout=relay_log, stderr=relay_log)
        relay_log.close()
        wait_port(relay_port, self.relay_proc, what="relay")
        self.platform = p
        say("starting the demo platform (private RabbitMQ node, agent) in %s" % p.dir)
        p.start()
        self.agent_pid = p.agent_proc.pid

        # device services
        self.ports["iperf_direct"] = self._iperf_server()
        self.ports["iperf_tunnel"] = self._iperf_server()
        self.ports["iperf_ssh_L"] = self._iperf_server()
        self.ports["iperf_reverse"] = self._iperf_server()
        self.ports["banner"] = self._target_server("banner")
        self.ports["echo"] = self._target_server("echo")

        # OpenSSH: one-hop server and the bastion
        key = suite_ssh.make_client_key(self.workdir)
        self.sshd = suite_ssh.Sshd(self.procs, self.workdir, key, "sshd")
        self.bastion = suite_ssh.Sshd(self.procs, self.workdir, key, "bastion")
        # OpenSSH at its default cipher, at aes128-gcm and at its fastest here (probed)
        say("probing OpenSSH's fastest cipher on this machine (ssh -L, 1 s each way)")
        self.fastest_cipher, self.cipher_probe = suite_compare.probe_fastest(
            self, self.ports["iperf_ssh_L"])
        suite_compare.setup_openssh_paths(self, self.fastest_cipher)
        # our tunnel: one forward process, one session, two listeners
        self.ports["tunnel"] = free_port()
        self.ports["echo_tunnel"] = free_port()
        self.forward_proc = self._forward([(self.ports["tunnel"], self.ports["iperf_tunnel"]),
                                           (self.ports["echo_tunnel"], self.ports["echo"])])
        self.cpu_groups["tunnel"] = {"agent": (self.agent_pid, False),
                                     "console": (self.forward_proc.pid, False),
                                     "relay": (self.relay_proc.pid, False)}
        self.cpu_groups["echo_tunnel"] = self.cpu_groups["tunnel"]  # the same processes
        # the floor under the added round trip: the same chain with the least work per
        # message, gevent hops and thread hops (benchmarks/bench_rtt_floor.py)
        for style in bench_rtt_floor.STYLES:
            name = "echo_floor_chain_" + style
            self.ports[name], hops = bench_rtt_floor.start_chain(
                self.procs.start, self.ports["echo"], style)
            self.cpu_groups[name] = {role: (proc.pid, False) for role, proc in hops.items()}

        # in-process console (warm set-up, memory, control plane)
        from remote_gevent.console import config as cconfig
        from remote_gevent.console.control import ConsoleControl

        self.cfg = cconfig.load(p.console_config)
        self.control = ConsoleControl(self.cfg).start()
        self.baseline_sessions = self.agent_sessions()  # the forward's session

    def _iperf_server(self) -> int:
        port = free_port()
        proc = self.procs.start(["iperf3", "-s", "-p", str(port), "-B", "127.0.0.1"])
        wait_port(port, proc, what="iperf3 -s")
        return port

    def _target_server(self, mode: str) -> int:
        proc = self.procs.start([sys.executable, TARGETS_SCRIPT, mode], stdout=subprocess.PIPE)
        with gevent.Timeout(30, RuntimeError("%s server did not start" % mode)):
            return int(proc.stdout.readline())

    def _forward(self, pairs: Sequence[Tuple[int, int]]) -> subprocess.Popen:
        argv = ["forward", self.platform.ident]
        for local, remote in pairs:
            argv += ["-L", "%d:127.0.0.1:%d" % (local, remote)]
        log_path = os.path.join(self.workdir, "forward.log")
        log = open(log_path, "ab")
        proc = self.procs.start(self.platform.console_argv(*argv), stdout=log, stderr=log)
        log.close()
        deadline = time.monotonic() + DEVICE_TIMEOUT
        while True:
            with open(log_path, "rb") as f:
                text = f.read().decode("utf-8", "replace")
            if text.count("forwarding ") >= len(pairs):
                return proc
            if proc.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError("forward did not come up (exit %s): %s"
                                   % (proc.poll(), text[-2000:]))
            time.sleep(0.05)

    def close(self) -> None:
        if self.control is not None:
            try:
                self.control.close()
            except Exception as exc:  # noqa: BLE001 - teardown goes on whatever happens
                say("closing the console control link: %s" % exc)
        if self.platform is not None:
            self.platform.stop()  # agent first (sessions end with `shutdown`), then broker
        self.procs.close()  # consoles, sshd, ssh clients, iperf3, targets, relay
        if not self.args.keep:
            shutil.rmtree(self.workdir, ignore_errors=True)
        if getattr(self, "control_dir", None):
            shutil.rmtree(self.control_dir, ignore_errors=True)

    # ------------------------------------------------------------------ 1 + 2: throughput
    def iperf(self, port: int, reverse: bool = False, parallel: int = 1,
              seconds: Optional[int] = None) -> float:
        """Gbit/s received (one run)."""
        return self.iperf_run(port, reverse, parallel, seconds)[0]

    def iperf_run(self, port: int, reverse: bool = False, parallel: int = 1,
                  seconds: Optional[int] = None) -> Tuple[float, int]:
        """Gbit/s and bytes received (one run); one retry if iperf3 fails."""
        seconds = int(seconds or self.opt("seconds"))
        argv = ["iperf3", "-c", "127.0.0.1", "-p", str(port), "-t", str(seconds), "-J"]
        if reverse:
            argv.append("-R")
        if parallel > 1:
            argv += ["-P", str(parallel)]
        last = ""
        for _attempt in range(2):
            done = subprocess.run(argv, capture_output=True, timeout=seconds + 60)
            try:
                data = json.loads(done.stdout.decode("utf-8", "replace"))
            except ValueError:
                data = {"error": done.stderr.decode("utf-8", "replace")[-300:]}
            if "error" not in data:
                got = data["end"]["sum_received"]
                return got["bits_per_second"] / 1e9, int(got["bytes"])
            last = data["error"]
            gevent.sleep(1.0)
        raise RuntimeError("iperf3 to port %d failed: %s" % (port, last))

    # ------------------------------------------------------------------ 4: latency
    def rtt(self, port: int) -> Dict[str, float]:
        return suite_compare.rtt(self, port)

    # ------------------------------------------------------------------ 3: session set-up
    def open_session(self, target: str) -> Any:
        from remote_gevent.console.session import open_session

        return open_session(self.cfg, self.platform.ident, [target], control=self.control)

    def warm_setup(self) -> None:
        target = "127.0.0.1:%d" % self.ports["banner"]
        up: List[float] = []
        first: List[float] = []
        runs = int(self.opt("setup_runs"))
        for i in range(runs + 3):
            t0 = time.perf_counter()
            session = self.open_session(target)
            t1 = time.perf_counter()
            stream = session.open_stream(target)
            data = stream.recv()
            t2 = time.perf_counter()
            if data != b"x":
                raise RuntimeError("banner server sent %r" % data)
            session.close()
            session.wait(10)
            if i >= 3:  # the first ones warm caches up
                up.append((t1 - t0) * 1000.0)
                first.append((t2 - t0) * 1000.0)
        self.results.setdefault("session_setup_ms", {})["warm"] = {
            "first_byte_p50": percentile(first, 50), "first_byte_p99": percentile(first, 99),
            "tunnel_up_p50": percentile(up, 50), "tunnel_up_p99": percentile(up, 99),
            "runs": runs}
        say("  warm: first byte p50 %.1f ms p99 %.1f ms (tunnel up p50 %.1f ms)"
            % (percentile(first, 50), percentile(first, 99), percentile(up, 50)))

    def _timed_first_byte(self, argv: List[str]) -> float:
        t0 = time.perf_counter()
        proc = self.procs.start(argv, stdin=subprocess.PIPE, stdout=subprocess.PIPE)
        try:
            with gevent.Timeout(DEVICE_TIMEOUT, RuntimeError("no first byte from %s" % argv)):
                data = proc.stdout.read(1)
            elapsed = (time.perf_counter() - t0) * 1000.0
            if data != b"x":
                raise RuntimeError("stdio console gave %r (exit %s)" % (data, proc.poll()))
            proc.stdin.close()
            proc.wait(30)
        finally:
            self.procs.stop(proc)
        return elapsed

    def _timed_run(self, argv: List[str]) -> float:
        t0 = time.perf_counter()
        done = subprocess.run(argv, stdin=subprocess.DEVNULL, capture_output=True, timeout=60)
        elapsed = (time.perf_counter() - t0) * 1000.0
        if done.returncode != 0:
            raise RuntimeError("%s failed (%d): %s" % (argv, done.returncode, done.stderr[-300:]))
        return elapsed

    def _console_master(self) -> subprocess.Popen:
        """``remote-gevent-console master DEVICE`` (ControlMaster-style), once it listens."""
        log_path = os.path.join(self.workdir, "master.log")
        log = open(log_path, "ab")
        proc = self.procs.start(self.platform.console_argv(
            "master", self.platform.ident, "--persist", "0"), stdout=log, stderr=log)
        log.close()
        deadline = time.monotonic() + DEVICE_TIMEOUT
        while True:
            with open(log_path, "rb") as f:
                text = f.read().decode("utf-8", "replace")
            if "master of " in text:
                return proc
            if proc.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError("console master did not come up (exit %s): %s"
                                   % (proc.poll(), text[-2000:]))
            time.sleep(0.05)

    def _ssh_master(self) -> Tuple[subprocess.Popen, List[str]]:
        """``ssh -M -N`` to the sshd and the argv of a ``true`` reusing it (ControlPath)."""
        path = os.path.join(self.control_dir, "ssh")
        proc = self.procs.start(self.sshd.ssh_argv(["-M", "-N", "-S", path]))
        deadline = time.monotonic() + 30
        while not os.path.exists(path):
            if proc.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError("ssh -M did not create %s" % path)
            time.sleep(0.05)
        return proc, self.sshd.ssh_argv(["-S", path, "-o", "ControlMaster=no"], ["true"])

    def cold_setup(self) -> None:
        target = "127.0.0.1:%d" % self.ports["banner"]
        ident = self.platform.ident
        variants: Dict[str, Tuple[Callable[[List[str]], float], List[str]]] = {
            "stdio": (self._timed_first_byte,
                      self.platform.console_argv("stdio", "--master", "no", ident, target)),
            "ssh_true": (self._timed_run, self.sshd.ssh_argv(command=["true"])),
            "console_version": (self._timed_run, self.platform.console_argv("--version")),
        }
        runs = int(self.opt("setup_runs"))
        samples: Dict[str, List[float]] = {name: [] for name in variants}
        master = ssh_master = None
        try:
            master = self._console_master()
            ssh_master, ssh_mux_argv = self._ssh_master()
            variants["stdio_via_master"] = (self._timed_first_byte, self.platform.console_argv(
                "stdio", "--master", "use", ident, target))
            variants["ssh_true_via_controlmaster"] = (self._timed_run, ssh_mux_argv)
            samples["stdio_via_master"] = []
            samples["ssh_true_via_controlmaster"] = []
            for i in range(runs + 1):
                for name, (fn, argv) in variants.items():  # interleaved
                    value = fn(argv)
                    if i:  # the first round warms the page cache up
                        samples[name].append(value)
        finally:
            for proc in (master, ssh_master):
                if proc is not None:
                    self.procs.stop(proc)
        out: Dict[str, Any] = {"runs": runs}
        for name, values in samples.items():
            out[name + "_p50"] = percentile(values, 50)
            out[name + "_p99"] = percentile(values, 99)
        # names used by the table and the targets
        out["stdio_first_byte_p50"] = out["stdio_p50"]
        out["stdio_first_byte_p99"] = out["stdio_p99"]
        self.results.setdefault("session_setup_ms", {})["cold"] = out
        for name in samples:
            say("  cold %-27s p50 %4.0f ms  p99 %4.0f ms" % (name, out[name + "_p50"],
                                                          out[name + "_p99"]))

    # ------------------------------------------------------------------ 6: control plane
    def agent_sessions(self) -> int:
        """Active + waiting sessions, from the agent's signed status (-1: no answer)."""
        from remote_gevent.console.config import ConsoleError

        try:
            status = self.control.status(self.platform.ident)
        except ConsoleError as exc:
            say("  status: %s" % exc)
            return -1
        return int(status["sessions_active"]) + int(status["sessions_waiting"])

    def wait_agent_idle(self, timeout: float = 60.0) -> int:
        """Poll until only the sessions open before a phase (the ``forward``'s) remain;
        returns how many more are still there (0: back to the baseline)."""
        deadline = time.monotonic() + timeout
        extra = -1
        while time.monotonic() < deadline:
            extra = self.agent_sessions() - self.baseline_sessions
            if extra <= 0:
                return 0
            gevent.sleep(0.5)
        return extra

    def _requests(self, n: int, target: str, close: bool) -> Dict[str, Any]:
        from remote_gevent.console.config import ConsoleError

        ident = self.platform.ident
        tally: Dict[str, int] = {}

        def one(_i: int) -> str:
            pending = self.control.start_request(ident, [target])
            try:
                self.control.wait_offer(pending)
            except ConsoleError as exc:
                return exc.code or "error"
            if close:
                self.control.close_session(ident, pending.session_id, "benchmark")
            return "accepted"

        pool = gevent.pool.Pool(32)
        cpu0 = cpu_seconds(self.agent_pid)
        t0 = time.perf_counter()
        for outcome in pool.imap_unordered(one, range(n)):
            tally[outcome] = tally.get(outcome, 0) + 1
        wall = time.perf_counter() - t0
        cpu = cpu_seconds(self.agent_pid) - cpu0
        return {"requests": n, "outcomes": tally, "wall_s": wall, "per_s": n / wall,
                # /proc counts CPU in clock ticks (10 ms): a short run may not reach one.
                "agent_cpu_s": cpu, "per_agent_cpu_s": n / cpu if cpu > 0 else None}

    def control_plane(self) -> None:
        n = int(self.opt("cp_requests"))
        refused = self._requests(n, "10.255.255.1:22", close=False)
        say("  refusals: %.0f/s (%s per agent CPU-second) %s"
            % (refused["per_s"], _per_cpu(refused), refused["outcomes"]))
        accepted = self._requests(n, "127.0.0.1:%d" % self.ports["banner"], close=True)
        say("  accepts (+close, relay never dialled by us): %.0f/s (%s per agent CPU-second)"
            " %s" % (accepted["per_s"], _per_cpu(accepted), accepted["outcomes"]))
        left = self.wait_agent_idle()
        self.results["control_plane"] = {"refuse": refused, "accept_close": accepted,
                                         "active_after": left}

    # ------------------------------------------------------------------ 5: memory
    def agent_mem(self) -> Tuple[float, int]:
        return rss_kib(self.agent_pid) / 1024.0, open_fds(self.agent_pid)

    def sessions_memory(self, count: int) -> Dict[str, Any]:
        target = "127.0.0.1:%d" % self.ports["banner"]
        gevent.sleep(1.0)
        before, fds_before = self.agent_mem()
        sessions: List[Any] = []
        failures: Dict[str, int] = {}

        def one(_i: int) -> None:
            from remote_gevent.console.config import ConsoleError

            try:
                sessions.append(self.open_session(target))
            except ConsoleError as exc:
                failures[exc.code] = failures.get(exc.code, 0) + 1

        t0 = time.perf_counter()
        pool = gevent.pool.Pool(16)
        for _ in pool.imap_unordered(one, range(count)):
            pass
        setup = time.perf_counter() - t0
        gevent.sleep(2.0)
        during, fds = self.agent_mem()
        console_rss = rss_kib(os.getpid()) / 1024.0
        for s in sessions:
            s.close()
        for s in sessions:
            try:
                s.wait(10)
            except gevent.Timeout:
                pass
        left = self.wait_agent_idle()
        opened = len(sessions)
        return {"requested": count, "opened": opened, "failures": failures,
                "agent_rss_before_mib": before, "agent_rss_mib": during,
                "agent_fds_before": fds_before, "agent_fds": fds,
                "per_session_kib": (during - before) * 1024.0 / max(opened, 1),
                "setup_s": setup, "console_rss_mib": console_rss, "active_after": left}

    def memory(self) -> None:
        mem = self.results.setdefault("memory", {})
        ten = self.sessions_memory(10)
        say("  agent RSS %.1f MiB -> %.1f MiB with %d sessions"
            % (ten["agent_rss_before_mib"], ten["agent_rss_mib"], ten["opened"]))
        many = self.sessions_memory(int(self.opt("sessions")))
        say("  agent RSS %.1f MiB -> %.1f MiB with %d sessions (%.1f KiB each, opened in %.1f s)"
            % (many["agent_rss_before_mib"], many["agent_rss_mib"], many["opened"],
               many["per_session_kib"], many["setup_s"]))
        mem["sessions_10"] = ten
        mem["sessions_many"] = many

    def relay_memory(self) -> None:
        from benchmarks import bench_relay

        bench_relay.suite_section(self)

    # ------------------------------------------------------------------ profile
    def profile(self, directory: str) -> None:
        from benchmarks import suite_profile

        suite_profile.profile_paths(self, directory)


# --------------------------------------------------------------------------- main

SECTIONS: List[Tuple[str, str, Callable[[Bench], None]]] = [
    ("throughput", "1. throughput, one stream each way", suite_compare.throughput),
    ("many_streams", "2. many streams in one session", suite_compare.many_streams),
    ("latency", "4. added latency (1-byte round trips)", suite_compare.latency),
    ("warm", "3a. warm session set-up", Bench.warm_setup),
    ("cold", "3b. cold session set-up", Bench.cold_setup),
    ("control_plane", "6. control plane", Bench.control_plane),
    ("memory", "5. memory: agent with open sessions", Bench.memory),
    ("relay_memory", "5. memory: relay with paired idle sessions", Bench.relay_memory),
    ("floor", "7. CPU floor: a bare forwarder's read, AEAD and write", bench_floor.suite_section),
]


def parse_args(argv: Optional[Sequence[str]]) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m benchmarks.run", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--quick", action="store_true", help="short CI smoke (tiny sizes, 1 run)")
    p.add_argument("--out", default="benchmark-results.json", help="JSON file to write")
    p.add_argument("--only", help="comma-separated sections: %s"
                   % ",".join(s[0] for s in SECTIONS))
    p.add_argument("--profile", metavar="DIR",
                   help="also record py-spy profiles of agent, relay and console during a "
                        "tunnel iperf3 run each way (raw stacks in DIR)")
    p.add_argument("--keep", action="store_true", help="keep the temporary directory")
    for name, (full, quick) in PRESETS.items():
        p.add_argument("--" + name.replace("_", "-"), dest=name, default=None,
                       help="default %s (--quick: %s)" % (full, quick))
    return p.parse_args(argv)


def main(argv: Optional[Sequence[str]] = None) -> int:
    args = parse_args(argv)
    if args.profile and not shutil.which("py-spy"):  # say so before bringing anything up
        say("--profile needs py-spy on the PATH (pip install py-spy)")
        return 2
    exit_on_sigterm()
    only = set(args.only.split(",")) if args.only else None
    started = time.monotonic()
    bench = Bench(args)
    results = bench.results
    results["machine"] = machine()
    results["mode"] = "quick" if args.quick else "full"
    results["started"] = time.strftime("%Y-%m-%d %H:%M:%S")
    results["loadavg_1min_before"] = round(os.getloadavg()[0], 2)
    try:
        say("bringing up platform, sshd, bastion, iperf3 servers (workdir %s)" % bench.workdir)
        bench.start()
        from remote_gevent.crypto import tunnel_crypto

        results["machine"]["tunnel_cipher"] = tunnel_crypto.choose_cipher(bench.cfg.cipher)
        results["machine"]["ssh_cipher"] = bench.sshd.negotiated_cipher()
        results["machine"]["ssh_fastest_cipher"] = bench.fastest_cipher
        results["cipher_probe_gbit_s"] = bench.cipher_probe
        gevent.sleep(2.0)
        results.setdefault("memory", {})["agent_idle_mib"] = bench.agent_mem()[0]
        for key, title, fn in SECTIONS:
            if only is not None and key not in only:
                continue
            say("== %s" % title)
            t0 = time.monotonic()
            fn(bench)
            results.setdefault("section_seconds", {})[key] = round(time.monotonic() - t0, 1)
            # other work on the machine skews every figure: say how busy it was
            results.setdefault("loadavg_1min_after", {})[key] = round(os.getloadavg()[0], 2)
        if args.profile:
            say("== profile (py-spy) of the throughput path")
            bench.profile(args.profile)
    finally:
        say("tearing down")
        bench.close()
    results["total_seconds"] = round(time.monotonic() - started, 1)
    with open(args.out, "w") as f:
        json.dump(results, f, indent=2, sort_keys=True)
    say("")
    say("machine: %s" % ", ".join("%s=%s" % kv for kv in sorted(results["machine"].items())))
    say(table(results))
    say("\nJSON written to %s (%.0f s in all)" % (args.out, results["total_seconds"]))
    return 0


if __name__ == "__main__":
    sys.exit(main())
