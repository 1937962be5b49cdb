"""Named crash points for the crash tests (DESIGN.md §10, "crash at named points").

``AINODE_CRASH_AT=name[,name...]`` makes the process exit at once, with no cleanup, when it
reaches one of those points: ``os._exit`` skips every ``finally``, flush and commit, as a crash
does (the page cache survives it, so this proves ordering and recovery, not fsync). Read once at
import; with the variable unset every point is one lookup in an empty set.
"""

from __future__ import annotations

import os

CRASH_EXIT_CODE = 86
POINTS = frozenset(
    {
        "ingest.after_rename",  # the instance file is in place, its row not committed
        "ingest.after_commit",  # the row is committed, the C-STORE response not sent
        "analysis.after_model_reply",  # the model answered; nothing of it committed
        "analysis.after_findings_commit",  # the calls and findings are committed; no SR yet
        "analysis.after_sr_write",  # the SR file is written; the outbox not committed
        "analysis.after_outbox_commit",  # the SR is queued for delivery
        "delivery.mid_send",  # the PACS stored the SR; the delivery not marked sent
    }
)
ARMED = frozenset(name.strip() for name in os.environ.get("AINODE_CRASH_AT", "").split(",") if name.strip())


def unknown() -> list[str]:
    """Armed names that are no crash point (a typo would make a crash test pass vacuously)."""
    return sorted(ARMED - POINTS)


def reached(point: str) -> None:
    if point in ARMED:
        os.write(2, f"ainode: crash point {point} reached; exiting now\n".encode())
        os._exit(CRASH_EXIT_CODE)
