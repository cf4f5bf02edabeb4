"""What the console makes of the ``counters`` in a device's ``alive`` (issue 13; schema in
wire/alive_counters.py): the sessions/resuming summary that ``watch`` and ``devices``
print, and the lines ``watch`` prints when a session starts resuming and when it is back.

Everything here comes from the device (and through the state file, which another
process may have written): each figure is re-checked as an integer and each session id
as 32 hex characters before it is printed, and no text is printed unescaped.
"""

from __future__ import annotations

import re
from typing import Any, Dict, List, Optional

from remote_gevent.common.logs import escape
from remote_gevent.wire import alive_counters

_SID_RE = re.compile(r"^[0-9a-f]{32}\Z")
MAX_SHOWN_IDS = 4  # resuming ids printed in a summary (the count says the rest)
RECENT_CLOSES = 32  # session ids of recent closes kept per device ("ended" vs "back")


def _count(counters: Dict[str, Any], key: str) -> int:
    value = counters.get(key)
    return value if type(value) is int and 0 <= value <= alive_counters.MAX_INT else 0


def safe_id(value: Any) -> str:
    """A session id for display: itself if well-formed, else escaped and cut short."""
    if isinstance(value, str) and _SID_RE.match(value):
        return value
    return escape(value, 40)


def resuming_ids(counters: Optional[Dict[str, Any]]) -> List[str]:
    ids = (counters or {}).get("resuming_ids")
    if not isinstance(ids, list):
        return []
    return [i for i in ids[:alive_counters.MAX_RESUMING_IDS] if isinstance(i, str)]


def sessions_summary(entry: Dict[str, Any]) -> str:
    """``sessions 2 (1 resuming: <sid>)``, ``sessions 0``; "" without figures."""
    counters = entry.get("counters")
    if isinstance(counters, dict) and counters:
        active = _count(counters, "open") + _count(counters, "resuming")
        waiting, resuming = _count(counters, "waiting"), _count(counters, "resuming")
    elif type(entry.get("sessions_active")) is int:
        active, waiting, resuming = entry["sessions_active"], 0, 0
    else:
        return ""
    text = "sessions %d" % active
    if resuming:
        ids = [safe_id(i) for i in resuming_ids(counters)[:MAX_SHOWN_IDS]]
        more = resuming - len(ids)
        text += " (%d resuming%s%s)" % (resuming, ": " + " ".join(ids) if ids else "",
                                        " +%d" % more if ids and more > 0 else "")
    if waiting:
        text += ", %d waiting" % waiting
    return text


def resume_notes(before: Optional[Dict[str, Any]], after: Optional[Dict[str, Any]],
                 closed: List[str]) -> List[str]:
    """Lines for sessions that started resuming / are back between two alives.

    ``closed``: ids of sessions whose ``session.close`` the console has seen (the agent
    publishes it before the alive that no longer lists them): those ended while
    resuming rather than came back. Sessions beyond the listed ids show as counts."""
    old, new = resuming_ids(before), resuming_ids(after)
    notes = ["session %s resuming (relay path lost)" % safe_id(i) for i in new if i not in old]
    for sid in old:
        if sid not in new:
            notes.append("session %s %s" % (safe_id(sid), "ended while resuming"
                                            if sid in closed else "back (path re-established)"))
    unlisted = (_count(after or {}, "resuming") - len(new)) \
        - (_count(before or {}, "resuming") - len(old))
    if unlisted > 0:
        notes.append("%d more session(s) resuming" % unlisted)
    elif unlisted < 0:
        notes.append("%d other session(s) no longer resuming" % -unlisted)
    return notes
