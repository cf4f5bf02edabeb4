"""Topology helpers of :class:`~remote_gevent.common.amqplink.AmqpLink` (a mixin):
declare exchanges and queues, delete and bind queues.

Synchronous methods (those that wait for the broker's answer) run only in the link's
greenlet; from any other greenlet they are sent ``nowait`` (see amqplink's docstring).
"""

import logging
from typing import Any, Dict, Optional

import amqp
from amqp.exceptions import NotFound, PreconditionFailed
from gevent.lock import RLock

from remote_gevent.common.amqp_connection import _reply_text

log = logging.getLogger("remote_gevent.common.amqplink")


class TopologyMixin:
    """Declares what :class:`AmqpLink` provides to these methods."""

    lock: RLock
    prefetch: int

    def _channel_or_raise(self) -> amqp.Channel:
        raise NotImplementedError

    def _in_link_greenlet(self) -> bool:
        raise NotImplementedError

    def declare_exchange(self, exchange: str, type: str = "topic", passive: bool = False,
                         durable: bool = True) -> None:
        with self.lock:
            self._channel_or_raise().exchange_declare(
                exchange, type, passive=passive, durable=durable, auto_delete=False,
                nowait=not self._in_link_greenlet())

    def declare_queue(self, queue: str = "", durable: bool = True, exclusive: bool = False,
                      auto_delete: bool = False, arguments: Optional[Dict[str, Any]] = None,
                      passive: bool = False, replace_mismatch: bool = False) -> str:
        """Declare a queue; returns its name (server-named when ``queue`` is empty).

        ``replace_mismatch`` (link greenlet only): if the queue exists with other
        arguments (the broker answers PRECONDITION_FAILED, e.g. declared by an older
        version), delete it — its pending messages are lost, which is logged — and
        declare it again with ``arguments``. Without it the error propagates.
        """
        nowait = not self._in_link_greenlet()
        if nowait and (not queue or replace_mismatch):
            raise ValueError("a server-named queue, or replace_mismatch, needs the link "
                             "greenlet")
        with self.lock:
            try:
                result = self._channel_or_raise().queue_declare(
                    queue, passive=passive, durable=durable, exclusive=exclusive,
                    auto_delete=auto_delete, arguments=arguments, nowait=nowait)
            except PreconditionFailed as exc:
                if not replace_mismatch or passive:
                    raise
                self._replace_queue(queue, exc)
                result = self._channel_or_raise().queue_declare(
                    queue, durable=durable, exclusive=exclusive, auto_delete=auto_delete,
                    arguments=arguments)
        return result.queue if result is not None else queue

    def _replace_queue(self, queue: str, exc: PreconditionFailed) -> None:
        # py-amqp has reopened the channel the broker closed (so its qos is gone).
        channel = self._channel_or_raise()
        if self.prefetch:
            channel.basic_qos(0, self.prefetch, False)
        dropped = channel.queue_delete(queue)
        log.warning("queue %s existed with other arguments (%s): re-created it with the "
                    "current ones, %s pending message(s) dropped", queue, _reply_text(exc),
                    dropped)

    def delete_queue(self, queue: str) -> int:
        """Delete ``queue`` (link greenlet); returns the messages dropped with it. A
        missing queue is not an error (RabbitMQ answers delete-ok); a queue whose home
        node is down raises ``NotFound`` (py-amqp reopens the channel: qos restored here,
        consumers on it are gone)."""
        if not self._in_link_greenlet():
            raise ValueError("delete_queue needs the link greenlet")
        with self.lock:
            try:
                return int(self._channel_or_raise().queue_delete(queue) or 0)
            except NotFound:
                channel = self._channel_or_raise()
                if self.prefetch:
                    channel.basic_qos(0, self.prefetch, False)
                raise

    def bind(self, queue: str, exchange: str, routing_key: str) -> None:
        with self.lock:
            self._channel_or_raise().queue_bind(queue, exchange, routing_key,
                                                nowait=not self._in_link_greenlet())

