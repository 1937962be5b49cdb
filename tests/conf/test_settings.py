"""Configuration: TOML, environment overrides, one-line errors."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from conf import ConfigError, load_settings
from conf.settings import default_config_path


def test_packaged_default_loads_and_environment_overrides_it(monkeypatch: pytest.MonkeyPatch) -> None:
    packaged = Path(__file__).parents[2] / "conf" / "ainode.toml"
    defaults = load_settings(packaged)
    assert (defaults.node.ae_title, defaults.node.port, defaults.study.settle_seconds) == (
        "AINODE",
        11112,
        10,
    )
    assert defaults.destinations[0].ae_title == "ORTHANC"
    monkeypatch.setenv("AINODE_NODE__PORT", "11999")
    monkeypatch.setenv("AINODE_STUDY__SETTLE_SECONDS", "2.5")
    overridden = load_settings(packaged)
    assert (overridden.node.port, overridden.study.settle_seconds) == (11999, 2.5)
    assert overridden.node.ae_title == "AINODE"  # the rest still comes from the file


def test_config_path_prefers_the_environment(tmp_path: Path) -> None:
    assert default_config_path({"AINODE_CONFIG": "/x/y.toml"}) == Path("/x/y.toml")


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ('[node]\nae_title = "WAY_TOO_LONG_AE_TITLE"\n', r"node.ae_title.*WAY_TOO_LONG_AE_TITLE"),
        ("[node]\nport = 70000\n", r"node.port.*70000"),
        ("[nodee]\nport = 1\n", r"nodee"),
        ("[node\n", r"not valid TOML"),
    ],
)
def test_bad_configuration_is_one_clear_line(tmp_path: Path, text: str, message: str) -> None:
    path = tmp_path / "bad.toml"
    path.write_text(text)
    with pytest.raises(ConfigError, match=message):
        load_settings(path)


def test_cli_exits_non_zero_with_a_one_line_reason(tmp_path: Path) -> None:
    path = tmp_path / "bad.toml"
    path.write_text("[storage]\nmin_free_mb = -5\n")
    result = subprocess.run(
        [sys.executable, "-m", "scp.cli", "-c", str(path), "status"],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert result.returncode == 2
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and "storage.min_free_mb" in lines[0] and "-5" in lines[0]
