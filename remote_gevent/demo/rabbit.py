"""A private RabbitMQ node for the test suite and the demo platform.

The node is fully isolated from any system broker on the machine: its own node name,
Erlang cookie (``HOME`` points into ``base_dir``), its own epmd on its own port, its own
distribution port, mnesia/log directories, ``rabbitmq.conf``, ``rabbitmq-env.conf``
and enabled-plugins file (no plugins, so it boots in a few seconds). AMQP is served
over TLS on 127.0.0.1 only; an optional plain listener on 127.0.0.1 is for admin use.

We run ``/usr/lib/rabbitmq/bin/rabbitmq-server`` directly (the ``/usr/sbin`` wrapper
``su``s to the ``rabbitmq`` user, which could not read our files) in a new process
group, and consider the node up when its TLS port accepts connections rather than
trusting ``await_startup``. :meth:`RabbitNode.stop` terminates the whole process group
(and our epmd); an ``atexit`` hook does the same as a safety net.

Provisioning goes through ``rabbitmqctl import_definitions`` fed on stdin: one CLI
call per device (the CLI costs ~1 s of VM start-up per call), and passwords never
appear in an argument list or on disk — only their salted SHA-256 hash does, in
RabbitMQ's own format.

Permissions (see docs/design.md, "Broker topology"):

- device ``<ident>`` with topic ``remote.<sid>.<ident>``: configure ``^<topic>\\.``,
  write ``^(remote\\.up|amq\\.default|<topic>\\..*)$``, read ``^(remote\\.down|<topic>\\..*)$``;
  topic permissions ``remote.up`` write ``^<topic>\\.``, ``remote.down`` read ``^<topic>\\.``.
  So a device can declare/consume only its own queues, bind them only to its own routing
  keys, and publish on ``remote.up`` only under its own topic.
- operator (console) ``<user>``: may declare, bind and consume its own queues — server-named
  (``amq.gen-…``) or named ``console.<user>.…``; bind them to ``remote.up`` for any device
  topic (``^remote\\.``); publish on ``remote.down`` for any device topic and on the default
  exchange (replies). It cannot touch device queues nor publish on ``remote.up``.
"""

from __future__ import annotations

import atexit
import base64
import errno
import hashlib
import json
import logging
import os
import re
import secrets
import shutil
import signal
import socket
import subprocess
import time
import weakref
from typing import Any, Dict, List, Mapping, Optional, Sequence
from urllib.parse import quote

from remote_gevent.common import fsutil

log = logging.getLogger(__name__)

RABBITMQ_BIN_DIR = "/usr/lib/rabbitmq/bin"
RABBITMQ_SERVER = os.path.join(RABBITMQ_BIN_DIR, "rabbitmq-server")
RABBITMQCTL = os.path.join(RABBITMQ_BIN_DIR, "rabbitmqctl")

#: Default start-up bound; a node without plugins boots in ~5 s on a small machine.
START_TIMEOUT = 60.0
STOP_TIMEOUT = 15.0
CTL_TIMEOUT = 60.0
POLL_INTERVAL = 0.1

# remote.reply carries replies to consoles' server-named reply queues: devices may
# publish there (to amq.gen-* keys only) and nowhere else by queue name. Giving devices
# the default exchange instead would let one device fill another's command queue.
EXCHANGES = ("remote.down", "remote.up", "remote.reply", "remote.fleet")
#: Broker-wide cap on one message's body (``max_message_size``; RabbitMQ's default is
#: 128 MiB). Every control message is at most 16 KiB (protocol.MAX_MESSAGE_BYTES): 256 KiB
#: leaves 16x headroom (bodies still span frames at the default 128 KiB frame_max) and
#: bounds what a single publish can make the broker hold in a queue without a byte cap.
#: A larger publish closes the publisher's channel (PRECONDITION_FAILED); no consumer
#: ever sees it.
MAX_MESSAGE_SIZE = 256 * 1024
IDENT_RE = re.compile(r"^[A-Za-z0-9_-]{1,64}$")
USER_RE = re.compile(r"^[A-Za-z0-9_.@-]{1,64}$")


class RabbitError(RuntimeError):
    """The node could not be started, stopped or provisioned (message says why)."""


def available() -> bool:
    """True when a RabbitMQ server is installed where we expect it."""
    return os.access(RABBITMQ_SERVER, os.X_OK) and os.access(RABBITMQCTL, os.X_OK)


def _epmd_binary() -> Optional[str]:
    found = shutil.which("epmd")
    if found:
        return found
    for root in ("/usr/lib/erlang", "/usr/local/lib/erlang"):
        if os.path.isdir(root):
            for name in sorted(os.listdir(root)):
                candidate = os.path.join(root, name, "bin", "epmd")
                if name.startswith("erts-") and os.access(candidate, os.X_OK):
                    return candidate
    return None


#: Where free ports are picked: above the well-known and registered ports most services
#: use, below the kernel's ephemeral range (net.ipv4.ip_local_port_range, 32768 by
#: default), so that no outgoing connection can be given the port between our check and
#: the bind of the process it is for (the suite opens thousands of connections while it
#: starts brokers, relays and agents on ports picked this way).
PORT_FLOOR = 20000
#: Picks are also reserved for a while across processes (the suite and the old-Python
#: tiers run side by side in CI): another picker on this machine skips a port picked in
#: the last ``PORT_RESERVATION`` seconds, which is the time it takes to bind it.
PORT_RESERVATION = 120.0
PORT_RESERVATIONS = os.path.join("/tmp", "remote-gevent-ports-%d" % os.getuid())


def _ephemeral_floor() -> int:
    try:
        with open("/proc/sys/net/ipv4/ip_local_port_range") as f:
            low = int(f.read().split()[0])
    except (OSError, ValueError, IndexError):
        return 32768
    return low if low > PORT_FLOOR + 1000 else 65536  # a range starting low: no gap


def _reserve(port: int) -> bool:
    """True if ``port`` was not picked by anyone in the last PORT_RESERVATION seconds
    (it is now ours); a missing or unwritable directory reserves nothing."""
    try:
        os.makedirs(PORT_RESERVATIONS, mode=0o700, exist_ok=True)
        path = os.path.join(PORT_RESERVATIONS, str(port))
        try:
            os.close(os.open(path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o600))
            return True
        except FileExistsError:
            if time.time() - os.stat(path).st_mtime < PORT_RESERVATION:
                return False
            os.utime(path)  # an old pick: ours now
            return True
    except OSError:
        return True


def free_port(host: str = "127.0.0.1", below: int = 0) -> int:
    """A TCP port free on ``host`` now, picked at random in ``[PORT_FLOOR, below)``
    (``below`` 0: the start of the ephemeral range, see ``PORT_FLOOR``) and reserved
    against other pickers on this machine for ``PORT_RESERVATION`` seconds."""
    limit = _ephemeral_floor()
    below = min(below, limit) if below else limit
    for _ in range(200):
        with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
            port = PORT_FLOOR + secrets.randbelow(below - PORT_FLOOR)
            try:
                s.bind((host, port))
            except OSError:
                continue
        if _reserve(port):
            return port
    raise RabbitError("no free port found on %s" % host)


def rabbit_password_hash(password: str) -> str:
    """RabbitMQ's ``rabbit_password_hashing_sha256`` format: b64(salt4 + sha256(salt4 + pw))."""
    salt = secrets.token_bytes(4)
    return base64.b64encode(salt + hashlib.sha256(salt + password.encode("utf-8")).digest()
                            ).decode("ascii")


def _escape(text: str) -> str:
    return re.escape(text)


def device_topic(server_id: str, ident: str) -> str:
    return "remote.%s.%s" % (server_id, ident)


def device_permissions(server_id: str, ident: str) -> Dict[str, Any]:
    """The confining permission set of design.md for one device (regexes)."""
    t = _escape(device_topic(server_id, ident))
    return {
        "configure": r"^%s\." % t,
        "write": r"^(remote\.up|remote\.reply|%s\..*)$" % t,
        "read": r"^(remote\.down|remote\.fleet|%s\..*)$" % t,
        "topic": [
            {"exchange": "remote.up", "write": r"^%s\." % t, "read": "^$"},
            {"exchange": "remote.down", "write": "^$", "read": r"^%s\." % t},
            {"exchange": "remote.reply", "write": r"^amq\.gen-", "read": "^$"},
            # the fleet revocation of its server id (agent/fleet_revocation.py)
            {"exchange": "remote.fleet", "write": "^$",
             "read": r"^%s\.revocation$" % _escape(server_id)},
        ],
    }


def operator_permissions(user: str) -> Dict[str, Any]:
    """Console permissions: own queues, publish down / read up for any device topic."""
    own = r"console\.%s\..*" % _escape(user)
    return {
        "configure": r"^(amq\.gen-.*|%s)$" % own,
        "write": r"^(remote\.down|remote\.fleet|amq\.gen-.*|%s)$" % own,
        "read": r"^(remote\.up|remote\.reply|amq\.gen-.*|%s)$" % own,
        "topic": [
            {"exchange": "remote.down", "write": r"^remote\.", "read": "^$"},
            {"exchange": "remote.up", "write": "^$", "read": r"^remote\."},
            {"exchange": "remote.reply", "write": "^$", "read": r"^amq\.gen-"},
            # Only CA-signed revocations are applied; still, give this to administrators
            # only: a publication replaces the one waiting in offline devices' queues.
            {"exchange": "remote.fleet", "write": r"^[A-Za-z0-9_-]+\.revocation$",
             "read": "^$"},
        ],
    }


_LIVE_NODES: weakref.WeakSet[RabbitNode] = weakref.WeakSet()


@atexit.register
def _stop_all_nodes() -> None:  # safety net: never leave stray beam processes
    for node in list(_LIVE_NODES):
        try:
            node.stop(timeout=5.0)
        except (OSError, RabbitError) as exc:
            log.warning("could not stop RabbitMQ node %s: %s", node.node_name, exc)


class RabbitNode:
    """One private RabbitMQ node living in ``base_dir``.

    ``amqps_port=0`` picks a free port; ``amqp_port`` (None: no plain listener, 0: pick)
    adds a plain AMQP listener on 127.0.0.1 for admin use; ``dist_port=0`` picks the
    Erlang distribution port (the CLI uses ``dist_port + 10000``, so it stays below 55000).
    ``ca_file``/``cert_file``/``key_file`` are the TLS listener's files.
    """

    def __init__(self, base_dir: str, node_name: Optional[str] = None, amqps_port: int = 0,
                 amqp_port: Optional[int] = None, dist_port: int = 0,
                 ca_file: Optional[str] = None, cert_file: Optional[str] = None,
                 key_file: Optional[str] = None, host: str = "127.0.0.1",
                 epmd_port: int = 0, cookie: Optional[str] = None,
                 extra_conf: Sequence[str] = ()) -> None:
        if not (ca_file and cert_file and key_file):
            raise RabbitError("RabbitNode needs ca_file, cert_file and key_file for TLS")
        self.base_dir = os.path.abspath(base_dir)
        self.node_name = node_name or "rg-test-%d-%s@localhost" % (os.getpid(),
                                                                   secrets.token_hex(2))
        self.host = host
        self.amqps_port = amqps_port or free_port(host)
        self.amqp_port = (amqp_port or free_port(host)) if amqp_port is not None else None
        self.dist_port = dist_port or free_port("127.0.0.1", below=55000)
        # A cluster's nodes share one epmd (the first node's) and one cookie: Erlang
        # finds its peers through the epmd port in ERL_EPMD_PORT.
        self.owns_epmd = not epmd_port
        self.epmd_port = epmd_port or free_port("127.0.0.1")
        self.cookie = cookie or secrets.token_hex(20).upper()
        self.extra_conf = list(extra_conf)  # more rabbitmq.conf lines (cluster formation)
        self.ca_file = os.path.abspath(ca_file)
        self.cert_file = os.path.abspath(cert_file)
        self.key_file = os.path.abspath(key_file)
        self.admin_user = "rg-admin"
        self.admin_password = secrets.token_hex(16)
        self._proc: Optional[subprocess.Popen] = None
        self._epmd: Optional[subprocess.Popen] = None
        self._write_files()

    # ------------------------------------------------------------------ files and env
    @property
    def log_dir(self) -> str:
        return os.path.join(self.base_dir, "log")

    @property
    def log_file(self) -> str:
        return os.path.join(self.log_dir, "rabbit.log")

    def _write_files(self) -> None:
        for sub in ("", "mnesia", "log", "home"):
            os.makedirs(os.path.join(self.base_dir, sub), mode=0o700, exist_ok=True)
        cookie = os.path.join(self.base_dir, "home", ".erlang.cookie")
        if not os.path.exists(cookie):
            fd = os.open(cookie, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o400)
            with os.fdopen(fd, "w") as f:
                f.write(self.cookie)
        lines = [
            "# written by remote_gevent.demo.rabbit — private node %s" % self.node_name,
            "listeners.tcp = none" if self.amqp_port is None
            else "listeners.tcp.1 = 127.0.0.1:%d" % self.amqp_port,
            "listeners.ssl.1 = %s:%d" % (self.host, self.amqps_port),
            "ssl_options.cacertfile = %s" % self.ca_file,
            "ssl_options.certfile = %s" % self.cert_file,
            "ssl_options.keyfile = %s" % self.key_file,
            "ssl_options.verify = verify_none",
            "ssl_options.fail_if_no_peer_cert = false",
            "ssl_options.versions.1 = tlsv1.3",
            "ssl_options.versions.2 = tlsv1.2",
            "default_user = %s" % self.admin_user,
            "default_pass = %s" % self.admin_password,
            "default_vhost = /",
            # The admin user must be able to log in over the loopback listener.
            "loopback_users = none",
            "disk_free_limit.absolute = 10MB",
            "max_message_size = %d" % MAX_MESSAGE_SIZE,
            "log.file = rabbit.log",
            "log.file.level = info",
            "log.console = false",
        ] + self.extra_conf + [""]
        self._write(os.path.join(self.base_dir, "rabbitmq.conf"), "\n".join(lines), 0o600)
        self._write(os.path.join(self.base_dir, "enabled_plugins"), "[].\n", 0o600)
        # Our own env file, so /etc/rabbitmq/rabbitmq-env.conf (the system node's) is not read.
        self._write(os.path.join(self.base_dir, "rabbitmq-env.conf"), "# private node\n", 0o600)

    @staticmethod
    def _write(path: str, text: str, mode: int) -> None:
        fsutil.write_atomic(path, text, mode)

    def env(self) -> Dict[str, str]:
        """Environment for rabbitmq-server and rabbitmqctl talking to this node."""
        env = {k: v for k, v in os.environ.items() if not k.startswith(("RABBITMQ_", "ERL_"))}
        env.update({
            "HOME": os.path.join(self.base_dir, "home"),
            "RABBITMQ_NODENAME": self.node_name,
            "RABBITMQ_USE_LONGNAME": "false",
            "RABBITMQ_CONF_ENV_FILE": os.path.join(self.base_dir, "rabbitmq-env.conf"),
            "RABBITMQ_CONFIG_FILE": os.path.join(self.base_dir, "rabbitmq.conf"),
            "RABBITMQ_ADVANCED_CONFIG_FILE": os.path.join(self.base_dir, "advanced.config"),
            "RABBITMQ_ENABLED_PLUGINS_FILE": os.path.join(self.base_dir, "enabled_plugins"),
            "RABBITMQ_MNESIA_BASE": os.path.join(self.base_dir, "mnesia"),
            "RABBITMQ_LOG_BASE": self.log_dir,
            "RABBITMQ_PID_FILE": os.path.join(self.base_dir, "rabbit.pid"),
            "RABBITMQ_DIST_PORT": str(self.dist_port),
            "RABBITMQ_SERVER_ADDITIONAL_ERL_ARGS":
                "-kernel inet_dist_use_interface {127,0,0,1}",
            "ERL_EPMD_PORT": str(self.epmd_port),
            "ERL_EPMD_ADDRESS": "127.0.0.1",
            "LC_ALL": "C.UTF-8",
            "LANG": "C.UTF-8",
        })
        return env

    # ------------------------------------------------------------------ lifecycle
    @property
    def running(self) -> bool:
        return self._proc is not None and self._proc.poll() is None

    def start(self, timeout: float = START_TIMEOUT) -> "RabbitNode":
        """Start the node and wait until its TLS port accepts connections."""
        if self.running:
            return self
        if not available():
            raise RabbitError("RabbitMQ is not installed (%s missing)" % RABBITMQ_SERVER)
        self._start_epmd()
        # Never mistake another listener (or the dying previous incarnation) for our node.
        busy_until = time.monotonic() + 5.0
        while self._port_open():
            if time.monotonic() > busy_until:
                raise RabbitError("%s:%d is already in use by another process"
                                  % (self.host, self.amqps_port))
            time.sleep(POLL_INTERVAL)
        out = open(os.path.join(self.log_dir, "startup.log"), "ab")
        try:
            self._proc = subprocess.Popen(
                [RABBITMQ_SERVER], env=self.env(), cwd=self.base_dir,
                stdin=subprocess.DEVNULL, stdout=out, stderr=subprocess.STDOUT,
                start_new_session=True,  # own process group: stop() kills all of it
            )
        finally:
            out.close()
        _LIVE_NODES.add(self)
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self._proc.poll() is not None:
                raise RabbitError("RabbitMQ node %s exited with %s during start-up; see %s"
                                  % (self.node_name, self._proc.returncode,
                                     self._log_tail()))
            if self._port_open():
                log.info("RabbitMQ node %s up, amqps on %s:%d", self.node_name, self.host,
                         self.amqps_port)
                return self
            time.sleep(POLL_INTERVAL)
        self._kill_group(signal.SIGKILL)
        raise RabbitError("RabbitMQ node %s did not open %s:%d within %.0f s; see %s"
                          % (self.node_name, self.host, self.amqps_port, timeout,
                             self._log_tail()))

    def _start_epmd(self) -> None:
        if self._epmd is not None and self._epmd.poll() is None:
            return
        if not self.owns_epmd:  # a cluster peer's epmd: it must be up already
            if not self._wait_epmd(5.0):
                raise RabbitError("shared epmd on 127.0.0.1:%d is not up" % self.epmd_port)
            return
        epmd = _epmd_binary()
        if epmd is None:
            raise RabbitError("epmd not found (is Erlang installed?)")
        self._epmd = subprocess.Popen(
            [epmd, "-port", str(self.epmd_port), "-address", "127.0.0.1"],
            env=self.env(), stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL, start_new_session=True,
        )
        # The VM starts an epmd of its own if ours is not listening yet: wait for it.
        if not self._wait_epmd(10.0):
            raise RabbitError("epmd did not start on 127.0.0.1:%d" % self.epmd_port)

    def _wait_epmd(self, timeout: float) -> bool:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            try:
                with socket.create_connection(("127.0.0.1", self.epmd_port), timeout=0.5):
                    return True
            except OSError:
                if self._epmd is not None and self._epmd.poll() is not None:
                    return False
                time.sleep(0.02)
        return False

    def _log_tail(self) -> str:
        for path in (self.log_file, os.path.join(self.log_dir, "startup.log")):
            try:
                with open(path, "rb") as f:
                    f.seek(0, os.SEEK_END)
                    f.seek(max(0, f.tell() - 1500))
                    tail = f.read().decode("utf-8", "replace").strip()
                if tail:
                    return "%s:\n%s" % (path, tail)
            except OSError:
                continue
        return self.log_dir

    def wait_port(self, timeout: float = START_TIMEOUT) -> None:
        """Wait until the TLS listener accepts connections (after ``start_app``)."""
        deadline = time.monotonic() + timeout
        while not self._port_open():
            if time.monotonic() > deadline:
                raise RabbitError("node %s: %s:%d not open after %.0f s; see %s" % (
                    self.node_name, self.host, self.amqps_port, timeout, self._log_tail()))
            time.sleep(POLL_INTERVAL)

    def _port_open(self) -> bool:
        try:
            with socket.create_connection((self.host, self.amqps_port), timeout=0.5):
                return True
        except OSError:
            return False

    def _kill_group(self, sig: int) -> None:
        if self._proc is None:
            return
        try:
            os.killpg(self._proc.pid, sig)
        except OSError as exc:
            if exc.errno != errno.ESRCH:
                raise

    def _group_alive(self) -> bool:
        """Does any non-zombie process remain in the node's process group?"""
        assert self._proc is not None
        pgid = self._proc.pid
        self._proc.poll()
        try:
            pids = [p for p in os.listdir("/proc") if p.isdigit()]
        except OSError:  # no /proc: fall back to signal 0 (counts zombies too)
            try:
                os.killpg(pgid, 0)
            except OSError:
                return False
            return True
        for pid in pids:
            try:
                with open("/proc/%s/stat" % pid, "rb") as f:
                    stat = f.read().decode("ascii", "replace")
            except OSError:
                continue
            # "pid (comm) state ppid pgrp ..." — comm may contain spaces: split after ')'.
            fields = stat.rsplit(")", 1)[-1].split()
            if len(fields) > 2 and fields[2] == str(pgid) and fields[0] != "Z":
                return True
        return False

    def _wait_group_gone(self, timeout: float) -> bool:
        """Wait for the leader *and* every process of its group (beam, erl_child_setup)."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if not self._group_alive():
                return True
            time.sleep(POLL_INTERVAL)
        return False

    def stop(self, timeout: float = STOP_TIMEOUT) -> None:
        """Stop the node (SIGTERM = graceful shutdown, then SIGKILL) and our epmd."""
        if self._proc is not None:
            self._kill_group(signal.SIGTERM)
            if not self._wait_group_gone(timeout):
                log.warning("RabbitMQ node %s did not stop in %.0f s, killing it",
                            self.node_name, timeout)
                self._kill_group(signal.SIGKILL)
                self._wait_group_gone(5.0)
            self._proc = None
        if self._epmd is not None:
            if self._epmd.poll() is None:
                self._epmd.kill()
            self._epmd.wait(5.0)
            self._epmd = None
        _LIVE_NODES.discard(self)

    def kill(self) -> None:
        """Hard-kill the node (as a crash would), leaving its data and epmd in place."""
        if self._proc is not None:
            self._kill_group(signal.SIGKILL)
            self._wait_group_gone(10.0)
            self._proc = None

    def restart(self, timeout: float = START_TIMEOUT) -> "RabbitNode":
        """Kill the node and start it again on the same ports and data (reconnect tests)."""
        self.kill()
        return self.start(timeout)

    def ctl(self, *args: str, input: Optional[str] = None, timeout: float = CTL_TIMEOUT) -> str:
        """Run ``rabbitmqctl -n <node> <args>`` against this node; returns stdout."""
        cmd = [RABBITMQCTL, "-n", self.node_name] + list(args)
        try:
            done = subprocess.run(cmd, env=self.env(), input=input, capture_output=True,
                                  text=True, timeout=timeout, cwd=self.base_dir)
        except subprocess.TimeoutExpired as exc:
            raise RabbitError("rabbitmqctl %s timed out after %.0f s" % (args[0], timeout)
                              ) from exc
        if done.returncode != 0:
            raise RabbitError("rabbitmqctl %s failed (%d): %s"
                              % (" ".join(args), done.returncode,
                                 (done.stderr or done.stdout).strip()))
        return done.stdout

    # ------------------------------------------------------------------ URLs
    def amqps_url(self, vhost: str = "/", host: Optional[str] = None) -> str:
        """``amqps://host:port/<vhost url-encoded>`` (``/`` becomes ``%2F``)."""
        return "amqps://%s:%d/%s" % (host or self.host, self.amqps_port, quote(vhost, safe=""))

    def amqp_url(self, vhost: str = "/") -> str:
        if self.amqp_port is None:
            raise RabbitError("this node has no plain AMQP listener")
        return "amqp://127.0.0.1:%d/%s" % (self.amqp_port, quote(vhost, safe=""))

    # ------------------------------------------------------------------ provisioning
    def import_definitions(self, definitions: Mapping[str, Any]) -> None:
        """Additive import (users, vhosts, permissions, exchanges …) in one CLI call, via stdin."""
        body: Dict[str, Any] = {
            "rabbit_version": "3.10.0", "users": [], "vhosts": [], "permissions": [],
            "topic_permissions": [], "parameters": [], "global_parameters": [],
            "policies": [], "queues": [], "exchanges": [], "bindings": []}
        body.update(definitions)
        # Thousands of users (bench_fleet) take the node tens of seconds to hash and store.
        users = len(body.get("users") or ())
        self.ctl("import_definitions", "--format", "json", input=json.dumps(body),
                 timeout=CTL_TIMEOUT + users / 25.0)

    def declare_platform(self, vhost: str = "/") -> None:
        """Create ``vhost`` and the durable topic exchanges ``remote.down``/``.up``/``.reply``."""
        self.import_definitions({
            "vhosts": [{"name": vhost}],
            "permissions": [{"user": self.admin_user, "vhost": vhost, "configure": ".*",
                             "write": ".*", "read": ".*"}],
            "exchanges": [{"name": name, "vhost": vhost, "type": "topic", "durable": True,
                           "auto_delete": False, "internal": False, "arguments": {}}
                          for name in EXCHANGES],
        })

    @staticmethod
    def _user_defs(vhost: str, user: str, password: str, perms: Dict[str, Any],
                   tags: Sequence[str] = ()) -> Dict[str, List[Dict[str, Any]]]:
        return {
            "users": [{"name": user, "password_hash": rabbit_password_hash(password),
                       "hashing_algorithm": "rabbit_password_hashing_sha256",
                       "tags": list(tags), "limits": {}}],
            "permissions": [{"user": user, "vhost": vhost, "configure": perms["configure"],
                             "write": perms["write"], "read": perms["read"]}],
            "topic_permissions": [dict(tp, user=user, vhost=vhost) for tp in perms["topic"]],
        }

    @staticmethod
    def _merge(parts: Sequence[Dict[str, List[Dict[str, Any]]]]
               ) -> Dict[str, List[Dict[str, Any]]]:
        merged: Dict[str, List[Dict[str, Any]]] = {}
        for part in parts:
            for key, items in part.items():
                merged.setdefault(key, []).extend(items)
        return merged

    def add_devices(self, vhost: str, devices: Sequence[Sequence[str]]) -> None:
        """Provision several ``(ident, token, server_id)`` devices in one CLI call."""
        parts = []
        for ident, token, server_id in devices:
            if not IDENT_RE.match(ident) or not IDENT_RE.match(server_id):
                raise RabbitError("bad ident/server_id %r/%r: [A-Za-z0-9_-]{1,64} only"
                                  % (ident, server_id))
            parts.append(self._user_defs(vhost, ident, token,
                                         device_permissions(server_id, ident)))
        self.import_definitions(self._merge(parts))

    def add_device(self, vhost: str, ident: str, token: str, server_id: str = "fr04") -> None:
        """Broker user ``ident``/``token`` confined to topic ``remote.<server_id>.<ident>``."""
        self.add_devices(vhost, [(ident, token, server_id)])

    def add_operator(self, vhost: str, user: str, password: str) -> None:
        """Console user: see the module docstring for what it may and may not do."""
        if not USER_RE.match(user):
            raise RabbitError("bad operator user name %r" % user)
        self.import_definitions(self._user_defs(vhost, user, password,
                                                operator_permissions(user)))

    def delete_user(self, user: str) -> None:
        self.ctl("delete_user", user)

    def __enter__(self) -> "RabbitNode":
        return self.start()

    def __exit__(self, *exc_info: object) -> None:
        self.stop()
