"""`--log-format`: readable lines by default, one JSON object per line for collectors."""

from __future__ import annotations

import json
import logging
import sys

from coalesce.telemetry.logs import JsonFormatter

from tests.conftest import local_backend
from tests.support.coalesce import Process

ROUTES = {
    "backends": {"echo": local_backend("echo")},
    "routes": [{"model": "echo", "backend": "echo"}],
}


def record(message: str, *args: object, exc_info=None, **extra: object) -> logging.LogRecord:
    return logging.getLogger("coalesce.test").makeRecord(
        "coalesce.test", logging.WARNING, __file__, 1, message, args, exc_info, extra=extra
    )


def test_a_json_line_has_time_level_logger_message_and_the_extra_fields():
    line = JsonFormatter().format(record("backend %s failed", "b", route="r", status=14))
    entry = json.loads(line)
    assert entry.pop("time").endswith("+00:00")
    assert entry == {
        "level": "WARNING",
        "logger": "coalesce.test",
        "message": "backend b failed",
        "route": "r",
        "status": 14,
    }


def test_a_json_line_carries_the_traceback_and_any_value():
    try:
        raise ValueError("bad row")
    except ValueError:
        exc_info = sys.exc_info()
    line = JsonFormatter().format(record("boom", exc_info=exc_info, shape=(2, 3), obj=object()))
    assert "\n" not in line
    entry = json.loads(line)
    assert entry["shape"] == [2, 3] and entry["obj"].startswith("<object")
    assert entry["exception"].startswith("Traceback")
    assert entry["exception"].endswith("ValueError: bad row")


def served_log(tmp_path, *args: str) -> list[str]:
    """The log lines of a `coalesce serve` started and stopped (SIGTERM) with `args`."""
    process = Process(ROUTES, tmp_path, args)
    assert process.terminate() == 0
    return process.output().splitlines()


def test_serve_logs_json_lines(tmp_path):
    lines = served_log(tmp_path, "--log-format", "json")
    entries = [json.loads(line) for line in lines]  # every line is one JSON object
    assert {"time", "level", "logger", "message"} <= set(entries[0])
    messages = [e["message"] for e in entries]
    assert any(m.startswith("serving echo on 127.0.0.1:") for m in messages)
    assert messages[-1] == "stopped" and entries[-1]["level"] == "INFO"


def test_serve_logs_readable_text_by_default(tmp_path):
    lines = served_log(tmp_path)
    assert any(" INFO coalesce: serving echo on 127.0.0.1:" in line for line in lines)
    assert lines[-1].endswith(" INFO coalesce: stopped")


def test_backend_errors_are_rate_limited_per_key(caplog):
    import logging
    import time as _time

    from coalesce.telemetry.logs import RateLimited

    limited = RateLimited(logging.getLogger("coalesce.test"), period=0.2)
    with caplog.at_level(logging.WARNING, logger="coalesce.test"):
        for _ in range(100):
            limited.log("UNAVAILABLE", logging.WARNING, "backend %s failed", "b")
        limited.log("INTERNAL", logging.WARNING, "backend %s broke", "b")
        _time.sleep(0.25)
        limited.log("UNAVAILABLE", logging.WARNING, "backend %s failed", "b")
    messages = [r.getMessage() for r in caplog.records]
    assert messages == [
        "backend b failed",
        "backend b broke",
        "backend b failed (and 99 more like it in the last 0.2 s)",
    ]
