"""The analysis worker: claim a settled study, prepare its images, ask the model, build the SR,
and commit the result (API calls, SR outbox rows, job completion) in one transaction before
anything is sent.

Crash safety: a result is committed with its job's completion, so a restarted worker never
calls the model again for a committed study; a crash before the commit leaves the job leased,
the reaper requeues it, and the call is repeated (it was never committed). A study version
whose SR is already queued is completed without a call.
"""

from __future__ import annotations

import datetime as dt
import logging
import threading
import time
from collections.abc import Callable
from pathlib import Path

from pydicom import dcmread
from pydicom.dataset import Dataset
from pydicom.filebase import DicomBytesIO
from sqlalchemy import select
from sqlalchemy.exc import InterfaceError, OperationalError
from sqlalchemy.orm import Session, sessionmaker

from analysis.errors import CircuitOpen, VisionError, VisionPermanent
from analysis.findings import Findings
from analysis.key_images import build_key_images
from analysis.mosaic import ComposedImage
from analysis.prepare import for_provider, prepare_study
from analysis.presentation_state import build_presentation_state
from analysis.prompt import PROMPT_VERSION
from analysis.regions import place_findings
from analysis.report import ReportContext, build_sr
from analysis.summary_image import build_summary
from analysis.uids import UidMaker
from analysis.vision.client import VisionClient
from conf import Settings
from conf.routing import Route
from storage import crashpoints, outbox, queue
from storage.api_calls import record_api_calls, study_cost_usd
from storage.db import transaction
from storage.errors import LeaseLost, StorageUnavailable
from storage.files import InstanceStore
from storage.models import Instance, Job, JobKind, Outbox, StudyState, utc_now
from storage.owners import host_of, process_alive, this_process
from storage.retention import purge_ended
from storage.studies import installation_namespace, instance_set, settle_due, update_study_version

log = logging.getLogger("ainode.worker")


class AnalysisWorker:
    def __init__(
        self,
        settings: Settings,
        sessions: sessionmaker[Session],
        vision: VisionClient,
        clock: Callable[[], dt.datetime] = utc_now,
        settles: bool = True,
    ) -> None:
        """``settles``: also queue settled studies and reap lapsed leases before each claim.
        Needed where no SCP runs that loop (``ainode worker``); in ``ainode serve`` the SCP does
        it, and every worker thread repeating it per poll would only contend for the write lock."""
        self.settings = settings
        self.sessions = sessions
        self.settles = settles
        self.vision = vision
        self.clock = clock
        self.store = InstanceStore(settings.storage.root)
        self._clients: dict[tuple[str, str | None, str | None, str | None], VisionClient] = {
            (vision.preset.name, settings.vision.model, settings.vision.base_url, None): vision
        }
        self._clients_lock = threading.Lock()
        self.owner = this_process()
        self._uid_maker: UidMaker | None = None
        self._stop = threading.Event()
        self._threads: list[threading.Thread] = []

    # -- lifecycle ---------------------------------------------------------------------------

    def start(self) -> None:
        with transaction(self.sessions) as session:
            reclaimed = queue.reclaim_orphans(session, host_of(self.owner), process_alive, self.clock())
        for job_id in reclaimed:
            log.warning("job %d: its worker process on this host is gone; queued again now", job_id)
        for n in range(self.settings.worker.concurrency):
            thread = threading.Thread(target=self._loop, name=f"worker-{n}", daemon=True)
            thread.start()
            self._threads.append(thread)
        log.info("%d analysis worker(s) started as %s", len(self._threads), self.owner)

    def stop(self, timeout: float = 60.0) -> None:
        """Stop claiming; a study in progress finishes (or its lease lapses and it is requeued)."""
        self._stop.set()
        for thread in self._threads:
            thread.join(timeout)
        with self._clients_lock:
            for client in self._clients.values():
                client.close()

    def _loop(self) -> None:
        next_purge = 0.0
        while not self._stop.is_set():
            try:
                if time.monotonic() >= next_purge and self.settings.storage.retention_days > 0:
                    next_purge = time.monotonic() + 60
                    with transaction(self.sessions) as session:
                        purged = purge_ended(
                            session, self.store, self.settings.storage.retention_days, self.clock()
                        )
                    for uid in purged:
                        log.info("retention: deleted the instance files of ended study %s", uid)
                if not self.run_once():
                    self._stop.wait(self.settings.worker.poll_seconds)
            except Exception:
                log.exception("worker loop failed; will retry")
                self._stop.wait(self.settings.worker.poll_seconds)

    # -- one job -----------------------------------------------------------------------------

    def run_once(self) -> bool:
        """Claim and finish one analysis; False when none was due (or the provider's circuit is
        open: a study claimed now could only wait)."""
        lease = self.settings.worker.lease_seconds
        with transaction(self.sessions) as session:
            if self.settles:
                settle_due(session, self.clock(), routes=self.settings.routes)
                queue.reap_expired(session, self.clock())
            if self.vision.breaker.state == "open":
                return False
            job = queue.claim(session, JobKind.ANALYSE, self.owner, lease, self.clock())
        if job is None:
            return False
        log.info(
            "job %d: analysing study %s version %d (attempt %d)",
            job.id,
            job.study_instance_uid,
            job.study_version,
            job.attempts,
        )
        beating = threading.Event()
        lost = threading.Event()
        holder = {"job": job}

        def heartbeat() -> None:
            """Renew the lease every third of it. A database that fails for a moment is tried
            again at the next beat; a lease that is really gone stops the work (``lost``)."""
            while not beating.wait(lease / 3):
                try:
                    with transaction(self.sessions) as session:
                        holder["job"] = queue.heartbeat(session, holder["job"], lease, self.clock())
                except LeaseLost:
                    log.warning("job %d: lease lost; stopping its work", job.id)
                    lost.set()
                    return
                except Exception as exc:
                    log.warning("job %d: heartbeat failed (%s); trying again", job.id, type(exc).__name__)

        pulse = threading.Thread(target=heartbeat, name=f"heartbeat-{job.id}", daemon=True)
        pulse.start()
        try:
            self._analyse(holder, lost)
        except LeaseLost as exc:
            log.warning("job %d: %s; the job is another worker's now", job.id, exc)
        except Exception as exc:
            log.exception("job %d: analysis failed", job.id)
            self._record_failure(holder, exc)
        finally:
            beating.set()
            pulse.join(5)
        return True

    def _record_failure(self, holder: dict[str, queue.ClaimedJob], exc: BaseException) -> None:
        """Every exception ends in a recorded outcome, never a lapsed lease: the calls it made and
        the real reason. Disk and database trouble is retried; anything else (a bug, a header
        highdicom cannot use) fails the study with its reason, since repeating it cannot help."""
        job = holder["job"]
        # A plain (read) session's database trouble is SQLAlchemy's, not DatabaseUnavailable.
        retryable = isinstance(exc, OSError | StorageUnavailable | OperationalError | InterfaceError)
        reason = f"{type(exc).__name__}: {' '.join(str(exc).split())[:500]}"
        try:
            with transaction(self.sessions) as session:
                record_api_calls(session, getattr(exc, "calls", []), self.clock(), job.id)
                state = queue.fail(session, job, reason, self.clock(), retryable=retryable)
            log.warning("job %d: %s (%s)", job.id, reason, state)
        except LeaseLost:
            log.warning("job %d: lease lost before its failure could be recorded", job.id)
        except Exception:
            log.exception("job %d: could not record its failure; its lease will lapse", job.id)

    def _route(self, job_id: int) -> Route | None:
        with self.sessions() as session:
            name = session.scalar(select(Job.route).where(Job.id == job_id))
        return next((r for r in self.settings.routes if r.name == name), None)

    def _client_for(self, route: Route | None) -> VisionClient:
        """The default client, or one for the route's provider/model (made once, then shared)."""
        if route is None or (
            route.provider is None
            and route.model is None
            and route.base_url is None
            and route.api_key is None
        ):
            return self.vision
        vision = self.settings.vision
        provider = route.provider or vision.provider
        same = provider == vision.provider
        model = route.model or (vision.model if same else None)
        base_url = self.settings.route_base_url(route)
        # The route's own key; the default's only for the default's provider at the default's
        # endpoint (a key is never sent to another vendor or host: Settings.route_key_problem
        # stops a node whose route lacks one).
        api_key = self.settings.route_api_key(route)
        key = (provider, model, base_url, route.api_key_env if route.api_key is not None else None)
        with self._clients_lock:
            if key not in self._clients:
                settings = vision.model_copy(
                    update={
                        "provider": provider,
                        "model": model,
                        "base_url": base_url,
                        "api_key": api_key,
                        "api_key_env": route.api_key_env if route.api_key is not None else vision.api_key_env,
                    }
                )
                self._clients[key] = VisionClient(settings, disclosures=self.vision.disclosures)
            return self._clients[key]

    def _already_committed(self, study: str, version: int) -> bool:
        with self.sessions() as session:
            return (
                session.scalar(
                    select(Outbox.id)
                    .where(Outbox.study_instance_uid == study)
                    .where(Outbox.study_version == version)
                    .limit(1)
                )
                is not None
            )

    def _analyse(self, holder: dict[str, queue.ClaimedJob], lost: threading.Event) -> None:
        job = holder["job"]
        study, version = job.study_instance_uid, job.study_version
        started = self.clock()
        if self._already_committed(study, version):
            with transaction(self.sessions) as session:
                queue.complete(session, holder["job"], self.clock())
            log.info(
                "job %d: study %s version %d already has its SR queued; no model call", job.id, study, version
            )
            return
        route = self._route(job.id)
        vision = self._client_for(route)
        imaging = for_provider(
            self.settings.imaging,
            vision.preset,
            max_cost_usd=vision.settings.max_cost_usd_per_study,
            max_output_tokens=vision.settings.max_output_tokens,
        )
        clock = time.perf_counter
        t0 = clock()
        with self.sessions() as session:
            fixed = instance_set(session, study, version)  # exactly this version's instances
            prepared = prepare_study(session, study, self.store.root, imaging, only=fixed)
            earlier = queue.stored_findings(session, job)
            spent = study_cost_usd(session, study)  # every attempt and version so far
        t_prepared = clock()
        if not prepared.encoded:
            with transaction(self.sessions) as session:
                queue.complete(session, holder["job"], self.clock())
                reasons = "; ".join(sorted({e.reason for e in prepared.exclusions}))
                update_study_version(
                    session,
                    study,
                    version,
                    {"state": StudyState.SKIPPED, "last_error": f"nothing to analyse: {reasons}"[:1520]},
                )
            log.info("job %d: study %s has no image to analyse; skipped", job.id, study)
            return
        if earlier is not None:  # an earlier attempt paid for these; never ask twice
            findings = Findings.model_validate_json(earlier)
            cost = 0.0
            log.info("job %d: using the findings an earlier attempt committed; no model call", job.id)
        else:
            if lost.is_set():
                raise LeaseLost(f"job {job.id}: lease lost before the model call")
            prompt = prepared.prompt + (f"\n\n{route.instructions}" if route and route.instructions else "")
            try:
                result = vision.analyse(
                    study, prepared.encoded, prompt, spent_usd=spent, codes=prepared.codes
                )
            except VisionError as exc:
                self._vision_failed(holder, exc, vision)
                return
            crashpoints.reached("analysis.after_model_reply")
            findings, cost = result.findings, result.cost_usd
            with transaction(self.sessions) as session:  # what was spent is kept whatever follows
                record_api_calls(session, result.calls, self.clock(), job.id)
            with transaction(self.sessions) as session:
                queue.store_findings(session, holder["job"], findings.model_dump_json(), self.clock())
            crashpoints.reached("analysis.after_findings_commit")
        t_model = clock()
        analysed = self._headers(study, fixed)
        shown = prepared.shown_instances  # every slice of every slab: a region may land on any
        sources = {uid: header for uid, header in analysed.items() if uid in shown}
        predecessor = self._predecessor(study)
        context = ReportContext(
            study,
            version,
            vision.preset.name,
            vision.model,
            PROMPT_VERSION,
            started,
            self._uids(),
            simulated=vision.preset.name == "simulator",
            predecessor=predecessor,
        )
        sr = build_sr(findings, prepared.composed, sources, context, evidence=list(analysed.values()))
        buffer = DicomBytesIO()
        sr.save_as(buffer, enforce_file_format=True)
        # A name only this lease owns: a worker that lost its lease can never replace the file
        # the winner's outbox row points to; the row makes it visible, in the guarded commit.
        relative = f"sr/{study}/{sr.SOPInstanceUID}.{job.lease_token[:8]}.dcm"
        if lost.is_set():
            raise LeaseLost(f"job {job.id}: lease lost before the SR was written")
        self.store.write_atomically(relative, buffer.getvalue())  # durable before it is named
        destinations = (
            list(route.destinations)
            if route and route.destinations
            else [d.name for d in self.settings.destinations]
        )
        outputs = {d.name: d.outputs for d in self.settings.destinations}
        wanted: set[str] = {kind for name in destinations for kind in outputs.get(name, ())}
        companions: dict[str, tuple[str, str]] = {}
        summary = self._summary(findings, prepared.composed, analysed, version, context.simulated, job)
        if summary is not None:
            companions["sc"] = summary
        companions.update(self._regions_outputs(findings, prepared.composed, sources, context, job, wanted))
        crashpoints.reached("analysis.after_sr_write")
        t_report = clock()
        wants_sr = [name for name in destinations if "sr" in outputs.get(name, ("sr",))]
        sends = 0
        try:
            with transaction(self.sessions) as session:
                outbox.enqueue(
                    session, study, version, relative, str(sr.SOPInstanceUID), wants_sr, self.clock()
                )
                sends += len(wants_sr)
                for kind, (path, uid) in companions.items():
                    targets = [name for name in destinations if kind in outputs.get(name, ())]
                    if targets:
                        outbox.enqueue(
                            session, study, version, path, uid, targets, self.clock(), is_report=False
                        )
                        sends += len(targets)
                finished: dict[str, object] = {"analysed_version": version}
                if not sends:  # nowhere to send: the study is finished now
                    finished["state"] = StudyState.DONE
                update_study_version(session, study, version, finished)
                queue.complete(session, holder["job"], self.clock())
        except LeaseLost:
            for written in (relative, *(path for path, _ in companions.values())):
                (self.store.root / written).unlink(missing_ok=True)  # never named by any row
            raise
        crashpoints.reached("analysis.after_outbox_commit")
        log.info(
            "job %d: study %s: %d finding(s), SR %s queued for %d destination(s), $%.4f",
            job.id,
            study,
            len(findings.findings),
            sr.SOPInstanceUID,
            len(destinations),
            cost,
        )
        t_committed = clock()
        log.info(
            "job %d timings: prepare %.0f ms, model %.0f ms, report %.0f ms, commit %.0f ms",
            job.id,
            (t_prepared - t0) * 1000,
            (t_model - t_prepared) * 1000,
            (t_report - t_model) * 1000,
            (t_committed - t_report) * 1000,
        )

    def _vision_failed(
        self, holder: dict[str, queue.ClaimedJob], exc: VisionError, vision: VisionClient
    ) -> None:
        """No findings: record the calls; a provider whose circuit is open only postpones the
        study (no attempt spent, the cause kept), others retry or fail as the error says."""
        job = holder["job"]
        with transaction(self.sessions) as session:
            record_api_calls(session, getattr(exc, "calls", []), self.clock(), job.id)
            if isinstance(exc, CircuitOpen):
                until = self.clock() + dt.timedelta(seconds=vision.settings.circuit_cooldown_seconds)
                queue.postpone(session, job, until, str(exc)[:2000], self.clock())
                log.warning("job %d: %s; postponed, no attempt spent", job.id, exc)
                return
            state = queue.fail(
                session, job, str(exc)[:2000], self.clock(), retryable=not isinstance(exc, VisionPermanent)
            )
        log.warning("job %d: %s (%s)", job.id, exc, state)

    def _summary(
        self,
        findings: Findings,
        composed: list[ComposedImage],
        analysed: dict[str, Dataset],
        version: int,
        simulated: bool,
        job: queue.ClaimedJob,
    ) -> tuple[str, str] | None:
        """The Secondary Capture summary, written under a name this lease owns: (path, SOP
        Instance UID). A summary that cannot be made is logged and left out; the SR goes on."""
        try:
            image = build_summary(
                findings, composed, next(iter(analysed.values())), self._uids(), version, simulated
            )
            buffer = DicomBytesIO()
            image.save_as(buffer, enforce_file_format=True)
        except Exception:
            log.exception(
                "job %d: no summary image for study %s; the SR goes without it",
                job.id,
                job.study_instance_uid,
            )
            return None
        relative = f"summary/{job.study_instance_uid}/{image.SOPInstanceUID}.{job.lease_token[:8]}.dcm"
        self.store.write_atomically(relative, buffer.getvalue())
        return relative, str(image.SOPInstanceUID)

    def _regions_outputs(
        self,
        findings: Findings,
        composed: list[ComposedImage],
        sources: dict[str, Dataset],
        context: ReportContext,
        job: queue.ClaimedJob,
        wanted: set[str],
    ) -> dict[str, tuple[str, str]]:
        """The Key Object Selection ("kos") and the presentation state ("gsps"), each only when
        some destination wants it and a finding has a region, written under names this lease
        owns: kind -> (path, SOP Instance UID). One that cannot be made is logged and left out."""
        made: dict[str, tuple[str, str]] = {}
        if not wanted & {"kos", "gsps"}:
            return made
        placed = place_findings(findings, composed)
        windows = {
            t.sop_instance_uid: (t.window.center, t.window.width) for image in composed for t in image.tiles
        }
        builders: dict[str, Callable[[], Dataset | None]] = {
            "kos": lambda: build_key_images(
                placed,
                sources,
                self._uids(),
                context.study_version,
                context.model,
                context.prompt_version,
                context.simulated,
            ),
            "gsps": lambda: build_presentation_state(
                placed,
                sources,
                windows,
                self._uids(),
                context.study_version,
                context.model,
                context.prompt_version,
                context.simulated,
            ),
        }
        for kind in sorted(wanted & builders.keys()):
            try:
                built = builders[kind]()
                if built is None:
                    continue  # no region: nothing to flag or draw
                buffer = DicomBytesIO()
                built.save_as(buffer, enforce_file_format=True)
            except Exception:
                log.exception(
                    "job %d: no %s for study %s; the SR goes without it", job.id, kind, job.study_instance_uid
                )
                continue
            relative = f"{kind}/{job.study_instance_uid}/{built.SOPInstanceUID}.{job.lease_token[:8]}.dcm"
            self.store.write_atomically(relative, buffer.getvalue())
            made[kind] = (relative, str(built.SOPInstanceUID))
        return made

    def _uids(self) -> UidMaker:
        """This installation's UID maker (its namespace read once from the database)."""
        if self._uid_maker is None:
            with self.sessions() as session:
                namespace = installation_namespace(session)
            self._uid_maker = UidMaker(namespace, self.settings.node.uid_root)
        return self._uid_maker

    def _headers(self, study: str, sop_uids: set[str] | None) -> dict[str, Dataset]:
        """The stored headers (no pixels) of ``sop_uids`` (None: every instance of the study)."""
        with self.sessions() as session:
            rows = session.execute(
                select(Instance.sop_instance_uid, Instance.path).where(Instance.study_instance_uid == study)
            ).all()
        return {
            uid: dcmread(self.store.root / path, stop_before_pixels=True)
            for uid, path in rows
            if sop_uids is None or uid in sop_uids
        }

    def _predecessor(self, study: str) -> Dataset | None:
        """The study's previous SR (not its summary image, queued in the same outbox)."""
        with self.sessions() as session:
            previous = session.scalar(
                select(Outbox.sr_path)
                .where(Outbox.study_instance_uid == study)
                .where(Outbox.sr_path.like("sr/%"))
                .order_by(Outbox.id.desc())
                .limit(1)
            )
        path = self.store.root / previous if previous else None
        return dcmread(path) if path is not None and Path(path).exists() else None
