"""Running the operator's programs against a demo platform in the e2e tests
(test_e2e_transfer, test_console_ux_b_e2e): the console CLI, and stock OpenSSH clients
(``sftp``, ``scp``) reaching the agent's ``@sftp`` through ``console stdio``."""

from __future__ import annotations

import contextlib
import shlex
import subprocess
import sys
from typing import Iterator, List, Optional


def console(p, *args: str, config: Optional[str] = None, cwd: Optional[str] = None,
            timeout: float = 300) -> subprocess.CompletedProcess:
    """``remote-gevent-console ARGS`` of platform ``p`` to its end (``config``: another
    console config file in place of the platform's)."""
    argv = p.console_argv(*args)
    if config is not None:
        argv[argv.index(p.console_config)] = config
    return subprocess.run(argv, capture_output=True, text=True, timeout=timeout,
                          stdin=subprocess.DEVNULL, cwd=cwd)


def sftp_proxy_command(p) -> str:
    """The ``ProxyCommand`` that reaches the agent's ``@sftp`` (``%n``: the host name)."""
    return " ".join(shlex.quote(a) for a in p.console_argv("stdio", "%n", "@sftp"))


def openssh_options(p, tmp_path) -> List[str]:
    """Options for ``sftp``/``scp`` to the device through :func:`sftp_proxy_command`,
    unattended, with a known_hosts file of the test's own."""
    return ["-F", "/dev/null", "-o", "BatchMode=yes", "-o", "StrictHostKeyChecking=no",
            "-o", "UserKnownHostsFile=%s" % (tmp_path / "known_hosts"),
            "-o", "ProxyCommand=%s" % sftp_proxy_command(p)]


def sftp_batch(p, tmp_path, lines: List[str], timeout: float = 120
               ) -> subprocess.CompletedProcess:
    """Stock ``sftp -b`` with ``lines`` against the platform's device."""
    batch = tmp_path / "batch"
    batch.write_text("\n".join(lines) + "\n")
    return subprocess.run(["sftp", "-b", str(batch)] + openssh_options(p, tmp_path)
                          + ["x@%s" % p.ident],
                          capture_output=True, text=True, timeout=timeout,
                          stdin=subprocess.DEVNULL)


def status_queue_consumers(p) -> int:
    """Consumers on the operator's status queue of platform ``p`` (0 while it does not
    exist): a ``watch`` consuming it collects every announcement from then on."""
    from amqp.exceptions import NotFound

    from remote_gevent.common.amqplink import AmqpLink, LinkError
    from remote_gevent.console import config as console_config

    name = console_config.load(p.console_config).status_queue_name
    link = AmqpLink([p.broker_url], p.node.admin_user, p.node.admin_password,
                    ca_file=p.broker_ca_file, connect_timeout=5.0, heartbeat=0, prefetch=0)
    try:
        link.connect()
    except LinkError:
        return 0
    try:
        try:
            return int(link.channel.queue_declare(name, passive=True).consumer_count)
        except NotFound:
            return 0
    finally:
        link.close()


@contextlib.contextmanager
def script_server(source: str) -> Iterator[int]:
    """Run ``source`` (a Python script that prints its listening port, then serves) in
    its own process: a device-side service free of the suite's gevent patching. Yields
    the port; the process is killed at the end."""
    proc = subprocess.Popen([sys.executable, "-c", source], stdout=subprocess.PIPE,
                            stdin=subprocess.DEVNULL)
    try:
        assert proc.stdout is not None
        yield int(proc.stdout.readline())
    finally:
        proc.kill()
        proc.wait(10)
        if proc.stdout is not None:
            proc.stdout.close()
