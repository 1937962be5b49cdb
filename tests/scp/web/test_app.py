"""The console's routes attacked through Starlette's test client: sessions after logout, login
guessing, and path or form values no page makes (a 4xx, never a 500)."""

from __future__ import annotations

import asyncio
import json
import re
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
from sqlalchemy import insert, update
from sqlalchemy.orm import Session, sessionmaker

from conf import Settings
from scp.web import documents
from scp.web.app import hidden_settings, make_app
from scp.web.auth import COOKIE, LOGIN_FREE_FAILURES, hash_password
from storage.db import make_engine, make_session_factory, migrate, transaction
from storage.models import Job, Outbox, Study, utc_now
from tests.scp.web.rows import insert_done_study

UID = "1.2.826.0.1.3680043.8.498.1"


@pytest.fixture
def sessions(tmp_path: Path) -> Iterator[sessionmaker[Session]]:
    yield from _database(f"sqlite:///{tmp_path}/queue.db")


@pytest.fixture
def pg_sessions(postgres_url: str) -> Iterator[sessionmaker[Session]]:
    yield from _database(postgres_url)


def _database(url: str) -> Iterator[sessionmaker[Session]]:
    engine = make_engine(url)
    migrate(engine)
    factory = make_session_factory(engine)
    with transaction(factory) as session:
        insert_done_study(session, UID)
    yield factory
    engine.dispose()


class Browser:
    """A visitor from one peer address with its cookie jar (Starlette's test client warns)."""

    def __init__(self, app: Any, peer: str = "127.0.0.1") -> None:
        self.app = app
        self.peer = peer
        self.cookies = httpx.Cookies()

    def request(self, method: str, path: str, **kwargs: Any) -> httpx.Response:
        async def go() -> httpx.Response:
            transport = httpx.ASGITransport(
                app=self.app, client=(self.peer, 50000), raise_app_exceptions=False
            )
            async with httpx.AsyncClient(
                transport=transport, base_url="http://127.0.0.1:8080", cookies=self.cookies
            ) as client:
                response = await client.request(method, path, **kwargs)
                self.cookies = httpx.Cookies(client.cookies)
                return response

        return asyncio.run(go())

    def get(self, path: str, **kwargs: Any) -> httpx.Response:
        return self.request("GET", path, **kwargs)

    def post(self, path: str, **kwargs: Any) -> httpx.Response:
        return self.request("POST", path, **kwargs)


def _app(tmp_path: Path, sessions: sessionmaker[Session], **http: object) -> Any:
    settings = Settings(storage={"root": str(tmp_path / "root")}, http=http)  # type: ignore[arg-type]
    return make_app(settings, sessions)


def _client(tmp_path: Path, sessions: sessionmaker[Session], **http: object) -> Browser:
    return Browser(_app(tmp_path, sessions, **http))


def _login(client: Browser, user: str, password: str, **kwargs: Any) -> httpx.Response:
    """Log in as a browser does: the login form first (its CSRF token), then the post."""
    found = re.search(r'name="csrf" value="([^"]+)"', client.get("/login").text)
    assert found is not None
    return client.post("/login", data={"user": user, "password": password, "csrf": found.group(1)}, **kwargs)


def _csrf(client: Browser) -> str:
    found = re.search(r'name="csrf" value="([^"]+)"', client.get(f"/studies/{UID}").text)
    assert found is not None
    return found.group(1)


@pytest.mark.parametrize(
    "path",
    [
        f"/studies/{UID}/sent/{'9' * 30}",
        f"/studies/{UID}/sent/{'9' * 30}/manifest.json",
        f"/studies/{UID}/sent/{'9' * 30}/1",
        f"/studies/{UID}/sent/1/{'9' * 30}",
        f"/studies/{UID}/sent/{'9' * 5000}/1",
        f"/studies/{UID}/sent/x",
        f"/studies/{UID}/sent/1/-1",
    ],
    ids=lambda path: path[len(UID) + 15 :][:40],
)
def test_a_version_or_image_number_too_big_for_the_database_is_not_found(
    tmp_path: Path, sessions: sessionmaker[Session], path: str
) -> None:
    response = _client(tmp_path, sessions).get(path)
    assert response.status_code == 404, response.text


@pytest.mark.parametrize(
    "value", ["²", "9" * 30, "9" * 5000, "٣"], ids=["superscript", "30", "5000", "arabic"]
)
def test_bulk_redeliver_ignores_ids_that_name_no_delivery(
    tmp_path: Path, sessions: sessionmaker[Session], value: str
) -> None:
    client = _client(tmp_path, sessions)
    response = client.post("/deliveries/redeliver", data={"id": [value, "1"], "csrf": _csrf(client)})
    assert response.status_code == 303, response.text
    assert "0+delivery" in response.headers["location"]


def test_a_session_cookie_is_dead_after_logout_even_when_replayed_from_elsewhere(
    tmp_path: Path, sessions: sessionmaker[Session]
) -> None:
    app = _app(tmp_path, sessions, users={"admin": hash_password("pw")})
    operator = Browser(app, peer="10.0.0.7")
    assert _login(operator, "admin", "pw").status_code == 303
    cookie = operator.cookies[COOKIE]
    assert operator.get(f"/studies/{UID}").status_code == 200
    assert operator.post("/logout", data={"csrf": _csrf(operator)}).status_code == 303
    thief = Browser(app, peer="10.0.0.66")
    thief.cookies.set(COOKIE, cookie)
    assert thief.get(f"/studies/{UID}").status_code == 303  # to the login page
    assert thief.post(f"/studies/{UID}/retry", data={"csrf": "x"}).status_code == 401


def test_login_guessing_is_answered_429_after_a_few_failures_from_one_address(
    tmp_path: Path, sessions: sessionmaker[Session]
) -> None:
    app = _app(tmp_path, sessions, users={"admin": hash_password("pw")})
    guesser = Browser(app, peer="10.0.0.66")
    for n in range(LOGIN_FREE_FAILURES):
        wrong = _login(guesser, "admin", f"guess{n}")
        assert wrong.status_code == 200 and "Wrong name or password" in wrong.text
    held = _login(guesser, "admin", "pw")  # even the right one
    assert held.status_code == 429 and int(held.headers["retry-after"]) >= 1
    assert guesser.get("/studies").status_code == 303  # not logged in
    operator = Browser(app, peer="10.0.0.7")
    assert _login(operator, "admin", "pw").status_code == 303


@pytest.mark.parametrize(
    ("host", "allowed"),
    [
        ("localhost:8080", True),
        ("127.0.0.1:8080", True),
        ("[::1]:8080", True),
        ("LOCALHOST", True),
        ("rebound.attacker.example:8080", False),
        ("127.0.0.1.nip.io:8080", False),
    ],
)
def test_without_users_a_page_named_by_someone_elses_host_name_is_refused(
    tmp_path: Path, sessions: sessionmaker[Session], host: str, allowed: bool
) -> None:
    """DNS rebinding: a site the operator opens on the node points its own name at 127.0.0.1;
    the browser then counts the console as that site's and lets its scripts read the pages (and
    their CSRF token) and post actions. Only loopback and this machine's names are answered."""
    response = _client(tmp_path, sessions).get(f"/studies/{UID}", headers={"host": host})
    assert response.status_code == (200 if allowed else 403)
    assert ('name="csrf"' in response.text) is allowed


def test_the_files_of_a_study_are_looked_for_in_its_own_folder_only(tmp_path: Path) -> None:
    (tmp_path / "summary").mkdir()
    (tmp_path / "elsewhere.dcm").write_bytes(b"not for this study")
    assert documents.newest_file(tmp_path, "summary", "..") is None  # GET /studies/../summary.png
    assert documents.newest_file(tmp_path, "summary", ".") is None
    assert documents.newest_file(tmp_path, "summary", "") is None


def test_a_summary_or_sr_file_that_is_not_readable_dicom_is_not_a_500(
    tmp_path: Path, sessions: sessionmaker[Session]
) -> None:
    for folder, sop in (("summary", "1.2.3"), ("sr", "1.2.9")):
        (tmp_path / "root" / folder / UID).mkdir(parents=True)
        (tmp_path / "root" / folder / UID / f"{sop}.abcd.dcm").write_bytes(b"cut short by a full disk")
    with transaction(sessions) as session:
        session.execute(update(Study).values(sr_sop_instance_uid="1.2.9"))
    client = _client(tmp_path, sessions)
    assert client.get(f"/studies/{UID}/summary.png").status_code == 404
    assert client.get(f"/studies/{UID}").status_code == 200


def test_the_settings_page_hides_credentials_in_every_url() -> None:
    settings = Settings(
        vision={"base_url": "https://gw:secret1@llm-gateway.example/v1?key=secret2"},  # type: ignore[arg-type]
        storage={"database_url": "postgresql+psycopg://ainode:secret3@db/ainode?sslpassword=secret4"},  # type: ignore[arg-type]
        destinations=[{"name": "pacs", "stow_url": "https://u:secret5@pacs/dicom-web?access_token=secret6"}],  # type: ignore[arg-type]
    )
    shown = json.dumps(hidden_settings(settings))
    assert "secret" not in shown
    assert "llm-gateway.example/v1" in shown and "pacs/dicom-web" in shown and "@db/ainode" in shown


@pytest.mark.parametrize("day", ["9999-12-31", "0001-01-01", "2026-02-30", "x"])
def test_a_date_filter_at_the_end_of_the_calendar_is_no_500(
    tmp_path: Path, sessions: sessionmaker[Session], day: str
) -> None:
    response = _client(tmp_path, sessions).get("/studies", params={"date": day})
    assert response.status_code == 200


@pytest.mark.postgres
@pytest.mark.parametrize(
    "path",
    [
        "/studies?modality=%00",
        "/studies?uid=1.2%00",
        "/studies?ae=CT%00",
        "/studies/1.2%00",
        "/studies/1.2%00/sent/1",
        "/studies/1.2%00/sent/1/manifest.json",
    ],
)
def test_a_nul_character_in_a_url_is_a_bad_request_not_a_database_error(
    tmp_path: Path, pg_sessions: sessionmaker[Session], path: str
) -> None:
    """PostgreSQL refuses a NUL in a string (SQLite takes it): psycopg raised, a 500."""
    client = _client(tmp_path, pg_sessions)
    assert client.get(path).status_code == 400
    response = client.post("/studies/1.2%00/retry", data={"csrf": _csrf(client)})
    assert response.status_code == 400


def test_the_deliveries_page_pages_through_everything_not_delivered(
    tmp_path: Path, sessions: sessionmaker[Session]
) -> None:
    now = utc_now()
    with transaction(sessions) as session:
        session.execute(
            insert(Outbox),
            [
                {
                    "study_instance_uid": UID,
                    "study_version": 1,
                    "destination": "pacs",
                    "sr_path": f"{'kos' if n == 0 else 'sr'}/{UID}/2.25.{n}.x.dcm",
                    "sr_sop_instance_uid": f"2.25.{n}",
                    "state": "pending" if n == 0 else "dead",
                    "attempts": 2,
                    "next_attempt_at": now,
                    "created_at": now,
                    "updated_at": now,
                }
                for n in range(501)
            ],
        )
    client = _client(tmp_path, sessions)
    first = client.get("/deliveries")
    assert "501 not delivered" in first.text and "page 1 of 2" in first.text
    assert first.text.count('name="id"') == 499  # 500 rows, the first one retrying
    assert ">retrying</span>" in first.text and "key images" in first.text
    second = client.get("/deliveries", params={"page": "2"})
    assert second.text.count('name="id"') == 1 and 'value="/deliveries?page=2"' in second.text
    assert client.get("/deliveries", params={"page": "9" * 40}).status_code == 200


def test_the_study_page_shows_an_earlier_version_when_asked(
    tmp_path: Path, sessions: sessionmaker[Session]
) -> None:
    now = utc_now()
    with transaction(sessions) as session:
        session.execute(update(Study).values(version=2))
        for version in (1, 2):
            session.execute(
                insert(Job).values(
                    kind="analyse",
                    study_instance_uid=UID,
                    study_version=version,
                    state="succeeded",
                    attempts=1,
                    findings_json=json.dumps({"summary": f"summary of version {version}", "findings": []}),
                    run_after=now,
                    created_at=now,
                    updated_at=now,
                )
            )
    client = _client(tmp_path, sessions)
    assert "summary of version 2" in client.get(f"/studies/{UID}").text
    earlier = client.get(f"/studies/{UID}", params={"version": "1"})
    assert "summary of version 1" in earlier.text and "the current version is" in earlier.text
    for nonsense in ("0", "3", "x", "9" * 40):  # no such version: the current one
        assert "summary of version 2" in client.get(f"/studies/{UID}", params={"version": nonsense}).text
    rows = client.get("/studies").text
    assert rows.count(f'data-study="{UID}"') == 2  # one row per version
    assert client.get(f"/studies/{UID}/summary.png", params={"sop": "*"}).status_code == 404
