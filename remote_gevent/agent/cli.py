from gevent import monkey

monkey.patch_all()  # before any other import: socket, ssl, amqp, paramiko must be patched

# ``remote-gevent``: the agent's command line.
#
# Without a subcommand it runs the agent (``--foreground``, or daemonized with a
# pidfile).  Subcommands: ``check-config``, ``pubkey [--fingerprint]``, ``rotate-key``.
# Exit status: 0 ok, 1 bad config / cannot start, 2 forced stop, 3 a service kept failing.
#
# The command line is click's (:func:`command`), but click is imported only when it is
# needed: the plain ``remote-gevent [--config PATH] [--foreground] ...`` that starts the
# agent is recognised by :func:`agent_args` without it, so the long-running agent never
# carries click (and what it imports) in memory.  Anything else — a subcommand,
# ``--help``, ``--version``, a usage error, shell completion — goes to click.

import errno  # noqa: E402
import logging  # noqa: E402
import os  # noqa: E402
import signal  # noqa: E402
import sys  # noqa: E402
from typing import TYPE_CHECKING, Any, Dict, Optional, Sequence  # noqa: E402

from remote_gevent import VERSION_MESSAGE, __version__  # noqa: E402
from remote_gevent.agent import config as config_mod  # noqa: E402
from remote_gevent.agent import daemon  # noqa: E402
from remote_gevent.crypto import identity  # noqa: E402
from remote_gevent.common import logs  # noqa: E402

if TYPE_CHECKING:  # pragma: no cover
    import click

log = logging.getLogger("remote_gevent.agent.cli")

DEFAULT_PIDFILE = "/var/run/remote-gevent.pid"

#: The agent's options that take a value, by the parameter name click gives them.
_VALUE_OPTIONS = {"--config": "config_path", "--pidfile": "pidfile", "--log-file": "log_file",
                  "--log-level": "log_level"}


def _err(message: str) -> None:
    """``click.echo(message, err=True)`` without click."""
    if sys.stderr is not None:
        sys.stderr.write(message + "\n")
        sys.stderr.flush()


def agent_args(args: Sequence[str]) -> Optional[Dict[str, Any]]:
    """The parameters of a plain agent start, as click would parse them, or None.

    Recognises only ``--foreground`` and ``--config``/``--pidfile``/``--log-file``/
    ``--log-level`` with a value (``--opt VALUE`` or ``--opt=VALUE``; not empty, not
    starting with ``-``; the last one wins; the level is a valid one, any case).  None for
    anything else: click then parses the command line (subcommands, ``--help``,
    ``--version``, errors) exactly as before.
    """
    if any(k.startswith("_") and k.endswith("_COMPLETE") for k in os.environ):
        return None  # a shell-completion request: click's business
    params: Dict[str, Any] = {"config_path": None, "foreground": False, "pidfile": None,
                              "log_file": None, "log_level": "INFO"}
    i = 0
    while i < len(args):
        arg = args[i]
        i += 1
        if arg == "--foreground":
            params["foreground"] = True
            continue
        name, eq, value = arg.partition("=")
        key = _VALUE_OPTIONS.get(name)
        if key is None:
            return None
        if not eq:
            if i >= len(args):
                return None
            value = args[i]
            i += 1
        if not value or value.startswith("-"):
            return None
        params[key] = value
    level = params["log_level"].upper()
    if level not in logs.LEVELS:
        return None
    params["log_level"] = level
    return params


def main(args: Optional[Sequence[str]] = None) -> None:
    """Entry point of ``remote-gevent``: the agent, or click for everything else."""
    argv = list(sys.argv[1:] if args is None else args)
    params = agent_args(argv)
    if params is None:
        command().main(args=argv)
        return
    path = params.pop("config_path") or config_mod.default_path()  # $REMOTE_GEVENT_CONFIG
    try:
        code = run_agent(path, **params)
    except (EOFError, KeyboardInterrupt):  # as click's standalone mode does
        _err("\nAborted!")
        code = 1
    except OSError as exc:
        if exc.errno != errno.EPIPE:
            raise
        code = 1
    sys.exit(code)


def _config_path(ctx: "click.Context", local: Optional[str]) -> str:
    if local:
        return local
    parent = ctx.find_root().params.get("config_path")
    return parent or config_mod.default_path()


def _load_or_exit(path: str) -> config_mod.AgentConfig:
    try:
        cfg = config_mod.load(path)
    except config_mod.ConfigError as exc:
        _err("remote-gevent: invalid config %s (%d problem%s):" % (
            path, len(exc.problems), "" if len(exc.problems) == 1 else "s"))
        for problem in exc.problems:
            _err("  - %s" % problem)
        sys.exit(1)
    for warning in cfg.warnings:
        _err("remote-gevent: warning: %s" % warning)
    return cfg


def run_agent(path: str, foreground: bool, pidfile: Optional[str], log_file: Optional[str],
              log_level: str) -> int:
    """Run the agent until stopped; return the exit status."""
    path = os.path.abspath(path)  # the daemon chdirs to / and re-reads it on SIGHUP
    cfg = _load_or_exit(path)
    if not cfg.remote.enabled:
        logs.setup(log_level, log_file, foreground=foreground)
        log.info("remote plugin disabled in %s", path)
        if not foreground and not log_file:
            _err("remote-gevent: remote plugin disabled in %s" % path)
        return 0
    if not foreground and pidfile is None:
        pidfile = DEFAULT_PIDFILE
    pidfile = os.path.abspath(pidfile) if pidfile else None
    log_file = os.path.abspath(log_file) if log_file else None
    problem = _preflight(cfg, pidfile, log_file)
    if problem:
        _err("remote-gevent: %s" % problem)
        return 1
    readiness = None if foreground else daemon.daemonize()
    logs.setup(log_level, log_file, foreground=foreground)
    return _serve(cfg, path, pidfile, readiness)


def _preflight(cfg: config_mod.AgentConfig, pidfile: Optional[str], log_file: Optional[str]) -> str:
    """Everything that can fail before the fork, checked while stderr still reaches the
    user: what is wrong, or "" if nothing is."""
    try:
        if pidfile:
            daemon.check_pidfile(pidfile)
        identity.load_or_create(cfg.remote.key_path)
    except (daemon.PidfileError, identity.IdentityError) as exc:
        return str(exc)
    if log_file:
        try:
            open(log_file, "a").close()
        except OSError as exc:
            return "cannot open log file %s: %s" % (log_file, exc.strerror)
    return ""


def _serve(cfg: config_mod.AgentConfig, path: str, pidfile: Optional[str],
           readiness: Optional[daemon.Readiness]) -> int:
    """After the fork: write the pidfile, build the agent, report readiness (a daemon's
    parent exits with it), run until stopped; the pidfile goes away in every case."""
    # Nothing gevent-bound is created before the fork.
    from remote_gevent.agent.runtime import Agent

    def failed(exc: Exception) -> int:
        log.error("%s", exc)
        if readiness is not None:
            readiness.fail(str(exc))
        return 1

    try:
        if pidfile:
            daemon.write_pidfile(pidfile)
    except daemon.PidfileError as exc:
        return failed(exc)
    try:
        try:
            agent = Agent(cfg, path)
        except identity.IdentityError as exc:
            return failed(exc)
        if readiness is not None:
            readiness.ok()
        try:
            return agent.run()
        except Exception:  # log it where a daemon's traceback can be seen
            log.critical("agent crashed", exc_info=True)
            return 1
    finally:
        if pidfile:
            daemon.remove_pidfile(pidfile)


def command() -> "click.Group":
    """The whole command line as a click group (imports click)."""
    import click

    config_option = click.option(
        "--config", "local_config", metavar="PATH", default=None,
        help="Config file (default: $REMOTE_GEVENT_CONFIG or %s)." % config_mod.DEFAULT_PATH)

    @click.group(invoke_without_command=True,
                 context_settings={"help_option_names": ["-h", "--help"]})
    @click.option("--config", "config_path", metavar="PATH", envvar=config_mod.ENV_CONFIG,
                  default=None,
                  help="Config file (default: $REMOTE_GEVENT_CONFIG or %s)."
                  % config_mod.DEFAULT_PATH)
    @click.option("--foreground", is_flag=True, help="Stay attached and log to stderr.")
    @click.option("--pidfile", metavar="PATH", default=None,
                  help="Pidfile (default %s when daemonized; none in the foreground "
                       "unless given)." % DEFAULT_PIDFILE)
    @click.option("--log-file", metavar="PATH", default=None,
                  help="Log to this file instead of stderr/syslog.")
    @click.option("--log-level", default="INFO", show_default=True,
                  type=click.Choice(logs.LEVELS, case_sensitive=False))
    @click.version_option(__version__, "--version", prog_name="remote-gevent",
                          message=VERSION_MESSAGE)
    @click.pass_context
    def main(ctx: "click.Context", config_path: Optional[str], foreground: bool,
             pidfile: Optional[str], log_file: Optional[str], log_level: str) -> None:
        """remote-gevent agent: end-to-end encrypted tunnels to this device, on request."""
        if ctx.invoked_subcommand is not None:
            return
        path = config_path or config_mod.default_path()
        sys.exit(run_agent(path, foreground, pidfile, log_file, log_level))

    @main.command("check-config")
    @config_option
    @click.pass_context
    def check_config(ctx: "click.Context", local_config: Optional[str]) -> None:
        """Validate the config: exit 0 with a summary, or 1 listing every problem."""
        cfg = _load_or_exit(_config_path(ctx, local_config))
        click.echo(config_mod.summary(cfg))

    @main.command("pubkey")
    @config_option
    @click.option("--fingerprint", is_flag=True, help="Print the SHA256 fingerprint instead.")
    @click.pass_context
    def pubkey(ctx: "click.Context", local_config: Optional[str], fingerprint: bool) -> None:
        """Print the identity public key (generating the key if it does not exist yet)."""
        cfg = _load_or_exit(_config_path(ctx, local_config))
        try:
            key = identity.load_or_create(cfg.remote.key_path)
        except identity.IdentityError as exc:
            click.echo("remote-gevent: %s" % exc, err=True)
            sys.exit(1)
        if fingerprint:
            click.echo(key.fingerprint)
        else:
            click.echo(key.public_line(identity.default_comment(cfg.ident)))

    @main.command("rotate-key")
    @click.pass_context
    def rotate_key(ctx: "click.Context") -> None:
        """Ask the running agent (via --pidfile) to rotate its identity key (SIGUSR1)."""
        pidfile = ctx.find_root().params.get("pidfile") or DEFAULT_PIDFILE
        pid = daemon.running_pid(pidfile)
        if pid is None:
            click.echo("remote-gevent: no running agent found in pidfile %s" % pidfile,
                       err=True)
            sys.exit(1)
        try:
            os.kill(pid, signal.SIGUSR1)
        except OSError as exc:
            click.echo("remote-gevent: cannot signal pid %d: %s" % (pid, exc.strerror),
                       err=True)
            sys.exit(1)
        click.echo("asked agent pid %d to rotate its identity key (see its log)" % pid)

    return main


if __name__ == "__main__":  # pragma: no cover
    main()
