"""Log output: human-readable lines by default, or one JSON object per line for collectors.

A JSON line holds `time` (UTC, ISO 8601), `level`, `logger`, `message`, every field
passed with `extra=` (`log.warning("...", extra={"route": "r"})`), and `exception`
with the traceback when there is one.
"""

from __future__ import annotations

import json
import logging
import time
from datetime import UTC, datetime
from typing import Any

FORMATS = ("text", "json")
TEXT_FORMAT = "%(asctime)s %(levelname)s %(name)s: %(message)s"
# What every LogRecord has; anything else on a record came from `extra=`.
_STANDARD = frozenset(vars(logging.LogRecord("", 0, "", 0, "", None, None))) | {
    "message",
    "asctime",
    "taskName",
}


class JsonFormatter(logging.Formatter):
    """One JSON object per record, on one line."""

    def format(self, record: logging.LogRecord) -> str:
        entry: dict[str, Any] = {
            "time": datetime.fromtimestamp(record.created, UTC).isoformat(timespec="milliseconds"),
            "level": record.levelname,
            "logger": record.name,
            "message": record.getMessage(),
        }
        entry.update((k, v) for k, v in vars(record).items() if k not in _STANDARD)
        if record.exc_info:
            entry["exception"] = self.formatException(record.exc_info)
        elif record.exc_text:
            entry["exception"] = record.exc_text
        if record.stack_info:
            entry["stack"] = self.formatStack(record.stack_info)
        return json.dumps(entry, default=str, ensure_ascii=False)


def configure(level: str = "INFO", fmt: str = "text") -> None:
    """Set up the root logger on stderr (a no-op if it already has handlers)."""
    handler = logging.StreamHandler()
    handler.setFormatter(JsonFormatter() if fmt == "json" else logging.Formatter(TEXT_FORMAT))
    logging.basicConfig(level=level.upper(), handlers=[handler])


class RateLimited:
    """At most one line per key every `period` seconds; the next says how many were dropped.

    A backend that fails hundreds of batches a second must not flood the log: the
    operator needs to see that it fails and how often, once.
    """

    def __init__(self, logger: logging.Logger, period: float = 5.0) -> None:
        self.logger = logger
        self.period = period
        self._last: dict[object, float] = {}
        self._dropped: dict[object, int] = {}

    def log(self, key: object, level: int, message: str, *args: Any, **kwargs: Any) -> None:
        now = time.monotonic()
        if now - self._last.get(key, -self.period) < self.period:
            self._dropped[key] = self._dropped.get(key, 0) + 1
            return
        self._last[key] = now
        dropped = self._dropped.pop(key, 0)
        if dropped:
            message += f" (and {dropped} more like it in the last {self.period:g} s)"
        self.logger.log(level, message, *args, **kwargs)
