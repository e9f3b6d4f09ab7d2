"""Schedules for recurring dataset synthesis, and the records that make each scheduled run happen once."""
from __future__ import annotations

import re
import string
from datetime import datetime, timedelta, timezone
from typing import Literal
from zoneinfo import ZoneInfo, ZoneInfoNotFoundError

from croniter import croniter
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from schemas.errors import UserError
from schemas.job import JobSpec, describe_validation_error

__all__ = [
    "RunRecord", "Schedule", "SLOT_FORMAT", "TEMPLATE_FIELDS", "render_template", "template_fields",
]

# A slot's id is its wall-clock minute in the schedule's time zone: what the cron expression names.
SLOT_FORMAT = "%Y%m%dT%H%M"
TEMPLATE_FIELDS = ("date", "time", "slot")
_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9_-]{0,63}")


def template_fields(template: str) -> set[str]:
    """The `{field}` names used in `template`; UserError for malformed braces or fields we do not fill."""
    try:
        names = {field for _, field, _, _ in string.Formatter().parse(template) if field is not None}
    except ValueError as exc:
        raise UserError(f"template {template!r}: {exc}") from None
    unknown = sorted(names - set(TEMPLATE_FIELDS))
    if unknown:
        raise UserError(f"template {template!r} uses {unknown}; only {{date}}, {{time}} and {{slot}} are filled in")
    return names


def render_template(template: str, slot_time: datetime) -> str:
    """Fill `{date}` (YYYY-mm-dd), `{time}` (HHMM) and `{slot}` (YYYYmmddTHHMM) from a slot's local time."""
    template_fields(template)
    return template.format(
        date=slot_time.strftime("%Y-%m-%d"), time=slot_time.strftime("%H%M"), slot=slot_time.strftime(SLOT_FORMAT)
    )


class Schedule(BaseModel):
    """A job that runs at every time its cron expression names.

    `spec` (a path or URI read at each run, so edits take effect) or `job` (an inline spec) says what runs.
    `output` overrides the spec's output; the output and the manifest may use `{date}`, `{time}` and `{slot}`.
    `overlap`: what a due run does while an earlier run of this schedule is still going: `skip` it, or
    `queue` it until that run ends. `missed`: runs that fell due while no scheduler was running are skipped
    (only the latest due run is submitted) or caught up, at most `max_catch_up` of them, newest first.
    """

    model_config = ConfigDict(extra="forbid")

    name: str
    cron: str
    spec: str | None = None
    job: JobSpec | None = None
    output: str | None = None
    timezone: str = "UTC"
    overlap: Literal["skip", "queue"] = "skip"
    missed: Literal["skip", "catch_up"] = "skip"
    max_catch_up: int = Field(3, ge=0, le=1000)
    created_at: datetime | None = None

    @field_validator("name")
    @classmethod
    def _check_name(cls, value: str) -> str:
        if not _NAME.fullmatch(value):
            raise ValueError("expected 1-64 of A-Z a-z 0-9 _ - starting with a letter or digit")
        return value

    @field_validator("cron")
    @classmethod
    def _check_cron(cls, value: str) -> str:
        value = " ".join(value.split())
        # Five fields (minute hour day month weekday) or an @-alias; second-level cron is not a batch schedule.
        if not croniter.is_valid(value) or (not value.startswith("@") and len(value.split()) != 5):
            raise ValueError("expected a five-field cron expression such as '0 2 * * *' (minute hour day month weekday)")
        return value

    @field_validator("timezone")
    @classmethod
    def _check_timezone(cls, value: str) -> str:
        try:
            ZoneInfo(value)
        except (ZoneInfoNotFoundError, ValueError):
            raise ValueError("expected an IANA time zone such as 'UTC' or 'Asia/Shanghai'") from None
        return value

    @field_validator("created_at")
    @classmethod
    def _aware(cls, value: datetime | None) -> datetime | None:
        if value is not None and value.tzinfo is None:
            raise ValueError("expected a time with a time zone")
        return value

    @model_validator(mode="after")
    def _check_what_runs(self) -> "Schedule":
        if (self.spec is None) == (self.job is None):
            raise ValueError("give exactly one of 'spec' (a job spec path or URI) and 'job' (an inline job spec)")
        for template in (self.output, self.job.output if self.job else None, self.job.manifest if self.job else None):
            if template is not None:
                template_fields(template)
        return self

    @classmethod
    def from_dict(cls, data: dict, source: str = "schedule") -> "Schedule":
        try:
            return cls.model_validate(data)
        except ValidationError as exc:
            raise UserError(f"{source}: " + describe_validation_error(exc)) from None

    @property
    def zone(self) -> ZoneInfo:
        return ZoneInfo(self.timezone)

    def slot_id(self, slot_time: datetime) -> str:
        return slot_time.astimezone(self.zone).strftime(SLOT_FORMAT)

    def submission_id(self, slot_time: datetime) -> str:
        """The Ray submission id of this schedule's run at `slot_time`: `<name>-<YYYYmmddTHHMM>`."""
        return f"{self.name}-{self.slot_id(slot_time)}"

    def latest_slots(self, after: datetime, until: datetime, limit: int) -> tuple[list[datetime], bool]:
        """Up to `limit` of the latest slots in (after, until], oldest first, and whether older ones were left out."""
        if limit < 1:
            raise ValueError("limit must be at least 1")
        start = until.astimezone(timezone.utc).replace(second=0, microsecond=0) + timedelta(minutes=1)
        # get_prev is strictly before its start; starting at the next minute includes a slot at `until`'s minute.
        cron = croniter(self.cron, start.astimezone(self.zone))
        slots: list[datetime] = []
        while True:
            slot = cron.get_prev(datetime)
            if slot <= after:
                return slots[::-1], False
            if len(slots) == limit:
                return slots[::-1], True
            slots.append(slot)

    def count_slots(self, after: datetime, before: datetime, cap: int = 10_000) -> int:
        """Slots in (after, before), counted up to `cap`."""
        cron = croniter(self.cron, after.astimezone(self.zone))
        count = 0
        while count < cap and cron.get_next(datetime) < before:
            count += 1
        return count

    def next_slots(self, after: datetime, count: int) -> list[datetime]:
        cron = croniter(self.cron, after.astimezone(self.zone))
        return [cron.get_next(datetime) for _ in range(count)]


RunState = Literal["pending", "submitting", "submitted", "skipped"]


class RunRecord(BaseModel):
    """The decision for one slot of one schedule, created once (create-only) and then moved forward.

    `pending` waits for an earlier run to end (overlap `queue`); `submitting` is decided and is submitted again
    after a crash (the submission id makes that harmless); `submitted` and `skipped` are final.
    """

    model_config = ConfigDict(extra="forbid")

    schedule: str
    slot: str
    slot_time: datetime
    submission_id: str
    state: RunState
    reason: str | None = None
    manual: bool = False
    output: str | None = None
    missed_before: int = Field(0, ge=0, description="due slots before this one that the missed policy dropped "
                               "(counted up to 10000)")
    updated_at: datetime

    @property
    def final(self) -> bool:
        return self.state in ("submitted", "skipped")

