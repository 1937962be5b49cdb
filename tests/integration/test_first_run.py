"""The first hour, as a newcomer meets it: README's offline loop reaches ``done``; a node with no
API key says so and keeps the studies ``waiting``; a bad database URL is one line, not a
traceback."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import httpx
import pytest
from pydicom import dcmread

from tests.data.generate import write_series
from tests.nodes import DCMTK, DCMTK_ENV, NodeFactory, free_port, simulator, stop_process, wait_for_port

ROOT = Path(__file__).parents[2]
# The console script a user types: `python -m scp.cli` from a folder holding conf/ would put that
# folder first on sys.path.
AINODE = str(Path(sys.executable).with_name("ainode"))


def _ainode(
    *args: str, cwd: Path, env: dict[str, str] | None = None, timeout: float = 60
) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [AINODE, *args],
        cwd=cwd,
        env={**os.environ, **(env or {})},
        capture_output=True,
        text=True,
        timeout=timeout,
    )


@contextmanager
def _storescp(out: Path, port: int) -> Iterator[None]:
    out.mkdir(parents=True, exist_ok=True)
    with (out.parent / "storescp.log").open("wb") as log:
        proc = subprocess.Popen(
            [str(DCMTK / "storescp"), "-od", str(out), str(port)],
            stdout=log,
            stderr=subprocess.STDOUT,
            env=DCMTK_ENV,
        )
    try:
        wait_for_port(port, proc=proc)
        yield
    finally:
        stop_process(proc)


def test_the_readme_offline_loop_reaches_done(tmp_path: Path) -> None:
    """README's commands, from a folder laid out like the checkout (conf/ainode.toml found in the
    working directory), with fresh ports instead of the fixed ones."""
    checkout = tmp_path / "checkout"
    (checkout / "conf").mkdir(parents=True)
    shutil.copy(ROOT / "conf" / "ainode.toml", checkout / "conf" / "ainode.toml")
    dicom_port, http_port, pacs_port = free_port(), free_port(), free_port()
    pacs = tmp_path / "pacs"
    with simulator(tmp_path) as url, _storescp(pacs, pacs_port):
        env = {
            "AINODE_VISION__PROVIDER": "simulator",
            "AINODE_VISION__BASE_URL": url,
            "AINODE_STUDY__SETTLE_SECONDS": "1",
            "AINODE_NODE__HOST": "127.0.0.1",
            "AINODE_NODE__PORT": str(dicom_port),
            "AINODE_HTTP__PORT": str(http_port),
            "AINODE_STORAGE__MIN_FREE_MB": "1",
            "AINODE_DESTINATIONS": json.dumps(
                [{"name": "pacs", "ae_title": "ORTHANC", "host": "127.0.0.1", "port": pacs_port}]
            ),
        }
        with (tmp_path / "node.log").open("wb") as log:
            node = subprocess.Popen(
                [AINODE, "serve"],
                cwd=checkout,
                env={**os.environ, **env},
                stdout=log,
                stderr=subprocess.STDOUT,
            )
        try:
            wait_for_port(dicom_port, proc=node)
            generated = _ainode_module("tests.data.generate", str(tmp_path / "sample"))
            study = generated.split(" of study ")[1].split()[0]
            (tmp_path / "sample" / "README.txt").write_text("not an image")  # folders hold such files
            sent = _ainode(
                "send",
                str(tmp_path / "sample"),
                "--to",
                f"AINODE@127.0.0.1:{dicom_port}",
                cwd=checkout,
                env=env,
            )
            assert sent.returncode == 0, sent.stderr
            assert f"{tmp_path / 'sample' / 'README.txt'}: skipped, not a DICOM file" in sent.stdout
            assert "sent 21 of 21" in sent.stdout
            row = _wait(lambda: _status(checkout, env), study, "done")
        finally:
            stop_process(node)
    assert row["deliveries"][0]["state"] == "sent" and row["sr_sop_instance_uid"]
    received = [p for p in pacs.iterdir() if p.name.startswith("SR")]
    assert len(received) == 1
    # Relative paths in conf/ainode.toml are relative to conf/: the node's files are there.
    assert (checkout / "conf" / "var" / "ainode" / "ainode.db").is_file()
    assert list((checkout / "conf" / "var" / "ainode" / "sr" / study).glob("*.dcm"))
    # ... so the status read from another folder is the same node's.
    elsewhere = _ainode("-c", str(checkout / "conf" / "ainode.toml"), "status", "--json", cwd=tmp_path)
    assert [r["state"] for r in json.loads(elsewhere.stdout)] == ["done"]


def _ainode_module(module: str, *args: str) -> str:
    result = subprocess.run(
        [sys.executable, "-m", module, *args],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=120,
        check=True,
    )
    return result.stdout


def _status(cwd: Path, env: dict[str, str]) -> list[dict[str, Any]]:
    result = _ainode("status", "--json", cwd=cwd, env=env)
    assert result.returncode == 0, result.stderr
    rows: list[dict[str, Any]] = json.loads(result.stdout)
    return rows


def _wait(status: Any, study: str, state: str, timeout: float = 60) -> dict[str, Any]:
    deadline = time.monotonic() + timeout
    rows: list[dict[str, Any]] = []
    while time.monotonic() < deadline:
        rows = status()
        for row in rows:
            if row["study_instance_uid"] == study and row["state"] == state:
                return row
        time.sleep(0.3)
    raise AssertionError(f"study {study} not {state} after {timeout} s: {rows}")


def test_without_a_key_studies_wait_saying_why_and_a_key_finishes_them(
    make_node: NodeFactory, tmp_path: Path
) -> None:
    files = write_series(tmp_path / "ct", 4)
    study = str(dcmread(files[0], stop_before_pixels=True).StudyInstanceUID)
    with simulator(tmp_path, "--api-key", "sk-first-run") as url:
        node = make_node(
            vision={"provider": "holysheep", "base_url": url}, worker={"poll_seconds": 0.2}
        ).start()
        started = (node.workdir / "node.log").read_text()
        assert "no vision API key for holysheep; set AINODE_VISION__API_KEY" in started
        sent = node.cli("send", *map(str, files), "--to", f"AINODE@127.0.0.1:{node.port}")
        assert "sent 4 of 4" in sent.stdout
        row = node.wait_for_state(study, "waiting")
        assert row["last_error"] == "no vision API key for holysheep; set AINODE_VISION__API_KEY"
        table = node.cli("status").stdout
        assert "waiting" in table and "set AINODE_VISION__API_KEY" in table
        health = httpx.get(f"http://127.0.0.1:{node.http_port}/healthz", timeout=10)
        assert health.status_code == 503
        assert health.json()["vision"] == "no vision API key for holysheep; set AINODE_VISION__API_KEY"
        worker = node.cli("worker", check=False)
        assert worker.returncode == 2
        assert (
            worker.stderr.strip()
            == "ainode worker: no vision API key for holysheep; set AINODE_VISION__API_KEY"
        )
        node.stop()
        node.start(env={"AINODE_VISION__API_KEY": "sk-first-run"})  # the same node, now with its key
        done = node.wait_for_state(study, "done", timeout=60)  # no destinations: done once written
    assert done["last_error"] is None and done["sr_sop_instance_uid"]


@pytest.mark.parametrize(
    ("url", "expected"),
    [
        ("postgresql+psycopg://ainode:s3cret-pw@127.0.0.1:1/ainode", "cannot be opened: connection failed"),
        ("postgresql+pg8000://ainode:s3cret-pw@127.0.0.1/ainode", "its database driver is not installed"),
        ("not a url at all", "must be a database URL such as"),
    ],
)
def test_a_database_that_cannot_be_opened_is_one_line_and_exit_2(
    tmp_path: Path, url: str, expected: str
) -> None:
    result = _ainode(
        "status", cwd=tmp_path, env={"AINODE_STORAGE__DATABASE_URL": url, "XDG_DATA_HOME": str(tmp_path)}
    )
    assert result.returncode == 2
    (line,) = result.stderr.strip().splitlines()
    assert expected in line and "s3cret-pw" not in line


def test_a_missing_postgresql_driver_names_the_extra_to_install(tmp_path: Path) -> None:
    code = (
        "import sys; sys.modules['psycopg'] = None\n"  # as on a machine without the driver
        "from scp.cli import main; sys.exit(main(['status']))"
    )
    result = subprocess.run(
        [sys.executable, "-c", code],
        cwd=tmp_path,
        env={
            **os.environ,
            "AINODE_STORAGE__DATABASE_URL": "postgresql+psycopg://postgres@127.0.0.1:5432/test",
            "XDG_DATA_HOME": str(tmp_path),
        },
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert result.returncode == 2
    (line,) = result.stderr.strip().splitlines()
    assert line.endswith('pip install "ainode[postgres]"'), line


def test_complete_queues_a_study_without_waiting_out_the_settle_time(
    make_node: NodeFactory, tmp_path: Path
) -> None:
    files = write_series(tmp_path / "ct", 3)
    study = str(dcmread(files[0], stop_before_pixels=True).StudyInstanceUID)
    node = make_node(study={"settle_seconds": 600}).start()
    assert "sent 3 of 3" in node.cli("send", *map(str, files), "--to", f"AINODE@127.0.0.1:{node.port}").stdout
    assert node.status()[0]["state"] == "receiving"
    done = node.cli("complete", study)
    assert done.stdout.strip() == f"study {study}: queued"
    node.wait_for_state(study, "waiting", timeout=10)  # no API key: queued, then held
    missing = node.cli("complete", "1.2.3.4.5", check=False)
    assert (
        missing.returncode == 1
        and missing.stderr.strip() == "ainode complete: no study 1.2.3.4.5 in the database"
    )
