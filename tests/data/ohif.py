"""A TID 1500 SR read the way OHIF 3.13.2 reads it, without a browser.

Mirrors, for the parts that decide what a radiologist sees, the built viewer of
``npm pack @ohif/app@3.13.2`` (``benchmarks/ohif_view.py`` shows the real thing):

- ``extensions/cornerstone-dicom-sr/src/getSopClassHandlerModule.ts``: ``_getMeasurements`` (one
  measurement per Tracking UID), ``_processTID1410Measurement`` (a group with a SCOORD at its top:
  labels are its NUMs and a SNOMED "Finding Site") and ``_processNonGeometricallyDefinedMeasurement``
  (otherwise: Comment TEXTs, a Finding or Finding Site coded CORNERSTONEFREETEXT, then NUMs, whose
  INFERRED FROM SCOORDs are the coordinates); ``_checkIfCanAddMeasurementsToDisplaySet`` reads
  ``measurement.coords[0]`` of every measurement, so one without coordinates throws and the SR
  viewport stays black.
- ``extensions/cornerstone-dicom-sr/src/utils/isRehydratable.ts`` and
  ``@cornerstonejs/adapters`` ``Cornerstone3D/MeasurementReport``: tracking is offered when a
  Cornerstone adapter claims a group by its Tracking Identifier or its graphic; hydration then
  rebuilds, through the RectangleROI adapter, only a group whose first NUM has the SCOORD (or that
  has no NUM and the SCOORD at its top), labelled with its first Comment.

Each label line is what OHIF prints beside the region: ``f"{label}: {value}"``.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from pydicom.dataset import Dataset

CORNERSTONE_TAG = "Cornerstone3DTools@^0.1.0"
# Tools OHIF 3.13's measurement service maps (Cornerstone3DTools source); a Tracking Identifier
# starting with "<tag>:<tool>" is claimed by that tool's adapter.
MAPPED_TOOLS = (
    "Length",
    "Bidirectional",
    "EllipticalROI",
    "CircleROI",
    "ArrowAnnotate",
    "Angle",
    "CobbAngle",
    "RectangleROI",
    "PlanarFreehandROI",
    "Probe",
    "UltrasoundDirectionalTool",
)
# Adapters claimed by their graphic ("DCM:111030" is Image Region, TID 1410's SCOORD)
GRAPHIC_ADAPTERS = {
    ("DCM:111030", "POLYLINE", 4): "RectangleROI",
    ("DCM:111030", "POLYLINE", 5): "RectangleROI",
    ("DCM:111030", "POINT", 1): "Probe",
    ("DCM:111030", "POINT", 2): "Probe",
}
FREE_TEXT = "CORNERSTONEFREETEXT"
FREE_TEXT_SCHEMES = ("CORNERSTONEJS", "CST4")


@dataclass
class OhifMeasurement:
    tracking_identifier: str
    labels: list[str] = field(default_factory=list)
    coords: list[Dataset] = field(default_factory=list)
    graphic: tuple[str, str, int] | None = None  # TID 1410 groups only, as OHIF keys adapters
    group: Dataset = field(default_factory=Dataset)

    @property
    def breaks_the_viewer(self) -> bool:
        """OHIF reads ``coords[0]`` of every measurement: none throws, the SR shows nothing."""
        return not self.coords

    def adapter(self) -> str | None:
        """The Cornerstone tool that claims this group, if any (tracking is offered for it)."""
        for tool in MAPPED_TOOLS:
            if self.tracking_identifier.startswith(f"{CORNERSTONE_TAG}:{tool}"):
                return tool
        if self.graphic is not None:
            return GRAPHIC_ADAPTERS.get(self.graphic)
        return None

    def rebuilt_label(self) -> str | None:
        """The label of the RectangleROI the region becomes when the radiologist accepts
        tracking; None when the adapter rebuilds nothing (the overlay would vanish)."""
        if self.adapter() != "RectangleROI":
            return None
        children = list(self.group.ContentSequence)
        nums = [c for c in children if c.ValueType == "NUM"]
        holder = list(nums[0].get("ContentSequence", [])) if nums else children
        scoords = [c for c in holder if c.ValueType == "SCOORD" and c.GraphicType == "POLYLINE"]
        if not scoords or len(scoords[0].GraphicData) // 2 not in (4, 5):
            return None
        comments = [c for c in children if _named(c, "DCM", "121106")]
        if comments:
            return str(comments[0].TextValue)
        for item in children:  # a CORNERSTONEFREETEXT Finding Site, then Finding
            if _named(item, "SCT", "363698007") and _free_text(item):
                return str(item.ConceptCodeSequence[0].CodeMeaning)
        for item in children:
            if _valued(item, "121071") and _free_text(item):
                return str(item.ConceptCodeSequence[0].CodeMeaning)
        return None


def _valued(item: Dataset, value: str) -> bool:
    """OHIF finds most items by Code Value alone."""
    name = item.get("ConceptNameCodeSequence")
    return bool(name) and name[0].CodeValue == value


def _named(item: Dataset, scheme: str, value: str) -> bool:
    name = item.get("ConceptNameCodeSequence")
    return bool(name) and (name[0].CodingSchemeDesignator, name[0].CodeValue) == (scheme, value)


def _free_text(item: Dataset) -> bool:
    code = item.get("ConceptCodeSequence")
    return (
        bool(code) and code[0].CodingSchemeDesignator in FREE_TEXT_SCHEMES and code[0].CodeValue == FREE_TEXT
    )


def _num_label(item: Dataset) -> str:
    value = item.MeasuredValueSequence[0]
    number = f"{float(value.NumericValue):.2f}" if float(value.NumericValue) else ""
    unit = value.MeasurementUnitsCodeSequence[0].CodeValue
    return f"{item.ConceptNameCodeSequence[0].CodeMeaning}: {number} {unit}"


def ohif_measurements(sr: Dataset) -> list[OhifMeasurement]:
    """The measurements OHIF 3.13.2 makes of ``sr``, with the label lines it prints."""
    containers = [c for c in sr.ContentSequence if _valued(c, "126010")]
    if not containers:
        return []
    groups = [g for g in containers[0].ContentSequence if _valued(g, "125007")]
    measurements = []
    for group in groups:
        children = list(group.ContentSequence)
        identifier = next((str(c.TextValue) for c in children if _valued(c, "112039")), "")
        top = [c for c in children if c.ValueType in ("SCOORD", "SCOORD3D")]
        measurement = OhifMeasurement(identifier, group=group)
        nums = [c for c in children if c.ValueType == "NUM"]
        if top:  # _processTID1410Measurement
            graphic = top[0]
            name = graphic.ConceptNameCodeSequence[0]
            points = len(graphic.GraphicData) // (3 if graphic.ValueType == "SCOORD3D" else 2)
            measurement.coords = [graphic]
            measurement.graphic = (
                f"{name.CodingSchemeDesignator}:{name.CodeValue}",
                graphic.GraphicType,
                points,
            )
            measurement.labels = [
                _num_label(n) for n in nums if "MeasuredValueSequence" in n and n.MeasuredValueSequence
            ]
            sites = [c for c in children if _named(c, "SCT", "363698007")]
            if sites:
                measurement.labels.append(f"363698007: {sites[0].ConceptCodeSequence[0].CodeMeaning}")
        else:  # _processNonGeometricallyDefinedMeasurement
            measurement.labels = [f"{c.TextValue}: " for c in children if _named(c, "DCM", "121106")]
            finding = next((c for c in children if _valued(c, "121071")), None)
            if finding is not None and _free_text(finding):
                measurement.labels.append(f"{FREE_TEXT}: {finding.ConceptCodeSequence[0].CodeMeaning}")
            site = next((c for c in children if _named(c, "SRT", "G-C0E3") and _free_text(c)), None)
            if site is not None:
                measurement.labels.append(f"{FREE_TEXT}: {site.ConceptCodeSequence[0].CodeMeaning}")
            for num in nums:
                scoords = [c for c in num.get("ContentSequence", []) if c.ValueType in ("SCOORD", "SCOORD3D")]
                measurement.coords += scoords[:1]
                if num.get("MeasuredValueSequence"):
                    measurement.labels.append(_num_label(num))
        measurements.append(measurement)
    return measurements


def tracking_offered(measurements: list[OhifMeasurement]) -> bool:
    """OHIF asks "continue tracking measurements?" when any group is claimed by an adapter; the
    SR is badged "not compatible with this application" otherwise."""
    return any(m.adapter() is not None for m in measurements)
