"""One log line per event, plain or JSON (``--log-format json``).

Log records carry UIDs, job ids and AE titles only: the code never passes names, patient IDs or
the API key to a logger.
"""

from __future__ import annotations

import datetime as dt
import json
import logging
import sys


class JsonFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        entry = {
            "time": dt.datetime.fromtimestamp(record.created, dt.UTC).isoformat(timespec="milliseconds"),
            "level": record.levelname.lower(),
            "logger": record.name,
            "event": record.getMessage(),
        }
        if record.exc_info:
            entry["error"] = self.formatException(record.exc_info)
        return json.dumps(entry, ensure_ascii=False)


def setup_logging(log_format: str = "text", level: int = logging.INFO) -> None:
    handler = logging.StreamHandler(sys.stderr)
    if log_format == "json":
        handler.setFormatter(JsonFormatter())
    else:
        handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(level)
    # Migrations run at every start; their step-by-step lines are noise unless one fails.
    logging.getLogger("alembic").setLevel(max(level, logging.WARNING))
    # pynetdicom narrates every association and message; the node logs its own one line each.
    logging.getLogger("pynetdicom").setLevel(max(level, logging.WARNING))
