"""A relay of the pool dies (issue 13): its sessions resume on another relay of the pool,
new sessions avoid it. Real processes: three relay processes behind Debian's haproxy
(one frontend each, ``send-proxy-v2``), the agent process, ``stdio`` console processes
configured with the whole pool; RabbitMQ is the suite's.

Bulk data flows both ways through six sessions spread over the relays (each console
picks its relay at random); one relay is SIGKILLed mid-transfer. Every session ends
normally with its bytes intact: sha256 of what each console sent = what the target
received, and of what the target sent = what the console received (no loss, no
duplicate). The sessions that were on the dead relay resumed (history ``resumes``), on
the survivors (their pairing counters, scraped from the relays' metrics). Then new
sessions: one forced onto the dead relay (the only relay its console does not believe
down) reports it, remembers it and succeeds on another; six more with the whole pool
all succeed without trying it.
"""

from __future__ import annotations

import json
import os
import time
from typing import List

import pytest
import yaml

from relay_helpers import (
    PAIRED,
    PAIRINGS,
    Balancer,
    Bulk,
    HashingEcho,
    RelayProcess,
    echo_once,
    need_haproxy,
    pool_platform,
)
from remote_gevent.console.relay_pool import STATE_NAME
from remote_gevent.demo.rabbit import free_port
from test_e2e import (  # noqa: F401 - fixtures used by name
    history_rows,
    make_platform,
    procs,
    wait_for,
)

pytestmark = [pytest.mark.e2e, pytest.mark.slow]

SESSIONS = 6
SIZE = 32 << 20  # each way, per session
PACE = 0.02  # seconds between two 64 KiB chunks of a writer: each transfer lasts ~10 s


def _pairings(relays) -> List[float]:
    return [r.metrics()[PAIRINGS] for r in relays]


def test_dead_relays_sessions_resume_on_the_pool_and_new_ones_avoid_it(rabbit, tmp_path,
                                                                       procs):  # noqa: F811
    need_haproxy()
    fronts = [free_port() for _ in range(3)]
    pool = ["127.0.0.1:%d" % port for port in fronts]
    p = pool_platform(rabbit, str(tmp_path / "plat"), pool, 120)
    relays: List[RelayProcess] = []
    lb = None
    echo = HashingEcho()
    try:
        p.start()
        assert p.relay_cert is not None
        relays = [RelayProcess(str(tmp_path), "relay%d" % i, p.relay_cert[0], p.relay_cert[1],
                               proxy_protocol=True) for i in range(3)]
        lb = Balancer(str(tmp_path), [r.port for r in relays], ports=fronts)
        p.start_agent()
        argv = p.console_argv("stdio", "--master", "no", p.ident, echo.target)

        bulks = [Bulk(procs, argv, SIZE, PACE) for _ in range(SESSIONS)]
        wait_for(lambda: all(b.received >= 2 << 20 for b in bulks), timeout=90,
                 what="every bulk session flowing")
        paired = [r.metrics()[PAIRED] for r in relays]
        print("\nsessions per relay before the kill:", paired)
        assert sum(paired) == SESSIONS
        assert sum(1 for n in paired if n) >= 2, paired  # spread over the pool
        victim = max(range(3), key=lambda i: paired[i])
        survivors = [r for i, r in enumerate(relays) if i != victim]
        before = _pairings(survivors)
        relays[victim].kill()
        assert all(b.received < SIZE for b in bulks)  # killed while the bytes flow
        for b in bulks:
            b.finish()
        # Each way intact: what the target received is what a console sent, what it
        # sent back is what that console received.
        assert sorted(b.sent.hexdigest() for b in bulks) == sorted(d["rx"] for d in echo.done)
        assert sorted(b.got.hexdigest() for b in bulks) == sorted(d["tx"] for d in echo.done)
        assert all(d["n"] == SIZE for d in echo.done)
        rows = wait_for(lambda: len(history_rows(p)) >= SESSIONS and history_rows(p),
                        what="the history rows")
        assert [r["close_code"] for r in rows] == ["normal"] * SESSIONS, rows
        resumed = [r for r in rows if int(r["resumes"]) >= 1]
        print("resumed:", [(r["session_id"][:8], r["resumes"], r["resume_s"])
                           for r in resumed])
        assert len(resumed) == paired[victim], rows
        moved = [a - b for a, b in zip(_pairings(survivors), before)]
        assert sum(moved) == paired[victim], moved  # re-paired on the survivors

        # A console that believes the survivor down and not the dead relay: it tries
        # the dead one, says so, remembers it and succeeds on the other.
        dead, alive = pool[victim], pool[(victim + 1) % 3]
        state = os.path.join(p.dir, STATE_NAME)
        with open(state, "w") as fh:
            json.dump({alive: time.time() + 60}, fh)
        forced = os.path.join(p.dir, "console-forced.yaml")
        with open(p.console_config) as fh:
            data = yaml.safe_load(fh)
        data["relay"] = [dead, alive]
        with open(forced, "w") as fh:
            yaml.safe_dump(data, fh)
        forced_argv = list(argv)
        forced_argv[forced_argv.index(p.console_config)] = forced
        before = _pairings(survivors)
        err = echo_once(procs, forced_argv)
        assert "relay %s is down" % dead in err and "trying relay %s" % alive in err, err
        # The abandoned first request left no half session on the device: it ended
        # (the agent's own dial failed too, or the console's session.close came first).
        rows = wait_for(lambda: len(history_rows(p)) >= SESSIONS + 2 and history_rows(p),
                        what="rows of the abandoned and the retried session")
        assert sorted(r["close_code"] for r in rows[SESSIONS:]) in (
            ["closed_by_operator", "normal"], ["normal", "relay_refused"]), rows[SESSIONS:]
        with open(state) as fh:
            down = json.load(fh)
        assert down[dead] > time.time() + 30
        with open(state, "w") as fh:  # the survivor's stale entry expires
            json.dump({dead: down[dead]}, fh)
        # New sessions with the whole pool: all succeed, none tries the dead relay.
        for _ in range(SESSIONS):
            err = echo_once(procs, argv)
            assert "is down" not in err, err
        moved = [a - b for a, b in zip(_pairings(survivors), before)]
        print("new sessions per surviving relay:", moved)
        assert sum(moved) == SESSIONS + 1
        log = open(p.agent_log).read()
        assert "Traceback" not in log
    finally:
        procs.close()
        p.stop()
        if lb is not None:
            lb.stop()
        for r in relays:
            r.stop()
        echo.server.stop(timeout=1)


def test_demo_runs_a_pool(rabbit, tmp_path, procs):  # noqa: F811
    """``scripts/demo --relays 3 --relay-mode listed``: three relay processes, the agent
    and the console configured with the pool; sessions work, and go on working without a
    relay that was SIGKILLed (by pid, from the platform's pids)."""
    echo = HashingEcho()
    p = make_platform(rabbit, str(tmp_path / "demo"), relays=3, relay_mode="listed")
    try:
        p.start()
        pids = dict(p.pids())
        assert {"relay", "relay2", "relay3", "agent"} <= set(pids)
        with open(p.console_config) as fh:
            pool = yaml.safe_load(fh)["relay"]
        with open(p.agent_config) as fh:
            assert yaml.safe_load(fh)["remote"]["relays"]["fr04"] == pool
        assert len(pool) == 3 and "relay   %s" % pool[2] in p.usage()
        argv = p.console_argv("stdio", "--master", "no", p.ident, echo.target)
        for _ in range(3):
            echo_once(procs, argv)
        os.kill(pids["relay2"], 9)
        for _ in range(3):
            echo_once(procs, argv)
        from remote_gevent.demo.relays import relay_log

        def ended() -> int:  # the survivors' "session … ended" lines
            return sum(open(relay_log(p.dir, i)).read().count(" ended: ") for i in (0, 2))
        wait_for(lambda: ended() >= 3, what="the sessions after the kill, on the survivors")
    finally:
        procs.close()
        p.stop()
        echo.server.stop(timeout=1)
