"""Console commands that help set things up (issue 15): ``check-config``, ``doctor``,
``ssh-config`` and ``completion`` (registered on the click group when
:mod:`remote_gevent.console.cli` imports this module)."""

from __future__ import annotations

import sys
from typing import Any, List, Optional, Tuple

import click

from remote_gevent.console.cli_base import PROG, _cfg, _device_arg, _run, main


def _pinned_devices(cfg: Any) -> List[str]:
    """Idents pinned for this config's server id, sorted."""
    from remote_gevent.console.known_devices import KnownDevices

    return sorted(p.ident for p in KnownDevices(cfg.known_devices).all()
                  if p.server_id == cfg.server_id)


def _devices_arg(ctx: click.Context, param: Any, value: Tuple[str, ...]) -> Tuple[str, ...]:
    return tuple(str(_device_arg(ctx, param, v)) for v in value)


devices_argument = click.argument("devices", nargs=-1, metavar="[DEVICE]...",
                                  callback=_devices_arg)


# ----------------------------------------------------------------------------- check-config


@main.command("check-config")
@click.pass_context
def check_config(ctx: click.Context) -> None:
    """Validate the console config: exit 0 with a summary, or 7 listing every problem."""
    def body() -> int:
        from remote_gevent.console.config import ConfigError

        try:
            cfg = _cfg(ctx)
        except ConfigError as exc:  # add the missing login, so that every problem is listed
            raise ConfigError(list(exc.problems) + _missing_login(ctx, exc)) from None
        cfg.require_broker()
        click.echo("%s: ok (server_id %s, broker %s as %s, relay %s, operator key %s, "
                   "known devices %s)" % (cfg.path, cfg.server_id, ", ".join(cfg.amqp.urls),
                                          cfg.user, ", ".join(cfg.relay_pool), cfg.operator_key,
                                          cfg.known_devices))
        return 0

    _run(body)


def _missing_login(ctx: click.Context, exc: Any) -> List[str]:
    """``require_broker``'s problems for a file that failed validation elsewhere."""
    from remote_gevent.common.configschema import read_document
    from remote_gevent.console.config import default_path

    path = ctx.find_root().obj["config_path"] or default_path()
    try:
        data = read_document(path)
    except (OSError, ValueError):
        return []
    if not isinstance(data, dict):
        return []
    return ["%s: %s: required to talk to the broker (missing)" % (path, k)
            for k in ("user", "password") if not data.get(k)
            and not any(p.startswith("%s: %s:" % (path, k)) for p in exc.problems)]


# ----------------------------------------------------------------------------- doctor


@main.command()
@devices_argument
@click.pass_context
def doctor(ctx: click.Context, devices: Tuple[str, ...]) -> None:
    """Check config, operator key, broker, relay and devices (default: every pinned one);
    one line each, with the fix."""
    def body() -> int:
        from remote_gevent.console import doctor as doctor_mod

        cfg = _cfg(ctx)
        click.echo("ok    config    %s valid" % cfg.path)
        return doctor_mod.run(cfg, list(devices), click.echo,
                              all_pinned=lambda: _pinned_devices(cfg))

    _run(body)


# ----------------------------------------------------------------------------- ssh-config


@main.command("ssh-config")
@devices_argument
@click.option("--user", "-l", "user", default="", metavar="USER",
              help="Login for the device's sshd (User line; default: ssh's).")
@click.option("--target", default="127.0.0.1:22", metavar="HOST:PORT",
              help="The sshd as seen from the device (default 127.0.0.1:22).")
@click.option("--master", "master_mode", type=click.Choice(["auto", "use", "no"]),
              default="auto", help="Session reuse in the ProxyCommand (default auto).")
@click.pass_context
def ssh_config(ctx: click.Context, devices: Tuple[str, ...], user: str, target: str,
               master_mode: str) -> None:
    """Print a ~/.ssh/config block: `ssh DEVICE`, `scp`, `sftp DEVICE-sftp` just work.

    Without DEVICE: every device pinned for this config's server id."""
    def body() -> int:
        from remote_gevent.console.config import EXIT_KEY, ConsoleError
        from remote_gevent.console.ssh_config import ssh_config as render

        cfg = _cfg(ctx)
        names = list(devices) or _pinned_devices(cfg)
        if not names:
            raise ConsoleError("no device pinned in %s yet: name the devices "
                               "(ssh-config DEVICE...) or pin one first (`%s devices`)"
                               % (cfg.known_devices, PROG), EXIT_KEY, "no_devices")
        click.echo(render(cfg, names, user=user, target=target, master=master_mode), nl=False)
        return 0

    _run(body)


# ----------------------------------------------------------------------------- completion


@main.command()
@click.argument("shell", type=click.Choice(["bash", "zsh", "fish"]))
def completion(shell: str) -> None:
    """Print the shell completion script: eval "$(remote-gevent-console completion bash)"."""
    try:
        from click.shell_completion import get_completion_class
    except ImportError:  # click < 8
        sys.stderr.write("%s: shell completion needs click >= 8\n" % PROG)
        sys.exit(1)
    cls = get_completion_class(shell)
    assert cls is not None
    var = "_%s_COMPLETE" % PROG.replace("-", "_").upper()
    click.echo(cls(main, {}, PROG, var).source())


def unknown_device_message(cfg: Any, device: str) -> Optional[str]:
    """For a device neither pinned nor ever seen: say so and list the known ones."""
    import time

    from remote_gevent.console.cli_base import _ago
    from remote_gevent.console.device_states import DeviceStates, summarize
    from remote_gevent.console.known_devices import KnownDevices

    did = "%s/%s" % (cfg.server_id, device)
    rows = summarize(DeviceStates(cfg.state_file), KnownDevices(cfg.known_devices))
    if any(r["device"] == did for r in rows):
        return None  # seen (an alive) but not pinned: the pinning advice applies
    now = time.time()
    known = ["%s (%s, last alive %s)" % (r["device"].split("/", 1)[1], r["state"],
                                         _ago(r["last_alive"], now))
             for r in rows if r["device"].startswith(cfg.server_id + "/")]
    return ("unknown device %s: no pinned key and never announced on %s%s. Known devices: %s"
            % (did, cfg.server_id, "" if known else " (no device seen yet)",
               "; ".join(known) if known else "none (see `%s devices`)" % PROG))
