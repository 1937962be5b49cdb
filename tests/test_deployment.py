"""docker-compose.yml agrees with conf/: ports, AE titles, hosts and the mounted configurations."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import yaml

from conf import load_settings

ROOT = Path(__file__).parents[1]


def _compose() -> dict[str, Any]:
    data: dict[str, Any] = yaml.safe_load((ROOT / "docker-compose.yml").read_text())
    return data


def _mounted(service: dict[str, Any], target: str) -> Path:
    for volume in service["volumes"]:
        source, _, rest = volume.partition(":")
        if rest.split(":")[0] == target:
            return ROOT / str(source)
    raise AssertionError(f"nothing mounted at {target}")


def test_compose_wires_ainode_orthanc_and_the_simulator_consistently() -> None:
    services = _compose()["services"]
    ainode, orthanc, simulator = services["ainode"], services["orthanc"], services["simulator"]
    config_path = ainode["environment"]["AINODE_CONFIG"]
    settings = load_settings(_mounted(ainode, config_path))
    assert f"{settings.node.port}:{settings.node.port}" in ainode["ports"]
    assert f"{settings.http.port}:{settings.http.port}" in ainode["ports"]

    orthanc_config = json.loads(_mounted(orthanc, "/etc/orthanc/orthanc.json").read_text())
    (destination,) = settings.destinations
    assert (destination.ae_title, destination.host, destination.port) == (
        orthanc_config["DicomAet"],
        "orthanc",
        orthanc_config["DicomPort"],
    )
    assert f"{orthanc_config['DicomPort']}:{orthanc_config['DicomPort']}" in orthanc["ports"]
    assert orthanc_config["DicomModalities"]["ainode"] == [
        settings.node.ae_title,
        "ainode",
        settings.node.port,
    ]
    assert orthanc_config["DicomAet"] in settings.node.allowed_calling_aets
    for script in orthanc_config["LuaScripts"]:
        assert "/modalities/ainode/store" in _mounted(orthanc, script).read_text()

    command = simulator["command"]
    port = command[command.index("--port") + 1]
    assert settings.vision.provider == "simulator"
    assert settings.vision.base_url == f"http://simulator:{port}/v1" and port in simulator["expose"]
    assert (ROOT / ainode["build"] / "Dockerfile").is_file()
