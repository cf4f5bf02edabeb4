"""A fault-injecting TCP proxy for the tests (gevent; the test process is monkey patched).

Listens on 127.0.0.1, forwards every connection to ``upstream``. Each connection is
attributed to a *leg* by the process that opened it (``legs = {"agent": pid, ...}``,
looked up in /proc: both legs come from 127.0.0.1, so the address cannot tell them
apart). Faults, per leg or for all:

- :meth:`reset`: abort the leg's connections (RST to the client, close upstream);
- :meth:`outage`: for ``seconds`` nothing is forwarded on the leg's connections, old or
  new (sockets stay open, bytes stay queued in the kernel: a dead path, not an error).
"""

from __future__ import annotations

import os
import socket
import struct
import time
from typing import Dict, List, Optional, Tuple

import gevent
import gevent.event
import gevent.server

CHUNK = 65536


def _socket_inode(port: int, remote_port: int) -> Optional[str]:
    """Inode of the 127.0.0.1 TCP socket from local ``port`` to ``remote_port``
    (/proc/net/tcp). Both ports: Linux reuses an ephemeral port for connections to other
    destinations, so the local port alone can name another process's socket."""
    local_want = "0100007F:%04X" % port
    remote_want = "0100007F:%04X" % remote_port
    with open("/proc/net/tcp") as f:
        next(f)
        for line in f:
            parts = line.split()
            if parts[1] == local_want and parts[2] == remote_want and parts[9] != "0":
                return parts[9]
    return None


def _pid_owns(pid: int, inode: str) -> bool:
    target = "socket:[%s]" % inode
    fd_dir = "/proc/%d/fd" % pid
    try:
        for fd in os.listdir(fd_dir):
            try:
                if os.readlink(os.path.join(fd_dir, fd)) == target:
                    return True
            except OSError:
                continue
    except OSError:
        return False
    return False


class _Conn:
    def __init__(self, client: socket.socket, upstream: socket.socket, leg: str) -> None:
        self.client = client
        self.upstream = upstream
        self.leg = leg
        self.greenlets: List[gevent.Greenlet] = []

    def abort(self) -> None:
        try:
            self.client.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER,
                                   struct.pack("ii", 1, 0))
        except OSError:
            pass
        for s in (self.client, self.upstream):
            try:
                s.close()
            except OSError:
                pass
        for g in self.greenlets:
            g.kill(block=False)


class FaultProxy:
    def __init__(self, upstream: Tuple[str, int], legs: Optional[Dict[str, int]] = None
                 ) -> None:
        self.upstream = upstream
        self.legs: Dict[str, int] = dict(legs or {})
        self.conns: List[_Conn] = []
        self.accepted: Dict[str, int] = {}
        self._flowing: Dict[str, gevent.event.Event] = {}
        self.server = gevent.server.StreamServer(("127.0.0.1", 0), self._handle)
        self.server.start()
        self.port = self.server.address[1]

    def _flow(self, leg: str) -> gevent.event.Event:
        ev = self._flowing.get(leg)
        if ev is None:
            ev = self._flowing[leg] = gevent.event.Event()
            ev.set()
        return ev

    def _leg_of(self, port: int) -> str:
        inode = _socket_inode(port, self.port)
        if inode is not None:
            for leg, pid in self.legs.items():
                if _pid_owns(pid, inode):
                    return leg
        return "other"

    def _handle(self, client: socket.socket, address: Tuple[str, int]) -> None:
        leg = self._leg_of(address[1])
        self.accepted[leg] = self.accepted.get(leg, 0) + 1
        try:
            upstream = socket.create_connection(self.upstream, timeout=5)
            upstream.settimeout(None)
        except OSError:
            client.close()
            return
        conn = _Conn(client, upstream, leg)
        self.conns.append(conn)
        flow = self._flow(leg)
        conn.greenlets = [gevent.spawn(self._pump, client, upstream, flow),
                          gevent.spawn(self._pump, upstream, client, flow)]
        gevent.joinall(conn.greenlets)
        conn.abort()
        if conn in self.conns:
            self.conns.remove(conn)

    @staticmethod
    def _pump(src: socket.socket, dst: socket.socket, flow: gevent.event.Event) -> None:
        try:
            while True:
                flow.wait()
                data = src.recv(CHUNK)
                if not data:
                    dst.shutdown(socket.SHUT_WR)
                    return
                flow.wait()  # an outage that began meanwhile holds this chunk too
                dst.sendall(data)
        except OSError:
            for s in (src, dst):
                try:
                    s.close()
                except OSError:
                    pass

    def reset(self, leg: str) -> int:
        """Abort the leg's connections; how many there were."""
        victims = [c for c in self.conns if c.leg == leg]
        for c in victims:
            c.abort()
        return len(victims)

    def outage(self, leg: str, seconds: float) -> None:
        """Forward nothing on ``leg`` for ``seconds`` (blocks the caller that long)."""
        flow = self._flow(leg)
        flow.clear()
        try:
            time.sleep(seconds)
        finally:
            flow.set()

    def stop(self) -> None:
        self.server.stop(timeout=1)
        for c in list(self.conns):
            c.abort()
