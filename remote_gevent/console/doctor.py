"""``remote-gevent-console doctor``: every link of the chain checked, one line each.

Config, operator key, broker (reachable, TLS verified, login), relay (reachable,
certificate verified, days left), then per device: key pinned, online. A failed line
says what to change (the config key, the command to run). The exit code is the one the
first failure would give any other command (docs/console.md, "Exit codes"), so scripts
can act on it; 0 when everything passed.

Gevent-based (runs inside the monkey-patched console).
"""

from __future__ import annotations

import socket
import ssl
import time
from dataclasses import dataclass
from typing import Any, Callable, List, Optional, Sequence

from remote_gevent.console.config import (
    EXIT_BROKER,
    EXIT_CONFIG,
    EXIT_KEY,
    EXIT_LOGIN,
    EXIT_OFFLINE,
    EXIT_RELAY,
    ConsoleConfig,
    ConsoleError,
)

#: A relay certificate closer to expiry than this is reported (still ``ok``).
CERT_WARN_DAYS = 14


@dataclass
class Check:
    """One line of the report."""

    name: str
    ok: bool
    text: str
    fix: str = ""
    exit_code: int = 0

    def line(self) -> str:
        head = "ok  " if self.ok else "FAIL"
        tail = "" if self.ok or not self.fix else "  -> fix: %s" % self.fix
        return "%s  %-9s %s%s" % (head, self.name, self.text, tail)


def check_operator_key(cfg: ConsoleConfig) -> Check:
    from remote_gevent.crypto import identity

    try:
        key = identity.load(cfg.operator_key)
    except identity.IdentityError as exc:
        import os

        fix = ("create it: remote-gevent-console keygen" if not os.path.exists(cfg.operator_key)
               else "make it readable by you only (chmod 600 %s) or set operator_key"
               % cfg.operator_key)
        return Check("key", False, str(exc), fix, EXIT_CONFIG)
    return Check("key", True, "operator key %s readable (%s)" % (cfg.operator_key,
                                                               key.fingerprint))


def check_broker(cfg: ConsoleConfig) -> "tuple[Check, Any]":
    """(the check, a started ConsoleControl consuming the status queue, or None)."""
    from remote_gevent.console.control import ConsoleControl

    urls = ", ".join(cfg.amqp.urls)
    if not (cfg.user and cfg.password):
        return Check("broker", False, "no broker login in %s" % cfg.path,
                     "set user: and password: in %s" % cfg.path, EXIT_CONFIG), None
    try:
        control = ConsoleControl(cfg, consume_status=True).start()
    except ConsoleError as exc:
        if exc.exit_code == EXIT_LOGIN:
            fix = "check user: and password: in %s (the broker refused %s)" % (cfg.path,
                                                                              cfg.user)
        elif exc.exit_code == EXIT_CONFIG:
            fix = "correct the amqp: section of %s" % cfg.path
        else:
            fix = ("check amqp.urls (is the broker up and reachable from here?) and "
                   "amqp.ca_file (the CA that signed the broker's certificate) in %s"
                   % cfg.path)
        return Check("broker", False, "%s: %s" % (urls, exc.message), fix, exc.exit_code), None
    return Check("broker", True, "%s reachable, TLS verified, login as %s ok"
                 % (urls, cfg.user)), control


def check_relay(cfg: ConsoleConfig, address: Optional[str] = None) -> Check:
    """One relay (``address``; default the first configured): reachable, TLS verified."""
    from remote_gevent.common import tls
    from remote_gevent.common.configschema import split_host_port

    where = address or cfg.relay_address
    host, port = split_host_port(where)
    assert port is not None
    fix_ca = ("set relay_ca_file (or amqp.ca_file) in %s to the CA that signed the relay's "
              "certificate" % cfg.path)
    try:
        ctx = tls.client_context(cfg.relay_ca_file)
    except (tls.TLSConfigError, OSError) as exc:
        return Check("relay", False, str(exc), fix_ca, EXIT_CONFIG)
    try:
        raw = socket.create_connection((host, port), timeout=cfg.relay_timeout)
    except OSError as exc:
        return Check("relay", False, "%s unreachable: %s" % (where, exc.strerror or exc),
                     "check relay: in %s and that the relay runs" % cfg.path, EXIT_RELAY)
    try:
        with ctx.wrap_socket(raw, server_hostname=host) as conn:
            cert = conn.getpeercert() or {}
    except ssl.SSLCertVerificationError as exc:
        return Check("relay", False, "%s: certificate not valid: %s" % (
            where, exc.verify_message or exc), fix_ca, EXIT_RELAY)
    except (ssl.SSLError, OSError) as exc:
        return Check("relay", False, "%s: TLS failed: %s" % (where, exc), fix_ca, EXIT_RELAY)
    finally:
        raw.close()
    days = (ssl.cert_time_to_seconds(str(cert["notAfter"])) - time.time()) / 86400 \
        if "notAfter" in cert else None
    expiry = "" if days is None else ", certificate valid %d more days%s" % (
        days, " (renew soon)" if days < CERT_WARN_DAYS else "")
    return Check("relay", True, "%s reachable, TLS verified%s" % (where, expiry))


def check_devices(cfg: ConsoleConfig, control: Any, devices: Sequence[str]) -> List[Check]:
    """Pinned and online, per device (after reading the status queue)."""
    from remote_gevent.console.known_devices import KnownDevicesError

    checks: List[Check] = []
    if control is not None:
        control.sync_status()
    states = control.states.devices if control is not None else {}
    for device in devices:
        did = "%s/%s" % (cfg.server_id, device)
        try:
            pin = control.known.get(cfg.server_id, device) if control is not None else None
        except KnownDevicesError as exc:
            checks.append(Check("pinned", False, str(exc), "repair or move %s aside"
                                % cfg.known_devices, EXIT_CONFIG))
            continue
        if pin is None:
            checks.append(Check("pinned", False, "%s has no pinned key" % did,
                                "remote-gevent-console pin %s --wait 60 (then restart its "
                                "agent), or pin %s --key LINE from `remote-gevent pubkey`"
                                % (device, device), EXIT_KEY))
        else:
            checks.append(Check("pinned", True, "%s key %s (via %s)" % (did, pin.fingerprint,
                                                                       pin.via or "?")))
        if control is None:
            continue
        entry = states.get(did) or {}
        checks.append(_online(cfg, control, device, did, entry if pin is not None else None))
    return checks


def _online(cfg: ConsoleConfig, control: Any, device: str, did: str, entry: Any) -> Check:
    """A live signed ``status`` round trip (the device takes commands now), else the last
    alive the status queue brought. ``entry`` None: not pinned, no request possible."""
    from remote_gevent.console.cli_base import _ago
    from remote_gevent.console.device_states import device_status

    state = device_status(entry) if entry else "unknown"
    seen = _ago(entry.get("last_alive"), time.time()) if entry else "never"
    failure = ""
    if entry is not None:
        started = time.monotonic()
        try:
            status = control.status(device)
        except ConsoleError as exc:
            failure = exc.message
        else:
            return Check("online", True, "%s online: answered a status request in %.2f s "
                         "(%d sessions active)" % (did, time.monotonic() - started,
                                                   status["sessions_active"]))
    return Check("online", False, "%s %s (last alive %s)%s" % (
        did, state if state != "online" else "not answering",
        seen, ": %s" % failure if failure else ""),
        "start its agent (remote-gevent) and check in its log that it reaches the broker",
        EXIT_OFFLINE)


def run(cfg: ConsoleConfig, devices: Sequence[str], echo: Callable[[str], None],
        all_pinned: Optional[Callable[[], List[str]]] = None) -> int:
    """Print one line per check; return 0 or the exit code of the first failure."""
    checks = [check_operator_key(cfg)]
    echo(checks[-1].line())
    broker, control = check_broker(cfg)
    checks.append(broker)
    echo(broker.line())
    try:
        for relay in cfg.relay_pool:  # each relay of a pool (issue 13)
            checks.append(check_relay(cfg, relay))
            echo(checks[-1].line())
        if not devices and all_pinned is not None:
            devices = all_pinned()
        for check in check_devices(cfg, control, devices):
            checks.append(check)
            echo(check.line())
    finally:
        if control is not None:
            control.close()
    failed = [c for c in checks if not c.ok]
    return failed[0].exit_code if failed else 0


__all__ = ["Check", "run", "check_broker", "check_relay", "check_operator_key",
           "check_devices", "EXIT_BROKER"]
