"""The display pipeline on synthetic arrays with known answers, and on awkward input."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from pydicom import dcmread
from pydicom.dataset import Dataset

from analysis.errors import ImageSkipped
from analysis.imaging import WindowChoice, apply_window, choose_window, render_file, render_frame
from tests.data.generate import sample, write_series


def header(**values: object) -> Dataset:
    ds = Dataset()
    ds.Modality = "MR"
    ds.PhotometricInterpretation = "MONOCHROME2"
    ds.BitsStored = 16
    ds.PixelRepresentation = 0
    for key, value in values.items():
        setattr(ds, key, value)
    return ds


def test_window_maps_exactly_the_edges_of_the_linear_function_to_0_and_255() -> None:
    # PS3.3 C.11.2.1.2.1 with C 40, W 400: x <= -160 is 0, x > 239 is 255, 39.5 is the middle.
    values = np.array([-1000.0, -160.0, -159.0, 39.5, 238.0, 239.0, 239.5, 3000.0], dtype=np.float32)
    out = apply_window(values, WindowChoice(40, 400, "test"))
    assert out.tolist() == [0, 0, 1, 128, 254, 255, 255, 255]
    assert out.dtype == np.uint8


def test_window_of_width_one_is_a_threshold() -> None:
    out = apply_window(np.array([9.0, 9.5, 10.0, 11.0]), WindowChoice(10, 1, "test"))
    assert out.tolist() == [0, 0, 255, 255]


def test_window_width_below_one_is_refused() -> None:
    with pytest.raises(ValueError, match='"width" must be at least 1, got 0'):
        WindowChoice(40, 0, "header")


def test_monochrome1_is_inverted() -> None:
    frame = np.array([[0, 100], [200, 300]], dtype=np.uint16)
    mono2 = render_frame(header(WindowCenter=150.5, WindowWidth=301), frame, 0).pixels
    mono1 = render_frame(
        header(WindowCenter=150.5, WindowWidth=301, PhotometricInterpretation="MONOCHROME1"), frame, 0
    ).pixels
    assert mono2.tolist() == [[0, 85], [170, 255]]
    assert (mono1 == 255 - mono2).all()


def test_rescale_is_applied_before_the_window() -> None:
    # Stored 0 and 2000 with slope 1, intercept -1024 are -1024 and 976 HU; CT chest: lung window.
    frame = np.array([[0, 2000], [424, 474]], dtype=np.uint16)
    ds = header(Modality="CT", BodyPartExamined="CHEST", RescaleSlope=1, RescaleIntercept=-1024)
    shown = render_frame(ds, frame, 0)
    assert shown.window.explanation == "preset lung"
    expected = apply_window(np.array([-1024.0, 976.0, -600.0, -550.0]), WindowChoice(-600, 1500, "x"))
    assert shown.pixels.ravel().tolist() == expected.tolist()


def test_ct_window_follows_the_body_part_and_the_configuration() -> None:
    values = np.zeros((4, 4), dtype=np.float32)
    assert choose_window(header(Modality="CT", BodyPartExamined="HEAD"), values).explanation == "preset brain"
    assert choose_window(header(Modality="CT"), values).explanation == "preset mediastinum"
    custom = choose_window(header(Modality="CT", BodyPartExamined="ABDOMEN"), values, {"ABDOMEN": "bone"})
    assert (custom.center, custom.width) == (400, 1800)
    with pytest.raises(ValueError, match='got "liver"'):
        choose_window(header(Modality="CT", BodyPartExamined="ABDOMEN"), values, {"ABDOMEN": "liver"})


@pytest.mark.parametrize(
    "values",
    [{}, {"WindowCenter": 100, "WindowWidth": 0}, {"WindowCenter": "", "WindowWidth": ""}],
    ids=["absent", "zero-width", "empty"],
)
def test_missing_or_zero_window_falls_back_to_percentiles(values: dict[str, object]) -> None:
    frame = np.arange(10_000, dtype=np.uint16).reshape(100, 100)
    shown = render_frame(header(**values), frame, 0)
    assert shown.window.explanation == "percentiles 1-99"
    assert shown.pixels.min() == 0 and shown.pixels.max() == 255
    assert 100 < float(np.median(shown.pixels)) < 155


def test_header_window_wins_for_non_ct() -> None:
    frame = np.arange(100, dtype=np.uint16).reshape(10, 10)
    shown = render_frame(header(WindowCenter=[50, 10], WindowWidth=[20, 5]), frame, 0)
    assert (shown.window.center, shown.window.width, shown.window.explanation) == (50, 20, "header")


def test_constant_and_tiny_images_are_skipped_with_a_reason() -> None:
    with pytest.raises(ImageSkipped, match="constant image"):
        render_frame(header(), np.full((8, 8), 7, dtype=np.uint16), 0)
    with pytest.raises(ImageSkipped, match="1x1 pixels: too small"):
        render_frame(header(), np.zeros((1, 1), dtype=np.uint16), 0)


def test_float_and_32_bit_pixels_render() -> None:
    floats = np.linspace(-1.0, 1.0, 64 * 64, dtype=np.float32).reshape(64, 64)
    assert render_frame(header(), floats, 0).pixels.std() > 30
    wide = (np.arange(64 * 64, dtype=np.uint32) * 100_000).reshape(64, 64)
    assert render_frame(header(BitsStored=32), wide, 0).pixels.std() > 30
    with_nan = floats.copy()
    with_nan[0, 0] = np.nan
    assert render_frame(header(), with_nan, 0).pixels.dtype == np.uint8


def test_truncated_pixel_data_is_skipped_not_raised(tmp_path: Path) -> None:
    ds = dcmread(sample("CT_small.dcm"))
    ds.PixelData = ds.PixelData[:1000]
    path = tmp_path / "truncated.dcm"
    ds.save_as(path)
    (result,) = list(render_file(path))
    assert isinstance(result, ImageSkipped)
    assert "cannot decode pixels" in str(result)


def test_a_10k_by_10k_image_is_skipped_before_decoding(tmp_path: Path) -> None:
    ds = dcmread(write_series(tmp_path / "cr", 1, source="RG1_UNCI.dcm")[0])
    ds.Rows = ds.Columns = 10_000
    ds.BitsAllocated, ds.BitsStored, ds.HighBit = 8, 8, 7
    ds.PixelData = np.zeros((10_000, 10_000), dtype=np.uint8).tobytes()
    path = tmp_path / "huge.dcm"
    ds.save_as(path)
    (result,) = list(render_file(path))
    assert isinstance(result, ImageSkipped)
    assert "10000x10000 pixels exceeds the limit" in str(result)


def test_a_voi_lut_sequence_is_used_when_there_is_no_window() -> None:
    item = Dataset()
    item.LUTDescriptor = [4, 0, 8]  # 4 entries, first input value 0, 8-bit output
    item.LUTData = [0, 40, 200, 255]
    ds = header(BitsStored=8)
    ds.VOILUTSequence = [item]
    shown = render_frame(ds, np.array([[0, 1], [2, 3]], dtype=np.uint8), 0)
    assert shown.window.explanation == "header VOI LUT"
    assert shown.pixels.tolist() == [[0, 40], [200, 255]]
