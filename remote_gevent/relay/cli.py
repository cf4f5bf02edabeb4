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
from dataclasses import dataclass  # noqa: E402
from typing import Any, Dict, List, Optional, Tuple  # noqa: E402

import click  # noqa: E402
import gevent  # noqa: E402
import gevent.event  # noqa: E402

from remote_gevent import VERSION_MESSAGE, __version__  # noqa: E402
from remote_gevent.relay import server as relay  # noqa: E402
from remote_gevent.relay.settings import (  # noqa: E402
    DEFAULT_GRACE,
    DEFAULT_HANDSHAKE_TIMEOUT,
    DEFAULT_HELLO_TIMEOUT,
    DEFAULT_IDLE_TIMEOUT,
    DEFAULT_MAX_PAIRED,
    DEFAULT_MAX_PENDING,
    DEFAULT_MAX_PENDING_PER_IP,
    DEFAULT_PORT,
    RelaySettings,
)
from remote_gevent.wire.rendezvous import DEFAULT_PAIRING_TIMEOUT  # noqa: E402
from remote_gevent.common import tls  # noqa: E402
from remote_gevent.common.addresses import (  # noqa: E402
    AddressError,
    format_address,
    parse_listen,
)
from remote_gevent.common.configschema import key as config_key  # noqa: E402
from remote_gevent.common.configschema import (  # noqa: E402
    ConfigError,
    Invalid,
    Problems,
    build_section,
    declared_fields,
    read_document,
    v_bool,
    v_float,
    v_int,
    v_opt_path,
)
from remote_gevent.relay.routing import peer_name  # noqa: E402

log = logging.getLogger("remote_gevent.relay.server")


def v_listen(value: Any, base: str) -> Optional[Tuple[str, int]]:
    if value is None:
        return None
    if not isinstance(value, str):
        raise Invalid("expected HOST:PORT")
    try:
        return parse_listen(value)
    except AddressError as exc:
        raise Invalid(str(exc)) from None


def v_peers(value: Any, base: str) -> Tuple[str, ...]:
    if value is None:
        return ()
    if not isinstance(value, list) or not all(isinstance(v, str) for v in value):
        raise Invalid("expected a list of host:port")
    try:
        return tuple(peer_name(v) for v in value)
    except AddressError as exc:
        raise Invalid(str(exc)) from None


def v_peer(value: Any, base: str) -> Optional[str]:
    if value is None:
        return None
    try:
        return peer_name(value) if isinstance(value, str) else peer_name("")
    except AddressError as exc:
        raise Invalid(str(exc)) from None


@dataclass(frozen=True)
class RelayFileConfig:
    """The keys of ``relay.yaml`` (conf/relay.yaml documents each); flags win over them.

    Declared with the same framework as the agent's and the console's configs
    (:mod:`remote_gevent.common.configschema`): every problem is reported at once,
    naming the file, the key and the value; relative paths are resolved against the
    directory of the file."""

    listen: Optional[Tuple[str, int]] = config_key(
        None, v_listen, "host:port", "address to listen on; :PORT means all interfaces")
    cert: Optional[str] = config_key(None, v_opt_path, "path", "PEM certificate chain (leaf first)")
    # (the key field's name shadows nothing: the declaring function is config_key)
    key: Optional[str] = config_key(None, v_opt_path, "path", "PEM private key of cert (0600)")
    pairing_timeout: float = config_key(DEFAULT_PAIRING_TIMEOUT, v_float(0.001), "float s",
                                 "longest wait of the first party for the second")
    handshake_timeout: float = config_key(DEFAULT_HANDSHAKE_TIMEOUT, v_float(0.001),
                                   "float s", "TLS handshake and TLS shutdown bound")
    hello_timeout: float = config_key(DEFAULT_HELLO_TIMEOUT, v_float(0.001), "float s",
                               "TLS + hello of a new connection")
    idle_timeout: float = config_key(DEFAULT_IDLE_TIMEOUT, v_float(0.001), "float s",
                              "end a paired session without traffic for this long")
    grace: float = config_key(DEFAULT_GRACE, v_float(0.001), "float s",
                       "SIGTERM: how long paired sessions may drain")
    max_pending: int = config_key(DEFAULT_MAX_PENDING, v_int(1), "int",
                           "connections not yet paired, in all")
    max_paired: int = config_key(DEFAULT_MAX_PAIRED, v_int(1), "int", "paired sessions")
    max_pending_per_ip: int = config_key(DEFAULT_MAX_PENDING_PER_IP, v_int(1), "int",
                                  "connections not yet paired, per source address")
    proxy_protocol: bool = config_key(
        False, v_bool, "bool", "every connection starts with a PROXY v1/v2 header (the relay "
        "is behind a load balancer that sends one: haproxy send-proxy-v2); its client "
        "address is used in logs and per-source limits")
    metrics_listen: Optional[Tuple[str, int]] = config_key(
        None, v_listen, "host:port", "serve Prometheus metrics (/metrics, plain HTTP) here; "
        "unset: no metrics listener (needs the relay extra: prometheus_client)")
    pool_peers: Tuple[str, ...] = config_key(
        (), v_peers, "list of host:port", "every relay of the pool, by its direct address "
        "(this one too, same spelling on every relay): sessions are routed to an owner "
        "relay by session id, so the pool works behind one round-robin address")
    pool_self: Optional[str] = config_key(None, v_peer, "host:port",
                                          "this relay's own entry in pool_peers")
    pool_secret_file: Optional[str] = config_key(
        None, v_opt_path, "path", "the pool's shared secret (>= 16 bytes, same file on "
        "every relay, 0600): authenticates forwarded hellos")
    pool_ca_file: Optional[str] = config_key(
        None, v_opt_path, "path", "CA that verifies the peers' certificates (unset: the "
        "system's trust store)")
    pool_probe_interval: float = config_key(1.0, v_float(0.05), "float s",
                                            "liveness probe of each peer, this often")


KEYS = tuple(f.name for f in declared_fields(RelayFileConfig))


def load_config(path: str) -> Dict[str, Any]:
    """The keys ``path`` sets, validated; ConfigError lists every problem."""
    try:
        data = read_document(path)
    except FileNotFoundError:
        raise ConfigError(["%s: no such file" % path]) from None
    problems = Problems(path)
    values = build_section(RelayFileConfig, "", data, os.path.dirname(os.path.abspath(path)),
                           problems)
    if problems.items:
        raise ConfigError(problems.items)
    return values


def _validated(name: str, value: Any) -> Any:
    """One key's value from a command-line flag, with the file's validator."""
    f = next(f for f in declared_fields(RelayFileConfig) if f.name == name)
    try:
        return f.metadata["validator"](value, os.getcwd())
    except Invalid as exc:
        raise ConfigError(["%s: %s (got %r)" % (LIMIT_FLAGS.get(name, "--" + name), exc,
                                                value)]) from None


#: Limits that also have a command-line flag: key -> flag (the flag wins over the file).
LIMIT_FLAGS = {"max_pending_per_ip": "--max-pending-per-ip", "hello_timeout": "--hello-timeout"}


def build_settings(config: Dict[str, Any], listen: Optional[str], cert: Optional[str],
                   key: Optional[str], limits: Optional[Dict[str, Any]] = None
                   ) -> RelaySettings:
    """``RelaySettings`` from the validated YAML ``config`` and the flags (which win)."""
    values = {k: v for k, v in config.items() if v is not None}
    flags = dict((limits or {}), listen=listen)
    problems: List[str] = []
    for name, value in flags.items():
        if value is None:
            continue
        try:
            values[name] = _validated(name, value)
        except ConfigError as exc:  # every bad flag is reported, not only the first
            problems.extend(exc.problems)
    if problems:
        raise ConfigError(problems)
    if cert is not None:
        values["cert"] = cert
    if key is not None:
        values["key"] = key
    host, port = values.pop("listen", ("0.0.0.0", DEFAULT_PORT))
    cert_file = values.pop("cert", None)
    key_file = values.pop("key", None)
    if not cert_file or not key_file:
        raise ConfigError(["a certificate and a key are required (--cert/--key or cert:/key: "
                           "in the config file): the relay only speaks TLS"])
    return RelaySettings(host=host, port=port, cert_file=cert_file, key_file=key_file,
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
                   % DEFAULT_MAX_PENDING_PER_IP)
@click.option("--hello-timeout", type=float, default=None, metavar="SECONDS",
              help="Bound on TLS handshake + hello of a new connection [default: %g]."
                   % DEFAULT_HELLO_TIMEOUT)
@click.option("--log-level", default="info", show_default=True,
              type=click.Choice(["debug", "info", "warning", "error"], case_sensitive=False))
@click.version_option(__version__, prog_name="remote-gevent-relay", message=VERSION_MESSAGE)
def main(listen: Optional[str], cert: Optional[str], key: Optional[str],
         config_path: Optional[str], max_pending_per_ip: Optional[int],
         hello_timeout: Optional[float], log_level: str) -> None:
    """Relay ("exit node"): pairs agents and consoles by session id and ticket, then
    forwards their end-to-end encrypted bytes."""
    logging.basicConfig(stream=sys.stderr, level=getattr(logging, log_level.upper()),
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    try:
        config = load_config(config_path) if config_path else {}
        metrics_at = config.pop("metrics_listen", None)
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
    metrics = _start_metrics(server, metrics_at) if metrics_at else None
    if not log.isEnabledFor(logging.INFO):
        # Scripts and tests wait for this line whatever the log level.
        click.echo("relay listening on %s" % format_address(*server.address), err=True)
    stop.wait()
    log.info("signal %d: stopping (grace %.0fs)", signals[0], settings.grace)
    server.stop()
    if metrics is not None:
        metrics.stop()


def _start_metrics(server: relay.Relay, at: Tuple[str, int]) -> Any:
    try:
        from remote_gevent.relay.metrics import RelayMetrics
    except ImportError as exc:
        raise click.ClickException("metrics_listen needs prometheus_client (pip install "
                                   "'remote-gevent[relay]'): %s" % exc) from None
    metrics = RelayMetrics(server)
    try:
        metrics.serve(*at)
    except OSError as exc:
        raise click.ClickException("cannot serve metrics on %s: %s"
                                   % (format_address(*at), exc)) from None
    return metrics


if __name__ == "__main__":
    main()
