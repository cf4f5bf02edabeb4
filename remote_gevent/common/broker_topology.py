"""Names and arguments of the broker topology, defined once for every role.

docs/protocol.md §1 explains the design; in short, a device's command queue is a
**per-connection** queue: non-durable, auto-delete, declared by the agent on the node it
is connected to and gone with that connection (or that node). So no device depends on a
broker node other than the one it is connected to, a console's ``mandatory`` publish to
an offline device comes back (``basic.return``) at once, and the queue's existence *is*
the device's presence as the broker sees it (consumer count > 0: connected).

This module imports nothing of ours (the agent's import graph runs on Python 3.6).
"""

from typing import Any, Dict

EXCHANGE_DOWN = "remote.down"
EXCHANGE_UP = "remote.up"
EXCHANGE_REPLY = "remote.reply"

#: ``<topic>.conn``: the per-connection command queue (this version).
COMMAND_QUEUE_SUFFIX = ".conn"
#: ``<topic>.cmd``: the durable command queue of the versions before it (deleted by the
#: agent at every connect, best effort: see :mod:`remote_gevent.agent.command_queue`).
LEGACY_COMMAND_QUEUE_SUFFIX = ".cmd"
#: Routing-key suffixes bound to the command queue on ``remote.down``.
COMMANDS = ("session", "close", "status")

#: Bounds of the command queue (a flood is refused at the broker, publisher nacked):
#: 100 messages of the 16 KiB maximum, a request older than 2 min is useless, and a
#: queue left without consumer (a connection that died between declare and consume)
#: is deleted after 5 min.
COMMAND_QUEUE_MAX_LENGTH = 100
COMMAND_QUEUE_ARGS: Dict[str, Any] = {
    "x-expires": 300000,
    "x-message-ttl": 120000,
    "x-max-length": COMMAND_QUEUE_MAX_LENGTH,
    "x-max-length-bytes": COMMAND_QUEUE_MAX_LENGTH * 16 * 1024,
    "x-overflow": "reject-publish",
}


def device_topic(server_id: str, ident: str) -> str:
    return "remote.%s.%s" % (server_id, ident)


def command_queue(topic: str) -> str:
    """The device's per-connection command queue for ``remote.<sid>.<ident>``."""
    return topic + COMMAND_QUEUE_SUFFIX


def legacy_command_queue(topic: str) -> str:
    return topic + LEGACY_COMMAND_QUEUE_SUFFIX
