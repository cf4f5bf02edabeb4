"""Every code the roles exchange or show, defined once.

- :class:`CloseCode`: why a session ended (``session.close``, the tunnel's CLOSE frame,
  the history's ``close_code`` column);
- :class:`Reason`: why a request was refused (``session.refuse``, ``ProtocolError``);
- ``STREAM_TOO_MANY``: the OPEN_FAIL code of a stream over a stream cap;
- the virtual targets (``@transfer``, ``@sftp``) a session may name;
- the exit statuses of the agent (``AGENT_EXIT_*``) and of the console (``EXIT_*``).

This module imports nothing, so anything may import it (the console's fast ``stdio``
path included).
"""


class CloseCode:
    """Why a session ended (``session.close`` ``code``, tunnel CLOSE, history rows)."""

    NORMAL = "normal"
    CLOSED_BY_OPERATOR = "closed_by_operator"
    CLOSED_BY_AGENT = "closed_by_agent"
    IDLE_TIMEOUT = "idle_timeout"
    ACK_LOST = "ack_lost"
    REFUSED = "refused"
    QUEUE_TIMEOUT = "queue_timeout"
    RELAY_LOST = "relay_lost"
    RELAY_REFUSED = "relay_refused"
    SHUTDOWN = "shutdown"
    CRYPTO_ERROR = "crypto_error"
    PROTOCOL_ERROR = "protocol_error"
    TARGET_REFUSED = "target_refused"
    ERROR = "error"
    # The operator's key left authorized_keys (or the file became unusable): its open and
    # waiting sessions end at once.
    REVOKED = "revoked"
    # The relay path stayed down for remote.resume_timeout (issue 12: resume).
    LINK_LOST = "link_lost"
    ALL = frozenset({
        NORMAL, CLOSED_BY_OPERATOR, CLOSED_BY_AGENT, IDLE_TIMEOUT, ACK_LOST, REFUSED,
        QUEUE_TIMEOUT, RELAY_LOST, RELAY_REFUSED, SHUTDOWN, CRYPTO_ERROR, PROTOCOL_ERROR,
        TARGET_REFUSED, ERROR, REVOKED, LINK_LOST,
    })


class Reason:
    """Refusal reasons (``session.refuse`` ``code``; also ProtocolError.reason)."""

    BAD_SIGNATURE = "bad_signature"
    UNKNOWN_OPERATOR = "unknown_operator"
    EXPIRED = "expired"
    REPLAYED = "replayed"
    MALFORMED = "malformed"
    TOO_LARGE = "too_large"
    WRONG_DEVICE = "wrong_device"
    TARGET_NOT_PERMITTED = "target_not_permitted"
    QUEUE_TIMEOUT = "queue_timeout"
    SHUTTING_DOWN = "shutting_down"
    # Added to design.md's list: the replay cache is full of unexpired ids.
    RATE_LIMITED = "rate_limited"
    # Fairness between operators: this operator already holds its share of max_session
    # (remote.max_session_per_operator), or sent requests faster than remote.operator_rate.
    OPERATOR_LIMIT = "operator_limit"
    OPERATOR_RATE = "operator_rate_limited"
    # A close of another operator's session by a key without the admin option.
    NOT_OWNER = "not_session_owner"
    # Operator certificates (crypto/certauth.py): not signed by a CA of the device, not
    # usable (bad signature, host certificate, critical option, other CA type...), out of
    # its validity interval, no accepted principal; and a revoked key or certificate.
    UNKNOWN_CA = "unknown_ca"
    CERT_INVALID = "cert_invalid"
    CERT_EXPIRED = "cert_expired"
    CERT_NOT_YET_VALID = "cert_not_yet_valid"
    PRINCIPAL = "principal_not_allowed"
    REVOKED = "revoked"
    ALL = frozenset({
        BAD_SIGNATURE, UNKNOWN_OPERATOR, EXPIRED, REPLAYED, MALFORMED, TOO_LARGE, WRONG_DEVICE,
        TARGET_NOT_PERMITTED, QUEUE_TIMEOUT, SHUTTING_DOWN, RATE_LIMITED, OPERATOR_LIMIT,
        OPERATOR_RATE, NOT_OWNER, UNKNOWN_CA, CERT_INVALID, CERT_EXPIRED, CERT_NOT_YET_VALID,
        PRINCIPAL, REVOKED,
    })


# OPEN_FAIL code of an OPEN over the session's or the device's stream cap: it refuses one
# stream and never closes a session, so it is not a CloseCode.
STREAM_TOO_MANY = "too_many_streams"

# Targets served by the agent itself rather than by a TCP service.
VIRTUAL_TRANSFER = "@transfer"
VIRTUAL_SFTP = "@sftp"
VIRTUAL_TARGETS = frozenset({VIRTUAL_TRANSFER, VIRTUAL_SFTP})

# ------------------------------------------------------------- exit codes of the agent
AGENT_EXIT_OK = 0              # stopped on request, or remote.enabled is false
AGENT_EXIT_CANNOT_START = 1    # bad config, or could not start
AGENT_EXIT_FORCED = 2          # a second SIGTERM/SIGINT during the graceful stop
AGENT_EXIT_SERVICE_FAILED = 3  # a supervised service kept failing

# ----------------------------------------------------------- exit codes of the console
# 0-6 are shared with push/pull (console/transfer.py, docs/transfer.md).
EXIT_OK = 0
EXIT_ERROR = 1          # anything unexpected
EXIT_USAGE = 2          # bad command line (click) or bad -L/-D spec
EXIT_REFUSED = 3        # the device refused the session / a stream (reason code printed)
EXIT_INTEGRITY = 4      # transfer: sha256 mismatch
EXIT_CONNECTION = 5     # tunnel or relay lost after the session was up
EXIT_NO_SPACE = 6       # transfer: local or remote disk full
EXIT_CONFIG = 7         # console.yaml unreadable / invalid, operator key unusable
EXIT_BROKER = 8         # broker unreachable, TLS verification failed
EXIT_LOGIN = 9          # broker refused user/password (or vhost access)
EXIT_OFFLINE = 10       # no reply from the device within the timeout
EXIT_KEY = 11           # device key not pinned, changed without rotation, bad signature
EXIT_RELAY = 12         # relay unreachable, TLS failed, refused the pairing
EXIT_INTERRUPTED = 130  # Ctrl-C / SIGTERM

#: The fixed text of the agent's refusal of a session naming another relay than its own
#: (sent as ``malformed``, a code every console knows); consoles map it to EXIT_RELAY.
RELAY_MISMATCH_TEXT = "is not this device's relay"


def refusal_exit(code: str, reason: str) -> tuple:
    """(exit code, hint) for a ``session.refuse``: a relay mismatch is a relay problem
    (exit 12, docs/console.md), the rest a refusal (exit 3)."""
    if code == Reason.MALFORMED and RELAY_MISMATCH_TEXT in (reason or ""):
        return EXIT_RELAY, ("; the console's `relay` key must name the relay in the "
                            "device's remote.relays")
    return EXIT_REFUSED, ""


EXIT_NAMES = {
    EXIT_OK: "ok", EXIT_ERROR: "error", EXIT_USAGE: "usage", EXIT_REFUSED: "refused",
    EXIT_INTEGRITY: "integrity", EXIT_CONNECTION: "connection lost",
    EXIT_NO_SPACE: "no space", EXIT_CONFIG: "config", EXIT_BROKER: "broker",
    EXIT_LOGIN: "login refused", EXIT_OFFLINE: "device offline", EXIT_KEY: "device key",
    EXIT_RELAY: "relay", EXIT_INTERRUPTED: "interrupted",
}
