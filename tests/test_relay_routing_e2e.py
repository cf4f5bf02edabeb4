"""A relay pool behind ONE round-robin address loses a relay mid-session (issue 13).

Real processes: three relay processes with ``pool_peers`` (routing by session id) behind
one haproxy frontend (``balance roundrobin``, ``send-proxy-v2``; the relays run with
``proxy_protocol``), the agent process, ``stdio`` console processes; the agent's and the
consoles' relay pool is that one address, nothing else. Bulk data flows both ways
through six sessions; the relay carrying the most legs is SIGKILLed mid-transfer. Every
session ends normally with its bytes intact (sha256 each way); the sessions that crossed
the dead relay resumed through the same address onto the survivors; new sessions all
pair; the survivors report the dead peer down in their metrics.
"""

from __future__ import annotations

import os
from typing import List

import pytest
import yaml

from relay_helpers import (
    PAIRED,
    PAIRINGS,
    Bulk,
    HashingEcho,
    RelayProcess,
    RoundRobin,
    echo_once,
    echo_session,
    need_haproxy,
    pool_platform,
)
from remote_gevent.console import config as cconfig
from remote_gevent.console.control import ConsoleControl
from remote_gevent.demo.rabbit import free_port
from remote_gevent.demo.relays import relay_log
from test_e2e import (  # noqa: F401 - fixtures used by name
    history_rows,
    make_platform,
    procs,
    wait_for,
)

pytestmark = [pytest.mark.e2e, pytest.mark.slow]

SESSIONS = 6
SIZE = 4 << 20  # each way, per session
PACE = 0.06  # seconds between two 64 KiB chunks: each transfer lasts ~4 s
FORWARDED = "remote_gevent_relay_forwarded_legs_total"
SMALL = 50
DEMO_SESSIONS = 6


def _small_sessions(control, ident: str, target: str, n: int) -> int:
    """``n`` sessions of an in-process console, one after the other: how many paired and
    echoed 2000 bytes."""
    return sum(echo_session(control, ident, target) for _ in range(n))


def _peer_up(relay: RelayProcess, port: int) -> float:
    from prometheus_client.parser import text_string_to_metric_families
    import urllib.request

    with urllib.request.urlopen("http://127.0.0.1:%d/metrics" % relay.metrics_port,
                                timeout=5) as resp:
        text = resp.read().decode("utf-8")
    for family in text_string_to_metric_families(text):
        for s in family.samples:
            if s.name == "remote_gevent_relay_peer_up" \
                    and s.labels.get("peer") == "127.0.0.1:%d" % port:
                return s.value
    raise AssertionError("no peer_up sample for %d" % port)


def test_pool_behind_one_address_survives_a_relay_kill(rabbit, tmp_path, procs):  # noqa: F811
    need_haproxy()
    lb_port = free_port()
    pool = ["127.0.0.1:%d" % lb_port]  # the only relay address anyone knows
    p = pool_platform(rabbit, str(tmp_path / "plat"), pool, 60, operator_rate=0)
    relays: List[RelayProcess] = []
    lb = None
    echo = HashingEcho()
    try:
        p.start()
        assert p.relay_cert is not None and p.ca is not None
        secret = tmp_path / "pool.secret"
        secret.write_text(os.urandom(24).hex())
        os.chmod(str(secret), 0o600)
        ports = [free_port() for _ in range(3)]
        peers = ["127.0.0.1:%d" % port for port in ports]
        relays = [RelayProcess(str(tmp_path), "relay%d" % i, p.relay_cert[0], p.relay_cert[1],
                               proxy_protocol=True, port=port, extra={
                                   "pool_peers": peers, "pool_self": peers[i],
                                   "pool_secret_file": str(secret),
                                   "pool_ca_file": p.ca.cert_file,
                                   "pool_probe_interval": 0.5})
                  for i, port in enumerate(ports)]
        lb = RoundRobin(str(tmp_path), ports, port=lb_port, send_proxy=True)
        p.start_agent()
        argv = p.console_argv("stdio", "--master", "no", p.ident, echo.target)

        control = ConsoleControl(cconfig.load(p.console_config)).start()
        try:
            before = [r.metrics()[PAIRINGS] for r in relays]
            paired_small = _small_sessions(control, p.ident, echo.target, SMALL)
            owned = [r.metrics()[PAIRINGS] - b for r, b in zip(relays, before)]
        finally:
            control.close()
        print("\nsmall sessions paired through the one address: %d/%d, owners %s"
              % (paired_small, SMALL, owned))
        assert paired_small == SMALL and sum(1 for n in owned if n) == 3
        echo.done.clear()
        base = len(wait_for(lambda: len(history_rows(p)) >= SMALL and history_rows(p),
                            what="the small sessions' history rows"))

        bulks = [Bulk(procs, argv, SIZE, PACE) for _ in range(SESSIONS)]
        wait_for(lambda: all(b.received >= 1 << 20 for b in bulks), timeout=90,
                 what="every bulk session flowing")
        paired = [r.metrics()[PAIRED] for r in relays]
        forwarded = [r.metrics()[FORWARDED] for r in relays]
        print("\nlegs per relay before the kill: paired %s, forwarded %s" % (paired,
                                                                            forwarded))
        assert sum(forwarded) >= 1  # the round robin made some legs cross relays
        victim = max(range(3), key=lambda i: paired[i])
        survivors = [r for i, r in enumerate(relays) if i != victim]
        relays[victim].kill()
        assert all(b.received < SIZE for b in bulks)  # killed while the bytes flow
        for b in bulks:
            b.finish()
        assert sorted(b.sent.hexdigest() for b in bulks) == sorted(d["rx"] for d in echo.done)
        assert sorted(b.got.hexdigest() for b in bulks) == sorted(d["tx"] for d in echo.done)
        assert all(d["n"] == SIZE for d in echo.done)
        rows = wait_for(lambda: len(history_rows(p)) >= base + SESSIONS and history_rows(p),
                        what="the history rows")[base:]
        assert [r["close_code"] for r in rows] == ["normal"] * SESSIONS, rows
        resumed = [r for r in rows if int(r["resumes"]) >= 1]
        print("resumed (session, resumes, seconds):",
              [(r["session_id"][:8], r["resumes"], r["resume_s"]) for r in resumed])
        assert resumed, rows  # the victim carried legs: those sessions resumed
        for r in survivors:
            wait_for(lambda r=r: _peer_up(r, ports[victim]) == 0, timeout=10,
                     what="the survivors seeing the dead peer down")
        # New sessions after the kill, through the same address: all pair.
        for _ in range(2):
            echo_once(procs, argv)
        control = ConsoleControl(cconfig.load(p.console_config)).start()
        try:
            assert _small_sessions(control, p.ident, echo.target, 20) == 20
        finally:
            control.close()
        assert "Traceback" not in open(p.agent_log).read()
        for r in survivors:
            assert "Traceback" not in open(r.log).read()
    finally:
        procs.close()
        p.stop()
        if lb is not None:
            lb.stop()
        for r in relays:
            r.stop()
        echo.server.stop(timeout=1)


def test_demo_routes_a_pool_behind_one_address(rabbit, tmp_path):  # noqa: F811
    """``scripts/demo --relays 3`` (routed, the default): three relays routing by session
    id behind the demo's round-robin forwarder; agent and console know its one address
    only. Every session pairs and echoes; the round robin split legs over relays, which
    forwarded them to their session's owner."""
    echo = HashingEcho()
    p = make_platform(rabbit, str(tmp_path / "demo"), relays=3)
    try:
        p.start()
        pids = dict(p.pids())
        assert {"relay", "relay2", "relay3", "balancer", "agent"} <= set(pids)
        with open(p.console_config) as fh:
            assert yaml.safe_load(fh)["relay"] == p.relay_address
        with open(p.agent_config) as fh:
            assert yaml.safe_load(fh)["remote"]["relays"]["fr04"] == p.relay_address
        assert p.relay_address not in ["127.0.0.1:%d" % port for port in p.pool_ports]
        assert "round robin over 3 relays" in p.usage()
        control = ConsoleControl(cconfig.load(p.console_config)).start()
        try:
            assert _small_sessions(control, p.ident, echo.target, DEMO_SESSIONS) \
                == DEMO_SESSIONS
        finally:
            control.close()
        logs = [open(relay_log(p.dir, i)).read() for i in range(3)]
        forwarded = [text.count("forwarded to its owner") for text in logs]
        print("\nlegs forwarded to their owner, per relay: %s" % forwarded)
        assert sum(forwarded) >= 1  # the legs met through routing, not by luck
        for text in logs:
            assert "Traceback" not in text
    finally:
        p.stop()
        echo.server.stop(timeout=1)
