"""Log lines: untrusted text can neither forge a line nor carry terminal escapes."""

import io
import logging

from remote_gevent.common import logs


def test_escape_control_characters_and_truncates():
    assert logs.escape("ok name.txt") == "ok name.txt"
    assert logs.escape("a\nb") == "a\\x0ab"
    assert logs.escape("x\x1b[2J\r\x7f\x85") == "x\\x1b[2J\\x0d\\x7f\\x85"
    assert logs.escape("line\u2028sep") == "line\\u2028sep"
    assert logs.escape(b"\xff\xfe\n") == "\\xff\\xfe\\x0a"
    assert logs.escape("x" * 500).endswith("...(truncated)")
    assert len(logs.escape("x" * 500)) == logs.DEFAULT_ESCAPE_LIMIT + len("...(truncated)")
    assert logs.escape(None) == "None"


def test_formatter_keeps_one_record_on_one_line():
    stream = io.StringIO()
    handler = logging.StreamHandler(stream)
    handler.setFormatter(logs.EscapingFormatter("%(levelname)s %(message)s"))
    logger = logging.getLogger("test_logs.formatter")
    logger.addHandler(handler)
    logger.propagate = False
    try:
        logger.warning("file %s refused", "a.txt\n2026-01-01 INFO forged: root login ok")
    finally:
        logger.removeHandler(handler)
    out = stream.getvalue()
    assert out.count("\n") == 1
    assert "a.txt\\x0a2026-01-01 INFO forged" in out


def test_setup_installs_the_escaping_formatter(tmp_path):
    root = logging.getLogger()
    saved = list(root.handlers), root.level
    try:
        handler = logs.setup("INFO", log_file=str(tmp_path / "agent.log"))
        assert isinstance(handler.formatter, logs.EscapingFormatter)
    finally:
        for h in list(root.handlers):
            root.removeHandler(h)
            h.close()
        for h in saved[0]:
            root.addHandler(h)
        root.setLevel(saved[1])
