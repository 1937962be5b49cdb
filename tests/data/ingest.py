"""Store files the way the SCP does, without the network: for tests and benchmarks that need a
study in the database and on disk but are not about DICOM transfer."""

from __future__ import annotations

import shutil
from pathlib import Path

from pydicom import dcmread

from analysis.prepare import PreparedStudy, prepare_study
from conf import ImagingSettings
from scp.dataset_check import check_dataset_file
from storage.db import open_database, transaction
from storage.files import InstanceStore, sha256_of
from storage.models import utc_now
from storage.studies import ReceivedInstance, record_instance


def ingest(files: list[Path], store: InstanceStore, database_url: str) -> str:
    """Store files the way the SCP does, without the network."""
    study = ""
    with open_database(database_url) as sessions:
        for path in files:
            header = dcmread(path, stop_before_pixels=True)
            summary = check_dataset_file(path, str(header.SOPClassUID), str(header.SOPInstanceUID))
            copy = store.tmp_dir / "incoming.dcm"
            shutil.copyfile(path, copy)
            digest = sha256_of(copy)
            relative = store.relative_path(
                summary.study_instance_uid, summary.series_instance_uid, summary.sop_instance_uid, digest
            )
            store.install(copy, relative)
            received = ReceivedInstance(
                summary.sop_instance_uid,
                summary.study_instance_uid,
                summary.series_instance_uid,
                summary.sop_class_uid,
                summary.transfer_syntax_uid,
                relative,
                path.stat().st_size,
                digest,
                "BENCH",
                summary.header_index(),
            )
            with transaction(sessions) as session:
                record_instance(session, received, 10, utc_now())
            study = summary.study_instance_uid
    return study


def prepared_study(
    files: list[Path], workdir: Path, settings: ImagingSettings | None = None
) -> tuple[PreparedStudy, InstanceStore]:
    """Ingest ``files`` into a scratch node store under ``workdir`` and prepare their study."""
    store = InstanceStore(workdir / "var")
    store.prepare()
    url = f"sqlite:///{workdir}/ainode.db"
    study = ingest(files, store, url)
    with open_database(url) as sessions, sessions() as session:
        return prepare_study(session, study, store.root, settings or ImagingSettings()), store
