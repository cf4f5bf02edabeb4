"""A private RabbitMQ cluster of N nodes (tests of broker node loss, fleet benchmarks).

Each node is a :class:`~remote_gevent.demo.rabbit.RabbitNode` with its own name, TLS port,
distribution port and data directory; the cluster's nodes share one Erlang cookie of
their own (never the system's) and one epmd (the first node's, on a private port), which
is how Erlang nodes find each other. The first node boots alone; nodes 2..N then boot
together and join it on their first boot (``classic_config`` peer discovery naming the
first node: the same as ``rabbitmqctl join_cluster`` without three CLI calls per node,
each of which costs seconds of Erlang start-up). :meth:`RabbitCluster.start` checks the
membership with ``cluster_status``. Nothing touches the machine's own RabbitMQ, epmd
or port 5672.

Partition handling is RabbitMQ's default (``ignore``): when a node is killed the others
go on serving, which is what a node-loss test wants to see.
"""

from __future__ import annotations

import logging
import os
import secrets
import threading
from typing import List, Optional, Sequence

from remote_gevent.demo.rabbit import START_TIMEOUT, RabbitError, RabbitNode

log = logging.getLogger(__name__)


class RabbitCluster:
    """``size`` TLS nodes in ``base_dir/node<i>``, clustered by :meth:`start`."""

    def __init__(self, base_dir: str, size: int = 3, ca_file: Optional[str] = None,
                 cert_file: Optional[str] = None, key_file: Optional[str] = None,
                 amqp_port: Optional[int] = None) -> None:
        if size < 1:
            raise RabbitError("a cluster needs at least one node")
        cookie = secrets.token_hex(20).upper()
        tag = "%d-%s" % (os.getpid(), secrets.token_hex(2))
        first = RabbitNode(os.path.join(base_dir, "node1"), "rg-c1-%s@localhost" % tag,
                           amqp_port=amqp_port, ca_file=ca_file, cert_file=cert_file,
                           key_file=key_file, cookie=cookie)
        self.nodes: List[RabbitNode] = [first]
        for i in range(2, size + 1):
            node = RabbitNode(os.path.join(base_dir, "node%d" % i),
                              "rg-c%d-%s@localhost" % (i, tag), ca_file=ca_file,
                              cert_file=cert_file, key_file=key_file,
                              epmd_port=first.epmd_port, cookie=cookie, extra_conf=[
                                  "cluster_formation.peer_discovery_backend = classic_config",
                                  "cluster_formation.classic_config.nodes.1 = %s"
                                  % first.node_name])
            # One administrator for the whole cluster: users are cluster-wide.
            node.admin_user, node.admin_password = first.admin_user, first.admin_password
            self.nodes.append(node)

    @property
    def first(self) -> RabbitNode:
        return self.nodes[0]

    def start(self, timeout: float = START_TIMEOUT) -> "RabbitCluster":
        """Start every node and join nodes 2..N to the first; raise RabbitError."""
        try:
            self.first.start(timeout)
            starts = [threading.Thread(target=node.start, args=(timeout,), daemon=True)
                      for node in self.nodes[1:]]
            for thread in starts:
                thread.start()
            for thread in starts:
                thread.join(timeout + 5.0)
            for node in self.nodes[1:]:
                node.wait_port(1.0)
            members = self.first.ctl("cluster_status", "--formatter", "json")
            for node in self.nodes:
                if node.node_name not in members:
                    raise RabbitError("node %s did not join the cluster: %s"
                                      % (node.node_name, members.strip()[:500]))
        except BaseException:
            self.stop()
            raise
        log.info("RabbitMQ cluster up: %s", ", ".join(n.node_name for n in self.nodes))
        return self

    def running(self) -> List[RabbitNode]:
        return [n for n in self.nodes if n.running]

    def ctl(self, *args: str, input: Optional[str] = None) -> str:
        """``rabbitmqctl`` against the first running node."""
        alive = self.running()
        if not alive:
            raise RabbitError("no node of the cluster is running")
        return alive[0].ctl(*args, input=input)

    def amqps_urls(self, vhost: str = "/", order: Optional[Sequence[int]] = None) -> List[str]:
        """The nodes' URLs (``order``: node indexes, first tried first)."""
        indexes = list(order) if order is not None else list(range(len(self.nodes)))
        return [self.nodes[i].amqps_url(vhost) for i in indexes]

    def node_of_port(self, port: int) -> Optional[RabbitNode]:
        for node in self.nodes:
            if node.amqps_port == port:
                return node
        return None

    def stop(self) -> None:
        """Stop every node, the epmd owner (the first) last."""
        for node in reversed(self.nodes):
            try:
                node.stop()
            except (OSError, RabbitError) as exc:
                log.warning("could not stop %s: %s", node.node_name, exc)

    def __enter__(self) -> "RabbitCluster":
        return self.start()

    def __exit__(self, *exc_info: object) -> None:
        self.stop()
