"""The agent's counters as a node-exporter textfile (``remote.metrics_textfile``).

The agent listens on nothing, so it cannot be scraped; node-exporter's textfile
collector (``--collector.textfile.directory``) reads ``*.prom`` files instead. When
``remote.metrics_textfile`` names a path (in that directory), the agent rewrites it
atomically at every ``alive`` (``health_check`` s, and at start/stop/key rotation), in
the Prometheus text format, written by hand: the agent's import graph stays small and
runs on Python 3.6.

Metrics (prefix ``remote_gevent_agent_``): ``sessions{state}`` (active, waiting),
``session_requests_total``, ``refusals_total{code}``, ``closes_total``,
``status_requests_total``, ``open_session_bytes{direction}`` (bytes of the sessions open
now), ``amqp_connects_total``, ``alives_total{result}`` (sent, dropped),
``uptime_seconds``, ``rss_bytes``. Never raises: a failure is logged once per change.
"""

import logging
import re
from typing import Any, Dict, List, Optional

from remote_gevent.common.fsutil import write_atomic

log = logging.getLogger(__name__)

PREFIX = "remote_gevent_agent_"
_LABEL_RE = re.compile(r"[^A-Za-z0-9_.:-]")
_last_error = [""]


def rss_bytes() -> int:
    """Resident memory of this process (0 where /proc is missing)."""
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("VmRSS:"):
                    return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        pass
    return 0


def _label(value: str) -> str:
    return _LABEL_RE.sub("_", value)[:64]


def render(counters: Dict[str, int], active: int, waiting: int,
           sessions: List[Dict[str, Any]], uptime: float, rss: int) -> str:
    """The textfile's content (Prometheus text exposition format 0.0.4)."""
    lines = []

    def metric(name: str, kind: str, doc: str, samples: List[Any]) -> None:
        lines.append("# HELP %s%s %s" % (PREFIX, name, doc))
        lines.append("# TYPE %s%s %s" % (PREFIX, name, kind))
        for labels, value in samples:
            text = ",".join('%s="%s"' % (k, _label(v)) for k, v in labels)
            lines.append("%s%s%s %s" % (PREFIX, name, "{%s}" % text if text else "", value))

    metric("sessions", "gauge", "sessions by state",
           [((("state", "active"),), active), ((("state", "waiting"),), waiting)])
    metric("session_requests_total", "counter", "session requests accepted for admission",
           [((), counters.get("sessions", 0))])
    refusals = sorted((k.split(":", 1)[1], v) for k, v in counters.items()
                      if k.startswith("refused:"))
    metric("refusals_total", "counter", "requests refused, by reason code",
           [((("code", code),), v) for code, v in refusals])
    metric("closes_total", "counter", "session.close requests handled",
           [((), counters.get("closes", 0))])
    metric("status_requests_total", "counter", "status requests answered",
           [((), counters.get("status", 0))])
    total_in = sum(int(s.get("bytes_in") or 0) for s in sessions)
    total_out = sum(int(s.get("bytes_out") or 0) for s in sessions)
    metric("open_session_bytes", "gauge", "bytes carried by the sessions open now",
           [((("direction", "in"),), total_in), ((("direction", "out"),), total_out)])
    metric("amqp_connects_total", "counter", "control-link connections established",
           [((), counters.get("connects", 0))])
    metric("alives_total", "counter", "alive messages, sent or dropped (link down)",
           [((("result", "sent"),), counters.get("alive_sent", 0)),
            ((("result", "dropped"),), counters.get("alive_dropped", 0))])
    metric("uptime_seconds", "gauge", "seconds since the agent started",
           [((), round(float(uptime), 3))])
    metric("rss_bytes", "gauge", "resident memory of the agent process", [((), rss)])
    return "\n".join(lines) + "\n"


def write_textfile(path: Optional[str], control: Any) -> None:
    """Rewrite ``path`` from the control plane's figures (no-op when ``path`` is None)."""
    if not path:
        return
    try:
        active, waiting = control._stats()
        sessions = control.tunnels.sessions() if control.tunnels is not None else []
        text = render(dict(control.counters), active, waiting, sessions,
                      control.agent.uptime, rss_bytes())
        write_atomic(path, text, 0o644)
        _last_error[0] = ""
    except Exception as exc:  # noqa: BLE001 - metrics must never disturb the agent
        message = "%s: %s" % (type(exc).__name__, exc)
        if message != _last_error[0]:
            _last_error[0] = message
            log.warning("cannot write metrics textfile %s: %s", path, message)
