"""The HTTP server of ``ainode serve``: the web application on uvicorn, in a thread of its own,
started and stopped like the node's other roles."""

from __future__ import annotations

import logging
import threading
import time

import uvicorn
from sqlalchemy.orm import Session, sessionmaker

from conf import Settings
from scp.web.app import make_app

log = logging.getLogger("ainode.http")
START_TIMEOUT_SECONDS = 30.0


class WebServer:
    def __init__(self, settings: Settings, sessions: sessionmaker[Session]) -> None:
        self.settings = settings
        http = settings.http
        config = uvicorn.Config(
            make_app(settings, sessions),
            host=http.host,
            port=http.port,
            log_config=None,  # the node's own logging, not uvicorn's
            access_log=False,
            lifespan="off",
            server_header=False,
            # X-Forwarded-For is believed only from a proxy on this machine: a remote visitor
            # behind it then counts as remote (the loopback-only rule holds), and nobody can
            # claim to be loopback from outside.
            proxy_headers=True,
            forwarded_allow_ips="127.0.0.1,::1",
            ssl_certfile=str(http.tls_cert) if http.tls_cert else None,
            ssl_keyfile=str(http.tls_key) if http.tls_key else None,
            timeout_graceful_shutdown=5,
        )
        # uvicorn's own start lines ("Press CTRL+C to quit") say nothing true of the node.
        logging.getLogger("uvicorn.error").setLevel(logging.WARNING)
        self.server = uvicorn.Server(config)
        self.thread = threading.Thread(target=self.server.run, name="http", daemon=True)

    @property
    def port(self) -> int:
        for server in self.server.servers:
            for sock in server.sockets:
                return int(sock.getsockname()[1])
        return self.settings.http.port

    def start(self) -> None:
        self.thread.start()
        deadline = time.monotonic() + START_TIMEOUT_SECONDS
        while not self.server.started:
            if not self.thread.is_alive():
                raise OSError(
                    f"the HTTP server could not listen on {self.settings.http.host}:{self.settings.http.port}"
                )
            if time.monotonic() > deadline:
                raise OSError("the HTTP server did not start in time")
            time.sleep(0.02)
        scheme = "https" if self.settings.http.tls_enabled else "http"
        access = (
            "login required" if self.settings.http.login_required else "no users configured: loopback only"
        )
        log.info(
            "console on %s://%s:%d/ (%s), /healthz and /metrics beside it",
            scheme,
            self.settings.http.host,
            self.port,
            access,
        )

    def stop(self) -> None:
        self.server.should_exit = True
        self.thread.join(timeout=10)
