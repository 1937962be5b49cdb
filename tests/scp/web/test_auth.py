"""The console's access rule, password hashes and session cookies (scp.web.auth)."""

from __future__ import annotations

import stat
from pathlib import Path

import pytest

from conf import Settings
from scp.web.auth import (
    LOGIN_FREE_FAILURES,
    LOGIN_WINDOW_SECONDS,
    Gate,
    hash_password,
    is_loopback,
    session_key,
    verify_password,
)


def _settings(**http: object) -> Settings:
    return Settings(http=http)  # type: ignore[arg-type]


def test_a_hash_verifies_its_password_only() -> None:
    hashed = hash_password("correct horse")
    assert hashed.startswith("scrypt$") and "correct" not in hashed
    assert verify_password("correct horse", hashed)
    assert not verify_password("correct hors", hashed)
    assert not verify_password("correct horse", "scrypt$garbage")


@pytest.mark.parametrize(
    ("host", "loopback"),
    [
        ("127.0.0.1", True),
        ("127.0.0.2", True),
        ("::1", True),
        ("::ffff:127.0.0.1", True),
        ("10.77.0.1", False),
        ("192.168.1.5", False),
        ("::ffff:10.0.0.1", False),
        ("localhost", False),  # a name is not an address: never trusted
        (None, False),
    ],
)
def test_only_loopback_addresses_count_as_loopback(host: str | None, loopback: bool) -> None:
    assert is_loopback(host) is loopback


def test_without_users_only_loopback_peers_are_let_in() -> None:
    gate = Gate(_settings())
    assert gate.peer_allowed("127.0.0.1") and not gate.peer_allowed("10.0.0.9")


def test_with_users_anyone_may_try_to_log_in_and_only_the_right_password_works() -> None:
    gate = Gate(_settings(users={"admin": hash_password("pw")}))
    assert gate.peer_allowed("10.0.0.9")
    assert gate.check_login("admin", "pw") == "admin"
    assert gate.check_login("admin", "nope") is None
    assert gate.check_login("nobody", "pw") is None


def test_a_token_logs_in() -> None:
    gate = Gate(_settings(token="tok-123"))
    assert gate.login_required
    assert gate.check_login("", "tok-123") == "token"
    assert gate.check_login("", "tok-12") is None


def test_a_session_cookie_cannot_be_forged_reused_elsewhere_or_kept_past_its_time() -> None:
    gate = Gate(_settings(users={"admin": hash_password("pw")}, session_hours=1))
    cookie = gate.cookie_for("admin", now=1000.0)
    visitor = gate.visitor(cookie, now=1001.0)
    assert visitor is not None and visitor.user == "admin" and len(visitor.csrf) > 20
    assert gate.visitor(cookie, now=1000.0 + 3601) is None  # expired
    body, signature = cookie.rsplit(".", 1)
    assert gate.visitor(f"{body}x.{signature}", now=1001.0) is None  # tampered
    assert Gate(gate.settings).visitor(cookie, now=1001.0) is None  # another key: a restarted node
    assert gate.visitor(gate.cookie_for(None, now=1000.0), now=1001.0) is None  # anonymous is no login


def test_users_must_be_hashes_never_passwords() -> None:
    with pytest.raises(ValueError, match=r"http.users \"admin\" must be a hash"):
        _settings(users={"admin": "hunter2"})


def test_tls_needs_both_files() -> None:
    with pytest.raises(ValueError, match=r"tls_cert and http\.tls_key go together"):
        _settings(tls_cert="/etc/x.crt")


def test_a_logged_out_session_is_refused_and_forgotten_once_it_would_have_expired() -> None:
    gate = Gate(_settings(users={"admin": hash_password("pw")}, session_hours=1))
    cookie, other = gate.cookie_for("admin", now=1000.0), gate.cookie_for("admin", now=1000.0)
    gate.revoke(cookie, now=1001.0)
    assert gate.visitor(cookie, now=1002.0) is None
    assert gate.visitor(other, now=1002.0) is not None  # only that session
    gate.revoke(Gate(gate.settings).cookie_for("admin", now=1000.0), now=1001.0)  # not signed here
    gate.revoke("garbage", now=1001.0)
    assert len(gate._revoked) == 1
    gate.revoke(other, now=1000.0 + 3601)  # both expired by then: nothing to remember
    assert gate._revoked == {}


def test_guessing_passwords_from_one_address_is_slowed_after_a_few_failures() -> None:
    gate = Gate(_settings(users={"admin": hash_password("pw")}))
    for _ in range(LOGIN_FREE_FAILURES):
        assert gate.begin_login("10.0.0.9", now=1000.0) == 0.0  # each attempt may go ahead
    wait = gate.begin_login("10.0.0.9", now=1000.0)
    assert wait > 0.0  # the next must wait, right password or wrong
    assert gate.begin_login("10.0.0.8", now=1000.0) == 0.0  # another address is not held up
    assert gate.begin_login("10.0.0.9", now=1000.0 + wait) == 0.0
    later = gate.begin_login("10.0.0.9", now=1000.0 + wait + 0.1)
    assert later > wait  # every further failure doubles the wait
    gate.login_succeeded("10.0.0.9")
    assert gate.begin_login("10.0.0.9", now=1000.0 + wait + 0.2) == 0.0
    assert gate.begin_login("10.0.0.7", now=1000.0) == 0.0
    assert gate.begin_login("10.0.0.7", now=1000.0 + LOGIN_WINDOW_SECONDS + 1) == 0.0  # forgotten


def test_the_token_cannot_log_in_under_a_users_name() -> None:
    """The audit records who acted: with the shared token, a name typed on the login page is
    only a label, never that of a configured user (whose password it did not know)."""
    gate = Gate(_settings(users={"alice": hash_password("pw")}, token="tok-123"))
    assert gate.check_login("alice", "tok-123") == "token (alice)"
    assert gate.check_login("night shift", "tok-123") == "token (night shift)"
    assert gate.check_login("alice", "pw") == "alice"


def test_a_session_ends_when_its_password_or_token_changes_or_its_user_is_removed() -> None:
    key = b"k" * 32
    before = Gate(_settings(users={"alice": hash_password("pw"), "bob": hash_password("b")}, token="t1"), key)
    alice, bob = before.cookie_for("alice"), before.cookie_for("bob")
    by_token = before.cookie_for("token (night)", by_token=True)
    same = Gate(before.settings, key)  # the node restarted with the same configuration
    assert same.visitor(alice) is not None and same.visitor(by_token) is not None
    after = Gate(_settings(users={"alice": hash_password("new")}, token="t2"), key)
    assert after.visitor(alice) is None  # new password
    assert after.visitor(bob) is None  # removed
    assert after.visitor(by_token) is None  # new token


def test_a_user_named_like_the_token_is_not_a_token_session() -> None:
    key = b"k" * 32
    gate = Gate(_settings(users={"token": hash_password("pw")}, token="tok"), key)
    assert gate.authenticate("token", "pw") == ("token", False)
    assert gate.authenticate("", "tok") == ("token", True)
    password_session = gate.cookie_for("token", by_token=False)
    assert Gate(_settings(users={"token": hash_password("pw")}), key).visitor(password_session) is None
    assert Gate(_settings(token="tok"), key).visitor(password_session) is None  # user gone


@pytest.mark.parametrize(
    "payload",
    [
        b"[]",
        b"{}",
        b'{"u": 5, "e": 9e99, "c": "x", "t": false, "k": null}',
        b'{"u": null, "e": "never", "c": "x", "t": false, "k": null}',
        b"not json",
        b'{"u": "admin", "e": 9e99, "c": "x"}',
    ],
)
def test_a_cookie_signed_with_the_key_but_of_another_shape_is_no_session(payload: bytes) -> None:
    gate = Gate(_settings(users={"admin": hash_password("pw")}), b"k" * 32)
    import base64

    body = base64.urlsafe_b64encode(payload).decode().rstrip("=")
    cookie = f"{body}.{gate._sign(payload)}"
    assert gate.visitor(cookie) is None and gate.login_token(cookie) is None
    gate.revoke(cookie)


@pytest.mark.parametrize(
    "cookie", ["", ".", "a.b", "é.ü", "x" * 10000, "a" * 5000 + "." + "b" * 43, "%00.%00"]
)
def test_garbage_cookies_are_no_session(cookie: str) -> None:
    gate = Gate(_settings(users={"admin": hash_password("pw")}))
    assert gate.visitor(cookie) is None and gate.login_token(cookie) is None


def test_the_session_key_is_made_once_private_and_kept(tmp_path: Path) -> None:
    key = session_key(tmp_path)
    path = tmp_path / "console" / "session.key"
    assert len(key) == 32 and path.read_bytes() == key
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    assert session_key(tmp_path) == key  # the next start: the same key, sessions go on
    path.write_bytes(b"short")
    assert session_key(tmp_path) not in (key, b"short")  # not a key: replaced
    assert not [p for p in path.parent.iterdir() if p.name != "session.key"]  # no temporary left
