"""File access on the device: the ``@transfer`` server and the ``@sftp`` server."""
