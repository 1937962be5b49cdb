"""The text that goes with the images: built only from non-identifying facts (DESIGN.md §7).

Modality, body part, view, slice labels and positions, the window each image was shown with.
Never names, IDs, dates, accession numbers, institutions, physicians or any free-text header.
"""

from __future__ import annotations

from analysis.mosaic import ComposedImage
from analysis.selection import SeriesPlan

PROMPT_VERSION = "ainode-prompt-2"

_INSTRUCTIONS = (
    "You are assisting a radiologist by pre-reading a medical imaging study. Your output is "
    "preliminary and will be verified by the radiologist. Describe clinically relevant findings "
    "only; if the images are non-diagnostic, say so. For each finding give the number of the image "
    "it is on and, where you can, a box around it in the coordinates the instructions describe."
)


def _describe(index: int, plan: SeriesPlan, image: ComposedImage) -> str:
    first = plan.frames[0].image
    facts = [f"Image {index}: {plan.modality or 'unknown modality'}"]
    if first.body_part_examined:
        facts.append(f"body part {first.body_part_examined}")
    if first.view_position:
        facts.append(f"view {first.view_position}")
    window = image.tiles[0].window
    facts.append(f"displayed with window {window.explanation} (C {window.center:g}, W {window.width:g})")
    if plan.kind == "volume":
        positions = [f.slice_position_mm for f in plan.frames if f.slice_position_mm is not None]
        span = (
            f", from {min(positions):.1f} to {max(positions):.1f} mm along the slice normal"
            if positions
            else ""
        )
        facts.append(
            f"a mosaic of {len(plan.frames)} of the series' {plan.available} slices, evenly spaced"
            f"{span}; each tile is labelled (S1 = first) in its top-left corner"
        )
    elif plan.available > 1:
        facts.append(f"frame {plan.frames[0].frame_index + 1} of {plan.available}")
    facts.append(f"{image.width}x{image.height} pixels")
    return ", ".join(facts) + "."


def build_prompt(plans: list[SeriesPlan], images: list[ComposedImage]) -> str:
    if len(plans) != len(images):
        raise ValueError(f"{len(plans)} plans but {len(images)} images")
    lines = [_INSTRUCTIONS, "", f"The study is shown in {len(images)} image(s):"]
    lines += [
        _describe(i + 1, plan, image) for i, (plan, image) in enumerate(zip(plans, images, strict=True))
    ]
    return "\n".join(lines)
