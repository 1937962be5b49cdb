"""The node's HTTP application: ``/healthz``, ``/metrics`` and the operator's console.

Server-rendered (Starlette, Jinja2) with htmx, vendored under ``static/`` (hospitals are
offline), for the parts that refresh themselves. The console reads through ``storage.overview``,
the same functions ``ainode status`` prints, and acts through the same functions as ``ainode
retry`` and ``ainode complete``; every action is recorded with who and when.

Access (scp.web.auth): with no users, loopback only; with users or a token, a login on every
interface. ``/healthz`` and ``/metrics`` carry no patient data and answer everyone who can reach
the port, as before (monitoring scrapes them without a login).
"""

from __future__ import annotations

import datetime as dt
import hmac
import json
import logging
import math
import platform
import re
import time
from collections.abc import Awaitable, Callable
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path
from typing import Any
from urllib.parse import SplitResult, urlencode, urlsplit

from sqlalchemy.orm import Session, sessionmaker
from starlette.applications import Starlette
from starlette.concurrency import run_in_threadpool
from starlette.middleware import Middleware
from starlette.middleware.base import BaseHTTPMiddleware
from starlette.requests import Request
from starlette.responses import JSONResponse, RedirectResponse, Response
from starlette.routing import Mount, Route
from starlette.staticfiles import StaticFiles
from starlette.templating import Jinja2Templates
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from conf import Settings
from scp.web import documents
from scp.web.auth import COOKIE, CSRF_FIELD, CSRF_HEADER, Gate, Visitor, session_key
from scp.web.metrics import CONTENT_TYPE, health, metrics_registry, metrics_text
from storage import overview
from storage.actions import cancel_study, record_action, redeliver
from storage.db import transaction
from storage.models import DeliveryState, StudyState, utc_now
from storage.overview import disclosure_query
from storage.studies import complete_study, requeue_study

HERE = Path(__file__).parent
log = logging.getLogger("ainode.http")
PAGE_SIZE = 50
DELIVERIES_PAGE = 500
CHOICES_SECONDS = 60.0
UID_TEXT = re.compile(r"[0-9.]{1,64}")  # a DICOM UID (no glob or path characters)
VERSION_LINKS = 20  # the study page links its newest versions; any other by number
# The largest study version or delivery id a database integer column holds: a bigger number in
# a URL or a form names nothing (SQLite and PostgreSQL refuse to bind it: a 500, not a 404).
MAX_ROW_NUMBER = 2**31 - 1
OPEN_PATHS = ("/healthz", "/metrics", "/static/", "/login")
# No form of the console comes near this (bulk redeliver of 500 deliveries is about 10 KiB): a
# bigger body is refused (413) before it is read, whether it says its length or is chunked.
MAX_BODY_BYTES = 64 * 1024
SECURITY_HEADERS = {
    # Scripts only from this server (htmx and console.js are files here), never inline; inline
    # style attributes (bar widths) are allowed.
    "content-security-policy": "default-src 'self'; style-src 'self' 'unsafe-inline'; "
    "img-src 'self' data:; frame-ancestors 'none'",
    "x-content-type-options": "nosniff",
    "referrer-policy": "same-origin",
    "x-frame-options": "DENY",
}
STATE_COLOURS = {
    StudyState.RECEIVING: "blue",
    StudyState.QUEUED: "grey",
    StudyState.WAITING: "amber",
    StudyState.ANALYSING: "purple",
    StudyState.SENDING: "teal",
    StudyState.DONE: "green",
    StudyState.FAILED: "red",
    StudyState.SKIPPED: "grey",
    "pending": "amber",
    "sending": "teal",
    "sent": "green",
    "dead": "red",
    overview.SUPERSEDED: "grey",
    "retry": "amber",
    "interrupted": "amber",
}
KEY_LIBRARIES = (
    "ainode",
    "pynetdicom",
    "pydicom",
    "highdicom",
    "sqlalchemy",
    "alembic",
    "pydantic",
    "numpy",
    "pillow",
    "httpx",
    "starlette",
    "uvicorn",
    "jinja2",
    "prometheus-client",
)


def _version_of(name: str) -> str:
    try:
        return version(name)
    except PackageNotFoundError:
        return "not installed"


def _ago(moment: dt.datetime | None, now: dt.datetime | None = None) -> str:
    if moment is None:
        return ""
    seconds = max(0.0, ((now or utc_now()) - moment).total_seconds())
    for unit, size in (("d", 86400), ("h", 3600), ("min", 60)):
        if seconds >= size:
            return f"{seconds / size:.0f} {unit}"
    return f"{seconds:.0f} s"


def _when(moment: dt.datetime | str | None) -> str:
    if moment is None:
        return ""
    if isinstance(moment, str):
        moment = dt.datetime.fromisoformat(moment)
    return moment.astimezone(dt.UTC).strftime("%Y-%m-%d %H:%M:%S")


def _short(uid: str | None, keep: int = 8) -> str:
    if not uid:
        return ""
    return uid if len(uid) <= 2 * keep + 1 else f"{uid[:keep]}…{uid[-keep:]}"


def hidden_url(url: str) -> str:
    """An http(s) URL without its user, password or query values (a gateway's key is often
    ``?key=...`` or ``user:key@``); the host and path still say where it goes."""
    import httpx

    parsed = httpx.URL(url)
    query: list[tuple[str, str | int | float | bool | None]] = [
        (name, "hidden") for name, _ in parsed.params.multi_items()
    ]
    return str(parsed.copy_with(username=None, password=None, query=None).copy_merge_params(query))


def hidden_settings(settings: Settings) -> dict[str, Any]:
    """The effective configuration with every secret replaced (never the API key, a token, a
    password hash, nor a password or key in a URL's user part or query)."""
    from sqlalchemy.engine import make_url

    data: dict[str, Any] = json.loads(settings.model_dump_json())
    vision = data.get("vision", {})
    vision["api_key"] = "(set)" if settings.vision.api_key is not None else "(not set)"
    if vision.get("base_url"):
        vision["base_url"] = hidden_url(vision["base_url"])
    http = data.get("http", {})
    http["token"] = "(set)" if settings.http.token is not None else "(not set)"
    http["users"] = {name: "(password hash)" for name in settings.http.users}
    storage = data.get("storage", {})
    database = make_url(settings.storage.database_url)
    database = database.set(query={name: "hidden" for name in database.query})
    storage["database_url"] = database.render_as_string(hide_password=True)
    for destination in data.get("destinations", []):
        if destination.get("stow_url"):
            destination["stow_url"] = hidden_url(destination["stow_url"])
    return data


class _BodyTooLarge(Exception):
    pass


class BodyLimit:
    """Refuse a request body over ``limit`` bytes with 413: at once when its Content-Length
    says so (nothing of it is read), else (chunked) as soon as what arrived passes the limit,
    before the application has it whole. A plain ASGI middleware, outermost, so nothing reads
    a body around it."""

    def __init__(self, app: ASGIApp, limit: int = MAX_BODY_BYTES) -> None:
        self.app = app
        self.limit = limit

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        lengths = [v for k, v in scope["headers"] if k == b"content-length"]
        if lengths and any(not v.isdigit() or len(v) > 12 or int(v) > self.limit for v in lengths):
            await _too_large(self.limit)(scope, receive, send)
            return
        seen = 0
        started = False

        async def limited() -> Message:
            nonlocal seen
            message = await receive()
            if message["type"] == "http.request":
                seen += len(message.get("body", b""))
                if seen > self.limit:
                    raise _BodyTooLarge
            return message

        async def tracked(message: Message) -> None:
            nonlocal started
            if message["type"] == "http.response.start":
                started = True
            await send(message)

        try:
            await self.app(scope, limited, tracked)
        except Exception as exc:
            # Raised from inside the application's own reading (through Starlette's middleware
            # task group, so perhaps in an exception group of its own).
            if started or not _only_too_large(exc):
                raise
            await _too_large(self.limit)(scope, receive, send)


def _only_too_large(exc: BaseException) -> bool:
    if isinstance(exc, BaseExceptionGroup):
        matched, rest = exc.split(_BodyTooLarge)
        return matched is not None and rest is None
    return isinstance(exc, _BodyTooLarge)


def _too_large(limit: int) -> Response:
    # Connection: close, as the rest of the body is never read.
    return _secure(
        Response(
            f"request body over {limit} bytes\n",
            status_code=413,
            media_type="text/plain",
            headers={"connection": "close"},
        )
    )


class AccessMiddleware(BaseHTTPMiddleware):
    """Loopback-only without users, a login with them, the CSRF token on every action."""

    def __init__(self, app: Any, gate: Gate, templates: Jinja2Templates) -> None:
        super().__init__(app)
        self.gate = gate
        self.templates = templates

    async def dispatch(
        self, request: Request, call_next: Callable[[Request], Awaitable[Response]]
    ) -> Response:
        path = request.url.path
        if "\0" in request.scope["path"] or b"%00" in request.scope["query_string"]:
            # No UID, filter or name holds a NUL, and PostgreSQL refuses one in a string (SQLite
            # takes it): a 500 from the driver, not "no such study".
            return _secure(Response("a NUL character in the URL\n", status_code=400, media_type="text/plain"))
        if path in ("/healthz", "/metrics", "/favicon.ico") or path.startswith("/static/"):
            return _secure(await call_next(request))
        peer = request.client.host if request.client else None
        if not self.gate.peer_allowed(peer) or not self.gate.host_allowed(request.headers.get("host")):
            return _secure(
                self.templates.TemplateResponse(
                    request,
                    "refused.html",
                    {"peer": peer, "visitor": None, "login_required": False, "counts": None},
                    status_code=403,
                )
            )
        visitor = self.gate.visitor(request.cookies.get(COOKIE))
        if visitor is not None and await run_in_threadpool(self.gate.logged_out, visitor):
            visitor = None  # logged out, here or on another node
        new_cookie = None
        if visitor is None and path != "/login":
            if self.gate.login_required:
                if "hx-request" in request.headers:
                    # A page refreshing itself (htmx) whose session ended: the whole page goes
                    # to the login, instead of silently showing old rows.
                    back = _local_path(urlsplit(request.headers.get("hx-current-url", "")), "/studies")
                    return _secure(
                        Response(
                            "login required\n",
                            status_code=401,
                            media_type="text/plain",
                            headers={"hx-redirect": f"/login?{urlencode({'next': back})}"},
                        )
                    )
                if request.method != "GET":
                    return _secure(Response("login required\n", status_code=401, media_type="text/plain"))
                return _secure(RedirectResponse(f"/login?{urlencode({'next': path})}", status_code=303))
            new_cookie = self.gate.cookie_for(None)  # loopback: an anonymous session for its CSRF token
            visitor = self.gate.visitor(new_cookie)
        request.state.visitor = visitor
        if request.method == "POST" and path != "/login":
            sent = request.headers.get(CSRF_HEADER)
            if sent is None and request.headers.get("content-type", "").startswith(
                ("application/x-www-form-urlencoded", "multipart/form-data")
            ):
                await request.body()  # cached, so the endpoint reads the same form again
                sent = str((await request.form()).get(CSRF_FIELD, ""))
            if visitor is None or not sent or sent != visitor.csrf:
                return _secure(
                    Response("missing or wrong CSRF token\n", status_code=403, media_type="text/plain")
                )
        response = await call_next(request)
        if new_cookie is not None:
            self.gate.set_cookie(response, new_cookie)
        return _secure(response)


def _local_path(url: SplitResult, fallback: str) -> str:
    """The path and query of a URL when they name a page here (never another site's)."""
    path = url.path + (f"?{url.query}" if url.query else "")
    return path if path.startswith("/") and not path.startswith("//") and "\\" not in path else fallback


def row_number(text: str) -> int | None:
    """A version, image or delivery number from a URL or a form, or None when it can name
    nothing: only ASCII digits ("²" is a digit to ``isdigit``, not to ``int``; Starlette's
    ``int`` convertor answers 500 to 5,000 of them) and within a database integer."""
    if not (text.isascii() and text.isdigit() and len(text) <= 10):
        return None
    number = int(text)
    return number if number <= MAX_ROW_NUMBER else None


def _secure(response: Response) -> Response:
    for name, value in SECURITY_HEADERS.items():
        response.headers.setdefault(name, value)
    return response


def _gate(settings: Settings, sessions: sessionmaker[Session]) -> Gate:
    """Sessions signed with the key under the storage root (they survive a restart); a random
    key, with a warning, when the root cannot hold it."""
    try:
        key: bytes | None = session_key(settings.storage.root)
    except OSError as exc:
        log.warning("console sessions end at restart: no key file under the storage root (%s)", exc)
        key = None
    return Gate(settings, key, sessions)


def make_app(settings: Settings, sessions: sessionmaker[Session], gate: Gate | None = None) -> Starlette:
    gate = gate if gate is not None else _gate(settings, sessions)
    templates = Jinja2Templates(directory=str(HERE / "templates"))
    env = templates.env
    env.filters["ago"] = _ago
    env.filters["when"] = _when
    env.filters["short"] = _short
    env.filters["kind"] = overview.file_kind
    env.globals["colour"] = lambda state: STATE_COLOURS.get(state, "grey")
    env.globals["login_required"] = gate.login_required
    registry = metrics_registry(sessions)
    sent_images = documents.SentImages(settings)
    root = settings.storage.root

    def read(fn: Callable[[Session], Any]) -> Awaitable[Any]:
        def run() -> Any:
            with sessions() as session:
                return fn(session)

        return run_in_threadpool(run)

    cached_choices: dict[str, Any] = {"at": 0.0, "value": None}

    async def choices() -> dict[str, list[str]]:
        """The filters' values (distinct modalities and AE titles: a scan of the instances),
        read again at most every CHOICES_SECONDS."""
        if cached_choices["value"] is None or time.monotonic() - cached_choices["at"] > CHOICES_SECONDS:
            cached_choices["value"] = await read(overview.filter_choices)
            cached_choices["at"] = time.monotonic()
        value: dict[str, list[str]] = cached_choices["value"]
        return value

    def visitor_of(request: Request) -> Visitor:
        found: Visitor = request.state.visitor
        return found

    async def page(request: Request, name: str, context: dict[str, Any], status_code: int = 200) -> Response:
        counts = await read(overview.stuck_or_failing)
        return templates.TemplateResponse(
            request,
            name,
            {"visitor": visitor_of(request), "counts": counts, "csrf_field": CSRF_FIELD, **context},
            status_code=status_code,
        )

    async def healthz(request: Request) -> Response:
        healthy, report = await run_in_threadpool(health, settings, sessions)
        return JSONResponse(report, status_code=200 if healthy else 503)

    async def metrics(request: Request) -> Response:
        return Response(await run_in_threadpool(metrics_text, registry), media_type=CONTENT_TYPE)

    async def home(request: Request) -> Response:
        return RedirectResponse("/studies", status_code=303)

    def _filters(request: Request) -> tuple[overview.StudyFilter, int, dict[str, str]]:
        q = request.query_params
        chosen = {k: q.get(k, "").strip() for k in ("state", "modality", "ae", "date", "uid")}
        day = None
        if chosen["date"]:
            try:
                day = dt.datetime.strptime(chosen["date"], "%Y-%m-%d").replace(tzinfo=dt.UTC)
            except ValueError:
                chosen["date"] = ""
        state = chosen["state"] if chosen["state"] in overview.VERSION_STATES else None
        where = overview.StudyFilter(
            state=state,
            modality=chosen["modality"] or None,
            calling_ae_title=chosen["ae"] or None,
            received_from=day,
            # The last day of the calendar (9999-12-31) has no next day: no upper bound.
            received_before=day + dt.timedelta(days=1) if day and day.date() < dt.date.max else None,
            uid=chosen["uid"] or None,
        )
        try:
            number = max(1, int(q.get("page", "1")))
        except ValueError:
            number = 1
        return where, number, chosen

    async def studies(request: Request) -> Response:
        where, number, chosen = _filters(request)

        def load(session: Session) -> dict[str, Any]:
            total = overview.count_versions(session, where)
            pages = max(1, math.ceil(total / PAGE_SIZE))
            current = min(number, pages)
            rows = overview.version_page(session, where, PAGE_SIZE, (current - 1) * PAGE_SIZE)
            return {"rows": rows, "total": total, "pages": pages, "page": current}

        data = await read(load)
        query = {k: v for k, v in chosen.items() if v}
        context = {
            **data,
            "chosen": chosen,
            "query": urlencode(query),
            "page_query": lambda n: urlencode({**query, "page": n}),
            "now": utc_now(),
        }
        if "hx-request" in request.headers and request.query_params.get("part") == "rows":
            return templates.TemplateResponse(request, "_studies_table.html", context)
        context["choices"] = await choices()
        return await page(request, "studies.html", context)

    async def study(request: Request) -> Response:
        uid = request.path_params["uid"]
        detail = await read(lambda s: overview.study_detail(s, uid))
        if detail is None:
            return await page(request, "missing.html", {"uid": uid}, status_code=404)
        visitor = visitor_of(request)
        patient = None
        if visitor.user is not None and detail.a_file and detail.study.files_purged_at is None:
            try:
                patient = await run_in_threadpool(documents.patient_header, root / detail.a_file)
            except OSError:
                patient = None
        asked = row_number(request.query_params.get("version", ""))
        selected = asked if asked is not None and 1 <= asked <= detail.study.version else detail.study.version
        job = detail.job_of(selected)
        findings_json = await read(lambda s: overview.version_findings(s, uid, selected)) if job else None
        findings = json.loads(findings_json) if findings_json else None
        sr_uid = detail.report_uid(selected)
        sr_path = documents.newest_file(root, "sr", uid, sr_uid) if sr_uid else None
        tree = await run_in_threadpool(documents.sr_tree, sr_path) if sr_path is not None else None
        summary_uid = detail.report_uid(selected, "summary")
        summary = (
            documents.newest_file(root, "summary", uid, summary_uid)
            if summary_uid
            else (documents.newest_file(root, "summary", uid) if selected == detail.study.version else None)
        )
        versions = [j.study_version for j in detail.jobs]
        timeline, hidden = detail.timeline()
        deliveries = [
            d for d in detail.deliveries if d.study_version == selected or d.state != DeliveryState.SENT
        ]
        version_cost = sum(c.cost_usd for c in detail.api_calls if job is not None and c.job_id == job.id)
        return await page(
            request,
            "study.html",
            {
                "d": detail,
                "study": detail.study,
                "selected": selected,
                "job": job,
                "findings": findings,
                "tree": tree,
                "sr_uid": sr_uid,
                "summary": summary is not None,
                "summary_uid": summary_uid or "",
                "patient": patient,
                "versions": versions,
                "recent_versions": versions[-VERSION_LINKS:],
                "timeline": timeline,
                "hidden_events": hidden,
                "detail_limit": overview.DETAIL_LIMIT,
                "deliveries": deliveries,
                "version_cost": version_cost,
                "study_cost": sum(c.cost_usd for c in detail.api_calls),
                "message": request.query_params.get("message"),
                "now": utc_now(),
            },
        )

    def version_of(request: Request) -> int | None:
        return row_number(request.path_params["version"])

    def no_version() -> Response:
        return Response("no such version\n", status_code=404, media_type="text/plain")

    async def sent(request: Request) -> Response:
        uid = request.path_params["uid"]
        number = version_of(request)
        if number is None:
            return no_version()
        made = await read(lambda s: sent_images.get(s, uid, number))
        # The audit trail's image hashes (issue 13): a thumbnail says whether a recorded request
        # carried exactly these bytes.
        recorded = await read(
            lambda s: {
                sha for call in s.scalars(disclosure_query(uid)) for sha in (call.image_sha256 or "").split()
            }
        )
        return templates.TemplateResponse(
            request, "_sent.html", {"uid": uid, "version": number, "sent": made, "recorded": recorded}
        )

    async def sent_image(request: Request) -> Response:
        uid = request.path_params["uid"]
        number = version_of(request)
        if number is None:
            return no_version()
        index = row_number(request.path_params["index"])
        made = await read(lambda s: sent_images.get(s, uid, number))
        if made is None or index is None or not 1 <= index <= len(made.images):
            return Response("no such image\n", status_code=404, media_type="text/plain")
        image = made.images[index - 1]
        return Response(
            image.data, media_type=image.media_type, headers={"cache-control": "private, max-age=300"}
        )

    async def sent_manifest(request: Request) -> Response:
        uid = request.path_params["uid"]
        number = version_of(request)
        made = await read(lambda s: sent_images.get(s, uid, number)) if number is not None else None
        if made is None:
            return no_version()
        return JSONResponse({**made.manifest, "prompt": made.prompt, "provider": made.provider})

    async def summary_png(request: Request) -> Response:
        sop = request.query_params.get("sop") or None  # one version's summary, else the newest
        if sop is not None and not UID_TEXT.fullmatch(sop):
            return Response("no summary image\n", status_code=404, media_type="text/plain")
        path = documents.newest_file(root, "summary", request.path_params["uid"], sop)
        if path is None:
            return Response("no summary image\n", status_code=404, media_type="text/plain")
        png = await run_in_threadpool(documents.summary_png, path)
        if png is None:
            return Response("no readable summary image\n", status_code=404, media_type="text/plain")
        return Response(png, media_type="image/png")

    async def act(request: Request) -> Response:
        uid = request.path_params["uid"]
        action = request.path_params["action"]
        who = visitor_of(request).who
        now = utc_now()

        def run() -> str:
            with transaction(sessions) as session:
                if action == "retry":
                    outcome = f"queued again as version {requeue_study(session, uid, now, settings.routes)}"
                elif action == "complete":
                    outcome = f"complete now: {complete_study(session, uid, now, settings.routes)}"
                elif action == "cancel":
                    outcome = cancel_study(session, uid, who, now)
                else:
                    raise LookupError(f"no action {action}")
                record_action(session, who, action, uid, outcome, now)
                return outcome

        try:
            outcome = await run_in_threadpool(run)
        except LookupError as exc:
            return Response(f"{exc}\n", status_code=404, media_type="text/plain")
        return RedirectResponse(f"/studies/{uid}?{urlencode({'message': outcome})}", status_code=303)

    async def redeliver_many(request: Request) -> Response:
        form = await request.form()
        ids = [int(text) for text in (str(v) for v in form.getlist("id")) if row_number(text) is not None]
        back = str(form.get("back", "/deliveries"))
        back = back if back.startswith("/") and not back.startswith("//") else "/deliveries"
        who = visitor_of(request).who
        now = utc_now()

        def run() -> int:
            done = 0
            with transaction(sessions) as session:
                for outbox_id in ids:
                    study_uid = redeliver(session, outbox_id, now)
                    if study_uid is not None:
                        done += 1
                        record_action(session, who, "redeliver", study_uid, f"delivery {outbox_id}", now)
            return done

        done = await run_in_threadpool(run)
        sep = "&" if "?" in back else "?"
        return RedirectResponse(
            f"{back}{sep}{urlencode({'message': f'{done} delivery(ies) queued again'})}", 303
        )

    async def deliveries(request: Request) -> Response:
        state = request.query_params.get("state") or None
        state = state if state in overview.UNSENT_STATES else None

        number = row_number(request.query_params.get("page", "1")) or 1

        def load(session: Session) -> dict[str, Any]:
            total = overview.count_unsent(session, state)
            pages = max(1, math.ceil(total / DELIVERIES_PAGE))
            current = min(max(1, number), pages)
            return {
                "items": overview.unsent_deliveries(
                    session, state, DELIVERIES_PAGE, (current - 1) * DELIVERIES_PAGE
                ),
                "by_destination": overview.delivery_counts(session),
                "total": total,
                "page": current,
                "pages": pages,
            }

        data = await read(load)
        return await page(
            request,
            "deliveries.html",
            {
                **data,
                "state": state or "",
                "page_query": lambda n: urlencode({**({"state": state} if state else {}), "page": n}),
                "message": request.query_params.get("message"),
                "now": utc_now(),
            },
        )

    async def costs(request: Request) -> Response:
        try:
            days = min(366, max(1, int(request.query_params.get("days", "30"))))
        except ValueError:
            days = 30
        since = utc_now() - dt.timedelta(days=days)
        data = await read(lambda s: overview.costs(s, since))
        return await page(
            request,
            "costs.html",
            {"c": data, "days": days, "budget": settings.vision.max_cost_usd_per_study},
        )

    async def health_page(request: Request) -> Response:
        healthy, report = await run_in_threadpool(health, settings, sessions)
        return await page(
            request,
            "health.html",
            {
                "healthy": healthy,
                "report": report,
                "config": json.dumps(hidden_settings(settings), indent=2),
                "versions": [(name, _version_of(name)) for name in KEY_LIBRARIES]
                + [("python", platform.python_version())],
                "tls": settings.http.tls_enabled,
            },
        )

    async def login(request: Request) -> Response:
        next_path = _local_path(urlsplit(request.query_params.get("next", "/studies")), "/studies")
        if not gate.login_required:
            return RedirectResponse("/studies", status_code=303)
        error = None
        status_code = 200
        headers = {}
        cookie = request.cookies.get(COOKIE)
        already = gate.visitor(cookie)
        if (
            request.method == "GET"
            and already is not None
            and not await run_in_threadpool(gate.logged_out, already)
        ):
            return RedirectResponse(next_path, status_code=303)  # logged in: keep that session
        if request.method == "POST":
            form = await request.form()
            peer = request.client.host if request.client else None
            expected = gate.login_token(cookie)
            sent = str(form.get(CSRF_FIELD, ""))
            if expected is None or not hmac.compare_digest(sent.encode("utf-8"), expected.encode("utf-8")):
                # Login CSRF: another site's form would log this browser into an account of its
                # choosing. The form carries the pre-login session's token; the cookie
                # (SameSite=Strict) never comes with another site's post.
                status_code = 403
                error = "This login form has expired or did not come from this console: log in again."
            elif (wait := gate.begin_login(peer)) > 0:
                status_code = 429
                headers["retry-after"] = str(math.ceil(wait))
                error = f"Too many failed logins from this address: try again in {math.ceil(wait)} s."
            else:
                found = await run_in_threadpool(
                    gate.authenticate, str(form.get("user", "")), str(form.get("password", ""))
                )
                if found is not None:
                    gate.login_succeeded(peer)
                    moved = RedirectResponse(next_path, status_code=303)
                    # A new session (and token): never the pre-login one (session fixation).
                    gate.set_cookie(moved, gate.cookie_for(found[0], by_token=found[1]))
                    return moved
                error = "Wrong name or password."
        token = gate.login_token(cookie)
        fresh = gate.cookie_for(None) if token is None else None  # a pre-login session for the form
        response = templates.TemplateResponse(
            request,
            "login.html",
            {
                "next": next_path,
                "error": error,
                "visitor": None,
                "counts": None,
                "csrf_field": CSRF_FIELD,
                "login_csrf": token if fresh is None else gate.login_token(fresh),
            },
            status_code=status_code,
            headers=headers,
        )
        if fresh is not None:
            gate.set_cookie(response, fresh)
        return response

    async def logout(request: Request) -> Response:
        await run_in_threadpool(gate.revoke, request.cookies.get(COOKIE))
        response = RedirectResponse("/login" if gate.login_required else "/studies", status_code=303)
        response.delete_cookie(COOKIE, path="/")
        return response

    routes = [
        Route("/healthz", healthz),
        Route("/metrics", metrics),
        Route("/", home),
        Route("/favicon.ico", lambda request: Response(status_code=204)),
        Route("/studies", studies),
        Route("/studies/{uid}", study),
        Route("/studies/{uid}/sent/{version}", sent),
        Route("/studies/{uid}/sent/{version}/manifest.json", sent_manifest),
        Route("/studies/{uid}/sent/{version}/{index}", sent_image),
        Route("/studies/{uid}/summary.png", summary_png),
        Route("/studies/{uid}/{action}", act, methods=["POST"]),
        Route("/deliveries", deliveries),
        Route("/deliveries/redeliver", redeliver_many, methods=["POST"]),
        Route("/costs", costs),
        Route("/health", health_page),
        Route("/login", login, methods=["GET", "POST"]),
        Route("/logout", logout, methods=["POST"]),
        Mount("/static", app=StaticFiles(directory=str(HERE / "static")), name="static"),
    ]
    return Starlette(
        routes=routes,
        middleware=[
            Middleware(BodyLimit),  # outermost: before anything reads a body
            Middleware(AccessMiddleware, gate=gate, templates=templates),
        ],
    )
