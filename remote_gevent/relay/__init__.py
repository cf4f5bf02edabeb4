"""The relay (exit node, ``remote-gevent-relay``): runs on the platform.

``server`` pairs agent and console by session id and ticket; ``pending`` bounds the
connections not yet paired; ``splicer`` moves the paired sockets' bytes in one OS
thread; ``cli`` is the entry point and its config. Agents and consoles never import this
package: their side of the rendezvous is in ``remote_gevent.wire``.
"""

import sys

if sys.version_info < (3, 8):  # tests/test_py36.py runs it on 3.6
    # Only the agent runs on 3.6 and 3.7 (issue 16); say so in one line, not with the
    # SyntaxError traceback the package's modules (3.8 syntax) would give.
    sys.exit("remote-gevent-%s needs Python 3.8 or newer (this is %d.%d); only the agent, "
             "remote-gevent, runs on 3.6 and 3.7" % ("relay", sys.version_info[0],
                                                    sys.version_info[1]))
