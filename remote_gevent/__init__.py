"""remote-gevent: remote access to devices behind firewalls and NAT.

Kept free of imports on purpose: every entry point must be able to run
``gevent.monkey.patch_all()`` before socket, ssl, amqp or paramiko load.
"""

__version__ = "0.1.0"
