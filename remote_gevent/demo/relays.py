"""The demo's relay processes: one by default, a pool with ``scripts/demo --relays N``
(issue 13). Each relay of a pool listens on a port of its own and logs to a file of its
own (``relay.log``, ``relay2.log`` …). Two ways to publish a pool (docs/operations.md,
"Relays"):

- ``routed`` (the default for N > 1): the relays route by session id (``pool_peers``,
  relay/routing.py) behind ONE address, a round-robin forwarder of ours
  (:mod:`remote_gevent.demo.roundrobin`, log ``balancer.log``), as an operator deploys
  a pool behind haproxy or DNS; agent and console know that one address only.
- ``listed``: no routing; the agent's ``remote.relays`` and the console's ``relay:``
  list every relay's address, so sessions spread over the pool, avoid a dead relay and
  resume on another one.
"""

from __future__ import annotations

import os
import secrets
import signal
import subprocess
import sys
import time
from typing import Any, Callable, List, Optional, Sequence, Tuple

import yaml

from remote_gevent.demo.processes import _tail, _terminate, entry_argv, port_open

POLL = 0.1
MODES = ("routed", "listed")


def relay_log(directory: str, index: int) -> str:
    """``relay.log`` for the first relay (as before pools), ``relayN.log`` for the Nth."""
    return os.path.join(directory, "relay.log" if index == 0 else "relay%d.log" % (index + 1))


def spawn_relay(spawn: Callable[[List[str], str], subprocess.Popen], port: int, cert: Any,
                log_path: str, timeout: float, error: Callable[[str], Exception],
                config: Optional[str] = None) -> subprocess.Popen:
    """Start ``remote-gevent-relay`` on 127.0.0.1:``port`` (with the YAML ``config``, if
    any: a routed pool's settings) and wait until it listens."""
    argv = entry_argv("remote-gevent-relay", "remote_gevent.relay.cli") + [
        "--listen", "127.0.0.1:%d" % port, "--cert", cert[0], "--key", cert[1]]
    if config is not None:
        argv += ["--config", config]
    return _wait_listening(spawn(argv, log_path), "the relay", port, log_path, timeout, error)


def spawn_balancer(spawn: Callable[[List[str], str], subprocess.Popen], port: int,
                   backends: Sequence[int], log_path: str, timeout: float,
                   error: Callable[[str], Exception]) -> subprocess.Popen:
    """The round-robin forwarder on 127.0.0.1:``port`` over the relays' ``backends``."""
    argv = [sys.executable, "-m", "remote_gevent.demo.roundrobin",
            "--listen", "127.0.0.1:%d" % port] + ["127.0.0.1:%d" % b for b in backends]
    return _wait_listening(spawn(argv, log_path), "the round-robin forwarder", port,
                           log_path, timeout, error)


def write_pool_configs(directory: str, ports: Sequence[int], ca_file: str) -> List[str]:
    """One YAML config per relay of a routed pool (``relay-pool-N.yaml``): every relay's
    direct address as ``pool_peers``, its own as ``pool_self``, a shared secret (new at
    every start, mode 0600) and the demo CA to verify the owner a leg is forwarded to."""
    secret = os.path.join(directory, "relay-pool.secret")
    fd = os.open(secret, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w") as fh:
        fh.write(secrets.token_hex(24) + "\n")
    peers = ["127.0.0.1:%d" % port for port in ports]
    paths = []
    for i, peer in enumerate(peers):
        path = os.path.join(directory, "relay-pool-%d.yaml" % (i + 1))
        with open(path, "w") as fh:
            yaml.safe_dump({"pool_peers": peers, "pool_self": peer,
                            "pool_secret_file": secret, "pool_ca_file": ca_file}, fh)
        paths.append(path)
    return paths


def _wait_listening(proc: subprocess.Popen, what: str, port: int, log_path: str,
                    timeout: float, error: Callable[[str], Exception]) -> subprocess.Popen:
    deadline = time.monotonic() + timeout
    while not port_open("127.0.0.1", port):
        if proc.poll() is not None:
            raise error("%s exited with %s; see %s:\n%s" % (
                what, proc.returncode, log_path, _tail(log_path)))
        if time.monotonic() > deadline:
            raise error("%s did not listen on 127.0.0.1:%d within %.0f s; see %s"
                        % (what, port, timeout, log_path))
        time.sleep(POLL)
    return proc


class RelayPool:
    """The pool part of :class:`~remote_gevent.demo.platform.DemoPlatform`: what agent
    and console are told, the relays after the first, and the forwarder when routed."""

    dir: str
    relay_port: Optional[int]
    relay_cert: Optional[Tuple[str, str]]
    relay_count: int
    routed: bool
    pool_ports: List[int]
    pool_configs: List[str]
    extra_relay_ports: List[int]
    extra_relay_procs: List[subprocess.Popen]
    balancer_proc: Optional[subprocess.Popen]

    def _spawn(self, argv: Sequence[str], log_path: str) -> subprocess.Popen:
        raise NotImplementedError  # the platform's

    @property
    def relay_address(self) -> str:
        raise NotImplementedError  # the platform's

    @property
    def relay_addresses(self) -> Any:
        """The ``relay:`` / ``remote.relays`` value: one address (a single relay, or the
        forwarder of a routed pool), or the listed pool's addresses."""
        if self.relay_count == 1 or self.routed:
            return self.relay_address
        return [self.relay_address] + ["127.0.0.1:%d" % p for p in self.extra_relay_ports]

    def start_extra_relays(self, timeout: float, error: Callable[[str], Exception]) -> None:
        """The other relays of a pool (``relays`` > 1), each on its port, with its log;
        routed, then the round-robin forwarder on :attr:`relay_port` in front of them."""
        assert self.relay_cert is not None and self.relay_port is not None
        configs: List[Optional[str]] = list(self.pool_configs[1:]) or [None] * len(
            self.extra_relay_ports)
        self.extra_relay_procs = [
            spawn_relay(self._spawn, port, self.relay_cert, relay_log(self.dir, i + 1),
                        timeout, error, config)
            for i, (port, config) in enumerate(zip(self.extra_relay_ports, configs))]
        if self.routed:
            self.balancer_proc = spawn_balancer(
                self._spawn, self.relay_port, self.pool_ports,
                os.path.join(self.dir, "balancer.log"), timeout, error)

    def stop_pool(self, timeout: float) -> None:
        """The forwarder, then the relays after the first (each bounded, then killed)."""
        procs: List[Optional[subprocess.Popen]] = [self.balancer_proc]
        procs += self.extra_relay_procs
        self.extra_relay_procs, self.balancer_proc = [], None
        for proc in procs:
            _terminate(proc, signal.SIGTERM, timeout)
