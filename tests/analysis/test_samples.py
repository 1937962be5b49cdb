"""Every kind of sample file renders to something a person would recognise as an image."""

from __future__ import annotations

import numpy as np
import pytest
from pydicom import dcmread

from analysis.imaging import DisplayFrame, render_file
from tests.data.generate import sample

SAMPLES = {
    # CT 512 x 512 of a head, native, without Body Part Examined: its own brain window says so.
    "693_UNCI.dcm": "preset brain (head: the header's window is a brain window (C 40, W 100))",
    "693_J2KR.dcm": "preset brain (head: the header's window is a brain window (C 40, W 100))",
    "CT_small.dcm": "preset mediastinum",
    "MR_small.dcm": "header",
    "MR_small_RLE.dcm": "header",
    "emri_small_jpeg_ls_lossless.dcm": "percentiles 1-99",  # JPEG-LS, 10 frames
    "RG1_UNCI.dcm": "header",  # CR MONOCHROME1
    "JPEG2000.dcm": "percentiles 1-99",  # NM, JPEG 2000, no window in the header
    "US1_UNCI.dcm": "rgb",
    "US1_J2KR.dcm": "rgb",  # YBR_RCT
    "color3d_jpeg_baseline.dcm": "rgb",  # YBR_FULL_422, 120 frames, JPEG baseline
    "OBXXXX1A.dcm": "palette",  # PALETTE COLOR
    "SC_rgb_jpeg_dcmtk.dcm": "rgb",  # YBR_FULL JPEG baseline
    "JPGLosslessP14SV1_1s_1f_8b.dcm": "header",  # JPEG lossless
}


@pytest.mark.parametrize(("name", "window"), SAMPLES.items())
def test_sample_renders_with_contrast(name: str, window: str) -> None:
    path = sample(name)
    frames = int(dcmread(path, stop_before_pixels=True).get("NumberOfFrames", 1) or 1)
    wanted = sorted({0, frames // 2, frames - 1})
    results = list(render_file(path, wanted))
    assert all(isinstance(r, DisplayFrame) for r in results), results
    for result in results:
        assert isinstance(result, DisplayFrame)
        assert result.pixels.dtype == np.uint8
        assert result.window.explanation == window
        assert result.pixels.std() > 10, f"{name} frame {result.frame_index} is nearly flat"
    assert [r.frame_index for r in results if isinstance(r, DisplayFrame)] == wanted


def test_monochrome1_chest_is_shown_with_bright_bones_and_dark_lungs() -> None:
    (frame,) = list(render_file(sample("RG1_UNCI.dcm")))
    assert isinstance(frame, DisplayFrame)
    rows, columns = frame.pixels.shape
    lung = frame.pixels[rows // 3 : rows // 2, columns // 5 : columns // 3].mean()
    spine = frame.pixels[rows // 3 : rows // 2, columns // 2 - 20 : columns // 2 + 20].mean()
    assert spine > lung + 30  # inverted correctly: air dark, mediastinum and spine bright
