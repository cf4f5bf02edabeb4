"""``python -m remote_gevent.demo.watchdog``: ends the demo's processes when its
supervisor dies (see :class:`remote_gevent.demo.processes.Watchdog`).

Reads ``name pid start_time`` lines on stdin until EOF — the supervisor holds the only
write end, so EOF means it exited or was killed — then ends, process group by process
group, every recorded process still running with the recorded start time (a recycled
pid is never touched). Ignores SIGINT and SIGHUP: a closed terminal or a Ctrl-C meant
for the supervisor must not stop the one process that cleans up after it.
"""

import signal
import sys
from typing import List


def main() -> int:
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGHUP, signal.SIG_IGN)
    from remote_gevent.demo.processes import Entry, end_leftovers

    entries: List[Entry] = []
    for raw in sys.stdin.buffer:
        parts = raw.decode("ascii", "replace").split()
        if len(parts) == 3 and parts[1].isdigit() and parts[2].isdigit():
            entries.append((parts[0], int(parts[1]), int(parts[2]) or None))
    ended = end_leftovers(entries, say=lambda text: print(text, flush=True))
    if ended:
        print("demo watchdog: the supervisor is gone; ended %s" % ", ".join(ended), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
