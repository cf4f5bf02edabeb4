"""The relay pool's pieces (issue 13), fast: the resume walk both ends share
(wire/relay_pool.py), the signed ``relay_pool`` in a session request, which pool entries
the agent dials, the console's pick of a relay and its memory of relays seen down, and
two real ends walking a pool whose first relay is dead meeting on the next one.
"""

from __future__ import annotations

import json
import logging
import socket
import threading

import pytest

from relay_helpers import start_relay
from remote_gevent.agent.relay_accept import resume_order
from remote_gevent.common import tls
from remote_gevent.console import config as cconfig
from remote_gevent.console import relay_pool as console_pool
from remote_gevent.crypto import authkeys as ak
from remote_gevent.crypto import identity
from remote_gevent.crypto import tunnel_crypto as tc
from remote_gevent.demo.rabbit import free_port
from remote_gevent.wire import protocol as p
from remote_gevent.wire import relay_pool as walk
from remote_gevent.wire import rendezvous
from remote_gevent.wire.codes import Reason
from remote_gevent.wire.rendezvous import RelayError

A, B, C = ("a.example", 1), ("b.example", 2), ("c.example", 3)


# ------------------------------------------------------------------ the walk


def test_walk_order_session_relay_first_then_the_signed_order_once_each():
    assert walk.walk_order(B, [A, B, C]) == [B, A, C]
    assert walk.walk_order(C, [A, B, C]) == [C, A, B]
    assert walk.walk_order(("A.Example.", 1), [A, B]) == [("A.Example.", 1), B]
    assert walk.walk_order(A, []) == [A]


class FakeRelays:
    """``dial`` over a set of relays: down ones fail before the hello, up ones either
    pair (``peer_at``) or time out waiting for the peer."""

    def __init__(self, down=(), peer_at=None):
        self.down, self.peer_at, self.calls = set(down), peer_at, []

    def dial(self, host, port, pair_timeout):
        self.calls.append(((host, port), pair_timeout))
        if (host, port) in self.down:
            raise RelayError("unreachable", "relay %s:%d refused" % (host, port),
                             reached=False)
        if (host, port) != self.peer_at:
            raise RelayError("timeout", "not paired within %.1fs" % pair_timeout)
        return "sock@%s" % host


def test_a_round_skips_down_relays_and_waits_at_the_first_reachable_one():
    relays = FakeRelays(down={A}, peer_at=B)
    assert walk.dial_round([A, B, C], relays.dial, remaining=100) == "sock@b.example"
    assert relays.calls == [(A, walk.POOL_PAIRING_WAIT), (B, walk.POOL_PAIRING_WAIT)]


def test_a_round_ends_at_the_reached_relay_without_a_peer():
    """No peer at B within the wait: the round ends (the backoff sleeps, the next round
    starts again at the top), C is not tried: both ends keep to the same relay."""
    relays = FakeRelays(down={A}, peer_at=C)
    with pytest.raises(RelayError) as info:
        walk.dial_round([A, B, C], relays.dial, remaining=100)
    assert info.value.code == "timeout" and info.value.reached
    assert [c[0] for c in relays.calls] == [A, B]


def test_a_busy_relay_is_passed_like_a_down_one():
    relays = FakeRelays(peer_at=B)
    real = relays.dial

    def dial(host, port, wait):
        if (host, port) == A:
            relays.calls.append(((host, port), wait))
            raise RelayError("busy", "relay a refused the agent: busy", remote=True)
        return real(host, port, wait)
    assert walk.dial_round([A, B], dial, remaining=100) == "sock@b.example"


def test_a_round_with_every_relay_down_and_the_wait_bounded_by_the_deadline():
    relays = FakeRelays(down={A, B})
    with pytest.raises(RelayError) as info:
        walk.dial_round([A, B], relays.dial, remaining=3.0)
    assert info.value.code == "unreachable" and not info.value.reached
    assert "a.example" in str(info.value) and "b.example" in str(info.value)
    assert [c[1] for c in relays.calls] == [3.0, 3.0]  # min(wait, remaining)
    walk.dial_round([B], FakeRelays(peer_at=B).dial, remaining=0.01)  # at least 1 s


def test_two_ends_seeing_the_same_relays_alive_meet_on_the_same_one():
    order_agent = walk.walk_order(B, [A, B, C])
    order_console = walk.walk_order(B, walk.parse_pool(["a.example:1", "b.example:2",
                                                        "c.example:3"]))
    assert order_agent == order_console
    for down in ({B}, {B, A}, {A}, set()):
        met = []
        for order in (order_agent, order_console):
            relays = FakeRelays(down=down)
            with pytest.raises(RelayError):
                walk.dial_round(order, relays.dial, remaining=100)
            met.append(relays.calls[-1][0])
        assert met[0] == met[1] and met[0] not in down


def test_is_down_only_before_the_hello():
    assert walk.is_down(RelayError("tls", "x", reached=False))
    assert not walk.is_down(RelayError("timeout", "x"))
    assert not walk.is_down(RelayError("busy", "x", remote=True))
    assert not walk.is_down(ValueError("x"))


# ------------------------------------------------------------------ the signed pool

OP = identity.IdentityKey.generate()
TRUSTED = ak.AuthorizedKeys.parse(ak.ssh_pubkey_line(OP.public_bytes) + " op\n")


def _request(pool, relay="r1.example:8443"):
    return p.make_session_request(OP, "demo", "fr04", tc.kx_keypair()[0], ["127.0.0.1:22"],
                                  relay, p.new_ticket(), now=1700000000, relay_pool=pool)[1]


def _check(raw):
    return p.check_session_request(raw, "demo", "fr04", TRUSTED, ["*:*"], p.ReplayCache(),
                                   now=1700000000)


def test_relay_pool_signed_and_read_back_and_absent_as_before():
    pool = ["r%d.example:8443" % i for i in range(walk.MAX_RELAY_POOL)]
    assert _check(_request(pool)).relay_pool == tuple(pool)
    raw = _request(())
    assert "relay_pool" not in json.loads(raw)["body"]  # older agents refuse unknown fields
    assert _check(raw).relay_pool == ()


@pytest.mark.parametrize("pool", [
    ["r%d.example:8443" % i for i in range(9)],  # 9 > 8
    ["r" * 246 + ".example:1"],  # 256 chars
    ["r1.example"],
])
def test_an_oversized_or_bad_pool_is_refused_as_malformed(pool):
    with pytest.raises(p.ProtocolError):  # the console never builds one
        _request(pool)
    crafted = json.loads(_request(["r1.example:8443"]))
    crafted["body"]["relay_pool"] = pool  # (the schema refuses it before the signature)
    with pytest.raises(p.Refused) as info:
        _check(json.dumps(crafted).encode())
    assert info.value.reason == Reason.MALFORMED


# ------------------------------------------------------------------ the agent


class _Cfg:
    def __init__(self, relays):
        self.remote = type("R", (), {"relays": {"fr04": relays}, "server_id": "fr04"})()


def test_the_agent_walks_only_the_pool_entries_it_admits(caplog):
    caplog.set_level(logging.INFO)
    cfg = _Cfg(["a.example:1", "c.example:3"])
    order = resume_order(cfg, A, ["b.example:2", "evil.example:9", "C.example:3",
                                  "a.example:1"], "session x")
    assert order == [A, C]
    skipped = [r.getMessage() for r in caplog.records if "never dialled" in r.getMessage()]
    assert len(skipped) == 1 and "evil.example:9" in skipped[0]
    assert resume_order(cfg, A, (), "session y") == [A]


# ------------------------------------------------------------------ the console


def _console(tmp_path, relay):
    path = tmp_path / "console.yaml"
    path.write_text(json.dumps({"relay": relay}))
    return cconfig.load(str(path))


def test_console_relay_key_takes_one_or_a_list(tmp_path):
    assert _console(tmp_path, "r1.example:1").relay_pool == ("r1.example:1",)
    cfg = _console(tmp_path, ["r1.example:1", "r2.example:2"])
    assert cfg.relay_pool == ("r1.example:1", "r2.example:2")
    assert cfg.relay_address == "r1.example:1"
    for bad, where in ((["r1.example:1", "bad"], "relay[1]"), ([], "relay"),
                       (["r%d.example:1" % i for i in range(9)], "relay"),
                       (["r.example:1", "R.example:1"], "relay")):
        with pytest.raises(cconfig.ConfigError) as info:
            _console(tmp_path, bad)
        assert where in str(info.value)


def test_console_picks_among_relays_not_seen_down_and_remembers_across_runs(tmp_path,
                                                                          monkeypatch):
    monkeypatch.setattr(console_pool, "_DOWN", {})
    now = [1000.0]
    cfg = _console(tmp_path, ["r1.example:1", "r2.example:2", "r3.example:3"])
    pool = console_pool.RelayPool(cfg, clock=lambda: now[0])
    assert pool.signed == cfg.relay_pool
    assert {pool.pick() for _ in range(200)} == set(cfg.relay_pool)  # spread
    pool.mark_down("r2.example:2", "refused")
    assert {pool.pick() for _ in range(100)} == {"r1.example:1", "r3.example:3"}
    # another invocation (a new process: nothing in memory) reads the file
    monkeypatch.setattr(console_pool, "_DOWN", {})
    later = console_pool.RelayPool(cfg, clock=lambda: now[0])
    assert "r2.example:2" in later.down()
    assert later.pick(exclude=("r1.example:1",)) == "r3.example:3"
    later.mark_down("r3.example:3", "tls")
    # all but the excluded one down: try one anyway (it may be back)
    assert later.pick(exclude=("r1.example:1",)) in ("r2.example:2", "r3.example:3")
    now[0] += console_pool.DEAD_FOR + 1  # expired
    assert later.down() == {}
    assert (tmp_path / console_pool.STATE_NAME).stat().st_mode & 0o077 == 0


def test_a_single_relay_signs_no_pool(tmp_path):
    pool = console_pool.RelayPool(_console(tmp_path, "r1.example:1"))
    assert pool.signed == () and pool.pick() == "r1.example:1"
    assert pool.pick(exclude=("r1.example:1",)) is None


# ------------------------------------------------------------------ real sockets


def test_two_real_ends_walk_past_a_dead_relay_and_meet(pki):
    """A pool of [dead port, relay]: the agent and the console each run a round of the
    walk on real sockets; both skip the dead one (refused) and pair on the relay."""
    ca, _ = pki
    relay = start_relay(ca.issue("walk-relay", ["127.0.0.1"]))
    dead = ("127.0.0.1", free_port())
    live = ("127.0.0.1", relay.address[1])
    ctx = tls.client_context(ca.cert_file)
    sid, ticket = p.new_session_id(), p.new_ticket()
    order = walk.walk_order(dead, [dead, live])
    results = {}

    def end(role):
        def dial(host, port, wait):
            return rendezvous.dial_relay(host, port, ctx, host, role, sid, ticket,
                                         timeout=5, pair_timeout=wait)
        try:
            results[role] = walk.pool_redialer(order, dial)(30.0)
        except RelayError as exc:
            results[role] = exc

    try:
        threads = [threading.Thread(target=end, args=(role,)) for role in ("agent",
                                                                          "console")]
        for t in threads:
            t.start()
        for t in threads:
            t.join(30)
        (a_sock, _), (c_sock, _) = results["agent"], results["console"]
        a_sock.sendall(b"over the second relay")
        assert c_sock.recv(100) == b"over the second relay"
        assert relay.counters["sessions"] == 1
        for s in (a_sock, c_sock):
            s.close()
    finally:
        relay.stop(grace=0)
    with pytest.raises(OSError):
        socket.create_connection(dead, timeout=1)
