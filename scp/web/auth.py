"""Who may use the console: loopback only with no users configured (as Orthanc does with
``RemoteAccessAllowed: false``), a login on every interface with users or a token.

Passwords are kept as scrypt hashes (``ainode hash-password``, standard library only). A login
is a signed cookie (HMAC-SHA256 with a key made at start: a restart logs everyone out) holding
the user, its expiry and the session's CSRF token (random, so it also names the session: logging
out revokes it until it would have expired, and a copy of the cookie is worth nothing after);
every action (POST) must carry that token in its form or in the ``X-CSRF-Token`` header, with
or without users: a page on another site can make the operator's browser post to 127.0.0.1 too.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import ipaddress
import json
import secrets
import socket
import threading
import time
from dataclasses import dataclass

from conf import Settings

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

    def __init__(self, settings: Settings, key: bytes | None = None) -> None:
        self.settings = settings
        self.key = key if key is not None else secrets.token_bytes(32)
        # Sessions logged out before their time (their CSRF token, which names them, and when
        # they would have expired): in memory, like the key, which a restart replaces anyway.
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
        http = self.settings.http
        if http.token is not None and hmac.compare_digest(
            password.encode("utf-8"), http.token.get_secret_value().encode("utf-8")
        ):
            # The name typed beside the token is a label, never a configured user's name taken
            # over: the audit says who acted, and this visitor knew no user's password.
            return f"{TOKEN_USER} ({user.strip()})" if user.strip() else TOKEN_USER
        hashed = http.users.get(user)
        if hashed is None:
            verify_password(password, hash_password("timing", b"\0" * 16))  # same time either way
            return None
        return user if verify_password(password, hashed) else None

    def _sign(self, payload: bytes) -> str:
        return _b64(hmac.new(self.key, payload, hashlib.sha256).digest())

    def cookie_for(self, user: str | None, now: float | None = None) -> str:
        expires = (now if now is not None else time.time()) + self.settings.http.session_hours * 3600
        payload = json.dumps({"u": user, "e": expires, "c": secrets.token_urlsafe(24)}).encode("utf-8")
        return f"{_b64(payload)}.{self._sign(payload)}"

    def visitor(self, cookie: str | None, now: float | None = None) -> Visitor | None:
        """The session a cookie holds, or None when it is missing, forged or expired."""
        if not cookie or "." not in cookie:
            return None
        body, signature = cookie.rsplit(".", 1)
        try:
            payload = _unb64(body)
        except ValueError:
            return None
        if not hmac.compare_digest(self._sign(payload), signature):
            return None
        data = json.loads(payload)
        if float(data["e"]) < (now if now is not None else time.time()):
            return None
        with self._lock:
            if str(data["c"]) in self._revoked:
                return None
        user = data["u"]
        if self.login_required and user is None:
            return None  # an anonymous loopback session is no login once users are configured
        return Visitor(user, str(data["c"]))

    def revoke(self, cookie: str | None, now: float | None = None) -> None:
        """Log a session out: its cookie, even a copy kept elsewhere, is refused from now on."""
        moment = now if now is not None else time.time()
        if not cookie or "." not in cookie:
            return
        body, signature = cookie.rsplit(".", 1)
        try:
            payload = _unb64(body)
        except ValueError:
            return
        if not hmac.compare_digest(self._sign(payload), signature):
            return  # only a cookie this node signed can fill the list
        data = json.loads(payload)
        with self._lock:
            for token, until in list(self._revoked.items()):
                if until < moment:
                    del self._revoked[token]  # expired anyway: no longer worth remembering
            if float(data["e"]) >= moment:
                self._revoked[str(data["c"])] = float(data["e"])

    def cookie_flags(self) -> dict[str, object]:
        return {
            "httponly": True,
            "samesite": "strict",
            "secure": self.settings.http.tls_enabled,
            "path": "/",
        }
