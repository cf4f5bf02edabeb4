"""The optional ``counters`` object of an ``alive`` message (issue 13; docs/protocol.md §4).

The agent listens on nothing, so its own figures travel in its ``alive``: sessions by
state, resumes, session requests, refusals by code, bytes, RSS, and the ids of the
sessions resuming now (at most :data:`MAX_RESUMING_IDS`, the count is in ``resuming``).

Every key is optional (an agent sends what it has; a console accepts an alive without
``counters`` at all). Known keys are checked strictly. Unknown keys are tolerated so that
a newer agent can add a figure without its alives being refused, but only within bounds
(at most :data:`MAX_EXTRA_KEYS`, a short ``[a-z0-9_]`` name, an integer value) and the
console drops them (:func:`known_only`). The whole object stays far under the 16 KiB
message cap (about 2.5 KiB at worst).

:func:`check` raises ``ValueError(detail)``; the envelope turns it into a ``malformed``
refusal. This module imports nothing of the wire so that the envelope can import it.
"""

import re
from typing import Any, Dict

MAX_INT = 2 ** 53  # as every integer of the envelope: exact in every JSON implementation
MAX_SESSIONS = 1000000  # as sessions_active / sessions_waiting
MAX_RESUMING_IDS = 16
MAX_REFUSAL_CODES = 32
MAX_EXTRA_KEYS = 8

_SID_RE = re.compile(r"^[0-9a-f]{32}\Z")
_CODE_RE = re.compile(r"^[a-z][a-z0-9_]{0,39}\Z")
_EXTRA_RE = re.compile(r"^[a-z][a-z0-9_]{0,31}\Z")

#: Integer figures and their upper bound. ``open`` + ``resuming`` = ``sessions_active``
#: (``open``: admitted sessions whose relay path is up or not dialed yet; ``resuming``:
#: those whose path is down and being re-established); ``waiting``: for a slot.
#: Bytes: ``in`` = from the console to the device's targets, ``out`` = the other way;
#: ``bytes_*`` of the sessions open now, ``ended_bytes_*`` of those ended since start.
INTEGERS = {
    "open": MAX_SESSIONS, "resuming": MAX_SESSIONS, "waiting": MAX_SESSIONS,
    "resumes": MAX_INT, "requests": MAX_INT, "ended": MAX_INT,
    "bytes_in": MAX_INT, "bytes_out": MAX_INT, "ended_bytes_in": MAX_INT,
    "ended_bytes_out": MAX_INT, "rss": MAX_INT,
}
KNOWN = frozenset(INTEGERS) | {"refusals", "resuming_ids"}


def _int(name: str, value: Any, hi: int) -> int:
    if type(value) is not int or not 0 <= value <= hi:  # bool is not an int here
        raise ValueError("%s: expected an integer in [0, %d]" % (name, hi))
    return value


def check(value: Any) -> None:
    """Refuse (``ValueError``) a ``counters`` value outside the schema above."""
    if not isinstance(value, dict):
        raise ValueError("expected an object")
    extra = [k for k in value if k not in KNOWN]
    if len(extra) > MAX_EXTRA_KEYS:
        raise ValueError("more than %d unknown keys" % MAX_EXTRA_KEYS)
    for key in extra:
        if not isinstance(key, str) or not _EXTRA_RE.match(key):
            raise ValueError("unknown key is not [a-z][a-z0-9_]{0,31}")
        _int("unknown key", value[key], MAX_INT)
    for key, hi in INTEGERS.items():
        if key in value:
            _int(key, value[key], hi)
    refusals = value.get("refusals", {})
    if not isinstance(refusals, dict) or len(refusals) > MAX_REFUSAL_CODES:
        raise ValueError("refusals: expected an object of at most %d codes"
                         % MAX_REFUSAL_CODES)
    for code, count in refusals.items():
        if not _CODE_RE.match(code):
            raise ValueError("refusals: a code is not [a-z][a-z0-9_]{0,39}")
        _int("refusals", count, MAX_INT)
    ids = value.get("resuming_ids", [])
    if not isinstance(ids, list) or len(ids) > MAX_RESUMING_IDS:
        raise ValueError("resuming_ids: expected a list of at most %d session ids"
                         % MAX_RESUMING_IDS)
    for sid in ids:
        if not isinstance(sid, str) or not _SID_RE.match(sid):
            raise ValueError("resuming_ids: expected 32 lowercase hex chars")
    if len(set(ids)) != len(ids):
        raise ValueError("resuming_ids: duplicate session id")
    if ids and len(ids) > value.get("resuming", 0):
        raise ValueError("resuming_ids: more ids than resuming sessions")


def known_only(value: Any) -> Dict[str, Any]:
    """The known keys of a ``counters`` object that :func:`check` accepted (copies)."""
    if not isinstance(value, dict):
        return {}
    out = {k: v for k, v in value.items() if k in INTEGERS}
    if "refusals" in value:
        out["refusals"] = dict(value["refusals"])
    if "resuming_ids" in value:
        out["resuming_ids"] = list(value["resuming_ids"])
    return out
