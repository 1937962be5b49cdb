"""The TLS contexts (BCP 195: TLS 1.2 at least, AEAD suites with forward secrecy) and the
binding of a client certificate to a calling AE title."""

from __future__ import annotations

import ssl
from pathlib import Path
from typing import Any

import pytest

from conf import DestinationSettings, NodeSettings
from scp.tls import (
    MINIMUM_VERSION,
    calling_aet_mismatch,
    certificate_names,
    client_context,
    server_context,
)
from tests.certs import CertificateAuthority


@pytest.fixture(scope="module")
def ca(tmp_path_factory: pytest.TempPathFactory) -> CertificateAuthority:
    return CertificateAuthority(tmp_path_factory.mktemp("pki"), "ca")


def _tls12_suites(context: ssl.SSLContext) -> list[Any]:
    return [c for c in context.get_ciphers() if c["protocol"] == "TLSv1.2"]


def _assert_bcp195(context: ssl.SSLContext) -> None:
    assert context.minimum_version == MINIMUM_VERSION == ssl.TLSVersion.TLSv1_2
    suites = _tls12_suites(context)
    assert suites
    for suite in suites:
        assert suite["aead"] is True, suite["name"]
        assert suite["kea"] in ("kx-ecdhe", "kx-dhe"), suite["name"]
    assert context.options & ssl.OP_NO_COMPRESSION


def test_the_listener_speaks_bcp195_and_asks_for_client_certificates(ca: CertificateAuthority) -> None:
    issued = ca.issue("node-listener")
    assert server_context(NodeSettings()) is None
    without_ca = server_context(NodeSettings(tls_cert=issued.cert, tls_key=issued.key))
    assert without_ca is not None and without_ca.verify_mode == ssl.CERT_NONE
    _assert_bcp195(without_ca)
    with_ca = server_context(NodeSettings(tls_cert=issued.cert, tls_key=issued.key, tls_ca=ca.cert))
    assert with_ca is not None and with_ca.verify_mode == ssl.CERT_REQUIRED
    _assert_bcp195(with_ca)


def test_a_destination_is_always_verified(ca: CertificateAuthority, tmp_path: Path) -> None:
    destination = DestinationSettings(name="p", ae_title="P", host="127.0.0.1", port=104, tls=True)
    system = client_context(destination)  # the system's trust store
    assert (system.verify_mode, system.check_hostname) == (ssl.CERT_REQUIRED, True)
    _assert_bcp195(system)
    own = client_context(destination.model_copy(update={"tls_ca": ca.cert}))
    assert (own.verify_mode, own.check_hostname) == (ssl.CERT_REQUIRED, True)
    assert own.failure is None
    missing = destination.model_copy(update={"tls_ca": tmp_path / "none.crt"})
    with pytest.raises(FileNotFoundError):
        client_context(missing)


def test_the_names_of_a_certificate_are_its_common_names_and_dns_alt_names() -> None:
    certificate = {
        "subject": ((("countryName", "NL"),), (("commonName", "CT01"),)),
        "subjectAltName": (("DNS", "ct01.hospital.local"), ("IP Address", "10.0.0.5"), ("DNS", "CT01")),
    }
    assert certificate_names(certificate) == ("CT01", "ct01.hospital.local")
    assert certificate_names({}) == ()


@pytest.mark.parametrize(
    ("calling", "names", "grants", "bound"),
    [
        ("CT01", ("CT01",), {}, True),
        ("CT01  ", ("CT01",), {}, True),  # AE titles are padded with spaces
        ("ct01", ("CT01",), {}, False),  # case-sensitive (PS3.5 6.2)
        ("MR02", ("CT01",), {}, False),
        ("CT02", ("modality.local",), {"modality.local": ["CT02", "CT03"]}, True),
        ("CT04", ("modality.local",), {"modality.local": ["CT02", "CT03"]}, False),
        ("CT02", ("other.local",), {"modality.local": ["CT02"]}, False),  # granted to another name
        ("CT01", (), {}, False),
    ],
)
def test_a_calling_ae_title_is_bound_to_its_certificate(
    calling: str, names: tuple[str, ...], grants: dict[str, list[str]], bound: bool
) -> None:
    problem = calling_aet_mismatch(calling, names, grants)
    assert (problem is None) == bound, problem
    if not bound:
        assert problem is not None and "is not bound to its client certificate" in problem
