"""AmqpLink against a real private TLS RabbitMQ node (see conftest.py); bounded waits."""

from __future__ import annotations

import json
import logging
import os
import socket
import ssl
import statistics
import time

import gevent
import pytest
from amqp.exceptions import AccessRefused
from gevent.event import AsyncResult, Event
from gevent.server import StreamServer

from remote_gevent.common import amqplink
from remote_gevent.common.amqplink import (
    AmqpLink,
    LinkConfigError,
    LoginRefused,
    NotConnected,
    TLSVerifyError,
    parse_url,
)
from remote_gevent.demo.pki import CertificateAuthority

import poison

CMD_QUEUE_ARGS = {"x-expires": 86400000, "x-message-ttl": 120000, "x-max-length": 100,
                  "x-overflow": "reject-publish"}
WAIT = 30.0  # bound for anything that should take milliseconds (generous: a loaded CI box
#              sees TLS handshakes with the broker take seconds)


# ----------------------------------------------------------------------------- helpers
def device_setup(dev, callback, queue_suffix="cmd", bind=True):
    """The agent's topology: durable <topic>.cmd bound to its routing keys on remote.down."""
    def setup(link):
        link.declare_exchange("remote.down", passive=True)
        queue = link.declare_queue("%s.%s" % (dev.topic, queue_suffix), durable=True,
                                   arguments=CMD_QUEUE_ARGS if bind else None)
        if bind:
            for key in ("session", "close"):
                link.bind(queue, "remote.down", "%s.%s" % (dev.topic, key))
        link.consume(queue, callback)
    return setup


def start(link, setup):
    g = gevent.spawn(link.run, setup)
    assert link.wait_connected(WAIT), link.last_error
    return g


def stop(link, g):
    link.stop()
    g.join(5.0)
    assert g.dead, "link did not stop within 5 s"
    if g.exception is not None:
        raise g.exception


class Replier:
    """Operator side: a server-named reply queue, replies resolved by correlation id."""

    def __init__(self):
        self.queue = None
        self.pending = {}

    def setup(self, link):
        self.queue = link.declare_queue("", durable=False, exclusive=True, auto_delete=True)
        link.bind(self.queue, "remote.reply", self.queue)
        link.consume(self.queue, self.on_reply, exclusive=True)

    def on_reply(self, msg):
        self.link.ack(msg)
        waiter = self.pending.pop(msg.properties.get("correlation_id"), None)
        if waiter is not None:
            waiter.set(msg.body)


def echo_responder(link_holder):
    """Device side: answer each request to its reply_to with the same body."""
    def on_request(msg):
        link = link_holder[0]
        link.publish("remote.reply", msg.properties["reply_to"], msg.body,
                     correlation_id=msg.properties["correlation_id"], expiration=60000,
                     delivery_mode=1)
        link.ack(msg)
    return on_request


def forwarder(listen_host, target_port):
    """A plain TCP forwarder (so a client can reach the broker under another address)."""
    def handle(client, _addr):
        upstream = socket.create_connection(("127.0.0.1", target_port))

        def pipe(a, b):
            try:
                while True:
                    data = a.recv(65536)
                    if not data:
                        break
                    b.sendall(data)
            except OSError:
                pass
            finally:
                for s in (a, b):
                    try:
                        s.shutdown(socket.SHUT_RDWR)
                    except OSError:
                        pass
        gevent.joinall([gevent.spawn(pipe, client, upstream),
                        gevent.spawn(pipe, upstream, client)])
        upstream.close()

    server = StreamServer((listen_host, 0), handle)
    server.start()
    return server


def one_line(text):
    assert "\n" not in text, text
    return text


# ----------------------------------------------------------------------------- URL parsing
def test_parse_url_defaults_and_vhost_decoding():
    assert parse_url("amqps://broker.example") == ("amqps", "broker.example", 5671, "/")
    assert parse_url("amqps://broker.example:5671/") .vhost == "/"
    assert parse_url("amqps://b:1234/%2F").vhost == "/"
    assert parse_url("amqps://b/rg%2Ftest").vhost == "rg/test"
    assert parse_url("amqps://[::1]:5671/x").address == "[::1]:5671"
    assert str(parse_url("amqps://b/rg%2Ftest")) == "amqps://b:5671/rg%2Ftest"


def test_plain_amqp_only_to_loopback(caplog):
    with caplog.at_level(logging.WARNING):
        for url in ("amqp://127.0.0.1/", "amqp://127.3.4.5:5673/v", "amqp://localhost",
                    "amqp://[::1]/"):
            assert parse_url(url).port in (5672, 5673)
    assert "NOT encrypted" in caplog.text
    for url in ("amqp://10.0.0.1/", "amqp://broker.example.com/", "amqp://[2001:db8::1]/"):
        with pytest.raises(LinkConfigError) as err:
            parse_url(url)
        assert "only to loopback" in one_line(str(err.value))
    with pytest.raises(LinkConfigError, match="refusing plain amqp"):
        AmqpLink(["amqp://192.0.2.10:5672/"], "u", "p")


def test_bad_urls_and_missing_tls_files_are_config_errors(tmp_path):
    for url in ("http://b/", "amqps://user:secret@b/", "amqps:///", "amqps://b/?x=1"):
        with pytest.raises(LinkConfigError) as err:
            parse_url(url)
        assert "secret" not in str(err.value)
    with pytest.raises(LinkConfigError, match="no such file"):
        AmqpLink(["amqps://localhost/"], "u", "p", ca_file=str(tmp_path / "missing.pem"))
    with pytest.raises(LinkConfigError, match="no broker URL"):
        AmqpLink([], "u", "p")


# ----------------------------------------------------------------------------- TLS + login
def test_tls_connect_verifies_chain_and_host_name(rabbit, device):
    link = rabbit.link(device, heartbeat=7)
    link.connect()
    try:
        sock = link.connection.transport.sock
        assert isinstance(sock, ssl.SSLSocket)
        assert sock.context.check_hostname is True
        assert sock.context.verify_mode == ssl.CERT_REQUIRED
        assert sock.server_hostname == "127.0.0.1"
        assert sock.version() in ("TLSv1.2", "TLSv1.3")
        assert link.connection.heartbeat == 7  # negotiated: min(ours, broker's 60)
        names = rabbit.node.ctl("list_connections", "-p", rabbit.vhost, "user",
                                "client_properties")
        assert "remote-gevent %s %s" % (amqplink.__version__, device.ident) in names
    finally:
        link.close()


def test_wrong_ca_refused(rabbit, device, tmp_path):
    other = CertificateAuthority(str(tmp_path / "other-ca"))
    link = rabbit.link(device, ca_file=other.cert_file)
    with pytest.raises(TLSVerifyError) as err:
        link.connect()
    text = one_line(str(err.value))
    assert "certificate not trusted" in text
    assert "127.0.0.1:%d" % rabbit.node.amqps_port in text
    assert device.token not in text


def test_wrong_host_name_refused(rabbit, device):
    # 127.0.0.2 reaches the broker (through a forwarder) but is not in its certificate.
    fwd = forwarder("127.0.0.2", rabbit.node.amqps_port)
    try:
        url = "amqps://127.0.0.2:%d/%s" % (fwd.server_port, "rg%2Ftest")
        link = rabbit.link(device, url=url)
        with pytest.raises(TLSVerifyError) as err:
            link.connect()
        text = one_line(str(err.value))
        assert "host name mismatch" in text and "127.0.0.2" in text
        # Same path under a name the certificate does carry: accepted.
        ok = rabbit.link(device, url="amqps://localhost:%d/rg%%2Ftest" % rabbit.node.amqps_port)
        ok.connect()
        ok.close()
    finally:
        fwd.stop()


def test_wrong_token_refused_naming_user_not_token(rabbit, device, caplog):
    link = AmqpLink([device.url], device.ident, "not-" + device.token, ca_file=device.ca_file,
                    connect_timeout=5.0)
    with caplog.at_level(logging.DEBUG):
        with pytest.raises(LoginRefused) as err:
            link.connect()
    text = one_line(str(err.value))
    assert "broker 127.0.0.1:%d refused login for user %s (ACCESS_REFUSED)" % (
        rabbit.node.amqps_port, device.ident) == text
    assert device.token not in text and device.token not in caplog.text


def test_connection_refused_names_host_port(rabbit, device):
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    link = rabbit.link(device, url="amqps://127.0.0.1:%d/" % port)
    with pytest.raises(amqplink.LinkError) as err:
        link.connect()
    assert "cannot connect to 127.0.0.1:%d: connection refused" % port == str(err.value)


def test_plain_amqp_to_loopback_works_with_warning(rabbit, device, caplog):
    with caplog.at_level(logging.WARNING):
        link = rabbit.link(device, url=rabbit.node.amqp_url(rabbit.vhost))
    assert "NOT encrypted" in caplog.text
    link.connect()
    assert not isinstance(link.connection.transport.sock, ssl.SSLSocket)
    link.close()


# ----------------------------------------------------------------------------- round trip
def test_publish_consume_round_trip_over_tls(rabbit, device, operator):
    got = AsyncResult()
    holder = []

    def on_cmd(msg):
        holder[0].ack(msg)
        got.set(msg)

    dev_link = rabbit.link(device)
    holder.append(dev_link)
    g = start(dev_link, device_setup(device, on_cmd))
    op_link = rabbit.link(operator)
    op_link.connect()
    try:
        body = json.dumps({"v": 1, "type": "session.request", "body": {"x": "é"}}).encode()
        assert op_link.publish("remote.down", device.topic + ".session", body,
                               correlation_id="c-1", reply_to="amq.gen-nowhere",
                               expiration=60000) is True
        msg = got.get(timeout=WAIT)
        assert msg.body == body
        assert msg.properties["content_type"] == "application/json"
        assert msg.properties["correlation_id"] == "c-1"
        assert msg.properties["reply_to"] == "amq.gen-nowhere"
        assert msg.properties["expiration"] == "60000"
        assert msg.properties["delivery_mode"] == 2
        assert msg.delivery_info["routing_key"] == device.topic + ".session"
    finally:
        op_link.close()
        stop(dev_link, g)


def test_publish_when_down_raises_or_uses_outbox(rabbit, device):
    link = rabbit.link(rabbit.admin())  # link mechanics: the queue is addressed by name
    with pytest.raises(NotConnected):
        link.publish("", device.topic + ".box", b"{}")
    t0 = time.monotonic()
    with pytest.raises(NotConnected):
        link.publish("", device.topic + ".box", b"{}", wait=0.3)
    assert 0.25 < time.monotonic() - t0 < 2.0
    assert link.publish("", device.topic + ".box", b'{"n": 1}', outbox=True) is False
    assert link.outbox_size == 1
    got = AsyncResult()

    def on_box(msg):
        link.ack(msg)
        got.set(msg.body)

    g = start(link, device_setup(device, on_box, queue_suffix="box", bind=False))
    try:
        assert got.get(timeout=WAIT) == b'{"n": 1}'
        assert link.outbox_size == 0
    finally:
        stop(link, g)


def test_callback_error_rejects_message_and_keeps_consuming(rabbit, device, caplog):
    seen = []
    done = Event()

    def on_msg(msg):
        seen.append(msg.body)
        if msg.body == b"boom":
            raise ValueError("hostile message")
        link.ack(msg)
        done.set()

    link = rabbit.link(rabbit.admin())  # link mechanics: the queue is addressed by name
    g = start(link, device_setup(device, on_msg, queue_suffix="poison", bind=False))
    try:
        with caplog.at_level(logging.ERROR):
            link.publish("", device.topic + ".poison", b"boom")
            link.publish("", device.topic + ".poison", b"fine")
            assert done.wait(WAIT)
        assert seen == [b"boom", b"fine"]  # not redelivered: rejected without requeue
        assert "rejecting message" in caplog.text
        assert link.reconnects == 0
    finally:
        stop(link, g)


# ----------------------------------------------------------------------------- confinement
def _denied(rabbit, dev, action):
    """Run ``action(link)`` on a fresh connection; return the AccessRefused it causes."""
    link = rabbit.link(dev)
    link.connect()
    try:
        with pytest.raises(AccessRefused) as err:
            action(link)
            # An asynchronous refusal (publish) closes the channel: read it.
            link.connection.drain_events(timeout=5)
        return err.value
    finally:
        link.close()


def test_device_cannot_touch_another_devices_topic(rabbit):
    a, b = rabbit.new_devices(2)
    b_link = rabbit.link(b)
    b_link.connect()
    device_setup(b, lambda m: None)(b_link)  # B's queue exists and is bound
    b_link.close()

    # consume B's queue
    err = _denied(rabbit, a, lambda link: link.consume(b.topic + ".cmd", lambda m: None))
    assert "ACCESS_REFUSED" in str(err) and "access to queue" in str(err)
    # declare (configure) a queue under B's topic
    _denied(rabbit, a, lambda link: link.declare_queue(b.topic + ".cmd2"))
    # publish on B's topic: the broker closes the channel with ACCESS_REFUSED
    err = _denied(rabbit, a, lambda link: link.publish("remote.up", b.topic + ".alive", b"{}"))
    assert "ACCESS_REFUSED" in str(err) and b.topic in str(err)
    # bind A's own queue to B's routing keys on remote.down
    def bind_to_b(link):
        q = link.declare_queue(a.topic + ".cmd", arguments=CMD_QUEUE_ARGS)
        link.bind(q, "remote.down", b.topic + ".session")
    err = _denied(rabbit, a, bind_to_b)
    assert "ACCESS_REFUSED" in str(err)
    # publishing where only the platform may (remote.down)
    _denied(rabbit, a, lambda link: link.publish("remote.down", a.topic + ".session", b"{}"))
    # pushing straight into B's command queue by name, through the default exchange
    err = _denied(rabbit, a, lambda link: link.publish("", b.topic + ".cmd", b"{}"))
    assert "ACCESS_REFUSED" in str(err) and "amq.default" in str(err)
    # ... or through the reply exchange: devices may only address consoles' reply queues
    err = _denied(rabbit, a, lambda link: link.publish("remote.reply", b.topic + ".cmd", b"{}"))
    assert "ACCESS_REFUSED" in str(err)

    # ... while A's own topic works: no error within a drain window.
    link = rabbit.link(a)
    link.connect()
    try:
        link.publish("remote.up", a.topic + ".alive", b"{}")
        with pytest.raises(socket.timeout):
            link.connection.drain_events(timeout=0.5)
    finally:
        link.close()


# ----------------------------------------------------------------------------- heartbeats
def test_heartbeats_are_serviced_while_idle(rabbit, device):
    link = rabbit.link(device, heartbeat=1)
    g = start(link, device_setup(device, lambda m: None))
    try:
        assert link.connection.heartbeat == 1
        sent_before = link.connection.last_heartbeat_sent
        gevent.sleep(3.0)  # broker drops a client silent for 2 intervals
        assert link.connected.is_set() and link.reconnects == 0
        assert link.connection.last_heartbeat_sent > sent_before
    finally:
        stop(link, g)


# ----------------------------------------------------------------------------- reconnect
def test_reconnects_after_broker_restart(own_rabbit, pki, caplog):
    ca, _ = pki
    node = own_rabbit
    vhost = "rg-reconnect"
    node.declare_platform(vhost)
    node.add_device(vhost, "recon-dev", "recon-token")
    node.add_operator(vhost, "recon-op", "recon-pw")
    url = node.amqps_url(vhost)
    received = []
    arrived = Event()
    events = []
    dev_link = AmqpLink([url], "recon-dev", "recon-token", ca_file=ca.cert_file,
                        connect_timeout=3.0, reconnect_max_delay=2.0,
                        on_connect=lambda lk: events.append("up"),
                        on_disconnect=lambda lk, exc: events.append("down"))

    class Dev:
        topic = "remote.fr04.recon-dev"

    def on_cmd(msg):
        dev_link.ack(msg)
        received.append(msg.body)
        arrived.set()

    op_link = AmqpLink([url], "recon-op", "recon-pw", ca_file=ca.cert_file,
                       connect_timeout=3.0, reconnect_max_delay=2.0)
    g_dev = start(dev_link, device_setup(Dev, on_cmd))
    g_op = start(op_link, lambda lk: None)
    op_link.publish("remote.down", Dev.topic + ".session", b'{"n": 1}')
    assert arrived.wait(WAIT)
    arrived.clear()

    with caplog.at_level(logging.WARNING):
        node.restart()
        t_up = time.monotonic()
        assert dev_link.wait_connected(20.0), dev_link.last_error
        assert op_link.publish("remote.down", Dev.topic + ".session", b'{"n": 2}',
                               wait=20.0)
        assert arrived.wait(WAIT)
    print("\nreconnected and handled a new message %.2f s after the node was back"
          % (time.monotonic() - t_up))
    assert received == [b'{"n": 1}', b'{"n": 2}']
    assert dev_link.reconnects >= 1 and events[:3] == ["up", "down", "up"]
    assert "AMQP link down" in caplog.text and "recon-token" not in caplog.text
    stop(dev_link, g_dev)
    stop(op_link, g_op)


def test_stop_breaks_into_backoff_at_once(rabbit, device):
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    link = rabbit.link(device, url="amqps://127.0.0.1:%d/" % port, reconnect_max_delay=60.0)
    g = gevent.spawn(link.run, lambda lk: None)
    deadline = time.monotonic() + WAIT  # the first attempt failed: the link is backing off
    while "connection refused" not in (link.last_error or ""):
        assert time.monotonic() < deadline, link.last_error
        gevent.sleep(0.02)
    assert not link.connected.is_set()
    t0 = time.monotonic()
    stop(link, g)
    assert time.monotonic() - t0 < 1.5


# ----------------------------------------------------------------------------- concurrency
def test_concurrent_publishers_do_not_corrupt_frames(rabbit, device):
    greenlets, per_greenlet = 20, 200
    total = greenlets * per_greenlet
    received = {}
    done = Event()
    queue = device.topic + ".bulk"

    def on_msg(msg):
        link.ack(msg)
        doc = json.loads(msg.body)
        assert doc["pad"] == "x" * doc["size"], "corrupted body"
        received[(doc["g"], doc["i"])] = True
        if len(received) == total:
            done.set()

    link = rabbit.link(rabbit.admin(), prefetch=200)  # queue addressed by name
    g = start(link, device_setup(device, on_msg, queue_suffix="bulk", bind=False))

    def publisher(n):
        for i in range(per_greenlet):
            # some bodies span several frames (frame_max 128 KiB) to stress interleaving
            size = 200000 if i % 50 == 7 else (n * 37 + i) % 3000
            body = json.dumps({"g": n, "i": i, "size": size, "pad": "x" * size}).encode()
            link.publish("", queue, body, delivery_mode=1)
            if i % 10 == 0:
                gevent.sleep(0)

    try:
        t0 = time.monotonic()
        pubs = [gevent.spawn(publisher, n) for n in range(greenlets)]
        gevent.joinall(pubs, timeout=60, raise_error=True)
        assert done.wait(60), "received %d of %d" % (len(received), total)
        print("\n%d messages from %d greenlets in %.2f s" % (total, greenlets,
                                                             time.monotonic() - t0))
        assert link.reconnects == 0
    finally:
        stop(link, g)


# ----------------------------------------------------------------------------- latency
def measure_rtt(rabbit, device, operator, rounds):
    """Median request→reply time through the broker, operator → device → operator."""
    holder = []
    dev_link = rabbit.link(device)
    holder.append(dev_link)
    g_dev = start(dev_link, device_setup(device, echo_responder(holder)))
    replier = Replier()
    op_link = rabbit.link(operator)
    replier.link = op_link
    g_op = start(op_link, replier.setup)
    samples = []
    try:
        for n in range(rounds):
            cid = "%d-%s" % (n, os.urandom(4).hex())
            waiter = AsyncResult()
            replier.pending[cid] = waiter
            t0 = time.perf_counter()
            op_link.publish("remote.down", device.topic + ".session", b'{"ping": %d}' % n,
                            correlation_id=cid, reply_to=replier.queue, expiration=60000,
                            delivery_mode=1)
            assert waiter.get(timeout=WAIT) == b'{"ping": %d}' % n
            samples.append(time.perf_counter() - t0)
    finally:
        stop(op_link, g_op)
        stop(dev_link, g_dev)
    return statistics.median(samples)


def test_request_reply_round_trip_time(rabbit, device, operator):
    median = measure_rtt(rabbit, device, operator, 300)
    print("\nrequest->reply through RabbitMQ over TLS: median %.3f ms (300 round trips)"
          % (median * 1000))


# ----------------------------------------------------------------------------- poison
def poison_cases(topic):
    """(name, body, raw properties) a hostile operator can publish on remote.down."""
    return [
        ("bad UTF-8 correlation_id", b"{}", poison.properties(correlation_id=b"\xff\xfe\xfd")),
        ("headers nested 3000 deep", b"{}", poison.properties(headers=poison.nested_table(3000))),
        ("bad UTF-8 content_type", b"{}", poison.properties(content_type=b"text/\xc3(")),
        ("bad UTF-8 reply_to", b"{}", poison.properties(reply_to=b"amq.gen-\xed\xa0\x80")),
        ("arrays nested 3000 deep", b"{}", poison.properties(headers=poison.table(
            poison.shortstr(b"a") + poison.nested_array(3000)))),
    ]


def test_undecodable_properties_rejected_once_and_consumer_keeps_serving(
        rabbit, device, operator, caplog):
    seen = []
    good = Event()

    def on_msg(msg):
        seen.append(msg.body)
        link.ack(msg)
        if msg.body == b"fine":
            good.set()

    link = rabbit.link(device)
    op = rabbit.link(operator)
    g = start(link, device_setup(device, on_msg))
    og = start(op, lambda _link: None)
    try:
        cases = poison_cases(device.topic)
        with caplog.at_level(logging.WARNING, logger="remote_gevent.common.amqplink"):
            for _name, body, props in cases:
                poison.publish_raw(op, "remote.down", device.topic + ".session", body, props)
            op.publish("remote.down", device.topic + ".session", b"fine")
            assert good.wait(WAIT)
        assert seen == [b"fine"]
        assert link.reconnects == 0 and not g.dead
        refusals = [r for r in caplog.records if "undecodable properties" in r.getMessage()]
        assert len(refusals) == len(cases), caplog.text  # once each, never redelivered
        for record in refusals:
            one_line(record.getMessage())
            assert "\xff" not in record.getMessage()
    finally:
        stop(op, og)
        stop(link, g)
    assert queued(rabbit, device, device.topic + ".cmd") == 0  # rejected without requeue


def queued(rabbit, who, queue):
    """Messages ready in ``queue`` (a passive declare on a short-lived link)."""
    probe = rabbit.link(who)
    probe.connect()
    try:
        return probe.channel.queue_declare(queue, passive=True).message_count
    finally:
        probe.close()


def test_body_is_raw_bytes_whatever_the_content_encoding(rabbit, device, operator):
    got = AsyncResult()

    def on_msg(msg):
        link.ack(msg)
        got.set(msg)

    link = rabbit.link(device)
    op = rabbit.link(operator)
    g = start(link, device_setup(device, on_msg))
    og = start(op, lambda _link: None)
    try:
        body = "é".encode("utf-8") * 10
        op.publish("remote.down", device.topic + ".session", body, content_encoding="latin-1")
        msg = got.get(timeout=WAIT)
        assert msg.body == body and isinstance(msg.body, bytes)
        assert msg.properties["content_encoding"] == "latin-1"
    finally:
        stop(op, og)
        stop(link, g)


def test_body_over_max_body_is_not_buffered_and_refused_once(rabbit, device, operator,
                                                              caplog):
    seen = []
    good = Event()

    def on_msg(msg):
        seen.append(bytes(msg.body))
        link.ack(msg)
        good.set()

    link = rabbit.link(device, max_body=16 * 1024)
    op = rabbit.link(operator)
    g = start(link, device_setup(device, on_msg))
    og = start(op, lambda _link: None)
    try:
        with caplog.at_level(logging.WARNING, logger="remote_gevent.common.amqplink"):
            op.publish("remote.down", device.topic + ".session", b"x" * (120 * 1024))
            op.publish("remote.down", device.topic + ".session", b"y" * (16 * 1024))
            assert good.wait(WAIT)
        assert seen == [b"y" * (16 * 1024)]
        lines = [r.getMessage() for r in caplog.records if "122880 bytes" in r.getMessage()]
        assert len(lines) == 1, caplog.text
        assert link.reconnects == 0
    finally:
        stop(op, og)
        stop(link, g)


def _deliver_frames(tag, props=None, body=b"{}"):
    """Raw frames of one basic.deliver (method, header, body) on channel 1."""
    import struct

    from amqp import spec
    args = (struct.pack(">HH", *spec.Basic.Deliver) + poison.shortstr(b"ctag")
            + struct.pack(">QB", tag, 0) + poison.shortstr(b"remote.down")
            + poison.shortstr(b"t.session"))
    header = struct.pack(">HxxQ", 60, len(body)) + (props or poison.properties())
    return [(1, 1, args), (2, 1, header), (3, 1, body)]


class _FakeConnection:
    bytes_recv = 0


def test_inbound_handler_rejects_by_tag_what_it_cannot_handle_and_remembers_poison(caplog):
    from amqp.exceptions import PreconditionFailed

    from remote_gevent.common import amqp_inbound
    rejected, calls = [], []
    memory = amqp_inbound.PoisonMemory()
    on_frame = amqp_inbound.frame_handler(
        1000, memory, lambda conn, ch, tag: rejected.append((ch, tag)))(
        _FakeConnection(), lambda ch, sig, args, msg: calls.append(msg) or behaviour(msg))

    def feed(frames):
        for frame in frames:
            on_frame(frame)

    def behaviour(msg):
        if msg.body == b"bug":
            raise UnicodeDecodeError("utf-8", b"\xff", 0, 1, "invalid start byte")
        if msg.body == b"closes":
            raise PreconditionFailed("channel closed by the broker")

    with caplog.at_level(logging.WARNING, logger="remote_gevent.common.amqp_inbound"):
        feed(_deliver_frames(7, body=b"bug"))  # handling raised: rejected by its tag
        assert rejected == [(1, 7)]
        with pytest.raises(PreconditionFailed):  # the link goes down ...
            feed(_deliver_frames(8, body=b"closes"))
        assert len(memory) == 1
        feed(_deliver_frames(9, body=b"closes"))  # ... and its redelivery is refused
        assert rejected == [(1, 7), (1, 9)] and len(calls) == 2
        feed(_deliver_frames(10, body=b"x" * 1001))  # over max_body: kept out of memory
    assert calls[-1].problem == "body of 1001 bytes over the 1000-byte limit"
    assert calls[-1].body == b""
    assert caplog.text.count("rejected") == 2


def test_inbound_body_never_decoded_by_content_encoding():
    from remote_gevent.common import amqp_inbound
    calls = []
    on_frame = amqp_inbound.frame_handler(10 ** 6, amqp_inbound.PoisonMemory(),
                                          lambda *a: None)(
        _FakeConnection(), lambda ch, sig, args, msg: calls.append(msg))
    body = b"a" * 300000  # punycode-decoding this would take seconds
    for frame in _deliver_frames(1, poison.properties(content_encoding=b"punycode"), body):
        on_frame(frame)
    assert calls[0].body == body and calls[0].problem is None
    assert calls[0].properties["content_encoding"] == "punycode"


def test_queue_with_older_arguments_is_replaced_on_declare(rabbit, device, caplog):
    """An agent upgrade adds x-max-length-bytes to <topic>.cmd: the durable queue an older
    version declared must not keep the link down with PRECONDITION_FAILED forever."""
    queue = device.topic + ".cmd"
    old = rabbit.link(device)
    old.connect()
    try:
        old.declare_queue(queue, durable=True, arguments=CMD_QUEUE_ARGS)
    finally:
        old.close()
    new_args = dict(CMD_QUEUE_ARGS, **{"x-max-length-bytes": 1638400})
    got = AsyncResult()

    def setup(link):
        link.declare_queue(queue, durable=True, arguments=new_args, replace_mismatch=True)
        link.bind(queue, "remote.down", device.topic + ".session")
        link.consume(queue, lambda msg: got.set(msg.body) or link.ack(msg))

    link = rabbit.link(device, prefetch=7)
    with caplog.at_level(logging.WARNING, logger="remote_gevent.common.amqplink"):
        g = start(link, setup)
    try:
        assert "existed with other arguments" in caplog.text
        listing = rabbit.node.ctl("list_queues", "-p", rabbit.vhost, "name", "arguments")
        line = [row for row in listing.splitlines() if row.startswith(queue)]
        assert line and "x-max-length-bytes" in line[0], listing
        channels = rabbit.node.ctl("list_channels", "user", "prefetch_count")
        assert [row.split() for row in channels.splitlines()
                if row.startswith(device.ident)] == [[device.ident, "7"]], channels
        op = rabbit.link(rabbit.admin())
        op.connect()
        try:
            op.publish("remote.down", device.topic + ".session", b"after upgrade")
        finally:
            op.close()
        assert got.get(timeout=WAIT) == b"after upgrade"
        assert link.reconnects == 0
    finally:
        stop(link, g)


def test_not_connected_names_the_broker_it_was_connected_to():
    # Found by mypy: the URL is a BrokerURL (a NamedTuple), so "%s" % url raised
    # TypeError ("not all arguments converted") instead of NotConnected.
    link = AmqpLink(["amqps://broker.example/"], "u", "p")
    link.url = link.urls[0]
    with pytest.raises(NotConnected) as err:
        link._channel_or_raise()
    assert "broker.example:5671" in str(err.value)
