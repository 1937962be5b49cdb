"""Mosaic layout and the mapping from output pixels back to source pixels."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from analysis.encode import encode
from analysis.errors import ImageSkipped
from analysis.imaging import DisplayFrame, WindowChoice
from analysis.mosaic import compose_mosaic, compose_single
from analysis.selection import ChosenFrame, SourceImage

WINDOW = WindowChoice(40, 400, "preset mediastinum")


def chosen(n: int) -> ChosenFrame:
    source = SourceImage(
        sop_instance_uid=f"1.{n}",
        series_instance_uid="1",
        sop_class_uid="1.2.840.10008.5.1.4.1.1.2",
        path=Path("/x"),
        modality="CT",
        image_type=(),
        instance_number=n,
        position=None,
        orientation=None,
        rows=None,
        columns=None,
        number_of_frames=1,
        burned_in_annotation="",
        body_part_examined="",
        view_position="",
    )
    return ChosenFrame(source, 0, f"S{n + 1}")


def test_a_box_in_the_mosaic_maps_back_to_its_slice_and_pixel() -> None:
    # Ten slices of odd, differing sizes, each with one bright marker at a known pixel.
    sizes = [(512, 512), (511, 257), (300, 600), (64, 64)] * 2 + [(512, 512), (257, 511)]
    markers = []
    frames = []
    for n, (rows, columns) in enumerate(sizes):
        pixels = np.zeros((rows, columns), dtype=np.uint8)
        r, c = rows * (n + 1) // 12, columns * (11 - n) // 12
        pixels[max(r - 2, 0) : r + 3, max(c - 2, 0) : c + 3] = 255
        markers.append((r, c))
        frames.append((chosen(n), DisplayFrame(pixels, 0, WINDOW, (0.7, 0.7))))
    image = compose_mosaic(frames, tile_px=256, description="test")
    assert (image.width, image.height) == (4 * 256, 3 * 256)
    for n, (r, c) in enumerate(markers):
        tile = image.tiles[n]
        x, y = tile.x0 + c * tile.scale, tile.y0 + r * tile.scale
        found = image.to_source(x, y)
        assert found is not None
        hit, sx, sy = found
        assert hit.sop_instance_uid == f"1.{n}" and hit.label == f"S{n + 1}"
        assert abs(sx - c) <= 1 and abs(sy - r) <= 1
        assert image.pixels[int(y), int(x)] > 100  # the marker is really drawn there
    assert image.to_source(3 * 256 + 100, 2 * 256 + 100) is None  # an empty cell


def test_single_image_is_scaled_down_to_the_long_edge_never_up() -> None:
    big = DisplayFrame(np.zeros((2000, 1500), dtype=np.uint8), 0, WINDOW, None)
    small = DisplayFrame(np.zeros((300, 200), dtype=np.uint8), 0, WINDOW, None)
    assert compose_single(chosen(0), big, 1024, "x").pixels.shape == (1024, 768)
    assert compose_single(chosen(0), small, 1024, "x").pixels.shape == (300, 200)


def test_encoding_steps_quality_down_to_fit_and_says_when_it_cannot() -> None:
    noise = np.random.default_rng(0).integers(0, 256, size=(512, 512), dtype=np.uint8)
    image = compose_single(chosen(0), DisplayFrame(noise, 0, WINDOW, None), 1024, "noise")
    roomy = encode(image, "jpeg", 10_000_000)
    tight = encode(image, "jpeg", len(roomy.data) - 1)
    assert len(tight.data) < len(roomy.data) and tight.media_type == "image/jpeg"
    assert encode(image, "png", 10_000_000).data.startswith(b"\x89PNG")
    with pytest.raises(ImageSkipped, match="over 2000"):
        encode(image, "jpeg", 2000)


def test_a_model_box_on_a_mosaic_lands_on_the_right_slice_in_source_pixels() -> None:
    from analysis.findings import Box
    from analysis.regions import map_box_to_source

    frames = [
        (chosen(n), DisplayFrame(np.zeros((512, 512), dtype=np.uint8), 0, WINDOW, (0.5, 0.5)))
        for n in range(16)
    ]
    image = compose_mosaic(frames, tile_px=256, description="test")  # 4 x 4, scale 0.5
    # A box in tile S7 (row 1, column 2): output x 512+64..512+128, y 256+32..256+96.
    box = Box(x_min=576 / 1024, y_min=288 / 1024, x_max=640 / 1024, y_max=352 / 1024)
    region = map_box_to_source(box, image)
    assert region is not None and region.sop_instance_uid == "1.6"
    assert (region.column_min, region.row_min, region.column_max, region.row_max) == (128, 64, 256, 192)
    assert region.long_axis_mm() == 64.0
    assert region.corners()[0] == region.corners()[-1]
    # A box straddling two tiles is clipped to the tile under its centre.
    wide = map_box_to_source(Box(x_min=0.20, y_min=0.05, x_max=0.30, y_max=0.10), image)
    assert wide is not None and wide.sop_instance_uid == "1.1" and wide.column_min == 0.0
