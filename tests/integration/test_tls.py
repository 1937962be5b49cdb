"""DICOM TLS against real peers on 127.0.0.1: the sender to DCMTK's ``storescp +tls`` (and to
peers that must be refused), the node's listener against DCMTK's ``storescu +tls`` and Python
clients (old protocol versions, a certificate bound to another AE title)."""

from __future__ import annotations

import re
import socket
import ssl
import subprocess
import warnings
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import pytest
from pydicom import dcmread
from pydicom.uid import generate_uid
from pynetdicom import evt

from conf import DestinationSettings
from scp.sender import store_sr
from tests.certs import CertificateAuthority, Issued
from tests.data.generate import write_series
from tests.data.sr import complete_with_simulated_findings
from tests.nodes import DCMTK, DCMTK_ENV, NodeFactory, dcmtk, free_port, stop_process, wait_for_port

pytestmark = pytest.mark.timeout(120)


@pytest.fixture(scope="module")
def pki(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    """A hospital CA with a PACS, a node (client) and modality certificates; a rogue CA; an
    expired PACS certificate and one for another host."""
    folder = tmp_path_factory.mktemp("pki")
    ca = CertificateAuthority(folder, "hospital-ca")
    rogue = CertificateAuthority(folder, "rogue-ca")
    return {
        "ca": ca.cert,
        "pacs": ca.issue("pacs"),
        "node": ca.issue("ainode", alt_names=()),
        "expired": ca.issue("pacs-expired", expired=True),
        "elsewhere": ca.issue("elsewhere", common_name="pacs.elsewhere", alt_names=("DNS:pacs.elsewhere",)),
        "rogue": rogue.issue("pacs-rogue"),
        "rogue_ca": rogue.cert,
        "ct01": ca.issue("ct01", common_name="CT01", alt_names=()),
        "modality_host": ca.issue("modality", common_name="modality.hospital.local", alt_names=()),
        "ct01_expired": ca.issue("ct01-expired", common_name="CT01", alt_names=(), expired=True),
        "ct01_rogue": rogue.issue("ct01-rogue", common_name="CT01", alt_names=()),
    }


@contextmanager
def storescp(
    workdir: Path, server: Issued | None, ca: Path | None = None, require_client: bool = False
) -> Iterator[tuple[int, Path]]:
    """DCMTK's storescp, with TLS when ``server`` is given (asking for a client certificate
    that chains to ``ca`` when ``require_client``); yields its port and the folder it writes to."""
    port = free_port()
    out = workdir / f"received-{port}"
    out.mkdir()
    tls: list[str] = []
    if server is not None:
        tls = ["+tls", str(server.key), str(server.cert)]
        tls += ["+cf", str(ca), "-rc"] if require_client and ca is not None else ["-ic"]
    log = (workdir / f"storescp-{port}.log").open("wb")
    proc = subprocess.Popen(
        [str(DCMTK / "storescp"), *tls, "-aet", "PACS", "-od", str(out), str(port)],
        stdout=log,
        stderr=subprocess.STDOUT,
        env=DCMTK_ENV,
    )
    try:
        wait_for_port(port, proc=proc)
        yield port, out
    finally:
        stop_process(proc)
        log.close()


def _destination(port: int, **tls: Any) -> DestinationSettings:
    return DestinationSettings(name="pacs", ae_title="PACS", host="127.0.0.1", port=port, **tls)


@pytest.fixture(scope="module")
def instance(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return write_series(tmp_path_factory.mktemp("ct"), 1)[0]


def test_an_sr_goes_to_a_tls_pacs_with_a_client_certificate(
    pki: dict[str, Any], instance: Path, tmp_path: Path
) -> None:
    node = pki["node"]
    with storescp(tmp_path, pki["pacs"], pki["ca"], require_client=True) as (port, received):
        destination = _destination(port, tls=True, tls_ca=pki["ca"], tls_cert=node.cert, tls_key=node.key)
        outcome = store_sr(instance, destination, "AINODE", 10)
        assert (outcome.kind, outcome.status) == ("sent", 0x0000), outcome.detail
        without_client_certificate = store_sr(
            instance, _destination(port, tls=True, tls_ca=pki["ca"]), "AINODE", 10
        )
        (stored,) = received.iterdir()
    assert dcmread(stored).SOPInstanceUID == dcmread(instance).SOPInstanceUID
    # storescp asks for a client certificate: without one, no association and nothing stored
    assert without_client_certificate.kind == "retry"
    assert re.fullmatch(  # storescp's alert, or (under load) only its closing the connection
        rf"TLS with 127\.0\.0\.1:{port} failed: "
        r"(tlsv13 alert certificate required|unexpected eof while reading); nothing sent",
        without_client_certificate.detail,
    ), without_client_certificate.detail


@pytest.mark.parametrize(
    ("certificate", "reason"),
    [
        ("rogue", "certificate verify failed: unable to get local issuer certificate"),
        ("expired", "certificate verify failed: certificate has expired"),
        (
            "elsewhere",
            "certificate verify failed: IP address mismatch, certificate is not valid for '127.0.0.1'",
        ),
    ],
)
def test_a_pacs_whose_certificate_cannot_be_trusted_gets_nothing(
    pki: dict[str, Any], instance: Path, tmp_path: Path, certificate: str, reason: str
) -> None:
    with storescp(tmp_path, pki[certificate]) as (port, received):
        outcome = store_sr(instance, _destination(port, tls=True, tls_ca=pki["ca"]), "AINODE", 10)
        assert list(received.iterdir()) == []
    assert outcome.kind == "retry"
    assert outcome.detail.startswith(f"TLS with 127.0.0.1:{port} failed: {reason}")
    assert outcome.detail.endswith("nothing sent")


def test_a_certificate_for_another_name_is_accepted_when_that_name_is_configured(
    pki: dict[str, Any], instance: Path, tmp_path: Path
) -> None:
    with storescp(tmp_path, pki["elsewhere"]) as (port, received):
        destination = _destination(port, tls=True, tls_ca=pki["ca"], tls_server_name="pacs.elsewhere")
        outcome = store_sr(instance, destination, "AINODE", 10)
        assert outcome.kind == "sent", outcome.detail
        assert len(list(received.iterdir())) == 1


def test_a_pacs_without_tls_gets_no_clear_text(pki: dict[str, Any], instance: Path, tmp_path: Path) -> None:
    with storescp(tmp_path, None) as (port, received):
        outcome = store_sr(instance, _destination(port, tls=True, tls_ca=pki["ca"]), "AINODE", 5)
        assert list(received.iterdir()) == []
    assert outcome.kind == "retry"
    assert outcome.detail.startswith(f"TLS with 127.0.0.1:{port} failed")


def _old_tls_allowed(protocol: ssl._SSLMethod, maximum: ssl.TLSVersion, ciphers: str) -> ssl.SSLContext:
    """A context that offers TLS 1.0 up to ``maximum`` with ``ciphers`` (old and weak peers)."""
    context = ssl.SSLContext(protocol)
    with warnings.catch_warnings():  # TLS 1.0 and 1.1 are deprecated: the point of the tests
        warnings.simplefilter("ignore", DeprecationWarning)
        context.minimum_version = ssl.TLSVersion.TLSv1
        context.maximum_version = maximum
    context.set_ciphers(ciphers)
    return context


@pytest.mark.parametrize(
    ("maximum", "ciphers"),
    [
        (ssl.TLSVersion.TLSv1_1, "DEFAULT:@SECLEVEL=0"),  # an old protocol
        (ssl.TLSVersion.TLSv1_2, "AES128-SHA256:AES256-SHA"),  # RSA key transport, CBC: not BCP 195
    ],
)
def test_a_pacs_with_an_old_protocol_or_weak_suites_is_refused(
    pki: dict[str, Any], instance: Path, maximum: ssl.TLSVersion, ciphers: str
) -> None:
    """A peer that offers at most TLS 1.1, or TLS 1.2 with only suites BCP 195 excludes (the
    retired DICOM AES profile's); pynetdicom with such a context."""
    from pynetdicom import AE

    context = _old_tls_allowed(ssl.PROTOCOL_TLS_SERVER, maximum, ciphers)
    context.load_cert_chain(str(pki["pacs"].cert), str(pki["pacs"].key))
    ae = AE(ae_title="PACS")
    ae.add_supported_context(str(dcmread(instance).SOPClassUID))
    received: list[object] = []

    def store(event: evt.Event) -> int:
        received.append(event.request)
        return 0x0000

    port = free_port()
    server = ae.start_server(
        ("127.0.0.1", port), block=False, ssl_context=context, evt_handlers=[(evt.EVT_C_STORE, store)]
    )
    if server is None:
        raise RuntimeError("pynetdicom did not start the old peer")
    try:
        outcome = store_sr(instance, _destination(port, tls=True, tls_ca=pki["ca"]), "AINODE", 5)
    finally:
        server.shutdown()
    assert outcome.kind == "retry" and received == []
    assert outcome.detail.startswith(f"TLS with 127.0.0.1:{port} failed")


def test_the_node_dead_letters_a_delivery_to_an_untrusted_pacs_with_the_reason(
    make_node: NodeFactory, pki: dict[str, Any], tmp_path: Path
) -> None:
    study = generate_uid()
    files = write_series(tmp_path / "ct", 2, study_instance_uid=study)
    with (
        storescp(tmp_path, pki["rogue"]) as (rogue_port, rogue_received),
        storescp(tmp_path, pki["pacs"], pki["ca"], require_client=True) as (port, received),
    ):
        tls = {"tls": True, "tls_ca": str(pki["ca"])}
        client = {"tls_cert": str(pki["node"].cert), "tls_key": str(pki["node"].key)}
        node = make_node(
            destinations=[
                {"name": "rogue", "ae_title": "PACS", "host": "127.0.0.1", "port": rogue_port, **tls},
                {"name": "pacs", "ae_title": "PACS", "host": "127.0.0.1", "port": port, **tls, **client},
            ],
            delivery={
                "retry_base_seconds": 0.2,
                "retry_cap_seconds": 0.3,
                "poll_seconds": 0.1,
                "max_attempts": 2,
            },
        ).start()
        sent = dcmtk("storescu", "-aec", "AINODE", "127.0.0.1", str(node.port), *map(str, files))
        assert sent.returncode == 0, sent.stderr
        node.wait_for_state(study, "waiting")
        complete_with_simulated_findings(node.database_url, node.root, study, ["rogue", "pacs"])
        row = node.wait_for_state(study, "failed", timeout=30)
        assert list(rogue_received.iterdir()) == []
        assert any(path.name.startswith("SR") for path in received.iterdir())
    deliveries = {d["destination"]: d for d in row["deliveries"]}
    assert deliveries["pacs"]["state"] == "sent"
    assert deliveries["rogue"]["state"] == "dead"
    assert (
        "certificate verify failed: unable to get local issuer certificate"
        in deliveries["rogue"]["last_error"]
    )


def test_the_node_refuses_to_start_with_a_destination_tls_file_missing(
    make_node: NodeFactory, tmp_path: Path
) -> None:
    node = make_node(
        destinations=[
            {"name": "pacs", "ae_title": "PACS", "host": "127.0.0.1", "port": 4242, "tls": True,
             "tls_ca": str(tmp_path / "nowhere.crt")}
        ]
    )  # fmt: skip
    answer = node.cli("serve", check=False)
    assert answer.returncode == 2
    missing = tmp_path / "nowhere.crt"
    assert answer.stderr.strip().splitlines()[-1] == (
        f'ainode serve: destination "pacs": tls_ca {missing} cannot be read (No such file or directory)'
    )


# -- the listener -------------------------------------------------------------------------------


def _tls_node(make_node: NodeFactory, pki: dict[str, Any], **node: Any) -> Any:
    pacs = pki["pacs"]
    return make_node(
        node={"tls_cert": str(pacs.cert), "tls_key": str(pacs.key), "tls_ca": str(pki["ca"]), **node}
    ).start()


def _echo(port: int, client: Issued, calling: str, ca: Path) -> subprocess.CompletedProcess[str]:
    tls = ["+tls", str(client.key), str(client.cert), "+cf", str(ca)]
    return dcmtk("echoscu", *tls, "-aet", calling, "-aec", "AINODE", "127.0.0.1", str(port), timeout=30)


def test_a_client_certificate_is_bound_to_the_calling_ae_title(
    make_node: NodeFactory, pki: dict[str, Any], tmp_path: Path
) -> None:
    node = _tls_node(
        make_node,
        pki,
        tls_bind_calling_aet=True,
    )
    ct01, elsewhere = pki["ct01"], pki["modality_host"]
    assert _echo(node.port, ct01, "CT01", pki["ca"]).returncode == 0
    claimed = _echo(node.port, ct01, "MR02", pki["ca"])  # CT01's certificate, another AE title
    assert claimed.returncode != 0
    assert "Calling AE Title Not Recognized" in claimed.stdout + claimed.stderr
    assert _echo(node.port, elsewhere, "CT02", pki["ca"]).returncode != 0  # not granted to it
    files = write_series(tmp_path / "ct", 1)
    tls = ["+tls", str(ct01.key), str(ct01.cert), "+cf", str(pki["ca"])]
    refused = dcmtk(
        "storescu", *tls, "-aet", "MR02", "-aec", "AINODE", "127.0.0.1", str(node.port), str(files[0])
    )
    assert refused.returncode != 0 and node.stored_files() == []
    assert (
        "calling AE title 'MR02' is not bound to its client certificate (names: CT01)" in node.log.read_text()
    )


def test_a_certificate_name_may_be_granted_ae_titles(make_node: NodeFactory, pki: dict[str, Any]) -> None:
    node = _tls_node(
        make_node,
        pki,
        tls_bind_calling_aet=True,
        tls_client_aets={"modality.hospital.local": ["CT02", "CT03"]},
    )
    host = pki["modality_host"]
    assert _echo(node.port, host, "CT02", pki["ca"]).returncode == 0
    assert _echo(node.port, host, "CT03", pki["ca"]).returncode == 0
    assert _echo(node.port, host, "CT01", pki["ca"]).returncode != 0
    assert _echo(node.port, pki["ct01"], "CT01", pki["ca"]).returncode == 0


def test_the_listener_refuses_old_protocols_and_bad_client_certificates(
    make_node: NodeFactory, pki: dict[str, Any]
) -> None:
    node = _tls_node(make_node, pki)
    ct01 = pki["ct01"]

    def handshake(maximum: ssl.TLSVersion, client: Issued, ciphers: str = "DEFAULT:@SECLEVEL=0") -> str:
        context = _old_tls_allowed(ssl.PROTOCOL_TLS_CLIENT, maximum, ciphers)
        context.load_verify_locations(str(pki["ca"]))
        context.load_cert_chain(str(client.cert), str(client.key))
        with socket.create_connection(("127.0.0.1", node.port), timeout=10) as raw:
            try:
                with context.wrap_socket(raw, server_hostname="127.0.0.1") as tls:
                    version = tls.version() or "?"
                    tls.sendall(b"\x07\x00\x00\x00\x00\x04\x00\x00\x00\x00")  # an A-ABORT: then read
                    tls.recv(1)  # a TLS 1.3 server refuses a client certificate only after the handshake
                    return version
            except (ssl.SSLError, ConnectionError):  # an alert, or (TLS 1.3) the connection closed
                return "refused"

    assert handshake(ssl.TLSVersion.TLSv1_2, ct01) == "TLSv1.2"
    assert handshake(ssl.TLSVersion.TLSv1_1, ct01) == "refused"
    assert handshake(ssl.TLSVersion.TLSv1, ct01) == "refused"
    assert handshake(ssl.TLSVersion.TLSv1_2, ct01, "AES128-SHA256:AES256-SHA") == "refused"  # not BCP 195
    assert handshake(ssl.TLSVersion.TLSv1_3, pki["ct01_expired"]) == "refused"
    assert handshake(ssl.TLSVersion.TLSv1_3, pki["ct01_rogue"]) == "refused"
    assert "TLS handshake with 127.0.0.1 failed" in node.log.read_text()
