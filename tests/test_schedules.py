"""Scheduled synthesis: every due run submitted once, across restarts, with overlap and missed-run policies."""
from datetime import datetime, timedelta, timezone

import pytest

from jobs.schedules import ScheduleBook, Scheduler, load_job_spec, scheduled_spec
from schemas.errors import UserError
from schemas.job import JobSpec
from schemas.schedule import Schedule, render_template

UTC = timezone.utc
MANIFEST = "s3://prompts/daily/{date}.parquet"


class FakeClock:
    def __init__(self, start: datetime):
        self.now = start

    def __call__(self) -> datetime:
        return self.now

    def set(self, **fields) -> None:
        self.now = self.now.replace(**fields)

    def advance(self, **delta) -> None:
        self.now += timedelta(**delta)


class FakeCluster:
    """A submitter that remembers every job, accepts a repeated id as done, and fails on request."""

    def __init__(self):
        self.jobs: dict[str, JobSpec] = {}
        self.calls: list[str] = []
        self.running: set[str] = set()
        self.fail_before_accepting = 0
        self.fail_after_accepting = 0

    def submit(self, spec: JobSpec, submission_id: str) -> str:
        self.calls.append(submission_id)
        if self.fail_before_accepting:
            self.fail_before_accepting -= 1
            raise ConnectionError("head node unreachable")
        if submission_id not in self.jobs:
            self.jobs[submission_id] = spec
            self.running.add(submission_id)
        if self.fail_after_accepting:
            self.fail_after_accepting -= 1
            raise TimeoutError("reply lost after the job was accepted")
        return submission_id

    def is_running(self, submission_id: str) -> bool:
        return submission_id in self.running

    def finish(self, submission_id: str) -> None:
        self.running.discard(submission_id)


@pytest.fixture
def state(tmp_path):
    return str(tmp_path / "state")


def inline_schedule(name="daily", cron="0 2 * * *", **fields):
    job = JobSpec(manifest=MANIFEST, output="s3://datasets/synth/{date}")
    return Schedule(name=name, cron=cron, job=job, **fields)


def start(state, schedule, at):
    clock = FakeClock(at)
    book = ScheduleBook(state)
    book.add(schedule, now=clock())
    cluster = FakeCluster()
    return clock, book, cluster, Scheduler(cluster, book, clock)


def states(book, name):
    return [(r.slot, r.state) for r in book.records(name)]


def test_due_run_is_submitted_once_with_templated_spec(state):
    clock, book, cluster, scheduler = start(state, inline_schedule(), datetime(2025, 5, 1, 1, 0, tzinfo=UTC))
    clock.set(hour=1, minute=59)
    assert scheduler.tick() == []
    assert cluster.jobs == {}

    clock.set(hour=2, minute=0, second=10)
    changed = scheduler.tick()
    assert [r.state for r in changed] == ["pending", "submitted"]
    assert list(cluster.jobs) == ["daily-20250501T0200"]
    spec = cluster.jobs["daily-20250501T0200"]
    assert spec.job_id == "daily-20250501T0200"
    assert spec.manifest == "s3://prompts/daily/2025-05-01.parquet"
    assert spec.output == "s3://datasets/synth/2025-05-01"

    clock.advance(seconds=30)
    assert scheduler.tick() == []
    cluster.finish("daily-20250501T0200")
    clock.set(day=2, hour=2, minute=0, second=5)
    scheduler.tick()
    assert list(cluster.jobs) == ["daily-20250501T0200", "daily-20250502T0200"]
    assert cluster.calls == list(cluster.jobs)
    assert states(book, "daily") == [("20250501T0200", "submitted"), ("20250502T0200", "submitted")]
    assert book.records("daily")[1].output == "s3://datasets/synth/2025-05-02"


def test_restart_repeats_nothing(state):
    clock, book, cluster, scheduler = start(state, inline_schedule(), datetime(2025, 5, 1, 1, 0, tzinfo=UTC))
    clock.set(hour=2, minute=0, second=1)
    scheduler.tick()
    cluster.finish("daily-20250501T0200")

    # A new process on the same state, in the same minute and later that day: nothing more to do.
    restarted = Scheduler(cluster, ScheduleBook(state), clock)
    clock.advance(seconds=20)
    assert restarted.tick() == []
    clock.set(hour=23)
    assert Scheduler(cluster, ScheduleBook(state), clock).tick() == []
    assert cluster.calls == ["daily-20250501T0200"]


def test_crash_before_the_cluster_accepted_is_submitted_after_restart(state):
    clock, book, cluster, scheduler = start(state, inline_schedule(), datetime(2025, 5, 1, 1, 0, tzinfo=UTC))
    cluster.fail_before_accepting = 1
    clock.set(hour=2, minute=0, second=1)
    scheduler.tick()
    assert cluster.jobs == {}
    assert states(book, "daily") == [("20250501T0200", "submitting")]

    clock.advance(minutes=3)
    Scheduler(cluster, ScheduleBook(state), clock).tick()
    assert list(cluster.jobs) == ["daily-20250501T0200"]
    assert states(book, "daily") == [("20250501T0200", "submitted")]


def test_lost_reply_resubmits_the_same_id_and_runs_once(state):
    clock, book, cluster, scheduler = start(state, inline_schedule(), datetime(2025, 5, 1, 1, 0, tzinfo=UTC))
    cluster.fail_after_accepting = 1
    clock.set(hour=2, minute=0, second=1)
    scheduler.tick()
    assert states(book, "daily") == [("20250501T0200", "submitting")]

    Scheduler(cluster, ScheduleBook(state), clock).tick()
    # The id was sent twice; the cluster holds one job, and the record is final.
    assert cluster.calls == ["daily-20250501T0200", "daily-20250501T0200"]
    assert list(cluster.jobs) == ["daily-20250501T0200"]
    assert states(book, "daily") == [("20250501T0200", "submitted")]


def test_overlap_skip_skips_while_the_previous_run_is_going(state):
    schedule = inline_schedule("hourly", "0 * * * *", overlap="skip", output="s3://datasets/h/{slot}")
    clock, book, cluster, scheduler = start(state, schedule, datetime(2025, 5, 1, 0, 30, tzinfo=UTC))
    for hour in (1, 2):
        clock.set(hour=hour, minute=0)
        scheduler.tick()
    assert list(cluster.jobs) == ["hourly-20250501T0100"]
    skipped = book.record("hourly", "20250501T0200")
    assert skipped.state == "skipped" and "hourly-20250501T0100" in skipped.reason

    cluster.finish("hourly-20250501T0100")
    clock.set(hour=3)
    scheduler.tick()
    assert list(cluster.jobs) == ["hourly-20250501T0100", "hourly-20250501T0300"]
    assert cluster.jobs["hourly-20250501T0300"].output == "s3://datasets/h/20250501T0300"


def test_overlap_queue_runs_each_slot_in_order_across_a_restart(state):
    schedule = inline_schedule("hourly", "0 * * * *", overlap="queue", output="s3://datasets/h/{slot}")
    clock, book, cluster, scheduler = start(state, schedule, datetime(2025, 5, 1, 0, 30, tzinfo=UTC))
    for hour in (1, 2, 3):
        clock.set(hour=hour, minute=0)
        scheduler.tick()
    assert list(cluster.jobs) == ["hourly-20250501T0100"]
    assert states(book, "hourly") == [
        ("20250501T0100", "submitted"), ("20250501T0200", "pending"), ("20250501T0300", "pending"),
    ]

    cluster.finish("hourly-20250501T0100")
    clock.set(minute=10)
    scheduler = Scheduler(cluster, ScheduleBook(state), clock)  # restart while two runs are queued
    scheduler.tick()
    assert list(cluster.jobs) == ["hourly-20250501T0100", "hourly-20250501T0200"]

    clock.set(minute=20)
    scheduler.tick()
    assert len(cluster.jobs) == 2  # 03:00 waits for 02:00

    cluster.finish("hourly-20250501T0200")
    clock.set(minute=30)
    scheduler.tick()
    assert list(cluster.jobs) == ["hourly-20250501T0100", "hourly-20250501T0200", "hourly-20250501T0300"]
    assert cluster.calls == list(cluster.jobs)
    assert all(state == "submitted" for _, state in states(book, "hourly"))


def test_missed_skip_runs_only_the_latest_slot(state):
    clock, book, cluster, scheduler = start(state, inline_schedule(missed="skip"), datetime(2025, 5, 1, 3, tzinfo=UTC))
    # No scheduler ran from May 1 until May 6 at 02:05: slots of May 2..6 fell due.
    clock.now = datetime(2025, 5, 6, 2, 5, tzinfo=UTC)
    Scheduler(cluster, ScheduleBook(state), clock).tick()
    assert list(cluster.jobs) == ["daily-20250506T0200"]
    record = book.record("daily", "20250506T0200")
    assert record.missed_before == 4


def test_missed_catch_up_is_bounded_and_newest_first(state):
    schedule = inline_schedule(missed="catch_up", max_catch_up=2, overlap="queue")
    clock, book, cluster, scheduler = start(state, schedule, datetime(2025, 5, 1, 3, tzinfo=UTC))
    clock.now = datetime(2025, 5, 6, 2, 5, tzinfo=UTC)
    scheduler = Scheduler(cluster, ScheduleBook(state), clock)
    scheduler.tick()
    # Two missed runs (May 4 and 5) plus the due one (May 6); May 2 and 3 are dropped.
    assert [slot for slot, _ in states(book, "daily")] == ["20250504T0200", "20250505T0200", "20250506T0200"]
    assert book.record("daily", "20250504T0200").missed_before == 2
    for expected in ("daily-20250504T0200", "daily-20250505T0200", "daily-20250506T0200"):
        assert list(cluster.jobs)[-1] == expected
        cluster.finish(expected)
        clock.advance(minutes=1)
        scheduler.tick()
    assert cluster.calls == ["daily-20250504T0200", "daily-20250505T0200", "daily-20250506T0200"]
    assert cluster.jobs["daily-20250504T0200"].output == "s3://datasets/synth/2025-05-04"


def test_catch_up_with_overlap_skip_records_the_skipped_ones(state):
    schedule = inline_schedule(missed="catch_up", max_catch_up=2, overlap="skip")
    clock, book, cluster, scheduler = start(state, schedule, datetime(2025, 5, 1, 3, tzinfo=UTC))
    clock.now = datetime(2025, 5, 6, 2, 5, tzinfo=UTC)
    Scheduler(cluster, ScheduleBook(state), clock).tick()
    assert list(cluster.jobs) == ["daily-20250504T0200"]
    assert states(book, "daily") == [
        ("20250504T0200", "submitted"), ("20250505T0200", "skipped"), ("20250506T0200", "skipped"),
    ]


def test_time_zone_names_the_slot_and_the_date(state):
    schedule = inline_schedule(timezone="Asia/Shanghai")
    # 02:00 in Shanghai on May 2 is 18:00 UTC on May 1.
    clock, book, cluster, scheduler = start(state, schedule, datetime(2025, 5, 1, 12, tzinfo=UTC))
    clock.set(hour=18, minute=0, second=30)
    scheduler.tick()
    assert list(cluster.jobs) == ["daily-20250502T0200"]
    assert cluster.jobs["daily-20250502T0200"].output == "s3://datasets/synth/2025-05-02"


def test_run_now_submits_outside_the_cron_and_once_per_minute(state):
    clock, book, cluster, scheduler = start(state, inline_schedule(), datetime(2025, 5, 1, 10, 15, 5, tzinfo=UTC))
    record = scheduler.run_now("daily")
    assert record.state == "submitted" and record.manual
    assert record.submission_id == "daily-20250501T1015-now"
    assert cluster.jobs[record.submission_id].output == "s3://datasets/synth/2025-05-01"
    clock.advance(seconds=20)
    assert scheduler.run_now("daily").submission_id == "daily-20250501T1015-now"
    assert cluster.calls == ["daily-20250501T1015-now"]
    # A manual run is not a cron slot: it neither moves the schedule on nor counts as a missed run.
    clock.set(day=2, hour=2, minute=0)
    cluster.finish(record.submission_id)
    Scheduler(cluster, ScheduleBook(state), clock).tick()
    assert list(cluster.jobs)[-1] == "daily-20250502T0200"


def test_spec_file_is_read_at_each_run(state, tmp_path):
    spec_path = tmp_path / "daily.yaml"
    spec_path.write_text("manifest: /data/prompts-{date}.parquet\noutput: /data/out/{date}\nstages: {batch_size: 2}\n")
    schedule = Schedule(name="fromfile", cron="0 2 * * *", spec=str(spec_path))
    clock, book, cluster, scheduler = start(state, schedule, datetime(2025, 5, 1, 1, tzinfo=UTC))
    spec_path.write_text("manifest: /data/prompts-{date}.parquet\noutput: /data/out/{date}\nstages: {batch_size: 8}\n")
    clock.set(hour=2)
    scheduler.tick()
    spec = cluster.jobs["fromfile-20250501T0200"]
    assert spec.manifest == "/data/prompts-2025-05-01.parquet"
    assert spec.stages.batch_size == 8


def test_broken_spec_does_not_stop_other_schedules(state, tmp_path):
    spec_path = tmp_path / "a.yaml"
    spec_path.write_text("manifest: /data/p.parquet\noutput: /data/out/{date}\n")
    clock = FakeClock(datetime(2025, 5, 1, 1, tzinfo=UTC))
    book = ScheduleBook(state)
    book.add(Schedule(name="broken", cron="0 2 * * *", spec=str(spec_path)), now=clock())
    book.add(inline_schedule("fine"), now=clock())
    spec_path.write_text("manifest: [not, a, string]\n")
    cluster = FakeCluster()
    clock.set(hour=2)
    Scheduler(cluster, book, clock).tick()
    assert list(cluster.jobs) == ["fine-20250501T0200"]


def test_book_add_list_remove(state):
    book = ScheduleBook(state)
    now = datetime(2025, 5, 1, tzinfo=UTC)
    added = book.add(inline_schedule("a"), now=now)
    assert added.created_at == now
    book.add(inline_schedule("b", "30 * * * *", output="s3://x/{slot}"), now=now)
    assert [s.name for s in book.list()] == ["a", "b"]
    assert book.get("b").job.manifest == MANIFEST
    with pytest.raises(UserError, match="already exists"):
        book.add(inline_schedule("a"), now=now)
    book.remove("a")
    assert [s.name for s in book.list()] == ["b"]
    with pytest.raises(UserError, match="no schedule named 'a'"):
        book.remove("a")


def test_output_must_differ_between_runs(state):
    book = ScheduleBook(state)
    with pytest.raises(UserError, match="same for different runs"):
        book.add(inline_schedule("x", output="s3://datasets/fixed"), now=datetime(2025, 5, 1, tzinfo=UTC))
    with pytest.raises(UserError, match="same for different runs"):
        # {date} alone repeats for an hourly schedule.
        book.add(inline_schedule("y", "0 * * * *"), now=datetime(2025, 5, 1, tzinfo=UTC))
    assert book.list() == []


@pytest.mark.parametrize(
    "fields, message",
    [
        ({"cron": "61 * * * *"}, "five-field cron"),
        ({"cron": "0 0 2 * * *"}, "five-field cron"),
        ({"timezone": "Mars/Olympus"}, "IANA time zone"),
        ({"name": "../etc"}, "A-Z a-z 0-9"),
        ({"output": "s3://x/{month}"}, "only {date}"),
        ({"job": None}, "exactly one of"),
        ({"spec": "a.yaml"}, "exactly one of"),
    ],
)
def test_bad_schedules_are_rejected(fields, message):
    data = {"name": "n", "cron": "0 2 * * *", "job": {"manifest": "m.parquet"}, **fields}
    with pytest.raises(UserError, match=message):
        Schedule.from_dict(data)


def test_render_template_and_scheduled_spec():
    slot = datetime(2025, 1, 9, 7, 5, tzinfo=UTC)
    assert render_template("out/{date}/{time}/{slot}", slot) == "out/2025-01-09/0705/20250109T0705"
    schedule = inline_schedule()
    spec = scheduled_spec(schedule, slot)
    assert (spec.job_id, spec.output) == ("daily-20250109T0705", "s3://datasets/synth/2025-01-09")


def test_load_job_spec_from_a_file_uri(tmp_path):
    path = tmp_path / "spec.json"
    path.write_text('{"manifest": "m.parquet", "output": "o/{date}"}')
    assert load_job_spec(path.as_uri()).output == "o/{date}"
    with pytest.raises(UserError, match="does not exist"):
        load_job_spec((tmp_path / "missing.yaml").as_uri())


def test_state_on_s3_survives_a_restart(s3_bucket):
    state_uri = f"s3://{s3_bucket}/scheduler"
    clock, book, cluster, scheduler = start(state_uri, inline_schedule(), datetime(2025, 5, 1, 1, tzinfo=UTC))
    clock.set(hour=2, minute=0, second=3)
    scheduler.tick()
    clock.advance(seconds=30)
    Scheduler(cluster, ScheduleBook(state_uri), clock).tick()
    assert cluster.calls == ["daily-20250501T0200"]
    assert states(ScheduleBook(state_uri), "daily") == [("20250501T0200", "submitted")]
    assert ScheduleBook(state_uri).get("daily").cron == "0 2 * * *"
