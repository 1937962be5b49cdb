"""DICOM TLS, both ways: the context the node listens with, the one it sends to a destination
with, and the binding of a caller's client certificate to the calling AE title it claims.

Both sides follow the DICOM BCP 195 TLS profiles (PS3.15 B.9, RFC 9325): TLS 1.2 at least (1.0
and 1.1 are refused in the handshake), and for TLS 1.2 only ephemeral key exchange with an AEAD
cipher (TLS 1.3's suites are all of that kind). Outbound, the peer's certificate is always
verified (against the destination's ``tls_ca``, else the system's trust store) and must name
the destination's host (or ``tls_server_name``); a handshake that fails is never retried in
clear text. Certificates are read when each association is made, so a renewed one is used
without a restart.

Reference: PS3.15 B.9 (BCP 195 TLS profiles), RFC 9325 §4.1-4.2.
"""

from __future__ import annotations

import ssl
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

from conf import DestinationSettings, NodeSettings, Settings

MINIMUM_VERSION = ssl.TLSVersion.TLSv1_2
# RFC 9325 §4.2 for TLS 1.2: forward secrecy and authenticated encryption only (no CBC, no RSA
# key transport, no SHA-1 MACs); OpenSSL's names, in preference order.
BCP195_CIPHERS = "ECDHE+AESGCM:ECDHE+CHACHA20:DHE+AESGCM:DHE+CHACHA20:!aNULL:!eNULL:!PSK"


def _bcp195(context: ssl.SSLContext) -> ssl.SSLContext:
    context.minimum_version = MINIMUM_VERSION
    context.set_ciphers(BCP195_CIPHERS)
    context.options |= ssl.OP_NO_COMPRESSION | ssl.OP_NO_RENEGOTIATION
    return context


def server_context(node: NodeSettings) -> ssl.SSLContext | None:
    """The listener's context, or None without ``node.tls_cert``. With ``node.tls_ca``, a
    caller must present a client certificate that chains to it."""
    if node.tls_cert is None:
        return None
    if node.tls_key is None:
        raise ValueError("node.tls_key must be set when node.tls_cert is set")
    context = _bcp195(ssl.create_default_context(ssl.Purpose.CLIENT_AUTH))
    context.load_cert_chain(str(node.tls_cert), str(node.tls_key))
    if node.tls_ca is not None:
        context.verify_mode = ssl.CERT_REQUIRED
        context.load_verify_locations(str(node.tls_ca))
    return context


class _RecordingSocket(ssl.SSLSocket):
    """Keeps why its TLS connection failed on its context: pynetdicom swallows the error and
    reports only an association that was not established. The handshake, or (TLS 1.3) the first
    read, where a server that refuses our client certificate says so."""

    def _failed(self, exc: OSError) -> None:
        context = self.context
        if isinstance(context, ClientContext) and context.failure is None:
            context.failure = describe_failure(exc)

    def do_handshake(self, block: bool = False) -> None:
        try:
            super().do_handshake(block)
        except OSError as exc:
            self._failed(exc)
            self.close()  # pynetdicom's shutdown() of a failed socket raises before its close()
            raise

    def recv(self, buflen: int = 1024, flags: int = 0) -> bytes:
        try:
            return super().recv(buflen, flags)
        except ssl.SSLError as exc:
            self._failed(exc)
            raise

    def shutdown(self, how: int) -> None:
        try:
            super().shutdown(how)
        except OSError:
            self.close()  # as above: pynetdicom would skip its close()
            raise


class ClientContext(ssl.SSLContext):
    """A client context that remembers why the TLS connection of the socket it wrapped failed
    (one context per association)."""

    sslsocket_class = _RecordingSocket
    failure: str | None = None


def client_context(destination: DestinationSettings) -> ClientContext:
    """A fresh context for one association to ``destination`` (its ``tls = true``)."""
    context = ClientContext(ssl.PROTOCOL_TLS_CLIENT)  # CERT_REQUIRED and check_hostname
    _bcp195(context)
    if destination.tls_ca is not None:
        context.load_verify_locations(str(destination.tls_ca))
    else:
        context.load_default_certs(ssl.Purpose.SERVER_AUTH)
    if destination.tls_cert is not None and destination.tls_key is not None:
        context.load_cert_chain(str(destination.tls_cert), str(destination.tls_key))
    return context


def server_name(destination: DestinationSettings) -> str:
    """The name the destination's certificate must carry."""
    return destination.tls_server_name or str(destination.host)


def describe_failure(exc: OSError) -> str:
    """One line for the delivery's last error: what failed in the TLS connection."""
    if isinstance(exc, ssl.SSLCertVerificationError):
        return f"certificate verify failed: {str(exc.verify_message).rstrip('.')}"
    if isinstance(exc, ssl.SSLError):
        reason = exc.reason or exc.strerror or str(exc)
        return str(reason).replace("_", " ").lower()
    if isinstance(exc, TimeoutError):
        return "no TLS answer (is the peer listening with TLS?)"
    return f"connection closed during the handshake ({type(exc).__name__}; is the peer listening with TLS?)"


def check_files(settings: Settings, inbound: bool, outbound: bool) -> str | None:
    """Why the configured certificates and keys cannot be loaded (one line), or None: checked
    at start, so a wrong path stops the node instead of failing every association."""
    if inbound and settings.node.tls_enabled:
        node = settings.node
        problem = _unreadable(
            "node", {"tls_cert": node.tls_cert, "tls_key": node.tls_key, "tls_ca": node.tls_ca}
        )
        if problem is not None:
            return problem
        try:
            server_context(node)
        except (OSError, ValueError) as exc:  # ssl.SSLError is an OSError
            return f"node.tls_cert/tls_key/tls_ca cannot be used: {exc}"
    if outbound:
        for destination in settings.destinations:
            if not destination.tls:
                continue
            where = f'destination "{destination.name}"'
            files = {
                "tls_ca": destination.tls_ca,
                "tls_cert": destination.tls_cert,
                "tls_key": destination.tls_key,
            }
            problem = _unreadable(where, files)
            if problem is not None:
                return problem
            try:
                client_context(destination)
            except OSError as exc:
                return f"{where}: its tls_ca/tls_cert/tls_key cannot be used: {exc}"
    return None


def _unreadable(where: str, files: Mapping[str, Path | None]) -> str | None:
    for key, path in files.items():
        if path is None:
            continue
        try:
            with path.open("rb"):
                pass
        except OSError as exc:
            return f"{where}: {key} {path} cannot be read ({exc.strerror or type(exc).__name__})"
    return None


def certificate_names(certificate: Mapping[str, Any]) -> tuple[str, ...]:
    """The subject's common names and the subjectAltName DNS names of a verified peer
    certificate, as :meth:`ssl.SSLSocket.getpeercert` gives it."""
    names: list[str] = []
    for rdn in certificate.get("subject", ()):
        names += [str(value) for key, value in rdn if key == "commonName"]
    names += [str(value) for kind, value in certificate.get("subjectAltName", ()) if kind == "DNS"]
    return tuple(dict.fromkeys(name for name in names if name.strip()))


def calling_aet_mismatch(
    calling_ae_title: str, names: Iterable[str], client_aets: Mapping[str, Iterable[str]]
) -> str | None:
    """Why ``calling_ae_title`` is not one the client certificate (its ``names``) may claim, or
    None. A name matches itself exactly (AE titles are case-sensitive, PS3.5 6.2) or any AE title
    ``client_aets`` grants it."""
    claimed = calling_ae_title.strip()
    names = tuple(names)
    allowed = set(names)
    for name in names:
        allowed.update(title.strip() for title in client_aets.get(name, ()))
    if claimed in allowed:
        return None
    shown = ", ".join(names) or "none"
    return f"calling AE title {claimed!r} is not bound to its client certificate (names: {shown})"
