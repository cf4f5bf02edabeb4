"""The agent: wires config, identity key, supervisor, control plane and tunnels.

The main greenlet runs ``Agent.run()``: it waits on one wake-up event and handles
the requests queued by the signal handlers (which do nothing else):

- SIGTERM / SIGINT: graceful stop — ``stop_event`` is set, services and tunnels get
  ``STOP_GRACE`` seconds to end, then are killed; exit 0.  A second SIGTERM/SIGINT
  during the grace period forces the exit at once (exit ``AGENT_EXIT_FORCED``).
- SIGHUP: reload the config file.  An invalid file is logged and the running config
  kept; keys in ``LIVE_KEYS`` take effect at once (callbacks in ``on_config_changed``
  adapt the services), every other change is logged as needing a restart.  Whatever
  the config says, ``authorized_keys`` is re-read too: an operator removed from it has
  its open and waiting sessions ended at once (close code ``revoked``).
- SIGUSR1: rotate the identity key (``rotate_key()``), then ``on_key_rotated``
  callbacks run (the control plane publishes the new key there).

Extension point: ``_start_services()`` adds the long-lived services to
``self.supervisor``; the control plane and tunnel manager are hooked in there.
"""

import dataclasses
import logging
import os
import signal
import time
from collections import deque
from typing import Any, Callable, Deque, List, Optional, Tuple

import gevent
import gevent.event

from remote_gevent import __version__
from remote_gevent.crypto import identity
from remote_gevent.common import memory
from remote_gevent.agent import config as config_mod
from remote_gevent.agent.config import AgentConfig
from remote_gevent.agent.control import ControlPlane
from remote_gevent.agent.history import History
from remote_gevent.crypto.identity import IdentityKey
from remote_gevent.agent.supervisor import Supervisor
from remote_gevent.agent.tunnels import TunnelManager
from remote_gevent.wire.codes import AGENT_EXIT_FORCED, AGENT_EXIT_OK

log = logging.getLogger(__name__)

STOP_GRACE = 10.0  # seconds services and tunnels get to end after SIGTERM
MAIN_TICK = 1.0  # seconds; the main loop wakes at least this often
KEY_ROTATION_CHECK = 3600.0  # seconds between two checks of the key's age
#: Seconds after the control plane is first ready (connected, key published) before the
#: memory freed during start-up is handed back to the OS (:mod:`remote_gevent.common.memory`).
RELEASE_MEMORY_DELAY = 2.0


#: Keys a SIGHUP applies to the running agent (README, "Signals"). ``remote.max_session``
#: either way: raising it admits waiting requests at once; lowering it cuts nothing, new
#: sessions wait until fewer than the new cap run (TunnelManager.apply_config).
LIVE_KEYS = (
    "remote.health_check",
    "remote.max_session",
    "remote.allow",
    "remote.authorized_keys",
    "remote.idle_timeout",
    "remote.max_session_per_operator",
    "remote.operator_rate",
    "remote.operator_burst",
)

ConfigHook = Callable[[AgentConfig, AgentConfig], None]
RotationHook = Callable[[IdentityKey, IdentityKey], None]


def _flatten(cfg: AgentConfig) -> List[Tuple[str, Any]]:
    items: List[Tuple[str, Any]] = [("ident", cfg.ident), ("token", cfg.token)]
    for section in ("amqp", "remote"):
        obj = getattr(cfg, section)
        for f in dataclasses.fields(obj):
            value = getattr(obj, f.name)
            if f.name == "relays":
                value = dict(value)
            items.append(("%s.%s" % (section, f.name), value))
    return items


def diff_config(old: AgentConfig, new: AgentConfig) -> List[str]:
    """Dotted keys whose value differs between two configs."""
    return [k for (k, a), (_, b) in zip(_flatten(old), _flatten(new)) if a != b]


class Agent:
    """One running agent.  ``run()`` blocks until stopped and returns the exit code."""

    stop_grace = STOP_GRACE

    def __init__(self, cfg: AgentConfig, config_path: Optional[str] = None) -> None:
        self.cfg = cfg
        self.config_path = config_path or cfg.path
        self.version = __version__
        self.started_at = time.time()
        self.identity = identity.load_or_create(cfg.remote.key_path)
        self.supervisor = Supervisor(on_fatal=self._on_fatal)
        self.stop_event = self.supervisor.stop_event
        self.on_config_changed: List[ConfigHook] = []
        self.on_key_rotated: List[RotationHook] = []
        self.on_stopping: List[Callable[[], None]] = []
        self.exit_code = AGENT_EXIT_OK
        self._pending: Deque[str] = deque()
        self._wake = gevent.event.Event()
        self._force = gevent.event.Event()
        self._stopping = False
        self._signal_handles: List[Any] = []
        # Built by _start_services (the control plane opens the broker link).
        self.control: Optional[ControlPlane] = None
        self.tunnels: Optional[TunnelManager] = None
        self.history: Optional[History] = None

    # ------------------------------------------------------------------ accessors

    @property
    def topic(self) -> str:
        return config_mod.topic(self.cfg)

    @property
    def uptime(self) -> float:
        return time.time() - self.started_at

    def get_identity(self) -> IdentityKey:
        """The identity key in force now (changes on rotation)."""
        return self.identity

    # ------------------------------------------------------------------ requests

    def _request(self, what: str) -> None:
        self._pending.append(what)
        self._wake.set()

    def request_stop(self, exit_code: int = AGENT_EXIT_OK) -> None:
        """Ask for a graceful stop; a second request during the stop forces it."""
        if self._stopping:
            self._force.set()
            return
        if exit_code != AGENT_EXIT_OK and self.exit_code == AGENT_EXIT_OK:
            self.exit_code = exit_code
        self._request("stop")

    def request_reload(self) -> None:
        self._request("reload")

    def request_rotate(self) -> None:
        self._request("rotate")

    def _on_fatal(self, exit_code: int) -> None:
        self.request_stop(exit_code)

    # ------------------------------------------------------------------ signals

    def _on_term_signal(self) -> None:
        # Runs in the hub: only record the request.
        if self._pending.count("stop") or self._stopping:
            self._force.set()
            self._wake.set()
        else:
            self._request("stop")

    def install_signal_handlers(self) -> None:
        handlers = (
            (signal.SIGTERM, self._on_term_signal),
            (signal.SIGINT, self._on_term_signal),
            (signal.SIGHUP, self.request_reload),
            (signal.SIGUSR1, self.request_rotate),
        )
        for signum, func in handlers:
            self._signal_handles.append(gevent.signal_handler(signum, func))

    def remove_signal_handlers(self) -> None:
        for handle in self._signal_handles:
            handle.cancel()
        self._signal_handles = []

    # ------------------------------------------------------------------ services

    def _start_services(self) -> None:
        """Add the long-lived services to ``self.supervisor``.

        Extension point: the control plane (AMQP consumer, heartbeat) and the tunnel
        manager (GC) are started here.  With no service the agent idles until stopped.
        """
        if self.cfg.remote.key_rotation_days > 0:
            self.supervisor.add("key-rotation", self._key_rotation_service)
        # The tunnel manager does not depend on the AMQP link: losing the link never
        # disturbs open tunnels. It needs control.publish_close, hence the late binding.
        self.history = History(self.cfg.remote.history_path)
        control = self.control = ControlPlane(self)
        tunnels = self.tunnels = TunnelManager(self.cfg, self.get_identity, self.history,
                                               control.publish_close,
                                               trusted_keys=control.trusted_keys)
        control.tunnels = tunnels
        tunnels.on_sessions_changed = control.poke_alive  # a "sessions" alive soon
        self.on_config_changed.append(lambda old, new: tunnels.apply_config(new))
        self.on_stopping.append(lambda: self._stop_control(control, tunnels))
        self.supervisor.add("control", control.run)
        self.supervisor.add("heartbeat", control.heartbeat_loop)
        self.supervisor.add("tunnel-gc", lambda: tunnels.gc_loop(self.stop_event))
        self.supervisor.spawn_transient("release-memory",
                                        lambda: self._release_memory_when_ready(control))

    def _release_memory_when_ready(self, control: ControlPlane) -> None:
        """Once the control plane is first ready and settled: gc + ``malloc_trim``."""
        gevent.wait([control.link.connected, self.stop_event], count=1)
        if self.stop_event.wait(RELEASE_MEMORY_DELAY):
            return
        before = memory.rss_kib()
        if memory.release():
            log.debug("start-up memory released: RSS %s -> %s KiB", before, memory.rss_kib())

    def _stop_control(self, control: ControlPlane, tunnels: TunnelManager) -> None:
        """``on_stopping`` hook, while the link is still up: refuse new requests, end every
        tunnel with ``shutdown`` (history row + session.close each), then ``alive stopping``."""
        control.begin_stop()
        tunnels.shutdown(self.stop_grace)
        control.send_alive("stopping", wait=1.0)

    def _key_rotation_service(self) -> None:
        """Ask for a rotation when the key file is older than ``key_rotation_days``."""
        while not self.stop_event.is_set():
            days = self.cfg.remote.key_rotation_days
            if days > 0:
                try:
                    age = time.time() - os.stat(self.cfg.remote.key_path).st_mtime
                except OSError as exc:
                    log.warning("cannot stat identity key %s: %s", self.cfg.remote.key_path,
                                exc.strerror)
                else:
                    if age >= days * 86400:
                        log.info("identity key is %.1f days old: rotating", age / 86400)
                        self.request_rotate()
            self.stop_event.wait(KEY_ROTATION_CHECK)

    # ------------------------------------------------------------------ main loop

    def run(self) -> int:
        """Start the services and handle requests until stopped; return the exit code."""
        self.install_signal_handlers()
        try:
            log.info("agent %s starting: %s, key %s", self.version, self.topic,
                     self.identity.fingerprint)
            self._start_services()
            log.info("agent started with %d service(s)", len(self.supervisor.services))
            while True:
                # A timeout keeps a timer in the loop: with no service and no I/O the
                # hub would otherwise report "would block forever" (LoopExit).
                if not self._wake.wait(MAIN_TICK):
                    continue
                self._wake.clear()
                while self._pending:
                    what = self._pending.popleft()
                    if what == "stop":
                        self._stop()
                        return self.exit_code
                    if what == "reload":
                        self.reload()
                    elif what == "rotate":
                        self._rotate_safely()
        finally:
            self.remove_signal_handlers()

    def _stop(self) -> None:
        self._stopping = True
        log.info("stopping (grace %gs)", self.stop_grace)
        for hook in list(self.on_stopping):
            try:
                hook()
            except Exception:
                log.exception("stopping hook %r failed", hook)
        clean = self.supervisor.stop(self.stop_grace, force=self._force)
        if self._force.is_set():
            log.warning("second stop signal: forced exit")
            self.exit_code = AGENT_EXIT_FORCED
        elif not clean:
            log.warning("grace period over: remaining greenlets were killed")
        log.info("agent stopped (exit %d)", self.exit_code)

    # ------------------------------------------------------------------ reload

    def reload(self) -> bool:
        """Re-read the config file; apply live keys; True if the new file was valid.

        ``authorized_keys`` is re-read in every case (after the live keys, which may
        name another file): revocation must not wait for the next request."""
        try:
            return self._reload_config()
        finally:
            self._reload_trust()

    def _reload_trust(self) -> None:
        control = self.control
        if control is None:
            return
        try:
            control.trusted_keys(force=True)
        except Exception:  # noqa: BLE001 - a reload must never take the agent down
            log.exception("reload: re-reading the trusted keys failed")

    def _reload_config(self) -> bool:
        try:
            new = config_mod.load(self.config_path)
        except config_mod.ConfigError as exc:
            log.error("reload refused, keeping the running config: %s",
                      "; ".join(exc.problems))
            return False
        old = self.cfg
        changed = diff_config(old, new)
        if not changed:
            log.info("reload: %s unchanged", self.config_path)
            return True
        live = {}
        for dotted in changed:
            name = dotted.partition(".")[2]
            if dotted in LIVE_KEYS:
                live[name] = getattr(new.remote, name)
            else:
                # Only the key's name is logged: values may be credentials.
                log.warning("reload: %s changed; needs a restart, keeping the running value",
                            dotted)
        if not live:
            return True
        applied = dataclasses.replace(old, remote=dataclasses.replace(old.remote, **live))
        self.cfg = applied
        log.info("reload: applied %s", ", ".join("remote.%s" % k for k in sorted(live)))
        for hook in list(self.on_config_changed):
            try:
                hook(old, applied)
            except Exception:
                log.exception("config hook %r failed", hook)
        return True

    # ------------------------------------------------------------------ key rotation

    def _rotate_safely(self) -> None:
        try:
            self.rotate_key()
        except identity.IdentityError as exc:
            log.error("key rotation failed, keeping the current key: %s", exc)

    def rotate_key(self) -> Tuple[IdentityKey, IdentityKey]:
        """Replace the key file with a new key, then run ``on_key_rotated(old, new)``."""
        old, new = identity.rotate(self.cfg.remote.key_path)
        if old.public_bytes != self.identity.public_bytes:
            log.warning("key file %s had changed on disk since start (%s, running %s)",
                        self.cfg.remote.key_path, old.fingerprint, self.identity.fingerprint)
        self.identity = new
        log.info("identity key rotated: %s -> %s", old.fingerprint, new.fingerprint)
        for hook in list(self.on_key_rotated):
            try:
                hook(old, new)
            except Exception:
                log.exception("key rotation hook %r failed", hook)
        return old, new
