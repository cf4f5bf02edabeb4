"""Relays for the tests (one place for what test_cluster, test_relay_pool and
test_relay_pool_failover need): an in-process relay, a relay process (which a test can
SIGKILL by pid and whose Prometheus metrics it can scrape), and Debian's haproxy
publishing each relay on a port of its own (``send-proxy-v2``)."""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import time
import urllib.request
from typing import Dict, List, Optional, Sequence

import yaml

from remote_gevent.demo.processes import entry_argv
from remote_gevent.demo.rabbit import free_port
from remote_gevent.relay import server as relay_mod
from remote_gevent.relay.settings import RelaySettings

WAIT = 20.0
HAPROXY = shutil.which("haproxy") or ("/usr/sbin/haproxy" if os.path.exists(
    "/usr/sbin/haproxy") else None)


def start_relay(cert, proxy_protocol: bool = False, pairing_timeout: float = 10.0,
                **settings) -> relay_mod.Relay:
    """An in-process relay on 127.0.0.1 (a free port), started; ``cert`` from the test
    CA (``ca.issue(name, ["127.0.0.1"])``). Stop it with ``relay.stop(grace=0)``."""
    relay = relay_mod.Relay(RelaySettings(
        host="127.0.0.1", port=0, cert_file=cert.cert_file, key_file=cert.key_file,
        proxy_protocol=proxy_protocol, pairing_timeout=pairing_timeout, **settings))
    relay.start()
    return relay


def _wait_port(port: int, proc: subprocess.Popen, what: str, log: str = "") -> None:
    deadline = time.monotonic() + WAIT
    while True:
        try:
            socket.create_connection(("127.0.0.1", port), timeout=1).close()
            return
        except OSError:
            if proc.poll() is not None:
                raise AssertionError("%s exited with %s%s" % (what, proc.returncode, log)) from None
            assert time.monotonic() < deadline, "%s did not listen on %d" % (what, port)
            time.sleep(0.05)


class RelayProcess:
    """``remote-gevent-relay`` as a process of its own, with a metrics listener."""

    def __init__(self, directory: str, name: str, cert_file: str, key_file: str,
                 proxy_protocol: bool = False, port: Optional[int] = None,
                 extra: Optional[Dict[str, object]] = None) -> None:
        self.name = name
        self.port = port or free_port()
        self.metrics_port = free_port()
        self.log = os.path.join(directory, "%s.log" % name)
        config = os.path.join(directory, "%s.yaml" % name)
        doc = {"listen": "127.0.0.1:%d" % self.port, "cert": cert_file,
               "key": key_file, "proxy_protocol": proxy_protocol,
               "metrics_listen": "127.0.0.1:%d" % self.metrics_port}
        doc.update(extra or {})
        with open(config, "w") as fh:
            yaml.safe_dump(doc, fh)
        with open(self.log, "ab") as out:
            self.proc = subprocess.Popen(
                entry_argv("remote-gevent-relay", "remote_gevent.relay.cli")
                + ["--config", config], stdin=subprocess.DEVNULL, stdout=out,
                stderr=subprocess.STDOUT)
        _wait_port(self.port, self.proc, "relay %s" % name, " (see %s)" % self.log)
        _wait_port(self.metrics_port, self.proc, "relay %s metrics" % name)

    @property
    def pid(self) -> int:
        return self.proc.pid

    def metrics(self) -> Dict[str, float]:
        """``{sample name: value}`` of the relay's /metrics (prometheus_client's parser)."""
        from prometheus_client.parser import text_string_to_metric_families

        with urllib.request.urlopen("http://127.0.0.1:%d/metrics" % self.metrics_port,
                                    timeout=5) as resp:
            text = resp.read().decode("utf-8")
        return {s.name: s.value for f in text_string_to_metric_families(text)
                for s in f.samples if not s.labels}

    def kill(self) -> None:
        """SIGKILL, by pid: no drain, no goodbye (the relay's sockets just die)."""
        os.kill(self.proc.pid, signal.SIGKILL)
        self.proc.wait(10)

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(10)


class Balancer:
    """haproxy publishing each relay on its own port, with send-proxy-v2."""

    def __init__(self, directory: str, relay_ports: Sequence[int],
                 ports: Optional[List[int]] = None) -> None:
        assert HAPROXY is not None
        self.ports = ports or [free_port() for _ in relay_ports]
        lines = ["global", "    maxconn 500", "defaults", "    mode tcp",
                 "    timeout connect 5s", "    timeout client 60s", "    timeout server 60s"]
        for i, (front, back) in enumerate(zip(self.ports, relay_ports)):
            lines += ["listen relay%d" % i, "    bind 127.0.0.1:%d" % front,
                      "    server r%d 127.0.0.1:%d send-proxy-v2" % (i, back)]
        cfg = os.path.join(directory, "haproxy.cfg")
        with open(cfg, "w") as f:
            f.write("\n".join(lines) + "\n")
        self.proc = subprocess.Popen([HAPROXY, "-db", "-f", cfg],
                                     stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        for port in self.ports:
            _wait_port(port, self.proc, "haproxy")

    def stop(self) -> None:
        self.proc.terminate()
        self.proc.wait(10)


class RoundRobin:
    """haproxy publishing several relays behind ONE address, ``balance roundrobin``
    (optionally ``send-proxy-v2``)."""

    def __init__(self, directory: str, relay_ports: Sequence[int], port: Optional[int] = None,
                 send_proxy: bool = False) -> None:
        assert HAPROXY is not None
        self.port = port or free_port()
        lines = ["global", "    maxconn 2000", "defaults", "    mode tcp",
                 "    timeout connect 2s", "    timeout client 120s", "    timeout server 120s",
                 "    option redispatch", "    retries 3",
                 "listen pool", "    bind 127.0.0.1:%d" % self.port, "    balance roundrobin"]
        for i, back in enumerate(relay_ports):
            lines.append("    server r%d 127.0.0.1:%d%s" % (
                i, back, " send-proxy-v2" if send_proxy else ""))
        cfg = os.path.join(directory, "haproxy-rr.cfg")
        with open(cfg, "w") as f:
            f.write("\n".join(lines) + "\n")
        self.proc = subprocess.Popen([HAPROXY, "-db", "-f", cfg],
                                     stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        _wait_port(self.port, self.proc, "haproxy")

    def stop(self) -> None:
        self.proc.terminate()
        self.proc.wait(10)
