"""Provider presets (configuration, DESIGN.md §4): where to send, in which wire format, what the
model accepts, what it costs.

Prices are US dollars per million tokens, from the comparison our users start from (the seed
document's table; check your contract). Local servers (vLLM, Ollama) cost nothing per token.

Image limits per preset (images per request, bytes per image and per request, long edge), from the
providers' documentation as read in 2025 (sources beside each preset). One request per study is
enough: at the default budget a 300-slice chest CT is 4 mosaics (benchmarks/imaging.py), far below
every documented per-request image limit, so findings never have to be merged across requests; a
study over a preset's own limit is shown as far as it goes and the rest listed in the manifest.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

Wire = Literal["openai", "anthropic"]
StructuredMode = Literal["json_schema", "json_object", "tool"]
BoxConvention = Literal["fraction", "pixel", "per_mille"]


@dataclass(frozen=True)
class ProviderPreset:
    name: str
    wire: Wire
    base_url: str
    default_model: str
    vision: bool
    structured: StructuredMode
    token_formula: Literal["openai", "anthropic", "gemini"]
    price_input_per_mtok: float
    price_output_per_mtok: float
    max_images: int = 20
    max_bytes_per_image: int = 5_000_000
    max_bytes_per_request: int = 20_000_000
    max_long_edge_px: int = 2048
    box_convention: BoxConvention = "fraction"
    needs_key: bool = True  # local servers (vLLM, Ollama, the simulator) take no API key


PRESETS: dict[str, ProviderPreset] = {
    preset.name: preset
    for preset in (
        ProviderPreset(
            "holysheep",
            "openai",
            "https://api.holysheep.ai/v1",
            "vision-pro",
            True,
            "json_object",
            "openai",
            0.10,
            0.15,
        ),
        ProviderPreset(
            "openai",
            "openai",
            "https://api.openai.com/v1",
            "gpt-4.1",
            True,
            "json_schema",
            "openai",
            2.00,
            8.00,
            # OpenAI vision guide, "Image input requirements": 50 MB payload per request, up to 500
            # images (platform.openai.com/docs/guides/images-vision); we keep 10 images (not
            # re-confirmed against the live page in this change); detail "high" scales into 2048 px,
            # then to a 768 px short side (analysis/vision/tokens.py).
            max_images=10,
            max_bytes_per_image=20_000_000,
            max_bytes_per_request=50_000_000,
        ),
        ProviderPreset(
            "anthropic",
            "anthropic",
            "https://api.anthropic.com/v1",
            "claude-sonnet-4-5",
            True,
            "tool",
            "anthropic",
            3.00,
            15.00,
            # docs.anthropic.com/en/docs/vision (2025): up to 100 images per API request, 32 MB per
            # request, 5 MB per image; over 20 images each is limited to 2000 x 2000 px, so 20 keeps
            # the 8000 px limit; past 1568 px long edge or ~1,600 tokens an image is scaled down.
            max_images=20,
            max_bytes_per_image=5_000_000,
            max_bytes_per_request=32_000_000,
            max_long_edge_px=1568,
            box_convention="pixel",
        ),
        ProviderPreset(
            "gemini",
            "openai",
            "https://generativelanguage.googleapis.com/v1beta/openai",
            "gemini-2.5-flash",
            True,
            "json_schema",
            "gemini",
            0.30,
            2.50,
            # cloud.google.com Vertex AI "Image understanding" (2025): Gemini 2.5 takes up to 3,000
            # images per prompt, 7 MB per inline image; larger images are tiled in 768 x 768 crops.
            max_images=16,
            max_bytes_per_image=7_000_000,
            box_convention="per_mille",
        ),
        ProviderPreset(
            "deepseek",
            "openai",
            "https://api.deepseek.com/v1",
            "deepseek-chat",
            False,
            "json_object",
            "openai",
            0.10,
            0.42,
        ),
        ProviderPreset(
            "vllm",
            "openai",
            "http://127.0.0.1:8000/v1",
            "Qwen/Qwen2.5-VL-7B-Instruct",
            True,
            "json_schema",
            "openai",
            0.0,
            0.0,
            max_images=8,
            needs_key=False,
        ),
        ProviderPreset(
            "ollama",
            "openai",
            "http://127.0.0.1:11434/v1",
            "llama3.2-vision",
            True,
            "json_object",
            "openai",
            0.0,
            0.0,
            max_images=4,
            needs_key=False,
        ),
        ProviderPreset(
            "simulator",
            "openai",
            "http://127.0.0.1:8089/v1",
            "ainode-simulated-vision",
            True,
            "json_schema",
            "openai",
            0.0,
            0.0,
            needs_key=False,
        ),
    )
}


def preset_for(name: str) -> ProviderPreset:
    try:
        return PRESETS[name]
    except KeyError:
        raise ValueError(f'vision.provider must be one of {sorted(PRESETS)}, got "{name}"') from None
