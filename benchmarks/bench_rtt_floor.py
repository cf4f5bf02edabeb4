"""The floor under the tunnel's added round trip: our three-process chain with nothing in
it but what every design of this shape must do.

    python benchmarks/bench_rtt_floor.py [--rounds 5000] [--runs 3]

Issue 17 asks for an added 1-byte round trip no worse than the OpenSSH reverse path's.
Ours crosses three processes each way (console, relay, agent), as the reverse path does
(operator ``ssh``, the bastion's sshd, the device's ``ssh -R``). This builds the same chain
with the least work per message, and measures it next to the echo server directly:

* **console-like**: a gevent greenlet proxy (monkey-patched sockets, as the console): reads
  the client's bytes, seals each read into one frame with the tunnel's own
  :class:`~remote_gevent.crypto.tunnel_crypto.FrameSealer` (OpenSSL, the console's
  default), sends it; frames coming back are opened and written to the client;
* **relay**: the relay's own data plane, :class:`remote_gevent.relay.splicer.SplicePlane`
  (one OS thread, epoll, ``os.splice``), as ``bench_hop.py``'s ``thread-splice``;
* **agent-like**: the mirror image (frames in, opened, written to the target; the target's
  bytes sealed with libsodium, the agent's default, and sent back).

No streams, flow control, window credit, resume or ACK, no session: only the gevent hub,
one AEAD operation and two system calls per message per hop. What ours costs above this is
the tunnel's own per-message work; what this costs above OpenSSH's reverse path is the
price of Python and gevent hops on this machine (docs/performance.md).

Prints the round trip's p50/p99 and what each hop spent in CPU per round trip, direct and
through the chain, interleaved. Figures only, no assertions. ``benchmarks.run`` measures
the same chain in its latency section (``floor_chain``), in the same run as ours and
OpenSSH's paths. The relay hop needs ``os.splice`` (Linux, Python 3.10+).
"""

from __future__ import annotations

import os
import statistics
import subprocess
import sys
from typing import Any, Callable, Dict, Tuple

ROOT = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..")
HERE = os.path.abspath(__file__)

#: hop roles, in the order they are started (each dials the one before it)
ROLES = ("agent_like", "relay_like", "console_like")
#: how the two outer hops are written (the relay hop is always the relay's own plane)
STYLES = ("gevent", "thread")
#: bytes read from the plaintext side per frame (well under the frame's bound)
READ_SIZE = 16384


# ---------------------------------------------------------------- the hop children

def _hop(role: str, style: str, target_port: int, up_key: bytes, down_key: bytes) -> None:
    """One hop: listen, print the port, forward each connection to ``target_port``;
    ``style`` "gevent" (greenlets, as the product) or "thread" (a blocking OS thread per
    direction, no gevent: what the same hop costs without the hub)."""
    if role == "relay_like":
        sys.path.insert(0, os.path.dirname(HERE))
        import bench_hop

        bench_hop._proxy("thread-splice", target_port)
        return
    if style == "gevent":
        from gevent import monkey

        monkey.patch_all()
    import socket
    import threading

    sys.path.insert(0, ROOT)
    from remote_gevent.crypto import aead_openssl, tunnel_crypto

    # the console seals with OpenSSL, the agent with libsodium (their defaults)
    aead_openssl.use_backend("openssl" if role == "console_like" else "libsodium")
    listener = socket.socket()
    listener.bind(("127.0.0.1", 0))
    listener.listen(8)
    print(listener.getsockname()[1], flush=True)
    while True:
        client, _ = listener.accept()
        upstream = socket.create_connection(("127.0.0.1", target_port))
        for s in (client, upstream):
            s.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        # the console-like hop's client side is plaintext, its upstream framed; the
        # agent-like hop the other way round. up_key seals console -> agent.
        if role == "console_like":
            sealer, opener = tunnel_crypto.make_sealer_opener(up_key, down_key,
                                                              tunnel_crypto.AES256GCM)
            plain, framed = client, upstream
        else:
            sealer, opener = tunnel_crypto.make_sealer_opener(down_key, up_key,
                                                              tunnel_crypto.AES256GCM)
            plain, framed = upstream, client
        for src, dst, work in ((plain, framed, _sealing(sealer)),
                               (framed, plain, _opening(opener))):
            if style == "gevent":
                import gevent

                src.setblocking(False)
                gevent.spawn(_pump, src, dst, work)
            else:
                threading.Thread(target=_blocking_pump, args=(src, dst, work),
                                 daemon=True).start()


def _blocking_pump(src: Any, dst: Any, on_bytes: Callable[[Any], Any]) -> None:
    """The thread hop: blocking ``os.readv``, ``on_bytes``, blocking ``os.write``."""
    s_fd, d_fd = src.fileno(), dst.fileno()
    view = memoryview(bytearray(1 << 18))
    while True:
        n = os.readv(s_fd, [view])
        if not n:
            dst.shutdown(2)
            return
        for out in on_bytes(view[:n]):
            out = memoryview(out)
            while out:
                out = out[os.write(d_fd, out):]


def _write_all(fd: int, data: Any, writable: Any, hub: Any) -> None:
    """Non-blocking writes of ``data`` to ``fd``, waiting in the hub only when it is full."""
    view = memoryview(data)
    while view:
        try:
            view = view[os.write(fd, view):]
        except BlockingIOError:
            hub.wait(writable)


def _pump(src: Any, dst: Any, on_bytes: Callable[[Any], Any]) -> None:
    """The leanest hop a gevent process can make: wait for readability in the hub (one
    wake-up), one ``os.readv`` of what is there, ``on_bytes`` of it, non-blocking
    ``os.write`` of the result; no socket-object wrappers, no read into EAGAIN."""
    from gevent.hub import get_hub

    hub = get_hub()
    s_fd, d_fd = src.fileno(), dst.fileno()
    readable, writable = hub.loop.io(s_fd, 1), hub.loop.io(d_fd, 2)
    buf = bytearray(1 << 18)
    view = memoryview(buf)
    while True:
        hub.wait(readable)
        try:
            n = os.readv(s_fd, [view])
        except BlockingIOError:
            continue
        if not n:
            dst.shutdown(2)
            return
        for out in on_bytes(view[:n]):
            _write_all(d_fd, out, writable, hub)


def _sealing(sealer: Any) -> Callable[[Any], Any]:
    """Plaintext in, one sealed frame per read (of at most READ_SIZE bytes) out."""
    def seal(data: Any) -> Any:
        return [sealer.seal(data[i:i + READ_SIZE]) for i in range(0, len(data), READ_SIZE)]
    return seal


def _opening(opener: Any) -> Callable[[Any], Any]:
    """Frames in (whole or in pieces), the plaintext of each whole one out."""
    pending = bytearray()

    def open_frames(data: Any) -> Any:
        pending.extend(data)
        out, start = [], 0
        while len(pending) - start >= 4:
            clen = opener.frame_length(pending[start:start + 4])
            if len(pending) - start < 4 + clen:
                break
            view = memoryview(pending)
            out.append(opener.open(view[start:start + 4], view[start + 4:start + 4 + clen]))
            del view
            start += 4 + clen
        del pending[:start]
        return out
    return open_frames


# ---------------------------------------------------------------- the chain

def start_chain(start: Callable[..., subprocess.Popen], target_port: int,
                style: str = "gevent") -> Tuple[int, Dict[str, subprocess.Popen]]:
    """Start the three hops (outer hops in ``style``) in front of ``target_port`` with
    ``start(argv, stdout=PIPE)`` (``benchmarks.run``'s ``Procs.start``, which tears them
    down; or ``Popen``); the console-like hop's port and the hop processes by role."""
    up_key, down_key = os.urandom(32).hex(), os.urandom(32).hex()
    procs: Dict[str, subprocess.Popen] = {}
    port = target_port
    for role in ROLES:
        proc = start([sys.executable, HERE, "--hop", role, style, str(port), up_key,
                      down_key],
                     stdout=subprocess.PIPE)
        procs[role] = proc
        line = proc.stdout.readline() if proc.stdout is not None else b""
        if not line.strip().isdigit():
            raise RuntimeError("%s hop did not start (exit %s)" % (role, proc.poll()))
        port = int(line)
    return port, procs


def main() -> None:
    if len(sys.argv) > 1 and sys.argv[1] == "--hop":
        _hop(sys.argv[2], sys.argv[3], int(sys.argv[4]), bytes.fromhex(sys.argv[5]),
             bytes.fromhex(sys.argv[6]))
        return
    sys.path.insert(0, ROOT)
    sys.path.insert(0, os.path.dirname(HERE))
    import bench_hop
    from benchmarks.suite_common import cpu_seconds

    args = bench_hop.round_trip_args(__doc__)

    echo_port = bench_hop._echo_server()
    chains: Dict[str, Tuple[int, Dict[str, subprocess.Popen]]] = {}
    try:
        for style in STYLES:
            chains[style] = start_chain(subprocess.Popen, echo_port, style)
        names = ["direct"] + ["chain-" + style for style in STYLES]
        p50s: Dict[str, list] = {name: [] for name in names}
        p99s: Dict[str, list] = {name: [] for name in names}
        cpu = {style: {role: 0.0 for role in ROLES} for style in STYLES}
        for _ in range(args.runs):  # interleaved, so drift hits all alike
            for name in names:
                style = name[len("chain-"):]
                port, procs = chains[style] if style in chains else (echo_port, {})
                before = {role: cpu_seconds(p.pid) for role, p in procs.items()}
                p50, p99 = bench_hop._round_trips(port, args.rounds)
                p50s[name].append(p50)
                p99s[name].append(p99)
                for role, p in procs.items():
                    cpu[style][role] += cpu_seconds(p.pid) - before[role]
        direct = statistics.median(p50s["direct"])
        total = args.runs * args.rounds
        print("1-byte round trips, %d x %d, medians (us):" % (args.runs, args.rounds))
        for name in names:
            p50 = statistics.median(p50s[name])
            line = "  %-13s p50 %6.1f  p99 %6.1f  added %6.1f" % (
                name, p50, statistics.median(p99s[name]), p50 - direct)
            style = name[len("chain-"):]
            if style in cpu:
                line += "  CPU per round trip: %s" % ", ".join(
                    "%s %.1f" % (role, cpu[style][role] / total * 1e6) for role in ROLES)
            print(line)
    finally:
        for _, procs in chains.values():
            for proc in procs.values():
                proc.kill()
                proc.wait()


if __name__ == "__main__":
    main()
