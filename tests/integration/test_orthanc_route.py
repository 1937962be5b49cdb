"""conf/orthanc/autoroute.lua in a real Orthanc: a stable study's images go to ainode once. The
SR ainode stores back makes the study unstable and then stable again; the route must not send
the study a second time. Counted at the receiving end (a pynetdicom SCP standing in for ainode),
since Orthanc and ainode both deduplicate by SOP Instance UID."""

from __future__ import annotations

import json
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import httpx
from pydicom import dcmread
from pydicom.uid import generate_uid
from pynetdicom import AE, StoragePresentationContexts, evt
from pynetdicom.sop_class import Comprehensive3DSRStorage  # type: ignore[attr-defined]

from tests.data.generate import write_series
from tests.nodes import free_port, orthanc

ROOT = Path(__file__).parents[2]


@contextmanager
def counting_receiver() -> Iterator[tuple[int, list[str]]]:
    """A pynetdicom SCP for every storage SOP class that records each C-STORE it is sent."""
    received: list[str] = []

    def handle(event: evt.Event) -> int:
        received.append(str(getattr(event.request, "AffectedSOPInstanceUID", "")))
        return 0x0000

    ae = AE(ae_title="AINODE")
    ae.supported_contexts = StoragePresentationContexts
    port = free_port()
    server = ae.start_server(("127.0.0.1", port), block=False, evt_handlers=[(evt.EVT_C_STORE, handle)])
    if server is None:
        raise RuntimeError("pynetdicom did not start the receiver")
    try:
        yield port, received
    finally:
        server.shutdown()


def _sr_in_study(tmp_path: Path, study: str) -> Path:
    """A stand-in for the SR ainode stores back: same study, Modality SR, no pixels."""
    (source,) = write_series(tmp_path / "sr", 1, study_instance_uid=study)
    ds = dcmread(source)
    del ds.PixelData
    ds.Modality = "SR"
    ds.SOPClassUID = ds.file_meta.MediaStorageSOPClassUID = Comprehensive3DSRStorage
    ds.SeriesInstanceUID = generate_uid()
    ds.save_as(source)
    return source


def _wait_for(count: int, received: list[str], timeout: float = 30) -> None:
    deadline = time.monotonic() + timeout
    while len(received) < count and time.monotonic() < deadline:
        time.sleep(0.2)


def test_a_stable_study_is_routed_once_even_after_the_sr_comes_back(tmp_path: Path) -> None:
    study = generate_uid()
    images = write_series(tmp_path / "ct", 5, study_instance_uid=study)
    shipped = json.loads((ROOT / "conf" / "orthanc" / "orthanc.json").read_text())
    with (
        counting_receiver() as (port, received),
        orthanc(
            tmp_path,
            modalities={"ainode": ["AINODE", "127.0.0.1", port]},
            LuaScripts=[str(ROOT / "conf" / "orthanc" / "autoroute.lua")],
            UserMetadata=shipped["UserMetadata"],
            StableAge=1,
        ) as ports,
        httpx.Client(base_url=f"http://127.0.0.1:{ports['http_port']}", timeout=30) as client,
    ):
        for path in images:
            client.post("/instances", content=path.read_bytes()).raise_for_status()
        _wait_for(5, received)
        assert len(received) == 5
        # ainode's SR arrives in the same study: unstable, then stable again.
        client.post("/instances", content=_sr_in_study(tmp_path, study).read_bytes()).raise_for_status()
        late = write_series(tmp_path / "late", 1, study_instance_uid=study)  # and a late image
        client.post("/instances", content=late[0].read_bytes()).raise_for_status()
        _wait_for(6, received)
        time.sleep(3)  # past StableAge twice: a second routing of the study would show now
    assert len(received) == 6 and len(set(received)) == 6  # each image once, the late one too
