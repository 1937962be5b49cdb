"""Provider presets (configuration, DESIGN.md §4): where to send, in which wire format, what the
model accepts, what it costs.

Prices are US dollars per million tokens, from the comparison our users start from (the seed
document's table; check your contract). Local servers (vLLM, Ollama) cost nothing per token.
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
