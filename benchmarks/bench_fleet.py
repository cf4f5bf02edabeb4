"""Fleet load on one private TLS RabbitMQ node: N simulated devices in one process.

Each simulated device is what the agent is to the broker, without tunnels: its own TLS
AMQP connection (``AmqpLink``, the agent's class) with its confined device login, the
agent's per-connection command queue (``agent.command_queue.declare_command_queue``), a
signed ``key`` announcement and ``alive`` messages (real ed25519 signatures), and an
answer to every request it gets. The operator side is the real console code
(``ConsoleControl``: status queue, TOFU pins, presence probes).

Measured:
- broker memory per connected device (RSS of the node's processes, before/after);
- ``devices`` time with N devices (drain N keys + N alives, verify, probe N queues);
- alive messages per second the console's status-queue handling keeps up with;
- request round trip (mandatory publish → device reply) at that load, p50/p95.

    python benchmarks/bench_fleet.py [N] [alives_per_device]

Starts its own node (demo/rabbit.py), stops it afterwards; loopback only.
"""

from gevent import monkey

monkey.patch_all()

# ruff: noqa: E402
import json
import os
import secrets
import statistics
import sys
import tempfile
import time
from typing import Any, Dict, List

import gevent
from gevent.event import AsyncResult

from remote_gevent.agent.command_queue import declare_command_queue
from remote_gevent.common.amqplink import AmqpLink
from remote_gevent.common.broker_topology import EXCHANGE_DOWN, EXCHANGE_REPLY, EXCHANGE_UP
from remote_gevent.console import config as cconfig
from remote_gevent.console.control import ConsoleControl
from remote_gevent.crypto.identity import IdentityKey
from remote_gevent.demo.pki import CertificateAuthority
from remote_gevent.demo.rabbit import RabbitNode
from remote_gevent.wire import protocol

VHOST = "fleet"
SID = "fr04"
CONNECT_BATCH = 50


def node_rss(node: RabbitNode) -> int:
    """Resident bytes of every process in the node's process group."""
    assert node._proc is not None
    pgid, total = node._proc.pid, 0
    for pid in filter(str.isdigit, os.listdir("/proc")):
        try:
            with open("/proc/%s/stat" % pid) as f:
                fields = f.read().rsplit(")", 1)[-1].split()
            if fields[2] != str(pgid):
                continue
            with open("/proc/%s/status" % pid) as f:
                for line in f:
                    if line.startswith("VmRSS:"):
                        total += int(line.split()[1]) * 1024
        except (OSError, IndexError, ValueError):
            continue
    return total


class SimDevice:
    """One simulated agent on its own AMQP connection."""

    def __init__(self, ident: str, token: str, url: str, ca_file: str) -> None:
        self.ident = ident
        self.topic = "remote.%s.%s" % (SID, ident)
        self.key = IdentityKey.generate()
        self.seq = 0
        self.link = AmqpLink([url], ident, token, ca_file=ca_file, connect_timeout=30,
                             reconnect_max_delay=10, name=ident, prefetch=10)
        self.greenlet = gevent.spawn(self.link.run, self._setup)

    def _setup(self, link: AmqpLink) -> None:
        queue = declare_command_queue(link, self.topic)
        link.consume(queue, self._on_request)
        link.publish(EXCHANGE_UP, self.topic + ".key",
                     protocol.make_key_announcement(self.key, self.ident, SID))
        self.alive("started")

    def _on_request(self, message: Any) -> None:
        self.link.publish(EXCHANGE_REPLY, message.properties["reply_to"], b"pong",
                          correlation_id=message.properties.get("correlation_id"),
                          delivery_mode=1, expiration=60000)
        self.link.ack(message)

    def alive(self, event: str = "periodic") -> None:
        self.seq += 1
        raw = protocol.make_alive(self.key, self.ident, SID, "bench", 1.0, 0, 0, 10,
                                  self.seq, event=event)
        self.link.publish(EXCHANGE_UP, self.topic + ".alive", raw, delivery_mode=1,
                          expiration=1200000)

    def stop(self) -> None:
        self.link.stop()


def rtt_at_load(node: RabbitNode, user: str, password: str, ca_file: str,
                devices: List[SimDevice], rounds: int, load_per_s: float) -> Dict[str, float]:
    """Request round trips to random devices while devices send ``load_per_s`` alives."""
    waiting: Dict[str, AsyncResult] = {}
    reply: Dict[str, str] = {}

    def setup(link: AmqpLink) -> None:
        reply["q"] = link.declare_queue("", durable=False, exclusive=True, auto_delete=True)
        link.bind(reply["q"], EXCHANGE_REPLY, reply["q"])
        link.consume(reply["q"], on_reply, exclusive=True)

    def on_reply(message: Any) -> None:
        op.ack(message)
        w = waiting.pop(message.properties.get("correlation_id"), None)
        if w is not None:
            w.set(time.perf_counter())

    op = AmqpLink([node.amqps_url(VHOST)], user, password, ca_file=ca_file, name="bench-op")
    g = gevent.spawn(op.run, setup)
    op.wait_connected(30)
    stop_load = gevent.event.Event()

    def load() -> None:
        interval = 1.0 / load_per_s
        i = 0
        while not stop_load.is_set():
            devices[i % len(devices)].alive()
            i += 1
            gevent.sleep(interval)

    loader = gevent.spawn(load)
    times = []
    try:
        for i in range(rounds):
            dev = devices[secrets.randbelow(len(devices))]
            cid = "r%d" % i
            waiting[cid] = AsyncResult()
            t0 = time.perf_counter()
            op.publish(EXCHANGE_DOWN, dev.topic + ".status", b"ping", reply_to=reply["q"],
                       correlation_id=cid, delivery_mode=1, expiration=60000,
                       mandatory=True)
            t1 = waiting[cid].get(timeout=30) if cid in waiting else time.perf_counter()
            times.append((t1 - t0) * 1000)
            gevent.sleep(0.01)
    finally:
        stop_load.set()
        loader.join(5)
        op.stop()
        g.join(5)
    times.sort()
    return {"p50_ms": statistics.median(times),
            "p95_ms": times[int(0.95 * (len(times) - 1))]}


def console_cfg(tmp: str, node: RabbitNode, user: str, password: str, ca_file: str) -> Any:
    path = os.path.join(tmp, "console.yaml")
    with open(path, "w") as fh:
        json.dump({"user": user, "password": password, "server_id": SID,
                   "amqp": {"urls": [node.amqps_url(VHOST)], "ca_file": ca_file},
                   "operator_key": os.path.join(tmp, "op_key"),
                   "known_devices": os.path.join(tmp, "known_devices"),
                   "state_file": os.path.join(tmp, "state.json"),
                   "status_queue_max_length": 1000000}, fh)
    return cconfig.load(path)


def drain(cfg: Any, expected: int) -> Dict[str, float]:
    """One console run that drains the status queue (and probes presence): its total
    time, and the handling rate from its start to the last message handled."""
    t0, m0 = time.perf_counter(), time.monotonic()
    with ConsoleControl(cfg, consume_status=True) as control:
        control.sync_status(idle=1.0, limit=600.0)
        handled = control.status_handled  # also those delivered during start()
        busy = max(control._last_status - m0, 1e-6)
        online = sum(1 for e in control.states.devices.values()
                     if e.get("presence") == "connected")
    return {"seconds": time.perf_counter() - t0, "handled": handled, "online": online,
            "expected": expected, "rate": handled / busy}


def run(n: int, alives_per_device: int) -> Dict[str, Any]:
    tmp = tempfile.mkdtemp(prefix="rg-bench-fleet-")
    ca = CertificateAuthority(os.path.join(tmp, "pki"))
    cert = ca.issue("broker", ["127.0.0.1", "localhost"])
    node = RabbitNode(os.path.join(tmp, "node"), ca_file=ca.cert_file,
                      cert_file=cert.cert_file, key_file=cert.key_file)
    out: Dict[str, Any] = {"devices": n}
    devices: List[SimDevice] = []
    node.start()
    try:
        node.declare_platform(VHOST)
        creds = [("fleet-%05d" % i, secrets.token_urlsafe(12)) for i in range(n)]
        node.add_devices(VHOST, [(ident, token, SID) for ident, token in creds])
        user, password = "fleet-op", secrets.token_urlsafe(12)
        node.add_operator(VHOST, user, password)
        cfg = console_cfg(tmp, node, user, password, ca.cert_file)
        with ConsoleControl(cfg, consume_status=True):
            pass  # the status queue exists from now on
        gevent.sleep(2.0)
        rss0 = node_rss(node)
        t0 = time.perf_counter()
        for i in range(0, n, CONNECT_BATCH):
            batch = [SimDevice(ident, token, node.amqps_url(VHOST), ca.cert_file)
                     for ident, token in creds[i:i + CONNECT_BATCH]]
            devices.extend(batch)
            for d in batch:
                d.link.wait_connected(60)
        out["connect_seconds"] = round(time.perf_counter() - t0, 1)
        gevent.sleep(3.0)
        rss1 = node_rss(node)
        out["broker_rss_mb_before"] = round(rss0 / 2 ** 20, 1)
        out["broker_rss_mb_after"] = round(rss1 / 2 ** 20, 1)
        out["broker_kb_per_device"] = round((rss1 - rss0) / 1024 / n, 1)
        d1 = drain(cfg, 2 * n)  # `devices`: N keys + N started alives, N presence probes
        out["devices_cmd_first_seconds"] = round(d1["seconds"], 2)  # pins N new keys
        out["devices_cmd_handled"] = d1["handled"]
        out["devices_online_by_probe"] = d1["online"]
        for _ in range(alives_per_device):
            for d in devices:
                d.alive()
        gevent.sleep(1.0)
        d2 = drain(cfg, n * alives_per_device)
        out["alive_drained"] = d2["handled"]
        # The same command in steady state: keys pinned, N probes, N x k alives to handle.
        out["devices_cmd_steady_seconds"] = round(d2["seconds"], 2)
        out["alive_per_s_console"] = round(d2["rate"])
        out["rtt_at_load"] = {k: round(v, 2) for k, v in rtt_at_load(
            node, user, password, ca.cert_file, devices, 200, load_per_s=200).items()}
        out["rtt_load_alive_per_s"] = 200
    finally:
        for d in devices:
            d.stop()
        gevent.sleep(1.5)
        node.stop()
    return out


def main() -> None:
    n = int(sys.argv[1]) if len(sys.argv) > 1 else 1000
    k = int(sys.argv[2]) if len(sys.argv) > 2 else 5
    print(json.dumps(run(n, k), indent=1))


if __name__ == "__main__":
    main()
