"""Ingest over real sockets: DCMTK as the modality, the node as a subprocess."""

from __future__ import annotations

import copy
import subprocess
import warnings
from pathlib import Path

import pytest
from pydicom import dcmread
from pydicom.uid import UID, generate_uid

from tests.data.generate import assert_same_dataset, dataset_bytes, sample, write_series
from tests.nodes import Node, NodeFactory, dcmtk, store_raw


def _stored_by_sop(node: Node) -> dict[str, Path]:
    """Stored files by SOP Instance UID (the name is ``<sop>.<sha256[:16]>.dcm``)."""
    return {p.name.rsplit(".", 2)[0]: p for p in node.stored_files()}


def test_echoscu_and_storescu_series_arrive_intact(make_node: NodeFactory, tmp_path: Path) -> None:
    node = make_node().start()
    echo = dcmtk("echoscu", "-aec", "AINODE", "127.0.0.1", str(node.port))
    assert echo.returncode == 0, echo.stderr
    files = write_series(tmp_path / "ct", 20)
    sent = dcmtk(
        "storescu", "-aet", "CT_SCANNER", "-aec", "AINODE", "127.0.0.1", str(node.port), *map(str, files)
    )
    assert sent.returncode == 0, sent.stderr
    stored = _stored_by_sop(node)
    assert len(stored) == 20
    for path in files:
        ds = dcmread(path, stop_before_pixels=True)
        assert_same_dataset(stored[ds.SOPInstanceUID], path)
    study_uid = str(dcmread(files[0], stop_before_pixels=True).StudyInstanceUID)
    row = node.wait_for_state(study_uid, "waiting")
    assert (row["instance_count"], row["series_count"], row["calling_ae_title"]) == (20, 1, "CT_SCANNER")
    # Without an API key the node keeps the study, queued, and says why it waits.
    assert row["sr_sop_instance_uid"] is None
    assert row["last_error"] == "no vision API key for holysheep; set AINODE_VISION__API_KEY"


COMPRESSED = [
    "JPEG2000.dcm",
    "MR_small_RLE.dcm",
    "emri_small_jpeg_ls_lossless.dcm",
    "SC_rgb_jpeg_dcmtk.dcm",
    "JPGLosslessP14SV1_1s_1f_8b.dcm",
    "US1_J2KR.dcm",
    "OBXXXX1A_rle.dcm",
]


def test_compressed_syntaxes_arrive_as_sent_with_dcmsend(make_node: NodeFactory) -> None:
    node = make_node().start()
    files = [sample(name) for name in COMPRESSED]
    sent = dcmtk("dcmsend", "-aec", "AINODE", "127.0.0.1", str(node.port), *map(str, files))
    assert sent.returncode == 0, sent.stderr
    stored = _stored_by_sop(node)
    for path in files:
        assert_same_dataset(stored[dcmread(path, stop_before_pixels=True).SOPInstanceUID], path)


@pytest.mark.parametrize("name", [*COMPRESSED, "CT_small.dcm", "OBXXXX1A_expb.dcm", "image_dfl.dcm"])
def test_every_syntax_is_stored_byte_for_byte_as_received(make_node: NodeFactory, name: str) -> None:
    """A sender that streams the file's bytes verbatim gets exactly those bytes stored."""
    node = make_node().start()
    path = sample(name)
    assert store_raw(node.port, path) == 0
    (stored,) = node.stored_files()
    assert dataset_bytes(stored) == dataset_bytes(path)


def test_unknown_calling_ae_is_rejected_at_association(make_node: NodeFactory) -> None:
    node = make_node(node={"allowed_calling_aets": ["CT_SCANNER"]}).start()
    refused = dcmtk("echoscu", "-aet", "INTRUDER", "-aec", "AINODE", "127.0.0.1", str(node.port))
    assert refused.returncode != 0
    assert "Calling AE Title Not Recognized" in refused.stderr + refused.stdout
    allowed = dcmtk("echoscu", "-aet", "CT_SCANNER", "-aec", "AINODE", "127.0.0.1", str(node.port))
    assert allowed.returncode == 0, allowed.stderr


def _meta_end(raw: bytes) -> int:
    return 144 + int.from_bytes(raw[140:144], "little")


def test_broken_datasets_get_failure_statuses_and_the_node_keeps_serving(
    make_node: NodeFactory, tmp_path: Path
) -> None:
    node = make_node().start()
    source = write_series(tmp_path / "ct", 1)[0]
    raw = source.read_bytes()
    truncated = tmp_path / "truncated.dcm"
    truncated.write_bytes(raw[:-5000])
    garbage = tmp_path / "garbage.dcm"
    garbage.write_bytes(raw[: _meta_end(raw)] + bytes(range(7, 256)) * 100)
    other_uid = tmp_path / "other_uid.dcm"  # the request names one instance, the data another
    ds = dcmread(source)
    ds.SOPInstanceUID = generate_uid()
    ds.save_as(other_uid)
    ds = dcmread(other_uid)
    ds.file_meta.MediaStorageSOPInstanceUID = dcmread(source).SOPInstanceUID
    ds.save_as(other_uid)

    assert store_raw(node.port, truncated) == 0xC000
    assert store_raw(node.port, garbage) == 0xC000
    assert store_raw(node.port, other_uid) == 0xA900
    assert store_raw(node.port, sample("MR_truncated.dcm")) == 0xC000
    invalid_vr = tmp_path / "invalid_vr.dcm"  # a private element whose VR is no VR ('ZZ')
    invalid_vr.write_bytes(raw.replace(b"\x08\x00\x60\x00CS", b"\x08\x00\x60\x00ZZ", 1))
    assert invalid_vr.read_bytes() != raw
    assert store_raw(node.port, invalid_vr) == 0xC000
    with warnings.catch_warnings():  # pydicom warns of the very UIDs we mean to send
        warnings.simplefilter("ignore")
        ds = dcmread(source)  # a UID with a leading zero in a component
        ds.SOPInstanceUID = ds.file_meta.MediaStorageSOPInstanceUID = UID("1.2.826.0.1.3680043.99.02")
        leading_zero = tmp_path / "leading_zero.dcm"
        ds.save_as(leading_zero)
        assert store_raw(node.port, leading_zero) == 0xA900
        ds.SOPInstanceUID = ds.file_meta.MediaStorageSOPInstanceUID = UID("1.2.826.0.1.3680043.99.45")
        newline = tmp_path / "newline.dcm"  # odd length: padded with a NUL, which becomes "\n"
        ds.save_as(newline)
        newline.write_bytes(newline.read_bytes().replace(b"3680043.99.45\x00", b"3680043.99.45\n"))
        assert store_raw(node.port, newline) == 0xA900
    assert node.stored_files() == []
    assert list((node.root / "tmp").iterdir()) == []
    assert node.status() == []
    assert dcmtk("echoscu", "-aec", "AINODE", "127.0.0.1", str(node.port)).returncode == 0
    assert store_raw(node.port, source) == 0x0000


def test_same_uid_same_bytes_is_a_no_op_and_new_bytes_replace(make_node: NodeFactory, tmp_path: Path) -> None:
    node = make_node(study={"settle_seconds": 4.0}).start()
    source = write_series(tmp_path / "ct", 1)[0]
    assert store_raw(node.port, source) == 0 and store_raw(node.port, source) == 0
    first = node.stored_files()
    assert len(first) == 1
    study_uid = str(dcmread(source).StudyInstanceUID)
    settled = node.wait_for_state(study_uid, "waiting")
    changed = copy.deepcopy(dcmread(source))
    changed.WindowCenter, changed.WindowWidth = 40, 400
    edited = tmp_path / "edited.dcm"
    changed.save_as(edited)
    assert store_raw(node.port, edited) == 0
    files = node.stored_files()
    assert len(files) == 1 and files != first
    assert dataset_bytes(files[0]) == dataset_bytes(edited)
    row = node.status()[0]
    # Reopened: it settles again, later (on a loaded machine `ainode status` may only see it after).
    assert row["instance_count"] == 1 and row["state"] in ("receiving", "waiting")
    assert row["settle_at"] > settled["settle_at"]
    node.wait_for_state(study_uid, "waiting")


def test_disk_below_minimum_answers_out_of_resources(make_node: NodeFactory, tmp_path: Path) -> None:
    node = make_node(storage={"min_free_mb": 10**9}).start()
    source = write_series(tmp_path / "ct", 1)[0]
    assert store_raw(node.port, source) == 0xA700
    assert node.stored_files() == []
    assert dcmtk("echoscu", "-aec", "AINODE", "127.0.0.1", str(node.port)).returncode == 0


@pytest.mark.postgres
def test_database_unavailable_answers_out_of_resources_then_recovers(
    make_node: NodeFactory, postgres_url: str, tmp_path: Path
) -> None:
    node = make_node(storage={"database_url": postgres_url}).start()
    files = write_series(tmp_path / "ct", 3)
    assert store_raw(node.port, files[0]) == 0
    name = postgres_url.rsplit("/", 1)[1]

    def psql(sql: str) -> None:
        subprocess.run(
            ["psql", "-h", "127.0.0.1", "-U", "postgres", "-d", "test", "-c", sql],
            check=True,
            capture_output=True,
            timeout=30,
        )

    psql(f'ALTER DATABASE "{name}" ALLOW_CONNECTIONS false')
    try:
        psql(f"SELECT pg_terminate_backend(pid) FROM pg_stat_activity WHERE datname = '{name}'")
        assert store_raw(node.port, files[1]) == 0xA700
    finally:
        psql(f'ALTER DATABASE "{name}" ALLOW_CONNECTIONS true')
    assert store_raw(node.port, files[2]) == 0
    # The refused instance's file is kept (the database could not say whether an identical
    # instance racing it was acknowledged); the modality's resend adopts it, no second copy.
    assert len(node.stored_files()) == 3
    assert store_raw(node.port, files[1]) == 0
    assert len(node.stored_files()) == 3
    assert node.status()[0]["instance_count"] == 3


def test_orthanc_pushes_a_study_to_the_node(make_node: NodeFactory, tmp_path: Path) -> None:
    import httpx

    from tests.nodes import orthanc

    node = make_node().start()
    files = write_series(tmp_path / "ct", 5)
    with orthanc(tmp_path, {"ainode": ["AINODE", "127.0.0.1", node.port]}) as ports:
        api = f"http://127.0.0.1:{ports['http_port']}"
        with httpx.Client(base_url=api, timeout=30) as client:
            for path in files:
                client.post("/instances", content=path.read_bytes()).raise_for_status()
            (study_id,) = client.get("/studies").json()
            pushed = client.post("/modalities/ainode/store", json={"Resources": [study_id]})
            pushed.raise_for_status()
            assert pushed.json()["InstancesCount"] == 5
    stored = _stored_by_sop(node)
    assert len(stored) == 5
    for path in files:
        assert_same_dataset(stored[dcmread(path).SOPInstanceUID], path)
    row = node.wait_for_state(str(dcmread(files[0]).StudyInstanceUID), "waiting")
    assert row["calling_ae_title"] == "ORTHANC"


def test_dicom_tls_with_storescu(make_node: NodeFactory, tmp_path: Path) -> None:
    certs = tmp_path / "certs"
    certs.mkdir()

    def openssl(*args: str) -> None:
        subprocess.run(["openssl", *args], check=True, capture_output=True, cwd=certs, timeout=60)

    def make_ca(ca: str) -> None:
        openssl(
            "req",
            "-x509",
            "-newkey",
            "rsa:2048",
            "-nodes",
            "-keyout",
            f"{ca}.key",
            "-out",
            f"{ca}.crt",
            "-days",
            "2",
            "-subj",
            f"/CN={ca}",
        )

    def make_cert(name: str, ca: str) -> None:
        openssl(
            "req",
            "-newkey",
            "rsa:2048",
            "-nodes",
            "-keyout",
            f"{name}.key",
            "-out",
            f"{name}.csr",
            "-subj",
            f"/CN={name}",
        )
        openssl(
            "x509",
            "-req",
            "-in",
            f"{name}.csr",
            "-CA",
            f"{ca}.crt",
            "-CAkey",
            f"{ca}.key",
            "-CAcreateserial",
            "-out",
            f"{name}.crt",
            "-days",
            "2",
        )

    make_ca("ca")
    make_ca("rogue-ca")
    make_cert("node", "ca")
    make_cert("modality", "ca")
    make_cert("intruder", "rogue-ca")
    node = make_node(
        node={
            "tls_cert": str(certs / "node.crt"),
            "tls_key": str(certs / "node.key"),
            "tls_ca": str(certs / "ca.crt"),
        }
    ).start()
    files = write_series(tmp_path / "ct", 3)
    tls = ["+tls", str(certs / "modality.key"), str(certs / "modality.crt"), "+cf", str(certs / "ca.crt")]
    sent = dcmtk("storescu", *tls, "-aec", "AINODE", "127.0.0.1", str(node.port), *map(str, files))
    assert sent.returncode == 0, sent.stderr
    assert len(node.stored_files()) == 3
    plain = dcmtk("echoscu", "-aec", "AINODE", "127.0.0.1", str(node.port))
    assert plain.returncode != 0  # no TLS, no association
    untrusted = dcmtk(
        "echoscu",
        "+tls",
        str(certs / "intruder.key"),
        str(certs / "intruder.crt"),
        "+cf",
        str(certs / "ca.crt"),
        "-aec",
        "AINODE",
        "127.0.0.1",
        str(node.port),
    )
    assert untrusted.returncode != 0  # a client certificate from another CA is refused
    assert dcmtk("echoscu", *tls, "-aec", "AINODE", "127.0.0.1", str(node.port)).returncode == 0


@pytest.mark.parametrize("backend", ["sqlite", "postgresql"])
def test_the_same_instance_from_several_associations_at_once(
    make_node: NodeFactory, tmp_path: Path, backend: str, request: pytest.FixtureRequest
) -> None:
    import threading

    sections: dict[str, dict[str, object]] = {}
    if backend == "postgresql":
        sections["storage"] = {"database_url": request.getfixturevalue("postgres_url")}
    node = make_node(**sections).start()
    source = write_series(tmp_path / "ct", 1)[0]
    statuses: list[int] = []
    barrier = threading.Barrier(6)

    def one() -> None:
        barrier.wait()
        statuses.append(store_raw(node.port, source))

    threads = [threading.Thread(target=one) for _ in range(6)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=60)
    assert statuses == [0] * 6
    (stored,) = node.stored_files()
    assert dataset_bytes(stored) == dataset_bytes(source)
    assert node.status()[0]["instance_count"] == 1
