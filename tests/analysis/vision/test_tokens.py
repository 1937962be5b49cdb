"""Token formulas against the providers' own worked examples."""

from __future__ import annotations

import pytest

from analysis.vision.tokens import anthropic_image_tokens, gemini_image_tokens, openai_image_tokens


def test_openai_tile_formula_matches_the_documented_examples() -> None:
    assert openai_image_tokens(1024, 1024) == 765  # -> 768 x 768, 4 tiles
    assert openai_image_tokens(2048, 4096) == 1105  # -> 1024 x 2048 -> 768 x 1536, 6 tiles
    assert openai_image_tokens(512, 512) == 765  # scaled up to a 768 short side


def test_anthropic_is_area_over_750_after_the_long_edge_limit() -> None:
    assert anthropic_image_tokens(1000, 1000) == 1334
    assert anthropic_image_tokens(3136, 3136) == anthropic_image_tokens(1568, 1568) == 3279


def test_gemini_counts_768_tiles() -> None:
    assert gemini_image_tokens(384, 384) == 258
    assert gemini_image_tokens(1024, 1024) == 4 * 258


def test_sizes_are_checked() -> None:
    with pytest.raises(ValueError, match="must be positive, got 0 x 5"):
        openai_image_tokens(0, 5)
