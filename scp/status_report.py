"""``ainode status``: the studies the node holds, as a table or as JSON (DESIGN.md §3)."""

from __future__ import annotations

from typing import Any

from storage.overview import study_rows

__all__ = ["format_table", "study_rows"]


def _problem(row: dict[str, Any]) -> str | None:
    """The study's own error, else the newest delivery error (a PACS that refuses or is down)."""
    if row["last_error"]:
        return str(row["last_error"])
    failing = [d for d in row["deliveries"] if d["last_error"]]
    if failing:
        newest = failing[-1]
        return f"{newest['destination']}: {newest['last_error']} (attempt {newest['attempts']})"
    return None


def format_table(rows: list[dict[str, Any]]) -> str:
    rows = [{**row, "problem": _problem(row)} for row in rows]
    columns = [
        ("study_instance_uid", "STUDY"),
        ("state", "STATE"),
        ("instance_count", "INST"),
        ("series_count", "SER"),
        ("calling_ae_title", "FROM"),
        ("last_received_at", "LAST RECEIVED"),
        ("attempts", "TRIES"),
        ("problem", "LAST ERROR"),
    ]
    table = [[h for _, h in columns]]
    table += [["" if r[k] is None else str(r[k]) for k, _ in columns] for r in rows]
    widths = [max(len(line[i]) for line in table) for i in range(len(columns))]
    return "\n".join(
        "  ".join(c.ljust(w) for c, w in zip(line, widths, strict=True)).rstrip() for line in table
    )
