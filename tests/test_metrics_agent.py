"""The agent's node-exporter textfile (issue 13): a real in-process agent on the private
broker rewrites it at every alive; parsed with prometheus_client's parser; a refused
request shows up by its code — in the textfile and in the alive's ``counters`` alike
(one source, agent/counters.py)."""

from __future__ import annotations

import json
import os
import time

import gevent
import pytest

from remote_gevent.agent import config as config_mod
from remote_gevent.agent.runtime import Agent
from control_helpers import Console

parser = pytest.importorskip("prometheus_client.parser")

WAIT = 20.0


def samples(path: str) -> dict:
    with open(path) as f:
        text = f.read()
    return {(s.name, frozenset(s.labels.items())): s.value
            for fam in parser.text_string_to_metric_families(text) for s in fam.samples}


def test_agent_writes_its_counters_for_node_exporter(rabbit, device, operator, tmp_path):
    prom = str(tmp_path / "textfile" / "remote_gevent.prom")
    os.makedirs(os.path.dirname(prom))
    ak = tmp_path / "authorized_keys"
    ak.write_text("")
    os.chmod(str(ak), 0o600)
    path = str(tmp_path / "agent.yaml")
    with open(path, "w") as fh:
        json.dump({"ident": device.ident, "token": device.token,
                   "amqp": {"urls": [device.url], "ca_file": device.ca_file},
                   "remote": {"enabled": True, "server_id": device.server_id,
                              "health_check": 1, "metrics_textfile": prom,
                              "key_path": str(tmp_path / "dev_ed25519"),
                              "history_path": str(tmp_path / "history.csv"),
                              "authorized_keys": str(ak),
                              "relays": {device.server_id: "127.0.0.1:9"}}}, fh)
    watcher = Console(rabbit.link(operator), device.topic, None, None)
    watcher.start()  # its queue on remote.up collects the agent's alives from the start
    agent = Agent(config_mod.load(path), path)
    agent.stop_grace = 2.0
    greenlet = gevent.spawn(agent.run)
    op = rabbit.link(operator)
    try:
        deadline = time.monotonic() + WAIT
        while not os.path.exists(prom):
            assert time.monotonic() < deadline, "no textfile written"
            gevent.sleep(0.1)
        m = samples(prom)
        assert m[("remote_gevent_agent_sessions", frozenset({("state", "active")}))] == 0
        assert m[("remote_gevent_agent_amqp_connects_total", frozenset())] >= 1
        assert m[("remote_gevent_agent_rss_bytes", frozenset())] > 10 * 2 ** 20
        op.connect()
        op.publish("remote.down", device.topic + ".session", b"not json",
                   reply_to="amq.gen-x", correlation_id="c1", delivery_mode=1)
        key = ("remote_gevent_agent_refusals_total", frozenset({("code", "malformed")}))
        deadline = time.monotonic() + WAIT  # each wait its own bound (a loaded CI box)
        while samples(prom).get(key) != 1:
            assert time.monotonic() < deadline, samples(prom)
            gevent.sleep(0.2)
        sent = ("remote_gevent_agent_alives_total", frozenset({("result", "sent")}))
        while samples(prom).get(sent, 0) < 2:  # health_check 1 s: the next alive is due
            assert time.monotonic() < deadline, samples(prom)
            gevent.sleep(0.2)
        assert oct(os.stat(prom).st_mode & 0o777) == "0o644"  # node-exporter reads it
        deadline = time.monotonic() + WAIT
        while True:  # the same figures travel in the alive
            _, msg = watcher.up["alive"].get(timeout=max(0.1, deadline - time.monotonic()))
            counters = msg.body["counters"]
            if counters["refusals"].get("malformed") == 1:
                break
        assert counters["open"] == counters["resuming"] == counters["waiting"] == 0
        assert counters["rss"] > 10 * 2 ** 20 and counters["resuming_ids"] == []
    finally:
        watcher.stop()
        op.close()
        agent.request_stop()
        greenlet.join(15.0)
