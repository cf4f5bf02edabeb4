"""The tunnel manager's figures for the alive's counters (issue 13) and its
``on_sessions_changed`` notifications, on a real session through a real relay: a session
that starts resuming, comes back, and ends while resuming."""

from __future__ import annotations

import os

from remote_gevent.wire.codes import CloseCode
from test_tunnels import (  # noqa: F401 - fixtures used by name
    _assert_one_close,
    _roundtrip,
    echo_port,
    make_env,
    pki,
    relay_server,
)


def test_figures_and_notifications_follow_the_resuming_state(make_env):  # noqa: F811
    env = make_env()
    pokes = []
    env.manager.on_sessions_changed = lambda: pokes.append(1)
    c = env.console().submit()
    c.accept()
    tunnel = c.connect()
    payload = os.urandom(100000)
    assert _roundtrip(tunnel, "127.0.0.1:%d" % env.echo_port, payload) == payload
    f = env.manager.figures()
    assert (f["open"], f["resuming"], f["waiting"], f["resuming_ids"]) == (1, 0, 0, [])
    assert f["bytes_in"] == f["bytes_out"] == len(payload) and f["ended"] == 0
    assert pokes == []  # a session that runs normally costs no extra alive

    agent_tunnel = env.manager._sessions[c.session_id].tunnel
    agent_tunnel.resuming = True  # what resume_tunnel does, then it announces
    agent_tunnel._announce("resuming", 0.0)
    f = env.manager.figures()
    assert (f["open"], f["resuming"], f["resuming_ids"]) == (0, 1, [c.session_id])
    assert len(pokes) == 1
    agent_tunnel.resuming = False
    agent_tunnel.resumes += 1
    agent_tunnel._announce("back", 1.5)
    f = env.manager.figures()
    assert (f["open"], f["resuming"], f["resumes"]) == (1, 0, 1) and len(pokes) == 2

    agent_tunnel._announce("resuming", 0.0)  # and it ends before coming back
    tunnel.close(CloseCode.NORMAL, "done")
    assert c.result() == (CloseCode.NORMAL, "done")
    _assert_one_close(env, c.session_id, CloseCode.NORMAL)  # waits for the end
    assert len(pokes) == 4  # the end of a resuming session is news too
    f = env.manager.figures()
    assert (f["open"], f["resuming"], f["ended"], f["resumes"]) == (0, 0, 1, 1)
    assert f["ended_bytes_in"] == f["ended_bytes_out"] == len(payload)
    assert f["bytes_in"] == 0
