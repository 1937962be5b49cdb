"""Encode composed images for the API: JPEG through Pillow's libjpeg-turbo, or PNG, within a
provider's per-image byte limit."""

from __future__ import annotations

import hashlib
import io
from dataclasses import dataclass

from PIL import Image

from analysis.errors import ImageSkipped
from analysis.mosaic import ComposedImage

JPEG_QUALITY_STEPS = (85, 75, 60, 45)


@dataclass(frozen=True)
class EncodedImage:
    data: bytes
    media_type: str  # "image/jpeg" or "image/png"
    width: int
    height: int

    @property
    def sha256(self) -> str:
        return hashlib.sha256(self.data).hexdigest()

    @property
    def suffix(self) -> str:
        return ".jpg" if self.media_type == "image/jpeg" else ".png"


def encode(image: ComposedImage, image_format: str, max_bytes: int, quality: int = 85) -> EncodedImage:
    """Encode ``image``; for JPEG step the quality down until it fits ``max_bytes``."""
    if image_format not in ("jpeg", "png"):
        raise ValueError(f'Argument "image_format" must be "jpeg" or "png", got "{image_format}"')
    if max_bytes < 1024:
        raise ValueError(f'Argument "max_bytes" must be at least 1024, got {max_bytes}')
    pil = Image.fromarray(image.pixels)
    qualities = [quality, *(q for q in JPEG_QUALITY_STEPS if q < quality)] if image_format == "jpeg" else [0]
    size = 0
    for q in qualities:
        buffer = io.BytesIO()
        if image_format == "jpeg":
            pil.save(buffer, format="JPEG", quality=q)
        else:
            pil.save(buffer, format="PNG", compress_level=6)
        data = buffer.getvalue()
        size = len(data)
        if size <= max_bytes:
            media_type = "image/jpeg" if image_format == "jpeg" else "image/png"
            return EncodedImage(data, media_type, image.width, image.height)
    raise ImageSkipped(f"{image.description}: {size} bytes even at the lowest quality, over {max_bytes}")
