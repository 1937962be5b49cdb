"""What the study page shows from files: the images and prompt sent to the model (the same
bytes and manifest as ``ainode preview``), the SR as a tree, the summary image, and the patient
header (for logged-in users only).

The images are made again from the version's fixed instance set exactly as the worker made them
(the same selection, windowing, mosaics and encoder, within the same provider's limits), so their
SHA-256 are the ones the model received. That takes a second or two for a large study: the last
few are kept in memory, and the page loads them after itself.
"""

from __future__ import annotations

import io
import logging
import threading
from collections import OrderedDict
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from pydicom import dcmread
from pydicom.dataset import Dataset
from pydicom.errors import InvalidDicomError
from sqlalchemy import select
from sqlalchemy.orm import Session

from conf import Settings
from storage.models import Job, JobKind

CACHE_SIZE = 8
log = logging.getLogger("ainode.http")


@dataclass(frozen=True)
class SentImage:
    data: bytes
    media_type: str
    entry: dict[str, Any]  # its manifest entry (file, sha256, size, tiles ...)


@dataclass(frozen=True)
class SentSet:
    version: int
    provider: str
    images: list[SentImage]
    prompt: str
    manifest: dict[str, Any]


class SentImages:
    """The request a study version's model call carried, made again and kept for a while."""

    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        self._cache: OrderedDict[tuple[str, int], SentSet] = OrderedDict()
        self._lock = threading.Lock()

    def get(self, session: Session, study_instance_uid: str, version: int) -> SentSet | None:
        key = (study_instance_uid, version)
        with self._lock:
            if key in self._cache:
                self._cache.move_to_end(key)
                return self._cache[key]
        made = self._make(session, study_instance_uid, version)
        if made is not None:
            with self._lock:
                self._cache[key] = made
                while len(self._cache) > CACHE_SIZE:
                    self._cache.popitem(last=False)
        return made

    def _make(self, session: Session, study_instance_uid: str, version: int) -> SentSet | None:
        from analysis.prepare import for_provider, prepare_study
        from conf.providers import preset_for
        from storage.studies import instance_set

        fixed = instance_set(session, study_instance_uid, version)
        if fixed is None:
            return None
        route_name = session.scalar(
            select(Job.route).where(
                Job.kind == JobKind.ANALYSE,
                Job.study_instance_uid == study_instance_uid,
                Job.study_version == version,
            )
        )
        route = next((r for r in self.settings.routes if r.name == route_name), None)
        provider = (route.provider if route is not None else None) or self.settings.vision.provider
        imaging = for_provider(self.settings.imaging, preset_for(provider))
        prepared = prepare_study(session, study_instance_uid, self.settings.storage.root, imaging, only=fixed)
        manifest = prepared.manifest()
        prompt = prepared.prompt + (f"\n\n{route.instructions}" if route and route.instructions else "")
        images = [
            SentImage(data.data, data.media_type, entry)
            for data, entry in zip(prepared.encoded, manifest["images"], strict=True)
        ]
        return SentSet(version, provider, images, prompt, manifest)


@dataclass(frozen=True)
class SrNode:
    relationship: str
    value_type: str
    name: str
    value: str
    children: list[SrNode]


def _code(item: Dataset | None) -> str:
    if item is None:
        return ""
    return str(getattr(item, "CodeMeaning", "") or getattr(item, "CodeValue", ""))


def _value(item: Dataset) -> str:
    kind = str(getattr(item, "ValueType", ""))
    if kind == "TEXT":
        return str(getattr(item, "TextValue", ""))
    if kind == "CODE":
        return _code(item.ConceptCodeSequence[0]) if "ConceptCodeSequence" in item else ""
    if kind == "NUM" and "MeasuredValueSequence" in item and item.MeasuredValueSequence:
        measured = item.MeasuredValueSequence[0]
        unit = (
            _code(measured.MeasurementUnitsCodeSequence[0])
            if "MeasurementUnitsCodeSequence" in measured
            else ""
        )
        return f"{measured.NumericValue} {unit}".strip()
    if kind in ("UIDREF",):
        return str(getattr(item, "UID", ""))
    if kind in ("DATETIME", "DATE", "TIME"):
        return str(getattr(item, kind.title().replace("time", "Time"), "") or getattr(item, "DateTime", ""))
    if kind == "IMAGE" and "ReferencedSOPSequence" in item:
        return f"image {item.ReferencedSOPSequence[0].ReferencedSOPInstanceUID}"
    if kind in ("SCOORD", "SCOORD3D"):
        points = list(getattr(item, "GraphicData", []))
        return f"{getattr(item, 'GraphicType', '')} of {len(points) // 2} points"
    if kind == "PNAME":
        return str(getattr(item, "PersonName", ""))
    return ""


def _tree(items: Any) -> list[SrNode]:
    nodes = []
    for item in items or []:
        name = _code(item.ConceptNameCodeSequence[0]) if "ConceptNameCodeSequence" in item else ""
        nodes.append(
            SrNode(
                str(getattr(item, "RelationshipType", "")),
                str(getattr(item, "ValueType", "")),
                name,
                _value(item),
                _tree(getattr(item, "ContentSequence", None)),
            )
        )
    return nodes


def sr_tree(path: Path) -> SrNode | None:
    """The SR's content as a tree of (relationship, value type, concept name, value); None when
    the file is gone or no readable DICOM."""
    try:
        sr = dcmread(path)
    except (OSError, InvalidDicomError) as exc:
        log.warning("SR %s cannot be shown: %s", path.name, type(exc).__name__)
        return None
    title = _code(sr.ConceptNameCodeSequence[0]) if "ConceptNameCodeSequence" in sr else "SR"
    return SrNode("", "CONTAINER", title, "", _tree(getattr(sr, "ContentSequence", None)))


def newest_file(
    root: Path, folder: str, study_instance_uid: str, sop_instance_uid: str | None = None
) -> Path | None:
    """A file the node made for a study (``sr`` or ``summary``), named after its SOP Instance UID."""
    if not _folder_name(study_instance_uid) or (sop_instance_uid and not _folder_name(sop_instance_uid)):
        return None  # "..": a URL naming the folder above (GET /studies/../summary.png)
    pattern = f"{sop_instance_uid}.*.dcm" if sop_instance_uid else "*.dcm"
    found = []
    for path in (root / folder / study_instance_uid).glob(pattern):
        try:
            found.append((path.stat().st_mtime, path))
        except OSError:
            continue  # removed meanwhile (retention)
    return max(found)[1] if found else None


def _folder_name(uid: str) -> bool:
    return uid not in ("", ".", "..") and not any(c in uid for c in "/\\\0")


def summary_png(path: Path) -> bytes | None:
    """The Secondary Capture summary's pixels as PNG (it is RGB, 8 bits); None when the file is
    gone or no readable image (cut short, by another program)."""
    from PIL import Image

    try:
        image = Image.fromarray(dcmread(path).pixel_array)
    except (OSError, InvalidDicomError, AttributeError, ValueError, TypeError, NotImplementedError) as exc:
        log.warning("summary image %s cannot be shown: %s", path.name, type(exc).__name__)
        return None
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return buffer.getvalue()


def patient_header(path: Path) -> dict[str, str]:
    """Name, ID, birth date, accession and study description from one stored instance's header
    (shown to logged-in users only; never logged)."""
    header = dcmread(
        path,
        stop_before_pixels=True,
        specific_tags=[
            "PatientName",
            "PatientID",
            "PatientBirthDate",
            "AccessionNumber",
            "StudyDescription",
            "StudyDate",
        ],
    )
    return {
        "Patient name": str(getattr(header, "PatientName", "") or ""),
        "Patient ID": str(getattr(header, "PatientID", "") or ""),
        "Birth date": str(getattr(header, "PatientBirthDate", "") or ""),
        "Accession": str(getattr(header, "AccessionNumber", "") or ""),
        "Study date": str(getattr(header, "StudyDate", "") or ""),
        "Description": str(getattr(header, "StudyDescription", "") or ""),
    }
