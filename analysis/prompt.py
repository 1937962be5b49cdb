"""The text that goes with the images: built only from non-identifying facts (DESIGN.md §7).

Modality, body part, view, slice labels and positions, the window each image was shown with.
Never names, IDs, dates, accession numbers, institutions, physicians or any free-text header.
"""

from __future__ import annotations

from analysis.budget import ImagePlan
from analysis.mosaic import ComposedImage
from analysis.windows import PROJECTION_WORDS

PROMPT_VERSION = "ainode-prompt-4"

_INSTRUCTIONS = (
    "You are assisting a radiologist by pre-reading a medical imaging study. Your output is "
    "preliminary and will be verified by the radiologist. Describe clinically relevant findings "
    "only; if the images are non-diagnostic, say so. For each finding give the number of the image "
    "it is on and, where you can, a box around it in the coordinates the instructions describe."
)


def _describe(index: int, plan: ImagePlan, image: ComposedImage) -> str:
    first = plan.series.frames[0].image
    facts = [f"Image {index}: {plan.modality or 'unknown modality'}"]
    if first.body_part_examined:
        facts.append(f"body part {first.body_part_examined}")
    if first.view_position:
        facts.append(f"view {first.view_position}")
    slabs = [t.slab for t in image.tiles if t.slab is not None]
    if plan.kind == "mosaic" and plan.window is not None and slabs:
        thicknesses = [s.thickness_mm for s in slabs if s.thickness_mm is not None]
        thickness = (
            f"slabs of up to {max(thicknesses):.1f} mm" if thicknesses else "slabs of consecutive frames"
        )
        whole = f"this series' {plan.series.stack}" if plan.series.stack else "this series"
        facts.append(
            f"{plan.window.words}, {PROJECTION_WORDS[plan.window.projection]} {thickness}; "
            f"mosaic {plan.part} of {plan.parts} of {whole} in this window; the slabs together cover "
            f"every slice of {'the stack' if plan.series.stack else 'the series'} ({plan.series.available}); "
            f"{len(image.tiles)} tiles, numbered row by row from the top left, each labelled with its number "
            "and its slab's slice centres (mm along the slice normal)"
        )
        tiles = "; ".join(
            f"tile {n}: {slab.thickness_mm:.1f} mm, {slab.position_words()}"
            if slab.thickness_mm is not None
            else f"tile {n}: {slab.position_words()}"
            for n, slab in enumerate(slabs, start=1)
        )
        facts.append(f"{image.width}x{image.height} pixels ({tiles})")
        return ", ".join(facts) + "."
    window = image.tiles[0].window
    facts.append(f"displayed with window {window.explanation} (C {window.center:g}, W {window.width:g})")
    if len(image.tiles) > 1:
        frames = ", ".join(str(t.frame_index + 1) for t in image.tiles)
        facts.append(
            f"a cine loop of {plan.series.available} frames shown by {len(image.tiles)} of them spread "
            f"evenly over it (frames {frames}), as tiles numbered row by row from the top left, each "
            "labelled with its frame number"
        )
    elif plan.series.available > 1:
        facts.append(f"frame {image.tiles[0].frame_index + 1} of {plan.series.available}")
    facts.append(f"{image.width}x{image.height} pixels")
    return ", ".join(facts) + "."


def build_prompt(plans: list[ImagePlan], images: list[ComposedImage]) -> str:
    if len(plans) != len(images):
        raise ValueError(f"{len(plans)} plans but {len(images)} images")
    lines = [_INSTRUCTIONS, "", f"The study is shown in {len(images)} image(s):"]
    lines += [
        _describe(i + 1, plan, image) for i, (plan, image) in enumerate(zip(plans, images, strict=True))
    ]
    return "\n".join(lines)
