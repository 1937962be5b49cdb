"""Series and slice choice."""

from __future__ import annotations

import random
from dataclasses import replace
from pathlib import Path

import pytest

from analysis.selection import ImageBudget, SourceImage, evenly, plan_study

CT = "1.2.840.10008.5.1.4.1.1.2"
AXIAL = (1.0, 0.0, 0.0, 0.0, 1.0, 0.0)


def image(sop: str, series: str = "1.1", **changes: object) -> SourceImage:
    base = SourceImage(
        sop_instance_uid=sop,
        series_instance_uid=series,
        sop_class_uid=CT,
        path=Path(f"/x/{sop}"),
        modality="CT",
        image_type=("ORIGINAL", "PRIMARY", "AXIAL"),
        instance_number=None,
        position=(0.0, 0.0, 0.0),
        orientation=AXIAL,
        rows=512,
        columns=512,
        number_of_frames=1,
        burned_in_annotation="",
        body_part_examined="CHEST",
        view_position="",
    )
    return replace(base, **changes)  # type: ignore[arg-type]


def test_evenly_spreads_over_the_whole_range() -> None:
    assert evenly(300, 4) == [0, 100, 199, 299]
    assert evenly(3, 16) == [0, 1, 2]


def test_slices_are_ordered_by_position_not_instance_number() -> None:
    # 100 slices 2 mm apart; instance numbers shuffled, files listed in random order.
    numbers = list(range(1, 101))
    random.Random(7).shuffle(numbers)
    slices = [
        image(f"2.{z}", position=(0.0, 0.0, -100.0 + 2.0 * z), instance_number=numbers[z]) for z in range(100)
    ]
    random.Random(3).shuffle(slices)
    (plan,), _ = plan_study(slices, ImageBudget(max_images=4, tiles_per_mosaic=5))
    assert plan.kind == "volume" and plan.available == 100
    # Every slice, in position order (the slabs partition them; none is left between samples).
    assert [f.slice_position_mm for f in plan.frames] == [-100.0 + 2.0 * z for z in range(100)]
    assert [f.label for f in plan.frames[:2]] == ["z=-100.0", "z=-98.0"]


def test_position_uses_the_slice_normal_for_sagittal_series() -> None:
    sagittal = (0.0, 1.0, 0.0, 0.0, 0.0, -1.0)  # normal is -x
    slices = [
        image(f"3.{i}", orientation=sagittal, position=(float(x), 5.0, 9.0))
        for i, x in enumerate([30, 10, 20, 0])
    ]
    (plan,), _ = plan_study(slices, ImageBudget(tiles_per_mosaic=16))
    assert [f.image.position[0] for f in plan.frames if f.image.position] == [30.0, 20.0, 10.0, 0.0]


def test_non_primary_images_are_left_out_with_reasons() -> None:
    images = [
        image("1", image_type=("ORIGINAL", "PRIMARY", "LOCALIZER")),
        image("2", image_type=("DERIVED", "SECONDARY", "SCREEN SAVE")),
        image("3", sop_class_uid="1.2.840.10008.5.1.4.1.1.88.34", rows=None, columns=None),
        image("4", burned_in_annotation="YES", modality="US", series="2.2"),
        image("5", modality="CR", series="3.3"),
    ]
    plans, excluded = plan_study(images, ImageBudget())
    assert [(p.kind, p.frames[0].image.sop_instance_uid) for p in plans] == [("single", "5")]
    reasons = {e.sop_instance_uid: e.reason for e in excluded}
    assert reasons["1"] == "localizer"
    assert reasons["2"] == "derived/secondary image"
    assert reasons["3"].startswith("not an image (SOP class 1.2.840.10008.5.1.4.1.1.88.34")
    assert reasons["4"].startswith("BurnedInAnnotation YES")
    allowed, _ = plan_study(images, ImageBudget(allow_burned_in_annotation=True))
    assert {p.frames[0].image.sop_instance_uid for p in allowed} == {"4", "5"}


def test_mixed_study_lists_every_volume_slice_and_each_other_image() -> None:
    ct = [image(f"ct.{z}", position=(0.0, 0.0, float(z))) for z in range(40)]
    small_mr = [image(f"mr.{z}", series="2", modality="MR", position=(0.0, 0.0, float(z))) for z in range(6)]
    xrays = [
        image(f"cr.{n}", series=f"3.{n}", modality="CR", position=None, orientation=None) for n in range(3)
    ]
    plans, excluded = plan_study([*xrays, *small_mr, *ct], ImageBudget(max_images=3, tiles_per_mosaic=16))
    # How much of it is shown is the budget's (tests/analysis/test_slabs.py), not the selection's.
    assert [(p.series_instance_uid, p.kind, len(p.frames)) for p in plans] == [
        ("1.1", "volume", 40),
        ("2", "volume", 6),
        ("3.0", "single", 1),
        ("3.1", "single", 1),
        ("3.2", "single", 1),
    ]
    assert excluded == []


def test_multi_frame_volume_keeps_every_frame_and_cine_shows_frames_spread_over_it() -> None:
    enhanced = image("e", number_of_frames=200, modality="MR")  # no readable header: frame order
    cine = image("c", series="2", modality="US", number_of_frames=30, position=None, orientation=None)
    plans, _ = plan_study(
        [enhanced, cine], ImageBudget(tiles_per_mosaic=4, unlabelled_burned_in={"US": "mask"})
    )
    assert [f.frame_index for f in plans[0].frames] == list(range(200))
    assert plans[1].kind == "single"  # one image: a mosaic of frames spread over the loop
    assert [(f.frame_index, f.label) for f in plans[1].frames] == [
        (0, "F1"),
        (10, "F11"),
        (19, "F20"),
        (29, "F30"),
    ]


def test_budget_arguments_are_checked() -> None:
    with pytest.raises(ValueError, match='"max_images" must be at least 1, got 0'):
        ImageBudget(max_images=0)


def test_the_imaging_budget_is_cut_to_the_providers_limits() -> None:
    from analysis.prepare import for_provider
    from conf import ImagingSettings
    from conf.providers import PRESETS

    claude = for_provider(ImagingSettings(long_edge_px=2048, max_images=30), PRESETS["anthropic"])
    assert (claude.long_edge_px, claude.max_images, claude.tile_px) == (1568, 20, 256)
    ollama = for_provider(ImagingSettings(), PRESETS["ollama"])
    assert ollama.max_images == 4


def test_images_that_may_show_burned_in_text_are_left_out_unless_configured() -> None:
    """Ultrasound, secondary captures, angiography... without BurnedInAnnotation NO are treated
    as YES (issue 13); "mask" or "allow" per modality sends them; a header saying NO is believed."""
    us = image("u", series="1", modality="US", position=None, orientation=None)
    labelled = image(
        "n", series="2", modality="US", position=None, orientation=None, burned_in_annotation="NO"
    )
    xa = image("x", series="3", modality="XA", position=None, orientation=None)
    ct = image("c", series="4", modality="CT")
    plans, excluded = plan_study([us, labelled, xa, ct], ImageBudget())
    assert sorted(p.series_instance_uid for p in plans) == ["2", "4"]
    reasons = {e.sop_instance_uid: e.reason for e in excluded}
    assert reasons["u"].startswith("US without BurnedInAnnotation NO") and reasons["x"].startswith(
        "XA without"
    )
    plans, excluded = plan_study([us, xa], ImageBudget(unlabelled_burned_in={"US": "mask", "XA": "allow"}))
    assert sorted(p.series_instance_uid for p in plans) == ["1", "3"] and excluded == []


@pytest.mark.parametrize(
    ("sop_class", "modality", "key"),
    [
        ("1.2.840.10008.5.1.4.1.1.6.1", "", "US"),  # an ultrasound without Modality
        ("1.2.840.10008.5.1.4.1.1.3.1", "CT", "US"),  # a multi-frame ultrasound that says CT
        ("1.2.840.10008.5.1.4.1.1.12.1", "", "XA"),
        ("1.2.840.10008.5.1.4.1.1.77.1.1", "MR", "ES"),
        ("1.2.840.10008.5.1.4.1.1.7", "", "SC"),
    ],
)
def test_an_image_whose_sop_class_carries_burned_in_text_is_judged_by_it_not_by_its_modality(
    sop_class: str, modality: str, key: str
) -> None:
    """The SOP class says what the pixels are: an ultrasound whose Modality is missing or wrong
    is still held back (issue 13), under its own modality's policy."""
    us = image("u", series="1", sop_class_uid=sop_class, modality=modality, position=None, orientation=None)
    plans, excluded = plan_study([us], ImageBudget())
    assert plans == [] and [e.reason for e in excluded] == [
        f"{key} without BurnedInAnnotation NO (may show patient data; imaging.unlabelled_burned_in)"
    ]
    plans, excluded = plan_study([us], ImageBudget(unlabelled_burned_in={key: "mask"}))
    assert len(plans) == 1 and excluded == []
    labelled = replace(us, burned_in_annotation="NO")
    assert len(plan_study([labelled], ImageBudget())[0]) == 1


def test_images_that_may_carry_burned_in_text_never_go_into_a_slab() -> None:
    """A multi-frame ultrasound whose header says CT, or a secondary capture in a CT series, is
    shown alone (where it is masked), never projected into a slab that bypasses the mask."""
    cine = image("u", series="1", sop_class_uid="1.2.840.10008.5.1.4.1.1.3.1", number_of_frames=40)
    slices = [image(f"c{i}", series="2", position=(0.0, 0.0, float(i))) for i in range(6)]
    capture = image("s", series="2", sop_class_uid="1.2.840.10008.5.1.4.1.1.7", position=(0.0, 0.0, 9.0))
    plans, excluded = plan_study(
        [cine, *slices, capture], ImageBudget(unlabelled_burned_in={"US": "mask", "SC": "mask"})
    )
    assert excluded == []
    assert sorted((p.kind, p.frames[0].image.sop_instance_uid) for p in plans if p.kind == "single") == [
        ("single", "s"),
        ("single", "u"),
    ]
    (volume,) = [p for p in plans if p.kind == "volume"]  # the CT slices stay a volume
    assert [f.image.sop_instance_uid for f in volume.frames] == [f"c{i}" for i in range(6)]
