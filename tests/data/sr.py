"""A stand-in for the worker's last step, for delivery tests: findings (from the simulator's
answer) to an SR file in the node's storage and queued for every destination, in one
transaction, exactly as the worker will do it."""

from __future__ import annotations

from pathlib import Path

from pydicom import dcmread
from pydicom.dataset import Dataset
from pydicom.filebase import DicomBytesIO

from analysis.findings import Findings
from analysis.prepare import prepare_study
from analysis.prompt import PROMPT_VERSION
from analysis.report import ReportContext, build_sr
from analysis.uids import UidMaker
from analysis.vision.simulator import simulated_findings
from conf import ImagingSettings
from storage import outbox
from storage.db import open_database, transaction
from storage.files import InstanceStore
from storage.models import utc_now
from storage.studies import installation_namespace


def complete_with_simulated_findings(
    database_url: str, root: Path, study: str, destinations: list[str]
) -> str:
    """Returns the SR's SOP Instance UID."""
    with open_database(database_url) as sessions:
        with sessions() as session:
            prepared = prepare_study(session, study, root, ImagingSettings())
            sources: dict[str, Dataset] = {}
            for uid in prepared.shown_instances:  # a region may land on any slice of a slab
                path = next(p for p in (root / "instances" / study).rglob(f"{uid}.*.dcm"))
                sources[uid] = dcmread(path, stop_before_pixels=True)
            namespace = installation_namespace(session)  # the node's own, as the worker reads it
        findings = Findings.model_validate(simulated_findings(images=len(prepared.encoded)))
        context = ReportContext(
            study,
            1,
            "simulator",
            "ainode-simulated-vision",
            PROMPT_VERSION,
            utc_now(),
            UidMaker(namespace),
            simulated=True,
        )
        sr = build_sr(findings, prepared.composed, sources, context)
        buffer = DicomBytesIO()
        sr.save_as(buffer, enforce_file_format=True)
        relative = f"sr/{study}/{sr.SOPInstanceUID}.dcm"
        InstanceStore(root).write_atomically(relative, buffer.getvalue())
        with transaction(sessions) as session:
            outbox.enqueue(session, study, 1, relative, str(sr.SOPInstanceUID), destinations, utc_now())
        return str(sr.SOPInstanceUID)
