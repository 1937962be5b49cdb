"""Every provider preset's wire mode, end to end: Orthanc pushes a study, the node asks the
strict simulator in that preset's wire format (json_object with the schema written out,
json_schema, per-mille boxes, Anthropic tool use) and one valid SR with the model's region
comes back into Orthanc."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import httpx
import pytest
from pydicom import dcmread
from pydicom.dataset import Dataset

from tests.integration.loop import (
    check_sr,
    identifying_study,
    node_with_orthanc,
    push_from_orthanc,
    sr_in_orthanc,
)
from tests.nodes import NodeFactory, orthanc, simulator

API_KEY = "sk-provider-test-4b1f"


def _scoords(items: Any) -> list[Dataset]:
    found: list[Dataset] = []
    for item in items or []:
        if item.get("ValueType") == "SCOORD":
            found.append(item)
        found += _scoords(item.get("ContentSequence"))
    return found


def _sr_from_orthanc(http_port: int, study: str, tmp_path: Path) -> Dataset:
    (instance,) = sr_in_orthanc(http_port, study)
    with httpx.Client(base_url=f"http://127.0.0.1:{http_port}", timeout=30) as client:
        path = tmp_path / "sr-from-orthanc.dcm"
        path.write_bytes(client.get(f"/instances/{instance}/file").content)
    return dcmread(path)


@pytest.mark.parametrize(
    ("provider", "wire_mode", "keyed"),
    [
        ("holysheep", "json_object", True),
        ("openai", "json_schema", True),
        ("gemini", "json_schema", True),  # boxes in thousandths
        ("anthropic", "tool", True),  # boxes in pixels, /v1/messages
        ("ollama", "json_object", False),
    ],
)
def test_each_wire_mode_turns_an_orthanc_study_into_one_valid_sr(
    make_node: NodeFactory, tmp_path: Path, provider: str, wire_mode: str, keyed: bool
) -> None:
    study, files = identifying_study(tmp_path)
    record = tmp_path / "requests.jsonl"
    flags = ["--record", str(record), *(["--api-key", API_KEY] if keyed else [])]
    with simulator(tmp_path, *flags) as url, orthanc(tmp_path) as ports:
        node = node_with_orthanc(
            make_node,
            url,
            ports,
            env={"AINODE_VISION__API_KEY": API_KEY} if keyed else None,
            vision={"provider": provider, "requests_per_minute": 0},
        )
        push_from_orthanc(ports["http_port"], files)
        check_sr(tmp_path, node, study, ports["http_port"], record)  # valid, done, nothing identifying
        sr = _sr_from_orthanc(ports["http_port"], study, tmp_path)
    (request,) = [json.loads(line) for line in record.read_text().splitlines()]  # one call, no repair
    if wire_mode == "tool":
        assert request["tool_choice"] == {"type": "tool", "name": "report_findings"}
        schema = request["tools"][0]["input_schema"]
    elif wire_mode == "json_schema":
        schema = request["response_format"]["json_schema"]["schema"]
    else:
        assert request["response_format"] == {"type": "json_object"}
        schema = json.loads(request["messages"][0]["content"].split("\n")[-1])
    images = sum(
        1
        for message in request["messages"]
        if isinstance(message["content"], list)
        for part in message["content"]
        if part["type"] in ("image", "image_url")
    )
    assert schema["properties"]["findings"]["items"]["properties"]["image_index"]["maximum"] == images
    # The simulated finding's box, in this preset's convention, became a region on a source image.
    (region,) = _scoords(sr.ContentSequence)
    points = [float(v) for v in region.GraphicData]
    assert len(points) == 10 and min(points) >= 0 and max(points) <= 512
    assert "SIMULATED" in str(sr.ContentSequence)


def test_a_route_to_another_provider_sends_its_own_key_there(make_node: NodeFactory, tmp_path: Path) -> None:
    """Two strict simulators, each accepting only its own key: the default provider (OpenAI
    wire) and a route's (Anthropic wire). A CT study routed to the second is answered there with
    the route's key; the default provider's key never reaches it (it would answer 401)."""
    study, files = identifying_study(tmp_path)
    default_record, route_record = tmp_path / "default.jsonl", tmp_path / "route.jsonl"
    route_key = "sk-ant-route-only-77c2"
    with (
        simulator(tmp_path, "--record", str(default_record), "--api-key", API_KEY) as default_url,
        simulator(tmp_path, "--record", str(route_record), "--api-key", route_key) as route_url,
        orthanc(tmp_path) as ports,
    ):
        node = node_with_orthanc(
            make_node,
            default_url,
            ports,
            env={"AINODE_VISION__API_KEY": API_KEY, "ROUTE_CLAUDE_KEY": route_key},
            vision={"provider": "openai", "requests_per_minute": 0, "max_retries": 0},
            routes=[
                {
                    "name": "ct-claude",
                    "modalities": ["CT"],
                    "provider": "anthropic",
                    "base_url": route_url,
                    "api_key_env": "ROUTE_CLAUDE_KEY",
                }
            ],
        )
        push_from_orthanc(ports["http_port"], files)
        check_sr(tmp_path, node, study, ports["http_port"], route_record)  # valid, done, nothing identifying
    assert not default_record.exists() or default_record.read_text() == ""  # the default was not asked
    (request,) = [json.loads(line) for line in route_record.read_text().splitlines()]  # answered at once
    assert request["tool_choice"] == {"type": "tool", "name": "report_findings"}  # Anthropic's wire
    assert (
        API_KEY not in (node.workdir / "node.log").read_text()
        and route_key not in (node.workdir / "node.log").read_text()
    )
