"""The suite's (and the demo's) port picker stays out of the kernel's ephemeral range, so
an outgoing connection cannot take a port between the pick and the bind of the broker,
relay or agent it was picked for, and reserves its picks against other pickers."""
import socket

from remote_gevent.demo.rabbit import PORT_FLOOR, free_port


def _ephemeral_low() -> int:
    with open("/proc/sys/net/ipv4/ip_local_port_range") as f:
        return int(f.read().split()[0])


def test_picked_ports_are_free_and_below_the_ephemeral_range():
    low = _ephemeral_low()
    ports = [free_port() for _ in range(50)]
    for port in ports:
        assert PORT_FLOOR <= port < (low if low > PORT_FLOOR + 1000 else 65536)
        with socket.socket() as s:
            s.bind(("127.0.0.1", port))  # free when picked (nobody else binds it here)
    assert len(set(ports)) > 1  # random, not one fixed port


def test_an_upper_bound_is_kept():
    assert all(PORT_FLOOR <= free_port(below=PORT_FLOOR + 500) < PORT_FLOOR + 500
               for _ in range(20))


def test_a_port_picked_is_not_picked_again_while_reserved(monkeypatch, tmp_path):
    """Another process picking at the same time skips the ports picked before it."""
    from remote_gevent.demo import rabbit

    monkeypatch.setattr(rabbit, "PORT_RESERVATIONS", str(tmp_path / "ports"))
    monkeypatch.setattr(rabbit, "PORT_FLOOR", 20000)
    picks = [rabbit.free_port(below=20040) for _ in range(30)]
    assert len(set(picks)) == 30  # 30 of the 40 ports: never one twice while reserved
    assert rabbit._reserve(picks[0]) is False
