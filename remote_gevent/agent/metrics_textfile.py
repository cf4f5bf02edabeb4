"""The agent's counters as a node-exporter textfile (``remote.metrics_textfile``).

The agent listens on nothing, so it cannot be scraped; node-exporter's textfile
collector (``--collector.textfile.directory``) reads ``*.prom`` files instead. When
``remote.metrics_textfile`` names a path (in that directory), the agent rewrites it
atomically at every ``alive`` (``health_check`` s, and at start/stop/key rotation), in
the Prometheus text format, written by hand: the agent's import graph stays small and
runs on Python 3.6.

The figures are the ones the ``alive`` carries in its ``counters``: both come from
:func:`remote_gevent.agent.counters.gather` (one source). Metrics (prefix
``remote_gevent_agent_``): ``sessions{state}`` (active — resuming ones included —,
waiting), ``sessions_resuming``, ``resumes_total``, ``sessions_ended_total``,
``session_requests_total``, ``refusals_total{code}``, ``closes_total``,
``status_requests_total``, ``open_session_bytes{direction}`` (bytes of the sessions open
now), ``ended_session_bytes_total{direction}``, ``amqp_connects_total``,
``alives_total{result}`` (sent, dropped), ``uptime_seconds``, ``rss_bytes``. Never raises:
a failure is logged once per change.
"""

import logging
import re
from typing import Any, Dict, List, Optional

from remote_gevent.common.fsutil import write_atomic

log = logging.getLogger(__name__)

PREFIX = "remote_gevent_agent_"
_LABEL_RE = re.compile(r"[^A-Za-z0-9_.:-]")
_last_error = [""]


def _label(value: str) -> str:
    return _LABEL_RE.sub("_", value)[:64]


def render(snap: Dict[str, Any]) -> str:
    """The textfile's content (Prometheus text exposition format 0.0.4) from a
    :func:`~remote_gevent.agent.counters.gather` snapshot."""
    lines = []

    def metric(name: str, kind: str, doc: str, samples: List[Any]) -> None:
        lines.append("# HELP %s%s %s" % (PREFIX, name, doc))
        lines.append("# TYPE %s%s %s" % (PREFIX, name, kind))
        for labels, value in samples:
            text = ",".join('%s="%s"' % (k, _label(v)) for k, v in labels)
            lines.append("%s%s%s %s" % (PREFIX, name, "{%s}" % text if text else "", value))

    def one(name: str, kind: str, doc: str, key: str) -> None:
        metric(name, kind, doc, [((), snap.get(key, 0))])

    def two(name: str, kind: str, doc: str, label: str, keys: Dict[str, str]) -> None:
        metric(name, kind, doc, [(((label, v),), snap.get(k, 0)) for v, k in keys.items()])

    metric("sessions", "gauge", "sessions by state",
           [((("state", "active"),), snap["open"] + snap["resuming"]),
            ((("state", "waiting"),), snap["waiting"])])
    one("sessions_resuming", "gauge", "sessions whose relay path is down, resuming", "resuming")
    one("resumes_total", "counter", "relay paths re-established (sessions open and ended)",
        "resumes")
    one("sessions_ended_total", "counter", "sessions ended since start", "ended")
    one("session_requests_total", "counter", "session requests accepted for admission",
        "requests")
    metric("refusals_total", "counter", "requests refused, by reason code",
           [((("code", code),), v) for code, v in sorted(snap["refusals"].items())])
    one("closes_total", "counter", "session.close requests handled", "closes")
    one("status_requests_total", "counter", "status requests answered", "status")
    two("open_session_bytes", "gauge", "bytes carried by the sessions open now", "direction",
        {"in": "bytes_in", "out": "bytes_out"})
    two("ended_session_bytes_total", "counter", "bytes carried by the sessions ended",
        "direction", {"in": "ended_bytes_in", "out": "ended_bytes_out"})
    one("amqp_connects_total", "counter", "control-link connections established", "connects")
    two("alives_total", "counter", "alive messages, sent or dropped (link down)", "result",
        {"sent": "alive_sent", "dropped": "alive_dropped"})
    metric("uptime_seconds", "gauge", "seconds since the agent started",
           [((), round(float(snap["uptime"]), 3))])
    one("rss_bytes", "gauge", "resident memory of the agent process", "rss")
    return "\n".join(lines) + "\n"


def write_textfile(path: Optional[str], snap: Dict[str, Any]) -> None:
    """Rewrite ``path`` from a snapshot (no-op when ``path`` is None)."""
    if not path:
        return
    try:
        write_atomic(path, render(snap), 0o644)
        _last_error[0] = ""
    except Exception as exc:  # noqa: BLE001 - metrics must never disturb the agent
        message = "%s: %s" % (type(exc).__name__, exc)
        if message != _last_error[0]:
            _last_error[0] = message
            log.warning("cannot write metrics textfile %s: %s", path, message)
