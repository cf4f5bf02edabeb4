"""One AMQP 0-9-1 link over TLS (py-amqp under gevent): connect, reconnect, publish, consume.

Shape (kombu's ``ConsumerMixin`` without kombu): :meth:`AmqpLink.run` is the body of one
supervised greenlet. It connects (URLs tried in turn), calls ``setup(link)`` to declare
topology and register consumers, then loops ``drain_events(timeout=1)`` +
``heartbeat_tick()`` until the stop event is set. On a recoverable error it logs one line,
waits (:class:`remote_gevent.common.retry.Backoff`, jittered, first retry within ~1 s, capped
at ``reconnect_max_delay``, interruptible by the stop event), moves to the next URL and
starts over — ``setup`` runs again, so topology and consumers are restored.

TLS: py-amqp silently ignores an ``ssl.SSLContext`` passed as ``ssl=`` and its dict
``context`` form leaves ``check_hostname`` off. We therefore plug our own transport into
py-amqp (``Connection.Transport``) which wraps the socket with
:func:`remote_gevent.common.tls.client_context` (chain *and* host name verified, TLS >= 1.2)
and ``server_hostname`` = the URL's host. There is no switch to turn verification off.

Concurrency rules (py-amqp is not safe for concurrent writers):

- Every write — publish, ack/reject, heartbeat, declares, consume — takes ``link.lock``
  (a ``gevent.lock.RLock``). Only the link's greenlet reads the socket.
- Synchronous AMQP methods (those waiting for a reply: declares, bind, ``consume``) read
  the socket, so they run synchronously only in the link's greenlet (inside ``setup`` or
  a consumer callback). Called from any other greenlet they are sent ``nowait`` (pure
  writes); errors then surface in the link's greenlet as a channel close → reconnect.
- We publish with ``send_method`` instead of ``Channel.basic_publish`` because the latter
  may call ``drain_events(timeout=0)`` from the publishing greenlet (``connection.blocked``
  capability), i.e. read the socket concurrently with the link's greenlet.
- Consumer callbacks run in the link's greenlet: they must be quick (validate, ack, hand
  off); long work must be spawned elsewhere, or heartbeats and other deliveries stall.
"""

import collections
import logging
import os
import socket
import ssl
import sys
import time
from typing import Any, Callable, Deque, Dict, List, Optional, Sequence, Tuple

import amqp
import gevent
from amqp import spec
from amqp.exceptions import AccessRefused, AMQPError
from amqp.method_framing import frame_writer as _amqp_frame_writer
from gevent.event import Event
from gevent.lock import RLock

from remote_gevent import __version__
from remote_gevent.common import tls
from remote_gevent.common.addresses import (
    BrokerURL,
)
from remote_gevent.common.amqp_topology import TopologyMixin
from remote_gevent.common.amqp_inbound import DEFAULT_MAX_BODY, PoisonMemory, frame_handler
from remote_gevent.common.retry import Backoff, sleep_or_stop

from remote_gevent.common.amqp_connection import (
    LinkConfigError,
    LinkError,
    LoginRefused,
    NotConnected,
    TLSVerifyError,
    _Connection,
    describe_error,
    parse_url,
)

log = logging.getLogger(__name__)

#: drain_events timeout: how often the loop wakes up to tick heartbeats and check stop.
DRAIN_TIMEOUT = 1.0
#: A connection that stayed up this long resets the backoff (no fast flapping loop).
STABLE_AFTER = 5.0
#: First reconnect delay base: the first retry comes within this many seconds.
FIRST_RETRY = 1.0
#: Bound for a graceful close (Connection.Close / Close-Ok) before dropping the socket.
CLOSE_TIMEOUT = 2.0
OUTBOX_MAX = 100

Callback = Callable[[amqp.Message], None]


# Errors after which we reconnect (py-amqp's recoverable ones plus everything socket/TLS,
# channel errors — the channel is gone — and our own one-line errors).
RECOVERABLE = tuple(set(amqp.Connection.recoverable_connection_errors) | {
    AMQPError, OSError, socket.timeout, ssl.SSLError, LinkError,
} | set(tls.HANDSHAKE_ERRORS))  # with 3.6's host-name CertificateError (a ValueError)


class AmqpLink(TopologyMixin):
    """One AMQP-over-TLS connection with one channel, reconnecting forever in :meth:`run`.

    ``urls``: ``amqps://host:port/vhost`` strings tried in turn. ``userid``/``password``:
    broker login (password never logged). ``ca_file`` None = system trust store.
    ``name`` goes into the connection name shown by the broker
    (``remote-gevent <version> <name>``). ``prefetch``: unacked deliveries per consumer.

    ``on_connect(link)`` is called after ``setup`` succeeded, ``on_disconnect(link, exc)``
    when an established or half-established connection is lost (exc None on stop).
    ``on_return(message)`` (link greenlet) gets a ``mandatory`` publish the broker could
    not route (``basic.return``; ``message.delivery_info`` has ``reply_code``); without
    it a return is logged and dropped (py-amqp would raise it out of the drain loop).

    Inbound deliveries go through :mod:`remote_gevent.common.amqp_inbound`: bodies stay raw
    bytes, a body over ``max_body`` bytes is counted but not buffered, and a delivery
    whose properties do not decode is refused (see :meth:`consume`) instead of raising
    out of ``drain_events``.
    """

    def __init__(self, urls: Sequence[str], userid: str, password: str,
                 ca_file: Optional[str] = None, cert_file: Optional[str] = None,
                 key_file: Optional[str] = None, heartbeat: int = 30,
                 connect_timeout: float = 10.0, reconnect_max_delay: float = 60.0,
                 name: Optional[str] = None, stop_event: Optional[Event] = None,
                 on_connect: Optional[Callable[["AmqpLink"], None]] = None,
                 on_disconnect: Optional[Callable[["AmqpLink", Optional[BaseException]],
                                                  None]] = None,
                 prefetch: int = 32, first_retry: float = FIRST_RETRY,
                 outbox_max: int = OUTBOX_MAX, max_body: int = DEFAULT_MAX_BODY,
                 on_return: Optional[Callable[[amqp.Message], None]] = None) -> None:
        if isinstance(urls, str):
            urls = [urls]
        if not urls:
            raise LinkConfigError("no broker URL configured (amqp.urls is empty)")
        self.urls: List[BrokerURL] = [parse_url(u) for u in urls]
        self.userid = userid
        self._password = password
        self.ca_file, self.cert_file, self.key_file = ca_file, cert_file, key_file
        self.heartbeat = int(heartbeat)
        self.connect_timeout = float(connect_timeout)
        self.reconnect_max_delay = float(reconnect_max_delay)
        self.name = name or userid
        self.stop_event = stop_event if stop_event is not None else Event()
        self.on_connect = on_connect
        self.on_disconnect = on_disconnect
        self.prefetch = prefetch
        self.on_return = on_return
        self.first_retry = first_retry
        self.max_body = int(max_body)
        self._poison = PoisonMemory()
        self.connected = Event()
        self.lock = RLock()
        self.connection: Optional[_Connection] = None
        self.channel: Optional[amqp.Channel] = None
        self.url: Optional[BrokerURL] = None
        self.last_error: Optional[str] = None
        self.reconnects = 0
        self._url_index = 0
        self._greenlet: Optional[gevent.Greenlet] = None
        self._outbox: Deque[Tuple[str, str, bytes, Dict[str, Any]]] = collections.deque(
            maxlen=outbox_max)
        self._tls_context: Optional[ssl.SSLContext] = None
        self._check_tls_files()

    @classmethod
    def from_config(cls, cfg: Any, **kwargs: Any) -> "AmqpLink":
        """The agent's link from ``AgentConfig`` (``cfg.ident``, ``cfg.token``, ``cfg.amqp``)."""
        a = cfg.amqp
        return cls(a.urls, cfg.ident, cfg.token, ca_file=a.ca_file, cert_file=a.cert_file,
                   key_file=a.key_file, heartbeat=a.heartbeat,
                   connect_timeout=a.connect_timeout,
                   reconnect_max_delay=a.reconnect_max_delay, name=cfg.ident, **kwargs)

    def __repr__(self) -> str:
        return "<AmqpLink %s@%s %s>" % (self.userid, self.url or self.urls[0],
                                        "up" if self.connected.is_set() else "down")

    # ------------------------------------------------------------------ connecting
    def _check_tls_files(self) -> None:
        if not any(u.tls for u in self.urls):
            return
        for label, path in (("ca_file", self.ca_file), ("cert_file", self.cert_file),
                            ("key_file", self.key_file)):
            if path and not os.path.isfile(path):
                raise LinkConfigError("amqp.%s %s: no such file" % (label, path))
        if self.key_file and not self.cert_file:
            raise LinkConfigError("amqp.key_file given without amqp.cert_file")
        try:
            self._tls_context = tls.client_context(self.ca_file, self.cert_file, self.key_file)
        except tls.TLSConfigError as exc:
            raise LinkConfigError("amqp TLS configuration: %s" % exc) from exc

    @property
    def client_properties(self) -> Dict[str, Any]:
        return {
            "connection_name": "remote-gevent %s %s" % (__version__, self.name),
            "product": "remote-gevent",
            "version": __version__,
            "platform": "Python %d.%d (py-amqp %s, gevent %s)" % (
                sys.version_info[0], sys.version_info[1], amqp.__version__, gevent.__version__),
        }

    def _open(self, url: BrokerURL) -> None:
        """Connect to one URL and open the channel, or raise a :class:`LinkError`."""
        conn = _Connection(
            host=url.address, userid=self.userid, password=self._password,
            login_method="PLAIN", virtual_host=url.vhost, ssl=url.tls,
            tls_context=self._tls_context if url.tls else None, server_hostname=url.host,
            connect_timeout=self.connect_timeout, heartbeat=self.heartbeat,
            client_properties=self.client_properties, frame_writer=self._locked_frame_writer,
            frame_handler=frame_handler(self.max_body, self._poison, self._reject_tag),
        )
        try:
            with self.lock:
                conn.connect()
                channel = conn.channel()
                # Bodies stay raw bytes: decoding by the publisher's content_encoding
                # (any codec, any cost) is the consumer's business, after its size check.
                channel.auto_decode = False
                channel.events["basic_return"].add(self._returned)
                if self.prefetch:
                    channel.basic_qos(0, self.prefetch, False)
        except RECOVERABLE as exc:
            _drop(conn)
            message = describe_error(exc, url, self.userid)
            if tls.is_verify_error(exc):
                raise TLSVerifyError(message) from None
            if isinstance(exc, AccessRefused):
                raise LoginRefused(message) from None
            raise LinkError(message) from None
        self.connection, self.channel, self.url = conn, channel, url

    def _returned(self, exc: Exception, exchange: str, routing_key: str,
                  message: amqp.Message) -> None:
        """``basic.return`` handler: hand the unroutable message to ``on_return``."""
        info = getattr(message, "delivery_info", None)
        if not isinstance(info, dict):
            info = message.delivery_info = {}
        info.update(reply_code=getattr(exc, "code", None), exchange=exchange,
                    routing_key=routing_key)
        if self.on_return is None:
            log.warning("AMQP: message to %s/%s returned unroutable (%s)", exchange,
                        routing_key, exc)
            return
        self.on_return(message)

    def _locked_frame_writer(self, connection: amqp.Connection, transport: Any
                             ) -> Callable[..., Any]:
        """py-amqp's frame writer behind ``self.lock``: even the writes py-amqp makes on its
        own from the reading greenlet (close-ok, flow-ok …) are serialized with ours."""
        write = _amqp_frame_writer(connection, transport)
        lock = self.lock

        def locked_write(*args: Any, **kwargs: Any) -> Any:
            with lock:
                return write(*args, **kwargs)

        return locked_write

    def connect(self) -> None:
        """One pass over the URLs (starting at the current one); raise the last failure.

        Used by :meth:`run` and directly by short-lived clients (console commands,
        ``check-config``). Errors are :class:`LinkError` subclasses with one-line messages.
        """
        error: Optional[LinkError] = None
        for _ in range(len(self.urls)):
            url = self.urls[self._url_index]
            try:
                self._open(url)
            except LinkError as exc:
                error = exc
                self._url_index = (self._url_index + 1) % len(self.urls)
                if len(self.urls) > 1:
                    log.warning("%s", exc)
                continue
            log.info("AMQP connected to %s as %s (heartbeat %ss)", url, self.userid,
                     self.connection.heartbeat if self.connection else "?")
            return
        assert error is not None
        raise error

    def close(self) -> None:
        """Close gracefully (bounded by :data:`CLOSE_TIMEOUT`), then drop the socket."""
        conn = self.connection
        self._mark_down()
        if conn is None:
            return
        with self.lock:
            try:
                with gevent.Timeout(CLOSE_TIMEOUT):
                    conn.close()
            except (gevent.Timeout, AMQPError, OSError) as exc:
                log.debug("AMQP close: %s", exc)
            finally:
                _drop(conn)

    def _mark_down(self) -> None:
        self.connected.clear()
        self.connection = None
        self.channel = None

    def stop(self) -> None:
        """Ask :meth:`run` to finish (within about :data:`DRAIN_TIMEOUT`)."""
        self.stop_event.set()

    def wait_connected(self, timeout: Optional[float] = None) -> bool:
        return bool(self.connected.wait(timeout))

    # ------------------------------------------------------------------ the loop
    def run(self, setup: Callable[["AmqpLink"], None]) -> None:
        """Connect, ``setup(link)``, drain; reconnect forever until the stop event is set.

        ``setup`` declares topology and registers consumers with :meth:`consume`; it runs
        again after every reconnect. Raises only irrecoverable errors
        (:class:`LinkConfigError`, or a bug in ``setup``/a callback).
        """
        self._greenlet = gevent.getcurrent()
        backoff = Backoff(first=self.first_retry, cap=self.reconnect_max_delay)
        try:
            while not self.stop_event.is_set():
                up_since: Optional[float] = None
                error: Optional[BaseException] = None
                try:
                    self.connect()
                    with self.lock:
                        setup(self)
                        self._flush_outbox()
                    up_since = time.monotonic()
                    self.last_error = None
                    self.connected.set()
                    if self.on_connect is not None:
                        self.on_connect(self)
                    self._drain_until_stopped()
                except RECOVERABLE as exc:
                    if isinstance(exc, LinkConfigError):
                        raise
                    error = exc
                    self.last_error = describe_error(exc, self.url, self.userid)
                finally:
                    was_up = self.connection is not None
                    self._teardown(graceful=self.stop_event.is_set())
                    if was_up and self.on_disconnect is not None:
                        self.on_disconnect(self, error)
                if self.stop_event.is_set():
                    break
                if up_since is not None:
                    self.reconnects += 1
                    self._url_index = (self._url_index + 1) % len(self.urls)
                    if time.monotonic() - up_since >= STABLE_AFTER:
                        backoff.reset()
                delay = backoff.next()
                log.warning("AMQP link down: %s; retrying %s in %.1f s", self.last_error,
                            self.urls[self._url_index], delay)
                if sleep_or_stop(delay, self.stop_event):
                    break
        finally:
            self._teardown(graceful=True)
            self._greenlet = None
            log.info("AMQP link to %s stopped", self.url or self.urls[0])

    def _drain_until_stopped(self) -> None:
        conn = self.connection
        # Wake up often enough to send heartbeats at twice the negotiated rate.
        timeout = DRAIN_TIMEOUT
        if conn is not None and conn.heartbeat:
            timeout = min(DRAIN_TIMEOUT, conn.heartbeat / 4.0)
        while not self.stop_event.is_set():
            if conn is not self.connection or conn is None:
                raise LinkError("connection dropped by a writer")
            with self.lock:
                conn.heartbeat_tick()
            try:
                conn.drain_events(timeout=timeout)
            except socket.timeout:
                continue
            except AttributeError:
                # transport set to None by a writer's _fail() while we waited
                if conn is not self.connection:
                    raise LinkError("connection dropped by a writer") from None
                raise

    def _teardown(self, graceful: bool) -> None:
        if self.connection is None:
            self.connected.clear()
            return
        if graceful:
            self.close()
        else:
            conn = self.connection
            self._mark_down()
            _drop(conn)

    def _fail(self, conn: Optional[_Connection]) -> None:
        """A writer saw the socket die: mark down and drop it so the loop notices."""
        if conn is not None and conn is self.connection:
            self._mark_down()
            _drop(conn)

    # ------------------------------------------------------------------ publishing
    def publish(self, exchange: str, routing_key: str, body: bytes,
                content_type: str = "application/json", delivery_mode: int = 2,
                expiration: Optional[int] = None, correlation_id: Optional[str] = None,
                reply_to: Optional[str] = None, wait: float = 0.0, outbox: bool = False,
                mandatory: bool = False, **properties: Any) -> bool:
        """Publish one message; safe from any greenlet.

        ``expiration`` is in milliseconds. When the link is down: wait up to ``wait``
        seconds for it to come back, then either queue the message in the bounded
        outbox (``outbox=True``: sent right after the next ``setup``, oldest dropped when
        full; returns False) or raise :class:`NotConnected`. Returns True once written to
        the socket (AMQP gives no delivery guarantee beyond that without confirms).
        """
        if not isinstance(body, (bytes, bytearray)):
            raise TypeError("publish body must be bytes, not %s" % type(body).__name__)
        props = dict(properties)
        props["content_type"] = content_type
        props["delivery_mode"] = delivery_mode
        if expiration is not None:
            props["expiration"] = str(int(expiration))
        if correlation_id is not None:
            props["correlation_id"] = correlation_id
        if reply_to is not None:
            props["reply_to"] = reply_to
        if not self.connected.is_set() and wait > 0:
            self.connected.wait(wait)
        try:
            self._send(exchange, routing_key, bytes(body), props, mandatory)
        except NotConnected:
            if outbox:
                if len(self._outbox) == self._outbox.maxlen:
                    log.warning("AMQP outbox full, dropping oldest message (%s)",
                                self._outbox[0][1])
                self._outbox.append((exchange, routing_key, bytes(body), props))
                return False
            raise
        return True

    def _send(self, exchange: str, routing_key: str, body: bytes, props: Dict[str, Any],
              mandatory: bool = False) -> None:
        with self.lock:
            channel, conn = self.channel, self.connection
            if channel is None or conn is None or not self._usable(conn):
                raise NotConnected("AMQP link to %s is down, cannot publish to %s"
                                   % (self.url or self.urls[0], routing_key or exchange))
            message = amqp.Message(body, **props)
            try:
                # Not channel.basic_publish: see module docstring (no reads from here).
                channel.send_method(spec.Basic.Publish, "Bssbb",
                                    (0, exchange, routing_key, mandatory, False), message)
            except (OSError, socket.timeout, AMQPError) as exc:
                self._fail(conn)
                raise NotConnected("AMQP link to %s lost while publishing: %s"
                                   % (self.url, describe_error(exc, self.url))) from None

    @staticmethod
    def _usable(conn: _Connection) -> bool:
        transport = conn.transport if conn.channels is not None else None
        return bool(transport is not None and transport.connected)

    def _flush_outbox(self) -> None:
        while self._outbox:
            exchange, routing_key, body, props = self._outbox[0]
            self._send(exchange, routing_key, body, props)
            self._outbox.popleft()

    @property
    def outbox_size(self) -> int:
        return len(self._outbox)

    # ------------------------------------------------------------------ consuming
    def _in_link_greenlet(self) -> bool:
        return self._greenlet is None or gevent.getcurrent() is self._greenlet

    def _channel_or_raise(self) -> amqp.Channel:
        if self.channel is None:
            # self.url is a BrokerURL, a NamedTuple: formatted as one value, not four
            raise NotConnected("AMQP link to %s is down" % ((self.url or self.urls[0]),))
        return self.channel

    def consume(self, queue: str, callback: Callback, exclusive: bool = False,
                consumer_tag: Optional[str] = None, handles_problems: bool = False) -> str:
        """Register ``callback(message)`` on ``queue`` (manual acks: ``no_ack=False``).

        The callback runs in the link's greenlet and must end with :meth:`ack` or
        :meth:`reject`. If it raises, the error is logged and the message rejected without
        requeue (a poison message must not stall the consumer), except for AMQP/socket
        errors which propagate to the loop (reconnect). Call from ``setup`` so that the
        consumer is restored after a reconnect. Returns the consumer tag.

        Messages are :class:`~remote_gevent.common.amqp_inbound.Delivery` objects: ``body`` is
        raw bytes. One whose properties do not decode or whose body is over
        ``max_body`` has a ``problem``; such a delivery is logged once and rejected
        without requeue here, unless ``handles_problems`` (the callback then gets it,
        with empty ``properties`` and/or an empty body, and must refuse it itself).
        """
        def deliver(message: amqp.Message) -> None:
            problem = getattr(message, "problem", None)
            if problem is not None and not handles_problems:
                log.warning("queue %s: delivery %s refused: %s", queue,
                            message.delivery_info.get("delivery_tag"), problem)
                self.reject(message, requeue=False)
                return
            try:
                callback(message)
            except RECOVERABLE:
                raise
            except Exception:  # noqa: BLE001 - boundary: one bad message must not kill us
                log.exception("consumer callback for queue %s failed; rejecting message",
                              queue)
                self.reject(message, requeue=False)

        tag = consumer_tag or "rg-%s-%s" % (self.name, os.urandom(4).hex())
        with self.lock:
            channel = self._channel_or_raise()
            return channel.basic_consume(queue=queue, consumer_tag=tag, no_ack=False,
                                         exclusive=exclusive, callback=deliver,
                                         nowait=not self._in_link_greenlet()) or tag

    def get(self, queue: str) -> Optional[amqp.Message]:
        """One message of ``queue`` (``basic.get``, manual ack) or None when it is empty:
        for set-up code that must read a queue before it consumes another."""
        with self.lock:
            return self._channel_or_raise().basic_get(queue=queue, no_ack=False)

    def cancel(self, consumer_tag: str) -> None:
        with self.lock:
            self._channel_or_raise().basic_cancel(consumer_tag,
                                                  nowait=not self._in_link_greenlet())

    def _settle(self, message: amqp.Message, ack: bool, requeue: bool) -> bool:
        with self.lock:
            channel = message.channel
            if channel is not self.channel or channel is None or self.connection is None:
                # Delivered on a connection that is gone: the broker requeued it already.
                log.debug("not settling delivery %s from a previous connection",
                          message.delivery_tag)
                return False
            conn = self.connection
            try:
                if ack:
                    channel.basic_ack(message.delivery_tag)
                else:
                    channel.basic_reject(message.delivery_tag, requeue)
            except (OSError, socket.timeout) as exc:
                self._fail(conn)
                log.warning("AMQP link lost while settling a delivery: %s",
                            describe_error(exc, self.url))
                return False
            return True

    def _reject_tag(self, connection: amqp.Connection, channel_id: int, tag: int) -> None:
        """Reject a delivery by tag, without requeue (inbound frame handler's hook)."""
        with self.lock:
            channel = (connection.channels or {}).get(channel_id)
            if channel is self.channel and channel is not None:
                channel.basic_reject(tag, False)

    def ack(self, message: amqp.Message) -> bool:
        """Acknowledge (any greenlet). False if the link went down since the delivery."""
        return self._settle(message, ack=True, requeue=False)

    def reject(self, message: amqp.Message, requeue: bool = False) -> bool:
        """Reject (default: without requeue → dropped or dead-lettered)."""
        return self._settle(message, ack=False, requeue=requeue)


def _drop(conn: Optional[amqp.Connection]) -> None:
    """Forget a connection without any handshake (closes the socket)."""
    if conn is None:
        return
    try:
        conn.collect()
    except (OSError, AMQPError, AttributeError) as exc:
        log.debug("dropping AMQP connection: %s", exc)


