"""Multi-frame images (issue 12): an enhanced CT is a volume whose frames are placed by their
Per-Frame Functional Groups (not by frame number), partitioned into slabs like a series of
single-frame slices; a box on one of its slab tiles lands on the right frame."""

from __future__ import annotations

import random
from pathlib import Path

import numpy as np
from pydicom.uid import UltrasoundMultiFrameImageStorage, generate_uid

from analysis.findings import Box
from analysis.mosaic import ComposedImage, Tile
from analysis.prepare import PreparedStudy
from analysis.regions import SourceRegion, map_box_to_source
from conf import ImagingSettings
from tests.data.ingest import prepared_study
from tests.data.phantom import new_instance, write_enhanced_volume, write_volume


def _box_around(composed: ComposedImage, tile: Tile, column: float, row: float, half: float) -> Box:
    return Box(
        x_min=(tile.x0 + (column - half) * tile.scale) / composed.width,
        y_min=(tile.y0 + (row - half) * tile.scale) / composed.height,
        x_max=(tile.x0 + (column + half) * tile.scale) / composed.width,
        y_max=(tile.y0 + (row + half) * tile.scale) / composed.height,
    )


def test_an_enhanced_ct_is_a_volume_placed_by_its_per_frame_plane_positions(tmp_path: Path) -> None:
    # 24 slices 1.25 mm apart, stored as frames in a shuffled order, each frame with its own
    # Rescale Intercept; a bright dot on slice 13 (the second 10 mm slab).
    slices = [np.full((64, 64), -850.0, dtype=np.float32) for _ in range(24)]
    slices[13][30:33, 40:43] = 300.0
    order = list(range(24))
    random.Random(7).shuffle(order)
    intercepts = [-1024.0 if k % 2 else -1000.0 for k in range(24)]
    positions = [-50.0 + 1.25 * i for i in range(24)]
    path = tmp_path / "in" / "enhanced.dcm"
    path.parent.mkdir()
    write_enhanced_volume(path, slices, positions, 0.7, frame_order=order, intercepts=intercepts)

    # One tile per image, six images: 10 mm slabs in both windows, no thinner.
    prepared, _ = prepared_study([path], tmp_path, ImagingSettings(mosaic_grid=1, max_images=6))
    assert prepared.slab_thickness_mm == 10.0
    assert [e.reason for e in prepared.exclusions] == []
    lung = [i for i, p in enumerate(prepared.plans) if p.window is not None and p.window.name == "lung"]
    tiles = [(prepared.composed[i], t) for i in lung for t in prepared.composed[i].tiles]
    slabs = [t.slab for _, t in tiles]
    # Every frame in exactly one slab, by position, whatever the frame order.
    frames = [m.frame_index for s in slabs if s is not None for m in s.members]
    assert frames == [order.index(i) for i in range(24)]
    assert [len(s.members) for s in slabs if s is not None] == [8, 8, 8]
    entry = prepared.manifest()["images"][lung[1]]["tiles"][0]["slab"]
    assert (entry["first"]["position_mm"], entry["last"]["position_mm"]) == (-40.0, -31.25)
    assert entry["first"]["frame_index"] == order.index(8)

    # The dot is bright in the second slab's MIP (each frame's own rescale applied), and a box
    # on it lands on slice 13's frame.
    composed, tile = tiles[1]
    dot = composed.pixels[round(tile.y0 + 31 * tile.scale), round(tile.x0 + 41 * tile.scale)]
    background = composed.pixels[round(tile.y0 + 10 * tile.scale), round(tile.x0 + 50 * tile.scale)]
    assert int(dot) > int(background) + 60
    region = map_box_to_source(_box_around(composed, tile, 41, 31, 4), composed)
    assert isinstance(region, SourceRegion)
    assert region.frame_index == order.index(13)


def _members(prepared: PreparedStudy, window: str) -> list[list[tuple[str, int]]]:
    """Per image in ``window``: the (SOP Instance UID, frame) of every slice its slabs show."""
    return [
        [(m.image.sop_instance_uid, m.frame_index) for t in image.tiles if t.slab for m in t.slab.members]
        for plan, image in zip(prepared.plans, prepared.composed, strict=True)
        if plan.window is not None and plan.window.name == window
    ]


def test_frame_stacks_at_the_same_positions_are_shown_apart(tmp_path: Path) -> None:
    """Two stacks (Stack ID 1 and 2) over the same 24 positions: two volumes, never one slab
    holding both (a MIP would show only the brighter stack)."""
    dark = [np.full((64, 64), -850.0, dtype=np.float32) for _ in range(24)]
    bright = [np.full((64, 64), 200.0, dtype=np.float32) for _ in range(24)]
    path = tmp_path / "e.dcm"
    positions = [1.25 * i for i in range(24)] * 2
    write_enhanced_volume(path, dark + bright, positions, 0.7, stacks=["1"] * 24 + ["2"] * 24)
    prepared, _ = prepared_study([path], tmp_path, ImagingSettings(mosaic_grid=4, max_images=4))
    manifest = prepared.manifest()
    stacks = [(image["stack"], image["window"].split(" window")[0]) for image in manifest["images"]]
    assert sorted(stacks) == [
        ("frame stack 1 of 2", "lung"),
        ("frame stack 1 of 2", "mediastinum"),
        ("frame stack 2 of 2", "lung"),
        ("frame stack 2 of 2", "mediastinum"),
    ]
    lung = _members(prepared, "lung")
    assert sorted(frame for _, frame in lung[0]) == list(range(24))
    assert sorted(frame for _, frame in lung[1]) == list(range(24, 48))
    assert "stack 2 of 2" in prepared.prompt and "every slice of the stack (24)" in prepared.prompt


def test_a_series_acquired_twice_is_two_stacks_and_a_slice_sent_twice_is_not(tmp_path: Path) -> None:
    phases = [np.full((64, 64), v, dtype=np.float32) for v in [-850.0] * 16 + [300.0] * 16]
    paths, _, _ = write_volume(
        tmp_path / "a", phases, [1.25 * i for i in range(16)] * 2, 0.7, body_part="CHEST"
    )
    prepared, _ = prepared_study(paths, tmp_path / "a", ImagingSettings(mosaic_grid=4, max_images=4))
    lung = _members(prepared, "lung")
    assert [len(image) for image in lung] == [16, 16]
    assert not {uid for uid, _ in lung[0]} & {uid for uid, _ in lung[1]}

    once = [np.full((64, 64), -850.0, dtype=np.float32) for _ in range(17)]
    positions = [1.25 * i for i in range(16)] + [1.25 * 5]  # slice 5 again, as a new instance
    paths, _, _ = write_volume(tmp_path / "b", once, positions, 0.7, body_part="CHEST")
    prepared, _ = prepared_study(paths, tmp_path / "b", ImagingSettings(mosaic_grid=4, max_images=4))
    lung = _members(prepared, "lung")
    assert len(lung) == 1 and len(lung[0]) == len(set(lung[0])) == 17  # each in exactly one slab


def test_an_enhanced_series_in_several_files_is_one_volume(tmp_path: Path) -> None:
    slices = [np.full((64, 64), -850.0, dtype=np.float32) for _ in range(24)]
    positions = [1.25 * i for i in range(24)]
    study = "1.2.826.0.1.3680043.8.498.77"
    first, second = tmp_path / "1.dcm", tmp_path / "2.dcm"
    _, series = write_enhanced_volume(first, slices[12:], positions[12:], 0.7, study_instance_uid=study)
    write_enhanced_volume(
        second, slices[:12], positions[:12], 0.7, study_instance_uid=study, series_instance_uid=series
    )
    prepared, _ = prepared_study([first, second], tmp_path, ImagingSettings(mosaic_grid=4, max_images=4))
    lung = [member for image in _members(prepared, "lung") for member in image]
    assert len(lung) == len(set(lung)) == 24 and {frame for _, frame in lung} == set(range(12))
    plan = next(p for p in prepared.plans if p.window is not None and p.window.name == "lung")
    assert [f.slice_position_mm for f in plan.series.frames] == positions  # across the two files


def _ultrasound_cine(path: Path, frames: int, rows: int = 120, columns: int = 160) -> None:
    """An Ultrasound Multi-frame Image, grey, frame k filled with 5 k (so each tile says which
    frame it is), without BurnedInAnnotation (so it is masked before it leaves)."""
    ds = new_instance(path, UltrasoundMultiFrameImageStorage)
    ds.StudyInstanceUID, ds.SeriesInstanceUID = generate_uid(), generate_uid()
    ds.Modality, ds.ImageType = "US", ["ORIGINAL", "PRIMARY"]
    ds.Rows, ds.Columns, ds.NumberOfFrames = rows, columns, frames
    ds.SamplesPerPixel, ds.PhotometricInterpretation = 1, "MONOCHROME2"
    ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 8, 8, 7, 0
    ds.FrameTime, ds.FrameIncrementPointer = 33.3, 0x00181063
    ds.WindowCenter, ds.WindowWidth = 127.5, 256  # shown as stored
    ds.PixelData = np.stack(
        [np.full((rows, columns), 5 * k, dtype=np.uint8) for k in range(frames)]
    ).tobytes()
    ds.save_as(path, enforce_file_format=True)


def test_an_ultrasound_cine_is_shown_by_frames_spread_over_the_loop(tmp_path: Path) -> None:
    path = tmp_path / "cine.dcm"
    _ultrasound_cine(path, 40)
    settings = ImagingSettings(unlabelled_burned_in={"US": "mask"})
    prepared, _ = prepared_study([path], tmp_path, settings)
    (composed,) = prepared.composed
    assert [t.frame_index for t in composed.tiles] == [0, 13, 26, 39]  # first to last, evenly
    assert [t.label for t in composed.tiles] == ["F1", "F14", "F27", "F40"]
    for tile in composed.tiles:  # each tile its own frame, its top band masked
        below_mask = composed.pixels[tile.y0 + tile.height - 5, tile.x0 + tile.width // 2]
        top_band = composed.pixels[tile.y0 + 3, tile.x0 + tile.width - 5]
        assert int(top_band) == 0 and abs(int(below_mask) - 5 * tile.frame_index) <= 1
    entry = prepared.manifest()["images"][0]
    assert entry["kind"] == "cine" and [t["frame_index"] for t in entry["tiles"]] == [0, 13, 26, 39]
    assert "a cine loop of 40 frames shown by 4 of them spread evenly over it (frames 1, 14, 27, 40)" in (
        prepared.prompt
    )
    # A box on the third tile is on frame 27.
    tile = composed.tiles[2]
    region = map_box_to_source(_box_around(composed, tile, 80, 80, 10), composed)
    assert region is not None and region.frame_index == 26
