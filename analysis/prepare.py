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

from analysis.encode import EncodedImage, encode
from analysis.errors import ImageSkipped
from analysis.imaging import CT_PRESETS, DisplayFrame, render_file
from analysis.mosaic import ComposedImage, compose_mosaic, compose_single
from analysis.pixel_privacy import MaskPlan, apply_mask, at_risk, is_secondary_capture, mask_plan, policy_for
from analysis.prompt import PROMPT_VERSION, build_prompt
from analysis.selection import ChosenFrame, Exclusion, ImageBudget, SeriesPlan, SourceImage, plan_study
from conf import ImagingSettings
from conf.providers import ProviderPreset
from storage.models import Instance


@dataclass
class PreparedStudy:
    study_instance_uid: str
    plans: list[SeriesPlan]
    composed: list[ComposedImage]
    encoded: list[EncodedImage]
    prompt: str
    exclusions: list[Exclusion] = field(default_factory=list)

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
                    "kind": plan.kind,
                    "description": image.description,
                    "tiles": [
                        {
                            "sop_instance_uid": t.sop_instance_uid,
                            "frame_index": t.frame_index,
                            "label": t.label,
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
                        for t in image.tiles
                    ],
                }
            )
        return {
            "study_instance_uid": self.study_instance_uid,
            "prompt_version": PROMPT_VERSION,
            "images": images,
            "excluded": [
                {"sop_instance_uid": e.sop_instance_uid, "reason": e.reason} for e in self.exclusions
            ],
        }


def for_provider(imaging: ImagingSettings, preset: ProviderPreset) -> ImagingSettings:
    """The imaging budget within the provider's own limits (images, bytes, long edge)."""
    return imaging.model_copy(
        update={
            "max_images": min(imaging.max_images, preset.max_images),
            "max_bytes_per_image": min(imaging.max_bytes_per_image, preset.max_bytes_per_image),
            "max_bytes_per_request": min(imaging.max_bytes_per_request, preset.max_bytes_per_request),
            "long_edge_px": min(imaging.long_edge_px, preset.max_long_edge_px),
            "tile_px": min(imaging.tile_px, preset.max_long_edge_px // max(imaging.mosaic_grid, 1)),
        }
    )


def source_images(
    session: Session, study_instance_uid: str, root: Path, only: set[str] | None = None
) -> list[SourceImage]:
    """The study's instances (``only``: just these SOP Instance UIDs, a version's fixed set)."""
    # Core rows, not ORM objects: a 300-slice study loads in a few milliseconds.
    rows = session.execute(
        select(*Instance.__table__.columns).where(Instance.study_instance_uid == study_instance_uid)
    )
    return [
        SourceImage.from_instance(row, root) for row in rows if only is None or row.sop_instance_uid in only
    ]


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
        and image.modality != "US"
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


def _render(
    plan: SeriesPlan, settings: ImagingSettings
) -> tuple[list[tuple[ChosenFrame, DisplayFrame]], list[Exclusion]]:
    rendered: list[tuple[ChosenFrame, DisplayFrame]] = []
    skipped: list[Exclusion] = []
    by_file: dict[Path, list[ChosenFrame]] = {}
    for chosen in plan.frames:
        by_file.setdefault(chosen.image.path, []).append(chosen)
    for path, chosen_frames in by_file.items():
        indices = [c.frame_index for c in chosen_frames]
        results = list(render_file(path, indices, settings.ct_window_by_body_part))
        for chosen, result in zip(chosen_frames, results, strict=False):
            if isinstance(result, ImageSkipped):
                skipped.append(Exclusion(chosen.image.sop_instance_uid, str(result)))
            else:
                masked = _mask(result, chosen.image, settings)
                if isinstance(masked, ImageSkipped):
                    skipped.append(Exclusion(chosen.image.sop_instance_uid, str(masked)))
                else:
                    rendered.append((chosen, masked))
        if len(results) == 1 and isinstance(results[0], ImageSkipped) and len(chosen_frames) > 1:
            skipped += [Exclusion(c.image.sop_instance_uid, str(results[0])) for c in chosen_frames[1:]]
    order = {id(c): i for i, c in enumerate(plan.frames)}
    rendered.sort(key=lambda item: order[id(item[0])])
    return rendered, skipped


def prepare_study(
    session: Session,
    study_instance_uid: str,
    root: Path,
    settings: ImagingSettings,
    only: set[str] | None = None,
) -> PreparedStudy:
    """Choose, render, compose and encode; every image left out is listed with its reason.
    ``only``: the version's fixed instance set (the worker); None: every instance (preview)."""
    for preset in settings.ct_window_by_body_part.values():
        if preset not in CT_PRESETS:
            raise ValueError(f'imaging.ct_window_by_body_part: "{preset}" is not one of {sorted(CT_PRESETS)}')
    budget = ImageBudget(
        settings.max_images,
        settings.mosaic_grid**2,
        settings.allow_burned_in_annotation,
        settings.unlabelled_burned_in,
    )
    plans, exclusions = plan_study(source_images(session, study_instance_uid, root, only), budget)
    kept_plans: list[SeriesPlan] = []
    composed: list[ComposedImage] = []
    encoded: list[EncodedImage] = []
    for plan in plans:
        frames, skipped = _render(plan, settings)
        exclusions += skipped
        if not frames:
            continue
        if plan.kind == "volume":
            image = compose_mosaic(
                frames, settings.tile_px, f"{plan.modality} series {plan.series_instance_uid}"
            )
        else:
            image = compose_single(
                *frames[0],
                settings.long_edge_px,
                f"{plan.modality} image {frames[0][0].image.sop_instance_uid}",
            )
        try:
            data = encode(image, settings.image_format, settings.max_bytes_per_image, settings.jpeg_quality)
        except ImageSkipped as exc:
            exclusions += [Exclusion(t.sop_instance_uid, str(exc)) for t in image.tiles]
            continue
        if sum(len(e.data) for e in encoded) + len(data.data) > settings.max_bytes_per_request:
            reason = f"over imaging.max_bytes_per_request ({settings.max_bytes_per_request} bytes)"
            exclusions += [Exclusion(t.sop_instance_uid, reason) for t in image.tiles]
            continue
        kept_plans.append(plan)
        composed.append(image)
        encoded.append(data)
    prompt = build_prompt(kept_plans, composed) if composed else ""
    return PreparedStudy(study_instance_uid, kept_plans, composed, encoded, prompt, exclusions)


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
