import sys

# Fast path (issue 6, docs/console.md "Session reuse"): ``stdio`` through a running
# master needs none of gevent, amqp, nacl, yaml or click. master.py's client half imports
# only os/socket/selectors; anything it does not handle falls through to the full path.
if "stdio" in sys.argv[1:]:
    from remote_gevent.console.master import fast_stdio, is_console_entry

    if is_console_entry(sys.argv[0]):
        _fast_code = fast_stdio(sys.argv)
        if _fast_code is not None:
            sys.exit(_fast_code)


def _patch_all() -> None:
    """``monkey.patch_all()``, minus ~100 ms of repeated plugin look-ups.

    gevent announces each patched module to ``gevent.plugins.monkey.*`` entry points,
    re-reading every installed distribution's metadata each time (25 scans). One scan,
    shared by those calls, gives the same answer.
    """
    from gevent import monkey

    try:
        from importlib import metadata
    except ImportError:  # pragma: no cover - Python < 3.8
        monkey.patch_all()
        return
    real = metadata.entry_points
    every: list = []

    def entry_points(**params):  # type: ignore[no-untyped-def]
        if not every:
            every.append(real())
        found = every[0]
        return found.select(**params) if params else found

    metadata.entry_points = entry_points  # type: ignore[assignment]
    try:
        monkey.patch_all()
    finally:
        metadata.entry_points = real  # type: ignore[assignment]


_patch_all()  # before any other import: socket, ssl, amqp must be patched

# ``remote-gevent-console``: the operator's command line (docs/console.md).
#
# Cold start matters (issue 6: ``stdio`` as an ssh ProxyCommand is launched per
# connection), so this module imports only click at the top; every command imports the
# modules it needs (amqp, nacl, mux, ...) inside its body.
#
# Every expected failure is a ConsoleError / ConfigError: one line on stderr and an exit
# code from remote_gevent.console.config (EXIT_*), never a traceback.

import os  # noqa: E402
from typing import Any, Callable, List, Optional  # noqa: E402

import click  # noqa: E402
from remote_gevent.wire.codes import VIRTUAL_TARGETS  # noqa: E402

PROG = "remote-gevent-console"
ENV_CONFIG = "REMOTE_GEVENT_CONSOLE_CONFIG"  # = console.config.ENV_CONFIG (kept import-free)


def _version() -> str:
    from remote_gevent import __version__

    return __version__


def _say(text: str) -> None:
    sys.stderr.write("%s: %s\n" % (PROG, text))
    sys.stderr.flush()


def _setup_logging(verbose: int) -> None:
    import logging

    level = logging.WARNING if verbose <= 0 else logging.INFO if verbose == 1 else logging.DEBUG
    logging.basicConfig(level=level, stream=sys.stderr,
                        format="%s: %%(levelname)s %%(name)s: %%(message)s" % PROG)


def _install_sigterm() -> None:
    """SIGTERM behaves like Ctrl-C: KeyboardInterrupt in the main greenlet."""
    import signal

    import gevent

    main = gevent.getcurrent()
    gevent.signal_handler(signal.SIGTERM, gevent.kill, main, KeyboardInterrupt)


def _run(fn: Callable[[], Optional[int]], interrupted_code: Optional[int] = None) -> None:
    """Run a command body; turn expected failures into one line and an exit code."""
    from remote_gevent.console.config import (
        EXIT_CONFIG,
        EXIT_INTERRUPTED,
        ConfigError,
        ConsoleError,
    )

    try:
        code = fn()
    except ConsoleError as exc:
        _say(exc.message)
        sys.exit(exc.exit_code)
    except ConfigError as exc:
        for problem in exc.problems:
            _say(problem)
        sys.exit(EXIT_CONFIG)
    except KeyboardInterrupt:
        sys.exit(EXIT_INTERRUPTED if interrupted_code is None else interrupted_code)
    sys.exit(code or 0)


def _cfg(ctx: click.Context, allow_missing: bool = False) -> Any:
    from remote_gevent.console import config

    obj = ctx.find_root().obj
    cfg = config.load(obj["config_path"], allow_missing=allow_missing)
    for warning in cfg.warnings:
        _say("warning: %s" % warning)
    return cfg


def _device_arg(ctx: click.Context, param: Any, value: str) -> str:
    import re

    if not re.match(r"^[A-Za-z0-9_-]{1,64}$", value or ""):
        raise click.BadParameter("expected a device ident ([A-Za-z0-9_-]{1,64})")
    return value


device_argument = click.argument("device", callback=_device_arg)


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
@click.option("-c", "--config", "config_path", metavar="PATH", envvar=ENV_CONFIG, default=None,
              help="Console config (default: $%s or ~/.config/remote-gevent/console.yaml)."
              % ENV_CONFIG)
@click.option("-v", "--verbose", count=True, help="More logging on stderr (-vv: debug).")
@click.version_option(version=_version(), prog_name=PROG, message="%(prog)s %(version)s")
@click.pass_context
def main(ctx: click.Context, config_path: Optional[str], verbose: int) -> None:
    """Operator console: tunnels to devices behind NAT (forward, socks, stdio, push, pull)."""
    _setup_logging(verbose)
    ctx.obj = {"config_path": config_path, "verbose": verbose}


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


def _ago(ts: Optional[float], now: float) -> str:
    if ts is None:
        return "never"
    d = max(0, int(now - ts))
    if d < 120:
        return "%ds ago" % d
    if d < 7200:
        return "%dm ago" % (d // 60)
    if d < 172800:
        return "%dh ago" % (d // 3600)
    return "%dd ago" % (d // 86400)


def _print_devices(rows: List[dict], now: float) -> None:
    header = ("DEVICE", "STATE", "LAST ALIVE", "HEALTH", "SESSIONS", "VERSION", "KEY")
    table = [header]
    for r in rows:
        key = (r["fingerprint"] or "-") + ("" if r["pinned"] else " (not pinned)")
        if r.get("key_warning"):
            key += " KEY CHANGED WITHOUT VALID ROTATION"
        sessions = "-" if r["sessions_active"] is None else "%s/%s" % (r["sessions_active"],
                                                                        r["max_session"])
        table.append((r["device"], r["state"], _ago(r["last_alive"], now),
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
                _say("%s; showing the cached state" % exc.message)
        now = time.time()
        rows = summarize(DeviceStates(cfg.state_file), KnownDevices(cfg.known_devices), now)
        if as_json:
            click.echo(json.dumps({"now": now, "devices": rows}, indent=1, sort_keys=True))
        elif rows:
            _print_devices(rows, now)
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

        from remote_gevent.console.control import ConsoleControl
        from remote_gevent.console.device_states import DeviceEvent, device_status, offline_at

        cfg = _cfg(ctx)
        printed = {}

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
            sys.stdout.flush()

        control = ConsoleControl(cfg, consume_status=True, on_event=on_event)
        for did, entry in sorted(control.states.devices.items()):
            printed[did] = device_status(entry)
            click.echo("%s %s %s (last alive %s)" % (stamp(), did, printed[did],
                                                     _ago(entry.get("last_alive"), time.time())))
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
                control.states.flush()
        finally:
            control.close()

    _run(body, interrupted_code=0)


# ----------------------------------------------------------------------------- sessions


def _open(ctx: click.Context, device: str, targets: List[str]) -> Any:
    from remote_gevent.console.session import open_session

    cfg = _cfg(ctx)
    return open_session(cfg, device, targets)


def _spec(parser: Callable[[str], Any]) -> Callable[..., Any]:
    def callback(ctx: click.Context, param: Any, value: Any) -> Any:
        from remote_gevent.console.forward import SpecError

        try:
            if isinstance(value, tuple):
                return [parser(v) for v in value]
            return parser(value)
        except SpecError as exc:
            raise click.BadParameter(str(exc)) from None
    return callback


def _parse_forward(v: str) -> Any:
    from remote_gevent.console.forward import parse_forward_spec
    return parse_forward_spec(v)


def _parse_listen(v: str) -> Any:
    from remote_gevent.console.forward import parse_listen_spec
    return parse_listen_spec(v)


def _parse_stream_target(v: str) -> str:
    from remote_gevent.console.forward import SpecError, make_target, split_fields

    if v in VIRTUAL_TARGETS:
        return v
    fields = split_fields(v)
    if len(fields) != 2 or not fields[1].isdigit():
        raise SpecError("expected host:port (IPv6 as [addr]:port), @sftp or @transfer")
    return make_target(fields[0].lstrip("["), int(fields[1]))


def _listen(host: str, port: int) -> Any:
    from remote_gevent.console.config import EXIT_ERROR, ConsoleError
    from remote_gevent.common.addresses import format_address
    from remote_gevent.console.forward import listen

    try:
        return listen(host, port)
    except OSError as exc:
        raise ConsoleError("cannot listen on %s: %s" % (format_address(host or "*", port),
                                                         exc.strerror or exc),
                           EXIT_ERROR, "listen") from None


@main.command()
@device_argument
@click.option("-L", "specs", metavar="[BIND:]PORT:HOST:HOSTPORT", multiple=True, required=True,
              callback=_spec(_parse_forward),
              help="Forward local PORT to HOST:HOSTPORT as seen from the device (repeatable).")
@click.pass_context
def forward(ctx: click.Context, device: str, specs: List[Any]) -> None:
    """Local port forwarding through one session, like ssh -L."""
    def body() -> int:
        from remote_gevent.console.forward import run_forward

        listeners = [(_listen(s.bind_host, s.bind_port), s) for s in specs]
        targets = sorted(set(s.target for s in specs))
        _install_sigterm()
        session = _open(ctx, device, targets)
        try:
            return run_forward(session, listeners)
        finally:
            session.close()

    _run(body, interrupted_code=0)


@main.command()
@device_argument
@click.option("-D", "spec", metavar="[BIND:]PORT", required=True, callback=_spec(_parse_listen),
              help="SOCKS5 listen address (default bind 127.0.0.1).")
@click.pass_context
def socks(ctx: click.Context, device: str, spec: Any) -> None:
    """SOCKS5 server (CONNECT; names resolved on the device), like ssh -D."""
    def body() -> int:
        from remote_gevent.console.socks import SESSION_TARGETS, run_socks

        listener = _listen(*spec)
        _install_sigterm()
        session = _open(ctx, device, list(SESSION_TARGETS))
        try:
            return run_socks(session, listener, verbose=ctx.find_root().obj["verbose"] > 0)
        finally:
            session.close()

    _run(body, interrupted_code=0)


def _control_path(cfg: Any, device: str) -> str:
    from remote_gevent.console.config import EXIT_ERROR, ConsoleError
    from remote_gevent.console.master import ControlError, socket_path

    try:
        return socket_path(cfg.control_socket_dir, cfg.server_id, device)
    except ControlError as exc:
        raise ConsoleError(str(exc), EXIT_ERROR, "control_socket") from None


master_option = click.option(
    "--master", "master_mode", type=click.Choice(["use", "auto", "no"]), default=None,
    help="Session reuse: use a running master (default), auto: start one in the "
         "background if none runs (persist %gs), no: own session." % 600.0)


@main.command()
@device_argument
@click.argument("targets", nargs=-1, callback=_spec(_parse_stream_target))
@click.option("--persist", type=float, default=None, metavar="SECONDS",
              help="Exit after SECONDS without clients (default 600; 0: never).")
@click.option("--stop", is_flag=True, help="Ask the running master of DEVICE to exit.")
@click.option("--ready-fd", type=int, default=None, hidden=True)
@click.pass_context
def master(ctx: click.Context, device: str, targets: List[str], persist: Optional[float],
           stop: bool, ready_fd: Optional[int]) -> None:
    """Hold a session to DEVICE for later commands (like ssh -M -N; TARGETS: extra, e.g. @sftp)."""
    ready: List[Optional[int]] = [ready_fd]

    def report(line: str) -> None:
        fd = ready[0]
        if fd is not None:
            ready[0] = None
            try:
                os.write(fd, line.encode("utf-8", "replace") + b"\n")
                os.close(fd)
            except OSError:
                pass

    def body() -> int:
        import signal

        import gevent

        from remote_gevent.console import master as cm
        from remote_gevent.console.config import EXIT_ERROR, ConsoleError
        from remote_gevent.console.master_server import Master
        from remote_gevent.console.session import open_session

        cfg = _cfg(ctx)
        path = _control_path(cfg, device)
        if stop:
            if not cm.stop_master(path):
                raise ConsoleError("no master running for %s (%s)" % (device, path),
                                   EXIT_ERROR, "no_master")
            _say("master of %s asked to exit" % device)
            return 0
        wait = cm.DEFAULT_PERSIST if persist is None else persist
        server = Master(path, wait)
        try:
            locked = server.lock()
        except (cm.ControlError, OSError) as exc:
            raise ConsoleError("control socket %s: %s" % (path, exc), EXIT_ERROR,
                               "control_socket") from None
        if not locked:
            if ready[0] is not None:  # auto start raced another one: that one serves
                report("OK")
                return 0
            raise ConsoleError("a master for %s already runs (%s)" % (device, path),
                               EXIT_ERROR, "master_running")
        try:
            server.session = open_session(cfg, device, list(cm.SESSION_TARGETS) + [
                t for t in targets if t not in cm.SESSION_TARGETS])
            try:
                server.bind()
            except OSError as exc:
                server.session.close("normal")
                raise ConsoleError("cannot listen on %s: %s" % (path, exc.strerror or exc),
                                   EXIT_ERROR, "control_socket") from None
        except ConsoleError as exc:
            server.cleanup()
            report("ERR %d %s" % (exc.exit_code, exc.message))
            raise
        gevent.signal_handler(signal.SIGTERM, server.stop, "SIGTERM")
        gevent.signal_handler(signal.SIGHUP, server.stop, "SIGHUP")
        _say("master of %s on %s (session %s, persist %s)" % (
            device, path, server.session.session_id,
            "%gs" % wait if wait > 0 else "until stopped"))
        report("OK")
        try:
            code = server.serve()
        finally:
            server.cleanup()
            server.session.close("normal")
        _say("master of %s exits: %s (%d streams served)" % (device, server.reason,
                                                             server.served))
        return code

    try:
        _run(body, interrupted_code=0)
    finally:
        report("ERR 1 the master failed before listening")


@main.command()
@device_argument
@click.argument("target", callback=_spec(_parse_stream_target))
@master_option
@click.pass_context
def stdio(ctx: click.Context, device: str, target: str, master_mode: Optional[str]) -> None:
    """One stream on stdin/stdout (an ssh ProxyCommand: stdio %n 127.0.0.1:22)."""
    def body() -> int:
        from remote_gevent.console.stdio import run_stdio

        cfg = _cfg(ctx)
        mode = master_mode or "use"
        if mode != "no":
            from remote_gevent.console.master import DEFAULT_PERSIST, run_stdio_client

            code = run_stdio_client(_control_path(cfg, device), device, target, mode,
                                    cfg.path, DEFAULT_PERSIST)
            if code is not None:
                return code
        _install_sigterm()
        session = _open(ctx, device, [target])
        try:
            return run_stdio(session, target)
        finally:
            session.close("normal")

    _run(body)


@main.command()
@device_argument
@click.option("--json", "as_json", is_flag=True, help="Machine-readable output.")
@click.pass_context
def sessions(ctx: click.Context, device: str, as_json: bool) -> None:
    """Sessions open (and waiting) on DEVICE, from its signed status reply."""
    def body() -> int:
        import json
        import time

        from remote_gevent.console.control import ConsoleControl

        with ConsoleControl(_cfg(ctx)) as control:
            status = control.status(device)
        if as_json:
            click.echo(json.dumps(status, indent=1, sort_keys=True))
            return 0
        click.echo("%s/%s: %d active, %d waiting (max_session %d), version %s, up %ds, key %s"
                   % (status["server_id"], status["ident"], status["sessions_active"],
                      status["sessions_waiting"], status["max_session"], status["version"],
                      int(status["uptime"]), status["fingerprint"]))
        now = time.time()
        rows = [("SESSION", "STATE", "SINCE", "OPERATOR", "REMOTE IP", "IN", "OUT", "TARGETS")]
        for s in status["sessions"]:
            rows.append((s["session_id"], s["state"], _ago(s["since"], now), s["operator"] or "-",
                         s["remote_ip"] or "-", str(s["bytes_in"]), str(s["bytes_out"]),
                         ",".join(s["targets"])))
        if len(rows) > 1:
            widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
            for r in rows:
                click.echo("  ".join(c.ljust(w) for c, w in zip(r, widths)).rstrip())
        if status["sessions_total"] > len(status["sessions"]):
            click.echo("(%d more not listed)" % (status["sessions_total"]
                                                  - len(status["sessions"])))
        return 0

    _run(body)


@main.command()
@device_argument
@click.argument("session_id")
@click.pass_context
def close(ctx: click.Context, device: str, session_id: str) -> None:
    """Ask DEVICE to close session SESSION_ID (code closed_by_operator)."""
    import re

    if not re.match(r"^[0-9a-f]{32}$", session_id):
        raise click.BadParameter("expected 32 lowercase hex characters",
                                 param_hint="SESSION_ID")

    def body() -> int:
        from remote_gevent.console.control import ConsoleControl

        with ConsoleControl(_cfg(ctx)) as control:
            control.close_session(device, session_id)
        _say("close of session %s requested on %s (the device confirms with a session.close on "
             "remote.up: see `watch`)" % (session_id, device))
        return 0

    _run(body)


# ----------------------------------------------------------------------------- transfer


def _transfer(ctx: click.Context, device: str, run: Callable[[Callable[[], Any]], int]) -> int:
    session = _open(ctx, device, ["@transfer"])
    try:
        return run(lambda: session.open_stream("@transfer"))
    finally:
        session.close("normal")


@main.command()
@device_argument
@click.argument("local")
@click.argument("remote")
@click.option("--overwrite", is_flag=True, help="Replace an existing remote file.")
@click.option("--resume", is_flag=True, help="Continue an interrupted upload.")
@click.option("-r", "recursive", is_flag=True, help="Copy a directory tree.")
@click.pass_context
def push(ctx: click.Context, device: str, local: str, remote: str, overwrite: bool,
         resume: bool, recursive: bool) -> None:
    """Upload LOCAL to the absolute path REMOTE on DEVICE (@transfer)."""
    def body() -> int:
        from remote_gevent.console.transfer import run_push

        _install_sigterm()
        return _transfer(ctx, device, lambda factory: run_push(
            factory, local, remote, overwrite=overwrite, resume=resume, recursive=recursive))

    _run(body)


@main.command()
@device_argument
@click.argument("remote")
@click.argument("local")
@click.option("--resume", is_flag=True, help="Continue an interrupted download.")
@click.option("-r", "recursive", is_flag=True, help="Copy a directory tree.")
@click.pass_context
def pull(ctx: click.Context, device: str, remote: str, local: str, resume: bool,
         recursive: bool) -> None:
    """Download the absolute path REMOTE on DEVICE to LOCAL (@transfer)."""
    def body() -> int:
        from remote_gevent.console.transfer import run_pull

        _install_sigterm()
        return _transfer(ctx, device, lambda factory: run_pull(
            factory, remote, local, resume=resume, recursive=recursive))

    _run(body)


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
                p = known.pin(cfg.server_id, device, raw, VIA_MANUAL, replace=replace)
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


if __name__ == "__main__":
    main()
