"""A settled study to the images, prompt and manifest a vision model gets (``ainode preview``
writes exactly these)."""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from pydicom import dcmread
from sqlalchemy import select
from sqlalchemy.orm import Session

from analysis.budget import Allocation, ImagePlan, VolumeRequest, allocate
from analysis.encode import EncodedImage, encode
from analysis.errors import ImageSkipped
from analysis.finding_codes import GENERAL_CODES, BodyRegion, CodeList, code_list, series_regions
from analysis.imaging import CT_PRESETS, DisplayFrame, render_file
from analysis.layout import choose_layout, needed_tile_px
from analysis.mosaic import CellImage, ComposedImage, SlabTile, compose_mosaic, compose_single, fit_to_cell
from analysis.pixel_privacy import (
    MaskPlan,
    apply_mask,
    at_risk,
    is_secondary_capture,
    mask_plan,
    policy_for,
    risk_modality,
)
from analysis.prompt import PROMPT_VERSION, build_prompt
from analysis.selection import (
    SOURCE_COLUMNS,
    ChosenFrame,
    Exclusion,
    ImageBudget,
    SeriesPlan,
    SourceImage,
    cine_grid,
    plan_study,
)
from analysis.slabs import Slab
from analysis.volume import SliceReader, render, stack
from analysis.windows import PROJECTION_WORDS, series_windows
from conf import ImagingSettings
from conf.providers import ProviderPreset
from storage.models import Instance


@dataclass
class PreparedStudy:
    study_instance_uid: str
    plans: list[ImagePlan]
    composed: list[ComposedImage]
    encoded: list[EncodedImage]
    prompt: str
    exclusions: list[Exclusion] = field(default_factory=list)
    slab_thickness_mm: float | None = None  # asked of every volume; each slab says its own
    image_tokens: int = 0  # by the provider's formula, all images together
    # The closed list of SNOMED CT codes the request offers: that of the body region(s) the
    # images show (analysis.finding_codes), and each series' region(s) with the reason.
    codes: CodeList = GENERAL_CODES
    regions: dict[str, tuple[tuple[BodyRegion, ...], str]] = field(default_factory=dict)

    @property
    def shown_instances(self) -> set[str]:
        """Every instance some tile shows (all the slices of every slab shown)."""
        return {uid for image in self.composed for tile in image.tiles for uid in tile.source_instances}

    def manifest(self) -> dict[str, Any]:
        images = []
        for index, (plan, image, data) in enumerate(
            zip(self.plans, self.composed, self.encoded, strict=True)
        ):
            images.append(
                {
                    "index": index + 1,
                    "file": f"image{index + 1:02d}{data.suffix}",
                    "media_type": data.media_type,
                    "bytes": len(data.data),
                    "sha256": data.sha256,
                    "width": data.width,
                    "height": data.height,
                    "series_instance_uid": plan.series_instance_uid,
                    "kind": "volume"
                    if plan.kind == "mosaic"
                    else ("cine" if len(plan.series.frames) > 1 else "single"),
                    **({"stack": plan.series.stack} if plan.series.stack else {}),
                    "description": image.description,
                    "image_tokens": plan.tokens,
                    **(
                        {
                            "body_regions": [r.value for r in self.regions[plan.series_instance_uid][0]],
                            "body_region_reason": self.regions[plan.series_instance_uid][1],
                        }
                        if plan.series_instance_uid in self.regions
                        else {}
                    ),
                    **(
                        {
                            "window": plan.window.words,
                            "projection": PROJECTION_WORDS[plan.window.projection],
                            "part": plan.part,
                            "parts": plan.parts,
                        }
                        if plan.window is not None
                        else {}
                    ),
                    "tiles": [
                        {
                            "number": n,
                            "sop_instance_uid": t.sop_instance_uid,
                            "frame_index": t.frame_index,
                            "label": t.label,
                            **({"slab": _slab_manifest(t.slab)} if t.slab is not None else {}),
                            "window": {
                                "center": t.window.center,
                                "width": t.window.width,
                                "explanation": t.window.explanation,
                            },
                            "placed": {"x0": t.x0, "y0": t.y0, "width": t.width, "height": t.height},
                            "scale": t.scale,
                            "source_rows": t.source_rows,
                            "source_columns": t.source_columns,
                            "pixel_spacing": t.pixel_spacing,
                        }
                        for n, t in enumerate(image.tiles, start=1)
                    ],
                }
            )
        return {
            "study_instance_uid": self.study_instance_uid,
            "prompt_version": PROMPT_VERSION,
            "slab_thickness_mm": self.slab_thickness_mm,
            "image_tokens": self.image_tokens,
            "finding_codes": {
                "body_regions": [region.value for region in self.codes.regions],
                "codes": dict(self.codes.codes),
            },
            "images": images,
            "excluded": [
                {"sop_instance_uid": e.sop_instance_uid, "reason": e.reason}
                | ({"window": e.window} if e.window else {})
                for e in self.exclusions
            ],
        }


def _slab_manifest(slab: SlabTile) -> dict[str, Any]:
    def slice_entry(frame: ChosenFrame) -> dict[str, Any]:
        return {
            "sop_instance_uid": frame.image.sop_instance_uid,
            "frame_index": frame.frame_index,
            "position_mm": frame.slice_position_mm,
        }

    return {
        "description": slab.words(),
        "first": slice_entry(slab.members[0]),
        "last": slice_entry(slab.members[-1]),
        "slices": len(slab.members),
        "thickness_mm": slab.thickness_mm,
        "projection": PROJECTION_WORDS[slab.projection],
        "window": slab.window.words,
        "sop_instance_uids": [m.image.sop_instance_uid for m in slab.members],
    }


def for_provider(
    imaging: ImagingSettings,
    preset: ProviderPreset,
    max_cost_usd: float | None = None,
    max_output_tokens: int = 2048,
) -> ImagingSettings:
    """The imaging budget within the provider's own limits (images, bytes, long edge) and, with
    ``max_cost_usd`` (``vision.max_cost_usd_per_study``), within what that buys at the preset's
    prices: the vision client refuses a study whose worst case (the request, then two repairs at
    twice the reply tokens) is over it, so the images are planned to fit that worst case."""
    tokens = imaging.max_image_tokens or None
    if max_cost_usd is not None and preset.price_input_per_mtok > 0:
        reply = 5 * max_output_tokens * preset.price_output_per_mtok / 1e6  # 1x + 2 x 2x the reply
        affordable = max(int((max_cost_usd - reply) / (3 * preset.price_input_per_mtok / 1e6)), 1)
        affordable = int(affordable * 0.9)  # the prompt's text and schema are input tokens too
        tokens = min(tokens, affordable) if tokens is not None else affordable
    return imaging.model_copy(
        update={
            "max_images": min(imaging.max_images, preset.max_images),
            "max_bytes_per_image": min(imaging.max_bytes_per_image, preset.max_bytes_per_image),
            "max_bytes_per_request": min(imaging.max_bytes_per_request, preset.max_bytes_per_request),
            "long_edge_px": min(imaging.long_edge_px, preset.max_long_edge_px),
            "mosaic_long_edge_px": min(imaging.mosaic_long_edge_px, preset.max_long_edge_px),
            "tile_px": min(imaging.tile_px, preset.max_long_edge_px),
            "token_formula": preset.token_formula,
            "max_image_tokens": max(tokens, 1) if tokens is not None else 0,
        }
    )


def source_images(
    session: Session, study_instance_uid: str, root: Path, only: set[str] | None = None
) -> list[SourceImage]:
    """The study's instances (``only``: just these SOP Instance UIDs, a version's fixed set)."""
    # Core rows of the columns the planner reads, not ORM objects (nor the received time, whose
    # conversion per row cost as much as the rest): a 300-slice study loads in a few milliseconds.
    rows = session.execute(
        select(*(Instance.__table__.columns[name] for name in SOURCE_COLUMNS)).where(
            Instance.study_instance_uid == study_instance_uid
        )
    )
    return [SourceImage.from_columns(row, root) for row in rows if only is None or row[0] in only]


def _mask(frame: DisplayFrame, image: SourceImage, settings: ImagingSettings) -> DisplayFrame | ImageSkipped:
    """The frame as it may leave: masked where its policy says (analysis.pixel_privacy), or
    skipped when the rule set refuses it."""
    if not at_risk(image.modality, image.sop_class_uid):
        return frame
    policy = policy_for(
        image.modality, image.sop_class_uid, image.burned_in_annotation, settings.unlabelled_burned_in
    )
    if policy == "allow" and image.burned_in_annotation != "NO":
        return frame  # configured: this site's devices burn in nothing
    if (
        image.burned_in_annotation == "NO"
        and risk_modality(image.modality, image.sop_class_uid) != "US"
        and not is_secondary_capture(image.sop_class_uid)
    ):
        return frame  # labelled clean; only ultrasound and secondary captures keep the top band
    plan = MaskPlan()
    if policy == "mask":
        plan = mask_plan(dcmread(image.path, stop_before_pixels=True))
        if plan.refused is not None:
            return ImageSkipped(plan.refused)
    pixels = apply_mask(frame.pixels, plan, settings.mask_top_fraction)
    return DisplayFrame(pixels, frame.frame_index, frame.window, frame.pixel_spacing)


def _single_regions(plan: SeriesPlan) -> tuple[tuple[BodyRegion, ...], str]:
    """The body region(s) of a series shown as one image, from its header."""
    try:
        ds = dcmread(plan.frames[0].image.path, stop_before_pixels=True)
    except Exception as exc:  # it was rendered a moment ago; a header that now fails says nothing
        return (BodyRegion.GENERAL,), f"header unreadable ({type(exc).__name__})"
    found, reason = series_regions(ds)
    return tuple(found), reason


def _render_single(
    plan: SeriesPlan, settings: ImagingSettings
) -> tuple[list[tuple[ChosenFrame, DisplayFrame]], list[Exclusion]]:
    """The plan's frame (or a cine loop's frames), rendered and masked as they may leave; when
    none can be, the instance is listed with the reasons."""
    image = plan.frames[0].image
    rendered: list[tuple[ChosenFrame, DisplayFrame]] = []
    reasons: list[str] = []
    indices = [chosen.frame_index for chosen in plan.frames]
    results = render_file(image.path, indices, settings.ct_window_by_body_part)
    for chosen, result in zip(plan.frames, results, strict=False):  # a decoder failure ends it
        masked = result if isinstance(result, ImageSkipped) else _mask(result, chosen.image, settings)
        if isinstance(masked, ImageSkipped):
            reasons.append(str(masked))
        else:
            rendered.append((chosen, masked))
    skipped = [] if rendered else [Exclusion(image.sop_instance_uid, r) for r in dict.fromkeys(reasons)]
    return rendered, skipped


def _spacing(ds: Any) -> tuple[float, float] | None:
    spacing = ds.get("PixelSpacing")
    if not spacing:
        groups = ds.get("SharedFunctionalGroupsSequence")
        measures = groups[0].get("PixelMeasuresSequence") if groups else None
        spacing = measures[0].get("PixelSpacing") if measures else None
    try:
        return (float(spacing[0]), float(spacing[1])) if spacing else None
    except (TypeError, ValueError, IndexError):
        return None


def _volume_requests(
    plans: list[SeriesPlan],
    settings: ImagingSettings,
    regions: dict[str, tuple[tuple[BodyRegion, ...], str]],
) -> tuple[
    list[VolumeRequest], dict[str, tuple[bool, tuple[float, float] | None]], list[float], list[Exclusion]
]:
    """Each volume's windows and body region(s) (into ``regions``), judged from its middle slice,
    and its field of view."""
    requests: list[VolumeRequest] = []
    facts: dict[str, tuple[bool, tuple[float, float] | None]] = {}
    fields_of_view: list[float] = []
    skipped: list[Exclusion] = []
    for plan in plans:
        middle = plan.frames[(len(plan.frames) - 1) // 2]
        reader = SliceReader()
        try:
            ds = reader.header(middle)
            values = reader.values(middle)
        except ImageSkipped as exc:
            skipped += [Exclusion(f.image.sop_instance_uid, str(exc)) for f in plan.frames]
            continue
        except Exception as exc:
            reason = f"cannot decode pixels ({type(exc).__name__}: {str(exc)[:200]})"
            skipped += [Exclusion(f.image.sop_instance_uid, reason) for f in plan.frames]
            continue
        windows = series_windows(
            ds, values, settings.ct_window_by_body_part, CT_PRESETS, settings.ct_rgb_windows
        )
        found, reason = series_regions(ds, values)
        regions[plan.series_instance_uid] = (tuple(found), reason)
        spacing = _spacing(ds)
        monochrome1 = str(ds.get("PhotometricInterpretation", "")).upper() == "MONOCHROME1"
        facts[plan.series_instance_uid] = (monochrome1, spacing)
        if spacing is not None:
            fields_of_view.append(max(values.shape[0] * spacing[0], values.shape[1] * spacing[1]))
        requests.append(VolumeRequest(plan, tuple(windows)))
    return requests, facts, fields_of_view, skipped


def _render_slabs(
    allocation: Allocation, facts: dict[str, tuple[bool, tuple[float, float] | None]]
) -> tuple[dict[tuple[int, str], tuple[CellImage, list[ChosenFrame]]], list[Exclusion]]:
    """Every slab shown, read once and projected in each of its windows, each projection scaled
    to its mosaic cell at once (its full-size pixels are not kept: a long series' would add up)."""
    wanted: dict[int, tuple[Slab, list[ImagePlan]]] = {}
    for image in allocation.images:
        for slab in image.slabs:
            wanted.setdefault(id(slab), (slab, []))[1].append(image)
    rendered: dict[tuple[int, str], tuple[CellImage, list[ChosenFrame]]] = {}
    skipped: list[Exclusion] = []
    reader = SliceReader()
    tile_px = allocation.layout.tile_px if allocation.layout is not None else 0
    for key, (slab, images) in wanted.items():
        values, used, unreadable = stack(slab, reader)
        skipped += [Exclusion(member.image.sop_instance_uid, reason) for member, reason in unreadable]
        if not used:
            continue
        monochrome1, spacing = facts[images[0].series_instance_uid]
        middle = used[(len(used) - 1) // 2]
        for image in images:
            if image.window is not None and (key, image.window.name) not in rendered:
                frame = render(values, image.window, monochrome1, middle.frame_index, spacing)
                rendered[(key, image.window.name)] = (fit_to_cell(frame, tile_px), used)
    return rendered, skipped


def _compose(
    image: ImagePlan,
    rendered: dict[tuple[int, str], tuple[CellImage, list[ChosenFrame]]],
    allocation: Allocation,
    settings: ImagingSettings,
) -> ComposedImage | None:
    if image.window is None or allocation.layout is None:
        return None
    frames: list[tuple[ChosenFrame, CellImage]] = []
    slabs: list[SlabTile | None] = []
    for slab in image.slabs:
        found = rendered.get((id(slab), image.window.name))
        if found is None:
            continue
        frame, used = found
        shown = Slab(tuple(used), slab.spacing_mm)
        tile = SlabTile(shown.members, shown.thickness_mm, image.window.projection, image.window)
        label = f"{len(frames) + 1} {tile.position_words().replace(' to ', '..').replace(' mm', '')}"
        frames.append(
            (
                ChosenFrame(
                    shown.middle.image, shown.middle.frame_index, label, shown.middle.slice_position_mm
                ),
                frame,
            )
        )
        slabs.append(tile)
    if not frames:
        return None
    columns, _ = allocation.layout.grid_for(len(frames))
    stack = f", {image.series.stack}" if image.series.stack else ""
    description = (
        f"{image.modality} series {image.series_instance_uid}{stack}, {image.window.words}, "
        f"{PROJECTION_WORDS[image.window.projection]} slabs, mosaic {image.part} of {image.parts}"
    )
    return compose_mosaic(frames, allocation.layout.tile_px, description, columns=columns, slabs=slabs)


def prepare_study(
    session: Session,
    study_instance_uid: str,
    root: Path,
    settings: ImagingSettings,
    only: set[str] | None = None,
) -> PreparedStudy:
    """Choose, render, compose and encode; every image left out is listed with its reason.
    ``only``: the version's fixed instance set (the worker); None: every instance (preview).

    Volumes: slabs that partition each series along its slice normal, each window its own
    mosaics, as many as the budget (:func:`for_provider`) affords (:mod:`analysis.budget`)."""
    for part, presets in settings.ct_window_by_body_part.items():
        for preset in presets:
            if preset not in CT_PRESETS:
                raise ValueError(
                    f'imaging.ct_window_by_body_part: "{preset}" ({part}) is not one of {sorted(CT_PRESETS)}'
                )
    budget = ImageBudget(
        settings.max_images,
        settings.mosaic_grid**2,
        settings.allow_burned_in_annotation,
        settings.unlabelled_burned_in,
    )
    plans, exclusions = plan_study(source_images(session, study_instance_uid, root, only), budget)
    regions: dict[str, tuple[tuple[BodyRegion, ...], str]] = {}
    volumes, facts, fields_of_view, skipped = _volume_requests(
        [p for p in plans if p.kind == "volume"], settings, regions
    )
    exclusions += skipped
    layout = None
    if volumes:
        needed = needed_tile_px(
            max(fields_of_view) if fields_of_view else None, settings.min_finding_mm, settings.min_finding_px
        )
        source_px = max(
            max(v.plan.frames[0].image.rows or 0, v.plan.frames[0].image.columns or 0) for v in volumes
        )
        layout = choose_layout(
            settings.token_formula,
            needed if needed is not None else float(settings.tile_px),
            settings.tile_px,
            settings.mosaic_long_edge_px,
            settings.mosaic_grid,
            source_px,
        )
    allocation = allocate(
        volumes,
        [p for p in plans if p.kind == "single"],
        layout,
        max_images=settings.max_images,
        max_tokens=settings.max_image_tokens or None,
        max_slab_mm=settings.max_slab_mm,
        formula=settings.token_formula,
        long_edge_px=settings.long_edge_px,
    )
    exclusions += allocation.exclusions
    rendered, skipped = _render_slabs(allocation, facts)
    exclusions += skipped
    kept_plans: list[ImagePlan] = []
    composed: list[ComposedImage] = []
    encoded: list[EncodedImage] = []
    for plan in allocation.images:
        if plan.kind == "mosaic":
            image = _compose(plan, rendered, allocation, settings)
            if image is None:
                continue
        else:
            frames, skipped = _render_single(plan.series, settings)
            exclusions += skipped
            if not frames:
                continue
            uid = frames[0][0].image.sop_instance_uid
            if len(plan.series.frames) > 1:  # a cine loop: its frames, spread over it, in one mosaic
                source = frames[0][1].pixels.shape
                columns, _, tile = cine_grid(len(frames), settings.long_edge_px, max(source[:2]))
                numbers = ", ".join(str(chosen.frame_index + 1) for chosen, _ in frames)
                words = f"{plan.modality} cine {uid}, frames {numbers} of {plan.series.available}"
                image = compose_mosaic(frames, tile, words, columns=columns)
            else:
                image = compose_single(*frames[0], settings.long_edge_px, f"{plan.modality} image {uid}")
        try:
            data = encode(image, settings.image_format, settings.max_bytes_per_image, settings.jpeg_quality)
        except ImageSkipped as exc:
            exclusions += [Exclusion(uid, str(exc)) for t in image.tiles for uid in t.source_instances]
            continue
        if sum(len(e.data) for e in encoded) + len(data.data) > settings.max_bytes_per_request:
            reason = f"over imaging.max_bytes_per_request ({settings.max_bytes_per_request} bytes)"
            exclusions += [Exclusion(uid, reason) for t in image.tiles for uid in t.source_instances]
            continue
        kept_plans.append(plan)
        composed.append(image)
        encoded.append(data)
    prompt = build_prompt(kept_plans, composed) if composed else ""
    for plan in kept_plans:
        if plan.series_instance_uid not in regions:
            regions[plan.series_instance_uid] = _single_regions(plan.series)
    shown = {plan.series_instance_uid: regions[plan.series_instance_uid] for plan in kept_plans}
    return PreparedStudy(
        study_instance_uid,
        kept_plans,
        composed,
        encoded,
        prompt,
        exclusions,
        allocation.thickness_mm,
        sum(p.tokens for p in kept_plans),
        code_list(region for found, _ in shown.values() for region in found),
        shown,
    )


def write_preview(prepared: PreparedStudy, out_dir: Path) -> list[Path]:
    """Write the exact bytes the model would get, the prompt and the manifest."""
    out_dir.mkdir(parents=True, exist_ok=True)
    written: list[Path] = []
    manifest = prepared.manifest()
    # The prompt as sent (prompt.txt ends with a newline for the reader): the audit trail's hash.
    manifest["prompt_sha256"] = hashlib.sha256(prepared.prompt.encode("utf-8")).hexdigest()
    for entry, data in zip(manifest["images"], prepared.encoded, strict=True):
        path = out_dir / entry["file"]
        path.write_bytes(data.data)
        written.append(path)
    (out_dir / "prompt.txt").write_text(prepared.prompt + "\n", encoding="utf-8")
    (out_dir / "manifest.json").write_text(json.dumps(manifest, indent=2), encoding="utf-8")
    return [*written, out_dir / "prompt.txt", out_dir / "manifest.json"]
