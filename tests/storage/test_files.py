"""Instance files: atomic install, safe names, leftovers purged, free-space check."""

from __future__ import annotations

from pathlib import Path

import pytest

from storage.errors import DiskFull
from storage.files import InstanceStore, is_safe_uid, sha256_of


def test_install_moves_the_file_into_place_and_prepare_purges_partials(tmp_path: Path) -> None:
    store = InstanceStore(tmp_path)
    store.prepare()
    received = store.tmp_dir / "partial.dcm"
    received.write_bytes(b"dataset bytes")
    digest = sha256_of(received)
    relative = store.relative_path("1.2", "1.2.3", "1.2.3.4", digest)
    final = store.install(received, relative)
    assert final.read_bytes() == b"dataset bytes" and not received.exists()
    assert relative == f"instances/1.2/1.2.3/1.2.3.4.{digest[:16]}.dcm"
    (store.tmp_dir / "left-by-a-crash.dcm").write_bytes(b"half")
    store.prepare()
    assert list(store.tmp_dir.iterdir()) == [] and final.exists()


@pytest.mark.parametrize(
    "uid",
    ["../../etc", "1.2/3", "", "1." + "2" * 70, "1.2.x", "1.2.3\n", "1.02.3", "1..2", ".1.2", "1.2.", " 1.2"],
)
def test_relative_path_refuses_what_is_not_a_uid(tmp_path: Path, uid: str) -> None:
    with pytest.raises(ValueError, match="Argument 'sop' must be a DICOM UID"):
        InstanceStore(tmp_path).relative_path("1.2", "1.2.3", uid, "0" * 64)


def test_free_space_below_the_minimum_is_disk_full(tmp_path: Path) -> None:
    store = InstanceStore(tmp_path)
    store.check_free_space(0)
    with pytest.raises(DiskFull, match=r"below storage\.min_free_mb"):
        store.check_free_space(10**12)


@pytest.mark.parametrize("uid", ["0", "1.2.0.3", "1.2.840.10008.5.1.4.1.1.2", "2.25." + "9" * 39])
def test_conformant_uids_are_safe(uid: str) -> None:
    assert is_safe_uid(uid)
