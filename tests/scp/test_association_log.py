"""The called AE title is checked, and every association is in the ATNA-style event stream
(scp/association_log.py), over real associations: DCMTK's echoscu and a pynetdicom SCU."""

from __future__ import annotations

import json
import subprocess
import time
from pathlib import Path

from pydicom import dcmread
from pynetdicom import AE
from pynetdicom.sop_class import CTImageStorage  # type: ignore[attr-defined]

from scp.server import StorageSCP
from tests.data.generate import CT_SMALL, write_series
from tests.nodes import DCMTK, DCMTK_ENV


def _events(scp: StorageSCP, count: int) -> list[dict[str, object]]:
    deadline = time.monotonic() + 5
    lines: list[dict[str, object]] = []
    while time.monotonic() < deadline:
        if scp.associations.path.exists():
            lines = [json.loads(line) for line in scp.associations.path.read_text().splitlines()]
            if len(lines) >= count:
                break
        time.sleep(0.05)
    return lines


def _echo(port: int, called: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [str(DCMTK / "echoscu"), "-aet", "CT01", "-aec", called, "127.0.0.1", str(port)],
        env=DCMTK_ENV,
        capture_output=True,
        text=True,
        timeout=30,
        check=False,
    )


def test_a_caller_addressing_another_ae_title_is_rejected_and_logged(scp: StorageSCP) -> None:
    assert _echo(scp.port, "SOMEPACS").returncode != 0
    (rejected,) = _events(scp, 1)
    assert rejected["event"] == "association-rejected" and rejected["outcome"] == "rejected"
    assert (rejected["calling_ae"], rejected["called_ae"]) == ("CT01", "SOMEPACS")
    assert rejected["peer_address"] == "127.0.0.1"
    assert _echo(scp.port, "AINODE").returncode == 0


def test_an_association_is_logged_from_acceptance_to_its_end_with_what_it_stored(
    scp: StorageSCP, tmp_path: Path
) -> None:
    files = write_series(tmp_path / "ct", 2, source=CT_SMALL)
    ae = AE(ae_title="MR02")
    ae.add_requested_context(CTImageStorage)
    assoc = ae.associate("127.0.0.1", scp.port, ae_title="AINODE")
    assert assoc.is_established
    for path in files:
        assert assoc.send_c_store(dcmread(path)).Status == 0x0000
    assoc.release()
    accepted, ended = _events(scp, 2)
    assert accepted["event"] == "association-accepted" and accepted["calling_ae"] == "MR02"
    assert ended["event"] == "association-ended"
    assert (ended["outcome"], ended["instances_stored"]) == ("released", 2)
    assert ended["peer_port"] == accepted["peer_port"]
    text = scp.associations.path.read_text()
    patient = str(dcmread(files[0], stop_before_pixels=True).PatientName)
    assert patient and patient not in text  # AE titles and addresses, never who the patient is
