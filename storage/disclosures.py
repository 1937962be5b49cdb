"""The audit trail of what left the hospital (issue 13): one JSON line per request to a vision
API, appended and fsynced to ``{storage.root}/audit/disclosures.jsonl`` *before* the request is
sent, so a crash after sending still leaves the record; the same facts go into the request's
``api_calls`` row once the call is recorded.

A line holds the study UID, the time, provider, endpoint host, model, the SHA-256 of each image
and of the prompt, and the SHA-256 and size of the whole request body: enough to prove, from
the bytes alone, what a vendor was sent. Never the key, never a patient identifier (the images
and prompt sent carry none; only their hashes are kept here).

A request recorded here that in the end never left (its connection was refused or timed out
before a byte of it was written) gets a follow-up line ``{"not_sent": true, "reason": ...,
"noted_at": ..., "request_sha256": ..., "sent_at": ..., "study_instance_uid": ...}``, naming the
record by its ``request_sha256`` and ``sent_at`` (a retry of the same body has the same hash), and
no ``api_calls`` disclosure. A crash between the two leaves the record alone: the log may
over-state what left, never under-state it."""

from __future__ import annotations

import datetime as dt
import fcntl
import hashlib
import json
import os
import threading
from dataclasses import asdict, dataclass
from pathlib import Path

AUDIT_FOLDER = "audit"
DISCLOSURES_FILE = "disclosures.jsonl"


class DisclosureNotRecorded(OSError):
    """The audit line could not be written durably: the request must not be sent."""


@dataclass(frozen=True)
class Disclosure:
    study_instance_uid: str
    sent_at: dt.datetime
    provider: str
    endpoint_host: str
    model: str
    image_sha256: tuple[str, ...]
    prompt_sha256: str
    request_sha256: str
    request_bytes: int

    @classmethod
    def of(
        cls,
        study_instance_uid: str,
        provider: str,
        endpoint_host: str,
        model: str,
        images: list[bytes],
        prompt: str,
        body: bytes,
        sent_at: dt.datetime | None = None,
    ) -> Disclosure:
        return cls(
            study_instance_uid,
            sent_at or dt.datetime.now(dt.UTC),
            provider,
            endpoint_host,
            model,
            tuple(hashlib.sha256(image).hexdigest() for image in images),
            hashlib.sha256(prompt.encode("utf-8")).hexdigest(),
            hashlib.sha256(body).hexdigest(),
            len(body),
        )

    def as_json(self) -> str:
        record = asdict(self)
        record["sent_at"] = self.sent_at.isoformat(timespec="milliseconds")
        record["image_sha256"] = list(self.image_sha256)
        return json.dumps(record, separators=(",", ":"), sort_keys=True)


class DisclosureLog:
    """Appends each disclosure as one line and fsyncs it; thread-safe, and safe across
    processes (O_APPEND writes of one line each, under an exclusive flock)."""

    def __init__(self, root: Path) -> None:
        self.path = root / AUDIT_FOLDER / DISCLOSURES_FILE
        self._lock = threading.Lock()

    def append(self, disclosure: Disclosure) -> None:
        self._append_line(disclosure.as_json())

    def append_not_sent(
        self, disclosure: Disclosure, reason: str, noted_at: dt.datetime | None = None
    ) -> None:
        """The follow-up of ``disclosure``'s line: that request never left (``reason``)."""
        record = {
            "not_sent": True,
            "reason": reason,
            "noted_at": (noted_at or dt.datetime.now(dt.UTC)).isoformat(timespec="milliseconds"),
            "request_sha256": disclosure.request_sha256,
            "sent_at": disclosure.sent_at.isoformat(timespec="milliseconds"),
            "study_instance_uid": disclosure.study_instance_uid,
        }
        self._append_line(json.dumps(record, separators=(",", ":"), sort_keys=True))

    def _append_line(self, text: str) -> None:
        line = (text + "\n").encode("utf-8")
        try:
            with self._lock:
                self.path.parent.mkdir(parents=True, exist_ok=True)
                fd = os.open(self.path, os.O_RDWR | os.O_APPEND | os.O_CREAT, 0o640)
                try:
                    # One writer at a time across processes (a node's serve and worker), and a
                    # record never glued to the fragment a full disk left of the one before
                    # (a short write: that request was not sent).
                    fcntl.flock(fd, fcntl.LOCK_EX)
                    size = os.fstat(fd).st_size
                    if size and os.pread(fd, 1, size - 1) != b"\n":
                        line = b"\n" + line
                    written = os.write(fd, line)
                    if written != len(line):
                        raise OSError(f"short write to {self.path}: {written} of {len(line)} bytes")
                    os.fsync(fd)
                finally:
                    os.close(fd)
        except OSError as exc:
            raise DisclosureNotRecorded(
                f"cannot record the disclosure in {self.path} ({exc.strerror or exc}); not sending"
            ) from exc
