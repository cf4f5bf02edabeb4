"""Opening a virtual target: ``@transfer`` and ``@sftp`` streams on the agent.

The tunnel hands the agent's end of a socket pair to the server of the named target
(:mod:`transfer` or :mod:`sftp`), in a guarded greenlet.
"""

import functools
import logging
import socket
from typing import TYPE_CHECKING, Any, Callable, Dict, Optional
import gevent

from remote_gevent.wire.codes import VIRTUAL_SFTP, VIRTUAL_TARGETS, VIRTUAL_TRANSFER
from remote_gevent.wire.transfer_lines import (
    TARGET_REFUSED,
    TransferError,
)
from remote_gevent.agent.files.roots import (
    Roots,
)
from remote_gevent.agent.files.transfer import (
    serve_transfer_stream,
)

if TYPE_CHECKING:
    from remote_gevent.agent.config import TransferConfig

log = logging.getLogger(__name__)

def open_virtual_target(target: str, transfer_cfg: "TransferConfig", identity: Any = None,
                        on_result: Optional[Callable[[Dict[str, Any]], None]] = None,
                        log_ctx: str = "", preempt: Optional[Callable[[], int]] = None
                        ) -> socket.socket:
    """Serve ``@transfer`` / ``@sftp`` in-process; return the socket for the mux to splice.

    ``transfer_cfg`` is the agent's ``remote.transfer`` section; ``identity`` the
    agent's ``IdentityKey`` (or a callable returning it, or a paramiko key) — the SFTP
    host key. Raises ``TransferError`` (code ``target_refused``) when transfers are
    disabled or the target is unknown; mux turns it into OPEN_FAIL. ``preempt``: see
    ``transfer._lock_partial``.
    """
    roots = Roots.from_config(transfer_cfg)
    if target not in VIRTUAL_TARGETS:
        raise TransferError(TARGET_REFUSED, "unknown virtual target %s" % target)
    if not roots:
        raise TransferError(TARGET_REFUSED, "file transfer is disabled on this device "
                            "(remote.transfer.roots is empty)")
    host_key = None
    if target == VIRTUAL_SFTP:
        from remote_gevent.agent.files import sftp
        host_key = sftp.host_key_of(identity() if callable(identity) else identity)
    ours, theirs = socket.socketpair()
    if target == VIRTUAL_TRANSFER:
        gevent.spawn(_serve_guarded, functools.partial(serve_transfer_stream, preempt=preempt),
                     ours, roots, log_ctx, on_result)
    else:
        from remote_gevent.agent.files import sftp
        gevent.spawn(_serve_guarded, sftp.serve_sftp, ours, roots, log_ctx, on_result,
                     host_key)
    return theirs


def _serve_guarded(fn: Callable[..., Any], sock: Any, roots: Roots, log_ctx: str,
                   on_result: Any, *extra: Any) -> None:
    try:
        if extra:
            fn(sock, roots, *extra, log_ctx=log_ctx, on_result=on_result)
        else:
            fn(sock, roots, log_ctx=log_ctx, on_result=on_result)
    except Exception:  # noqa: BLE001 - one stream's bug ends that stream only
        log.exception("%s: %s server failed", log_ctx or "transfer", fn.__name__)
        try:
            sock.close()
        except OSError:
            pass
