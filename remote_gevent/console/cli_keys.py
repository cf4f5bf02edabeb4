"""Console commands for keys and devices: ``keygen``, ``devices``, ``watch``, ``pin``
(registered on the click group when :mod:`remote_gevent.console.cli` imports this)."""

from __future__ import annotations

import os
import sys
from typing import List, Optional

import click

from remote_gevent.console.cli_base import (
    _ago,
    _cfg,
    _install_sigterm,
    _run,
    _next_step,
    _say,
    device_argument,
    main,
)

# ----------------------------------------------------------------------------- keygen


@main.command()
@click.option("-f", "--file", "path", metavar="PATH", default=None,
              help="Key file (default: operator_key of the console config).")
@click.option("-C", "--comment", default=None, help="Comment of the public line.")
@click.option("--force", is_flag=True, help="Replace an existing key.")
@click.pass_context
def keygen(ctx: click.Context, path: Optional[str], comment: Optional[str], force: bool) -> None:
    """Create the operator ED25519 key (0600) and print its ssh-ed25519 line."""
    def body() -> int:
        import getpass
        import socket

        from remote_gevent.crypto import identity
        from remote_gevent.console.config import EXIT_ERROR, ConsoleError

        key_path = path or _cfg(ctx, allow_missing=True).operator_key
        if os.path.lexists(key_path) and not force:
            raise ConsoleError("%s already exists; use --force to replace it (devices that "
                               "trust the old key will refuse the new one)" % key_path,
                               EXIT_ERROR, "exists")
        key = identity.IdentityKey.generate()
        try:
            identity.write(key, key_path)
        except identity.IdentityError as exc:
            raise ConsoleError(str(exc), EXIT_ERROR, "io_error") from None
        line = key.public_line(comment or "%s@%s" % (getpass.getuser(), socket.gethostname()))
        try:
            with open(key_path + ".pub", "w") as fh:
                fh.write(line + "\n")
        except OSError as exc:
            _say("warning: cannot write %s.pub: %s" % (key_path, exc.strerror))
        click.echo(line)
        sys.stderr.write(
            "wrote %s (%s)\nAdd the line above to each device's remote.authorized_keys; to "
            "limit what this key may open, prefix it with permitopen options, e.g.:\n"
            "  permitopen=\"127.0.0.1:22\",permitopen=\"@transfer\" %s\n"
            % (key_path, key.fingerprint, line))
        return 0

    _run(body)


# ----------------------------------------------------------------------------- devices / watch


def _mtime(path: str) -> Optional[float]:
    import os

    try:
        return os.stat(path).st_mtime
    except OSError:
        return None


def _print_devices(rows: List[dict], now: float, stale: bool = False) -> None:
    """The devices table; ``stale``: the broker was not read now, so every state is the
    cached one and says so (issue 15: a device behind a dead broker showed "online")."""
    header = ("DEVICE", "STATE", "LAST ALIVE", "HEALTH", "SESSIONS", "VERSION", "KEY")
    table = [header]
    for r in rows:
        key = (r["fingerprint"] or "-") + ("" if r["pinned"] else " (not pinned)")
        if r.get("key_warning"):
            key += " KEY CHANGED WITHOUT VALID ROTATION"
        sessions = "-" if r["sessions_active"] is None else "%s/%s" % (r["sessions_active"],
                                                                        r["max_session"])
        resuming = (r.get("counters") or {}).get("resuming")
        if type(resuming) is int and resuming > 0:
            sessions += " (%d resuming)" % resuming
        table.append((r["device"], r["state"] + ("?" if stale else ""),
                      _ago(r["last_alive"], now),
                      "-" if r["health_check"] is None else "%gs" % r["health_check"],
                      sessions, r["version"] or "-", key))
    widths = [max(len(str(row[i])) for row in table) for i in range(len(header))]
    for row in table:
        click.echo("  ".join(str(c).ljust(w) for c, w in zip(row, widths)).rstrip())


@main.command()
@click.option("--json", "as_json", is_flag=True, help="Machine-readable output.")
@click.option("--cached", is_flag=True, help="Do not contact the broker; show the state file.")
@click.pass_context
def devices(ctx: click.Context, as_json: bool, cached: bool) -> None:
    """Devices seen: state (online/offline), last alive, health check, key fingerprint."""
    def body() -> int:
        import json
        import time

        from remote_gevent.console.config import ConsoleError
        from remote_gevent.console.device_states import DeviceStates, summarize
        from remote_gevent.console.known_devices import KnownDevices

        cfg = _cfg(ctx)
        failure: Optional[ConsoleError] = None
        if not cached:
            from remote_gevent.console.control import ConsoleControl

            try:
                with ConsoleControl(cfg, consume_status=True) as control:
                    control.sync_status()
            except ConsoleError as exc:
                failure = exc
                _say("%s%s; showing the cached state" % (exc.message, _next_step(exc)))
        now = time.time()
        rows = summarize(DeviceStates(cfg.state_file), KnownDevices(cfg.known_devices), now)
        stale = cached or failure is not None
        if stale and rows:
            saved = _mtime(cfg.state_file)
            _say("stale: the broker was %s; states (marked ?) are %s" % (
                "not asked (--cached)" if cached else "not reached",
                "as of %s" % _ago(saved, now) if saved else "unknown (nothing cached yet)"))
        if as_json:
            click.echo(json.dumps({"now": now, "devices": rows, "stale": stale}, indent=1,
                                  sort_keys=True))
        elif rows:
            _print_devices(rows, now, stale)
        else:
            _say("no device seen yet (devices announce themselves when their agent connects "
                 "and every health_check seconds)")
        return failure.exit_code if failure else 0

    _run(body)


@main.command()
@click.pass_context
def watch(ctx: click.Context) -> None:
    """Follow alive/key/close messages; print state changes as they happen (Ctrl-C ends)."""
    def body() -> int:
        import time

        import gevent

        from remote_gevent.console.alive_view import sessions_summary
        from remote_gevent.console.control import ConsoleControl
        from remote_gevent.console.device_states import DeviceEvent, device_status, offline_at

        cfg = _cfg(ctx)
        printed = {}
        summaries: dict = {}  # device -> the sessions summary printed last

        def stamp() -> str:
            return time.strftime("%Y-%m-%dT%H:%M:%S", time.localtime())

        def on_event(ev: DeviceEvent) -> None:
            if ev.transition is not None:
                printed[ev.device] = ev.transition
                click.echo("%s %s %s: %s" % (stamp(), ev.device, ev.transition.upper(), ev.text))
            elif ev.kind == "warning":
                click.echo("%s %s WARNING: %s" % (stamp(), ev.device, ev.text))
            elif ev.kind != "alive":
                click.echo("%s %s %s" % (stamp(), ev.device, ev.text))
            for note in ev.notes:  # a session started resuming / is back
                click.echo("%s %s %s" % (stamp(), ev.device, note))
            summary = sessions_summary(ev.entry) if ev.kind == "alive" else ""
            if summary and summary != summaries.get(ev.device):
                summaries[ev.device] = summary
                click.echo("%s %s %s  %s" % (stamp(), ev.device,
                                             device_status(ev.entry), summary))
            sys.stdout.flush()

        control = ConsoleControl(cfg, consume_status=True, on_event=on_event)
        for did, entry in sorted(control.states.devices.items()):
            printed[did] = device_status(entry)
            # figures as of the last alive: stale, so not shown, for a device not online
            summaries[did] = sessions_summary(entry) if printed[did] == "online" else ""
            click.echo("%s %s %s (last alive %s)%s" % (
                stamp(), did, printed[did], _ago(entry.get("last_alive"), time.time()),
                "  " + summaries[did] if summaries[did] else ""))
        _install_sigterm()
        control.start()
        try:
            while True:
                gevent.sleep(1.0)
                now = time.time()
                for did, entry in list(control.states.devices.items()):
                    state = device_status(entry, now)
                    if printed.get(did) not in (None, state) and state in ("offline",
                                                                           "stopped"):
                        limit = offline_at(entry)
                        click.echo("%s %s %s: no alive since %s (health_check %gs, offline "
                                   "after 3 missed)" % (
                                       stamp(), did, state.upper(),
                                       _ago(entry.get("last_alive"), now),
                                       entry.get("health_check") or 0)
                                   if limit else "%s %s %s" % (stamp(), did, state.upper()))
                        sys.stdout.flush()
                    printed[did] = state
                control.flush_known()
                control.states.flush()
        finally:
            control.close()

    _run(body, interrupted_code=0)


# ----------------------------------------------------------------------------- pin


@main.command()
@device_argument
@click.option("--key", "key_line", metavar="'ssh-ed25519 AAAA...'", default=None,
              help="Pin this key (from `remote-gevent pubkey` on the device).")
@click.option("--fingerprint", default=None, help="Require the key to have this fingerprint.")
@click.option("--replace", is_flag=True, help="With --key: replace a different pinned key.")
@click.option("--wait", "wait", type=float, default=0.0, metavar="SECONDS",
              help="Wait this long for the device's key announcement (agent (re)start).")
@click.option("--forget", is_flag=True, help="Remove the pin.")
@click.pass_context
def pin(ctx: click.Context, device: str, key_line: Optional[str], fingerprint: Optional[str],
        replace: bool, wait: float, forget: bool) -> None:
    """Pin DEVICE's key: from its key announcement (TOFU) or given with --key."""
    def body() -> int:
        import time

        import gevent

        from remote_gevent.console.config import EXIT_KEY, ConsoleError
        from remote_gevent.console.known_devices import (
            VIA_MANUAL,
            KeyChanged,
            KnownDevices,
            KnownDevicesError,
            Pin,
        )
        from remote_gevent.crypto.identity import fingerprint_of, parse_ssh_ed25519_line

        cfg = _cfg(ctx)
        known = KnownDevices(cfg.known_devices)
        try:
            if forget:
                done = known.forget(cfg.server_id, device)
                _say("%s/%s: %s" % (cfg.server_id, device, "pin removed" if done
                                    else "was not pinned"))
                return 0
            if key_line:
                try:
                    raw, _ = parse_ssh_ed25519_line(key_line)
                except ValueError as exc:
                    raise click.BadParameter(str(exc), param_hint="--key") from None
                if fingerprint and fingerprint_of(raw) != fingerprint:
                    raise ConsoleError("key %s does not have fingerprint %s"
                                       % (fingerprint_of(raw), fingerprint), EXIT_KEY,
                                       "fingerprint")
                p: Optional[Pin] = known.pin(cfg.server_id, device, raw, VIA_MANUAL,
                                             replace=replace)
                assert p is not None  # narrowed for the checker: pin() returns the pin
                click.echo("%s %s (pinned by hand)" % (p.device_id, p.fingerprint))
                return 0
            from remote_gevent.console.control import ConsoleControl

            with ConsoleControl(cfg, consume_status=True) as control:
                control.sync_status()
                deadline = time.monotonic() + wait
                p = known.get(cfg.server_id, device)
                while p is None and time.monotonic() < deadline:
                    gevent.sleep(0.2)
                    p = known.get(cfg.server_id, device)
            if p is None:
                raise ConsoleError(
                    "no key announcement from %s/%s in the status queue%s; the agent announces "
                    "its key when it connects: restart it and use --wait, or pin by hand with "
                    "--key after checking `remote-gevent pubkey` on the device"
                    % (cfg.server_id, device, " within %gs" % wait if wait else ""),
                    EXIT_KEY, "not_pinned")
            if fingerprint and p.fingerprint != fingerprint:
                raise ConsoleError("pinned key of %s is %s, not %s" % (
                    p.device_id, p.fingerprint, fingerprint), EXIT_KEY, "fingerprint")
            click.echo("%s %s (via %s)" % (p.device_id, p.fingerprint, p.via or "?"))
            return 0
        except KeyChanged as exc:
            raise ConsoleError(str(exc), EXIT_KEY, "key_changed") from None
        except KnownDevicesError as exc:
            from remote_gevent.console.config import EXIT_CONFIG

            raise ConsoleError(str(exc), EXIT_CONFIG, "known_devices") from None

    _run(body)


# ----------------------------------------------------------------------------- revocation


@main.command("revoke-fleet")
@click.argument("krl_file", metavar="KRL", type=click.Path(dir_okay=False))
@click.option("--sig", "sig_file", metavar="PATH", default=None,
              help="Its SSHSIG (default: KRL.sig, as `ssh-keygen -Y sign -n "
                   "remote-gevent-krl -f CA KRL` writes it).")
@click.pass_context
def revoke_fleet(ctx: click.Context, krl_file: str, sig_file: Optional[str]) -> None:
    """Publish a CA-signed KRL to every device of the server id (fleet-wide revocation:
    applied by online devices at once, by offline ones when they reconnect)."""
    def body() -> int:
        from remote_gevent.console.config import EXIT_USAGE, ConsoleError
        from remote_gevent.console.control import ConsoleControl
        from remote_gevent.wire import fleet

        cfg = _cfg(ctx)
        sig_path = sig_file or krl_file + ".sig"
        try:
            with open(krl_file, "rb") as f:
                krl = f.read(fleet.MAX_MESSAGE_BYTES + 1)
            with open(sig_path, encoding="ascii") as f:
                sig = f.read(4096)
            raw = fleet.encode_revocation(cfg.server_id, krl, sig)
        except (OSError, ValueError) as exc:
            raise ConsoleError("revoke-fleet: %s" % exc, EXIT_USAGE) from None
        with ConsoleControl(cfg) as control:
            control.link.publish(fleet.FLEET_EXCHANGE, fleet.routing_key(cfg.server_id), raw)
        _say("published %s (%d bytes, signed in %s) to every device of %s"
             % (krl_file, len(krl), sig_path, cfg.server_id))
        return 0

    _run(body)
