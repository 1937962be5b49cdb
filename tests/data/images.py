"""A synthetic image, encoded as the vision API would receive it, for client tests and benchmarks."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from analysis.encode import EncodedImage, encode
from analysis.imaging import DisplayFrame, WindowChoice
from analysis.mosaic import compose_single
from analysis.selection import ChosenFrame, SourceImage


def noise_image(size: int = 512, seed: int = 1) -> EncodedImage:
    pixels = np.random.default_rng(seed).integers(0, 255, size=(size, size), dtype=np.uint8)
    source = SourceImage(
        "1.2.3",
        "1.2",
        "1.2.840.10008.5.1.4.1.1.2",
        Path("/x"),
        "CT",
        (),
        1,
        None,
        None,
        size,
        size,
        1,
        "",
        "",
        "",
    )
    frame = DisplayFrame(pixels, 0, WindowChoice(40, 400, "synthetic"), None)
    return encode(compose_single(ChosenFrame(source, 0, "I1"), frame, 1024, "synthetic"), "jpeg", 5_000_000)
