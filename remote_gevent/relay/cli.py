from gevent import monkey; monkey.patch_all()  # noqa: E702 -- before any other import

# ``remote-gevent-relay``: run the relay (exit node) in the foreground, logging to stderr.
#
# Flags override the YAML file given with ``--config`` (see ``conf/relay.yaml``). SIGTERM or
# SIGINT stops accepting, lets paired sessions drain for ``grace`` seconds, then exits 0; a
# second signal exits at once (status 1). Exit status 1 also for a bad config.

import logging  # noqa: E402
import os  # noqa: E402
import resource  # noqa: E402
import signal  # noqa: E402
import sys  # noqa: E402
from typing import Any, Dict, List, Optional, Tuple  # noqa: E402

import click  # noqa: E402
import gevent  # noqa: E402
import gevent.event  # noqa: E402
import yaml  # noqa: E402

from remote_gevent import __version__  # noqa: E402
from remote_gevent.relay import server as relay  # noqa: E402
from remote_gevent.common import tls  # noqa: E402
from remote_gevent.common.addresses import format_address, parse_listen  # noqa: E402

log = logging.getLogger("remote_gevent.relay.server")


class ConfigError(Exception):
    """The relay configuration is unusable; the message names the key and the value."""


def _positive_number(key: str, value: Any) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or value <= 0:
        raise ConfigError("%s: must be a positive number of seconds, not %r" % (key, value))
    return float(value)


def _positive_int(key: str, value: Any) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
        raise ConfigError("%s: must be a positive integer, not %r" % (key, value))
    return value


def _file(key: str, value: Any) -> str:
    if not isinstance(value, str) or not value:
        raise ConfigError("%s: must be a file path, not %r" % (key, value))
    return value


def _listen(key: str, value: Any) -> Tuple[str, int]:
    if not isinstance(value, str):
        raise ConfigError("%s: must be HOST:PORT, not %r" % (key, value))
    try:
        return parse_listen(value)
    except ValueError as exc:
        raise ConfigError("%s: %r: %s" % (key, value, exc)) from None


#: Every key of the YAML form: validator and what it maps to in RelaySettings.
KEYS = {
    "listen": _listen,
    "cert": _file,
    "key": _file,
    "pairing_timeout": _positive_number,
    "handshake_timeout": _positive_number,
    "hello_timeout": _positive_number,
    "idle_timeout": _positive_number,
    "grace": _positive_number,
    "max_pending": _positive_int,
    "max_paired": _positive_int,
    "max_pending_per_ip": _positive_int,
}


def load_config(path: str) -> Dict[str, Any]:
    """Read and validate the YAML config; unknown keys and bad values are refused."""
    try:
        with open(path) as f:
            data = yaml.safe_load(f)
    except OSError as exc:
        raise ConfigError("cannot read %s: %s" % (path, exc)) from None
    except yaml.YAMLError as exc:
        raise ConfigError("%s is not valid YAML: %s" % (path, exc)) from None
    if data is None:
        data = {}
    if not isinstance(data, dict):
        raise ConfigError("%s: top level must be a mapping, not %r" % (path, data))
    values = {}
    problems: List[str] = []
    for key, value in data.items():
        validator = KEYS.get(key)
        if validator is None:
            problems.append("%s: unknown key %r (value %r); known keys: %s"
                            % (path, key, value, ", ".join(sorted(KEYS))))
            continue
        try:
            values[key] = validator(key, value)
        except ConfigError as exc:
            problems.append("%s: %s" % (path, exc))
    if problems:
        raise ConfigError("\n".join(problems))
    return values


#: Limits that also have a command-line flag: key -> flag (the flag wins over the file).
LIMIT_FLAGS = {"max_pending_per_ip": "--max-pending-per-ip", "hello_timeout": "--hello-timeout"}


def build_settings(config: Dict[str, Any], listen: Optional[str], cert: Optional[str],
                   key: Optional[str], limits: Optional[Dict[str, Any]] = None
                   ) -> relay.RelaySettings:
    """``RelaySettings`` from the validated YAML ``config`` and the flags (which win)."""
    values = dict(config)
    problems = []
    for name, value in (limits or {}).items():
        if value is None:
            continue
        try:
            values[name] = KEYS[name](LIMIT_FLAGS.get(name, name), value)
        except ConfigError as exc:
            problems.append(str(exc))
    if problems:
        raise ConfigError("\n".join(problems))
    if listen is not None:
        values["listen"] = _listen("--listen", listen)
    if cert is not None:
        values["cert"] = cert
    if key is not None:
        values["key"] = key
    host, port = values.pop("listen", ("0.0.0.0", relay.DEFAULT_PORT))
    cert_file = values.pop("cert", None)
    key_file = values.pop("key", None)
    if not cert_file or not key_file:
        raise ConfigError("a certificate and a key are required (--cert/--key or cert:/key: "
                          "in the config file): the relay only speaks TLS")
    return relay.RelaySettings(host=host, port=port, cert_file=cert_file, key_file=key_file,
                               **values)


def raise_fd_limit(wanted: int) -> None:
    """Each paired session costs two descriptors: lift the soft limit towards the hard one."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    target = wanted if hard == resource.RLIM_INFINITY else min(wanted, hard)
    if soft != resource.RLIM_INFINITY and soft < target:
        try:
            resource.setrlimit(resource.RLIMIT_NOFILE, (target, hard))
        except (ValueError, OSError) as exc:
            log.warning("cannot raise the open-file limit from %d to %d: %s", soft, target, exc)


@click.command(context_settings={"help_option_names": ["-h", "--help"]})
@click.option("--listen", metavar="HOST:PORT", help="Address to listen on ([::1]:8443 for IPv6).")
@click.option("--cert", type=click.Path(dir_okay=False), help="Server certificate (PEM chain).")
@click.option("--key", type=click.Path(dir_okay=False), help="Private key of the certificate.")
@click.option("--config", "config_path", type=click.Path(dir_okay=False),
              help="YAML file with the same keys and the limits (conf/relay.yaml).")
@click.option("--max-pending-per-ip", type=int, default=None, metavar="N",
              help="Pending (not yet paired) connections per source IP; at the limit the "
                   "oldest one without a hello is evicted for a newcomer [default: %d]."
                   % relay.DEFAULT_MAX_PENDING_PER_IP)
@click.option("--hello-timeout", type=float, default=None, metavar="SECONDS",
              help="Bound on TLS handshake + hello of a new connection [default: %g]."
                   % relay.DEFAULT_HELLO_TIMEOUT)
@click.option("--log-level", default="info", show_default=True,
              type=click.Choice(["debug", "info", "warning", "error"], case_sensitive=False))
@click.version_option(__version__, prog_name="remote-gevent-relay")
def main(listen: Optional[str], cert: Optional[str], key: Optional[str],
         config_path: Optional[str], max_pending_per_ip: Optional[int],
         hello_timeout: Optional[float], log_level: str) -> None:
    """Relay ("exit node"): pairs agents and consoles by session id and ticket, then
    forwards their end-to-end encrypted bytes."""
    logging.basicConfig(stream=sys.stderr, level=getattr(logging, log_level.upper()),
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    try:
        config = load_config(config_path) if config_path else {}
        settings = build_settings(config, listen, cert, key, {
            "max_pending_per_ip": max_pending_per_ip, "hello_timeout": hello_timeout})
        server = relay.Relay(settings)
    except (ConfigError, tls.TLSConfigError) as exc:
        raise click.ClickException(str(exc)) from None
    raise_fd_limit(2 * (settings.max_paired + settings.max_pending) + 256)
    stop = gevent.event.Event()
    signals: List[int] = []

    def on_signal(signum: int) -> None:
        signals.append(signum)
        if len(signals) > 1:
            log.warning("second signal: exiting now")
            os._exit(1)
        stop.set()

    for signum in (signal.SIGTERM, signal.SIGINT):
        gevent.signal_handler(signum, on_signal, signum)
    try:
        server.start()
    except OSError as exc:
        raise click.ClickException("cannot listen on %s: %s" % (
            format_address(settings.host, settings.port), exc)) from None
    if not log.isEnabledFor(logging.INFO):
        # Scripts and tests wait for this line whatever the log level.
        click.echo("relay listening on %s" % format_address(*server.address), err=True)
    stop.wait()
    log.info("signal %d: stopping (grace %.0fs)", signals[0], settings.grace)
    server.stop()


if __name__ == "__main__":
    main()
