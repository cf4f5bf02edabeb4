"""The fleet-wide revocation message (issue 14; docs/protocol.md, "Fleet revocation").

One JSON object published on the exchange ``remote.fleet`` with routing key
``<server_id>.revocation``: the whole current fleet KRL (``ssh-keygen -k -z VERSION``)
and the CA's SSHSIG over it (``ssh-keygen -Y sign -n remote-gevent-krl -f CA KRL``)::

    {"v": 1, "type": "fleet.revocation", "server_id": "fr04",
     "krl": "<base64 KRL>", "sig": "-----BEGIN SSH SIGNATURE-----\\n..."}

At most 16 KiB like every control message, so the KRL itself is at most ~11 KiB
(serial ranges and bitmaps keep thousands of revocations well under that).
"""

import base64
import binascii
import json
from typing import Any, Tuple

from remote_gevent.wire.envelope import MAX_MESSAGE_BYTES

__all__ = ["FLEET_EXCHANGE", "MAX_MESSAGE_BYTES", "SIG_NAMESPACE", "decode_revocation",
           "encode_revocation", "routing_key"]

FLEET_EXCHANGE = "remote.fleet"
MSG_TYPE = "fleet.revocation"
SIG_NAMESPACE = "remote-gevent-krl"


def routing_key(server_id: str) -> str:
    return "%s.revocation" % server_id


def encode_revocation(server_id: str, krl: bytes, sshsig: str) -> bytes:
    raw = json.dumps({"v": 1, "type": MSG_TYPE, "server_id": server_id,
                      "krl": base64.b64encode(krl).decode("ascii"), "sig": sshsig},
                     sort_keys=True).encode("ascii")
    if len(raw) > MAX_MESSAGE_BYTES:
        raise ValueError("fleet revocation of %d bytes > %d: use serial ranges, or fewer "
                         "entries" % (len(raw), MAX_MESSAGE_BYTES))
    return raw


def decode_revocation(raw: bytes, server_id: str) -> Tuple[bytes, str]:
    """``(krl, sshsig)`` of a fleet revocation for ``server_id``; ValueError if not one."""
    if not isinstance(raw, (bytes, bytearray)) or len(raw) > MAX_MESSAGE_BYTES:
        raise ValueError("fleet revocation missing or over %d bytes" % MAX_MESSAGE_BYTES)
    try:
        obj: Any = json.loads(bytes(raw).decode("utf-8"))
    except (UnicodeDecodeError, ValueError, RecursionError):
        raise ValueError("fleet revocation is not UTF-8 JSON") from None
    if not isinstance(obj, dict) or set(obj) != {"v", "type", "server_id", "krl", "sig"} \
            or obj["v"] != 1 or obj["type"] != MSG_TYPE:
        raise ValueError("not a fleet.revocation version 1 message")
    if obj["server_id"] != server_id:
        raise ValueError("fleet revocation for another server id")
    if not isinstance(obj["krl"], str) or not isinstance(obj["sig"], str):
        raise ValueError("fleet revocation fields must be strings")
    try:
        krl = base64.b64decode(obj["krl"].encode("ascii"), validate=True)
    except (binascii.Error, UnicodeEncodeError):
        raise ValueError("fleet revocation KRL is not base64") from None
    return krl, obj["sig"]
