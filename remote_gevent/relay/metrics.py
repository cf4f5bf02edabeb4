"""Prometheus metrics of one relay, served on an optional listener (``metrics_listen``).

Why ``prometheus_client``: it is the exposition format every scraper reads, and its
collectors/registry give us counters, gauges and histograms with the text format's
escaping done right; a relay extra (``pip install remote-gevent[relay]``), imported
only when ``metrics_listen`` is set.

What is served (all prefixed ``remote_gevent_relay_``):

- ``pending``, ``half_open``, ``paired`` (gauges): connections not paired yet (TLS,
  hello, waiting), of those without a hello yet; sessions forwarding now;
- ``accepted_total``, ``pairings_total``: TCP connections accepted, sessions paired;
- ``refusals_total{code}``: ``ERR <code>`` answers (busy, timeout, bad_hello,
  ticket_mismatch, duplicate);
- ``endings_total{code}``: paired sessions ended, by outcome (normal, timeout, error,
  refused, shutdown);
- ``bytes_total{direction}``: bytes forwarded by ended sessions (``agent_to_console``,
  ``console_to_agent``);
- ``forwarded_legs_total``, ``forwarded_in_legs_total``: legs sent to their session's
  owner in a pool routing by session id, legs received from pool peers;
  ``peer_up{peer}`` (gauge, with ``pool_peers`` only): 1 while this relay believes
  that peer alive (relay/routing.py). A forwarded leg is one of ``paired`` on its
  entry relay while it is spliced, and its bytes and ending count there too; its
  pairing counts on the owner only. The pool's liveness probes are ``accepted``;
- ``handshake_seconds{role}`` (histogram): accept to ``OK`` (TLS handshake, hello, wait
  for the peer).

Gauges and the relay's own counters are read at scrape time (no hook on the hot path);
endings, bytes and handshake times come from the relay's ``observers`` hook, called once
when a session pairs and once when it ends.
"""

from __future__ import annotations

import logging
import time
from typing import Any, Iterator, Optional, Tuple

from prometheus_client import CollectorRegistry, Counter, Histogram, make_wsgi_app
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily
from prometheus_client.registry import Collector

log = logging.getLogger(__name__)

PREFIX = "remote_gevent_relay_"
REFUSED = "refused_"  # the relay's counter prefix for ERR codes
HANDSHAKE_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0)


class _StateCollector(Collector):
    """Gauges and counters read from the relay when scraped."""

    def __init__(self, relay: Any) -> None:
        self.relay = relay

    def collect(self) -> Iterator[Any]:
        stats = self.relay.stats()
        for name, doc in (("pending", "connections not paired yet"),
                          ("half_open", "pending connections without a hello yet"),
                          ("paired", "sessions forwarding now")):
            yield GaugeMetricFamily(PREFIX + name, doc, value=stats.get(name, 0))
        yield CounterMetricFamily(PREFIX + "accepted", "TCP connections accepted",
                                  value=stats.get("accepted", 0))
        yield CounterMetricFamily(PREFIX + "pairings", "sessions paired",
                                  value=stats.get("sessions", 0))
        refusals = CounterMetricFamily(PREFIX + "refusals", "ERR answers by code",
                                       labels=["code"])
        for key, value in sorted(stats.items()):
            if key.startswith(REFUSED):
                refusals.add_metric([key[len(REFUSED):]], value)
        yield refusals
        yield CounterMetricFamily(PREFIX + "forwarded_legs", "legs this relay forwarded to "
                                  "their session's owner in the pool",
                                  value=stats.get("forwarded", 0))
        yield CounterMetricFamily(PREFIX + "forwarded_in_legs", "legs pool peers forwarded "
                                  "to this relay (it owns their session)",
                                  value=stats.get("forwarded_in", 0))
        router = getattr(self.relay, "router", None)
        if router is not None:
            peers = GaugeMetricFamily(PREFIX + "peer_up", "pool peer alive (1) or down (0) "
                                      "as this relay sees it", labels=["peer"])
            for peer, up in sorted(router.states().items()):
                peers.add_metric([peer], 1 if up else 0)
            yield peers


class RelayMetrics:
    """The relay's metrics in their own registry; :meth:`serve` exposes them over HTTP."""

    def __init__(self, relay: Any, registry: Optional[CollectorRegistry] = None) -> None:
        self.relay = relay
        self.registry = registry if registry is not None else CollectorRegistry()
        self.registry.register(_StateCollector(relay))
        self.endings = Counter(PREFIX + "endings", "paired sessions ended, by outcome",
                               ["code"], registry=self.registry)
        self.bytes = Counter(PREFIX + "bytes", "bytes forwarded by ended sessions",
                             ["direction"], registry=self.registry)
        self.handshake = Histogram(PREFIX + "handshake_seconds",
                                   "accept to OK (TLS handshake, hello, wait for the peer)",
                                   ["role"], buckets=HANDSHAKE_BUCKETS,
                                   registry=self.registry)
        self._server: Any = None
        relay.observers.append(self.observe)

    def observe(self, event: str, session: Any) -> None:
        """The relay's hook: ``paired`` or ``ended`` for a :class:`PairedSession`."""
        if event == "paired":
            now = time.monotonic()
            for role, conn in (("agent", session.agent), ("console", session.console)):
                self.handshake.labels(role).observe(max(0.0, now - conn.since))
        elif event == "ended":
            code = (session.outcome or "normal").split(" ", 1)[0]
            self.endings.labels(code).inc()
            self.bytes.labels("agent_to_console").inc(session.bytes.get("agent", 0))
            self.bytes.labels("console_to_agent").inc(session.bytes.get("console", 0))

    def serve(self, host: str, port: int) -> Tuple[str, int]:
        """Serve ``/metrics`` (any path) on ``host:port`` in a gevent WSGI server."""
        from gevent.pywsgi import WSGIServer

        self._server = WSGIServer((host, port), make_wsgi_app(self.registry), log=None,
                                  error_log=log)
        self._server.start()
        address = self._server.address[:2]
        log.info("relay metrics on http://%s:%d/metrics", address[0], address[1])
        return address

    def stop(self) -> None:
        if self._server is not None:
            self._server.stop(timeout=1.0)
            self._server = None
