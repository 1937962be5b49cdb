"""Who may use the console: loopback only with no users configured (as Orthanc does with
``RemoteAccessAllowed: false``), a login on every interface with users or a token.

Passwords are kept as scrypt hashes (``ainode hash-password``, standard library only). A login
is a signed cookie (HMAC-SHA256) holding the user, its expiry, the session's CSRF token (random,
so it also names the session) and a fingerprint of the credential it was opened with. The key
lives under the storage root (``console/session.key``, made at the first start, mode 0600), so
a session survives a restart of the node (an operator mid-shift is not logged out by a service
restart) and is good on every node sharing that root; deleting the file logs everyone out.
Changing a user's password, removing the user or changing the token ends that user's sessions
(the fingerprint no longer matches). Logging out records the session in the database until it
would have expired (``console_logouts``): the cookie, or a copy of it, opens nothing after, on
any node, across restarts.

Every action (POST) must carry the session's CSRF token in its form or in the ``X-CSRF-Token``
header, with or without users (a page on another site can make the operator's browser post to
127.0.0.1 too), and so must the login form (a pre-login session's token): another site cannot
log the operator's browser into an account of its choosing.
"""

from __future__ import annotations

import base64
import datetime as dt
import hashlib
import hmac
import ipaddress
import json
import logging
import os
import secrets
import socket
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from sqlalchemy.orm import Session, sessionmaker
from starlette.responses import Response

from conf import Settings
from storage.actions import forget_logouts, logged_out, record_logout
from storage.db import transaction

COOKIE = "ainode_session"
CSRF_HEADER = "x-csrf-token"
CSRF_FIELD = "csrf"
TOKEN_USER = "token"  # the name shown (and recorded) for a login with the token: "token (name)"
_SCRYPT = {"n": 2**14, "r": 8, "p": 1}
# Password guessing: a few failed logins from one address are free (a typo, a forgotten
# caps lock), then each further attempt waits twice as long as the one before (1 s, 2 s, 4 s
# ... at most LOGIN_MAX_WAIT_SECONDS) after the last failure; failures older than the window
# are forgotten. Only that address is held up, so nobody can lock the operators out.
LOGIN_FREE_FAILURES = 5
LOGIN_WINDOW_SECONDS = 900.0
LOGIN_MAX_WAIT_SECONDS = 300.0
KEY_BYTES = 32
KEY_FILE = Path("console") / "session.key"
log = logging.getLogger("ainode.http")


def _b64(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).decode("ascii").rstrip("=")


def _unb64(text: str) -> bytes:
    return base64.urlsafe_b64decode(text + "=" * (-len(text) % 4))


def hash_password(password: str, salt: bytes | None = None) -> str:
    """``scrypt$n$r$p$salt$hash`` for ``http.users``."""
    if not password:
        raise ValueError('Argument "password" must not be empty')
    salt = salt if salt is not None else secrets.token_bytes(16)
    digest = hashlib.scrypt(password.encode("utf-8"), salt=salt, dklen=32, maxmem=64 << 20, **_SCRYPT)
    return f"scrypt${_SCRYPT['n']}${_SCRYPT['r']}${_SCRYPT['p']}${_b64(salt)}${_b64(digest)}"


def verify_password(password: str, hashed: str) -> bool:
    try:
        kind, n, r, p, salt, digest = hashed.split("$")
        if kind != "scrypt":
            return False
        expected = _unb64(digest)
        got = hashlib.scrypt(
            password.encode("utf-8"),
            salt=_unb64(salt),
            n=int(n),
            r=int(r),
            p=int(p),
            dklen=len(expected),
            maxmem=64 << 20,
        )
    except (ValueError, TypeError):
        return False
    return hmac.compare_digest(got, expected)


def is_loopback(host: str | None) -> bool:
    """Whether the peer address is this machine's loopback (127.0.0.0/8, ::1, ::ffff:127.x)."""
    if not host:
        return False
    try:
        address = ipaddress.ip_address(host.split("%", 1)[0])
    except ValueError:
        return False
    if isinstance(address, ipaddress.IPv6Address) and address.ipv4_mapped is not None:
        address = address.ipv4_mapped
    return address.is_loopback


def local_names() -> frozenset[str]:
    """The names a browser on this machine may use for it besides an address and ``localhost``."""
    names = {socket.gethostname(), socket.getfqdn()}
    return frozenset(name.lower().rstrip(".") for name in names if name)


def host_of(header: str | None) -> str:
    """The name or address in a ``Host`` header, without its port or IPv6 brackets."""
    host = (header or "").strip().lower()
    if host.startswith("["):
        return host[1 : host.find("]")] if "]" in host else ""
    return host.rsplit(":", 1)[0].rstrip(".") if host.count(":") == 1 else host.rstrip(".")


def session_key(root: Path) -> bytes:
    """The key that signs console sessions, kept at ``{root}/console/session.key`` (made
    with mode 0600 at the first start; several nodes sharing the root share it). A file too short
    to be a key is replaced. Raises OSError when the root cannot hold it."""
    path = root / KEY_FILE
    try:
        key = path.read_bytes()
        if len(key) >= KEY_BYTES:
            return key[:KEY_BYTES]
        log.warning("%s is not a key (%d bytes): a new one is made; every session ends", path, len(key))
    except FileNotFoundError:
        pass
    path.parent.mkdir(parents=True, exist_ok=True)
    temporary = path.with_name(f".{path.name}.{os.getpid()}.{secrets.token_hex(4)}")
    key = secrets.token_bytes(KEY_BYTES)
    descriptor = os.open(temporary, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    try:
        os.write(descriptor, key)
        os.fsync(descriptor)
    finally:
        os.close(descriptor)
    try:
        os.link(temporary, path)  # never replaces a key another node made meanwhile
    except FileExistsError:
        existing = path.read_bytes()
        if len(existing) >= KEY_BYTES:
            return existing[:KEY_BYTES]
        os.replace(temporary, path)  # the short file seen above
    finally:
        temporary.unlink(missing_ok=True)
    return key


@dataclass(frozen=True)
class Visitor:
    """Who is asking: ``user`` None when nobody logged in (loopback without users)."""

    user: str | None
    csrf: str

    @property
    def who(self) -> str:
        return self.user or "local operator (loopback)"


class Gate:
    """The access rule and the session cookies of one running console."""

    def __init__(
        self,
        settings: Settings,
        key: bytes | None = None,
        sessions: sessionmaker[Session] | None = None,
    ) -> None:
        """``key``: the signing key (:func:`session_key`; None: a random one, sessions end
        with this process). ``sessions``: the database that keeps logouts (None: in memory)."""
        self.settings = settings
        self.key = key if key is not None else secrets.token_bytes(KEY_BYTES)
        self.sessions = sessions
        # Sessions logged out before their time (their CSRF token, which names them, and when
        # they would have expired): here for this process, and in the database for all.
        self._revoked: dict[str, float] = {}
        self._failures: dict[str, list[float]] = {}  # peer address: when its attempts failed
        self._lock = threading.Lock()
        self._local_names = local_names() | {settings.http.host.lower()}

    @property
    def login_required(self) -> bool:
        return self.settings.http.login_required

    def peer_allowed(self, peer_host: str | None) -> bool:
        """Without users only loopback may use the console; with users anyone may try to log in."""
        return self.login_required or is_loopback(peer_host)

    def begin_login(self, peer: str | None, now: float | None = None) -> float:
        """0 when this address may try a password now (the attempt counts as failed until
        :meth:`login_succeeded`, so parallel guesses gain nothing), else the seconds it must wait."""
        moment = now if now is not None else time.time()
        key = peer or ""
        with self._lock:
            for address, times in list(self._failures.items()):
                recent = [t for t in times if moment - t <= LOGIN_WINDOW_SECONDS]
                if recent:
                    self._failures[address] = recent
                else:
                    del self._failures[address]
            failures = self._failures.setdefault(key, [])
            if len(failures) >= LOGIN_FREE_FAILURES:
                pause = min(LOGIN_MAX_WAIT_SECONDS, 2.0 ** (len(failures) - LOGIN_FREE_FAILURES))
                wait = max(failures) + pause - moment
                if wait > 0:
                    return wait
            failures.append(moment)
            return 0.0

    def login_succeeded(self, peer: str | None) -> None:
        with self._lock:
            self._failures.pop(peer or "", None)

    def host_allowed(self, host_header: str | None) -> bool:
        """Without users, only a page named by an address, ``localhost`` or this machine's own
        name. DNS rebinding: a site the operator opens on the node points its name at 127.0.0.1,
        and the browser then lets that site's scripts read the console (and its CSRF token) as
        their own; the peer is loopback, only the ``Host`` header tells. With users a login
        (a SameSite cookie the attacker's name never gets) stands in the way."""
        if self.login_required:
            return True
        host = host_of(host_header)
        try:
            ipaddress.ip_address(host.split("%", 1)[0])
            return True  # a page opened at an address belongs to that address, not to a site
        except ValueError:
            pass
        return host == "localhost" or host.endswith(".localhost") or host in self._local_names

    def check_login(self, user: str, password: str) -> str | None:
        """The user's name when the password (or the token) is right, else None."""
        found = self.authenticate(user, password)
        return found[0] if found is not None else None

    def authenticate(self, user: str, password: str) -> tuple[str, bool] | None:
        """The session's name and whether the token opened it, when the password (or the
        token) is right; else None."""
        http = self.settings.http
        if http.token is not None and hmac.compare_digest(
            password.encode("utf-8"), http.token.get_secret_value().encode("utf-8")
        ):
            # The name typed beside the token is a label, never a configured user's name taken
            # over: the audit says who acted, and this visitor knew no user's password.
            label = " ".join(user.split())[:64]
            return (f"{TOKEN_USER} ({label})" if label else TOKEN_USER), True
        hashed = http.users.get(user)
        if hashed is None:
            verify_password(password, hash_password("timing", b"\0" * 16))  # same time either way
            return None
        return (user, False) if verify_password(password, hashed) else None

    def _sign(self, payload: bytes) -> str:
        return _b64(hmac.new(self.key, payload, hashlib.sha256).digest())

    def _credential(self, user: str | None, by_token: bool) -> str | None:
        """A fingerprint of what the session was opened with (the user's password hash, the
        token, nothing for an anonymous session), or None when it is no longer configured."""
        http = self.settings.http
        if user is None:
            secret = ""
        elif by_token:
            if http.token is None:
                return None
            secret = "token\0" + http.token.get_secret_value()
        elif user in http.users:
            secret = "user\0" + user + "\0" + http.users[user]
        else:
            return None
        return _b64(
            hmac.new(self.key, b"credential\0" + secret.encode("utf-8"), hashlib.sha256).digest()[:12]
        )

    def cookie_for(self, user: str | None, now: float | None = None, by_token: bool = False) -> str:
        expires = (now if now is not None else time.time()) + self.settings.http.session_hours * 3600
        data = {
            "u": user,
            "e": expires,
            "c": secrets.token_urlsafe(24),
            "t": by_token,
            "k": self._credential(user, by_token),
        }
        payload = json.dumps(data).encode("utf-8")
        return f"{_b64(payload)}.{self._sign(payload)}"

    def _opened(self, cookie: str | None, now: float | None = None) -> dict[str, Any] | None:
        """A cookie's content when this key signed it, it has not expired and its credential
        still stands; else None."""
        if not cookie or "." not in cookie or len(cookie) > 4096:
            return None
        body, signature = cookie.rsplit(".", 1)
        try:
            payload = _unb64(body)
        except ValueError:
            return None
        if not hmac.compare_digest(self._sign(payload).encode("ascii"), signature.encode("utf-8", "replace")):
            return None
        try:
            data = json.loads(payload)
            expires = float(data["e"])
            user, token, by_token, credential = data["u"], str(data["c"]), bool(data["t"]), data["k"]
        except (ValueError, KeyError, TypeError):
            return None  # signed by this key, but not in this form (an older node's)
        if expires < (now if now is not None else time.time()):
            return None
        if user is not None and not isinstance(user, str):
            return None
        current = self._credential(user, by_token)
        if current is None or not hmac.compare_digest(current, str(credential)):
            return None  # password changed, user removed, token changed or gone
        with self._lock:
            if token in self._revoked:
                return None
        return {"user": user, "csrf": token, "expires": expires}

    def visitor(self, cookie: str | None, now: float | None = None) -> Visitor | None:
        """The session a cookie holds, or None when it is missing, forged, expired or its
        credential changed (the database's logouts: :meth:`logged_out`)."""
        opened = self._opened(cookie, now)
        if opened is None:
            return None
        if self.login_required and opened["user"] is None:
            return None  # an anonymous session is no login once users are configured
        return Visitor(opened["user"], opened["csrf"])

    def login_token(self, cookie: str | None, now: float | None = None) -> str | None:
        """The CSRF token of the pre-login (anonymous) session a login form must carry."""
        opened = self._opened(cookie, now)
        return opened["csrf"] if opened is not None and opened["user"] is None else None

    def logged_out(self, visitor: Visitor) -> bool:
        """Whether the visitor's session was logged out (on any node sharing the database).
        Reads the database: call it off the event loop."""
        if self.sessions is None or visitor.user is None:
            return False
        with self.sessions() as session:
            return logged_out(session, visitor.csrf)

    def revoke(self, cookie: str | None, now: float | None = None) -> None:
        """Log a session out: its cookie, even a copy kept elsewhere, is refused from now on
        (here at once; on every node through the database). Writes the database: call it off
        the event loop."""
        moment = now if now is not None else time.time()
        with self._lock:
            for token, until in list(self._revoked.items()):
                if until < moment:
                    del self._revoked[token]  # expired anyway: no longer worth remembering
        opened = self._opened(cookie, moment)
        if opened is None:
            return  # only a live cookie this key signed can fill the list
        with self._lock:
            self._revoked[opened["csrf"]] = opened["expires"]
        if self.sessions is not None and opened["user"] is not None:
            with transaction(self.sessions) as session:
                forget_logouts(session, dt.datetime.fromtimestamp(moment, dt.UTC))
                record_logout(session, opened["csrf"], dt.datetime.fromtimestamp(opened["expires"], dt.UTC))

    def set_cookie(self, response: Response, value: str) -> None:
        """Give the browser a session cookie: HttpOnly, SameSite=Strict, Secure under TLS."""
        response.set_cookie(
            COOKIE, value, httponly=True, samesite="strict", secure=self.settings.http.tls_enabled, path="/"
        )
