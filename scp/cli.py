"""The ``ainode`` command: the one place that wires configuration, storage and roles together."""

from __future__ import annotations

import argparse
import json
import logging
import signal
import sys
import threading
from pathlib import Path
from types import FrameType

from conf import ConfigError, Settings, load_settings
from scp.errors import PeerError
from scp.logs import setup_logging
from scp.peers import parse_peer
from scp.scu import dicom_files, echo, send
from scp.server import StorageSCP
from scp.status_report import format_table, study_rows
from storage.db import make_engine, make_session_factory, migrate

log = logging.getLogger("ainode")


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="ainode", description=__doc__)
    parser.add_argument(
        "-c",
        "--config",
        type=Path,
        default=None,
        help="configuration file (default: $AINODE_CONFIG, else conf/ainode.toml)",
    )
    parser.add_argument("--log-format", choices=["text", "json"], default="text")
    sub = parser.add_subparsers(dest="command", required=True)
    sub.add_parser("serve", help="run the node (DICOM listener and study queue)")
    sub.add_parser("scp", help="run only the DICOM listener (scale-out)")
    status = sub.add_parser("status", help="list the studies the node holds")
    status.add_argument("--json", action="store_true", help="print one JSON array")
    echo_cmd = sub.add_parser("echo", help="C-ECHO a peer: AE@HOST:PORT")
    echo_cmd.add_argument("peer")
    send_cmd = sub.add_parser("send", help="C-STORE files or folders to a peer")
    send_cmd.add_argument("paths", nargs="+", type=Path)
    send_cmd.add_argument("--to", required=True, help="AE@HOST:PORT")
    preview = sub.add_parser("preview", help="write exactly the images and prompt the model would get")
    preview.add_argument("study_instance_uid")
    preview.add_argument("--out", type=Path, required=True, help="folder to write into")
    for cmd in (sub.choices["serve"], sub.choices["scp"], status, echo_cmd, send_cmd, preview):
        cmd.add_argument("-c", "--config", type=Path, default=argparse.SUPPRESS)
        cmd.add_argument("--log-format", choices=["text", "json"], default=argparse.SUPPRESS)
    return parser


def _run_listener(settings: Settings) -> int:
    engine = make_engine(settings.storage.database_url)
    migrate(engine)
    scp = StorageSCP(settings, make_session_factory(engine))
    stop = threading.Event()

    def _on_signal(signum: int, _frame: FrameType | None) -> None:
        log.info("received %s, stopping", signal.Signals(signum).name)
        stop.set()

    signal.signal(signal.SIGTERM, _on_signal)
    signal.signal(signal.SIGINT, _on_signal)
    scp.start()
    stop.wait()
    scp.stop()
    engine.dispose()
    return 0


def _preview(settings: Settings, study_instance_uid: str, out: Path) -> int:
    from analysis.prepare import prepare_study, write_preview

    engine = make_engine(settings.storage.database_url)
    migrate(engine)
    try:
        with make_session_factory(engine)() as session:
            prepared = prepare_study(session, study_instance_uid, settings.storage.root, settings.imaging)
    finally:
        engine.dispose()
    if not prepared.encoded and not prepared.exclusions:
        print(f"ainode preview: no study {study_instance_uid} in the database", file=sys.stderr)
        return 1
    for path in write_preview(prepared, out):
        print(path)
    print(
        f"{len(prepared.encoded)} image(s) for the model, {len(prepared.exclusions)} instance(s) left out "
        "(reasons in manifest.json)"
    )
    return 0


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    setup_logging(args.log_format)
    try:
        settings = load_settings(args.config)
    except ConfigError as exc:
        print(f"ainode: bad configuration: {exc}", file=sys.stderr)
        return 2
    try:
        if args.command in ("serve", "scp"):
            return _run_listener(settings)
        if args.command == "status":
            engine = make_engine(settings.storage.database_url)
            migrate(engine)
            with make_session_factory(engine)() as session:
                rows = study_rows(session)
            print(json.dumps(rows, indent=2) if args.json else format_table(rows))
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
            results = send(dicom_files(args.paths), peer, settings.node.ae_title)
            for result in results:
                print(f"{result.path}: 0x{result.status & 0xFFFF:04X}")
            failed = sum(not r.ok for r in results)
            print(f"sent {len(results) - failed} of {len(results)} to {peer}")
            return 0 if failed == 0 else 1
    except (PeerError, ValueError, OSError) as exc:
        print(f"ainode {args.command}: {exc}", file=sys.stderr)
        return 1
    return 2


if __name__ == "__main__":
    sys.exit(main())
