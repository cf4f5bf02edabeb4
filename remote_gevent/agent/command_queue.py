"""The agent's command queue on every (re)connect: the per-connection queue, and the
migration away from the durable queue of older versions.

Design (docs/protocol.md §1, "Why a per-connection queue"): ``<topic>.conn`` is declared
non-durable and auto-delete, so it lives on the node the agent is connected to and
disappears with the agent's connection or with that node; after a reconnect to a
surviving node the agent declares it there again. No request then waits in a queue whose
node is down (the failure of the old durable ``<topic>.cmd``: ``NOT_FOUND - home node
... is down`` on every re-declare until that node came back), and a console learns at
once that a device is not connected (its ``mandatory`` request comes back).

Migration: the old ``<topic>.cmd`` is deleted at every connect. If its home node is down
the broker refuses the delete (``NOT_FOUND``); that is logged once per connection and
the agent goes on with ``<topic>.conn`` (no reconnect loop): the next connect after that
node's return deletes it. Until then a request may also be copied into it, where it
expires (2 min) unread.

Functions run in the link's greenlet (inside ``setup``): they use synchronous methods.
"""

import logging

from amqp.exceptions import NotFound

from remote_gevent.common.amqplink import AmqpLink
from remote_gevent.common.broker_topology import (
    COMMAND_QUEUE_ARGS,
    COMMANDS,
    EXCHANGE_DOWN,
    command_queue,
    legacy_command_queue,
)

log = logging.getLogger(__name__)


def drop_legacy_queue(link: AmqpLink, topic: str) -> bool:
    """Delete the durable ``<topic>.cmd`` of older versions; True if the broker did.

    Must run before any consumer is registered: a refused delete closes the channel
    (py-amqp reopens it), which would cancel the consumers on it.
    """
    name = legacy_command_queue(topic)
    try:
        dropped = link.delete_queue(name)
    except NotFound as exc:
        # Missing is the normal case (answered OK by RabbitMQ); NOT_FOUND means the
        # queue's home node is down: retried at the next connect.
        log.warning("legacy queue %s not deleted (%s); retried at the next connect", name,
                    exc)
        return False
    if dropped:
        log.warning("legacy queue %s deleted: %d pending request(s) dropped (this version "
                    "uses the per-connection queue %s)", name, dropped, command_queue(topic))
    return True


def declare_command_queue(link: AmqpLink, topic: str) -> str:
    """Declare and bind ``<topic>.conn`` on this connection's node; returns its name.

    An existing queue with other arguments (an earlier build of this design) is
    re-created (``replace_mismatch``).
    """
    name = command_queue(topic)
    link.declare_queue(name, durable=False, auto_delete=True, arguments=COMMAND_QUEUE_ARGS,
                       replace_mismatch=True)
    for suffix in COMMANDS:
        link.bind(name, EXCHANGE_DOWN, "%s.%s" % (topic, suffix))
    return name
