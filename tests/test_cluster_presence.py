"""Online/offline as fast as the broker knows it (issue 13): a real agent process is
SIGKILLed; a real `remote-gevent-console watch` shows it OFFLINE within 2 × the AMQP
heartbeat although its ``health_check`` stays at 600 s (the alive rule alone would wait
3 × 600 s). The broker deletes the agent's per-connection queue when the connection
dies; `watch` probes the queues every heartbeat / 2."""

from __future__ import annotations

import os
import signal
import subprocess
import threading
import time

import pytest

from platform_helpers import status_queue_consumers
from test_e2e import WAIT, make_platform, wait_for

HEARTBEAT = 10  # s, the console's AMQP heartbeat: watch probes every 5 s


class Lines:
    """A child's stdout, read by a thread, searchable while it runs."""

    def __init__(self, proc: subprocess.Popen) -> None:
        self.proc = proc
        self.lines: list = []
        self.thread = threading.Thread(target=self._read, daemon=True)
        self.thread.start()

    def _read(self) -> None:
        for raw in self.proc.stdout:
            self.lines.append((time.monotonic(), raw.decode("utf-8", "replace").rstrip()))

    def wait_for(self, needle: str, timeout: float, since: float = 0.0) -> float:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            for at, line in list(self.lines):
                if at >= since and needle in line:
                    return at
            time.sleep(0.1)
        raise AssertionError("no %r within %.0f s in watch output:\n%s"
                             % (needle, timeout, "\n".join(text for _, text in self.lines)))


@pytest.mark.slow
@pytest.mark.e2e
def test_sigkilled_agent_shows_offline_in_watch_within_two_heartbeats(rabbit, tmp_path):
    p = make_platform(rabbit, str(tmp_path / "platform"), start_agent=False,
                      console={"amqp": {"heartbeat": HEARTBEAT},
                                         "state_file": str(tmp_path / "state.json")})
    p.start()
    watch = None
    try:
        assert p._agent_yaml()["remote"]["health_check"] == 600
        env = dict(os.environ, PYTHONUNBUFFERED="1")
        watch = subprocess.Popen(p.console_argv("watch"), stdout=subprocess.PIPE,
                                 stderr=subprocess.STDOUT, env=env)
        out = Lines(watch)
        # watch is up once it consumes its status queue (which collects the agent's
        # announcements from then on); its start-up takes seconds on a loaded box
        wait_for(lambda: watch.poll() is not None or status_queue_consumers(p) > 0,
                 WAIT, what="watch to consume its status queue")
        assert watch.poll() is None, "\n".join(t for _, t in out.lines)
        p.start_agent()
        device = "fr04/%s" % p.ident
        out.wait_for("%s ONLINE" % device, 30)
        p.agent_proc.send_signal(signal.SIGKILL)
        killed = time.monotonic()
        seen = out.wait_for("%s OFFLINE" % device, 2 * HEARTBEAT + 10, since=killed)
        print("offline shown %.1f s after SIGKILL" % (seen - killed))
        print("\n".join(text for _, text in out.lines))
        assert seen - killed < 2 * HEARTBEAT
        assert watch.poll() is None  # watch keeps running
        assert not any("Traceback" in line for _, line in out.lines)
    finally:
        if watch is not None:
            watch.send_signal(signal.SIGTERM)
            try:
                watch.wait(10)
            except subprocess.TimeoutExpired:
                watch.kill()
                watch.wait(5)
        p.stop()


# --------------------------------------------------------------------------- the rule


def test_presence_newer_than_the_last_alive_decides():
    from remote_gevent.console.device_states import device_status

    now = 1_000_000.0
    alive = {"last_alive": now - 10, "health_check": 600, "event": "periodic"}
    assert device_status(alive, now) == "online"  # the alive rule alone: online
    assert device_status(dict(alive, presence="gone", presence_at=now - 5), now) == "offline"
    # An alive after the probe (the device came back) wins over the older "gone".
    assert device_status(dict(alive, presence="gone", presence_at=now - 20), now) == "online"
    assert device_status(dict(alive, event="stopping", presence="gone",
                              presence_at=now - 5), now) == "stopped"
    # "connected" with no alive ever seen: online, for three intervals only.
    seen = {"presence": "connected", "presence_at": now - 5}
    assert device_status(seen, now) == "online"
    assert device_status({"presence": "connected", "presence_at": now - 3 * 600 - 1},
                         now) == "unknown"


def test_status_queue_of_older_versions_is_recreated_not_auto_delete(rabbit, operator,
                                                                      tmp_path, caplog):
    """Older consoles declared the status queue auto-delete (py-amqp's default): it
    vanished after the first `devices`. Now it is re-created durable, not auto-delete,
    and survives the console that declared it."""
    import json

    from amqp.exceptions import NotFound

    from remote_gevent.common.amqplink import AmqpLink
    from remote_gevent.console import config as cconfig
    from remote_gevent.console.control import ConsoleControl

    path = tmp_path / "console.yaml"
    path.write_text(json.dumps({
        "user": operator.user, "password": operator.password,
        "amqp": {"urls": [operator.url], "ca_file": operator.ca_file, "connect_timeout": 5},
        "operator_key": str(tmp_path / "op"), "known_devices": str(tmp_path / "kd"),
        "state_file": str(tmp_path / "state.json")}))
    cfg = cconfig.load(str(path))
    name = cfg.status_queue_name
    old = rabbit.link(operator)
    old.connect()
    old.channel.queue_declare(name, durable=True, auto_delete=True, arguments={
        "x-max-length": cfg.status_queue_max_length, "x-overflow": "drop-head",
        "x-message-ttl": cfg.status_queue_ttl * 1000, "x-expires": 30 * 86400 * 1000})
    old.close()
    with ConsoleControl(cfg, consume_status=True) as control:
        assert control.status_queue == name
    assert "status queue %s re-created" % name in caplog.text
    admin = AmqpLink([rabbit.amqps_url()], rabbit.node.admin_user, rabbit.node.admin_password,
                     ca_file=rabbit.ca_file, heartbeat=0, prefetch=0)
    admin.connect()
    try:
        try:
            ok = admin.channel.queue_declare(name, passive=True)
        except NotFound:
            raise AssertionError("the status queue vanished with its consumer") from None
        assert ok.consumer_count == 0
    finally:
        admin.close()


def test_known_devices_cache_sees_every_change(tmp_path):
    """The parse cache (issue 13: 31 ms per message at 1,000 pins) never hides an edit
    made by another process, another instance, or by hand."""
    from remote_gevent.console.known_devices import KnownDevices
    from remote_gevent.crypto.identity import IdentityKey

    path = str(tmp_path / "known_devices")
    reader, writer = KnownDevices(path), KnownDevices(path)
    a, b = IdentityKey.generate(), IdentityKey.generate()
    assert reader.get("fr04", "dev") is None
    writer.pin("fr04", "dev", a.public_bytes)
    assert reader.get("fr04", "dev").fingerprint == a.fingerprint
    writer.pin("fr04", "dev", b.public_bytes, replace=True)
    assert reader.get("fr04", "dev").fingerprint == b.fingerprint
    with open(path) as f:
        text = f.read()
    with open(path, "w") as f:  # by hand, in place (same inode)
        f.write(text.replace("fr04/dev", "fr04/other"))
    assert reader.get("fr04", "dev") is None
    assert [p.device_id for p in reader.all()] == ["fr04/other"]
    assert writer.forget("fr04", "other")
    assert reader.all() == []
