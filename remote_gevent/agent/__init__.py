"""The agent: the code that runs on the device (``remote-gevent``).

``runtime`` wires everything (``Agent``); ``cli`` is the entry point; ``daemon`` and
``supervisor`` run it; ``control`` is its side of the control plane; ``tunnels`` admits
sessions and splices streams; ``history`` writes the CSV; ``files`` serves ``@transfer``
and ``@sftp``. Nothing here is imported by the relay or the console.
"""
