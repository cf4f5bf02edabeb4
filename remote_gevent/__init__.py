"""remote-gevent: remote access to devices behind firewalls and NAT.

Kept free of imports on purpose: every entry point must be able to run
``gevent.monkey.patch_all()`` before socket, ssl, amqp or paramiko load.
"""

__version__ = "0.1.0"

#: ``--version`` of every program (click's ``message``): ``remote-gevent 0.1.0``,
#: ``remote-gevent-relay 0.1.0``, ``remote-gevent-console 0.1.0`` — one format.
VERSION_MESSAGE = "%(prog)s %(version)s"
