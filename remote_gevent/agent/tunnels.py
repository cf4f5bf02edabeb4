"""Agent side of the tunnels: admission, relay dial, stream targets, garbage collection.

``TunnelManager`` is what the control plane hands accepted session requests to
(docs/design.md, "Agent runtime"). Its shape:

- ``submit(request, reply)`` never blocks the AMQP consumer: each session runs in its
  own greenlet in one ``gevent.pool.Group``. A session greenlet catches everything its
  session can throw, so an error ends that session only (logged with the session id,
  close code ``error``) and still writes its history row and publishes its close.
- Admission is a ``gevent.lock.BoundedSemaphore(max_session)``. At the cap the
  requester is told ``session.queued`` (with the number of sessions waiting ahead of
  it) and the session waits at most ``queue_timeout``; it is never dropped silently.
  Blocking waits (the slot, the relay pairing) run in a child greenlet that the
  session greenlet watches together with its own wake-up event, so an operator close,
  the GC or a shutdown can end a waiting session at once and cleanly, without
  throwing exceptions into code that holds a socket or a permit.
- The relay is the one configured for our server id, never one the request names
  freely: a request is only a way to *confirm* that relay, so an operator key cannot
  make the device dial an arbitrary host (``relay_refused`` otherwise).
- Streams are checked at open time against the session's effective targets
  (request ∩ device allow ∩ operator permitopen, fixed when the request was
  accepted) *and* the live device allow-list *and* the operator's key as
  ``authorized_keys`` holds it now (a SIGHUP or an edit that narrows the allow-list or
  the key's ``permitopen`` applies to new streams of running sessions).
- Trust is live: :meth:`TunnelManager.apply_trust` (called whenever the trusted keys
  change, and the GC consults them every pass) ends every running and waiting
  session of an operator that is no longer trusted, close code ``revoked``.
- Fairness (:mod:`remote_gevent.agent.fairness`): :meth:`TunnelManager.submit` refuses a
  request beyond the operator's share of ``max_session`` (``operator_limit``) or its
  request rate (``operator_rate_limited``), before any session exists.
- Exactly one history row and one ``publish_close`` per submitted session, whatever
  the path: refused before the tunnel, orphaned at the relay, timed out, closed.
  A trusted, fresh request the control plane refuses before submitting it gets one row
  too (:meth:`TunnelManager.record_refusal`, close code ``refused``), but no close.

Close code for the paths that never reach a tunnel: wrong relay, relay refused,
unreachable or not pairing in time → ``relay_refused``; pairing connection dropped →
``relay_lost``; queue → ``queue_timeout``; shutdown → ``shutdown``.
"""

import collections
import logging
import time
from typing import Any, Callable, Dict, List, Optional, Sequence, Tuple

import gevent
import gevent.event
import gevent.lock
import gevent.pool

from remote_gevent.agent import fairness
from remote_gevent.wire import mux_limits
from remote_gevent.wire import protocol
from remote_gevent.agent.history import History, record_safely
from remote_gevent.wire.codes import Reason
from remote_gevent.wire.protocol import Refused
from remote_gevent.wire.envelope import CloseCode

from remote_gevent.agent.session_run import (
    Reply,
    DIALING,
    DIAL_BOUND,
    ENDED,
    REVOKED_TEXT,
    RUNNING,
    SessionRun,
    _Session,
    _returned,
    device_allow,
)

log = logging.getLogger(__name__)

# Seconds we wait for the relay's OK (the console to arrive). Longer than the relay's
# own pairing timeout (rendezvous.DEFAULT_PAIRING_TIMEOUT, 30 s) so that normally the relay
# says "ERR timeout" first and we know why.
# GC backstop: a session still dialing after this is an orphan, whatever the relay does.
GC_MIN_INTERVAL = 0.2  # seconds; GC period bounds
GC_MAX_INTERVAL = 5.0
GC_FRACTION = 4  # GC period = smallest timeout / GC_FRACTION, within the bounds
SHUTDOWN_KILL_TIMEOUT = 2.0  # seconds for killed session greenlets to unwind

# Session states (``sessions()`` reports them).
# ``session.refuse`` must carry a refusal reason (protocol.Reason), not a close code.
# Close codes without a refusal counterpart get one if protocol.py grows it; until then
# a wrong relay is a malformed request and an operator's close of a waiting session
# is answered by session.close only (the operator asked for it).
PublishClose = Callable[[str, str, str], Any]


def gc_interval(cfg: Any) -> float:
    """GC period: a fraction of the shortest timeout, within [GC_MIN, GC_MAX]."""
    shortest = min(cfg.remote.idle_timeout, cfg.remote.ack_timeout)
    return max(GC_MIN_INTERVAL, min(GC_MAX_INTERVAL, float(shortest) / GC_FRACTION))


class TunnelManager(SessionRun):
    """All agent-side sessions of one agent process (see the module docstring)."""

    def __init__(self, cfg: Any, get_identity: Callable[[], Any], history: Optional[History],
                 publish_close: PublishClose, relay_context: Any = None,
                 trusted_keys: Optional[Callable[[], Any]] = None) -> None:
        self._cfg = cfg
        #: ``() -> AuthorizedKeys`` in force now (the control plane's ``trusted_keys``,
        #: which calls :meth:`apply_trust` when they change); None: the keys of the
        #: requests are trusted for the sessions' lifetime (tests).
        self.trusted_keys = trusted_keys
        self._rates = fairness.OperatorRates()
        self._get_identity = get_identity
        self._history = history
        self._publish_close = publish_close
        self._relay_context = relay_context
        self._sem = gevent.lock.BoundedSemaphore(cfg.remote.max_session)
        self._resized = gevent.event.Event()  # set (and replaced) when _sem is replaced
        self._group = gevent.pool.Group()
        self._sessions: Dict[str, _Session] = {}
        self._waiting: List[_Session] = []
        self._device_allow = device_allow(cfg)
        self._shutting_down = False
        # Streams of all tunnels together against remote.max_streams (mux_limits).
        self._agent_streams = mux_limits.StreamCounter(cfg.remote.max_streams)
        #: ``()`` called when a session starts or stops resuming (the control plane
        #: sends an ``alive`` then, rate-limited: agent/alive.py).
        self.on_sessions_changed: Optional[Callable[[], Any]] = None
        self._resuming: Dict[str, None] = {}  # ids whose path is down, as announced
        self._ended: Dict[str, int] = collections.Counter()  # totals of ended sessions

    # ------------------------------------------------------------------ public API

    @property
    def cfg(self) -> Any:
        return self._cfg

    def submit(self, request: Any, reply: Reply) -> None:
        """Serve an accepted ``protocol.SessionRequest``; returns at once.

        ``reply(raw)`` publishes a signed reply (queued / accept / refuse) to the
        requester; it is called from the session's greenlet.
        """
        sid = request.session_id
        if sid in self._sessions:  # the replay cache should make this impossible
            log.warning("session %s: duplicate request ignored", sid)
            return
        self._check_fair_share(request)
        s = _Session(request, reply)
        self._sessions[sid] = s
        s.greenlet = self._group.spawn(self._session_main, s)

    def _check_fair_share(self, request: Any) -> None:
        """Raise Refused if ``request``'s operator is over its rate or its share."""
        r = self._cfg.remote
        fp = request.operator.fingerprint
        if not self._rates.take(fp, r.operator_rate, r.operator_burst):
            raise Refused(Reason.OPERATOR_RATE, "session %s: operator %s over %s requests "
                          "per minute (burst %s)" % (request.session_id, fp, r.operator_rate,
                                                     r.operator_burst))
        trusted = self._trusted_now()
        share = fairness.operator_share(self._cfg, len(trusted) if trusted is not None else 1)
        if share is None:
            return
        held = sum(1 for s in self._sessions.values() if s.operator == fp and s.state != ENDED)
        if held >= share:
            raise Refused(Reason.OPERATOR_LIMIT, "session %s: operator %s already holds %d "
                          "session(s), its share (%d) of max_session %d"
                          % (request.session_id, fp, held, share, r.max_session))

    def operator_of(self, session_id: str) -> Optional[str]:
        """Fingerprint of the operator of a live session; None if there is none."""
        s = self._sessions.get(session_id)
        return None if s is None or s.state == ENDED else s.operator

    def apply_trust(self, trusted: Any) -> int:
        """End every live session whose operator ``trusted`` no longer holds (close code
        ``revoked``: running tunnels are closed, waiters refused). Returns how many."""
        revoked = 0
        for s in list(self._sessions.values()):
            if s.state == ENDED or s.close_request is not None:
                continue
            if trusted.current(s.request.operator) is None:  # plain key or certificate
                log.warning("session %s: operator %s is no longer trusted: revoked", s.id,
                            s.operator)
                self._request_close(s, CloseCode.REVOKED, REVOKED_TEXT)
                revoked += 1
        return revoked

    def _trusted_now(self) -> Any:
        """The trusted keys in force (consulting them may revoke sessions), or None."""
        if self.trusted_keys is None:
            return None
        return self.trusted_keys()

    def close(self, session_id: str, code: str = CloseCode.CLOSED_BY_OPERATOR,
              reason: str = "") -> bool:
        """End a session (running, dialing or waiting); False if there is none."""
        s = self._sessions.get(session_id)
        if s is None or s.state == ENDED:
            return False
        log.info("session %s: close requested: %s %s", session_id, code, reason)
        self._request_close(s, code, reason or code)
        return True

    def stats(self) -> Tuple[int, int]:
        """``(active, waiting)``: admitted sessions and sessions waiting for a slot."""
        active = sum(1 for s in self._sessions.values() if s.admitted and s.state != ENDED)
        return active, len(self._waiting)

    def sessions(self) -> List[Dict[str, Any]]:
        """One dict per live session, oldest first (for ``status`` replies)."""
        out = []
        for s in sorted(self._sessions.values(), key=lambda x: x.since):
            t = s.tunnel
            out.append({
                # "resuming": its relay path is down, both ends re-dialing (issue 12)
                "id": s.id, "since": s.since,
                "state": "resuming" if t is not None and t.resuming else s.state,
                "operator": s.operator,
                "targets": s.targets, "remote_ip": s.remote_ip,
                "bytes_in": t.bytes_in if t else 0, "bytes_out": t.bytes_out if t else 0,
                "streams": t.streams_opened if t else 0,
            })
        return out

    def figures(self) -> Dict[str, Any]:
        """Sessions by state, resuming ids (oldest first), resumes and bytes, for the
        ``alive`` counters and the textfile (agent/counters.py). ``open`` + ``resuming``
        = the ``active`` of :meth:`stats`."""
        opened = resuming = b_in = b_out = 0
        resumes = self._ended["resumes"]
        ids: List[str] = []
        for s in sorted(self._sessions.values(), key=lambda x: x.since):
            if not s.admitted or s.state == ENDED:
                continue
            t = s.tunnel
            if t is not None:
                b_in, b_out, resumes = b_in + t.bytes_in, b_out + t.bytes_out, resumes + t.resumes
                if t.resuming:
                    resuming += 1
                    ids.append(s.id)
                    continue
            opened += 1
        return {"open": opened, "resuming": resuming, "waiting": len(self._waiting),
                "resuming_ids": ids, "resumes": resumes, "bytes_in": b_in, "bytes_out": b_out,
                "ended": self._ended["sessions"], "ended_bytes_in": self._ended["bytes_in"],
                "ended_bytes_out": self._ended["bytes_out"]}

    def _on_link(self, s: _Session, state: str) -> None:
        """A tunnel's ``on_link``: its relay path is lost ("resuming") or back."""
        if state == "resuming":
            self._resuming[s.id] = None
        else:
            self._resuming.pop(s.id, None)
        self._sessions_changed()

    def _note_ended(self, s: _Session) -> None:
        """Totals of ended sessions; a session that ends while resuming stops resuming."""
        t = s.tunnel
        self._ended["sessions"] += 1
        if t is not None:
            self._ended["bytes_in"] += t.bytes_in
            self._ended["bytes_out"] += t.bytes_out
            self._ended["resumes"] += t.resumes
        if s.id in self._resuming:
            del self._resuming[s.id]
            self._sessions_changed()

    def _sessions_changed(self) -> None:
        if self.on_sessions_changed is not None:
            try:
                self.on_sessions_changed()
            except Exception:  # noqa: BLE001 - a notification must not end a session
                log.exception("on_sessions_changed failed")

    def record_refusal(self, session_id: str, operator: str, targets: Sequence[str],
                       refusal: str, text: str) -> None:
        """History row for a request refused *before* admission (close code ``refused``).

        The control plane calls it only for requests that passed every trust check
        (trusted operator's signature, time window, replay cache) and were then refused
        (``target_not_permitted``, ``shutting_down``): so there is at most one row per
        session id, and strangers, forgers and replayers, who are only logged, cannot
        fill the disk. Duration 0, no remote IP; ``reason`` = ``<refusal>: <text>``.
        """
        if session_id in self._sessions:  # admitted already: its own row will follow
            return
        reason = "%s: %s" % (refusal, text) if text else refusal
        record_safely(self._history, start=time.time(), session_id=session_id, remote_ip="",
                      duration=0.0, close_code=CloseCode.REFUSED, operator=operator,
                      targets=[str(t) for t in targets], reason=reason)

    def apply_config(self, cfg: Any) -> None:
        """Apply a reloaded config (SIGHUP).

        Live: the allow-list (new streams of running sessions too), idle/ack/queue
        timeouts, keepalive of new tunnels, transfer roots, the relay for new sessions.
        ``max_session``: a new semaphore of the new size replaces the old one; the
        running sessions are carried over to it in start order (one permit each while
        permits last; when shrinking, the surplus sessions keep running without a
        permit and a permit freed later goes to them first, so the number of running
        sessions never exceeds the new cap for new admissions); waiters re-queue on the
        new semaphore. No running session is cut.
        """
        old = self._cfg
        self._cfg = cfg
        self._device_allow = device_allow(cfg)
        self._agent_streams.limit = cfg.remote.max_streams  # new streams; open ones stay
        if (cfg.remote.relays.get(cfg.remote.server_id)
                != old.remote.relays.get(old.remote.server_id)
                or cfg.remote.relay_ca_file != old.remote.relay_ca_file):
            self._relay_context = None
        if cfg.remote.max_session != old.remote.max_session:
            self._resize(cfg.remote.max_session)

    def gc_loop(self, stop_event: gevent.event.Event) -> None:
        """The garbage collector service: runs until ``stop_event`` is set."""
        while not stop_event.wait(gc_interval(self._cfg)):
            try:
                self._trusted_now()  # a stat; an edit or chmod revokes without a request
            except Exception:  # noqa: BLE001 - the GC must go on whatever trust does
                log.exception("consulting the trusted keys failed")
            self.collect()

    def collect(self, now: Optional[float] = None) -> int:
        """One GC pass (``now``: ``time.monotonic()``); returns how many it closed."""
        if now is None:
            now = time.monotonic()
        r = self._cfg.remote
        closed = 0
        for s in list(self._sessions.values()):
            if s.close_request is not None or s.state == ENDED:
                continue
            code: Optional[str] = None
            reason = ""
            if s.state == RUNNING and s.tunnel is not None:
                code = s.tunnel.check_timeouts(r.idle_timeout, r.ack_timeout, now)
                if code == CloseCode.IDLE_TIMEOUT:
                    reason = "idle for %s s" % r.idle_timeout
                elif code == CloseCode.ACK_LOST:
                    reason = "no frame from the console for %s s" % r.ack_timeout
            elif s.state == DIALING and s.dial_started is not None \
                    and now - s.dial_started > DIAL_BOUND:
                code = CloseCode.RELAY_REFUSED
                reason = "not paired within %d s" % DIAL_BOUND
            if code is not None:
                log.info("session %s: gc: %s (%s)", s.id, code, reason)
                self._request_close(s, code, reason)
                closed += 1
        return closed

    def shutdown(self, grace: float) -> bool:
        """Refuse waiters (``shutting_down``), close every tunnel (``shutdown``) and wait
        up to ``grace`` s for the sessions to end and write their rows, then fsync the
        history (its rows are otherwise synced in grouped rounds: agent/history.py).

        New submissions are refused from now on. Returns True if all ended in time
        (the stragglers are then killed; their rows are still written).
        """
        self._shutting_down = True
        for s in list(self._sessions.values()):
            if s.state != ENDED:
                self._request_close(s, CloseCode.SHUTDOWN, "agent stopping")
        done = self._group.join(timeout=grace)
        if not done:
            log.warning("%d session(s) still ending after %.1f s: killing them",
                        len(self._group), grace)
            self._group.kill(timeout=SHUTDOWN_KILL_TIMEOUT)
        if self._history is not None:
            try:
                self._history.flush()
            except Exception:  # noqa: BLE001 - the stop must go on (flush logs OSError)
                log.exception("history flush failed")
        return bool(done)

    # ------------------------------------------------------------------ internals

    def _request_close(self, s: _Session, code: str, reason: str) -> None:
        if s.close_request is None:
            s.close_request = (code, reason)
        s.wake.set()
        t = s.tunnel
        if t is not None and not t.closed:
            # Tunnel.close may wait for its greenlets (bounded): not in the caller's.
            self._group.spawn(t.close, s.close_request[0], s.close_request[1])

    def _resize(self, size: int) -> None:
        new = gevent.lock.BoundedSemaphore(size)
        running = sorted((s for s in self._sessions.values() if s.admitted and s.state != ENDED),
                         key=lambda x: x.since)
        for s in running:
            s.sem = new if new.acquire(blocking=False) else None
        self._sem = new
        resized, self._resized = self._resized, gevent.event.Event()
        resized.set()
        log.info("max_session now %d (%d running)", size, len(running))

    def _release_slot(self, s: _Session) -> None:
        sem, s.sem = s.sem, None
        s.admitted = False
        if sem is None or sem is not self._sem:
            return  # no permit, or one of a semaphore replaced by _resize
        for other in sorted(self._sessions.values(), key=lambda x: x.since):
            if other is not s and other.admitted and other.sem is None \
                    and other.state != ENDED:
                other.sem = sem  # a surplus session (after shrinking) takes the permit
                return
        sem.release()

    def _admit(self, s: _Session) -> None:
        """Take a slot, or wait for one (``session.queued``); raise _End if we don't get one."""
        if self._sem.acquire(blocking=False):
            s.sem, s.admitted = self._sem, True
            return
        position = len(self._waiting)
        self._waiting.append(s)
        try:
            log.info("session %s: queued at position %d (max_session %d)", s.id, position,
                     self._cfg.remote.max_session)
            self._send_reply(s, protocol.make_session_queued(self._get_identity(), s.id,
                                                             position), "queued")
            queue_timeout = float(self._cfg.remote.queue_timeout)
            deadline = time.monotonic() + queue_timeout
            while True:
                if s.close_request is not None:
                    self._refuse(s, *s.close_request)
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    self._refuse(s, CloseCode.QUEUE_TIMEOUT,
                                 "no free session slot within %g s" % queue_timeout)
                sem, resized = self._sem, self._resized
                acquirer = gevent.spawn(sem.acquire, True, remaining)
                gevent.wait([acquirer, s.wake, resized], count=1)
                if not acquirer.ready():
                    acquirer.kill()
                if _returned(acquirer) and acquirer.value is True:
                    if sem is self._sem and s.close_request is None:
                        s.sem, s.admitted = sem, True
                        log.info("session %s: admitted after %.1f s in the queue", s.id,
                                 queue_timeout - (deadline - time.monotonic()))
                        return
                    sem.release()
        finally:
            if s in self._waiting:
                self._waiting.remove(s)

    # -- relay --------------------------------------------------------------------
