"""The ``ainode`` command: the one place that wires configuration, storage and roles together."""

from __future__ import annotations

import argparse
import json
import logging
import signal
import socket
import sys
import threading
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path
from types import FrameType
from typing import Any

from conf import ConfigError, Settings, load_settings
from scp.errors import PeerError
from scp.logs import setup_logging
from scp.peers import parse_peer
from scp.receivers import (
    ReceiverWatch,
    check_port_free,
    fork_commit_process,
    fork_receivers,
    receiver_count,
)
from scp.scu import dicom_files, dicom_headers, echo, send
from scp.sender import SrSender
from scp.server import StorageSCP
from scp.status_report import format_table, study_rows
from scp.tls import check_files as check_tls_files
from storage import crashpoints
from storage.commit_process import CommitLinks
from storage.db import open_database, transaction
from storage.errors import DatabaseNotUsable
from storage.files import InstanceStore
from storage.models import utc_now
from storage.overview import disclosure_query, disclosure_record
from storage.studies import complete_study, requeue_study

log = logging.getLogger("ainode")


USAGE_EPILOG = """\
A DICOM node that receives studies (C-STORE), shows a vision model a few de-identified images,
and sends the findings back to the PACS as a DICOM Structured Report.

first steps:
  ainode simulate-vision &                        a stand-in model, SIMULATED findings
  AINODE_VISION__PROVIDER=simulator ainode serve  the node, DICOM port 11112, AE title AINODE
  ainode send study/ --to AINODE@127.0.0.1:11112  send a study as a modality would
  ainode status                                   what happened to it

Every configuration key can be set as AINODE_<SECTION>__<KEY>, e.g. AINODE_NODE__PORT=11113.
"""


def _version() -> str:
    try:
        return version("ainode")
    except PackageNotFoundError:  # running from a checkout that was never installed
        return "unknown (not installed)"


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="ainode",
        description="ainode: a vision-language model in the hospital's DICOM workflow.",
        epilog=USAGE_EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--version", action="version", version=f"ainode {_version()}")
    parser.add_argument(
        "-c",
        "--config",
        type=Path,
        default=None,
        help="configuration file (default: $AINODE_CONFIG, else conf/ainode.toml)",
    )
    parser.add_argument("--log-format", choices=["text", "json"], default="text")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    sub.add_parser("serve", help="run the whole node: DICOM listener, analysis, SR delivery, /healthz")
    sub.add_parser("scp", help="run only the DICOM listener (scale-out)")
    sub.add_parser("worker", help="run only analysis and SR delivery (scale-out)")
    retry = sub.add_parser("retry", help="analyse a study again (a new SR version)")
    retry.add_argument("study_instance_uid")
    complete = sub.add_parser("complete", help="declare a study complete now: queue it without waiting")
    complete.add_argument("study_instance_uid")
    status = sub.add_parser("status", help="list the studies the node holds")
    status.add_argument("--json", action="store_true", help="print one JSON array")
    disclosures = sub.add_parser(
        "disclosures", help="export what was sent to vision APIs (one JSON line per request)"
    )
    disclosures.add_argument("--study", dest="study_instance_uid", help="only this study")
    echo_cmd = sub.add_parser("echo", help="C-ECHO a peer: AE@HOST:PORT")
    echo_cmd.add_argument("peer")
    send_cmd = sub.add_parser("send", help="C-STORE files or folders to a peer")
    send_cmd.add_argument("paths", nargs="+", type=Path)
    send_cmd.add_argument("--to", required=True, help="AE@HOST:PORT")
    preview = sub.add_parser("preview", help="write the exact images and prompt the model would get")
    preview.add_argument("study_instance_uid")
    preview.add_argument("--out", type=Path, required=True, help="folder to write into")
    sub.add_parser(
        "hash-password",
        help="read a console password (prompt or stdin) and print its hash for [http] users",
    )
    simulate = sub.add_parser(
        "simulate-vision", help="a stand-in vision API (OpenAI and Anthropic protocols), SIMULATED findings"
    )
    simulate.add_argument("--host", default="127.0.0.1")
    simulate.add_argument("--port", type=int, default=8089)
    simulate.add_argument("--latency-ms", type=float, default=0.0)
    simulate.add_argument("--fail-429", type=int, default=0, help="answer 429 to the first N calls")
    simulate.add_argument("--retry-after", type=float, default=1.0, help="Retry-After of those 429s, seconds")
    simulate.add_argument("--fail-500", type=int, default=0, help="then answer 500 to N calls")
    simulate.add_argument(
        "--malformed", type=int, default=0, help="then answer N calls with invalid findings"
    )
    simulate.add_argument("--fail-status", type=int, default=0, help="then answer this status ...")
    simulate.add_argument("--fail-status-count", type=int, default=0, help="... to N calls")
    simulate.add_argument("--refuse", type=int, default=0, help="then answer N calls with a refusal")
    simulate.add_argument("--quota-exhausted", action="store_true", help="429 insufficient_quota, always")
    simulate.add_argument(
        "--style",
        choices=["plain", "fenced", "prose"],
        default="plain",
        help="JSON as is, in fences, after prose",
    )
    simulate.add_argument(
        "--boundary",
        action="store_true",
        help="answer with the schema's edge values (highest index, no-area box)",
    )
    simulate.add_argument("--findings", type=int, default=1, help="findings per answer (default 1)")
    simulate.add_argument(
        "--reply-tokens",
        type=int,
        default=0,
        help="pad answers to about N tokens (cut at the request's max_tokens)",
    )
    simulate.add_argument("--api-key", default=None, help="refuse requests without this key (401)")
    simulate.add_argument(
        "--drip-ms", type=float, default=0.0, help="send replies 64 bytes at a time, N ms apart"
    )
    simulate.add_argument("--rpm-limit", type=int, default=0, help="429 past N requests a minute")
    simulate.add_argument("--record", type=Path, default=None, help="append each request body to FILE")
    for cmd in (
        sub.choices["serve"],
        sub.choices["scp"],
        sub.choices["worker"],
        retry,
        complete,
        status,
        echo_cmd,
        send_cmd,
        preview,
        simulate,
    ):
        cmd.add_argument("-c", "--config", type=Path, default=argparse.SUPPRESS)
        cmd.add_argument("--log-format", choices=["text", "json"], default=argparse.SUPPRESS)
    return parser


def _make_worker(settings: Settings, sessions: Any, settles: bool) -> Any:
    """The analysis workers (the vision API can be called: a key, or a local server)."""
    from analysis.vision.client import VisionClient
    from analysis.worker import AnalysisWorker
    from storage.disclosures import DisclosureLog

    vision = VisionClient(settings.vision, disclosures=DisclosureLog(settings.storage.root))
    return AnalysisWorker(settings, sessions, vision, settles=settles)


def _run_roles(settings: Settings, command: str) -> int:
    """serve: everything; scp: the DICOM listener; worker: analysis and SR delivery."""
    missing_key = settings.vision.missing_key
    route_problem = settings.route_key_problem
    if route_problem is not None and command in ("serve", "worker"):
        print(f"ainode {command}: {route_problem}", file=sys.stderr)
        return 2
    if missing_key is not None and command == "worker":
        print(f"ainode worker: {missing_key}", file=sys.stderr)
        return 2
    tls_problem = check_tls_files(
        settings, inbound=command in ("serve", "scp"), outbound=command in ("serve", "worker")
    )
    if tls_problem is not None:
        print(f"ainode {command}: {tls_problem}", file=sys.stderr)
        return 2
    if missing_key is not None and command == "serve":
        log.warning(
            "%s: studies are received, stored and shown as waiting until the node is started with it "
            '(to try the loop without a model: `ainode simulate-vision` and vision.provider = "simulator")',
            missing_key,
        )
    analyses = command == "worker" or (command == "serve" and missing_key is None)
    # Before anything starts: a SIGTERM while the roles are still being made (a worker importing
    # its imaging stack, say) is a clean stop once they are, not a kill.
    stop = threading.Event()
    exit_code = 0

    def _on_signal(signum: int, _frame: FrameType | None) -> None:
        log.info("received %s, stopping", signal.Signals(signum).name)
        stop.set()

    signal.signal(signal.SIGTERM, _on_signal)
    signal.signal(signal.SIGINT, _on_signal)
    with open_database(settings.storage.database_url) as sessions:
        receivers, commit_link = (
            _fork_receivers(settings, sessions) if command in ("serve", "scp") else ([], None)
        )
        scp = (
            StorageSCP(
                settings,
                sessions,
                waiting_reason=missing_key if command == "serve" else None,
                reuse_port=bool(receivers),
                commit_link=commit_link,
            )
            if command in ("serve", "scp")
            else None
        )
        sender = SrSender(settings, sessions) if command in ("serve", "worker") else None
        # In serve the SCP's loop settles studies and reaps leases; a lone worker must do it itself.
        worker = _make_worker(settings, sessions, settles=command == "worker") if analyses else None
        http = _web_server(settings, sessions) if command == "serve" else None

        def _on_receiver_exit(code: int) -> None:
            nonlocal exit_code
            exit_code = code
            stop.set()

        watch = ReceiverWatch(receivers, _on_receiver_exit, stopping=stop)
        for role in (scp, worker, sender, http):
            if role is not None:
                role.start()
        stop.wait()
        watch.terminate()  # no receiver takes new associations while the roles below finish theirs
        for role in (scp, worker, sender, http):  # stop taking work first, then finish what is held
            if role is not None:
                role.stop()
        watch.stop(timeout=35)
        return exit_code


def _web_server(settings: Settings, sessions: Any) -> Any:
    """The HTTP server: /healthz, /metrics and the console (imported only where it runs)."""
    from scp.web.server import WebServer

    return WebServer(settings, sessions)


def _fork_receivers(settings: Settings, sessions: Any) -> tuple[list[int], socket.socket | None]:
    """The extra receiving processes (scp.receivers) and the commit process that commits for
    all of them (storage.commit_process), forked before any thread starts: their PIDs, and the
    main process's link to the commit process (None: one receiving process, its own commits)."""
    count = receiver_count(settings)
    if count <= 1:
        return [], None
    if settings.node.port == 0:
        log.info("node.port = 0 (any free port): one receiving process")
        return [], None
    check_port_free(settings.node.host, settings.node.port)
    InstanceStore(settings.storage.root).prepare()  # the one purge of tmp/, before anyone receives
    sessions.kw["bind"].dispose()  # no pooled connection crosses the fork
    links = CommitLinks.make(count)
    pids = [fork_commit_process(settings, links), *fork_receivers(settings, count, links)]
    log.info("%d receiving processes on port %d, one commit process", count, settings.node.port)
    return pids, links.keep_client(0)


def _preview(settings: Settings, study_instance_uid: str, out: Path) -> int:
    from analysis.prepare import for_provider, prepare_study, write_preview
    from analysis.vision import wire
    from conf.providers import preset_for

    with open_database(settings.storage.database_url) as sessions, sessions() as session:
        imaging = for_provider(
            settings.imaging,
            preset_for(settings.vision.provider),
            max_cost_usd=settings.vision.max_cost_usd_per_study,
            max_output_tokens=settings.vision.max_output_tokens,
        )
        prepared = prepare_study(session, study_instance_uid, settings.storage.root, imaging)
    if not prepared.encoded and not prepared.exclusions:
        print(f"ainode preview: no study {study_instance_uid} in the database", file=sys.stderr)
        return 1
    for path in write_preview(prepared, out):
        print(path)
    if prepared.encoded:  # the request exactly as sent, images named by their files
        preset = preset_for(settings.vision.provider)
        body = wire.build_body(
            preset,
            settings.vision.model or preset.default_model,
            prepared.encoded,
            prepared.prompt,
            settings.vision.max_output_tokens,
            settings.vision.temperature,
            codes=prepared.codes,
        )
        files = [entry["file"] for entry in prepared.manifest()["images"]]
        request = out / "request.json"
        shown = wire.shown_body(body, files)
        request.write_text(json.dumps(shown, indent=2, ensure_ascii=False), encoding="utf-8")
        print(request)
    print(
        f"{len(prepared.encoded)} image(s) for the model, {len(prepared.exclusions)} instance(s) left out "
        "(reasons in manifest.json)"
    )
    return 0


def _simulate(args: argparse.Namespace) -> int:
    from analysis.vision.simulated_model import Answering
    from analysis.vision.simulator import Behaviour, SimulatorServer

    behaviour = Behaviour(
        latency_ms=args.latency_ms,
        fail_429=args.fail_429,
        retry_after_seconds=args.retry_after,
        fail_500=args.fail_500,
        malformed=args.malformed,
        fail_status=args.fail_status,
        fail_status_count=args.fail_status_count,
        refuse=args.refuse,
        quota_exhausted=args.quota_exhausted,
        rpm_limit=args.rpm_limit,
        api_key=args.api_key,
        drip_ms=args.drip_ms,
        record=args.record,
        answering=Answering(
            style=args.style, boundary=args.boundary, findings=args.findings, reply_tokens=args.reply_tokens
        ),
    )
    server = SimulatorServer((args.host, args.port), behaviour)
    stop = threading.Event()
    signal.signal(signal.SIGTERM, lambda *_: stop.set())
    signal.signal(signal.SIGINT, lambda *_: stop.set())
    threading.Thread(target=server.serve_forever, name="simulator", daemon=True).start()
    log.info("simulated vision API (SIMULATED findings) on http://%s:%d/v1", args.host, server.port)
    stop.wait()
    server.shutdown()
    server.server_close()
    return 0


def _hash_password() -> int:
    """A password for ``[http] users``, read without echo (or from stdin), printed as its hash:
    never on the command line, where ``ps`` and shell history would keep it."""
    import getpass

    from scp.web.auth import hash_password

    password = getpass.getpass("password: ") if sys.stdin.isatty() else sys.stdin.readline().rstrip("\n")
    if not password:
        print("ainode hash-password: empty password", file=sys.stderr)
        return 1
    print(hash_password(password))
    return 0


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    setup_logging(args.log_format)
    if crashpoints.unknown():
        print(
            f"ainode: AINODE_CRASH_AT names no crash point: {', '.join(crashpoints.unknown())}",
            file=sys.stderr,
        )
        return 2
    if args.command == "simulate-vision":  # needs no configuration: it stands in for a provider
        return _simulate(args)
    if args.command == "hash-password":  # needs no configuration either
        return _hash_password()
    try:
        settings = load_settings(args.config)
    except ConfigError as exc:
        print(f"ainode: bad configuration: {exc}", file=sys.stderr)
        return 2
    try:
        if args.command in ("serve", "scp", "worker"):
            return _run_roles(settings, args.command)
        if args.command == "status":
            with open_database(settings.storage.database_url) as sessions, sessions() as session:
                rows = study_rows(session)
            print(json.dumps(rows, indent=2) if args.json else format_table(rows))
            return 0
        if args.command == "disclosures":
            with open_database(settings.storage.database_url) as sessions, sessions() as session:
                for call in session.scalars(disclosure_query(args.study_instance_uid)):
                    print(json.dumps(disclosure_record(call), sort_keys=True))
            return 0
        if args.command in ("retry", "complete"):
            action = requeue_study if args.command == "retry" else complete_study
            try:
                with (
                    open_database(settings.storage.database_url) as sessions,
                    transaction(sessions) as session,
                ):
                    outcome = action(session, args.study_instance_uid, utc_now(), settings.routes)
            except LookupError as exc:
                print(f"ainode {args.command}: {exc}", file=sys.stderr)
                return 1
            if args.command == "retry":
                print(f"study {args.study_instance_uid} queued again as version {outcome}")
            else:
                print(f"study {args.study_instance_uid}: {outcome}")
            return 0
        if args.command == "preview":
            return _preview(settings, args.study_instance_uid, args.out)
        if args.command == "echo":
            peer = parse_peer(args.peer)
            status = echo(peer, settings.node.ae_title)
            print(f"C-ECHO {peer}: status 0x{status:04X}")
            return 0 if status == 0 else 1
        if args.command == "send":
            peer = parse_peer(args.to)
            headers, skipped = dicom_headers(dicom_files(args.paths))
            for path, reason in skipped:
                print(f"{path}: skipped, {reason}")
            if not headers:
                print(
                    f"ainode send: no DICOM files to send in {' '.join(map(str, args.paths))}",
                    file=sys.stderr,
                )
                return 1
            results = send(headers, peer, settings.node.ae_title)
            for result in results:
                print(f"{result.path}: 0x{result.status & 0xFFFF:04X}")
            failed = sum(not r.ok for r in results)
            print(f"sent {len(results) - failed} of {len(results)} to {peer}")
            return 0 if failed == 0 else 1
    except DatabaseNotUsable as exc:
        print(f"ainode {args.command}: {exc}", file=sys.stderr)
        return 2
    except (PeerError, ValueError, OSError) as exc:
        print(f"ainode {args.command}: {exc}", file=sys.stderr)
        return 1
    return 2


if __name__ == "__main__":
    sys.exit(main())
