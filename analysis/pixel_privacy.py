"""Pixels that may carry burned-in patient text (issue 13).

An image whose header says ``BurnedInAnnotation`` YES is never sent (unless configured). One
whose header does not say NO, of a modality where text is commonly burned in (ultrasound,
secondary capture, angiography, endoscopy, scanned documents, "other"), is treated as YES unless
``imaging.unlabelled_burned_in`` says otherwise for that modality:

* ``exclude`` (the default): not sent;
* ``mask``: sent with the text regions blacked out: the regions the maintained rule set of
  pydicom's ``deid`` (which carries RSNA CTP's DicomPixelAnonymizer rules, by manufacturer,
  model and image size) gives for this header, plus the fixed top band
  (``imaging.mask_top_fraction``) as the fallback for devices no rule knows; an image the rule
  set blacklists (scanned documents, report or demographic screens) is not sent;
* ``allow``: sent as it is (a site that knows its devices burn in nothing).
"""

from __future__ import annotations

import functools
import warnings
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, Literal

import numpy as np
from pydicom.dataset import Dataset

Policy = Literal["exclude", "mask", "allow"]
# Modalities (and SOP classes) whose images commonly carry burned-in text.
AT_RISK_MODALITIES = frozenset({"US", "SC", "XA", "RF", "ES", "OT", "DOC", "SM", "XC", "GM"})
SECONDARY_CAPTURE_PREFIX = "1.2.840.10008.5.1.4.1.1.7"


# Image storage SOP classes of those modalities (PS3.4 B.5): the SOP class says what the pixels
# are even when the header's Modality is missing or names something else.
_AT_RISK_SOP_CLASSES = {
    "1.2.840.10008.5.1.4.1.1.6.1": "US",  # Ultrasound Image
    "1.2.840.10008.5.1.4.1.1.6": "US",  # Ultrasound Image (retired)
    "1.2.840.10008.5.1.4.1.1.3.1": "US",  # Ultrasound Multi-frame Image
    "1.2.840.10008.5.1.4.1.1.3": "US",  # Ultrasound Multi-frame Image (retired)
    "1.2.840.10008.5.1.4.1.1.6.2": "US",  # Enhanced US Volume
    "1.2.840.10008.5.1.4.1.1.12.1": "XA",  # X-Ray Angiographic Image
    "1.2.840.10008.5.1.4.1.1.12.1.1": "XA",  # Enhanced XA Image
    "1.2.840.10008.5.1.4.1.1.12.2": "RF",  # X-Ray Radiofluoroscopic Image
    "1.2.840.10008.5.1.4.1.1.12.2.1": "RF",  # Enhanced XRF Image
    "1.2.840.10008.5.1.4.1.1.77.1.1": "ES",  # VL Endoscopic Image
    "1.2.840.10008.5.1.4.1.1.77.1.1.1": "ES",  # Video Endoscopic Image
    "1.2.840.10008.5.1.4.1.1.77.1.2": "GM",  # VL Microscopic Image
    "1.2.840.10008.5.1.4.1.1.77.1.2.1": "GM",  # Video Microscopic Image
    "1.2.840.10008.5.1.4.1.1.77.1.3": "SM",  # VL Slide-Coordinates Microscopic Image
    "1.2.840.10008.5.1.4.1.1.77.1.4": "XC",  # VL Photographic Image
    "1.2.840.10008.5.1.4.1.1.77.1.4.1": "XC",  # Video Photographic Image
    "1.2.840.10008.5.1.4.1.1.77.1.6": "SM",  # VL Whole Slide Microscopy Image
}


def is_secondary_capture(sop_class_uid: str) -> bool:
    return sop_class_uid.startswith(SECONDARY_CAPTURE_PREFIX)


def risk_modality(modality: str, sop_class_uid: str) -> str | None:
    """The at-risk modality whose policy applies to an image, or None when it seldom carries
    text: the header's Modality when it is one; else the one its SOP class implies (an
    ultrasound whose Modality is missing or says CT is still an ultrasound); SC for any secondary
    capture."""
    if modality.upper() in AT_RISK_MODALITIES:
        return modality.upper()
    if sop_class_uid in _AT_RISK_SOP_CLASSES:
        return _AT_RISK_SOP_CLASSES[sop_class_uid]
    return "SC" if is_secondary_capture(sop_class_uid) else None


def at_risk(modality: str, sop_class_uid: str) -> bool:
    return risk_modality(modality, sop_class_uid) is not None


def policy_for(
    modality: str, sop_class_uid: str, burned_in_annotation: str, policies: Mapping[str, Policy]
) -> Policy:
    """What to do with an image's pixels: ``allow`` when its header says NO or its modality
    seldom carries text; else the configured policy for its modality (:func:`risk_modality`),
    ``exclude`` when none is configured."""
    key = risk_modality(modality, sop_class_uid)
    if burned_in_annotation.upper() == "NO" or key is None:
        return "allow"
    return policies.get(key, "exclude")


@dataclass(frozen=True)
class MaskPlan:
    """Rectangles (x0, y0, x1, y1 in source pixels) to black out, regions to keep when the rule
    says only they are clean, or a reason the image must not be sent at all."""

    blank: tuple[tuple[int, int, int, int], ...] = ()
    keep_only: tuple[tuple[int, int, int, int], ...] = ()
    refused: str | None = None
    rule: str | None = None  # the deid rule that matched, for the manifest


@functools.cache
def _detector() -> Any:
    """deid's detector, imported once and only where an image is to be masked (it pulls in
    matplotlib: seconds of start-up nobody else should pay)."""
    with warnings.catch_warnings():
        # deid reaches for pydicom.pixel_data_handlers, deprecated in pydicom 3: its concern.
        warnings.simplefilter("ignore", DeprecationWarning)
        from deid.dicom.pixels.detect import has_burned_pixels  # type: ignore[import-untyped]

    return has_burned_pixels


def _rectangles(value: object) -> list[tuple[int, int, int, int]]:
    texts = value if isinstance(value, list) else [value]
    found = []
    for text in texts:
        try:
            x0, y0, x1, y1 = (int(float(part)) for part in str(text).split(","))
        except ValueError:
            continue
        found.append((x0, y0, x1, y1))
    return found


def mask_plan(header: Dataset) -> MaskPlan:
    """What deid's rule set says of this header (no pixels needed)."""
    detect = _detector()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)
        result = detect(header)
    blank: list[tuple[int, int, int, int]] = []
    keep: list[tuple[int, int, int, int]] = []
    rules: list[str] = []
    for item in result.get("results", []):
        reason = " ".join(str(item.get("reason", "")).split())
        if item.get("group") == "blacklist":
            return MaskPlan(refused=f"burned-in text rule set (deid) refuses it: {reason}", rule=reason)
        rules.append(reason)
        for coordinate in item.get("coordinates", []):
            kind, value = coordinate[0], coordinate[1]
            (keep if int(kind) == 1 else blank).extend(_rectangles(value))
    return MaskPlan(tuple(blank), tuple(keep), None, "; ".join(rules) or None)


def apply_mask(pixels: np.ndarray, plan: MaskPlan, top_fraction: float, scale: float = 1.0) -> np.ndarray:
    """``pixels`` (rows x columns [x channels]) with the plan's regions and the top band black.
    ``scale``: displayed pixels per source pixel, when the frame was resized."""
    masked = pixels.copy()
    rows, columns = masked.shape[:2]

    def box(rect: tuple[int, int, int, int]) -> tuple[slice, slice]:
        x0, y0, x1, y1 = (round(v * scale) for v in rect)
        return slice(max(0, y0), min(rows, y1)), slice(max(0, x0), min(columns, x1))

    if plan.keep_only:
        kept = np.zeros((rows, columns), dtype=bool)
        for rect in plan.keep_only:
            kept[box(rect)] = True
        masked[~kept] = 0
    for rect in plan.blank:
        masked[box(rect)] = 0
    if top_fraction > 0:
        masked[: int(rows * top_fraction + 0.5)] = 0
    return masked
