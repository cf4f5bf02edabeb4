"""A complete local platform on 127.0.0.1: broker, relay, operator, agent for device ``demo``.

``scripts/demo [--dir DIR] [--detach | --stop]`` runs :func:`main`; the end-to-end tests
build their platforms with the same :class:`DemoPlatform` class, so what the demo shows
is what the tests prove.

In ``DIR`` (default ``./demo-platform``)::

    pki/             CA (kept across runs) + broker and relay certificates (re-issued)
    rabbit/          the private TLS RabbitMQ node (wiped at every start: a fresh broker)
    operator_ed25519 the operator's key (kept), its public line in agent/authorized_keys
    agent/           the device's identity key (kept) and authorized_keys
    agent.yaml       the agent's config (ident ``demo``, allow ``127.0.0.1:*``, transfer
                     root ``DIR/files`` read-write; ``@sftp``/``@transfer`` follow from it)
    console.yaml     the operator console's config
    files/           the transfer root
    history.csv      the agent's session history
    agent.log relay.log demo.log   logs
    pids             ``name pid`` lines of the running platform (``--stop`` reads it)

Why it is built this way:

* Every process runs in its own session (process group), so a Ctrl-C on the terminal
  reaches only us and we tear down in order: agent first (it writes ``shutdown`` rows
  and publishes its closes while the broker is still up), then relay, then broker.
  Agent and relay also get ``PR_SET_PDEATHSIG``: if we are killed hard, they follow.
* ``--detach`` runs the very same attached supervisor in the background (own session,
  output to ``DIR/demo.log``) and returns when it wrote ``DIR/pids`` — one teardown
  path for both modes. ``--stop`` SIGTERMs that supervisor and, should it be gone,
  kills what ``DIR/pids`` still lists.
* "Ready" means what an operator needs: the agent consumes its command queue, so a
  session request published now is delivered. We check it with the broker's admin
  login (a passive declare returns the consumer count) rather than trusting a log line.
"""

from __future__ import annotations

if __name__ == "__main__":  # run as a program: patch before socket/ssl/amqp load
    from gevent import monkey

    monkey.patch_all()

# ruff: noqa: E402  (imports follow the monkey patch when run as a program)

import argparse
import logging
import os
import secrets
import shutil
import signal
import subprocess
import sys
import time
from typing import Any, Dict, List, Optional, Sequence, Tuple

import yaml

from remote_gevent.crypto import identity
from remote_gevent.demo import operator_cert as demo_cert, rabbit as demo_rabbit
from remote_gevent.demo.banner import ATTACHED_HINT, detached_banner
from remote_gevent.demo.relays import MODES, RelayPool, spawn_relay, write_pool_configs
from remote_gevent.demo.pki import CertificateAuthority

from remote_gevent.demo.processes import (
    Watchdog,
    _running_platform,
    format_entries,
    reap_previous,
    say,
    stop_detached,
    _deep_merge,
    _read_pids,
    _tail,
    _terminate,
    _user_defs,
    _write_text,
    die_with_parent,
    entry_argv,
)

log = logging.getLogger(__name__)

DEFAULT_DIR = "./demo-platform"
DEFAULT_IDENT = "demo"
DEFAULT_OPERATOR = "operator"
SERVER_ID = "fr04"
HOSTS = ("localhost", "127.0.0.1")

READY_TIMEOUT = 60.0  # relay port open + agent consuming its command queue
AGENT_STOP_TIMEOUT = 20.0  # agent's own STOP_GRACE is 10 s
RELAY_STOP_TIMEOUT = 10.0
DETACH_TIMEOUT = 120.0  # broker boot (~5 s) + provisioning (~2 s) + agent, with margin
STOP_TIMEOUT = 60.0
POLL = 0.1

class PlatformError(RuntimeError):
    """The platform could not be brought up (message says which piece and where its log is)."""


class DemoPlatform(RelayPool):
    """Build, start and stop one local platform in ``directory``.

    ``rabbit``: an already running :class:`~remote_gevent.demo.rabbit.RabbitNode` to use
    (its ``ca_file`` signs its certificate; ``declare_platform(vhost)`` must have run) —
    saves its boot time in tests; None starts a private node in ``DIR/rabbit``.
    ``remote`` / ``amqp``: overrides merged into the agent config's sections
    (``max_session``, ``idle_timeout``, ``ack_timeout``, ``health_check``, …).
    ``console``: overrides merged into ``console.yaml``.
    ``start_relay=False`` with ``relay_port``: the caller runs its own relay there
    (tests: an in-process relay with a capture or fault hook) using :attr:`relay_cert`.
    ``start_agent=False``: everything but the agent (call :meth:`start_agent`).
    """

    def __init__(self, directory: str = DEFAULT_DIR, ident: str = DEFAULT_IDENT,
                 vhost: str = "/", rabbit: Optional[demo_rabbit.RabbitNode] = None,
                 remote: Optional[Dict[str, Any]] = None,
                 amqp: Optional[Dict[str, Any]] = None,
                 console: Optional[Dict[str, Any]] = None,
                 operator: str = DEFAULT_OPERATOR,
                 start_relay: bool = True, relay_port: Optional[int] = None,
                 start_agent: bool = True, log_level: str = "INFO",
                 watchdog: bool = False, relays: int = 1,
                 relay_mode: str = "routed") -> None:
        self.dir = os.path.abspath(directory)
        self.use_watchdog = watchdog  # scripts/demo: a Watchdog ends our children if we die
        self.watchdog: Optional[Watchdog] = None
        self.ident = ident
        self.vhost = vhost
        self.topic = "remote.%s.%s" % (SERVER_ID, ident)
        self.node = rabbit
        self._own_node = rabbit is None
        self.remote_overrides = dict(remote or {})
        self.amqp_overrides = dict(amqp or {})
        self.console_overrides = dict(console or {})
        self.operator = operator
        self.run_relay = start_relay
        self.relay_port = relay_port
        self.run_agent = start_agent
        self.log_level = log_level
        self.token = secrets.token_urlsafe(18)
        self.operator_password = secrets.token_urlsafe(18)
        self.agent_proc: Optional[subprocess.Popen] = None
        self.relay_proc: Optional[subprocess.Popen] = None
        self.relay_count = relays  # > 1: a pool (issue 13); the first is relay_proc
        self.extra_relay_ports: List[int] = []
        self.extra_relay_procs: List[subprocess.Popen] = []
        # routed (demo/relays.py): relay_port is the round-robin forwarder's, the relays
        # listen on pool_ports (the first is relay_proc's) and route by session id.
        self.routed = relays > 1 and relay_mode == "routed"
        self.pool_ports: List[int] = []
        self.pool_configs: List[str] = []
        self.balancer_proc: Optional[subprocess.Popen] = None
        self._prepared = False
        # paths
        self.pki_dir = os.path.join(self.dir, "pki")
        self.agent_dir = os.path.join(self.dir, "agent")
        self.files_dir = os.path.join(self.dir, "files")
        self.agent_config = os.path.join(self.dir, "agent.yaml")
        self.console_config = os.path.join(self.dir, "console.yaml")
        self.history_path = os.path.join(self.dir, "history.csv")
        self.agent_log = os.path.join(self.dir, "agent.log")
        self.relay_log = os.path.join(self.dir, "relay.log")
        self.operator_key_path = os.path.join(self.dir, "operator_ed25519")
        self.device_key_path = os.path.join(self.agent_dir, "remote_ed25519")
        self.authorized_keys = os.path.join(self.agent_dir, "authorized_keys")
        self.known_devices = os.path.join(self.dir, "known_devices")
        self.pids_file = os.path.join(self.dir, "pids")
        self.ca: Optional[CertificateAuthority] = None
        self.relay_cert: Optional[Tuple[str, str]] = None

    # ------------------------------------------------------------------ files
    @property
    def broker_url(self) -> str:
        assert self.node is not None
        return self.node.amqps_url(self.vhost)

    @property
    def broker_ca_file(self) -> str:
        assert self.node is not None
        return self.node.ca_file

    @property
    def relay_address(self) -> str:
        assert self.relay_port is not None, "prepare() chooses the relay port"
        return "127.0.0.1:%d" % self.relay_port

    def prepare(self) -> "DemoPlatform":
        """Certificates, keys, ports and config files (no process started)."""
        if self._prepared:
            return self
        for sub in ("", "agent", "files"):
            os.makedirs(os.path.join(self.dir, sub), mode=0o700, exist_ok=True)
        self.ca = CertificateAuthority(self.pki_dir)  # reused when present
        relay = self.ca.issue("relay", HOSTS)
        self.relay_cert = (relay.cert_file, relay.key_file)
        if self.relay_port is None:
            self.relay_port = demo_rabbit.free_port("127.0.0.1")
        self.extra_relay_ports = [demo_rabbit.free_port("127.0.0.1")
                                  for _ in range(self.relay_count - 1)]
        if self.routed:
            self.pool_ports = [demo_rabbit.free_port("127.0.0.1")] + self.extra_relay_ports
            self.pool_configs = write_pool_configs(self.dir, self.pool_ports,
                                                   self.ca.cert_file)
        operator_key = identity.load_or_create(self.operator_key_path)
        _write_text(self.operator_key_path + ".pub",
                    operator_key.public_line("%s@demo-platform" % self.operator) + "\n")
        # The agent would make the device key on first start; making it here lets us pin
        # it for the console (as an operator would after `remote-gevent pubkey`): no TOFU.
        device_key = identity.load_or_create(self.device_key_path)
        from remote_gevent.console.known_devices import KnownDevices

        KnownDevices(self.known_devices).pin(SERVER_ID, self.ident, device_key.public_bytes,
                                             replace=True)
        _write_text(self.authorized_keys,
                    operator_key.public_line("%s@demo-platform" % self.operator) + "\n", 0o600)
        demo_cert.issue_demo_certificate(self)  # the device trusts a CA, not the key (#14)
        self._prepared = True
        return self

    def _agent_yaml(self) -> Dict[str, Any]:
        remote = {
            "enabled": True,
            "server_id": SERVER_ID,
            "health_check": 600,
            "max_session": 10,
            "key_path": self.device_key_path,
            "history_path": self.history_path,
            "authorized_keys": self.authorized_keys,
            "allow": ["127.0.0.1:*"],
            "relays": {SERVER_ID: self.relay_addresses},
            "relay_ca_file": self.ca.cert_file if self.ca else None,
            "transfer": {"roots": [{"path": self.files_dir, "mode": "rw"}],
                         "max_size": "8G", "overwrite": True},
        }
        amqp = {
            "urls": [self.broker_url],
            "ca_file": self.broker_ca_file,
            "heartbeat": 30,
            "connect_timeout": 5,
            "reconnect_max_delay": 5,
        }
        return {
            "ident": self.ident,
            "token": self.token,
            "amqp": _deep_merge(amqp, self.amqp_overrides),
            "remote": _deep_merge(remote, self.remote_overrides),
        }

    def _console_yaml(self) -> Dict[str, Any]:
        data = {
            "server_id": SERVER_ID,
            "user": self.operator,
            "password": self.operator_password,
            "amqp": {"urls": [self.broker_url], "ca_file": self.broker_ca_file},
            "operator_key": self.operator_key_path,
            "known_devices": self.known_devices,
            "relay": self.relay_addresses,
            "relay_ca_file": self.ca.cert_file if self.ca else None,
        }
        return _deep_merge(data, self.console_overrides)

    def write_configs(self) -> None:
        header = "# written by remote_gevent.demo.platform — regenerated at every start\n"
        _write_text(self.agent_config,
                    header + yaml.safe_dump(self._agent_yaml(), sort_keys=False), 0o600)
        _write_text(self.console_config,
                    header + yaml.safe_dump(self._console_yaml(), sort_keys=False), 0o600)

    # ------------------------------------------------------------------ broker
    def _start_broker(self) -> None:
        if not self._own_node:
            return
        rabbit_dir = os.path.join(self.dir, "rabbit")
        shutil.rmtree(rabbit_dir, ignore_errors=True)  # a fresh broker every start
        assert self.ca is not None
        broker = self.ca.issue("broker", HOSTS)
        self.node = demo_rabbit.RabbitNode(
            rabbit_dir, node_name="rg-demo-%d-%s@localhost" % (os.getpid(),
                                                              secrets.token_hex(2)),
            ca_file=self.ca.cert_file, cert_file=broker.cert_file, key_file=broker.key_file)
        self.node.start()

    def _provision(self) -> None:
        """Exchanges (own node), the device and the operator: one CLI call."""
        assert self.node is not None
        parts = [
            _user_defs(self.vhost, self.ident, self.token,
                       demo_rabbit.device_permissions(SERVER_ID, self.ident)),
            _user_defs(self.vhost, self.operator, self.operator_password,
                       demo_rabbit.operator_permissions(self.operator)),
        ]
        defs: Dict[str, List[Dict[str, Any]]] = {}
        if self._own_node:
            defs = {
                "vhosts": [{"name": self.vhost}],
                "permissions": [{"user": self.node.admin_user, "vhost": self.vhost,
                                 "configure": ".*", "write": ".*", "read": ".*"}],
                "exchanges": [{"name": name, "vhost": self.vhost, "type": "topic",
                               "durable": True, "auto_delete": False, "internal": False,
                               "arguments": {}} for name in demo_rabbit.EXCHANGES],
            }
        for part in parts:
            for key, items in part.items():
                defs.setdefault(key, []).extend(items)
        self.node.import_definitions(defs)

    # ------------------------------------------------------------------ processes
    def _spawn(self, argv: Sequence[str], log_path: str) -> subprocess.Popen:
        out = open(log_path, "ab")
        try:
            return subprocess.Popen(
                list(argv), stdin=subprocess.DEVNULL, stdout=out, stderr=subprocess.STDOUT,
                cwd=self.dir, start_new_session=True, preexec_fn=die_with_parent)
        finally:
            out.close()

    def start_relay(self, timeout: float = READY_TIMEOUT) -> None:
        """Start (or restart) the relay process on :attr:`relay_port` (routed: the first
        relay of the pool, on its own port behind the forwarder)."""
        assert self.relay_cert is not None and self.relay_port is not None
        port = self.pool_ports[0] if self.routed else self.relay_port
        self.relay_proc = spawn_relay(self._spawn, port, self.relay_cert, self.relay_log,
                                      timeout, PlatformError,
                                      self.pool_configs[0] if self.routed else None)

    def stop_relay(self, sig: int = signal.SIGTERM, timeout: float = RELAY_STOP_TIMEOUT
                   ) -> Optional[int]:
        proc, self.relay_proc = self.relay_proc, None
        return _terminate(proc, sig, timeout)

    def start_agent(self, timeout: float = READY_TIMEOUT) -> None:
        """Start the agent and wait until it consumes its command queue."""
        argv = entry_argv("remote-gevent", "remote_gevent.agent.cli") + [
            "--foreground", "--config", self.agent_config, "--log-level", self.log_level]
        with open(self.agent_log, "ab") as f:
            f.write(b"---- agent start %s\n" % time.strftime("%Y-%m-%d %H:%M:%S").encode())
        self.agent_proc = self._spawn(argv, self.agent_log)
        self.wait_agent_ready(timeout)

    def wait_agent_ready(self, timeout: float = READY_TIMEOUT) -> None:
        deadline = time.monotonic() + timeout
        while True:
            if self.agent_proc is not None and self.agent_proc.poll() is not None:
                raise PlatformError("the agent exited with %s; see %s:\n%s" % (
                    self.agent_proc.returncode, self.agent_log, _tail(self.agent_log)))
            if self.command_queue_consumers() > 0:
                return
            if time.monotonic() > deadline:
                raise PlatformError("the agent did not consume %s.conn within %.0f s; see "
                                    "%s:\n%s" % (self.topic, timeout, self.agent_log,
                                                 _tail(self.agent_log)))
            time.sleep(0.2)

    def command_queue_consumers(self) -> int:
        """Consumers on the device's command queue (0 when it does not exist yet)."""
        from amqp.exceptions import NotFound

        from remote_gevent.common.amqplink import AmqpLink, LinkError
        from remote_gevent.common.broker_topology import command_queue

        assert self.node is not None
        link = AmqpLink([self.broker_url], self.node.admin_user, self.node.admin_password,
                        ca_file=self.broker_ca_file, connect_timeout=5.0, heartbeat=0,
                        prefetch=0, name="demo-platform")
        try:
            link.connect()
        except LinkError as exc:
            log.debug("admin link: %s", exc)
            return 0
        try:
            assert link.channel is not None
            try:
                result = link.channel.queue_declare(command_queue(self.topic), passive=True)
            except NotFound:
                return 0
            return int(result.consumer_count)
        finally:
            link.close()

    def stop_agent(self, sig: int = signal.SIGTERM, timeout: float = AGENT_STOP_TIMEOUT
                   ) -> Optional[int]:
        """Signal the agent and wait for it; returns its exit status (None: not running)."""
        proc, self.agent_proc = self.agent_proc, None
        return _terminate(proc, sig, timeout)

    # ------------------------------------------------------------------ whole platform
    def start(self, timeout: float = READY_TIMEOUT) -> "DemoPlatform":
        self.prepare()
        if self.use_watchdog and self.watchdog is None:
            self.watchdog = Watchdog(os.path.join(self.dir, "watchdog.log"))
        try:
            self._start_broker()
            self._track()
            self._provision()
            self.write_configs()
            if self.run_relay:
                self.start_relay(timeout)
                self.start_extra_relays(timeout, PlatformError)
                self._track()
            if self.run_agent:
                self.start_agent(timeout)
                self._track()
        except BaseException:
            self.stop()
            raise
        self.write_pids()
        return self

    def _track(self) -> None:
        """Tell the watchdog about every child started so far (it ignores repeats)."""
        if self.watchdog is not None:
            for name, pid in self.pids()[1:]:
                if name != "watchdog":
                    self.watchdog.track(name, pid)

    def pids(self) -> List[Tuple[str, int]]:
        out = [("platform", os.getpid())]
        if self.watchdog is not None:
            out.append(("watchdog", self.watchdog.proc.pid))
        node = self.node
        if self._own_node and node is not None:
            for name, attr in (("rabbit", "_proc"), ("epmd", "_epmd")):
                proc = getattr(node, attr, None)
                if proc is not None:
                    out.append((name, proc.pid))
        for name, proc in self._processes():
            if proc is not None:
                out.append((name, proc.pid))
        return out

    def _processes(self) -> List[Tuple[str, Optional[subprocess.Popen]]]:
        """Relays (``relay``, ``relay2`` …), the round-robin forwarder and the agent."""
        balancer = [("balancer", self.balancer_proc)] if self.routed else []
        return [("relay", self.relay_proc)] + balancer + [
            ("relay%d" % (i + 2), proc) for i, proc in enumerate(self.extra_relay_procs)] + [
            ("agent", self.agent_proc)]

    def write_pids(self) -> None:
        _write_text(self.pids_file, format_entries(self.pids()), 0o644)

    def stop(self) -> None:
        """Agent, then relay, then (our own) broker; each bounded, then killed."""
        self.stop_agent()
        self.stop_relay()
        self.stop_pool(RELAY_STOP_TIMEOUT)
        if self._own_node and self.node is not None:
            try:
                self.node.stop()
            except (OSError, demo_rabbit.RabbitError) as exc:
                log.warning("stopping the broker: %s", exc)
        try:
            with open(self.pids_file) as f:
                mine = f.readline().split()
            if mine[1:2] == [str(os.getpid())]:
                os.unlink(self.pids_file)
        except (OSError, IndexError):
            pass
        if self.watchdog is not None:
            self.watchdog.close()
            self.watchdog = None

    def __enter__(self) -> "DemoPlatform":
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    # ------------------------------------------------------------------ helpers
    def console_argv(self, *args: str) -> List[str]:
        """``remote-gevent-console -c DIR/console.yaml ARGS…`` with this interpreter."""
        return entry_argv("remote-gevent-console", "remote_gevent.console.cli") + [
            "-c", self.console_config] + list(args)

    def usage(self) -> str:
        """The start-up banner (:mod:`remote_gevent.demo.banner`)."""
        from remote_gevent.demo.banner import usage

        return usage(self)


# --------------------------------------------------------------------------- the program


def run_attached(directory: str, relays: int = 1, relay_mode: str = "routed") -> int:
    """Bring the platform up, print how to use it, tear it down on SIGINT/SIGTERM."""
    import gevent
    import gevent.event

    if _running_platform(directory):
        print("demo: a platform already runs in %s (scripts/demo --dir %s --stop)"
              % (directory, directory), file=sys.stderr)
        return 1
    reap_previous(directory, say=say)
    stop = gevent.event.Event()
    for sig in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP):  # SIGHUP: terminal closed
        gevent.signal_handler(sig, stop.set)
    platform = DemoPlatform(directory, watchdog=True, relays=relays, relay_mode=relay_mode)
    say("demo: starting in %s (broker boot takes a few seconds) …" % platform.dir)
    try:
        platform.start()
    except (PlatformError, demo_rabbit.RabbitError, OSError) as exc:
        say("demo: could not start: %s" % exc)
        return 1
    say(platform.usage())
    say("\n%s (or scripts/demo --dir %s --stop) tears it all down." % (ATTACHED_HINT,
                                                                      directory))
    try:
        while not stop.wait(1.0):
            for name, proc in platform._processes():
                if proc is not None and proc.poll() is not None:
                    say("demo: the %s exited (%s); see its log. Stopping." % (
                        name, proc.returncode))
                    stop.set()
    finally:
        say("demo: tearing down (agent, relay, broker) …")
        platform.stop()
        say("demo: stopped")
    return 0


def _log_since(path: str, offset: int) -> str:
    try:
        with open(path, "rb") as f:
            f.seek(offset)
            return f.read(64 * 1024).decode("utf-8", "replace")
    except OSError:
        return ""


def run_detached(directory: str, relays: int = 1, relay_mode: str = "routed") -> int:
    """Run the attached supervisor in the background; return once it is ready."""
    if _running_platform(directory):
        print("demo: a platform already runs in %s" % directory, file=sys.stderr)
        return 1
    os.makedirs(directory, mode=0o700, exist_ok=True)
    pids_file = os.path.join(directory, "pids")
    reap_previous(directory, say=print)
    log_path = os.path.join(directory, "demo.log")
    with open(log_path, "ab") as out:
        logged_before = out.tell()  # an earlier run's banner is further up: not ours
        proc = subprocess.Popen(
            [sys.executable, "-m", "remote_gevent.demo.platform", "--dir", directory,
             "--relays", str(relays), "--relay-mode", relay_mode],
            stdin=subprocess.DEVNULL, stdout=out, stderr=subprocess.STDOUT,
            start_new_session=True)
    deadline = time.monotonic() + DETACH_TIMEOUT
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            print("demo: the platform failed to start (exit %s); %s:\n%s"
                  % (proc.returncode, log_path, _tail(log_path)), file=sys.stderr)
            return 1
        # pids are written before the banner: wait for the whole banner of this run
        banner = detached_banner(_log_since(log_path, logged_before))
        if banner and dict(_read_pids(pids_file)).get("platform") == proc.pid:
            print(banner)
            print("demo: running detached (pid %d, log %s); stop it with: scripts/demo "
                  "--dir %s --stop" % (proc.pid, log_path, directory))
            return 0
        time.sleep(POLL)
    print("demo: not ready within %.0f s; stopping it. See %s" % (DETACH_TIMEOUT, log_path),
          file=sys.stderr)
    proc.terminate()
    return 1


def main(argv: Optional[Sequence[str]] = None) -> int:
    parser = argparse.ArgumentParser(
        prog="scripts/demo",
        description="A complete local remote-gevent platform on 127.0.0.1: TLS RabbitMQ "
                    "node, relay, operator key, agent for device 'demo', console.yaml.")
    parser.add_argument("--dir", default=DEFAULT_DIR,
                        help="working directory (default %(default)s)")
    mode = parser.add_mutually_exclusive_group()
    mode.add_argument("--detach", action="store_true",
                      help="return once the platform is ready (pids in DIR/pids)")
    mode.add_argument("--stop", action="store_true", help="tear a detached platform down")
    parser.add_argument("--relays", type=int, default=1, choices=range(1, 9), metavar="N",
                        help="run a pool of N relays (1-8, default 1; docs/demo.md)")
    parser.add_argument("--relay-mode", choices=MODES, default="routed",
                        help="a pool's relays: routed by session id behind ONE round-robin "
                             "address (default), or listed one by one to agent and console")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    directory = os.path.abspath(args.dir)
    if args.stop:
        return stop_detached(directory)
    if args.detach:
        return run_detached(directory, args.relays, args.relay_mode)
    return run_attached(directory, args.relays, args.relay_mode)


if __name__ == "__main__":
    sys.exit(main())
