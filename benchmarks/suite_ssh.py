"""OpenSSH side of the comparison: throw-away sshd servers and the forwarding clients.

Same approach as ``tests/test_e2e.py``: an ``sshd`` on a free loopback port with a
temporary host key and one authorized client key, no PAM, no passwords. Two of them:

* ``target`` — the one-hop ``ssh -L`` comparison and the fresh ``ssh … true`` timing;
* ``bastion`` — the users' alternative to remote-gevent: the device keeps
  ``ssh -N -R BPORT:127.0.0.1:SERVICE bastion`` up, the operator runs
  ``ssh -N -L LPORT:127.0.0.1:BPORT bastion``; bytes go operator ssh → bastion sshd →
  device ssh → service (two SSH encryptions, two sshd/ssh hops).

Each forwarding client takes its own ``ssh`` options, so that one server serves paths
with OpenSSH's default cipher (recorded by ``negotiated_cipher``) and with ``-c CIPHER``
(``benchmarks/suite_compare.py`` probes which cipher is fastest on the machine).
"""

from __future__ import annotations

import os
import subprocess
from typing import List, Sequence, Tuple

from benchmarks.suite_common import Procs, free_port, wait_port

SSHD = "/usr/sbin/sshd"


def make_client_key(directory: str) -> str:
    path = os.path.join(directory, "client_ed25519")
    if not os.path.exists(path):
        subprocess.run(["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-f", path],
                       check=True, timeout=30)
    return path


class Sshd:
    """A real OpenSSH server on 127.0.0.1 accepting ``client_key`` (root allowed)."""

    def __init__(self, procs: Procs, directory: str, client_key: str, name: str) -> None:
        self.dir = os.path.join(directory, name)
        os.makedirs(self.dir, exist_ok=True)
        self.name = name
        self.port = free_port()
        self.client_key = client_key
        self.known_hosts = os.path.join(self.dir, "known_hosts")
        host_key = os.path.join(self.dir, "host_ed25519")
        subprocess.run(["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-f", host_key],
                       check=True, timeout=30)
        authorized = os.path.join(self.dir, "authorized_keys")
        with open(client_key + ".pub") as src, open(authorized, "w") as dst:
            dst.write(src.read())
        config = os.path.join(self.dir, "sshd_config")
        with open(config, "w") as f:
            f.write("\n".join([
                "HostKey %s" % host_key,
                "AuthorizedKeysFile %s" % authorized,
                "PidFile %s" % os.path.join(self.dir, "sshd.pid"),
                "PermitRootLogin prohibit-password",
                "PubkeyAuthentication yes",
                "PasswordAuthentication no",
                "KbdInteractiveAuthentication no",
                "UsePAM no",
                "StrictModes no",
                "AllowTcpForwarding yes",
                "GatewayPorts no",
                "MaxStartups 200:30:400",
                "MaxSessions 100",
                "LogLevel ERROR",
                "",
            ]))
        if os.geteuid() == 0:
            os.makedirs("/run/sshd", mode=0o755, exist_ok=True)  # privilege separation dir
        self.proc = procs.start([SSHD, "-D", "-e", "-f", config, "-p", str(self.port),
                                 "-o", "ListenAddress=127.0.0.1"])
        wait_port(self.port, self.proc, what="sshd %s" % name)

    def ssh_argv(self, options: Sequence[str] = (), command: Sequence[str] = ()) -> List[str]:
        """Stock ``ssh [options] root@127.0.0.1 [command]`` to this server."""
        user = "root" if os.geteuid() == 0 else os.environ.get("USER", "root")
        return ["ssh", "-F", "/dev/null", "-i", self.client_key, "-p", str(self.port),
                "-o", "BatchMode=yes", "-o", "IdentitiesOnly=yes",
                "-o", "StrictHostKeyChecking=no",
                "-o", "UserKnownHostsFile=%s" % self.known_hosts, "-o", "LogLevel=ERROR",
                "-o", "ExitOnForwardFailure=yes", "-o", "ServerAliveInterval=30",
                ] + list(options) + ["%s@127.0.0.1" % user] + list(command)

    def negotiated_cipher(self) -> str:
        from benchmarks.suite_common import ssh_cipher

        argv = self.ssh_argv(command=["true"])
        argv[argv.index("LogLevel=ERROR")] = "LogLevel=DEBUG"
        done = subprocess.run(argv, capture_output=True, timeout=30)
        return ssh_cipher(done.stderr.decode("utf-8", "replace"))


def local_forward(procs: Procs, server: Sshd, target_port: int,
                  options: Sequence[str] = ()) -> int:
    """``ssh -N -L LPORT:127.0.0.1:target_port`` to ``server``; returns LPORT once usable."""
    return local_forward_proc(procs, server, target_port, options)[0]


def local_forward_proc(procs: Procs, server: Sshd, target_port: int,
                       options: Sequence[str] = ()) -> Tuple[int, subprocess.Popen]:
    """Like :func:`local_forward`, and the ``ssh`` client process (for its CPU time)."""
    lport = free_port()
    proc = procs.start(server.ssh_argv(list(options) + [
        "-N", "-L", "%d:127.0.0.1:%d" % (lport, target_port)]))
    wait_port(lport, proc, what="ssh -L")
    return lport, proc


def reverse_path(procs: Procs, bastion: Sshd, service_port: int,
                 options: Sequence[str] = ()) -> int:
    """Device ``ssh -R`` to the bastion, operator ``ssh -L`` via it; the operator's port."""
    return reverse_path_procs(procs, bastion, service_port, options)[0]


def reverse_path_procs(procs: Procs, bastion: Sshd, service_port: int,
                       options: Sequence[str] = ()
                       ) -> Tuple[int, subprocess.Popen, subprocess.Popen]:
    """Like :func:`reverse_path`, and the device's ``ssh -R`` and the operator's ``ssh -L``
    processes (``options``, e.g. ``-c CIPHER``, apply to both legs)."""
    bport = free_port()
    device = procs.start(bastion.ssh_argv(list(options) + [
        "-N", "-R", "%d:127.0.0.1:%d" % (bport, service_port)]))
    wait_port(bport, device, what="ssh -R on the bastion")
    lport, operator = local_forward_proc(procs, bastion, bport, options)
    return lport, device, operator

