"""Image token estimates by each provider's published formula, for budgets and benchmarks.

- OpenAI (GPT-4o / GPT-4.1 family, ``detail: high``): fit within 2048 x 2048, then scale so the
  short side is 768; 170 tokens per 512 px tile plus 85.
- Anthropic (Claude): about width x height / 750, after scaling the long edge to at most 1568.
- Gemini: 258 tokens for an image with both sides at most 384; otherwise 258 per 768 x 768 tile.
"""

from __future__ import annotations

import math
from collections.abc import Callable


def _check(width: int, height: int) -> None:
    if width < 1 or height < 1:
        raise ValueError(f'Arguments "width" and "height" must be positive, got {width} x {height}')


def openai_image_tokens(width: int, height: int) -> int:
    _check(width, height)
    scale = min(1.0, 2048 / max(width, height))
    w, h = width * scale, height * scale
    scale = 768 / min(w, h)  # scaled down (or up) so the short side is 768
    w, h = w * scale, h * scale
    return 85 + 170 * math.ceil(w / 512) * math.ceil(h / 512)


def anthropic_image_tokens(width: int, height: int) -> int:
    _check(width, height)
    scale = min(1.0, 1568 / max(width, height))
    return math.ceil(width * scale * height * scale / 750)


def gemini_image_tokens(width: int, height: int) -> int:
    _check(width, height)
    if width <= 384 and height <= 384:
        return 258
    return 258 * math.ceil(width / 768) * math.ceil(height / 768)


IMAGE_TOKEN_FORMULAS: dict[str, Callable[[int, int], int]] = {
    "openai": openai_image_tokens,
    "anthropic": anthropic_image_tokens,
    "gemini": gemini_image_tokens,
}


def openai_processed_scale(width: int, height: int) -> float:
    """How much OpenAI shrinks an image before the model sees it (``detail: high``): into
    2048 x 2048, then the short side to 768. Upscaling adds no detail, so never above 1."""
    _check(width, height)
    fit = min(1.0, 2048 / max(width, height))
    return fit * min(1.0, 768 / (min(width, height) * fit))


# Anthropic's vision guide: "If your image's long edge is more than 1568 pixels, or your image is
# more than ~1,600 tokens, it will first be scaled down" (docs.anthropic.com/en/docs/vision, read
# 2025). 1,600 tokens at width x height / 750 is 1.2 megapixels.
ANTHROPIC_MAX_PIXELS = 1600 * 750


def anthropic_processed_scale(width: int, height: int) -> float:
    _check(width, height)
    return min(1.0, 1568 / max(width, height), math.sqrt(ANTHROPIC_MAX_PIXELS / (width * height)))


def gemini_processed_scale(width: int, height: int) -> float:
    """Gemini cuts larger images into 768 x 768 tiles at full resolution."""
    _check(width, height)
    return 1.0


PROCESSED_SCALE: dict[str, Callable[[int, int], float]] = {
    "openai": openai_processed_scale,
    "anthropic": anthropic_processed_scale,
    "gemini": gemini_processed_scale,
}
