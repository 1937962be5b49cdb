"""Look at the node's SR in the real OHIF 3.13.2: screenshots of what a radiologist sees.

    python -m benchmarks.ohif_view [--out DIR] [--cache DIR] [--slices 12]

Run on demand (not a CI test; it needs npm's registry once, Orthanc's DICOMweb plugin and Debian's
``chromium``; ``pip install playwright`` drives it, no browser download). It

1. takes OHIF's built viewer from ``npm pack @ohif/app@3.13.2`` (downloaded once into ``--cache``,
   default ``~/.cache/ainode/ohif``, and unpacked there);
2. makes a CT study from pydicom-data and an SR the way the node makes one
   (``analysis.report.build_sr`` on the study as the node prepares it), with a coded finding
   present, an uncertain one, one the closed list has no code for, and a pertinent negative, each
   with a box on a different slice, one without a box;
3. starts Orthanc with its DICOMweb plugin (loopback only) and stores both there;
4. serves OHIF's static build and, on the same origin, Orthanc's ``/dicom-web`` (a small proxy,
   so no CORS), with an ``app-config.js`` whose one data source is that DICOMweb;
5. opens the study in headless Chromium (WebGL by SwiftShader) and writes PNGs to ``--out``:
   ``01-study.png`` (the CT as the study opens, measurement panel open), ``02-sr.png`` (the SR
   in its viewport, with the labels OHIF prints beside the first region and the badge's
   tooltip), ``03-declined-region-N.png`` (each region after the tracking question is answered
   No, or ``02-sr-region-N.png`` when OHIF asks none), ``04-tracked.png`` (answered Yes: the
   regions loaded as measurements, the measurement panel) and ``05-ct-after-tracking.png`` (the
   CT series opened again after that); ``console.txt`` holds the viewer's console (OHIF logs
   "Measurement is not rehydratable" there) and ``sr.dcm`` the SR.

Open the PNGs and look: the label beside each region must name the finding in words, say AI and
unverified, and show no number that reads as a measurement; the regions must not vanish whichever
way the tracking question is answered.
"""

from __future__ import annotations

import argparse
import datetime as dt
import functools
import http.client
import json
import shutil
import subprocess
import tarfile
import tempfile
import threading
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from http.server import SimpleHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import httpx
from pydicom import dcmread
from pydicom.dataset import Dataset
from pydicom.uid import generate_uid

from analysis.findings import Findings
from analysis.mosaic import ComposedImage
from analysis.report import SR_SERIES_DESCRIPTION, ReportContext, build_sr
from analysis.uids import UidMaker
from analysis.vision.reading import read_findings
from tests.data.generate import CT_512, write_series
from tests.data.ingest import prepared_study
from tests.nodes import free_port, orthanc

OHIF_VERSION = "3.13.2"
DICOMWEB_PLUGIN = "/usr/share/orthanc/plugins/libOrthancDicomWeb.so"
CHROMIUM = "/usr/bin/chromium"
WEBGL_ARGS = [  # Cornerstone3D needs WebGL: SwiftShader, no GPU
    "--use-gl=angle",
    "--use-angle=swiftshader",
    "--enable-unsafe-swiftshader",
    "--ignore-gpu-blocklist",
]
APP_CONFIG = """window.config = {
  routerBasename: '/',
  showStudyList: true,
  extensions: [],
  modes: [],
  showWarningMessageForCrossOrigin: false,
  showCPUFallbackMessage: true,
  showLoadingIndicator: true,
  strictZSpacingForVolumeViewport: true,
  defaultDataSourceName: 'orthanc',
  dataSources: [
    {
      namespace: '@ohif/extension-default.dataSourcesModule.dicomweb',
      sourceName: 'orthanc',
      configuration: {
        friendlyName: 'Orthanc (ainode ohif_view)',
        name: 'orthanc',
        wadoUriRoot: '/dicom-web',
        qidoRoot: '/dicom-web',
        wadoRoot: '/dicom-web',
        qidoSupportsIncludeField: false,
        imageRendering: 'wadors',
        thumbnailRendering: 'wadors',
        enableStudyLazyLoad: true,
        supportsFuzzyMatching: false,
        supportsWildcard: true,
        dicomUploadEnabled: false,
        bulkDataURI: { enabled: true },
        omitQuotationForMultipartRequest: true,
      },
    },
  ],
};
"""


def ohif_dist(cache: Path) -> Path:
    """OHIF's built viewer (the ``dist`` folder of the npm package), fetched once into ``cache``."""
    unpacked = cache / OHIF_VERSION / "package" / "dist"
    if (unpacked / "index.html").is_file():
        return unpacked
    cache.mkdir(parents=True, exist_ok=True)
    tarball = cache / f"ohif-app-{OHIF_VERSION}.tgz"
    if not tarball.is_file():
        subprocess.run(
            ["npm", "pack", f"@ohif/app@{OHIF_VERSION}", "--pack-destination", str(cache)],
            check=True,
            timeout=900,
        )
    with tarfile.open(tarball) as archive:
        archive.extractall(cache / OHIF_VERSION, filter="data")
    if not (unpacked / "index.html").is_file():
        raise FileNotFoundError(f"{tarball} has no package/dist/index.html")
    return unpacked


def _box_on(image: ComposedImage, tile_index: int, left: float, top: float, size: float) -> dict[str, float]:
    """A box in fractions of ``image``, inside its tile ``tile_index`` (``left``, ``top`` and
    ``size`` in fractions of the tile), so that it lands on that slice."""
    tile = image.tiles[tile_index % len(image.tiles)]
    x0, y0 = tile.x0 + left * tile.width, tile.y0 + top * tile.height
    x1, y1 = x0 + size * tile.width, y0 + size * tile.height
    width, height = image.width, image.height
    return {"x_min": x0 / width, "y_min": y0 / height, "x_max": x1 / width, "y_max": y1 / height}


def model_reply(image: ComposedImage) -> dict[str, Any]:
    """What a model might answer for this CT: one finding of each kind the SR encodes."""
    return {
        "study_quality": "diagnostic",
        "summary": "8 mm nodule in the right upper lobe; possible small left pleural effusion.",
        "overall_urgency": 2,
        "findings": [
            {
                "description": "Solid nodule, about 8 mm, smooth margins",
                "assertion": "present",
                "finding_code": "27925004",
                "body_site": "right upper lobe",
                "laterality": "right",
                "image_index": 1,
                "box": _box_on(image, 2, 0.25, 0.3, 0.12),
                "confidence": 0.82,
                "severity": "mild",
                "recommendation": "CT follow-up in 6-12 months (Fleischner).",
            },
            {
                "description": "Possible small left pleural effusion, blunted costophrenic angle",
                "assertion": "uncertain",
                "finding_code": "60046008",
                "body_site": "left costophrenic angle",
                "laterality": "left",
                "image_index": 1,
                "box": _box_on(image, 5, 0.6, 0.6, 0.2),
                "confidence": 0.4,
            },
            {
                "description": "2 cm spiculated mass, suspicious for malignancy",
                "assertion": "present",
                "body_site": "right upper lobe",
                "image_index": 1,
                "box": _box_on(image, 8, 0.3, 0.2, 0.18),
                "confidence": 0.7,
                "severity": "severe",
            },
            {
                "description": "Mild cardiomegaly",
                "assertion": "present",
                "finding_code": "8186001",
                "body_site": "heart",
                "confidence": 0.6,
            },
            {"description": "No pneumothorax.", "assertion": "absent", "finding_code": "36118008"},
        ],
    }


def make_study(work: Path, slices: int) -> tuple[list[Path], Path, str]:
    """A CT series and the node's SR for it: (CT files, SR file, Study Instance UID)."""
    study = generate_uid()
    files = write_series(work / "ct", slices, source=CT_512, study_instance_uid=study)
    prepared, _ = prepared_study(files, work)
    headers = {str(h.SOPInstanceUID): h for h in (dcmread(f, stop_before_pixels=True) for f in files)}
    shown = {t.sop_instance_uid for image in prepared.composed for t in image.tiles}
    sizes = [(image.width, image.height) for image in prepared.encoded]
    findings: Findings = read_findings(model_reply(prepared.composed[0]), sizes, "fraction")
    context = ReportContext(
        study_instance_uid=study,
        study_version=1,
        provider="openai",
        model="example-vision-model",
        prompt_version="ainode-prompt-1",
        analysis_started=dt.datetime.now(dt.UTC).replace(microsecond=0),
        uids=UidMaker(uuid.uuid4()),
    )
    sr: Dataset = build_sr(
        findings, prepared.composed, {uid: headers[uid] for uid in shown}, context, list(headers.values())
    )
    sr_path = work / "sr.dcm"
    sr.save_as(sr_path, enforce_file_format=True)
    return files, sr_path, study


class _ViewerHandler(SimpleHTTPRequestHandler):
    """OHIF's static files (``index.html`` for the viewer's own routes), our ``app-config.js``,
    and ``/dicom-web/...`` passed through to Orthanc."""

    orthanc_port = 0

    def log_message(self, format: str, *args: Any) -> None:
        pass

    def do_GET(self) -> None:
        if self.path.startswith("/dicom-web/"):
            self._proxy()
            return
        if self.path.split("?")[0] == "/app-config.js":
            body = APP_CONFIG.encode()
            self.send_response(200)
            self.send_header("Content-Type", "application/javascript")
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)
            return
        local = Path(self.translate_path(self.path))
        if not local.exists():
            self.path = "/index.html"  # the viewer's client-side routes (/viewer?...)
        super().do_GET()

    def _proxy(self) -> None:
        connection = http.client.HTTPConnection("127.0.0.1", self.orthanc_port, timeout=120)
        headers = {k: v for k, v in self.headers.items() if k.lower() in ("accept", "range")}
        connection.request("GET", self.path, headers=headers)
        response = connection.getresponse()
        body = response.read()
        self.send_response(response.status)
        for name, value in response.getheaders():
            if name.lower() not in ("transfer-encoding", "connection", "content-length"):
                self.send_header(name, value)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)
        connection.close()


@contextmanager
def viewer_server(dist: Path, orthanc_port: int) -> Iterator[str]:
    handler = type("Handler", (_ViewerHandler,), {"orthanc_port": orthanc_port})
    server = ThreadingHTTPServer(("127.0.0.1", free_port()), functools.partial(handler, directory=str(dist)))
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}"
    finally:
        server.shutdown()
        server.server_close()


def _open_sr(page: Any, viewer: str, study: str) -> None:
    """The study in OHIF's basic viewer, then the SR series double-clicked into the viewport."""
    page.goto(f"{viewer}/viewer?StudyInstanceUIDs={study}")
    page.wait_for_selector("[data-cy='study-browser-thumbnail']", timeout=60_000)
    page.wait_for_timeout(6000)
    for dismiss in ("Skip all", "Confirm and hide"):  # the first-visit tour and the banner
        found = page.get_by_text(dismiss, exact=True)
        if found.count():
            found.first.click()
            page.wait_for_timeout(500)


def _regions(page: Any, out: Path, name: str, count: int) -> None:
    """A screenshot of each region the SR viewport steps through with its arrows."""
    arrow = page.locator("[data-cy='viewport-action-arrows-right']")
    for index in range(count):
        page.screenshot(path=out / f"{name}-{index + 1}.png")
        if not arrow.count():
            return
        arrow.first.click()
        page.wait_for_timeout(2500)


def look(viewer: str, study: str, out: Path, regions: int) -> None:
    """Open the study and its SR in headless Chromium and write the screenshots."""
    from playwright.sync_api import sync_playwright  # an on-demand tool's dependency

    console: list[str] = []
    with sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path=CHROMIUM, headless=True, args=WEBGL_ARGS)
        try:
            for answer in ("No", "Yes"):
                page = browser.new_page(viewport={"width": 1600, "height": 1000})
                page.on("console", lambda message: console.append(f"[{message.type}] {message.text}"))
                console.append(f"--- a new page; the tracking question will be answered {answer}")
                _open_sr(page, viewer, study)
                page.locator("[data-cy='trackedMeasurements-btn']").first.click()  # the measurement panel
                page.wait_for_timeout(1000)
                if answer == "No":
                    page.screenshot(path=out / "01-study.png")
                page.get_by_text(SR_SERIES_DESCRIPTION, exact=True).first.dblclick()
                page.wait_for_timeout(8000)
                question = page.get_by_role("button", name=answer, exact=True)
                if answer == "No":
                    badge = page.locator("[data-cy^='ModalityLoadBadge']")
                    if badge.count():
                        badge.first.hover()  # its tooltip says whether OHIF can load the SR
                        page.wait_for_timeout(1000)
                    page.screenshot(path=out / "02-sr.png")
                    if not question.count():
                        _regions(page, out, "02-sr-region", regions)
                if question.count():
                    question.first.click()
                    page.wait_for_timeout(8000)
                    console.append(f"--- answered {answer} to the tracking question")
                else:
                    console.append(f"--- no tracking question offered (would have answered {answer})")
                if answer == "No":
                    _regions(page, out, "03-declined-region", regions)
                else:
                    page.screenshot(path=out / "04-tracked.png")
                    # the CT itself, as the radiologist goes back to it: do the regions stay?
                    page.locator("[data-cy='study-browser-thumbnail']").first.dblclick()
                    page.wait_for_timeout(6000)
                    page.screenshot(path=out / "05-ct-after-tracking.png")
                page.close()
        finally:
            browser.close()
    (out / "console.txt").write_text("\n".join(console) + "\n")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=Path("ohif-screenshots"))
    parser.add_argument("--cache", type=Path, default=Path.home() / ".cache" / "ainode" / "ohif")
    parser.add_argument("--slices", type=int, default=12)
    args = parser.parse_args()
    if shutil.which(CHROMIUM) is None:
        raise SystemExit(f"{CHROMIUM} is missing: apt-get install -y chromium")
    dist = ohif_dist(args.cache)
    args.out.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix="ainode-ohif-") as tmp:
        work = Path(tmp)
        files, sr_path, study = make_study(work, args.slices)
        shutil.copy(sr_path, args.out / "sr.dcm")
        dicomweb = {"Enable": True, "Root": "/dicom-web/", "EnableWado": True}
        with orthanc(work, Plugins=[DICOMWEB_PLUGIN], DicomWeb=dicomweb) as ports:
            with httpx.Client(base_url=f"http://127.0.0.1:{ports['http_port']}", timeout=60) as client:
                for path in [*files, sr_path]:
                    client.post("/instances", content=path.read_bytes()).raise_for_status()
            with viewer_server(dist, ports["http_port"]) as viewer:
                look(viewer, study, args.out, regions=3)
    print(json.dumps({"screenshots": sorted(str(p) for p in args.out.glob("*.png")), "study": study}))


if __name__ == "__main__":
    main()
