"""Structured JSON logs carrying the request id."""

from __future__ import annotations

import json
import logging
import sys
import time
from typing import Any

from tessera.edge.edge import request_id_var


class JsonFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        entry: dict[str, Any] = {
            "ts": time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(record.created))
            + f".{int(record.msecs):03d}Z",
            "level": record.levelname.lower(),
            "logger": record.name,
            "msg": record.getMessage(),
        }
        audit = getattr(record, "audit", None)
        if audit:
            entry["audit"] = {k: v for k, v in audit.items() if v is not None}
        rid = request_id_var.get()
        if rid:
            entry["request_id"] = rid
        if record.exc_info:
            entry["exc"] = self.formatException(record.exc_info)
        return json.dumps(entry, ensure_ascii=False)


def _not_the_websocket_hint(record: logging.LogRecord) -> bool:
    # With ws="none" (tessera serve), uvicorn suggests installing a WebSocket library on
    # every upgrade attempt: misleading, since refusing WebSocket is the point.
    return not str(record.msg).startswith("No supported WebSocket library")


def configure_logging(level: str = "info") -> None:
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(JsonFormatter())
    handler.addFilter(_not_the_websocket_hint)
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(level.upper())
    for name in ("uvicorn", "uvicorn.error"):
        logging.getLogger(name).handlers[:] = []
        logging.getLogger(name).propagate = True
    # No access log: it would write client IPs for requests that asked not to be tracked.
    logging.getLogger("uvicorn.access").disabled = True
