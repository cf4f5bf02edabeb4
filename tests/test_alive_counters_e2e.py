"""`watch` shows a session as resuming, and back, within seconds (issues 12 and 13), with
real processes: broker, relay behind our fault proxy, agent, a `stdio` console carrying
numbered lines, and `remote-gevent-console watch`. ``health_check`` stays at 600 s, so
only the agent's immediate ``sessions`` alive can bring the news in time; afterwards
`devices --json` shows the agent's counters."""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import time

import pytest

from echo_server import EchoServer
from fault_proxy import FaultProxy
from platform_helpers import status_queue_consumers
from remote_gevent.demo import rabbit as demo_rabbit
from test_cluster_presence import Lines
from test_e2e import WAIT, make_platform, procs, wait_for  # noqa: F401 - fixture used by name
from test_resume_e2e import KEEPALIVE, LineStream

pytestmark = [pytest.mark.e2e, pytest.mark.slow]

SHOWN_WITHIN = 10.0  # s from the fault to the watch line (typically ~1 s; a loaded CI box)


@pytest.fixture
def echo():
    server = EchoServer()
    yield server
    server.stop()


def _stop(proc: subprocess.Popen) -> None:
    proc.send_signal(signal.SIGTERM)
    try:
        proc.wait(10)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait(5)


def test_watch_shows_a_session_resuming_and_back_and_devices_has_counters(
        rabbit, tmp_path, echo, procs):  # noqa: F811
    proxy = FaultProxy(("127.0.0.1", 0))
    p = make_platform(rabbit, str(tmp_path / "platform"), start_relay=False, start_agent=False,
                      relay_port=proxy.port,
                      remote={"keepalive_interval": KEEPALIVE, "resume_timeout": 120},
                      console={"keepalive_interval": KEEPALIVE, "resume_timeout": 120})
    watch = None
    try:
        p.start()
        assert p._agent_yaml()["remote"]["health_check"] == 600
        p.relay_port = demo_rabbit.free_port("127.0.0.1")
        proxy.upstream = ("127.0.0.1", p.relay_port)
        env = dict(os.environ, PYTHONUNBUFFERED="1")
        watch = subprocess.Popen(p.console_argv("watch"), stdout=subprocess.PIPE,
                                 stderr=subprocess.STDOUT, env=env)
        out = Lines(watch)
        # watch is up once it consumes its status queue (which collects the agent's
        # announcements from then on); its start-up takes seconds on a loaded box
        wait_for(lambda: watch.poll() is not None or status_queue_consumers(p) > 0,
                 WAIT, what="watch to consume its status queue")
        assert watch.poll() is None, "\n".join(t for _, t in out.lines)
        p.start_relay()
        p.start_agent()
        device = "fr04/%s" % p.ident
        out.wait_for("%s ONLINE" % device, WAIT)

        lines = LineStream(procs, p, proxy, echo)
        lines.wait_lines(3)
        cut = time.monotonic()
        p.stop_relay(signal.SIGKILL)  # both legs lose their path: both ends resume
        seen = out.wait_for("resuming (relay path lost)", SHOWN_WITHIN, since=cut)
        summary = out.wait_for("%s online  sessions 1 (1 resuming: " % device, SHOWN_WITHIN,
                               since=cut)
        sid = re.search(r"session ([0-9a-f]{32}) resuming",
                        "\n".join(t for _, t in out.lines)).group(1)
        print("resuming shown %.1f s after the cut" % (max(seen, summary) - cut))

        back = time.monotonic()
        p.start_relay()
        seen = out.wait_for("session %s back (path re-established)" % sid, WAIT, since=back)
        out.wait_for("%s online  sessions 1" % device, SHOWN_WITHIN, since=back)
        print("back shown %.1f s after the relay's restart" % (seen - back))
        n = len(lines.received)
        lines.wait_lines(n + 5)  # flowing again
        lines.finish()  # every line once, in order
        assert watch.poll() is None
        assert not any("Traceback" in t for _, t in out.lines)
        print("\n".join(t for _, t in out.lines))
        _stop(watch)  # `devices` reads the same status queue: one consumer at a time
        watch = None

        res = subprocess.run(p.console_argv("devices", "--json"), stdout=subprocess.PIPE,
                             stderr=subprocess.PIPE, timeout=WAIT)
        assert res.returncode == 0, res.stderr
        row = {r["device"]: r for r in json.loads(res.stdout)["devices"]}[device]
        counters = row["counters"]
        print("devices --json counters: %s" % json.dumps(counters, sort_keys=True))
        assert counters["resumes"] >= 1 and counters["requests"] >= 1
        assert counters["resuming"] == 0 and counters["resuming_ids"] == []
        assert counters["rss"] > 10 * 2 ** 20
        assert counters["bytes_in"] + counters["ended_bytes_in"] > 0
    finally:
        if watch is not None:
            _stop(watch)
        proxy.stop()
        p.stop()
