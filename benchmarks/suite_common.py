"""Shared helpers of the benchmark suite (``benchmarks/run.py``): processes, ports, stats.

Every child process the suite starts goes through :class:`Procs`: its own session
(process group) and ``PR_SET_PDEATHSIG`` so that even a ``kill -9`` of the suite takes
it down, and :meth:`Procs.close` ends every group (SIGTERM, bounded wait, SIGKILL) —
called from ``finally`` so that Ctrl-C or an error leaves no sshd, iperf3 or console.
"""

from __future__ import annotations

import os
import platform
import re
import resource
import signal
import socket
import statistics
import subprocess
import sys
import time
from typing import Any, Dict, List, Optional, Sequence

from remote_gevent.demo.processes import die_with_parent

WAIT = 30.0


def free_port() -> int:
    """A free port on 127.0.0.1 outside the ephemeral range (see demo.rabbit.free_port)."""
    from remote_gevent.demo.rabbit import free_port as pick

    return pick("127.0.0.1")


def port_open(port: int, timeout: float = 0.3) -> bool:
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=timeout):
            return True
    except OSError:
        return False


def listening(port: int) -> bool:
    """Is a TCP socket listening on ``port`` (IPv4 or IPv6)? Checked without connecting:
    a probe connection would reach the target through a forward (iperf3 dislikes those)."""
    want = ":%04X" % port
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        try:
            with open(table) as f:
                next(f)
                for line in f:
                    fields = line.split()
                    if fields[3] == "0A" and fields[1].endswith(want):
                        return True
        except (OSError, StopIteration):
            continue
    return False


def wait_port(port: int, proc: Optional[subprocess.Popen] = None, timeout: float = WAIT,
              what: str = "") -> None:
    deadline = time.monotonic() + timeout
    while not listening(port):
        if proc is not None and proc.poll() is not None:
            raise RuntimeError("%s exited with %s before listening on %d"
                               % (what or proc.args, proc.returncode, port))
        if time.monotonic() > deadline:
            raise RuntimeError("%s did not listen on 127.0.0.1:%d within %.0f s"
                               % (what or "process", port, timeout))
        time.sleep(0.05)


def raise_nofile() -> int:
    """Soft RLIMIT_NOFILE up to the hard limit (children inherit it); the new soft limit."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if hard != resource.RLIM_INFINITY and soft < hard:
        resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
        return hard
    return soft


def rss_kib(pid: int) -> int:
    with open("/proc/%d/status" % pid) as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1])
    return -1


def open_fds(pid: int) -> int:
    try:
        return len(os.listdir("/proc/%d/fd" % pid))
    except OSError:
        return -1


def cpu_seconds(pid: int) -> float:
    """utime + stime of ``pid`` so far."""
    with open("/proc/%d/stat" % pid) as f:
        fields = f.read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def exit_on_sigterm() -> None:
    """SIGTERM raises ``SystemExit(143)`` in the calling (main) greenlet, so its ``finally``
    blocks tear down everything the benchmark started."""
    import gevent

    main_greenlet = gevent.getcurrent()

    def on_term() -> None:
        main_greenlet.throw(SystemExit(128 + signal.SIGTERM))

    gevent.signal_handler(signal.SIGTERM, on_term)


def median(values: Sequence[float]) -> float:
    return float(statistics.median(values)) if values else float("nan")


def percentile(values: Sequence[float], q: float) -> float:
    """Nearest-rank percentile (q in 0..100)."""
    if not values:
        return float("nan")
    ordered = sorted(values)
    rank = max(1, int(round(q / 100.0 * len(ordered) + 0.4999)))
    return float(ordered[min(rank, len(ordered)) - 1])


class Procs:
    """Every child process of the suite, each in its own process group."""

    def __init__(self) -> None:
        self.procs: List[subprocess.Popen] = []

    def start(self, argv: Sequence[str], **kwargs: Any) -> subprocess.Popen:
        kwargs.setdefault("stdin", subprocess.DEVNULL)
        kwargs.setdefault("stdout", subprocess.DEVNULL)
        kwargs.setdefault("stderr", subprocess.DEVNULL)
        proc = subprocess.Popen(list(argv), start_new_session=True, preexec_fn=die_with_parent,
                                **kwargs)
        self.procs.append(proc)
        return proc

    def stop(self, proc: subprocess.Popen, timeout: float = 10.0) -> None:
        if proc.poll() is None:
            try:
                os.killpg(proc.pid, signal.SIGTERM)
            except OSError:
                pass
            try:
                proc.wait(timeout)
            except subprocess.TimeoutExpired:
                pass
        try:
            os.killpg(proc.pid, signal.SIGKILL)
        except OSError:
            pass
        try:
            proc.wait(5)
        except subprocess.TimeoutExpired:
            pass
        for stream in (proc.stdin, proc.stdout, proc.stderr):
            if stream is not None:
                try:
                    stream.close()
                except OSError:
                    pass
        if proc in self.procs:
            self.procs.remove(proc)

    def close(self) -> None:
        for proc in list(reversed(self.procs)):
            self.stop(proc)


def _run_text(argv: Sequence[str]) -> str:
    try:
        done = subprocess.run(list(argv), capture_output=True, timeout=10)
    except (OSError, subprocess.SubprocessError):
        return ""
    return (done.stdout + done.stderr).decode("utf-8", "replace").strip()


def machine() -> Dict[str, Any]:
    """What the figures were measured on."""
    model = ""
    flags = ""
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name") and not model:
                    model = line.split(":", 1)[1].strip()
                if line.startswith("flags") and not flags:
                    flags = line
    except OSError:
        pass
    try:
        import nacl

        pynacl = nacl.__version__
    except ImportError:  # pragma: no cover
        pynacl = "absent"
    import gevent

    iperf = _run_text(["iperf3", "--version"]).splitlines()
    return {
        "cores": os.cpu_count(),
        "cpu_model": model,
        "aes_ni": " aes " in flags,
        "kernel": platform.release(),
        "python": sys.version.split()[0],
        "gevent": gevent.__version__,
        "libsodium": "bundled with PyNaCl %s" % pynacl,
        "openssl": __import__("ssl").OPENSSL_VERSION,
        "openssh": _run_text(["ssh", "-V"]),
        "iperf3": iperf[0] if iperf else "",
    }


def ssh_cipher(verbose_output: str) -> str:
    """The cipher named by ``ssh -v``'s ``kex: server->client cipher: …`` line."""
    m = re.search(r"kex: server->client cipher: (\S+)", verbose_output)
    return m.group(1) if m else "unknown"
