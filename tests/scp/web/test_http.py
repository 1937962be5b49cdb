"""The console over real HTTP (the node's own uvicorn server on loopback), attacked: bodies too
big (said or chunked), a login form posted from elsewhere, sessions across a restart and after a
logout, forged cookies, and a self-refreshing page whose session ended."""

from __future__ import annotations

import re
import select
import socket
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import httpx
import pytest

from conf import Settings
from scp.web.app import MAX_BODY_BYTES
from scp.web.auth import COOKIE, hash_password
from scp.web.server import WebServer
from storage.db import open_database, transaction
from tests.scp.web.rows import insert_done_study

UID = "1.2.826.0.1.3680043.8.498.7"


@pytest.fixture
def root(tmp_path: Path) -> Path:
    url = f"sqlite:///{tmp_path}/ainode.db"
    with open_database(url) as sessions, transaction(sessions) as session:
        insert_done_study(session, UID)
    return tmp_path


@contextmanager
def served(root: Path, **http: object) -> Iterator[str]:
    """The node's HTTP server on a free loopback port, over the database and storage root."""
    url = f"sqlite:///{root}/ainode.db"
    settings = Settings(
        storage={"root": root, "database_url": url, "min_free_mb": 1},  # type: ignore[arg-type]
        http={"host": "127.0.0.1", "port": 0, **http},  # type: ignore[arg-type]
    )
    with open_database(url) as sessions:
        server = WebServer(settings, sessions)
        server.start()
        try:
            yield f"http://127.0.0.1:{server.port}"
        finally:
            server.stop()


def _log_in(client: httpx.Client, user: str, password: str) -> httpx.Response:
    form = client.get("/login")
    token = re.search(r'name="csrf" value="([^"]+)"', form.text)
    assert token is not None
    return client.post("/login", data={"user": user, "password": password, "csrf": token.group(1)})


def _exchange(base: str, head: bytes, chunks: Iterator[bytes] | None = None) -> tuple[bytes, int]:
    """Send ``head`` then ``chunks`` on a raw socket until the server answers; returns the
    answer and how many body bytes went out before it came."""
    host, port = base.removeprefix("http://").split(":")
    chunks = chunks if chunks is not None else iter(())
    sent = 0
    with socket.create_connection((host, int(port)), timeout=10) as sock:
        sock.sendall(head)
        answer = b""
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline:
            readable, _, _ = select.select([sock], [], [], 0.05)
            if readable:
                part = sock.recv(65536)
                answer += part
                if not part or b"\r\n\r\n" in answer:
                    break
                continue
            chunk = next(chunks, None)
            if chunk is None:
                continue
            try:
                sock.sendall(chunk)
            except OSError:  # the server closed its side after answering
                continue
            sent += len(chunk)
    return answer, sent


@pytest.mark.parametrize("path", ["/login", f"/studies/{UID}/retry", "/deliveries/redeliver", "/healthz"])
def test_a_body_said_to_be_huge_is_refused_before_any_of_it_is_read(root: Path, path: str) -> None:
    with served(root, users={"admin": hash_password("pw")}) as base:
        head = (
            f"POST {path} HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/x-www-form-urlencoded\r\n"
            f"Content-Length: {10**12}\r\n\r\n"
        ).encode()
        answer, _ = _exchange(base, head)
    assert answer.startswith(b"HTTP/1.1 413"), answer[:200]


def test_a_chunked_body_without_a_length_is_refused_once_it_passes_the_limit(root: Path) -> None:
    with served(root, users={"admin": hash_password("pw")}) as base:
        head = (
            b"POST /login HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/x-www-form-urlencoded\r\n"
            b"Transfer-Encoding: chunked\r\n\r\n"
        )
        piece = b"a=" + b"x" * 8190
        chunks = (f"{len(piece):x}\r\n".encode() + piece + b"\r\n" for _ in range(10_000))  # 80 MiB
        answer, sent = _exchange(base, head, chunks)
    assert answer.startswith(b"HTTP/1.1 413"), answer[:200]
    assert sent < 64 * MAX_BODY_BYTES  # refused long before the end, not after reading it all


def test_a_small_chunked_form_still_works(root: Path) -> None:
    with served(root) as base, httpx.Client(base_url=base, timeout=30) as client:
        page = client.get(f"/studies/{UID}")
        token = re.search(r'name="csrf" value="([^"]+)"', page.text)
        assert token is not None
        body = f"csrf={token.group(1)}&id=1".encode()
        response = client.post(
            "/deliveries/redeliver",
            content=iter([body[:10], body[10:]]),  # no length: sent chunked
            headers={"content-type": "application/x-www-form-urlencoded"},
        )
    assert response.status_code == 303, response.text


def test_a_login_form_posted_from_another_site_logs_nobody_in(root: Path) -> None:
    """Login CSRF: another site's page posts its own account's name and password to the console
    from the operator's browser, which would then act (and be recorded) as that account. The
    form must carry the token of the browser's own pre-login session."""
    with served(root, users={"admin": hash_password("pw"), "mallory": hash_password("m")}) as base:
        with httpx.Client(base_url=base, timeout=30) as attacker:
            form = attacker.get("/login")
            stolen = re.search(r'name="csrf" value="([^"]+)"', form.text)
            assert stolen is not None
        with httpx.Client(base_url=base, timeout=30) as victim:
            for data in (
                {"user": "mallory", "password": "m"},  # no token at all
                {"user": "mallory", "password": "m", "csrf": stolen.group(1)},  # the attacker's own
            ):
                refused = victim.post("/login", data=data)
                assert refused.status_code == 403 and "did not come from this console" in refused.text
                assert victim.get("/studies").status_code == 303  # still not logged in
            assert _log_in(victim, "admin", "pw").status_code == 303  # the real form works
            assert victim.get("/studies").status_code == 200


def test_a_session_survives_a_restart_but_not_a_logout_made_before_it(root: Path) -> None:
    users = {"admin": hash_password("pw")}
    with served(root, users=users) as base, httpx.Client(base_url=base, timeout=30) as client:
        assert _log_in(client, "admin", "pw").status_code == 303
        kept, dropped = client.cookies[COOKIE], None
        with httpx.Client(base_url=base, timeout=30) as second:
            assert _log_in(second, "admin", "pw").status_code == 303
            dropped = second.cookies[COOKIE]
            page = second.get(f"/studies/{UID}")
            token = re.search(r'name="csrf" value="([^"]+)"', page.text)
            assert token is not None
            assert second.post("/logout", data={"csrf": token.group(1)}).status_code == 303
    with served(root, users=users) as base:  # the node restarted
        with httpx.Client(base_url=base, timeout=30, cookies={COOKIE: kept}) as client:
            assert client.get(f"/studies/{UID}").status_code == 200  # still logged in
        with httpx.Client(base_url=base, timeout=30, cookies={COOKIE: dropped}) as thief:
            assert thief.get(f"/studies/{UID}").status_code == 303  # logged out stays logged out
    with (
        served(root, users={"admin": hash_password("changed")}) as base,
        httpx.Client(base_url=base, timeout=30, cookies={COOKIE: kept}) as client,
    ):
        assert client.get(f"/studies/{UID}").status_code == 303  # the password changed


@pytest.mark.parametrize(
    "cookie",
    ["x", "a.b", "eyJ1IjogImFkbWluIn0.AAAA", "\u00e9", "." * 4000],
    ids=["word", "dot", "unsigned-admin", "latin", "long"],
)
def test_a_forged_cookie_opens_nothing_and_breaks_nothing(root: Path, cookie: str) -> None:
    with (
        served(root, users={"admin": hash_password("pw")}) as base,
        httpx.Client(base_url=base, timeout=30) as client,
    ):
        headers = {b"cookie": f"{COOKIE}={cookie}".encode()}
        assert client.get("/studies", headers=headers).status_code == 303
        assert client.post(f"/studies/{UID}/retry", headers=headers).status_code == 401
        assert client.get("/login", headers=headers).status_code == 200


def test_a_refreshing_page_whose_session_ended_goes_to_the_login_page(root: Path) -> None:
    with (
        served(root, users={"admin": hash_password("pw")}) as base,
        httpx.Client(base_url=base, timeout=30) as client,
    ):
        answer = client.get(
            "/studies?part=rows",
            headers={"hx-request": "true", "hx-current-url": f"{base}/studies?state=failed"},
        )
    assert answer.status_code == 401
    assert answer.headers["hx-redirect"] == "/login?next=%2Fstudies%3Fstate%3Dfailed"
