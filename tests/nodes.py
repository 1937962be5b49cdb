"""Real processes for tests: the node (``ainode serve``), DCMTK tools, Orthanc.

Every process is started with its PID kept and stopped by that PID; nothing listens or connects
anywhere but 127.0.0.1.
"""

from __future__ import annotations

import json
import os
import random
import shutil
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Protocol

import psutil

DCMTK_ENV = {**os.environ, "TCP_NODELAY": "1"}
DCMTK = Path("/usr/bin")  # pynetdicom installs its own storescu/echoscu in the venv: avoid them


# Ports for the processes tests start, below the kernel's ephemeral range (32768-60999 here), in
# a block of their own per pytest-xdist worker. A port the kernel hands out for bind(0) is free only
# until the caller binds it: another worker could be handed the same one meanwhile, or a client
# connection could take it as its source port, and two tests would then talk to each other's peers.
_PORT_BLOCK = 2000
_PORT_BASE = 10000
_PORT_BLOCKS = (32000 - _PORT_BASE) // _PORT_BLOCK
_next_port = random.randrange(_PORT_BLOCK)


def _worker_index() -> int:
    worker = os.environ.get("PYTEST_XDIST_WORKER", "gw0")
    digits = worker.removeprefix("gw")
    return int(digits) % _PORT_BLOCKS if digits.isdigit() else 0


def free_port() -> int:
    """A port on 127.0.0.1 that nothing listens on, from this worker's own block."""
    global _next_port
    base = _PORT_BASE + _worker_index() * _PORT_BLOCK
    for _ in range(_PORT_BLOCK):
        port = base + _next_port % _PORT_BLOCK
        _next_port += 1
        with socket.socket() as sock:
            try:
                sock.bind(("127.0.0.1", port))
            except OSError:
                continue
            return port
    raise RuntimeError(f"no free port in 127.0.0.1:{base}-{base + _PORT_BLOCK - 1}")


def wait_for_port(port: int, timeout: float = 20.0, proc: subprocess.Popen[Any] | None = None) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc is not None and proc.poll() is not None:
            raise RuntimeError(f"process exited with {proc.returncode} before listening on {port}")
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=0.5):
                pass
        except OSError:
            time.sleep(0.05)
            continue
        if proc is None or _listens(proc.pid, port):
            return
        time.sleep(0.05)  # someone else's listener: ours has not bound yet, or will fail to
    raise TimeoutError(f"nothing listening on 127.0.0.1:{port} after {timeout} s")


def _listens(pid: int, port: int) -> bool:
    """Whether the process ``pid`` or one of its descendants listens on ``port``."""
    try:
        process = psutil.Process(pid)
        family = [process, *process.children(recursive=True)]
    except psutil.Error:
        return False
    for member in family:
        try:
            if any(c.status == psutil.CONN_LISTEN and c.laddr.port == port for c in member.net_connections()):
                return True
        except psutil.Error:
            continue
    return False


def _toml_value(value: Any) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, int | float):
        return repr(value)
    if isinstance(value, list | tuple):
        return "[" + ", ".join(_toml_value(v) for v in value) + "]"
    if isinstance(value, dict):  # an inline table
        return "{" + ", ".join(f"{json.dumps(str(k))} = {_toml_value(v)}" for k, v in value.items()) + "}"
    return json.dumps(str(value))


def write_config(path: Path, sections: dict[str, Any]) -> Path:
    """TOML from ``{"section": {...}}``; a list of dicts becomes an array of tables."""
    lines: list[str] = []
    for section, values in sections.items():
        tables = values if isinstance(values, list) else [values]
        for table in tables:
            lines.append(f"[[{section}]]" if isinstance(values, list) else f"[{section}]")
            lines += [f"{key} = {_toml_value(value)}" for key, value in table.items()]
            lines.append("")
    path.write_text("\n".join(lines))
    return path


def stop_process(proc: subprocess.Popen[Any], timeout: float = 15.0) -> None:
    """SIGTERM by PID, then SIGKILL if it does not exit in time."""
    if proc.poll() is None:
        os.kill(proc.pid, signal.SIGTERM)
        try:
            proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            os.kill(proc.pid, signal.SIGKILL)
            proc.wait(timeout=5)


class Node:
    """``ainode serve`` in a subprocess with its own config, storage root and port."""

    def __init__(self, workdir: Path, **sections: Any) -> None:
        self.workdir = workdir
        self.port = free_port()
        self.root = workdir / "var"
        base: dict[str, dict[str, Any]] = {
            "node": {
                "ae_title": "AINODE",
                "host": "127.0.0.1",
                "port": self.port,
                "network_timeout_seconds": 5,
                "acse_timeout_seconds": 5,
            },
            "storage": {
                "root": str(self.root),
                "database_url": f"sqlite:///{self.root}/ainode.db",
                "min_free_mb": 1,
            },
            "study": {"settle_seconds": 1.0},
            "http": {"host": "127.0.0.1", "port": free_port()},
        }
        for name, values in sections.items():
            if isinstance(values, list):
                base[name] = values  # type: ignore[assignment]
            else:
                base.setdefault(name, {}).update(values)
        self.database_url = str(base["storage"]["database_url"])
        self.http_port = int(base["http"]["port"])
        self.config = write_config(workdir / "ainode.toml", base)
        self.log = workdir / "node.log"
        self.proc: subprocess.Popen[bytes] | None = None

    def start(self, command: str = "serve", env: dict[str, str] | None = None) -> Node:
        """``env``: variables added to this process's environment (an API key, say)."""
        with self.log.open("ab") as log:
            self.proc = subprocess.Popen(
                [sys.executable, "-m", "scp.cli", "-c", str(self.config), command],
                stdout=log,
                stderr=subprocess.STDOUT,
                cwd=self.workdir,
                env={**os.environ, **(env or {})},
            )
        wait_for_port(self.port, proc=self.proc)
        if command == "serve":  # its HTTP server (console, /healthz) starts after the DICOM port
            wait_for_port(self.http_port, proc=self.proc)
        return self

    def stop(self) -> None:
        if self.proc is not None:
            stop_process(self.proc)

    def kill9(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            os.kill(self.proc.pid, signal.SIGKILL)
            self.proc.wait(timeout=5)

    def cli(self, *args: str, check: bool = True) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            [sys.executable, "-m", "scp.cli", "-c", str(self.config), *args],
            capture_output=True,
            text=True,
            check=check,
            cwd=self.workdir,
            timeout=60,
        )

    def status(self) -> list[dict[str, Any]]:
        rows: list[dict[str, Any]] = json.loads(self.cli("status", "--json").stdout)
        return rows

    def wait_for_state(self, study_uid: str, state: str, timeout: float = 15.0) -> dict[str, Any]:
        deadline = time.monotonic() + timeout
        while True:
            rows = {r["study_instance_uid"]: r for r in self.status()}
            if rows.get(study_uid, {}).get("state") == state:
                return rows[study_uid]
            if time.monotonic() > deadline:
                raise TimeoutError(f"study {study_uid} not {state} after {timeout} s: {rows.get(study_uid)}")
            time.sleep(0.2)

    def stored_files(self) -> list[Path]:
        return sorted((self.root / "instances").rglob("*.dcm"))


class NodeFactory(Protocol):
    def __call__(self, **sections: Any) -> Node: ...


def dcmtk(tool: str, *args: str, timeout: float = 120.0) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [str(DCMTK / tool), *args],
        capture_output=True,
        text=True,
        env=DCMTK_ENV,
        timeout=timeout,
        check=False,
    )


def have_tool(path: str) -> bool:
    return shutil.which(path) is not None


@contextmanager
def orthanc(
    workdir: Path,
    modalities: dict[str, list[Any]] | None = None,
    dicom_port: int | None = None,
    http_port: int | None = None,
    **extra: Any,
) -> Iterator[dict[str, int]]:
    """Orthanc with a JSON config, listening on fresh (or given) ports; stopped by PID afterwards.
    ``extra``: more of Orthanc's configuration (``LuaScripts``, ``StableAge`` ...)."""
    dicom_port, http_port = dicom_port or free_port(), http_port or free_port()
    config = {
        "Name": "test-orthanc",
        "StorageDirectory": str(workdir / "orthanc-storage"),
        "IndexDirectory": str(workdir / "orthanc-index"),
        "DicomAet": "ORTHANC",
        "DicomPort": dicom_port,
        "HttpPort": http_port,
        "RemoteAccessAllowed": False,
        "AuthenticationEnabled": False,
        "DicomModalities": modalities or {},
        "Plugins": [],
        **extra,
    }
    cfg = workdir / "orthanc.json"
    cfg.write_text(json.dumps(config))
    log = (workdir / "orthanc.log").open("wb")
    proc = subprocess.Popen(
        ["/usr/sbin/Orthanc", str(cfg)], stdout=log, stderr=subprocess.STDOUT, env=DCMTK_ENV
    )
    try:
        wait_for_port(http_port, proc=proc)
        wait_for_port(dicom_port, proc=proc)
        yield {"dicom_port": dicom_port, "http_port": http_port, "pid": proc.pid}
    finally:
        stop_process(proc)
        log.close()


def store_raw(port: int, path: Path, calling_ae: str = "RAWSCU", called_ae: str = "AINODE") -> int:
    """C-STORE the bytes of ``path`` exactly as they are (broken ones included) and return the
    status. pynetdicom's chunked send reads only the file meta and streams the rest unparsed."""
    import pynetdicom
    from pydicom.filereader import read_file_meta_info
    from pynetdicom import AE

    meta = read_file_meta_info(path)
    ae = AE(ae_title=calling_ae)
    ae.acse_timeout = ae.dimse_timeout = ae.network_timeout = 30
    ae.add_requested_context(meta.MediaStorageSOPClassUID, meta.TransferSyntaxUID)
    previous = pynetdicom._config.STORE_SEND_CHUNKED_DATASET
    pynetdicom._config.STORE_SEND_CHUNKED_DATASET = True
    try:
        assoc = ae.associate("127.0.0.1", port, ae_title=called_ae)
        if not assoc.is_established:
            raise RuntimeError(f"association with 127.0.0.1:{port} not established")
        try:
            status = assoc.send_c_store(path)
        finally:
            assoc.release()
    finally:
        pynetdicom._config.STORE_SEND_CHUNKED_DATASET = previous
    return int(status.Status) if "Status" in status else -1


@contextmanager
def simulator(workdir: Path, *flags: str) -> Iterator[str]:
    """``ainode simulate-vision`` in a subprocess on a fresh port; yields its base URL."""
    port = free_port()
    log = (workdir / f"simulator-{port}.log").open("wb")
    proc = subprocess.Popen(
        [sys.executable, "-m", "scp.cli", "simulate-vision", "--port", str(port), *flags],
        stdout=log,
        stderr=subprocess.STDOUT,
    )
    try:
        wait_for_port(port, proc=proc)
        yield f"http://127.0.0.1:{port}/v1"
    finally:
        stop_process(proc)
        log.close()
