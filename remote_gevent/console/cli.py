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

# cli_keys registers keygen, devices, watch and pin on the group when imported; cli_tools
# check-config, doctor, ssh-config and completion.
from remote_gevent.console import cli_keys, cli_tools  # noqa: E402,F401
from remote_gevent.console.cli_base import (  # noqa: E402
    _ago,
    _cfg,
    _device_arg,
    _install_sigterm,
    _on_signal,
    _run,
    _say,
    device_argument,
    main,
)
from remote_gevent.wire.codes import VIRTUAL_TARGETS  # noqa: E402
from remote_gevent.crypto import aead_openssl  # noqa: E402

# The console's tunnels seal with OpenSSL's AES-256-GCM (same frames as libsodium's,
# ~3x less CPU per byte here); the agent keeps libsodium for memory (aead_openssl).
aead_openssl.use_backend("openssl")


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
    from remote_gevent.console.control_paths import ControlError, config_socket

    try:
        return config_socket(cfg, device)
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
        for sig in (signal.SIGTERM, signal.SIGHUP, signal.SIGINT):  # replaces _run's SIGINT
            _on_signal(sig, server.stop, signal.Signals(sig).name)
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
        from remote_gevent.console.stdio import install_close_signals, run_stdio

        cfg = _cfg(ctx)
        mode = master_mode or "use"
        if mode != "no":
            from remote_gevent.console.master import DEFAULT_PERSIST, run_stdio_client

            code = run_stdio_client(_control_path(cfg, device), device, target, mode,
                                    cfg.path, DEFAULT_PERSIST)
            if code is not None:
                return code
        install_close_signals()  # SIGHUP too: ssh's logout (issue 12)
        session = _open(ctx, device, [target])
        try:
            return run_stdio(session, target)
        finally:
            session.close("normal")

    _run(body)


def _print_status(status: dict) -> None:
    import time

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
        click.echo("(%d more not listed)" % (status["sessions_total"] - len(status["sessions"])))


def _all_statuses(control: Any, devices: List[str]) -> List[Any]:
    """``status`` of every device at once; a failure is kept as its ConsoleError."""
    import gevent

    from remote_gevent.console.config import ConsoleError

    def one(device: str) -> Any:
        try:
            return control.status(device)
        except ConsoleError as exc:
            return exc

    jobs = [gevent.spawn(one, d) for d in devices]
    gevent.joinall(jobs)
    return [j.value for j in jobs]


@main.command()
@click.argument("device", required=False, callback=_device_arg)
@click.option("--json", "as_json", is_flag=True, help="Machine-readable output.")
@click.pass_context
def sessions(ctx: click.Context, device: Optional[str], as_json: bool) -> None:
    """Sessions open (and waiting) on DEVICE, from its signed status reply; without
    DEVICE, on every pinned device (asked at once)."""
    def body() -> int:
        import json

        from remote_gevent.console.cli_tools import _pinned_devices
        from remote_gevent.console.config import ConsoleError
        from remote_gevent.console.control import ConsoleControl

        cfg = _cfg(ctx)
        if device is not None:
            with ConsoleControl(cfg) as control:
                status = control.status(device)
            if as_json:
                click.echo(json.dumps(status, indent=1, sort_keys=True))
            else:
                _print_status(status)
            return 0
        names = _pinned_devices(cfg)
        if not names:
            _say("no device pinned in %s yet (see `devices`)" % cfg.known_devices)
            return 0
        with ConsoleControl(cfg) as control:
            results = _all_statuses(control, names)
        failed = [(n, r) for n, r in zip(names, results) if isinstance(r, ConsoleError)]
        if as_json:
            click.echo(json.dumps({n: (r if not isinstance(r, ConsoleError) else
                                       {"error": r.message, "exit_code": r.exit_code})
                                   for n, r in zip(names, results)}, indent=1, sort_keys=True))
        else:
            for name, result in zip(names, results):
                if isinstance(result, ConsoleError):
                    click.echo("%s/%s: %s" % (cfg.server_id, name, result.message))
                else:
                    _print_status(result)
        return failed[0][1].exit_code if len(failed) == len(names) else 0

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
        from remote_gevent.console.config import EXIT_ERROR, ConsoleError
        from remote_gevent.console.control import ConsoleControl

        with ConsoleControl(_cfg(ctx)) as control:
            # A close has no reply: ask the signed status first, so that a mistyped or
            # finished session (or another operator's) is an error, not a silent 0.
            status = control.status(device)
            ours = [s["session_id"] for s in status["sessions"]]
            listed_all = status["sessions_total"] <= len(ours)
            if session_id not in ours and listed_all:
                raise ConsoleError("no session %s on %s that you may close (open: %s; see "
                                   "`sessions %s`)" % (session_id, device,
                                                       ", ".join(ours) or "none", device),
                                   EXIT_ERROR, "no_such_session")
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


quiet_option = click.option("-q", "--quiet", is_flag=True,
                            help="No progress bar and no summary line (errors only).")


@main.command()
@device_argument
@click.argument("local")
@click.argument("remote")
@click.option("--overwrite", is_flag=True, help="Replace an existing remote file.")
@click.option("--resume", is_flag=True, help="Continue an interrupted upload.")
@click.option("-r", "recursive", is_flag=True, help="Copy a directory tree.")
@quiet_option
@click.pass_context
def push(ctx: click.Context, device: str, local: str, remote: str, overwrite: bool,
         resume: bool, recursive: bool, quiet: bool) -> None:
    """Upload LOCAL to the absolute path REMOTE on DEVICE (@transfer)."""
    def body() -> int:
        from remote_gevent.console.transfer import run_push

        _install_sigterm()
        return _transfer(ctx, device, lambda factory: run_push(
            factory, local, remote, overwrite=overwrite, resume=resume, recursive=recursive,
            quiet=quiet))

    _run(body)


@main.command()
@device_argument
@click.argument("remote")
@click.argument("local")
@click.option("--overwrite", is_flag=True, help="Replace an existing local file.")
@click.option("--resume", is_flag=True, help="Continue an interrupted download.")
@click.option("-r", "recursive", is_flag=True, help="Copy a directory tree.")
@quiet_option
@click.pass_context
def pull(ctx: click.Context, device: str, remote: str, local: str, overwrite: bool,
         resume: bool, recursive: bool, quiet: bool) -> None:
    """Download the absolute path REMOTE on DEVICE to LOCAL (@transfer)."""
    def body() -> int:
        from remote_gevent.console.transfer import run_pull

        _install_sigterm()
        return _transfer(ctx, device, lambda factory: run_pull(
            factory, remote, local, resume=resume, recursive=recursive, overwrite=overwrite,
            quiet=quiet))

    _run(body)


if __name__ == "__main__":
    main(prog_name="remote-gevent-console")  # also names the shell-completion variable
