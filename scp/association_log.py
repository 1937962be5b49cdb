"""Who connected, as an IHE ATNA-style event stream: one JSON line per association event in
``{storage.root}/audit/associations.jsonl`` (beside the disclosures log): accepted, rejected (and
why), ended (released, aborted or closed, with the instances it stored). AE titles, addresses and
counts only: never a patient identifier. Each line is one ``write`` to a file opened for append,
so the receiving processes can share the file; a line that cannot be written is logged, and the
association goes on (this trail is for the operator, not a condition of storing)."""

from __future__ import annotations

import datetime as dt
import json
import logging
import os
import threading
from pathlib import Path

from storage.disclosures import AUDIT_FOLDER

ASSOCIATIONS_FILE = "associations.jsonl"
log = logging.getLogger("ainode.scp")


class AssociationLog:
    def __init__(self, root: Path) -> None:
        self.path = root / AUDIT_FOLDER / ASSOCIATIONS_FILE
        self._lock = threading.Lock()
        self._warned = False

    def write(self, event: str, **fields: object) -> None:
        line = {"event": event, "at": dt.datetime.now(dt.UTC).isoformat(), "pid": os.getpid(), **fields}
        data = (json.dumps(line, sort_keys=True, default=str) + "\n").encode()
        try:
            with self._lock:
                self.path.parent.mkdir(parents=True, exist_ok=True)
                fd = os.open(self.path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o640)
                try:
                    os.write(fd, data)
                finally:
                    os.close(fd)
        except OSError as exc:
            if not self._warned:  # once: a full disk must not flood the log
                self._warned = True
                log.warning("cannot write the association log %s: %s", self.path, exc.strerror)
