"""The operator's console in a real browser (headless Debian chromium driven by Playwright),
against a node that processed studies through Orthanc and the simulator.

Screenshots of every page land in the test's temp folder (``*.png``); look at them.
"""

from __future__ import annotations

import base64
import hashlib
import json
import os
import re
import shutil
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
from playwright.sync_api import Browser, Dialog, Page, expect, sync_playwright

from scp.web.auth import hash_password
from tests.data.generate import identifying_tokens
from tests.integration.loop import identifying_study, node_with_orthanc, push_from_orthanc, sr_in_orthanc
from tests.nodes import NodeFactory, free_port, orthanc, simulator, stop_process

CHROMIUM = "/usr/bin/chromium"
DATA_URL = re.compile(r"data:image/[a-z]+;base64,([A-Za-z0-9+/=]+)")


@pytest.fixture(scope="module")
def browser() -> Iterator[Browser]:
    """Debian's chromium (no browser download), headless; closed with its driver afterwards."""
    with sync_playwright() as playwright:
        launched = playwright.chromium.launch(executable_path=CHROMIUM, args=["--no-sandbox"])
        try:
            yield launched
        finally:
            launched.close()


@pytest.fixture
def page(browser: Browser, tmp_path: Path) -> Iterator[Page]:
    context = browser.new_context(viewport={"width": 1400, "height": 900})
    opened = context.new_page()
    errors: list[str] = []
    opened.on("pageerror", lambda exc: errors.append(str(exc)))
    opened.on("console", lambda m: errors.append(m.text) if m.type == "error" else None)
    try:
        yield opened
    finally:
        context.close()
    assert errors == [], errors  # no script error, no CSP violation, no missing file


def _accept(dialog: Dialog) -> None:
    dialog.accept()


def _sent_hashes(record: Path) -> list[list[str]]:
    """SHA-256 of each image in each request the simulator received, in order."""
    return [
        [hashlib.sha256(base64.b64decode(m)).hexdigest() for m in DATA_URL.findall(line)]
        for line in record.read_text().splitlines()
    ]


def _shot(page: Page, tmp_path: Path, name: str) -> None:
    page.screenshot(path=str(tmp_path / f"{name}.png"), full_page=True)


def test_the_console_shows_what_was_sent_and_retry_makes_a_new_sr_in_orthanc(
    make_node: NodeFactory, tmp_path: Path, page: Page
) -> None:
    study, files = identifying_study(tmp_path)
    record = tmp_path / "requests.jsonl"
    with simulator(tmp_path, "--record", str(record)) as url, orthanc(tmp_path) as ports:
        node = node_with_orthanc(make_node, url, ports)
        push_from_orthanc(ports["http_port"], files)
        node.wait_for_state(study, "done", timeout=60)
        base = f"http://127.0.0.1:{node.http_port}"

        page.goto(f"{base}/studies")
        row = page.locator(f'tr[data-study="{study}"]')
        expect(row.locator(".badge")).to_have_text("done")
        expect(row).to_contain_text("CT")
        expect(row).to_contain_text("42")
        expect(page.locator(".notice")).to_contain_text("answers only to this machine")
        _shot(page, tmp_path, "studies")

        row.locator("a").first.click()
        page.wait_for_url(f"{base}/studies/{study}?version=1")
        timeline = page.locator("table.timeline")
        for moment in ("first instance received", "version 1 settled and queued", "model call simulator"):
            expect(timeline).to_contain_text(moment)
        expect(timeline).to_contain_text("delivery to pacs: sent")
        expect(page.locator(".findings")).to_contain_text("SIMULATED")
        expect(page.locator("ul.tree.sr")).to_contain_text("Imaging Measurement Report")
        thumbs = page.locator("img.sent")
        expect(thumbs.first).to_be_visible(timeout=30_000)
        shown = []
        for index in range(thumbs.count()):
            src = thumbs.nth(index).get_attribute("src")
            assert src is not None
            body = page.request.get(f"{base}{src}").body()
            shown.append(hashlib.sha256(body).hexdigest())
            assert thumbs.nth(index).get_attribute("data-sha256") == shown[-1]
        (sent,) = _sent_hashes(record)
        assert shown == sent and len(sent) >= 1  # the bytes the model received, in its order
        expect(page.locator("span.recorded")).to_have_count(len(sent))  # each in the audit trail
        expect(timeline).to_contain_text("bytes to 127.0.0.1, SHA-256")
        html = page.content()
        for token in identifying_tokens():  # nobody logged in: no patient identifiers
            assert token not in html, token
        _shot(page, tmp_path, "study")

        page.once("dialog", _accept)
        page.get_by_role("button", name="Retry (new version)").click()
        expect(page.locator(".notice.ok")).to_contain_text("queued again as version 2")
        again = node.wait_for_state(study, "done", timeout=60)
        assert again["version"] == 2
        deadline = time.monotonic() + 30
        while len(sr_in_orthanc(ports["http_port"], study)) < 2 and time.monotonic() < deadline:
            time.sleep(0.3)
        assert len(sr_in_orthanc(ports["http_port"], study)) == 2  # version 2's SR reached Orthanc
        page.reload()
        expect(page.locator("table.timeline")).to_contain_text("retry by local operator (loopback)")
        expect(page.locator("table.timeline")).to_contain_text("version 2 analysis succeeded")
        # The studies page: one row per version, newest first, each with its own SR.
        page.goto(f"{base}/studies")
        rows = page.locator(f'tr[data-study="{study}"]')
        expect(rows).to_have_count(2)
        assert [rows.nth(i).get_attribute("data-version") for i in range(2)] == ["2", "1"]
        for i in range(2):
            expect(rows.nth(i).locator(".badge")).to_have_text("done")
            expect(rows.nth(i).locator("a", has_text="SR")).to_have_count(1)
        srs = {rows.nth(i).locator("a", has_text="SR").get_attribute("title") for i in range(2)}
        assert len(srs) == 2  # two SR versions
        _shot(page, tmp_path, "studies-versions")
        rows.nth(1).locator("a").first.click()  # version 1's own page
        expect(page.locator(".notice").last).to_contain_text("Showing version 1")
        expect(page.locator("ul.tree.sr")).to_contain_text("Imaging Measurement Report")

        for name in ("deliveries", "costs", "health"):
            page.goto(f"{base}/{name}")
            _shot(page, tmp_path, name)
        expect(page.locator("pre.config")).to_contain_text('"api_key": "(not set)"')


def test_a_dead_lettered_delivery_is_redelivered_from_the_page(
    make_node: NodeFactory, tmp_path: Path, page: Page
) -> None:
    study, files = identifying_study(tmp_path)
    dicom_port, http_port = free_port(), free_port()
    with simulator(tmp_path) as url:
        node = make_node(
            vision={"provider": "simulator", "base_url": url},
            worker={"poll_seconds": 0.2},
            delivery={"max_attempts": 1, "poll_seconds": 0.2},
            destinations=[{"name": "pacs", "ae_title": "ORTHANC", "host": "127.0.0.1", "port": dicom_port}],
        ).start()
        node.cli("send", *map(str, files), "--to", f"AINODE@127.0.0.1:{node.port}")
        node.wait_for_state(study, "failed", timeout=60)  # Orthanc is not running: dead-lettered
        base = f"http://127.0.0.1:{node.http_port}"
        page.goto(f"{base}/deliveries?state=dead")
        expect(page.locator("table.deliveries")).to_contain_text("dead")
        _shot(page, tmp_path, "deliveries-dead")
        with orthanc(tmp_path, dicom_port=dicom_port, http_port=http_port):
            page.locator("input[data-select-all]").check()
            page.once("dialog", _accept)
            page.get_by_role("button", name="Redeliver the selected").click()
            expect(page.locator(".notice.ok")).to_contain_text("queued again")
            done = node.wait_for_state(study, "done", timeout=60)
            assert all(d["state"] == "sent" for d in done["deliveries"])
            assert len(sr_in_orthanc(http_port, study)) == 1
        page.goto(f"{base}/studies/{study}")
        timeline = page.locator("table.timeline")
        expect(timeline).to_contain_text("redeliver by local operator (loopback)")
        # Each attempt per destination with its outcome: refused (nobody listening), then sent.
        attempts = timeline.locator("tr.attempt")
        expect(timeline.locator("tr.attempt.dead").first).to_contain_text("delivery to pacs: dead")
        expect(timeline.locator("tr.attempt.dead").first).to_contain_text("cannot reach 127.0.0.1")
        expect(timeline.locator("tr.attempt.sent").first).to_contain_text("delivery to pacs: sent")
        expect(timeline.locator("tr.attempt.sent").first).to_contain_text("attempt 1, status 0x0000")
        outcomes = [row.get_attribute("class") for row in attempts.all()]
        first_sent = outcomes.index("attempt sent")
        assert "attempt dead" in outcomes[:first_sent]  # the history in order: dead, then sent
        expect(timeline).to_contain_text("claimed by a worker")
        expect(page.locator("img.sent").first).to_be_visible(timeout=30_000)
        _shot(page, tmp_path, "study-delivery-history")


def test_with_users_the_console_asks_for_a_login_shows_patient_data_and_checks_csrf(
    make_node: NodeFactory, tmp_path: Path, page: Page
) -> None:
    study, files = identifying_study(tmp_path)
    hashed = hash_password("correct horse")
    node = make_node()
    # [http] users is a table: written by hand after the generic config.
    node.config.write_text(node.config.read_text() + f'\n[http.users]\nadmin = "{hashed}"\n')
    node.start()
    node.cli("send", *map(str, files), "--to", f"AINODE@127.0.0.1:{node.port}")
    node.wait_for_state(study, "waiting", timeout=60)
    base = f"http://127.0.0.1:{node.http_port}"
    page.goto(f"{base}/studies/{study}")
    page.wait_for_url(re.compile(r".*/login\?next=.*"))
    page.fill("#user", "admin")
    page.fill("#password", "wrong")
    page.get_by_role("button", name="Log in").click()
    expect(page.locator(".error")).to_contain_text("Wrong name or password")
    page.fill("#user", "admin")
    page.fill("#password", "correct horse")
    page.get_by_role("button", name="Log in").click()
    page.wait_for_url(f"{base}/studies/{study}")
    expect(page.locator("dl.patient")).to_contain_text("Doemann^Janeth^Quorra")
    expect(page.locator("dl.patient")).to_contain_text("MRN-4471-0932")
    _shot(page, tmp_path, "study-logged-in")
    cookie = next(c for c in page.context.cookies() if c["name"] == "ainode_session")
    assert cookie["httpOnly"] and cookie["sameSite"] == "Strict"
    # An action without the session's CSRF token is refused, and changes nothing.
    forged = page.request.post(f"{base}/studies/{study}/retry", form={"csrf": "guess"})
    assert forged.status == 403
    assert node.status()[0]["version"] == 1
    # Without a session: /healthz and /metrics still answer (monitoring), the console does not.
    with httpx.Client(base_url=base, timeout=30) as client:
        assert client.get("/metrics").status_code == 200
        assert client.get("/studies", follow_redirects=False).status_code == 303
        assert client.post(f"/studies/{study}/retry").status_code == 401


def test_without_users_a_forwarded_non_loopback_peer_is_refused(make_node: NodeFactory) -> None:
    """uvicorn believes X-Forwarded-For only from this machine: a proxy on loopback passing on a
    remote visitor does not make the console public."""
    node = make_node().start()
    with httpx.Client(base_url=f"http://127.0.0.1:{node.http_port}", timeout=30) as client:
        assert client.get("/studies").status_code == 200
        refused = client.get("/studies", headers={"X-Forwarded-For": "203.0.113.7"})
        assert refused.status_code == 403 and "answers only to loopback" in refused.text
        assert "203.0.113.7" in refused.text
        assert client.get("/healthz", headers={"X-Forwarded-For": "203.0.113.7"}).status_code in (200, 503)


NETNS_SCRIPT = """
import socket, subprocess, sys, time, http.client
config, address = sys.argv[1], sys.argv[2]
node = subprocess.Popen([sys.executable, "-m", "scp.cli", "-c", config, "serve"],
                        stdout=open(config + ".log", "wb"), stderr=subprocess.STDOUT)
try:
    port = int(sys.argv[3])
    for _ in range(300):
        try:
            socket.create_connection(("127.0.0.1", port), timeout=0.5).close()
            break
        except OSError:
            time.sleep(0.1)
    results = {}
    for name, source in (("loopback", "127.0.0.1"), ("other", address)):
        conn = http.client.HTTPConnection(address if name == "other" else "127.0.0.1", port,
                                          timeout=30, source_address=(source, 0))
        conn.request("GET", "/studies")
        results[name] = conn.getresponse().status
        conn.close()
    print(results)
finally:
    node.terminate()
    node.wait(timeout=30)
"""


@pytest.mark.skipif(shutil.which("unshare") is None or os.geteuid() != 0, reason="needs unshare -n as root")
def test_without_users_a_second_address_is_refused_in_a_private_network_namespace(tmp_path: Path) -> None:
    """The node listens on every interface of a private network namespace whose loopback also
    carries 10.77.0.1: a request from 10.77.0.1 is refused, one from 127.0.0.1 answered."""
    http_port, dicom_port = free_port(), free_port()
    config = tmp_path / "ainode.toml"
    config.write_text(
        f'[node]\nhost = "127.0.0.1"\nport = {dicom_port}\nreceiver_processes = 1\n'
        f'[storage]\nroot = "{tmp_path}/var"\ndatabase_url = "sqlite:///{tmp_path}/var/ainode.db"\n'
        f'min_free_mb = 1\n[http]\nhost = "0.0.0.0"\nport = {http_port}\n'
    )
    script = tmp_path / "netns.py"
    script.write_text(NETNS_SCRIPT)
    shell = (
        "ip link set lo up && ip addr add 10.77.0.1/32 dev lo && "
        f'exec "{sys.executable}" "{script}" "{config}" 10.77.0.1 {http_port}'
    )
    proc = subprocess.Popen(
        ["unshare", "-n", "sh", "-c", shell], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
    )
    try:
        out, err = proc.communicate(timeout=120)
    finally:
        stop_process(proc)
    assert proc.returncode == 0, err
    assert json.loads(out.strip().replace("'", '"')) == {"loopback": 200, "other": 403}
