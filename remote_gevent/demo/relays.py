"""The demo's relay processes: one by default, a pool with ``scripts/demo --relays N``
(issue 13). Each relay of a pool listens on a port of its own and logs to a file of its
own (``relay.log``, ``relay2.log`` …); the agent's ``remote.relays`` and the console's
``relay:`` list them all, so sessions spread over the pool, avoid a dead relay and
resume on another one (docs/operations.md, "Relays")."""

from __future__ import annotations

import os
import subprocess
import time
from typing import Any, Callable, List

from remote_gevent.demo.processes import _tail, entry_argv, port_open

POLL = 0.1


def relay_log(directory: str, index: int) -> str:
    """``relay.log`` for the first relay (as before pools), ``relayN.log`` for the Nth."""
    return os.path.join(directory, "relay.log" if index == 0 else "relay%d.log" % (index + 1))


def spawn_relay(spawn: Callable[[List[str], str], subprocess.Popen], port: int, cert: Any,
                log_path: str, timeout: float, error: Callable[[str], Exception]
                ) -> subprocess.Popen:
    """Start ``remote-gevent-relay`` on 127.0.0.1:``port`` and wait until it listens."""
    argv = entry_argv("remote-gevent-relay", "remote_gevent.relay.cli") + [
        "--listen", "127.0.0.1:%d" % port, "--cert", cert[0], "--key", cert[1]]
    proc = spawn(argv, log_path)
    deadline = time.monotonic() + timeout
    while not port_open("127.0.0.1", port):
        if proc.poll() is not None:
            raise error("the relay exited with %s; see %s:\n%s" % (
                proc.returncode, log_path, _tail(log_path)))
        if time.monotonic() > deadline:
            raise error("the relay did not listen on 127.0.0.1:%d within %.0f s; see %s"
                        % (port, timeout, log_path))
        time.sleep(POLL)
    return proc
