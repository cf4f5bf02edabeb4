"""File transfer throughput: ``push``/``pull`` and ``@sftp`` next to ``scp`` (issue 5).

    python benchmarks/bench_transfer.py [--size-mib 1024] [--repeat 3] [--json FILE]

Brings up on 127.0.0.1 only, in a temporary directory (``$TMPDIR`` is honoured): the
demo platform (private TLS RabbitMQ node, relay, agent for device ``demo`` with its
read-write transfer root ``DIR/files``) and an OpenSSH ``sshd`` on a free loopback port
(temporary host key, temporary client key; ``benchmarks/suite_ssh.py``). Creates one
random file of ``--size-mib`` MiB, then measures in the same run, interleaved, each
``--repeat`` times (figures are medians):

* upload:   ``remote-gevent-console push``, ``scp`` to the sshd, stock ``sftp`` ``put``
  through our ``@sftp`` (``ProxyCommand='remote-gevent-console … stdio %n @sftp'``);
* download: ``remote-gevent-console pull``, ``scp`` from the sshd, ``sftp`` ``get``.

Every figure is the wall time of one client command (process start, session set-up,
transfer, and for ours the agent's fsync + sha256 check before the rename), divided
into the file size. The sha256 of every transferred copy is checked against the source
after the timing: a wrong copy aborts the benchmark with exit status 1. The platform's
config forbids overwriting (``remote.transfer.overwrite: false``, the default), so each
target is removed after its check; the download source is a copy of the source file
(the agent serves no hard-linked file). Disk: about 3 x ``--size-mib`` free in the
temporary directory.

Everything started is torn down at the end — on error, Ctrl-C and SIGTERM too: every
client runs in its own process group (``suite_common.Procs``), killed as a group, and the
platform stops agent, relay and broker. No assertions about speed: figures only.
"""

from __future__ import annotations

from gevent import monkey

monkey.patch_all()

# ruff: noqa: E402  (imports follow the monkey patch)
import argparse
import hashlib
import json
import os
import shlex
import shutil
import subprocess
import sys
import tempfile
import time
from typing import Any, Dict, List, Optional, Sequence, Tuple

if __package__ in (None, ""):  # run as ``python benchmarks/bench_transfer.py``
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import yaml

from benchmarks import suite_ssh
from benchmarks.suite_common import Procs, exit_on_sigterm, machine, median, ssh_cipher

MIB = 1024 * 1024
#: (key, direction, label); "ours" rows are compared with the scp row of their direction
ROWS: List[Tuple[str, str, str]] = [
    ("push", "upload", "remote-gevent-console push"),
    ("sftp_put", "upload", "sftp put via @sftp"),
    ("scp_up", "upload", "scp (OpenSSH) upload"),
    ("pull", "download", "remote-gevent-console pull"),
    ("sftp_get", "download", "sftp get via @sftp"),
    ("scp_down", "download", "scp (OpenSSH) download"),
]
SCP_OF = {"upload": "scp_up", "download": "scp_down"}
SETUP_TIMEOUT = 60.0
SFTP_SERVER = "/usr/lib/openssh/sftp-server"


def say(text: str) -> None:
    print(text, flush=True)


class IntegrityError(RuntimeError):
    """A transferred copy differs from the source."""


class CommandError(RuntimeError):
    """A client command failed or overran its time bound."""


def sha256_file(path: str) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while True:
            chunk = f.read(4 * MIB)
            if not chunk:
                return h.hexdigest()
            h.update(chunk)


def random_file(path: str, size: int) -> str:
    """``size`` random bytes at ``path``; their sha256."""
    h = hashlib.sha256()
    with open(path, "wb") as f:
        left = size
        while left:
            chunk = os.urandom(min(4 * MIB, left))
            h.update(chunk)
            f.write(chunk)
            left -= len(chunk)
    return h.hexdigest()


class SshdProcs(Procs):
    """:class:`Procs` that gives the suite's sshd the stock ``sftp`` subsystem.

    ``suite_ssh.Sshd``'s config has no ``Subsystem`` line, and since OpenSSH 9.0
    ``scp`` speaks the SFTP protocol by default: the subsystem Debian's own
    ``sshd_config`` sets is added on the sshd command line instead.
    """

    def start(self, argv: Sequence[str], **kwargs: Any) -> subprocess.Popen:
        if list(argv[:1]) == [suite_ssh.SSHD]:
            server = SFTP_SERVER if os.access(SFTP_SERVER, os.X_OK) else "internal-sftp"
            argv = list(argv) + ["-o", "Subsystem=sftp %s" % server]
        return super().start(argv, **kwargs)


class TransferBench:
    """One run: what it started (torn down by :meth:`close`) and its results."""

    def __init__(self, args: argparse.Namespace) -> None:
        self.args = args
        self.size = int(args.size_mib * MIB)
        self.procs = SshdProcs()
        self.workdir = tempfile.mkdtemp(prefix="rg-bench-transfer-")
        self.platform: Any = None
        self.control_dir: Optional[str] = None  # outside workdir (removed by close)
        self.sshd: Any = None
        self.digest = ""
        self.src = os.path.join(self.workdir, "source.bin")
        self.local_dir = os.path.join(self.workdir, "local")
        self.ssh_dir = os.path.join(self.workdir, "ssh-side")
        self.user = "root" if os.geteuid() == 0 else os.environ.get("USER", "root")
        # a 1 MiB/s floor for every command, plus a minute of set-up
        self.timeout = 60.0 + self.size / MIB
        self.samples: Dict[str, List[float]] = {key: [] for key, _, _ in ROWS}
        self.checks: Dict[str, List[bool]] = {key: [] for key, _, _ in ROWS}

    # ------------------------------------------------------------------ bring-up
    def start(self) -> None:
        from remote_gevent.demo.platform import DemoPlatform

        free = shutil.disk_usage(self.workdir).free
        if free < 2 * self.size + 256 * MIB:
            raise SystemExit("bench_transfer: %s has %d MiB free; %d MiB needed"
                             % (self.workdir, free // MIB, (2 * self.size) // MIB + 256))
        os.makedirs(self.local_dir)
        os.makedirs(self.ssh_dir)
        # Our own control socket directory: a console master of another checkout's
        # device "demo" in the default /tmp/remote-gevent-<uid> must never serve us.
        # Unix socket paths are limited to 107 bytes: a deep $TMPDIR gets a short one.
        control_dir = os.path.join(self.workdir, "ctl")
        if len(control_dir) > 64:
            control_dir = self.control_dir = tempfile.mkdtemp(prefix="rg-bt-ctl-", dir="/tmp")
        else:
            os.makedirs(control_dir, mode=0o700)
        p = DemoPlatform(os.path.join(self.workdir, "platform"),
                         console={"control_socket_dir": control_dir},
                         log_level="WARNING")
        self.platform = p
        say("starting the demo platform (private RabbitMQ node, relay, agent) in %s" % p.dir)
        p.start()
        with open(p.agent_config) as f:
            transfer = yaml.safe_load(f)["remote"].get("transfer", {})
        self.overwrite = bool(transfer.get("overwrite", False))  # False: remove targets
        say("starting sshd on 127.0.0.1")
        key = suite_ssh.make_client_key(self.workdir)
        self.sshd = suite_ssh.Sshd(self.procs, self.workdir, key, "sshd")
        say("writing %d MiB of random data to %s" % (self.size // MIB, self.src))
        self.digest = random_file(self.src, self.size)
        # download source: a copy, not a hard link: the agent refuses to serve a file with
        # a second link (a link may lead out of its root; remote.transfer allow_hardlinks)
        self.remote_src = os.path.join(p.files_dir, "bench-source.bin")
        shutil.copyfile(self.src, self.remote_src)

    def close(self) -> None:
        if self.platform is not None:
            try:
                self.platform.stop()  # agent, relay, broker
            except Exception as exc:  # noqa: BLE001 - teardown goes on whatever happens
                say("stopping the platform: %s" % exc)
        self.procs.close()  # clients still running, sshd
        if self.control_dir is not None:
            shutil.rmtree(self.control_dir, ignore_errors=True)
        if not self.args.keep:
            shutil.rmtree(self.workdir, ignore_errors=True)

    # ------------------------------------------------------------------ commands
    def run(self, what: str, argv: Sequence[str], timeout: Optional[float] = None,
            check: bool = True) -> Tuple[float, str]:
        """Run one client command in its own process group; (wall seconds, output)."""
        log_path = os.path.join(self.workdir, "client.log")
        with open(log_path, "wb") as log:
            t0 = time.monotonic()
            proc = self.procs.start(argv, stdout=log, stderr=log)
            try:
                rc = proc.wait(timeout or self.timeout)
            except subprocess.TimeoutExpired:
                rc = None
            elapsed = time.monotonic() - t0
            self.procs.stop(proc)  # the whole group: ssh's ProxyCommand, stragglers
        with open(log_path, "rb") as f:
            out = f.read().decode("utf-8", "replace")
        if rc is None:
            raise CommandError("%s did not finish within %.0f s: %s\n%s"
                               % (what, timeout or self.timeout, shlex.join(argv), out[-2000:]))
        if check and rc != 0:
            raise CommandError("%s exited with %s: %s\n%s"
                               % (what, rc, shlex.join(argv), out[-2000:]))
        return elapsed, out

    def ssh_options(self) -> List[str]:
        return ["-F", "/dev/null", "-o", "BatchMode=yes", "-o", "IdentitiesOnly=yes",
                "-o", "StrictHostKeyChecking=no", "-o", "UserKnownHostsFile=/dev/null",
                "-o", "LogLevel=ERROR"]

    def scp_argv(self, src: str, dst: str) -> List[str]:
        return (["scp", "-q"] + self.ssh_options()
                + ["-i", self.sshd.client_key, "-P", str(self.sshd.port), src, dst])

    def sftp_argv(self, batch: str, verbose: bool = False) -> List[str]:
        proxy = " ".join(shlex.quote(a) for a in
                         self.platform.console_argv("stdio", "%n", "@sftp"))
        argv = ["sftp", "-b", batch] + self.ssh_options() + ["-o", "ProxyCommand=%s" % proxy,
                                                             "x@%s" % self.platform.ident]
        if verbose:
            argv[argv.index("LogLevel=ERROR")] = "LogLevel=DEBUG"
        return argv

    def sftp_batch(self, name: str, lines: Sequence[str]) -> str:
        path = os.path.join(self.workdir, "sftp-%s.batch" % name)
        with open(path, "w") as f:
            f.write("\n".join(lines) + "\n")
        return path

    def verify(self, key: str, path: str) -> None:
        got = sha256_file(path)
        ok = got == self.digest
        self.checks[key].append(ok)
        if not ok:
            raise IntegrityError("%s: %s has sha256 %s, the source %s" % (
                key, path, got, self.digest))

    def measure(self, key: str, argv: Sequence[str], copy: str) -> float:
        """Time ``argv``, check ``copy`` against the source, remove it."""
        if os.path.exists(copy):
            os.unlink(copy)
        elapsed, out = self.run(key, argv)
        if not os.path.isfile(copy):
            raise IntegrityError("%s: %s is missing after a successful command: %s"
                                 % (key, copy, out[-2000:]))
        self.verify(key, copy)
        os.unlink(copy)
        self.samples[key].append(elapsed)
        return elapsed

    def one_round(self) -> None:
        p = self.platform
        ident = p.ident
        remote = "%s@127.0.0.1:" % self.user
        target = os.path.join(p.files_dir, "bench-upload.bin")
        local = os.path.join(self.local_dir, "bench-download.bin")
        ssh_target = os.path.join(self.ssh_dir, "bench-upload.bin")
        put = self.sftp_batch("put", ['put "%s" "%s"' % (self.src, target)])
        get = self.sftp_batch("get", ['get "%s" "%s"' % (self.remote_src, local)])
        steps = [
            ("push", p.console_argv("push", ident, self.src, target), target),
            ("scp_up", self.scp_argv(self.src, remote + ssh_target), ssh_target),
            ("sftp_put", self.sftp_argv(put), target),
            ("pull", p.console_argv("pull", ident, self.remote_src, local), local),
            ("scp_down", self.scp_argv(remote + self.src, local), local),
            ("sftp_get", self.sftp_argv(get), local),
        ]
        for key, argv, copy in steps:
            elapsed = self.measure(key, argv, copy)
            say("  %-9s %7.2f s  %8.1f MiB/s  sha256 ok"
                % (key, elapsed, self.size / MIB / elapsed))

    def ciphers(self) -> Dict[str, str]:
        from remote_gevent.crypto import tunnel_crypto
        from remote_gevent.console import config as cconfig

        cfg = cconfig.load(self.platform.console_config)
        batch = self.sftp_batch("pwd", ["pwd"])
        _, out = self.run("sftp -v", self.sftp_argv(batch, verbose=True), timeout=SETUP_TIMEOUT)
        return {
            "tunnel_cipher": tunnel_crypto.choose_cipher(cfg.cipher),
            "ssh_cipher": self.sshd.negotiated_cipher(),
            "sftp_inner_ssh_cipher": ssh_cipher(out),
        }

    # ------------------------------------------------------------------ results
    def results(self) -> Dict[str, Any]:
        rows: Dict[str, Any] = {}
        for key, direction, label in ROWS:
            secs = self.samples[key]
            med = median(secs)
            rows[key] = {
                "label": label,
                "direction": direction,
                "seconds": [round(s, 3) for s in secs],
                "median_seconds": round(med, 3),
                "mib_s": round(self.size / MIB / med, 1) if secs else None,
                "sha256_ok": bool(self.checks[key]) and all(self.checks[key]),
                "verified_copies": len(self.checks[key]),
            }
        for key, direction, _ in ROWS:
            scp = rows[SCP_OF[direction]]["mib_s"]
            ours = rows[key]["mib_s"]
            rows[key]["ratio_to_scp"] = (round(ours / scp, 2) if ours and scp
                                         and key != SCP_OF[direction] else None)
        return rows


def table(size_mib: float, repeat: int, rows: Dict[str, Any]) -> str:
    lines = [
        "%g MiB file, median of %d run(s), wall time of one client command each:"
        % (size_mib, repeat),
        "",
        "| direction | command | median s | MiB/s | ours / scp | sha256 |",
        "|---|---|---|---|---|---|",
    ]
    for key, direction, label in ROWS:
        r = rows[key]
        ratio = "%.2f" % r["ratio_to_scp"] if r["ratio_to_scp"] is not None else "—"
        lines.append("| %s | %s | %.2f | %.1f | %s | %s |" % (
            direction, label, r["median_seconds"], r["mib_s"], ratio,
            "ok (%d)" % r["verified_copies"] if r["sha256_ok"] else "FAILED"))
    return "\n".join(lines)


def parse_args(argv: Optional[Sequence[str]] = None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0])
    ap.add_argument("--size-mib", type=float, default=1024, help="file size (default 1024)")
    ap.add_argument("--repeat", type=int, default=3, help="runs of each command (median)")
    ap.add_argument("--json", default="bench_transfer.json", help="results file")
    ap.add_argument("--keep", action="store_true", help="keep the temporary directory")
    args = ap.parse_args(argv)
    if args.size_mib <= 0 or args.repeat < 1:
        ap.error("--size-mib must be > 0 and --repeat >= 1")
    return args


def main(argv: Optional[Sequence[str]] = None) -> int:
    args = parse_args(argv)
    exit_on_sigterm()
    started = time.monotonic()
    bench = TransferBench(args)
    results: Dict[str, Any] = {
        "benchmark": "bench_transfer",
        "size_mib": args.size_mib,
        "repeat": args.repeat,
        "started": time.strftime("%Y-%m-%d %H:%M:%S"),
        "machine": machine(),
        "loadavg_1min_before": round(os.getloadavg()[0], 2),
    }
    results["machine"]["workdir"] = bench.workdir
    results["machine"]["workdir_fs"] = subprocess.run(
        ["stat", "-f", "-c", "%T", bench.workdir], capture_output=True, text=True,
        timeout=10).stdout.strip()
    try:
        say("bringing up platform and sshd (workdir %s)" % bench.workdir)
        bench.start()
        results["machine"].update(bench.ciphers())
        results["platform_overwrite_allowed"] = bench.overwrite
        for i in range(args.repeat):
            say("== round %d/%d" % (i + 1, args.repeat))
            bench.one_round()
    except (IntegrityError, CommandError) as exc:
        say("bench_transfer: FAILED: %s" % exc)
        return 1
    except KeyboardInterrupt:
        say("bench_transfer: interrupted")
        return 130
    finally:
        say("tearing down")
        bench.close()
    results["rows"] = bench.results()
    results["sha256_all_ok"] = all(r["sha256_ok"] for r in results["rows"].values())
    results["loadavg_1min_after"] = round(os.getloadavg()[0], 2)
    results["total_seconds"] = round(time.monotonic() - started, 1)
    with open(args.json, "w") as f:
        json.dump(results, f, indent=2, sort_keys=True)
    say("")
    say("machine: %s" % ", ".join("%s=%s" % kv for kv in sorted(results["machine"].items())))
    say(table(args.size_mib, args.repeat, results["rows"]))
    say("\nJSON written to %s (%.0f s in all)" % (args.json, results["total_seconds"]))
    return 0 if results["sha256_all_ok"] else 1


if __name__ == "__main__":
    sys.exit(main())
