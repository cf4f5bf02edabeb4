"""The relay's settings (``RelaySettings``) and their defaults: what ``relay.cli`` builds
from flags and YAML and :class:`relay.server.Relay` runs with."""

from typing import NamedTuple, Optional, Tuple

from remote_gevent.wire.rendezvous import DEFAULT_PAIRING_TIMEOUT

DEFAULT_PORT = 8443
DEFAULT_HANDSHAKE_TIMEOUT = 10.0
DEFAULT_HELLO_TIMEOUT = 5.0
DEFAULT_MAX_PENDING = 1000
DEFAULT_MAX_PAIRED = 10000
DEFAULT_MAX_PENDING_PER_IP = 50
DEFAULT_IDLE_TIMEOUT = 7200.0
DEFAULT_GRACE = 30.0
DEFAULT_BUFFER_SIZE = 256 * 1024


class RelaySettings(NamedTuple):
    """Everything the relay needs; ``relay_cli`` builds it from flags and YAML."""

    host: str = "127.0.0.1"
    port: int = DEFAULT_PORT
    cert_file: Optional[str] = None
    key_file: Optional[str] = None
    pairing_timeout: float = DEFAULT_PAIRING_TIMEOUT
    handshake_timeout: float = DEFAULT_HANDSHAKE_TIMEOUT
    max_pending: int = DEFAULT_MAX_PENDING
    max_paired: int = DEFAULT_MAX_PAIRED
    max_pending_per_ip: int = DEFAULT_MAX_PENDING_PER_IP
    idle_timeout: float = DEFAULT_IDLE_TIMEOUT
    grace: float = DEFAULT_GRACE
    buffer_size: int = DEFAULT_BUFFER_SIZE
    #: TLS handshake + hello of a new connection (and never longer than
    #: ``handshake_timeout``); short, because a half-open connection holds a pending slot.
    hello_timeout: float = DEFAULT_HELLO_TIMEOUT
    proxy_protocol: bool = False  # a PROXY v1/v2 header first (relay/proxy_protocol.py)
    #: A pool routing by session id (relay/routing.py): every relay's direct address,
    #: this relay's own entry, the shared secret of forwarded hellos, the CA that verifies
    #: peers (None: the system's), the probe period. No ``pool_peers``: no routing.
    pool_peers: Tuple[str, ...] = ()
    pool_self: Optional[str] = None
    pool_secret_file: Optional[str] = None
    pool_ca_file: Optional[str] = None
    pool_probe_interval: float = 1.0
