"""The three SR checkers every SR we make must pass: dciodvfy, DCMTK dsrdump, PixelMed."""

from __future__ import annotations

import subprocess
from pathlib import Path

from pydicom import dcmread
from pydicom.dataset import Dataset

PIXELMED = [
    "java",
    "-Djdk.xml.xpathExprGrpLimit=0",
    "-Djdk.xml.xpathExprOpLimit=0",
    "-Djdk.xml.xpathTotalOpLimit=0",
    "-cp",
    "/usr/share/java/pixelmed.jar",
    "com.pixelmed.validate.DicomSRValidator",
]


def sr_errors(path: Path) -> list[str]:
    """Every error line the three validators print for ``path`` (warnings are not errors)."""
    errors: list[str] = []
    dciodvfy = subprocess.run(
        ["dciodvfy", str(path)], capture_output=True, text=True, errors="replace", timeout=120
    )
    errors += [
        f"dciodvfy: {line}"
        for line in (dciodvfy.stdout + dciodvfy.stderr).splitlines()
        if line.startswith("Error")
    ]
    dsrdump = subprocess.run(
        ["dsrdump", str(path)], capture_output=True, text=True, errors="replace", timeout=120
    )
    if dsrdump.returncode != 0:
        errors.append(f"dsrdump: exit {dsrdump.returncode}")
    errors += [
        f"dsrdump: {line}"
        for line in (dsrdump.stdout + dsrdump.stderr).splitlines()
        if line.startswith(("E:", "F:"))
    ]
    pixelmed = subprocess.run(
        [*PIXELMED, str(path)], capture_output=True, text=True, errors="replace", timeout=300
    )
    output = pixelmed.stdout + pixelmed.stderr
    if "IOD validation complete" not in output:
        errors.append(f"pixelmed: did not complete: {output[-500:]}")
    errors += [f"pixelmed: {line}" for line in output.splitlines() if "Error" in line]
    return errors


def saved_and_valid(document: Dataset, path: Path) -> Dataset:
    """``document`` written as a Part 10 file at ``path``, passed by the three validators, and
    read back from the file."""
    document.save_as(path, enforce_file_format=True)
    errors = sr_errors(path)
    assert errors == [], errors
    return dcmread(path)
