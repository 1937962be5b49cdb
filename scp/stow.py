"""DICOMweb STOW-RS delivery: one instance per request, classified like a C-STORE answer.

PS3.18 10.5: ``POST {base}/studies/{StudyInstanceUID}`` with a ``multipart/related;
type="application/dicom"`` body holding the Part 10 file as it is on disk (no re-encoding, so
the SR's UTF-8 text reaches the PACS byte for byte). The answer (PS3.18 10.5.3):

- 200: stored; 202: stored with warnings, unless the instance is in the Failed SOP Sequence;
- 409: the instance failed: its Failure Reason (0008,1197) says whether to retry (0xA7xx out of
  resources, 0x0110 processing failure) or not;
- 408, 429 and 5xx, a refused connection or a timeout: retry;
- any other 4xx (a wrong URL, credentials, a media type refused): dead-lettered with the reason.

Written on httpx (already the vision client's) rather than ``dicomweb-client``, which brings
``requests`` for one POST whose answer we must classify ourselves anyway.
"""

from __future__ import annotations

import json
import secrets
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx

from conf import DestinationSettings
from scp.statuses import is_transient_failure

DICOM_JSON = "application/dicom+json"
FAILED_SOP_SEQUENCE = "00081198"
FAILURE_REASON = "00081197"
REFERENCED_SOP_INSTANCE_UID = "00081155"
RETRYABLE_HTTP = frozenset({408, 429})


@dataclass(frozen=True)
class StowAnswer:
    kind: str  # "sent", "retry" or "dead", as scp.sender.Outcome
    status: int | None  # the HTTP status, or the DICOM failure reason when one was given
    detail: str


def multipart_body(dicom: bytes) -> tuple[bytes, str]:
    """The request body and its Content-Type for one Part 10 file."""
    boundary = f"ainode-{secrets.token_hex(16)}"
    body = b"".join(
        [
            f"--{boundary}\r\nContent-Type: application/dicom\r\n\r\n".encode("ascii"),
            dicom,
            f"\r\n--{boundary}--\r\n".encode("ascii"),
        ]
    )
    return body, f'multipart/related; type="application/dicom"; boundary={boundary}'


def _failure_reason(answer: Any, sop_instance_uid: str) -> int | None:
    """The Failure Reason the PACS gave for our instance in a DICOM JSON answer, if any."""
    if isinstance(answer, list) and answer:
        answer = answer[0]
    if not isinstance(answer, dict):
        return None
    failed = answer.get(FAILED_SOP_SEQUENCE, {}).get("Value", [])
    for item in failed if isinstance(failed, list) else []:
        if not isinstance(item, dict):
            continue
        uid = item.get(REFERENCED_SOP_INSTANCE_UID, {}).get("Value", [None])[0]
        reason = item.get(FAILURE_REASON, {}).get("Value", [None])[0]
        if uid in (sop_instance_uid, None) and isinstance(reason, int):
            return reason
    return None


def classify(status_code: int, body: bytes, sop_instance_uid: str) -> StowAnswer:
    """What a STOW-RS answer means for one instance's delivery."""
    try:
        answer = json.loads(body) if body else None
    except ValueError:
        answer = None
    reason = _failure_reason(answer, sop_instance_uid)
    if status_code == 200:
        return StowAnswer("sent", 200, "stored (STOW-RS 200)")
    if status_code in (202, 409) and reason is not None:
        code = f"0x{reason:04X}"
        if is_transient_failure(reason):
            return StowAnswer("retry", reason, f"STOW-RS {status_code}: failure reason {code}")
        return StowAnswer("dead", reason, f"STOW-RS {status_code}: refused with failure reason {code}")
    if status_code == 202:
        return StowAnswer("sent", 202, "stored with warnings (STOW-RS 202)")
    if status_code in RETRYABLE_HTTP or status_code >= 500:
        return StowAnswer("retry", status_code, f"STOW-RS answered HTTP {status_code}")
    return StowAnswer("dead", status_code, f"STOW-RS refused with HTTP {status_code}")


def stow_instance(
    path: Path,
    destination: DestinationSettings,
    study_instance_uid: str,
    sop_instance_uid: str,
    timeout: float,
) -> StowAnswer:
    """POST one Part 10 file to the destination's ``stow_url``/studies/{study} and classify the
    answer. Messages name the URL without credentials."""
    if destination.stow_url is None:
        raise ValueError(f'Argument "destination" must have a stow_url, got destination "{destination.name}"')
    shown = destination.describe()
    body, content_type = multipart_body(path.read_bytes())
    try:
        with httpx.Client(timeout=timeout, follow_redirects=False) as client:
            response = client.post(
                f"{destination.stow_url}/studies/{study_instance_uid}",
                content=body,
                headers={"Content-Type": content_type, "Accept": DICOM_JSON},
            )
    except httpx.TimeoutException:
        return StowAnswer("retry", None, f"STOW-RS to {shown} timed out after {timeout:.0f} s")
    except httpx.TransportError as exc:
        return StowAnswer("retry", None, f"cannot reach {shown} ({type(exc).__name__})")
    return classify(response.status_code, response.content[:1_000_000], sop_instance_uid)
