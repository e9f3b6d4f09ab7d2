"""Jobs on a Ray cluster through Ray's Job Submission API, and their progress read from their own output.

A submitted job carries the project as its working directory and its spec in an environment variable; the
entrypoint writes the spec to a file and runs the job driver on it. Progress comes from the result shards
under the job's output, so it can be read while the job runs, after its driver died, or with no cluster at all.
"""
from __future__ import annotations

import json
import logging
import math
import os
import re
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from pydantic import BaseModel

from schemas.errors import UserError
from schemas.job import JobSpec
from storage import NotFound, open_store

logger = logging.getLogger(__name__)

PROJECT_ROOT = Path(__file__).resolve().parent.parent
DEFAULT_ADDRESS = "http://127.0.0.1:8265"
DRIVER_COMMAND = "python -m jobs.run_job"
# Left out of the uploaded working directory: environments, outputs and caches are large and machine-specific.
WORKING_DIR_EXCLUDES = [
    ".venv", ".git", "outputs", ".pangudraw", "__pycache__", "*.pyc", ".pytest_cache", "*.egg-info", "benchmarks/out",
]
SPEC_ENV_VAR = "PANGUDRAW_JOB_SPEC"
# Metadata keys on the Ray job; Ray keeps metadata as strings.
META_JOB_ID = "pangudraw_job_id"
META_OUTPUT = "pangudraw_output"
_URI_SCHEME = re.compile(r"^[A-Za-z][A-Za-z0-9+.-]*://")


class SubmissionExists(UserError):
    """A job with this submission id already exists on the cluster."""


class Submitted(BaseModel):
    submission_id: str
    job_id: str
    output: str


class OutputProgress(BaseModel):
    """How far a job's output has come, from its result shards (one result row per image)."""

    output: str
    total_rows: int | None = None
    rows_done: int = 0
    ok: int = 0
    invalid: int = 0
    failed: int = 0
    shards: int = 0
    started_at: datetime | None = None
    last_finished_at: datetime | None = None
    images_per_second: float | None = None
    seconds_left: float | None = None
    finished: bool = False
    summary: dict[str, Any] | None = None


class JobStatus(BaseModel):
    submission_id: str
    ray_status: str
    message: str | None = None
    entrypoint: str | None = None
    metadata: dict[str, str] = {}
    progress: OutputProgress | None = None


# -- connecting ---------------------------------------------------------------------------------------------
def resolve_address(address: str | None) -> str:
    """The dashboard URL: the argument, else RAY_API_SERVER_ADDRESS, else RAY_ADDRESS when it is http(s)."""
    address = address or os.environ.get("RAY_API_SERVER_ADDRESS")
    if not address and os.environ.get("RAY_ADDRESS", "").startswith(("http://", "https://")):
        address = os.environ["RAY_ADDRESS"]
    address = address or DEFAULT_ADDRESS
    return address if "://" in address else f"http://{address}"


def auth_token(token: str | None = None) -> str | None:
    """The cluster token: the argument, RAY_AUTH_TOKEN, the file at RAY_AUTH_TOKEN_PATH, or ~/.ray/auth_token.

    Ray 2.60 clusters require it by default; it is sent as a bearer token on every request.
    """
    if token:
        return token.strip()
    if os.environ.get("RAY_AUTH_TOKEN"):
        return os.environ["RAY_AUTH_TOKEN"].strip()
    path = Path(os.environ.get("RAY_AUTH_TOKEN_PATH") or Path.home() / ".ray" / "auth_token").expanduser()
    try:
        return path.read_text().strip() or None
    except OSError:
        return None


def connect(address: str | None = None, token: str | None = None):
    """A `ray.job_submission.JobSubmissionClient` for the cluster's dashboard; UserError when unreachable."""
    from ray.exceptions import AuthenticationError
    from ray.job_submission import JobSubmissionClient

    url = resolve_address(address)
    token = auth_token(token)
    headers = {"Authorization": f"Bearer {token}"} if token else None
    try:
        return JobSubmissionClient(url, headers=headers)
    except AuthenticationError as exc:
        raise UserError(
            f"the Ray cluster at {url} refused the request ({exc.message}); give the cluster's token in "
            "RAY_AUTH_TOKEN, RAY_AUTH_TOKEN_PATH or ~/.ray/auth_token"
        ) from None
    except ConnectionError as exc:
        raise UserError(f"cannot reach the Ray dashboard at {url}: {exc}") from None


def _job_call(what: str, submission_id: str, call):
    try:
        return call()
    except RuntimeError as exc:
        text = str(exc)
        if "404" in text or "does not exist" in text:
            raise UserError(f"no job {submission_id!r} on the cluster") from None
        raise RuntimeError(f"{what} {submission_id}: {text}") from None


# -- submitting ---------------------------------------------------------------------------------------------
def _absolute_if_local(value: str | None) -> str | None:
    if value is None or _URI_SCHEME.match(value):
        return value
    return os.path.abspath(os.path.expanduser(value))


def entrypoint_command(driver: str = DRIVER_COMMAND) -> str:
    """Shell command that writes the spec from the environment to a file and runs `driver SPEC_FILE`."""
    return (
        f'spec=$(mktemp "${{TMPDIR:-/tmp}}/pangudraw-spec-XXXXXX") && '
        f'printf "%s" "${SPEC_ENV_VAR}" > "$spec" && exec {driver} "$spec"'
    )


def default_submission_id(spec: JobSpec, now: datetime | None = None) -> str:
    """`<job_id>-<UTC time>`: each submission of a job gets its own id; they share the output and resume it."""
    now = now or datetime.now(timezone.utc)
    return f"{spec.job_id}-{now.astimezone(timezone.utc):%Y%m%dT%H%M%S}"


def submit_spec(
    spec: JobSpec,
    address: str | None = None,
    submission_id: str | None = None,
    *,
    driver: str = DRIVER_COMMAND,
    working_dir: str | Path = PROJECT_ROOT,
    excludes: list[str] | None = None,
    token: str | None = None,
    client=None,
) -> Submitted:
    """Submit one job. An output that already has results is resumed by the driver, not started over."""
    # The driver's working directory is a copy of the project on the cluster: relative paths would land there.
    spec = spec.model_copy(update={
        "manifest": _absolute_if_local(spec.manifest),
        "output": _absolute_if_local(spec.output),
        "model": _absolute_if_local(spec.model),
    })
    if any(getattr(spec.s3, name) is not None for name in ("access_key_id", "secret_access_key", "session_token")):
        logger.warning("S3 credentials in the spec are not sent to the cluster; its nodes use their own "
                       "AWS_* environment")
    submission_id = submission_id or default_submission_id(spec)
    client = client or connect(address, token)
    runtime_env = {
        "working_dir": str(working_dir),
        "excludes": list(WORKING_DIR_EXCLUDES if excludes is None else excludes),
        "env_vars": {SPEC_ENV_VAR: json.dumps(spec.job_json(), separators=(",", ":"))},
    }
    try:
        client.submit_job(
            entrypoint=entrypoint_command(driver),
            submission_id=submission_id,
            runtime_env=runtime_env,
            metadata={META_JOB_ID: spec.job_id, META_OUTPUT: spec.output},
        )
    except RuntimeError as exc:
        if "already exists" in str(exc):
            raise SubmissionExists(f"a job with submission id {submission_id!r} already exists on the cluster") \
                from None
        raise
    logger.info("submitted %s (job %s, output %s)", submission_id, spec.job_id, spec.output)
    return Submitted(submission_id=submission_id, job_id=spec.job_id, output=spec.output)


def submit(spec_file: str | Path, address: str | None = None, submission_id: str | None = None, **options) -> Submitted:
    """Submit the job spec in a YAML or JSON file (the same spec `pangudraw run` takes)."""
    return submit_spec(JobSpec.from_file(spec_file), address, submission_id, **options)


class RayJobsSubmitter:
    """The scheduler's submitter: Ray Jobs, with a repeated submission id counted as already submitted."""

    def __init__(self, address: str | None = None, token: str | None = None, **submit_options):
        self.address = address
        self.token = token
        self.submit_options = submit_options
        self._client = None

    def _connect(self):
        if self._client is None:
            self._client = connect(self.address, self.token)
        return self._client

    def submit(self, spec: JobSpec, submission_id: str) -> str:
        try:
            submit_spec(spec, submission_id=submission_id, client=self._connect(), **self.submit_options)
        except SubmissionExists:
            logger.info("%s was already submitted", submission_id)
        return submission_id

    def is_running(self, submission_id: str) -> bool:
        try:
            status = self._connect().get_job_status(submission_id)
        except RuntimeError as exc:
            if "404" in str(exc) or "does not exist" in str(exc):
                return False  # e.g. the cluster was replaced: nothing of ours runs under that id
            raise
        return not status.is_terminal()


# -- following ----------------------------------------------------------------------------------------------
def _parse_time(value: Any) -> datetime | None:
    if value is None:
        return None
    if isinstance(value, datetime):
        return value if value.tzinfo else value.replace(tzinfo=timezone.utc)
    try:
        parsed = datetime.fromisoformat(str(value).replace("Z", "+00:00"))
    except ValueError:
        return None
    return parsed if parsed.tzinfo else parsed.replace(tzinfo=timezone.utc)


def _read_json(store, key: str) -> dict | None:
    try:
        return json.loads(store.get(key))
    except NotFound:
        return None
    except json.JSONDecodeError:
        logger.warning("%s is not valid JSON", store.uri_for(key))
        return None


def progress_from_output(
    output: str, started_at: datetime | None = None, now: datetime | None = None, s3=None,
) -> OutputProgress:
    """Rows done, failed and invalid, images/s and time left, from `results/part-*.parquet` under `output`.

    A row retried by a later run counts once, with its latest result. Images/s counts the images finished since
    `started_at` (this run), else since the first result. Time left needs `total_rows` in job.json.
    """
    store = open_store(output, s3)
    job = _read_json(store, "job.json") or {}
    summary = _read_json(store, "_SUCCESS.json")
    latest: dict[tuple[str, int], tuple[datetime | None, str, datetime | None]] = {}
    shards = [key for key in store.list("results/") if key.endswith(".parquet")]
    for key in shards:
        table = store.read_parquet(key)
        columns = [c for c in ("row_id", "image_index", "status", "started_at", "finished_at") if c in table.column_names]
        for row in table.select(columns).to_pylist():
            finished = _parse_time(row.get("finished_at"))
            ident = (str(row["row_id"]), int(row.get("image_index") or 0))
            previous = latest.get(ident)
            if previous is None or (finished is not None and (previous[0] is None or finished >= previous[0])):
                latest[ident] = (finished, row["status"], _parse_time(row.get("started_at")))

    counts = {"ok": 0, "invalid": 0, "failed": 0}
    row_status: dict[str, str] = {}
    for (row_id, _), (_, status, _) in latest.items():
        counts[status] = counts.get(status, 0) + 1
        # A row is done once every image of it has a result; a failed image makes the row failed.
        if row_status.get(row_id) != "failed":
            row_status[row_id] = status
    finished_times = [f for f, _, _ in latest.values() if f is not None]
    last_finished = max(finished_times, default=None)
    if started_at is None:
        started_at = _parse_time(job.get("started_at")) or min(
            (s for _, _, s in latest.values() if s is not None), default=None
        )
    images_per_second = None
    if started_at is not None and last_finished is not None and last_finished > started_at:
        recent_ok = sum(1 for f, status, _ in latest.values() if status == "ok" and f is not None and f >= started_at)
        images_per_second = recent_ok / (last_finished - started_at).total_seconds()

    total_rows = job.get("total_rows")
    rows_done = len(row_status)
    finished = summary is not None
    seconds_left = None
    if finished:
        seconds_left = 0.0
    elif total_rows is not None and started_at is not None and last_finished is not None:
        rows_this_run = len({row_id for (row_id, _), (f, _, _) in latest.items() if f is not None and f >= started_at})
        elapsed = ((now or last_finished) - started_at).total_seconds()
        if rows_this_run and elapsed > 0:
            seconds_left = max(total_rows - rows_done, 0) / (rows_this_run / elapsed)
    return OutputProgress(
        output=output, total_rows=total_rows, rows_done=rows_done, shards=len(shards),
        ok=counts["ok"], invalid=counts["invalid"], failed=counts["failed"],
        started_at=started_at, last_finished_at=last_finished,
        images_per_second=images_per_second if images_per_second is None or math.isfinite(images_per_second) else None,
        seconds_left=seconds_left, finished=finished, summary=summary,
    )


def status(submission_id: str, address: str | None = None, token: str | None = None, client=None) -> JobStatus:
    """The job's state on the cluster plus its progress from its output."""
    client = client or connect(address, token)
    info = _job_call("status of", submission_id, lambda: client.get_job_info(submission_id))
    metadata = dict(info.metadata or {})
    progress = None
    output = metadata.get(META_OUTPUT)
    if output:
        started = datetime.fromtimestamp(info.start_time / 1000, timezone.utc) if info.start_time else None
        ended = datetime.fromtimestamp(info.end_time / 1000, timezone.utc) if info.end_time else None
        now = ended or datetime.now(timezone.utc)
        progress = progress_from_output(output, started_at=started, now=now)
    return JobStatus(
        submission_id=submission_id, ray_status=str(info.status.value if hasattr(info.status, "value") else info.status),
        message=info.message, entrypoint=info.entrypoint, metadata=metadata, progress=progress,
    )


def logs(submission_id: str, address: str | None = None, token: str | None = None, client=None) -> str:
    client = client or connect(address, token)
    return _job_call("logs of", submission_id, lambda: client.get_job_logs(submission_id))


async def follow_logs(submission_id: str, address: str | None = None, token: str | None = None):
    """Yield chunks of the job's output as it appears, until the job ends."""
    client = connect(address, token)
    async for chunk in client.tail_job_logs(submission_id):
        yield chunk


def cancel(submission_id: str, address: str | None = None, token: str | None = None, client=None) -> bool:
    """Ask Ray to stop the job; False when it had already ended. Finished rows stay in the output."""
    client = client or connect(address, token)
    return bool(_job_call("cancelling", submission_id, lambda: client.stop_job(submission_id)))


def list_jobs(address: str | None = None, token: str | None = None, everything: bool = False, client=None) -> list:
    """Ray's JobDetails of the jobs this project submitted (all submission jobs with `everything`), newest first."""
    client = client or connect(address, token)
    jobs = [
        job for job in client.list_jobs()
        if job.submission_id and (everything or META_JOB_ID in (job.metadata or {}))
    ]
    return sorted(jobs, key=lambda job: job.start_time or 0, reverse=True)

