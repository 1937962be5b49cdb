"""Slabs (issue 12): the whole volume is shown, in the windows its anatomy is read in, within the
cost budget; a box on a slab tile lands on the slice the finding is on."""

from __future__ import annotations

import random
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
from pydicom import dcmread

from analysis.budget import VolumeRequest, allocate
from analysis.findings import Box
from analysis.imaging import CT_PRESETS, WindowChoice, apply_window
from analysis.layout import MosaicLayout, choose_layout
from analysis.mosaic import ComposedImage, Tile
from analysis.prepare import for_provider
from analysis.regions import map_box_to_source
from analysis.selection import ChosenFrame, ImageBudget, plan_study
from analysis.slabs import max_slices, partition
from analysis.vision.tokens import PROCESSED_SCALE
from analysis.volume import SliceReader, project
from analysis.windows import MEDGEMMA_RGB_WINDOWS, WindowSpec, series_windows
from conf import ImagingSettings
from conf.providers import PRESETS
from tests.analysis.test_selection import image
from tests.data.ingest import prepared_study
from tests.data.phantom import head_ct, write_volume

LUNG = WindowSpec("lung", -600, 1500, "mip", "preset lung")
MEDIASTINUM = WindowSpec("mediastinum", 40, 400, "average", "preset mediastinum")


def _series(count: int, spacing: float = 1.25, gap: range = range(0), seed: int = 1) -> list[ChosenFrame]:
    numbers = list(range(1, count + 1))
    random.Random(seed).shuffle(numbers)
    slices = [
        image(f"1.{i}", position=(0.0, 0.0, -100.0 + spacing * i), instance_number=numbers[i])
        for i in range(count)
        if i not in gap
    ]
    random.Random(seed + 1).shuffle(slices)
    (plan,), _ = plan_study(slices, ImageBudget())
    return list(plan.frames)


def test_slabs_partition_the_series_by_position_with_shuffled_numbers_and_a_gap() -> None:
    frames = _series(120, gap=range(40, 52))  # 15 mm missing in the middle
    slabs = partition(frames, 10.0)
    members = [m.image.sop_instance_uid for slab in slabs for m in slab.members]
    assert sorted(members) == sorted(f.image.sop_instance_uid for f in frames)  # each exactly once
    assert len(members) == len(set(members)) == 108
    positions = [m.slice_position_mm or 0.0 for slab in slabs for m in slab.members]
    assert positions == sorted(positions)  # by position, whatever the instance numbers say
    for slab in slabs:
        assert slab.thickness_mm is not None and slab.thickness_mm <= 10.0
        span = (slab.last.slice_position_mm or 0) - (slab.first.slice_position_mm or 0)
        assert span < 10.0  # no slab reaches across the gap
    assert max(len(s.members) for s in slabs) == 8  # 8 x 1.25 mm


def test_slab_thickness_is_a_whole_number_of_slices_never_over_the_limit() -> None:
    slabs = partition(_series(40, spacing=3.0), 10.0)
    assert {len(s.members) for s in slabs} == {3} | ({40 % 3} if 40 % 3 else set())
    assert max(s.thickness_mm or 0 for s in slabs) == pytest.approx(9.0)
    with pytest.raises(ValueError, match='"thickness_mm" must be positive, got 0'):
        partition(_series(4), 0)


def test_mip_holds_the_maximum_and_average_the_mean() -> None:
    rng = np.random.default_rng(3)
    values = rng.normal(0, 100, (7, 16, 16)).astype(np.float32)
    values[4, 3, 5] = 5000.0
    mip = project(values, "mip")
    assert mip[3, 5] == 5000.0
    assert np.array_equal(mip, values.max(axis=0))
    assert np.allclose(project(values, "average"), values.mean(axis=0), atol=1e-3)
    assert np.array_equal(project(values, "minip"), values.min(axis=0))
    with pytest.raises(ValueError, match='"projection" must be'):
        project(values, "sum")


def test_a_box_on_a_mip_tile_maps_to_the_slice_of_the_brightest_voxel(tmp_path: Path) -> None:
    # 16 slices 1.25 mm apart: two 10 mm slabs. In the first slab, a bright dot on slice 5 inside
    # the box and a brighter one on slice 2 outside it.
    slices = [np.full((64, 64), -850.0, dtype=np.float32) for _ in range(16)]
    slices[5][20:23, 20:23] = 100.0
    slices[2][50:53, 50:53] = 400.0
    numbers = list(range(1, 17))
    random.Random(4).shuffle(numbers)
    paths, _, _ = write_volume(
        tmp_path / "in",
        slices,
        [1.25 * i for i in range(16)],
        0.7,
        body_part="CHEST",
        instance_numbers=numbers,
    )
    # One tile per image and four images: the budget affords 10 mm slabs, no thinner.
    prepared, _ = prepared_study(paths, tmp_path, ImagingSettings(mosaic_grid=1, max_images=4))
    assert prepared.slab_thickness_mm == 10.0
    lung = next(i for i, p in enumerate(prepared.plans) if p.window is not None and p.window.name == "lung")
    composed = prepared.composed[lung]
    tile = composed.tiles[0]
    assert tile.slab is not None and tile.slab.projection == "mip" and len(tile.slab.members) == 8
    # The box around the dot at source (21, 21), in the mosaic's fractions.
    x0, y0 = tile.x0 + 17 * tile.scale, tile.y0 + 17 * tile.scale
    x1, y1 = tile.x0 + 26 * tile.scale, tile.y0 + 26 * tile.scale
    box = Box(
        x_min=x0 / composed.width,
        y_min=y0 / composed.height,
        x_max=x1 / composed.width,
        y_max=y1 / composed.height,
    )
    region = map_box_to_source(box, composed)
    assert region is not None
    by_uid = {str(dcmread(p, stop_before_pixels=True).SOPInstanceUID): p.name for p in paths}
    assert by_uid[region.sop_instance_uid] == "00005.dcm"
    # The dot outside the box is on another slice: the box decides, not the slab's maximum.
    far = Box(
        x_min=(tile.x0 + 47 * tile.scale) / composed.width,
        y_min=(tile.y0 + 47 * tile.scale) / composed.height,
        x_max=(tile.x0 + 56 * tile.scale) / composed.width,
        y_max=(tile.y0 + 56 * tile.scale) / composed.height,
    )
    other = map_box_to_source(far, composed)
    assert other is not None and by_uid[other.sop_instance_uid] == "00002.dcm"
    # The manifest says what the tile is, and lists both slabs' slices as shown.
    entry = prepared.manifest()["images"][lung]["tiles"][0]["slab"]
    assert (entry["slices"], entry["thickness_mm"], entry["projection"]) == (
        8,
        10.0,
        "maximum intensity projection",
    )
    assert entry["first"]["position_mm"] == 0.0 and entry["last"]["position_mm"] == 8.75
    assert len(prepared.shown_instances) == 16


def test_a_head_ct_without_body_part_gets_brain_windows(tmp_path: Path) -> None:
    phantom = head_ct(tmp_path / "head", slices=12)
    middle = phantom.paths[6]
    ds = dcmread(middle)
    assert "BodyPartExamined" not in ds and "SeriesDescription" not in ds and "WindowCenter" not in ds
    reader = SliceReader()
    frame = ChosenFrame(replace(image("x"), path=middle), 0, "")
    values = reader.values(frame)
    windows = series_windows(ds, values, ImagingSettings().ct_window_by_body_part, CT_PRESETS)
    assert [w.name for w in windows] == ["brain", "subdural"]
    assert "HU histogram" in windows[0].explanation
    # A chest-sized trunk without a body part keeps the default.
    trunk = np.full((256, 256), -1000.0, dtype=np.float32)
    trunk[30:226, 10:246] = 40.0
    trunk[60:200, 40:120] = -850.0
    assert [w.name for w in series_windows(ds, trunk, {}, CT_PRESETS)] == ["mediastinum"]


def test_a_head_ct_named_only_by_its_description_gets_brain_windows(tmp_path: Path) -> None:
    phantom = head_ct(tmp_path / "head", slices=8, series_description="CT Kopf nativ 5mm")
    ds = dcmread(phantom.paths[4])
    flat = np.zeros((8, 8), dtype=np.float32)  # nothing to judge from the pixels
    names = [w.name for w in series_windows(ds, flat, ImagingSettings().ct_window_by_body_part, CT_PRESETS)]
    assert names == ["brain", "subdural"]


LAYOUT = MosaicLayout(8, 3, 224, "openai")


def _request(count: int) -> VolumeRequest:
    (plan,), _ = plan_study(
        [image(f"1.{i}", position=(0.0, 0.0, 1.25 * i)) for i in range(count)], ImageBudget()
    )
    return VolumeRequest(plan, (LUNG, MEDIASTINUM))


def test_a_longer_series_gets_more_mosaics_never_thicker_slabs() -> None:
    kwargs = {"max_images": 64, "max_slab_mm": 10.0, "formula": "openai", "long_edge_px": 1024}
    short = allocate([_request(300)], [], LAYOUT, max_tokens=6000, **kwargs)  # type: ignore[arg-type]
    long = allocate([_request(1200)], [], LAYOUT, max_tokens=30000, **kwargs)  # type: ignore[arg-type]
    assert short.exclusions == [] and long.exclusions == []
    for allocation in (short, long):
        assert allocation.thickness_mm is not None and allocation.thickness_mm <= 10.0
        assert max(s.thickness_mm or 0 for i in allocation.images for s in i.slabs) <= 10.0
        assert allocation.tokens <= (6000 if allocation is short else 30000)
    assert len(long.images) > len(short.images)
    # Every slice of the long series in each window, exactly once.
    for window in ("lung", "mediastinum"):
        shown = [
            m.image.sop_instance_uid
            for i in long.images
            if i.window and i.window.name == window
            for s in i.slabs
            for m in s.members
        ]
        assert len(shown) == len(set(shown)) == 1200
    # A bigger budget buys thinner slabs, not a different coverage.
    rich = allocate([_request(300)], [], LAYOUT, max_tokens=20000, **kwargs)  # type: ignore[arg-type]
    assert rich.thickness_mm is not None and short.thickness_mm is not None
    assert rich.thickness_mm < short.thickness_mm


def test_a_study_too_large_for_the_budget_says_so_in_the_exclusions() -> None:
    kwargs = {"max_images": 64, "max_slab_mm": 10.0, "formula": "openai", "long_edge_px": 1024}
    tight = allocate([_request(1200)], [], LAYOUT, max_tokens=6000, **kwargs)  # type: ignore[arg-type]
    assert tight.thickness_mm == 10.0  # never thicker than the limit to make it fit
    assert tight.tokens <= 6000
    reasons = {e.reason for e in tight.exclusions}
    assert len(reasons) == 1 and reasons.pop().startswith(
        "over the study's budget of 6000 image tokens (imaging.max_image_tokens, "
        "vision.max_cost_usd_per_study): it needs "
    )
    # The lung window (first) is shown as far as the budget goes; what is not shown in it is
    # excluded outright, and every mediastinal slab not shown is excluded for that window.
    lung_shown = {
        m.image.sop_instance_uid for i in tight.images if i.window == LUNG for s in i.slabs for m in s.members
    }
    outright = {e.sop_instance_uid for e in tight.exclusions if e.window is None}
    assert lung_shown and outright and not lung_shown & outright
    assert len(lung_shown) + len(outright) == 1200
    assert all(e.window == "mediastinum" for e in tight.exclusions if e.window is not None)


def test_through_the_settings_a_too_large_study_lands_in_the_manifest(tmp_path: Path) -> None:
    slices = [np.full((64, 64), 40.0, dtype=np.float32) for _ in range(40)]
    paths, _, _ = write_volume(tmp_path / "in", slices, [1.25 * i for i in range(40)], 0.7, body_part="CHEST")
    prepared, _ = prepared_study(paths, tmp_path, ImagingSettings(max_images=1))
    manifest = prepared.manifest()
    assert len(manifest["images"]) == 1 and manifest["images"][0]["window"].startswith("lung window")
    assert {e["window"] for e in manifest["excluded"]} == {"mediastinum"}
    assert len(manifest["excluded"]) == 40
    assert all(
        e["reason"].startswith(
            "over the study's budget of 1 image in its one request (imaging.max_images and the "
            "provider's limit per request): it needs 2 images"
        )
        for e in manifest["excluded"]
    )


@pytest.mark.parametrize("formula", ["openai", "anthropic", "gemini"])
def test_tiles_keep_a_5_mm_finding_3_pixels_across_after_the_providers_rescaling(formula: str) -> None:
    needed = 358.4 * 3 / 5  # a 512 x 0.7 mm field of view
    layout = choose_layout(formula, needed, 256, 1568 if formula == "anthropic" else 2048, 8, 512)
    width, height = layout.columns * layout.tile_px, layout.rows * layout.tile_px
    assert layout.tile_px * PROCESSED_SCALE[formula](width, height) >= needed
    assert layout.tiles >= 9  # and many tiles per image, not one slice per image


def test_more_images_than_one_request_takes_are_left_out_and_say_so(tmp_path: Path) -> None:
    """ainode sends one request per study (not several, see the issue 12 note): a study that needs
    more images than the provider takes in one request shows each series' first window first and
    lists the rest, naming that limit."""
    slices = [np.full((64, 64), 40.0, dtype=np.float32) for _ in range(40)]
    study = "1.2.826.0.1.3680043.8.498.12"
    paths: list[Path] = []
    for n in range(3):
        series, _, _ = write_volume(
            tmp_path / f"in{n}",
            slices,
            [1.25 * i for i in range(40)],
            0.7,
            body_part="CHEST",
            study_instance_uid=study,
        )
        paths += series
    # 4 images a request; tokens enough for more
    settings = for_provider(ImagingSettings(max_image_tokens=100_000), PRESETS["ollama"])
    prepared, _ = prepared_study(paths, tmp_path, settings)
    manifest = prepared.manifest()
    assert len(manifest["images"]) == 4
    windows = sorted(image["window"].split(" window")[0] for image in manifest["images"])
    assert windows == ["lung", "lung", "lung", "mediastinum"]
    assert len(manifest["excluded"]) == 80 and {e["window"] for e in manifest["excluded"]} == {"mediastinum"}
    (reason,) = {e["reason"] for e in manifest["excluded"]}
    assert reason.startswith(
        "over the study's budget of 4 images in its one request (imaging.max_images and the provider's "
        "limit per request): it needs 6 images and "
    )
    assert reason.endswith(" image tokens at 10 mm slabs")


def _box(composed: ComposedImage, tile: Tile, c0: float, r0: float, c1: float, r1: float) -> Box:
    """A box in the mosaic's fractions around source pixels (c0, r0)..(c1, r1) of ``tile``."""
    return Box(
        x_min=(tile.x0 + c0 * tile.scale) / composed.width,
        y_min=(tile.y0 + r0 * tile.scale) / composed.height,
        x_max=(tile.x0 + c1 * tile.scale) / composed.width,
        y_max=(tile.y0 + r1 * tile.scale) / composed.height,
    )


def test_the_medgemma_style_option_shows_each_slab_as_one_rgb_image_of_three_windows(tmp_path: Path) -> None:
    # Three 10 mm slabs (8 slices each) of one value each: their average is that value, so each
    # channel is exactly the value through its window.
    values = [-500.0] * 8 + [100.0] * 8 + [60.0] * 8
    slices = [np.full((64, 64), v, dtype=np.float32) for v in values]
    paths, _, _ = write_volume(tmp_path / "in", slices, [1.25 * i for i in range(24)], 0.7, body_part="CHEST")
    prepared, _ = prepared_study(
        paths, tmp_path, ImagingSettings(ct_rgb_windows=True, mosaic_grid=1, max_images=3)
    )
    assert prepared.slab_thickness_mm == 10.0 and len(prepared.composed) == 3  # one window, not two
    words = "three CT windows as RGB (R, G, B: -1024..1024, -135..215, 0..80 HU)"
    for composed, value, entry in zip(
        prepared.composed, (-500.0, 100.0, 60.0), prepared.manifest()["images"], strict=True
    ):
        assert composed.pixels.ndim == 3 and composed.pixels.shape[2] == 3
        (tile,) = composed.tiles
        assert tile.slab is not None and tile.slab.projection == "average"
        expected = [
            int(apply_window(np.array([value], dtype=np.float32), WindowChoice(c, w, "x"))[0])
            for c, w in MEDGEMMA_RGB_WINDOWS
        ]
        middle = composed.pixels[tile.y0 + tile.height // 2, tile.x0 + tile.width // 2]
        assert [int(v) for v in middle] == expected
        assert entry["window"] == words and entry["tiles"][0]["slab"]["window"] == words
    assert f"{words}, average intensity projection slabs" in prepared.prompt


def test_a_box_on_an_average_tile_maps_to_the_slice_that_differs_within_the_window(tmp_path: Path) -> None:
    """Average slabs (brain window): the region goes to the slice whose voxel in the box differs
    most from the slab's mean, both clipped to the window: a bleed next to the skull lands on the
    bleed's slice (not where the bone is brightest), a dark infarct on its own slice, and a box
    on uniform bone on the slab's middle slice."""
    slices = [np.full((64, 64), 35.0, dtype=np.float32) for _ in range(8)]  # brain
    for k, volume in enumerate(slices):
        volume[:, :6] = 1200.0 + (100.0 if k == 2 else 0.0)  # skull, brightest on slice 2
    slices[5][30:34, 8:12] = 70.0  # a small bleed on slice 5, by the inner table
    slices[6][10:16, 40:46] = 15.0  # a hypodense infarct on slice 6
    paths, _, _ = write_volume(tmp_path / "in", slices, [1.25 * i for i in range(8)], 0.7, body_part="HEAD")
    prepared, _ = prepared_study(paths, tmp_path, ImagingSettings(mosaic_grid=1, max_images=2))
    brain = next(i for i, p in enumerate(prepared.plans) if p.window is not None and p.window.name == "brain")
    composed = prepared.composed[brain]
    (tile,) = composed.tiles
    assert tile.slab is not None and tile.slab.projection == "average" and len(tile.slab.members) == 8
    by_uid = {str(dcmread(p, stop_before_pixels=True).SOPInstanceUID): p.name for p in paths}

    def lands(c0: float, r0: float, c1: float, r1: float) -> str:
        region = map_box_to_source(_box(composed, tile, c0, r0, c1, r1), composed)
        assert region is not None
        return by_uid[region.sop_instance_uid]

    assert lands(0, 26, 16, 38) == "00005.dcm"  # the bleed, with bone in the box
    assert lands(36, 6, 50, 20) == "00006.dcm"  # the infarct, darker than its slab
    assert lands(0, 50, 5, 60) == "00003.dcm"  # bone only: the middle of slices 0..7


def test_a_slab_of_large_frames_holds_no_more_than_memory_allows() -> None:
    """Slabs are read into memory whole: 4096 x 4096 frames 0.1 mm apart would make a 10 mm slab
    of 100 slices (6.4 GB as values); it is cut into runs of at most 8, each slice once, in order."""
    assert max_slices(512, 512) == 255 and max_slices(4096, 4096) == 8
    frames = _series(100, spacing=0.1)
    slabs = partition(frames, 10.0, most=max_slices(4096, 4096))
    assert max(len(s.members) for s in slabs) == 8
    positions = [m.slice_position_mm or 0.0 for s in slabs for m in s.members]
    assert len(positions) == 100 and positions == sorted(positions)
