"""The agent's figures, gathered in one place for its two outlets (issue 13): the
``counters`` of its ``alive`` messages (wire/alive_counters.py, docs/protocol.md §4) and
the node-exporter textfile (agent/metrics_textfile.py). Never raises: a figure that
cannot be read is logged and left out (zero), the heartbeat goes on.
"""

import logging
import re
from typing import Any, Dict

from remote_gevent.wire import alive_counters

log = logging.getLogger(__name__)

_CODE_RE = re.compile(r"^[a-z][a-z0-9_]{0,39}\Z")

#: What :func:`gather` returns when there is no tunnel manager (yet).
NO_SESSIONS = {"open": 0, "resuming": 0, "waiting": 0, "resuming_ids": [], "resumes": 0,
               "bytes_in": 0, "bytes_out": 0, "ended": 0, "ended_bytes_in": 0,
               "ended_bytes_out": 0}


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


def gather(control: Any) -> Dict[str, Any]:
    """One snapshot: the tunnel manager's session figures plus the control plane's
    counters (``sessions``: requests admitted to the tunnel manager, ``refused:<code>``,
    ``closes``, ``status``, ``connects``, ``alive_sent``/``alive_dropped``), RSS, uptime."""
    snap = dict(NO_SESSIONS)
    if control.tunnels is not None:
        try:
            snap.update(control.tunnels.figures())
        except Exception:  # noqa: BLE001 - a heartbeat must not die of a figures bug
            log.exception("tunnel figures failed")
    c = dict(control.counters)
    snap["requests"] = c.get("sessions", 0)
    snap["refusals"] = {k.split(":", 1)[1]: v for k, v in c.items() if k.startswith("refused:")}
    for name in ("closes", "status", "connects", "alive_sent", "alive_dropped"):
        snap[name] = c.get(name, 0)
    snap["rss"] = rss_bytes()
    snap["uptime"] = float(control.agent.uptime)
    return snap


def for_alive(snap: Dict[str, Any]) -> Dict[str, Any]:
    """The ``alive``'s ``counters`` from a snapshot, within the schema's bounds: at most
    MAX_RESUMING_IDS ids, the MAX_REFUSAL_CODES most frequent refusal codes."""
    out: Dict[str, Any] = {k: min(int(snap.get(k, 0)), hi)
                           for k, hi in alive_counters.INTEGERS.items()}
    out["resuming_ids"] = list(snap.get("resuming_ids", []))[:alive_counters.MAX_RESUMING_IDS]
    codes = sorted(((n, code) for code, n in snap.get("refusals", {}).items()
                    if _CODE_RE.match(code)), reverse=True)
    out["refusals"] = {code: min(n, alive_counters.MAX_INT)
                       for n, code in codes[:alive_counters.MAX_REFUSAL_CODES]}
    return out
