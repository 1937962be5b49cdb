"""UIDs the node makes: the same input on one installation gives the same UID (a re-run never
makes a second SR); two installations never collide; inputs are joined unambiguously."""

from __future__ import annotations

import re
import uuid
from pathlib import Path

import pytest

from analysis.uids import UidMaker
from storage.db import open_database
from storage.studies import installation_namespace

UID = re.compile(r"^(0|[1-9][0-9]*)(\.(0|[1-9][0-9]*))*$")


def test_the_same_input_gives_the_same_uid_and_another_installation_another() -> None:
    here, there = UidMaker(uuid.uuid4()), UidMaker(uuid.uuid4())
    first = here.make("sr", "1.2.3", "1")
    assert first == here.make("sr", "1.2.3", "1")
    assert first != there.make("sr", "1.2.3", "1")
    assert first.startswith("2.25.") and UID.match(first) and len(first) <= 64
    # Joined unambiguously: version 1 / finding 12 is not version 11 / finding 2.
    assert here.make("tracking", "1.2.3", "1", "12") != here.make("tracking", "1.2.3", "11", "2")


def test_an_organisation_root_prefixes_every_uid() -> None:
    maker = UidMaker(uuid.uuid4(), "1.2.826.0.1.3680043.10")
    uid = maker.make("sr", "1.2.3")
    assert uid.startswith("1.2.826.0.1.3680043.10.") and UID.match(uid) and len(uid) <= 64
    with pytest.raises(ValueError, match='Argument "root" must be a UID root'):
        UidMaker(uuid.uuid4(), "1.2.840.01")
    with pytest.raises(ValueError, match="at most 24 characters"):
        UidMaker(uuid.uuid4(), "1.2.840.10008.99999.99999.1")


def test_each_installation_keeps_its_own_namespace_across_restarts(tmp_path: Path) -> None:
    urls = [f"sqlite:///{tmp_path}/a.db", f"sqlite:///{tmp_path}/b.db"]
    namespaces = []
    for url in [*urls, urls[0]]:  # a, b, then a again (a restart)
        with open_database(url) as sessions, sessions() as session:
            namespaces.append(installation_namespace(session))
    assert namespaces[0] == namespaces[2] and namespaces[0] != namespaces[1]
