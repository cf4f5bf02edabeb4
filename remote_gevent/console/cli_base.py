"""The console's click group and what every command shares: config loading, one-line
errors with their exit codes, logging, the device argument.

Imported by :mod:`remote_gevent.console.cli` after its monkey patch; the commands live
in ``cli.py`` (sessions and transfers) and ``cli_keys.py`` (keys and devices).
"""

from __future__ import annotations

import sys
from typing import Any, Callable, Dict, Optional
import click


PROG = "remote-gevent-console"
ENV_CONFIG = "REMOTE_GEVENT_CONSOLE_CONFIG"  # = console.config.ENV_CONFIG (kept import-free)


def _version() -> str:
    from remote_gevent import __version__

    return __version__


def _version_message() -> str:
    from remote_gevent import VERSION_MESSAGE

    return VERSION_MESSAGE


def _say(text: str) -> None:
    sys.stderr.write("%s: %s\n" % (PROG, text))
    sys.stderr.flush()


def _setup_logging(verbose: int) -> None:
    """Log records only with -v; without it, errors as plain ``PROG: message`` lines."""
    from remote_gevent.common import logs

    logs.setup_console(PROG, verbose)


_SIGNAL_WATCHERS: Dict[int, Any] = {}


def _on_signal(sig: int, handler: Callable[..., Any], *args: Any) -> None:
    """``gevent.signal_handler``, replacing this process's earlier one for ``sig``: two
    watchers would both fire, and a second KeyboardInterrupt would land in the cleanup."""
    import gevent

    old = _SIGNAL_WATCHERS.pop(sig, None)
    if old is not None:
        old.cancel()
    _SIGNAL_WATCHERS[sig] = gevent.signal_handler(sig, handler, *args)


def _interrupt_main(*signals: int) -> None:
    """``signals`` raise KeyboardInterrupt in the main greenlet (the command's body).

    Python's own SIGINT handler raises it in whichever greenlet happens to run (often
    the tunnel's reader): gevent then prints "KeyboardInterrupt" and a bare
    "<timestamp>" line, and the command's cleanup (keeping a pull's partial) never sees
    it (issue 15).
    """
    import gevent

    main = gevent.getcurrent()
    for sig in signals:
        _on_signal(sig, gevent.kill, main, KeyboardInterrupt)


def _install_sigterm() -> None:
    """SIGTERM behaves like Ctrl-C: KeyboardInterrupt in the main greenlet."""
    import signal

    _interrupt_main(signal.SIGTERM, signal.SIGINT)


def _run(fn: Callable[[], Optional[int]], interrupted_code: Optional[int] = None) -> None:
    """Run a command body; turn expected failures into one line and an exit code."""
    from remote_gevent.console.config import (
        EXIT_CONFIG,
        EXIT_INTERRUPTED,
        ConfigError,
        ConsoleError,
    )

    import signal

    _interrupt_main(signal.SIGINT)  # every command: Ctrl-C is one line, never a traceback
    try:
        code = fn()
    except ConsoleError as exc:
        _say(_explain(exc) + _next_step(exc))
        sys.exit(exc.exit_code)
    except ConfigError as exc:
        for problem in exc.problems:
            _say(problem)
        sys.exit(EXIT_CONFIG)
    except KeyboardInterrupt:
        _say("interrupted")
        sys.exit(EXIT_INTERRUPTED if interrupted_code is None else interrupted_code)
    sys.exit(code or 0)


def _explain(exc: Any) -> str:
    """The error's line; a device never pinned nor seen is called unknown (a typo?), with
    the devices that are known, instead of advice to pin it."""
    ctx = click.get_current_context(silent=True)
    obj = ctx.find_root().obj if ctx is not None else None
    if exc.code != "not_pinned" or not obj or not obj.get("cfg") or not obj.get("device"):
        return exc.message
    from remote_gevent.console.cli_tools import unknown_device_message

    try:
        return unknown_device_message(obj["cfg"], obj["device"]) or exc.message
    except (OSError, ValueError, KeyError):  # a hint must never hide the real error
        return exc.message


def _config_shown() -> str:
    """The console config in use, for hints (``-c``, else the env/default path)."""
    from remote_gevent.console.config import default_path

    ctx = click.get_current_context(silent=True)
    path = ctx.find_root().obj.get("config_path") if ctx is not None and ctx.find_root().obj \
        else None
    return path or default_path()


def _next_step(exc: Any) -> str:
    """What to check next, for the failures whose bare text names only an address
    (issue 15: "cannot connect to 127.0.0.1:55729" said neither what nor where)."""
    from remote_gevent.console.config import EXIT_BROKER, EXIT_RELAY

    text = exc.message.lower()
    if exc.exit_code == EXIT_BROKER and "broker" not in text.split(":", 1)[0]:
        if "certificate" in text or "tls" in text:
            return " (broker TLS: check amqp.ca_file and the host in amqp.urls in %s)" \
                % _config_shown()
        return " (the broker: check amqp.urls in %s and that the broker runs)" \
            % _config_shown()
    if exc.exit_code == EXIT_RELAY and "relay" not in text:
        return " (the relay: check relay and relay_ca_file in %s)" % _config_shown()
    return ""


def _cfg(ctx: click.Context, allow_missing: bool = False) -> Any:
    from remote_gevent.console import config

    obj = ctx.find_root().obj
    cfg = config.load(obj["config_path"], allow_missing=allow_missing)
    obj["cfg"] = cfg
    for warning in cfg.warnings:
        _say("warning: %s" % warning)
    return cfg


def _device_arg(ctx: click.Context, param: Any, value: Optional[str]) -> Optional[str]:
    import re

    if value is None and not param.required:
        return None
    if not re.match(r"^[A-Za-z0-9_-]{1,64}$", value or ""):
        raise click.BadParameter("expected a device ident ([A-Za-z0-9_-]{1,64})")
    obj = ctx.find_root().obj
    if isinstance(obj, dict):
        obj["device"] = value  # for _explain
    return value


device_argument = click.argument("device", callback=_device_arg)


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
@click.option("-c", "--config", "config_path", metavar="PATH", envvar=ENV_CONFIG, default=None,
              help="Console config (default: $%s or ~/.config/remote-gevent/console.yaml)."
              % ENV_CONFIG)
@click.option("-v", "--verbose", count=True, help="More logging on stderr (-vv: debug).")
@click.version_option(version=_version(), prog_name=PROG, message=_version_message())
@click.pass_context
def main(ctx: click.Context, config_path: Optional[str], verbose: int) -> None:
    """Operator console: tunnels to devices behind NAT (forward, socks, stdio, push, pull)."""
    _setup_logging(verbose)
    ctx.obj = {"config_path": config_path, "verbose": verbose}


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
