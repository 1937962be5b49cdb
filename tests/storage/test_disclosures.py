"""The audit log of disclosures stays one JSON object per line, whatever a full disk does."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest

from storage.disclosures import Disclosure, DisclosureLog, DisclosureNotRecorded


def _disclosure(study: str) -> Disclosure:
    return Disclosure.of(study, "openai", "api.openai.com", "gpt-4.1", [b"image"], "prompt", b"{}")


def test_a_short_write_on_a_full_disk_never_glues_the_next_record_to_a_fragment(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """ENOSPC part-way: write(2) keeps what fitted and returns a short count. That request is
    not sent; once there is room again, the next record is still a line of its own."""
    log = DisclosureLog(tmp_path)
    log.append(_disclosure("1.2.3.1"))
    real_write = os.write

    def half(fd: int, data: bytes) -> int:
        return real_write(fd, data[: len(data) // 2])

    monkeypatch.setattr(os, "write", half)
    with pytest.raises(DisclosureNotRecorded):
        log.append(_disclosure("1.2.3.2"))
    monkeypatch.setattr(os, "write", real_write)
    log.append(_disclosure("1.2.3.3"))
    lines = log.path.read_text().splitlines()
    readable = []
    for line in lines:
        try:
            readable.append(json.loads(line)["study_instance_uid"])
        except json.JSONDecodeError:
            continue  # the fragment of the request that was never sent
    assert readable == ["1.2.3.1", "1.2.3.3"]
    assert log.path.stat().st_mode & 0o777 == 0o640
