"""Scheduled dataset synthesis: schedules and their run records in an object store, and the scheduler loop.

Layout under the state URI:
  schedules/<name>.json          the Schedule
  runs/<name>/<slot>.json        one RunRecord per slot, created with put_if_absent: the claim on that slot

A slot is claimed (record created) before anything is submitted, and the submission id is derived from the
schedule and the slot, so a crash at any point followed by a restart neither loses a run nor submits one twice:
a scheduler starts from the records it finds, and a repeated submission of the same id counts as done.
"""
from __future__ import annotations

import json
import logging
import os
import threading
from datetime import datetime, timezone
from pathlib import PurePosixPath
from dataclasses import dataclass, field
from typing import Callable, Iterator, Protocol

import yaml

from schemas.errors import UserError
from schemas.job import JobSpec
from schemas.schedule import RunRecord, Schedule, render_template, template_fields
from storage import NotFound, open_store, read_uri
from storage.base import Store

logger = logging.getLogger(__name__)

DEFAULT_STATE_URI = "./.pangudraw/schedules"
# How many coming slots `add` renders to check that every run gets its own output.
_DISTINCT_OUTPUT_CHECK = 4
# Submitted runs, newest first, that a starting scheduler asks about before it submits more (overlap policy).
_RECENT_RUNS_CHECKED = 5


class Submitter(Protocol):
    """Where scheduled runs go (Ray Jobs in production, a fake in tests)."""

    def submit(self, spec: JobSpec, submission_id: str) -> str:
        """Submit and return the id; a submission id that already exists counts as success."""

    def is_running(self, submission_id: str) -> bool:
        """True while the run has not reached a final state."""


def utc_now() -> datetime:
    return datetime.now(timezone.utc)


def state_uri_from_env() -> str:
    return os.environ.get("PANGUDRAW_SCHEDULE_STATE", DEFAULT_STATE_URI)


def load_job_spec(ref: str) -> JobSpec:
    """A job spec from a local path or from a URI of any store (`s3://bucket/specs/daily.yaml`)."""
    if "://" not in ref:
        return JobSpec.from_file(ref)
    try:
        text = read_uri(ref).decode("utf-8")
    except NotFound:
        raise UserError(f"job spec {ref} does not exist") from None
    try:
        data = json.loads(text) if ref.lower().endswith(".json") else yaml.safe_load(text)
    except (json.JSONDecodeError, yaml.YAMLError) as exc:
        raise UserError(f"job spec {ref} is not valid YAML or JSON: {exc}") from None
    if not isinstance(data, dict):
        raise UserError(f"job spec {ref}: expected a mapping of fields at the top level")
    return JobSpec.from_dict(data, source=ref)


def scheduled_spec(schedule: Schedule, slot_time: datetime, template: JobSpec | None = None) -> JobSpec:
    """The job spec of one run: manifest and output filled in from the slot, job id = submission id."""
    template = template or schedule.job or load_job_spec(schedule.spec)
    local = slot_time.astimezone(schedule.zone)
    output = schedule.output or template.output
    data = template.model_dump(mode="json", context={"reveal_secrets": True})
    data.update(
        manifest=render_template(template.manifest, local),
        output=render_template(output, local),
        job_id=schedule.submission_id(slot_time),
    )
    return JobSpec.model_validate(data)


class ScheduleBook:
    """Schedules and their run records in the state store."""

    def __init__(self, store: Store | str | None = None):
        self.store = store if isinstance(store, Store) else open_store(store or state_uri_from_env())

    # -- schedules -----------------------------------------------------------------------------------------
    def add(self, schedule: Schedule, now: datetime | None = None, replace: bool = False) -> Schedule:
        """Store a new schedule; runs start with the first slot after `now`. UserError if the name is taken."""
        now = now or utc_now()
        if schedule.spec is not None and "://" not in schedule.spec:
            # The scheduler may run from another directory.
            schedule = schedule.model_copy(update={"spec": os.path.abspath(schedule.spec)})
        template = schedule.job or load_job_spec(schedule.spec)
        self._check_outputs_differ(schedule, template, now)
        existing = self.get(schedule.name, missing_ok=True)
        # Keep the original start on replace, so a changed definition does not reopen or drop slots.
        created_at = existing.created_at if (existing and replace) else now
        schedule = schedule.model_copy(update={"created_at": created_at})
        data = self._dump(schedule)
        if replace:
            self.store.put(self._schedule_key(schedule.name), data)
        elif not self.store.put_if_absent(self._schedule_key(schedule.name), data):
            raise UserError(f"schedule {schedule.name!r} already exists; remove it first or replace it")
        logger.info("schedule %s: %s (%s), next run %s", schedule.name, schedule.cron, schedule.timezone,
                    schedule.next_slots(now, 1)[0].isoformat())
        return schedule

    def get(self, name: str, missing_ok: bool = False) -> Schedule | None:
        try:
            data = self.store.get(self._schedule_key(name))
        except NotFound:
            if missing_ok:
                return None
            raise UserError(f"no schedule named {name!r}") from None
        return Schedule.model_validate_json(data)

    def list(self) -> list[Schedule]:
        schedules = []
        for key in self.store.list("schedules/"):
            if key.endswith(".json"):
                try:
                    schedules.append(Schedule.model_validate_json(self.store.get(key)))
                except NotFound:
                    continue  # removed between list and get
        return schedules

    def remove(self, name: str) -> None:
        """Remove the schedule. Its run records stay, so the same name added again never reuses a slot's id."""
        if not self.store.exists(self._schedule_key(name)):
            raise UserError(f"no schedule named {name!r}")
        self.store.delete(self._schedule_key(name))

    # -- run records ---------------------------------------------------------------------------------------
    def claim(self, record: RunRecord) -> bool:
        """Create the record of a slot; False if the slot was already claimed."""
        return self.store.put_if_absent(self._run_key(record.schedule, record.slot), self._dump(record))

    def update(self, record: RunRecord) -> None:
        self.store.put(self._run_key(record.schedule, record.slot), self._dump(record))

    def record(self, name: str, slot: str) -> RunRecord | None:
        try:
            return RunRecord.model_validate_json(self.store.get(self._run_key(name, slot)))
        except NotFound:
            return None

    def records(self, name: str) -> list[RunRecord]:
        """Every run record of a schedule, oldest slot first."""
        records = []
        for key in self.store.list(f"runs/{name}/"):
            record = self.record(name, PurePosixPath(key).stem)
            if record is not None:
                records.append(record)
        return sorted(records, key=lambda r: r.slot_time)

    def _check_outputs_differ(self, schedule: Schedule, template: JobSpec, now: datetime) -> None:
        output = schedule.output or template.output
        template_fields(output)
        template_fields(template.manifest)
        slots = schedule.next_slots(now, _DISTINCT_OUTPUT_CHECK)
        rendered = [render_template(output, slot.astimezone(schedule.zone)) for slot in slots]
        if len(set(rendered)) < len(rendered):
            raise UserError(
                f"schedule {schedule.name!r}: output {output!r} is the same for different runs "
                f"({slots[0].isoformat()} and {slots[1].isoformat()} both write {rendered[0]}); "
                "put {date}, {time} or {slot} in it (for example --output 's3://bucket/daily/{date}')"
            )

    @staticmethod
    def _schedule_key(name: str) -> str:
        return f"schedules/{name}.json"

    @staticmethod
    def _run_key(name: str, slot: str) -> str:
        return f"runs/{name}/{slot}.json"

    @staticmethod
    def _dump(model) -> bytes:
        return model.model_dump_json(indent=2).encode()


@dataclass
class _Cursor:
    """Where one schedule stands, kept in memory and rebuilt from the run records when a scheduler starts."""

    last_slot_time: datetime
    open_slots: list[str] = field(default_factory=list)  # slots whose record is not final, oldest first
    active: list[str] = field(default_factory=list)  # submission ids that may still be running

    @classmethod
    def from_records(cls, schedule: Schedule, records: list[RunRecord], now: datetime) -> "_Cursor":
        scheduled = [r for r in records if not r.manual]
        submitted = [r.submission_id for r in records if r.state in ("submitting", "submitted")]
        return cls(
            last_slot_time=max((r.slot_time for r in scheduled), default=schedule.created_at or now),
            open_slots=[r.slot for r in scheduled if not r.final],
            active=submitted[-_RECENT_RUNS_CHECKED:],
        )


class Scheduler:
    """Submits every due run of every schedule once. Call `tick()` periodically; `run_forever()` does that."""

    def __init__(
        self,
        submitter: Submitter,
        book: ScheduleBook | None = None,
        clock: Callable[[], datetime] = utc_now,
    ):
        self.submitter = submitter
        self.book = book or ScheduleBook()
        self.clock = clock
        self._cursors: dict[str, _Cursor] = {}

    def tick(self) -> list[RunRecord]:
        """Decide and submit what is due now; returns the records this tick created or changed."""
        now = self.clock()
        changed: list[RunRecord] = []
        schedules = self.book.list()
        for name in set(self._cursors) - {s.name for s in schedules}:
            del self._cursors[name]  # removed; re-added later, it starts again from its records
        for schedule in schedules:
            try:
                changed.extend(self._tick_schedule(schedule, now))
            except UserError as exc:
                # A broken spec must not stop the other schedules; it is tried again on the next tick.
                logger.error("schedule %s: %s", schedule.name, exc)
        return changed

    def run_now(self, name: str) -> RunRecord:
        """Submit one run of a schedule at once, outside its cron slots and its overlap policy."""
        schedule = self.book.get(name)
        now = self.clock()
        slot = f"{schedule.slot_id(now)}-now"
        record = RunRecord(
            schedule=name, slot=slot, slot_time=now, submission_id=f"{schedule.name}-{slot}", state="submitting",
            manual=True, updated_at=now,
        )
        if not self.book.claim(record):
            record = self.book.record(name, slot)
            if record.final:
                return record
        record = self._submit(schedule, record, now)
        if record.state == "submitted" and name in self._cursors:
            self._cursors[name].active.append(record.submission_id)
        return record

    def run_forever(self, interval_s: float = 30.0, stop: threading.Event | None = None) -> None:
        """Tick every `interval_s` seconds until `stop` is set (or the process is interrupted)."""
        stop = stop or threading.Event()
        logger.info("scheduler running on %s, ticking every %gs", self.book.store.root_uri, interval_s)
        while not stop.is_set():
            try:
                self.tick()
            except Exception:  # noqa: BLE001 - a storage or cluster hiccup must not end a long-running scheduler
                logger.exception("scheduler tick failed; trying again in %gs", interval_s)
            stop.wait(interval_s)

    # -- one schedule ----------------------------------------------------------------------------------------
    def _cursor(self, schedule: Schedule, now: datetime) -> _Cursor:
        if schedule.name not in self._cursors:
            self._cursors[schedule.name] = _Cursor.from_records(schedule, self.book.records(schedule.name), now)
        return self._cursors[schedule.name]

    def _tick_schedule(self, schedule: Schedule, now: datetime) -> list[RunRecord]:
        cursor = self._cursor(schedule, now)
        changed: list[RunRecord] = []
        for record, claimed in self._claim_due(schedule, cursor, now):
            cursor.last_slot_time = max(cursor.last_slot_time, record.slot_time)
            if not record.final and record.slot not in cursor.open_slots:
                cursor.open_slots.append(record.slot)
            if claimed:
                changed.append(record)

        cursor.active = [sid for sid in cursor.active if self.submitter.is_running(sid)]
        for slot in list(cursor.open_slots):
            record = self.book.record(schedule.name, slot)
            if record is None or record.final:
                cursor.open_slots.remove(slot)
                continue
            before = record.state
            record = self._advance(schedule, record, cursor, now)
            if record.state != before:
                changed.append(record)
            if record.state == "pending":
                break  # queued behind a running run; later slots wait their turn
            if record.final:
                cursor.open_slots.remove(slot)
            if record.state == "submitted":
                cursor.active.append(record.submission_id)
            if record.state == "submitting":
                break  # the cluster refused it; keep the order and try again on the next tick
        return changed

    def _claim_due(self, schedule: Schedule, cursor: _Cursor, now: datetime) -> Iterator[tuple[RunRecord, bool]]:
        keep = 1 + (schedule.max_catch_up if schedule.missed == "catch_up" else 0)
        slots, older = schedule.latest_slots(cursor.last_slot_time, now, keep)
        if not slots:
            return
        missed = len(slots) - 1 if schedule.missed == "skip" else 0
        if older:
            missed += schedule.count_slots(cursor.last_slot_time, slots[0])
        if schedule.missed == "skip":
            slots = slots[-1:]
        if missed:
            logger.warning(
                "schedule %s: %d run(s) due while no scheduler ran are dropped (missed=%s, max_catch_up=%d); "
                "running %d", schedule.name, missed, schedule.missed, schedule.max_catch_up, len(slots),
            )
        for slot_time in slots:
            record = RunRecord(
                schedule=schedule.name, slot=schedule.slot_id(slot_time), slot_time=slot_time,
                submission_id=schedule.submission_id(slot_time), state="pending",
                missed_before=missed if slot_time == slots[0] else 0, updated_at=now,
            )
            if self.book.claim(record):
                yield record, True
            else:
                # Claimed before a restart (or by another scheduler): go on from what the record says.
                yield self.book.record(schedule.name, record.slot) or record, False

    def _advance(self, schedule: Schedule, record: RunRecord, cursor: _Cursor, now: datetime) -> RunRecord:
        if record.state == "pending":
            running = [sid for sid in cursor.active if sid != record.submission_id]
            if running and schedule.overlap == "skip":
                record = record.model_copy(update={
                    "state": "skipped", "reason": f"overlap: {running[0]} still running", "updated_at": now,
                })
                self.book.update(record)
                logger.info("schedule %s: skipped %s, %s is still running", schedule.name, record.slot, running[0])
                return record
            if running:
                logger.info("schedule %s: %s queued behind %s", schedule.name, record.slot, running[0])
                return record
            # Commit the decision before submitting: after a crash a `submitting` record is submitted again.
            record = record.model_copy(update={"state": "submitting", "updated_at": now})
            self.book.update(record)
        return self._submit(schedule, record, now)

    def _submit(self, schedule: Schedule, record: RunRecord, now: datetime) -> RunRecord:
        spec = scheduled_spec(schedule, record.slot_time)
        try:
            self.submitter.submit(spec, record.submission_id)
        except UserError:
            raise
        except Exception:  # noqa: BLE001 - the cluster may be down; the record stays `submitting` and is retried
            logger.exception("schedule %s: submitting %s failed; trying again on the next tick",
                             schedule.name, record.submission_id)
            return record
        record = record.model_copy(update={"state": "submitted", "output": spec.output, "updated_at": now})
        self.book.update(record)
        logger.info("schedule %s: submitted %s -> %s", schedule.name, record.submission_id, spec.output)
        return record
