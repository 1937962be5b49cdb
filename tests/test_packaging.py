"""``pip install .`` ships the whole node: every module and data file of the source tree is in
the wheel, and the wheel alone, installed in a new virtual environment, runs ``ainode serve``,
``ainode worker`` and ``ainode simulate-vision`` from a folder outside the checkout.

An editable install once hid a package missing from the wheel (analysis.vision); these tests
use the wheel a user gets.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import venv
import zipfile
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from tests.nodes import DCMTK_ENV, free_port, stop_process, wait_for_port

ROOT = Path(__file__).parents[1]
PACKAGES = ("scp", "analysis", "storage", "conf")


@pytest.fixture(scope="module")
def wheel(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The wheel, built from the files the Dockerfile copies (a copy: setuptools writes build/
    beside the sources it builds)."""
    source = tmp_path_factory.mktemp("source")
    for name in ("pyproject.toml", "README.md"):
        shutil.copy(ROOT / name, source / name)
    for package in PACKAGES:
        shutil.copytree(ROOT / package, source / package, ignore=shutil.ignore_patterns("__pycache__"))
    out = tmp_path_factory.mktemp("wheel")
    subprocess.run(
        [
            sys.executable,
            "-m",
            "pip",
            "wheel",
            "--no-deps",
            "--no-build-isolation",
            "-q",
            "-w",
            str(out),
            str(source),
        ],
        check=True,
        capture_output=True,
        timeout=300,
    )
    (built,) = out.glob("ainode-*.whl")
    return built


def _source_files() -> set[str]:
    return {
        path.relative_to(ROOT).as_posix()
        for package in PACKAGES
        for path in (ROOT / package).rglob("*")
        if path.is_file() and "__pycache__" not in path.parts and path.suffix != ".pyc"
    }


def test_the_wheel_holds_every_module_and_data_file_of_the_source_tree(wheel: Path) -> None:
    with zipfile.ZipFile(wheel) as archive:
        shipped = {name for name in archive.namelist() if not name.split("/")[0].endswith(".dist-info")}
    expected = _source_files()
    assert {
        "analysis/vision/client.py",
        "conf/ainode.toml",
        "storage/migrations/script.py.mako",
        "scp/web/templates/study.html",
        "scp/web/static/htmx.min.js",
        "scp/web/static/console.css",
    } <= expected
    assert expected - shipped == set()


@pytest.fixture(scope="module")
def installed(wheel: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Path]:
    """A new virtual environment with the wheel installed. It sees this interpreter's packages
    for the dependencies (no network), but its own copy of ainode comes first."""
    env_dir = tmp_path_factory.mktemp("venv")
    venv.create(env_dir, system_site_packages=True, with_pip=True)
    python = env_dir / "bin" / "python"
    subprocess.run(
        [str(python), "-m", "pip", "install", "-q", "--no-deps", "--force-reinstall", str(wheel)],
        check=True,
        capture_output=True,
        timeout=300,
    )
    yield env_dir / "bin"


def _run(bin_dir: Path, cwd: Path, *args: str, env: dict[str, str] | None = None) -> subprocess.Popen[bytes]:
    with (cwd / f"{args[0]}.log").open("wb") as log:  # the child keeps its own descriptor
        return subprocess.Popen(
            [str(bin_dir / "ainode"), *args], cwd=cwd, stdout=log, stderr=subprocess.STDOUT, env=env
        )


def test_the_installed_wheel_runs_serve_worker_and_the_simulator_outside_the_checkout(
    installed: Path, tmp_path: Path
) -> None:
    outside = tmp_path / "elsewhere"
    outside.mkdir()
    version = subprocess.run(
        [str(installed / "ainode"), "--version"], cwd=outside, capture_output=True, text=True, check=True
    )
    assert version.stdout.startswith("ainode 0.")
    imported = subprocess.run(
        [str(installed / "python"), "-c", "import analysis.vision.client, scp.cli; print(scp.cli.__file__)"],
        cwd=outside,
        capture_output=True,
        text=True,
        check=True,
    )
    assert str(installed.parent) in imported.stdout  # the venv's copy, not the checkout's
    sim_port, dicom_port, http_port = free_port(), free_port(), free_port()
    env = {
        **os.environ,
        "XDG_DATA_HOME": str(tmp_path / "data"),  # where the packaged default keeps the node's files
        "AINODE_VISION__PROVIDER": "simulator",
        "AINODE_VISION__BASE_URL": f"http://127.0.0.1:{sim_port}/v1",
        "AINODE_NODE__HOST": "127.0.0.1",
        "AINODE_NODE__PORT": str(dicom_port),
        "AINODE_HTTP__PORT": str(http_port),
        "AINODE_STORAGE__MIN_FREE_MB": "1",
    }
    simulator = _run(installed, outside, "simulate-vision", "--port", str(sim_port))
    node = _run(installed, outside, "serve", env=env)
    worker = _run(installed, outside, "worker", env=env)
    try:
        try:
            wait_for_port(sim_port, proc=simulator)
            wait_for_port(dicom_port, proc=node)
        except (RuntimeError, TimeoutError) as exc:
            logs = {
                name: (outside / f"{name}.log").read_text() for name in ("simulate-vision", "serve", "worker")
            }
            raise AssertionError(f"{exc}; logs: {logs}") from exc
        echo = subprocess.run(
            ["/usr/bin/echoscu", "-aec", "AINODE", "127.0.0.1", str(dicom_port)],
            env=DCMTK_ENV,
            capture_output=True,
            timeout=30,
        )
        assert echo.returncode == 0, echo.stderr
        assert worker.poll() is None, (outside / "worker.log").read_text()
        # The console renders from the wheel's own templates and serves its vendored htmx.
        wait_for_port(http_port, proc=node)
        page = httpx.get(f"http://127.0.0.1:{http_port}/studies", timeout=30)
        assert page.status_code == 200 and "No study matches." in page.text
        script = httpx.get(f"http://127.0.0.1:{http_port}/static/htmx.min.js", timeout=30)
        assert script.status_code == 200 and script.content.startswith(b"var htmx=")
    finally:
        for proc in (node, worker, simulator):
            stop_process(proc)
    assert (node.returncode, worker.returncode) == (0, 0)  # SIGTERM: a clean stop
    assert (tmp_path / "data" / "ainode" / "var" / "ainode" / "ainode.db").is_file()
    assert not (outside / "var").exists()
