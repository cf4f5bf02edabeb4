"""The relay (exit node, ``remote-gevent-relay``): runs on the platform.

``server`` pairs agent and console by session id and ticket; ``pending`` bounds the
connections not yet paired; ``splicer`` moves the paired sockets' bytes in one OS
thread; ``cli`` is the entry point and its config. Agents and consoles never import this
package: their side of the rendezvous is in ``remote_gevent.wire``.
"""
