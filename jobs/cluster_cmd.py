"""Cluster subcommands: submit, status, logs, cancel, list (Ray Jobs); schedule and scheduler (recurring runs)."""
from __future__ import annotations

import argparse
import asyncio
import json
import signal
import threading
from datetime import datetime, timezone

from schemas.errors import UserError

ADDRESS_HELP = "Ray dashboard address, e.g. http://HEAD:8265 (default: $RAY_API_SERVER_ADDRESS or 127.0.0.1:8265)"
STATE_HELP = "where schedules and their run records live (default: $PANGUDRAW_SCHEDULE_STATE or ./.pangudraw/schedules)"


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("submit", help="submit a job spec to a Ray cluster and print its submission id")
    p.add_argument("spec", help="job spec file (YAML or JSON), the same as `run` takes")
    p.add_argument("--address", help=ADDRESS_HELP)
    p.add_argument("--id", dest="submission_id", help="submission id (default: <job_id>-<UTC time>)")
    p.set_defaults(func=cmd_submit)

    p = sub.add_parser("status", help="a submitted job's state, rows done and failed, images/s and time left")
    p.add_argument("submission_id", nargs="?", help="submission id (omit with --output)")
    p.add_argument("--address", help=ADDRESS_HELP)
    p.add_argument("--output", help="read progress straight from this output URI (no cluster needed)")
    p.add_argument("--json", action="store_true", help="print JSON")
    p.set_defaults(func=cmd_status)

    p = sub.add_parser("logs", help="a submitted job's driver output")
    p.add_argument("submission_id")
    p.add_argument("--address", help=ADDRESS_HELP)
    p.add_argument("-f", "--follow", action="store_true", help="keep printing until the job ends")
    p.set_defaults(func=cmd_logs)

    p = sub.add_parser("cancel", help="stop a submitted job (finished rows are kept; submit again to resume)")
    p.add_argument("submission_id")
    p.add_argument("--address", help=ADDRESS_HELP)
    p.set_defaults(func=cmd_cancel)

    p = sub.add_parser("list", help="jobs submitted to the cluster")
    p.add_argument("--address", help=ADDRESS_HELP)
    p.add_argument("--all", action="store_true", help="include jobs that are not PanGu-Draw jobs")
    p.set_defaults(func=cmd_list)

    schedule = sub.add_parser("schedule", help="recurring runs: add, list, remove, run-now")
    ssub = schedule.add_subparsers(dest="schedule_command", metavar="ACTION", required=True)
    p = ssub.add_parser("add", help="add a schedule")
    p.add_argument("name")
    p.add_argument("--cron", required=True, help="five-field cron expression, e.g. '0 2 * * *'")
    p.add_argument("--spec", required=True, help="job spec path or URI; read at each run")
    p.add_argument("--inline", action="store_true", help="store a copy of the spec now instead of its path")
    p.add_argument("--output", help="output URI template; {date}, {time} and {slot} are filled per run")
    p.add_argument("--timezone", default="UTC", help="IANA time zone of the cron expression (default UTC)")
    p.add_argument("--overlap", choices=["skip", "queue"], default="skip",
                   help="a run due while the previous one still runs: skip it or queue it (default skip)")
    p.add_argument("--missed", choices=["skip", "catch_up"], default="skip",
                   help="runs due while no scheduler ran: skip them or catch up (default skip)")
    p.add_argument("--max-catch-up", type=int, default=3, help="most missed runs caught up (default 3)")
    p.add_argument("--replace", action="store_true", help="replace a schedule of the same name")
    p.add_argument("--state", help=STATE_HELP)
    p.set_defaults(func=cmd_schedule_add)

    p = ssub.add_parser("list", help="schedules, their next run and their latest runs")
    p.add_argument("--state", help=STATE_HELP)
    p.add_argument("--json", action="store_true", help="print JSON")
    p.set_defaults(func=cmd_schedule_list)

    p = ssub.add_parser("remove", help="remove a schedule (its run records stay)")
    p.add_argument("name")
    p.add_argument("--state", help=STATE_HELP)
    p.set_defaults(func=cmd_schedule_remove)

    p = ssub.add_parser("run-now", help="submit one run of a schedule now")
    p.add_argument("name")
    p.add_argument("--address", help=ADDRESS_HELP)
    p.add_argument("--state", help=STATE_HELP)
    p.set_defaults(func=cmd_schedule_run_now)

    p = sub.add_parser("scheduler", help="submit scheduled runs as they fall due, until interrupted")
    p.add_argument("--address", help=ADDRESS_HELP)
    p.add_argument("--state", help=STATE_HELP)
    p.add_argument("--interval", type=float, default=30.0, help="seconds between checks (default 30)")
    p.add_argument("--once", action="store_true", help="check once and exit")
    p.set_defaults(func=cmd_scheduler)


# -- jobs -----------------------------------------------------------------------------------------------------
def cmd_submit(args: argparse.Namespace) -> int:
    from jobs.submission import submit

    submitted = submit(args.spec, args.address, args.submission_id)
    print(submitted.submission_id)
    print(f"output: {submitted.output}  (follow with: pangudraw status {submitted.submission_id})")
    return 0


def _format_seconds(seconds: float | None) -> str:
    if seconds is None:
        return "unknown"
    seconds = int(round(seconds))
    hours, rest = divmod(seconds, 3600)
    return f"{hours}h{rest // 60:02d}m{rest % 60:02d}s" if hours else f"{rest // 60}m{rest % 60:02d}s"


def _print_progress(progress) -> None:
    total = "?" if progress.total_rows is None else progress.total_rows
    print(f"output:   {progress.output}")
    print(f"rows:     {progress.rows_done}/{total} done")
    print(f"images:   {progress.ok} ok, {progress.failed} failed, {progress.invalid} invalid "
          f"({progress.shards} result shards)")
    rate = "unknown" if progress.images_per_second is None else f"{progress.images_per_second:.3f}"
    print(f"speed:    {rate} images/s")
    print(f"left:     {'finished' if progress.finished else _format_seconds(progress.seconds_left)}")
    summary = progress.summary or {}
    if summary.get("actors_per_stage"):
        expected = summary.get("expected_efficiency")
        tail = f", expected efficiency {expected:.2f}" if isinstance(expected, (int, float)) else ""
        print(f"actors:   {summary['actors_per_stage']}{tail}")


def cmd_status(args: argparse.Namespace) -> int:
    from jobs.submission import progress_from_output, status

    if args.output:
        progress = progress_from_output(args.output, now=datetime.now(timezone.utc))
        if args.json:
            print(progress.model_dump_json(indent=2))
        else:
            _print_progress(progress)
        return 0
    if not args.submission_id:
        raise UserError("give a submission id, or --output URI to read a job's output directly")
    job = status(args.submission_id, args.address)
    if args.json:
        print(job.model_dump_json(indent=2))
        return 0
    print(f"job:      {job.submission_id}  {job.ray_status}" + (f"  ({job.message})" if job.message else ""))
    if job.progress is not None:
        _print_progress(job.progress)
    return 0


def cmd_logs(args: argparse.Namespace) -> int:
    from jobs.submission import follow_logs, logs

    if not args.follow:
        print(logs(args.submission_id, args.address), end="")
        return 0

    async def follow() -> None:
        async for chunk in follow_logs(args.submission_id, args.address):
            print(chunk, end="", flush=True)

    asyncio.run(follow())
    return 0


def cmd_cancel(args: argparse.Namespace) -> int:
    from jobs.submission import cancel

    stopped = cancel(args.submission_id, args.address)
    print(f"{args.submission_id}: {'stopping' if stopped else 'had already ended'}")
    return 0


def cmd_list(args: argparse.Namespace) -> int:
    from jobs.submission import META_OUTPUT, list_jobs

    for job in list_jobs(args.address, everything=args.all):
        started = datetime.fromtimestamp(job.start_time / 1000, timezone.utc).strftime("%Y-%m-%d %H:%M:%SZ") \
            if job.start_time else "-"
        status = getattr(job.status, "value", job.status)
        print(f"{job.submission_id}\t{status}\t{started}\t{(job.metadata or {}).get(META_OUTPUT, '')}")
    return 0


# -- schedules ------------------------------------------------------------------------------------------------
def _book(args: argparse.Namespace):
    from jobs.schedules import ScheduleBook

    return ScheduleBook(args.state)


def cmd_schedule_add(args: argparse.Namespace) -> int:
    from jobs.schedules import load_job_spec
    from schemas.schedule import Schedule

    fields = dict(
        name=args.name, cron=args.cron, output=args.output, timezone=args.timezone, overlap=args.overlap,
        missed=args.missed, max_catch_up=args.max_catch_up,
    )
    if args.inline:
        fields["job"] = load_job_spec(args.spec).job_json()
    else:
        fields["spec"] = args.spec
    schedule = _book(args).add(Schedule.from_dict(fields, source=f"schedule {args.name}"), replace=args.replace)
    next_run = schedule.next_slots(datetime.now(timezone.utc), 1)[0]
    print(f"{schedule.name}: '{schedule.cron}' ({schedule.timezone}), next run {next_run.isoformat()} "
          f"as {schedule.submission_id(next_run)}")
    return 0


def cmd_schedule_list(args: argparse.Namespace) -> int:
    book = _book(args)
    now = datetime.now(timezone.utc)
    rows = []
    for schedule in book.list():
        records = book.records(schedule.name)
        rows.append({
            "name": schedule.name, "cron": schedule.cron, "timezone": schedule.timezone,
            "overlap": schedule.overlap, "missed": schedule.missed, "max_catch_up": schedule.max_catch_up,
            "spec": schedule.spec or "(inline)", "output": schedule.output,
            "next_run": schedule.next_slots(now, 1)[0].isoformat(),
            "latest_runs": [{"submission_id": r.submission_id, "state": r.state, "reason": r.reason}
                            for r in records[-3:]],
        })
    if args.json:
        print(json.dumps(rows, indent=2))
        return 0
    if not rows:
        print("no schedules")
    for row in rows:
        latest = ", ".join(f"{r['submission_id']} {r['state']}" for r in row["latest_runs"]) or "none yet"
        print(f"{row['name']}\t'{row['cron']}' {row['timezone']}\tnext {row['next_run']}\tlatest: {latest}")
    return 0


def cmd_schedule_remove(args: argparse.Namespace) -> int:
    _book(args).remove(args.name)
    print(f"removed schedule {args.name}")
    return 0


def cmd_schedule_run_now(args: argparse.Namespace) -> int:
    from jobs.schedules import Scheduler
    from jobs.submission import RayJobsSubmitter

    record = Scheduler(RayJobsSubmitter(args.address), _book(args)).run_now(args.name)
    if record.state != "submitted":
        raise UserError(f"{record.submission_id} could not be submitted (state {record.state}); see the log above")
    print(record.submission_id)
    return 0


def cmd_scheduler(args: argparse.Namespace) -> int:
    from jobs.schedules import Scheduler
    from jobs.submission import RayJobsSubmitter

    scheduler = Scheduler(RayJobsSubmitter(args.address), _book(args))
    if args.once:
        for record in scheduler.tick():
            print(f"{record.submission_id}\t{record.state}" + (f"\t{record.reason}" if record.reason else ""))
        return 0
    stop = threading.Event()
    # SIGTERM (a service manager stopping us) ends the loop between ticks, like Ctrl-C.
    signal.signal(signal.SIGTERM, lambda *_: stop.set())
    try:
        scheduler.run_forever(args.interval, stop)
    except KeyboardInterrupt:
        pass
    return 0
