"""Median request→reply round trip through a private RabbitMQ node (TLS and plain loopback).

Operator link publishes on ``remote.down`` (``reply_to`` + ``correlation_id``), a device
link on another connection answers on the default exchange, exactly like a session
request. Starts its own private node (demo/rabbit.py) and stops it afterwards.

    python benchmarks/bench_amqp_rtt.py [rounds]
"""

from gevent import monkey

monkey.patch_all()

# ruff: noqa: E402
import os
import statistics
import sys
import tempfile
import time

import gevent
from gevent.event import AsyncResult

from remote_gevent.common.amqplink import AmqpLink
from remote_gevent.demo.pki import CertificateAuthority
from remote_gevent.demo.rabbit import RabbitNode

VHOST = "bench"
TOPIC = "remote.fr04.bench-dev"


def run_once(url, ca_file, rounds):
    links = {}

    def device_setup(link):
        q = link.declare_queue(TOPIC + ".cmd", arguments={"x-expires": 86400000,
                                                          "x-message-ttl": 120000})
        link.bind(q, "remote.down", TOPIC + ".session")
        link.consume(q, on_request)

    def on_request(msg):
        dev = links["dev"]
        dev.publish("", msg.properties["reply_to"], msg.body, delivery_mode=1,
                    correlation_id=msg.properties["correlation_id"], expiration=60000)
        dev.ack(msg)

    pending = {}
    reply = {}

    def op_setup(link):
        reply["queue"] = link.declare_queue("", durable=False, exclusive=True,
                                            auto_delete=True)
        link.consume(reply["queue"], on_reply, exclusive=True)

    def on_reply(msg):
        links["op"].ack(msg)
        waiter = pending.pop(msg.properties["correlation_id"], None)
        if waiter is not None:
            waiter.set(msg.body)

    links["dev"] = AmqpLink([url], "bench-dev", "bench-token", ca_file=ca_file)
    links["op"] = AmqpLink([url], "bench-op", "bench-pw", ca_file=ca_file)
    greenlets = [gevent.spawn(links["dev"].run, device_setup),
                 gevent.spawn(links["op"].run, op_setup)]
    for link in links.values():
        if not link.wait_connected(10):
            raise SystemExit("cannot connect: %s" % link.last_error)
    samples = []
    for n in range(rounds + 50):
        cid = "%d-%s" % (n, os.urandom(4).hex())
        waiter = AsyncResult()
        pending[cid] = waiter
        t0 = time.perf_counter()
        links["op"].publish("remote.down", TOPIC + ".session", b'{"n": %d}' % n,
                            correlation_id=cid, reply_to=reply["queue"], delivery_mode=1,
                            expiration=60000)
        waiter.get(timeout=10)
        if n >= 50:  # warm-up excluded
            samples.append(time.perf_counter() - t0)
    for link in links.values():
        link.stop()
    gevent.joinall(greenlets, timeout=5)
    samples.sort()
    return statistics.median(samples), samples[int(len(samples) * 0.99) - 1]


def main():
    rounds = int(sys.argv[1]) if len(sys.argv) > 1 else 1000
    base = tempfile.mkdtemp(prefix="rg-bench-")
    ca = CertificateAuthority(os.path.join(base, "ca"))
    broker = ca.issue("broker", ["localhost", "127.0.0.1"])
    node = RabbitNode(os.path.join(base, "node"), amqp_port=0, ca_file=ca.cert_file,
                      cert_file=broker.cert_file, key_file=broker.key_file)
    node.start()
    try:
        node.declare_platform(VHOST)
        node.add_device(VHOST, "bench-dev", "bench-token")
        node.add_operator(VHOST, "bench-op", "bench-pw")
        for label, url in (("amqps (TLS)", node.amqps_url(VHOST)),
                           ("amqp (plain, loopback)", node.amqp_url(VHOST))):
            median, p99 = run_once(url, ca.cert_file, rounds)
            print("request->reply %-24s median %.3f ms  p99 %.3f ms  (%d round trips)"
                  % (label, median * 1000, p99 * 1000, rounds))
    finally:
        node.stop()


if __name__ == "__main__":
    main()
