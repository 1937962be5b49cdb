"""Certificate authorities and certificates for TLS tests, made with the ``openssl`` command in
the test's own folder (``openssl ca``, so a certificate can be issued already expired)."""

from __future__ import annotations

import subprocess
from dataclasses import dataclass
from pathlib import Path

_CA_CONFIG = """\
[ca]
default_ca = this
[this]
database = index.txt
new_certs_dir = .
serial = serial
default_md = sha256
policy = any
copy_extensions = copy
unique_subject = no
[any]
commonName = supplied
"""


@dataclass(frozen=True)
class Issued:
    cert: Path
    key: Path


class CertificateAuthority:
    """A self-signed CA in ``folder/name``; :meth:`issue` signs leaf certificates with it."""

    def __init__(self, folder: Path, name: str) -> None:
        self.folder = folder / name
        self.folder.mkdir(parents=True)
        self.name = name
        (self.folder / "ca.cnf").write_text(_CA_CONFIG)
        (self.folder / "index.txt").write_text("")
        (self.folder / "serial").write_text("01\n")
        self._openssl(
            "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-keyout", "ca.key", "-out", "ca.crt",
            "-days", "2", "-subj", f"/CN={name}",
        )  # fmt: skip
        self.cert = self.folder / "ca.crt"

    def _openssl(self, *args: str) -> None:
        subprocess.run(["openssl", *args], check=True, capture_output=True, cwd=self.folder, timeout=60)

    def issue(
        self,
        name: str,
        common_name: str | None = None,
        alt_names: tuple[str, ...] = ("IP:127.0.0.1", "DNS:localhost"),
        expired: bool = False,
    ) -> Issued:
        """A certificate for ``common_name`` (default ``name``) with these subjectAltNames, valid
        for two days from now, or for one day in 2020 when ``expired``."""
        extensions = ["-addext", "basicConstraints=critical,CA:FALSE"]
        if alt_names:
            extensions += ["-addext", "subjectAltName=" + ",".join(alt_names)]
        self._openssl(
            "req", "-new", "-newkey", "rsa:2048", "-nodes", "-keyout", f"{name}.key", "-out", f"{name}.csr",
            "-subj", f"/CN={common_name or name}", *extensions,
        )  # fmt: skip
        validity = (
            ["-startdate", "20200101000000Z", "-enddate", "20200102000000Z"] if expired else ["-days", "2"]
        )
        self._openssl(
            "ca", "-batch", "-config", "ca.cnf", "-cert", "ca.crt", "-keyfile", "ca.key", "-notext",
            "-in", f"{name}.csr", "-out", f"{name}.crt", *validity,
        )  # fmt: skip
        return Issued(self.folder / f"{name}.crt", self.folder / f"{name}.key")
