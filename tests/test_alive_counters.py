"""The ``counters`` of an ``alive`` (issue 13): schema (accepted, refused, bounds, unknown
keys, hostile strings), the agent's one snapshot for alive and textfile, the rate limit
of the ``sessions`` alive, and what the console stores and prints of it."""

from __future__ import annotations

import base64
import collections
import json
import time
from types import SimpleNamespace

import gevent
import gevent.event
import pytest

from remote_gevent.agent import alive as alive_mod
from remote_gevent.agent import counters as agent_counters
from remote_gevent.agent.metrics_textfile import render
from remote_gevent.console import alive_view
from remote_gevent.console import control as ccontrol
from remote_gevent.console.known_devices import KnownDevices
from remote_gevent.crypto import identity
from remote_gevent.wire import alive_counters
from remote_gevent.wire import protocol
from remote_gevent.wire.codes import Reason

Key = identity.IdentityKey.generate
SID1, SID2 = "a1" * 16, "b2" * 16

GOOD = {"open": 1, "resuming": 1, "waiting": 0, "resuming_ids": [SID1], "resumes": 3,
        "requests": 12, "ended": 10, "refusals": {"expired": 2, "target_not_permitted": 1},
        "bytes_in": 10, "bytes_out": 20, "ended_bytes_in": 30, "ended_bytes_out": 40,
        "rss": 41234432}


def alive_body(counters=None, event="periodic"):
    body = {"ident": "demo", "server_id": "fr04", "version": "0.1.0", "uptime": 5.0,
            "sessions_active": 2, "sessions_waiting": 0, "max_session": 10,
            "fingerprint": "SHA256:" + "A" * 43, "seq": 1, "ts": 1000, "event": event}
    if counters is not None:
        body["counters"] = counters
    return body


def raw_alive(counters, event="periodic") -> bytes:
    """An alive as anyone could send it (unsigned content, well-formed envelope): the
    schema runs before any signature check."""
    return json.dumps({"v": 1, "type": "alive", "body": alive_body(counters, event),
                       "sig": base64.b64encode(b"\0" * 64).decode(),
                       "signer": "SHA256:" + "A" * 43}).encode()


def test_alive_with_counters_round_trips_and_without_them_still_decodes():
    k = Key()
    raw = protocol.make_alive(k, "demo", "fr04", "0.1.0", 5.0, 2, 0, 10, 1, event="sessions",
                              counters=GOOD)
    msg = protocol.decode(raw)
    assert msg.body["counters"] == GOOD and msg.body["event"] == "sessions"
    assert protocol.verify(msg, k.public_bytes)
    assert "counters" not in protocol.decode(
        protocol.make_alive(k, "demo", "fr04", "0.1.0", 5.0, 0, 0, 10, 2)).body
    assert protocol.decode(raw_alive({})).body["counters"] == {}  # every key optional


def _with(**changes):
    c = json.loads(json.dumps(GOOD))
    for k, v in changes.items():
        if v is KeyError:
            c.pop(k)
        else:
            c[k] = v
    return c


REFUSED = {
    "not an object": ["open", 1],
    "negative": _with(open=-1),
    "bool": _with(resumes=True),
    "float": _with(rss=1.5),
    "string": _with(requests="12"),
    "over 2^53": _with(bytes_in=2 ** 53 + 1),
    "sessions over a million": _with(waiting=1000001),
    "refusals not an object": _with(refusals=["expired"]),
    "33 refusal codes": _with(refusals={"c%d" % i: 1 for i in range(33)}),
    "refusal code with escape": _with(refusals={"\x1b[31mred": 1}),
    "refusal code with newline": _with(refusals={"a\nFAKE LINE": 1}),
    "refusal code upper case": _with(refusals={"Expired": 1}),
    "refusal code too long": _with(refusals={"a" * 41: 1}),
    "refusal code non-ascii": _with(refusals={"\u00e9t\u00e9": 1}),
    "refusal count string": _with(refusals={"expired": "2"}),
    "refusal count nested": _with(refusals={"expired": {"x": 1}}),
    "17 resuming ids": _with(resuming=17, resuming_ids=["%032x" % i for i in range(17)]),
    "id not hex": _with(resuming_ids=["\x1b]0;pwned\x07" + "a" * 24]),
    "id upper case": _with(resuming_ids=["A1" * 16]),
    "id not a string": _with(resuming_ids=[1]),
    "ids not a list": _with(resuming_ids=SID1),
    "duplicate id": _with(resuming=2, resuming_ids=[SID1, SID1]),
    "more ids than resuming": _with(resuming=1, resuming_ids=[SID1, SID2]),
    "ids without resuming": _with(resuming=KeyError),
    "9 unknown keys": _with(**{"future_%d" % i: 1 for i in range(9)}),
    "unknown key hostile name": _with(**{"x\x1b[2J": 1}),
    "unknown key not an integer": _with(future="text"),
    "unknown key an object": _with(future={"a": 1}),
}


@pytest.mark.parametrize("case", sorted(REFUSED))
def test_counters_outside_the_schema_refuse_the_alive(case):
    with pytest.raises(protocol.ProtocolError) as err:
        protocol.decode(raw_alive(REFUSED[case]))
    assert err.value.reason == Reason.MALFORMED
    assert "counters" in str(err.value)
    assert "\x1b" not in str(err.value) and "\n" not in str(err.value)
    with pytest.raises(protocol.ProtocolError):  # and we never publish one
        protocol.make_alive(Key(), "demo", "fr04", "0.1.0", 5.0, 0, 0, 10, 1,
                            counters=REFUSED[case])


def test_unknown_event_still_refused():
    with pytest.raises(protocol.ProtocolError):
        protocol.decode(raw_alive(GOOD, event="resuming"))


def test_bounded_unknown_keys_are_accepted_and_dropped_by_the_console():
    """A newer agent's extra figure does not get its alive refused; it is not stored."""
    extra = _with(**{"future_%d" % i: i for i in range(8)})
    msg = protocol.decode(raw_alive(extra))
    assert alive_counters.known_only(msg.body["counters"]) == GOOD


def test_worst_case_counters_fit_the_message_cap():
    worst = {k: hi for k, hi in alive_counters.INTEGERS.items()}
    worst["resuming_ids"] = ["%032x" % i for i in range(16)]
    worst["resuming"] = 16
    worst["refusals"] = {("c%02d" % i) + "x" * 37: 2 ** 53 for i in range(32)}
    worst.update({("u%d" % i) + "x" * 30: 2 ** 53 for i in range(8)})
    raw = protocol.make_alive(Key(), "d" * 64, "s" * 32, "v" * 64, 2 ** 53, 10 ** 6, 10 ** 6,
                              10 ** 6, 2 ** 53, counters=worst)
    assert len(raw) < protocol.MAX_MESSAGE_BYTES // 2


# --------------------------------------------------------------------------- agent side


def _control(figures=None, **counts):
    tunnels = SimpleNamespace(figures=lambda: figures) if figures is not None else None
    return SimpleNamespace(tunnels=tunnels, counters=dict(counts),
                           agent=SimpleNamespace(uptime=12.5))


def test_one_snapshot_feeds_alive_and_textfile_within_bounds():
    ids = ["%032x" % i for i in range(40)]
    figures = dict(agent_counters.NO_SESSIONS, open=2, resuming=40, resuming_ids=ids,
                   resumes=41, bytes_in=5, bytes_out=6)
    counts = {"sessions": 50, "connects": 1, "alive_sent": 3}
    counts.update({"refused:code%02d" % i: i + 1 for i in range(40)})
    counts["refused:Bad\nCode"] = 1000  # never from this agent; filtered all the same
    snap = agent_counters.gather(_control(figures, **counts))
    wire = agent_counters.for_alive(snap)
    alive_counters.check(wire)
    assert wire["resuming"] == 40 and wire["resuming_ids"] == ids[:16]
    assert len(wire["refusals"]) == 32 and wire["refusals"]["code39"] == 40
    assert "code00" not in wire["refusals"]  # the least frequent codes go first
    assert wire["requests"] == 50 and wire["rss"] > 0
    text = render(snap)
    assert "remote_gevent_agent_sessions_resuming 40" in text
    assert 'remote_gevent_agent_sessions{state="active"} 42' in text
    assert "remote_gevent_agent_resumes_total 41" in text
    assert 'remote_gevent_agent_refusals_total{code="Bad_Code"} 1000' in text
    assert "remote_gevent_agent_session_requests_total 50" in text
    empty = agent_counters.for_alive(agent_counters.gather(_control()))
    alive_counters.check(empty)
    assert empty["open"] == 0 and empty["resuming_ids"] == []


class _Link:
    def __init__(self):
        self.connected = gevent.event.Event()
        self.connected.set()
        self.sent = []

    def publish(self, exchange, key, raw, **kw):
        self.sent.append((time.monotonic(), protocol.decode(raw).body))


class _Sender(alive_mod.AliveSender):
    topic = "remote.fr04.demo"

    def __init__(self):
        cfg = SimpleNamespace(ident="demo", remote=SimpleNamespace(
            server_id="fr04", health_check=600, max_session=10, metrics_textfile=None))
        key = Key()
        self.agent = SimpleNamespace(cfg=cfg, stop_event=gevent.event.Event(), uptime=1.0,
                                     version="0.1.0", get_identity=lambda: key)
        self.link = _Link()
        self.counters = collections.Counter()
        self.tunnels = None
        self._stopping = False
        self._init_alive()


def test_a_burst_of_pokes_costs_at_most_one_sessions_alive_per_second():
    s = _Sender()
    g = gevent.spawn(s.heartbeat_loop)
    try:
        deadline = time.monotonic() + 5
        while not s.link.sent:
            assert time.monotonic() < deadline
            gevent.sleep(0.01)
        assert s.link.sent[0][1]["event"] == "started"
        start = time.monotonic()
        s.poke_alive()
        while len(s.link.sent) < 2:
            assert time.monotonic() < deadline
            gevent.sleep(0.005)
        first = s.link.sent[1][0] - start
        assert first < 0.5, first  # at once, not at the next health_check (600 s)
        for _ in range(100):  # 100 sessions starting to resume over 2.5 s
            last_poke = time.monotonic()
            s.poke_alive()
            gevent.sleep(0.025)
        # the burst's end is reported too: the last poke's alive is due within a second
        # (waited for, bounded: a loaded machine stretches the burst and the wait)
        while not any(body["event"] == "sessions" and at >= last_poke
                      for at, body in s.link.sent):
            assert time.monotonic() < last_poke + 10, s.link.sent
            gevent.sleep(0.05)
        sessions = [at for at, body in s.link.sent if body["event"] == "sessions"]
        burst = last_poke - start  # 2.5 s, longer on a loaded machine
        assert 2 <= len(sessions) <= 3 + burst / alive_mod.SESSIONS_ALIVE_INTERVAL, (
            len(sessions), burst)
        gaps = [b - a for a, b in zip(sessions, sessions[1:])]
        assert min(gaps) >= alive_mod.SESSIONS_ALIVE_INTERVAL - 0.05, gaps
        assert all("counters" in body for _, body in s.link.sent)
    finally:
        s.agent.stop_event.set()
        g.join(3)


def test_pokes_while_stopping_send_nothing_and_do_not_spin():
    """Sessions that end while the agent stops poke the heartbeat: it must still yield
    (a loop that never waits would freeze every greenlet of the agent)."""
    s = _Sender()
    s._stopping = True
    s.poke_alive()
    started = time.monotonic()
    s._wait_or_poke(0.2, started)
    assert time.monotonic() - started >= 0.15
    assert s.link.sent == [] and not s._poke.is_set()


# --------------------------------------------------------------------------- console side


def _alive(k, seq, counters, ts):
    return protocol.make_alive(k, "demo", "fr04", "0.1.0", 5.0, 1, 0, 10, seq,
                               "sessions", ts=ts, counters=counters)


def test_console_stores_counters_and_reports_resuming_then_back(tmp_path):
    kd = KnownDevices(str(tmp_path / "kd"))
    states = ccontrol.DeviceStates(str(tmp_path / "devices.json"))
    k = Key()
    kd.learn(protocol.make_key_announcement(k, "demo", "fr04", ts=1000))

    def feed(raw, kind="alive", now=1000):
        return ccontrol.handle_up_message(kd, states, "fr04", raw, "remote.fr04.demo." + kind,
                                          {"expiration": "1200000"}, now=now)

    quiet = dict(GOOD, open=2, resuming=0, resuming_ids=[], future_x=1)
    ev = feed(_alive(k, 1, quiet, 1000))
    assert ev.notes == [] and "future_x" not in states.devices["fr04/demo"]["counters"]
    assert alive_view.sessions_summary(ev.entry) == "sessions 2"
    ev = feed(_alive(k, 2, dict(GOOD, open=1, resuming=1, resuming_ids=[SID1]), 1001))
    assert ev.notes == ["session %s resuming (relay path lost)" % SID1]
    assert alive_view.sessions_summary(ev.entry) == "sessions 2 (1 resuming: %s)" % SID1
    ev = feed(_alive(k, 3, dict(GOOD, open=2, resuming=0, resuming_ids=[]), 1002))
    assert ev.notes == ["session %s back (path re-established)" % SID1]
    # Ended while resuming: its close arrives first (the agent publishes it first).
    feed(_alive(k, 4, dict(GOOD, open=1, resuming=1, resuming_ids=[SID2]), 1003))
    feed(protocol.make_session_close(k, SID2, "link_lost", "no path", ts=1004), "close")
    ev = feed(_alive(k, 5, dict(GOOD, open=1, resuming=0, resuming_ids=[]), 1005))
    assert ev.notes == ["session %s ended while resuming" % SID2]
    rows = ccontrol.summarize(states, kd, now=1006)
    assert rows[0]["counters"]["resumes"] == 3 and rows[0]["sessions_waiting"] == 0
    # An older agent: no counters, the figures of the body still show.
    ev = feed(protocol.make_alive(k, "demo", "fr04", "0.1.0", 5.0, 3, 0, 10, 6, ts=1007))
    assert ev.entry["counters"] is None and alive_view.sessions_summary(ev.entry) == "sessions 3"


def test_hostile_state_file_figures_are_escaped_when_printed():
    """The state file is shared with other console processes: what it holds is
    re-checked before it reaches a terminal."""
    entry = {"counters": {"open": "1\x1b[2J", "resuming": 2,
                          "resuming_ids": ["\x1b]0;owned\x07", SID1, 7]}}
    text = alive_view.sessions_summary(entry)
    assert "\x1b" not in text and "\x07" not in text
    assert text.startswith("sessions 2 (2 resuming: ")
    assert SID1 in text


def test_devices_table_shows_resuming_sessions(capsys):
    from remote_gevent.console.cli_keys import _print_devices

    row = {"device": "fr04/demo", "state": "online", "last_alive": 1000.0,
           "health_check": 600.0, "fingerprint": "SHA256:x", "pinned": True,
           "version": "0.1.0", "sessions_active": 2, "max_session": 10,
           "counters": dict(GOOD)}
    _print_devices([row, dict(row, device="fr04/old", counters=None)], now=1001.0)
    out = capsys.readouterr().out.splitlines()
    assert "2/10 (1 resuming)" in out[1] and "resuming" not in out[2]
