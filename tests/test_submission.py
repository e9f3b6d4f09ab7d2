"""Ray Jobs submission against a real local Ray head: submit, status from result shards, logs, cancel, list,
resume by resubmitting, token auth, the scheduler's Ray submitter, and the cluster CLI."""
from __future__ import annotations

import json
import os
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import textwrap
import time
import urllib.request
from dataclasses import dataclass
from datetime import datetime, timedelta, timezone
from pathlib import Path

import pytest

from jobs.cli import main as cli_main
from jobs.schedules import ScheduleBook, Scheduler
from jobs.submission import (
    META_OUTPUT,
    RayJobsSubmitter,
    SubmissionExists,
    cancel,
    connect,
    entrypoint_command,
    list_jobs,
    logs,
    progress_from_output,
    status,
    submit,
)
from schemas.errors import UserError
from schemas.job import JobSpec
from schemas.result import ResultRow, results_to_table
from schemas.schedule import Schedule
from storage import open_store

VENV_BIN = Path(sys.executable).parent
TERMINAL = {"SUCCEEDED", "FAILED", "STOPPED"}

# Stands in for `python -m jobs.run_job SPEC_FILE` until the pipeline lands: six rows; the first run writes
# five results (one failed, one invalid) and dies; a later run resumes, redoing only rows not ok or invalid.
FAKE_DRIVER = textwrap.dedent('''
    import json, sys, time
    from datetime import datetime, timedelta, timezone
    from schemas.job import JobSpec
    from schemas.result import ResultRow, results_from_table, results_to_table
    from storage import open_store

    spec = JobSpec.model_validate(json.load(open(sys.argv[1])))
    store = open_store(spec.output)
    store.put("job.json", json.dumps({"job_id": spec.job_id, "total_rows": 6}).encode())
    shards = store.list("results/")
    final = {r.row_id for key in shards for r in results_from_table(store.read_parquet(key))
             if r.status in ("ok", "invalid")}
    now = datetime.now(timezone.utc)
    if not shards:
        plan = {"r0": "ok", "r1": "ok", "r2": "ok", "r3": "failed", "r4": "invalid"}
    else:
        plan = {r: "ok" for r in ("r0", "r1", "r2", "r3", "r4", "r5") if r not in final}
    rows = []
    for i, (row_id, state) in enumerate(plan.items()):
        stamp = lambda s: (now + timedelta(seconds=s)).isoformat().replace("+00:00", "Z")
        rows.append(ResultRow(row_id=row_id, status=state, started_at=stamp(i * 0.1), finished_at=stamp(i * 0.1 + 0.1),
                              image_uri=f"images/{row_id}.png" if state == "ok" else None,
                              structure_s=0.05, error=None if state == "ok" else "simulated"))
    store.write_parquet(f"results/part-{len(shards):05d}.parquet", results_to_table(rows))
    print(f"fake driver wrote {len(rows)} results for {spec.job_id}", flush=True)
    if "slow" in spec.manifest:
        time.sleep(300)
    if not shards:
        print("fake driver: simulated crash", flush=True)
        sys.exit(1)
    store.put("_SUCCESS.json", json.dumps({"job_id": spec.job_id, "actors_per_stage": {"structure": 3},
                                           "expected_efficiency": 0.87}).encode())
''')


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@dataclass
class RayHead:
    address: str
    token: str
    driver: str


@pytest.fixture(scope="module")
def ray_head():
    token = secrets.token_hex(16)
    # A short temp dir: Ray's unix socket paths must stay under ~107 characters.
    temp_dir = tempfile.mkdtemp(prefix="pdray", dir="/tmp")
    driver_path = Path(temp_dir) / "fake_driver.py"
    driver_path.write_text(FAKE_DRIVER)
    dashboard_port = free_port()
    env = {
        **os.environ,
        "RAY_AUTH_MODE": "token",
        "RAY_AUTH_TOKEN": token,
        "PATH": f"{VENV_BIN}{os.pathsep}{os.environ.get('PATH', '')}",
        "RAY_USAGE_STATS_ENABLED": "0",
    }
    command = [
        str(VENV_BIN / "ray"), "start", "--head", "--block", "--disable-usage-stats",
        "--node-ip-address", "127.0.0.1", "--port", str(free_port()), "--num-cpus", "1",
        "--include-dashboard", "true", "--dashboard-host", "127.0.0.1", "--dashboard-port", str(dashboard_port),
        "--ray-client-server-port", str(free_port()), "--dashboard-agent-listen-port", str(free_port()),
        "--temp-dir", temp_dir,
    ]
    log = open(Path(temp_dir) / "ray-start.log", "wb")
    process = subprocess.Popen(command, env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    address = f"http://127.0.0.1:{dashboard_port}"
    try:
        deadline = time.monotonic() + 120
        while True:
            if process.poll() is not None:
                raise RuntimeError(f"ray start exited {process.returncode}: "
                                   f"{(Path(temp_dir) / 'ray-start.log').read_text()[-2000:]}")
            try:
                request = urllib.request.Request(f"{address}/api/version", headers={"Authorization": f"Bearer {token}"})
                with urllib.request.urlopen(request, timeout=2) as response:
                    if response.status == 200:
                        break
            except OSError:
                pass
            if time.monotonic() > deadline:
                raise TimeoutError("the Ray dashboard did not come up within 120 s")
            time.sleep(0.5)
        yield RayHead(address=address, token=token, driver=f"python {driver_path}")
    finally:
        # `ray start --block` stops the processes it started when it is terminated.
        process.send_signal(signal.SIGTERM)
        try:
            process.wait(timeout=60)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait(timeout=10)
        try:
            os.killpg(process.pid, signal.SIGKILL)  # anything of that session still alive
        except ProcessLookupError:
            pass
        log.close()
        shutil.rmtree(temp_dir, ignore_errors=True)


@pytest.fixture
def token_env(ray_head, monkeypatch):
    monkeypatch.setenv("RAY_AUTH_TOKEN", ray_head.token)
    return ray_head


def wait_for(predicate, timeout=120.0, what="condition"):
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if value:
            return value
        if time.monotonic() > deadline:
            raise TimeoutError(f"timed out after {timeout:.0f}s waiting for {what}")
        time.sleep(0.5)


def wait_terminal(head, submission_id):
    return wait_for(
        lambda: (s := status(submission_id, head.address)).ray_status in TERMINAL and s,
        what=f"{submission_id} to end",
    )


def write_spec(tmp_path, manifest="/data/rows.parquet", name="spec.yaml"):
    path = tmp_path / name
    path.write_text(f"manifest: {manifest}\noutput: {tmp_path / 'out'}\njob_id: fake-job\n")
    return path


def test_submit_status_logs_and_resume(token_env, tmp_path):
    head = token_env
    spec_path = write_spec(tmp_path)

    first = submit(spec_path, head.address, driver=head.driver)
    assert first.job_id == "fake-job" and first.output == str(tmp_path / "out")
    assert first.submission_id.startswith("fake-job-")
    crashed = wait_terminal(head, first.submission_id)
    # The driver died; progress still comes from the shard it committed.
    assert crashed.ray_status == "FAILED"
    assert crashed.metadata[META_OUTPUT] == str(tmp_path / "out")
    progress = crashed.progress
    assert (progress.ok, progress.failed, progress.invalid) == (3, 1, 1)
    assert (progress.rows_done, progress.total_rows, progress.shards) == (5, 6, 1)
    assert progress.finished is False
    assert progress.images_per_second is not None and progress.images_per_second > 0
    assert progress.seconds_left is not None and progress.seconds_left > 0
    text = logs(first.submission_id, head.address)
    assert "fake driver wrote 5 results for fake-job" in text
    assert "simulated crash" in text

    # Submitting the same spec again resumes the same output under a new submission id.
    time.sleep(1.1)  # default ids carry the time in seconds
    second = submit(spec_path, head.address, driver=head.driver)
    assert second.submission_id != first.submission_id and second.output == first.output
    done = wait_terminal(head, second.submission_id)
    assert done.ray_status == "SUCCEEDED"
    progress = done.progress
    # r3 failed before and is ok now: it counts once, with its latest result.
    assert (progress.ok, progress.failed, progress.invalid) == (5, 0, 1)
    assert (progress.rows_done, progress.total_rows, progress.shards) == (6, 6, 2)
    assert progress.finished is True and progress.seconds_left == 0
    assert progress.summary["actors_per_stage"] == {"structure": 3}
    assert "fake driver wrote 2 results" in logs(second.submission_id, head.address)

    listed = {job.submission_id: job for job in list_jobs(head.address)}
    assert {first.submission_id, second.submission_id} <= set(listed)
    assert listed[second.submission_id].metadata[META_OUTPUT] == str(tmp_path / "out")

    with pytest.raises(SubmissionExists):
        submit(spec_path, head.address, submission_id=second.submission_id, driver=head.driver)


def test_cancel_stops_a_running_job_and_keeps_its_results(token_env, tmp_path):
    head = token_env
    spec_path = write_spec(tmp_path, manifest="/data/slow-rows.parquet")
    submitted = submit(spec_path, head.address, submission_id="fake-slow-1", driver=head.driver)
    running = wait_for(
        lambda: (s := status("fake-slow-1", head.address)).progress.ok == 3 and s, what="the first shard",
    )
    assert running.ray_status == "RUNNING"
    assert cancel(submitted.submission_id, head.address) is True
    stopped = wait_terminal(head, "fake-slow-1")
    assert stopped.ray_status == "STOPPED"
    assert (stopped.progress.ok, stopped.progress.rows_done) == (3, 5)
    assert cancel("fake-slow-1", head.address) is False


def test_relative_paths_are_made_absolute_for_the_cluster(token_env, tmp_path, monkeypatch):
    head = token_env
    monkeypatch.chdir(tmp_path)
    (tmp_path / "rel.yaml").write_text("manifest: data/rows.parquet\noutput: out-rel\njob_id: rel-job\n")
    submitted = submit("rel.yaml", head.address, driver=head.driver)
    assert submitted.output == str(tmp_path / "out-rel")
    wait_terminal(head, submitted.submission_id)
    assert (tmp_path / "out-rel" / "results" / "part-00000.parquet").is_file()


def test_wrong_token_and_unknown_ids_are_user_errors(token_env):
    head = token_env
    with pytest.raises(UserError, match="token"):
        connect(head.address, token="not-the-token")
    with pytest.raises(UserError, match="no job 'no-such-job'"):
        status("no-such-job", head.address)
    with pytest.raises(UserError, match="cannot reach"):
        connect(f"http://127.0.0.1:{free_port()}")


def test_scheduler_submits_through_ray_once(token_env, tmp_path):
    head = token_env
    submitter = RayJobsSubmitter(head.address, driver=head.driver)
    book = ScheduleBook(str(tmp_path / "state"))
    job = JobSpec(manifest="/data/rows.parquet", output=str(tmp_path / "sched" / "{date}"))
    clock_now = [datetime(2025, 5, 1, 1, tzinfo=timezone.utc)]
    book.add(Schedule(name="nightly", cron="0 2 * * *", job=job), now=clock_now[0])
    clock_now[0] = datetime(2025, 5, 1, 2, 0, 5, tzinfo=timezone.utc)
    Scheduler(submitter, book, lambda: clock_now[0]).tick()
    # The same slot from a restarted scheduler, and a repeated submission of its id: still one job.
    Scheduler(submitter, ScheduleBook(str(tmp_path / "state")), lambda: clock_now[0]).tick()
    assert submitter.submit(JobSpec(manifest="x.parquet"), "nightly-20250501T0200") == "nightly-20250501T0200"
    ours = [job for job in list_jobs(head.address) if job.submission_id.startswith("nightly-")]
    assert [job.submission_id for job in ours] == ["nightly-20250501T0200"]
    assert ours[0].metadata[META_OUTPUT] == str(tmp_path / "sched" / "2025-05-01")
    wait_terminal(head, "nightly-20250501T0200")
    assert submitter.is_running("nightly-20250501T0200") is False
    assert submitter.is_running("never-submitted") is False
    assert (tmp_path / "sched" / "2025-05-01" / "results" / "part-00000.parquet").is_file()


def test_cli_status_list_logs_cancel(token_env, tmp_path, capsys):
    head = token_env
    submitted = submit(write_spec(tmp_path), head.address, submission_id="fake-cli-1", driver=head.driver)
    wait_terminal(head, submitted.submission_id)
    capsys.readouterr()

    assert cli_main(["status", "fake-cli-1", "--address", head.address]) == 0
    out = capsys.readouterr().out
    assert "fake-cli-1  FAILED" in out
    assert "rows:     5/6 done" in out
    assert "images:   3 ok, 1 failed, 1 invalid (1 result shards)" in out

    assert cli_main(["status", "--output", str(tmp_path / "out"), "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["ok"] == 3

    assert cli_main(["list", "--address", head.address]) == 0
    assert any(line.startswith("fake-cli-1\tFAILED") for line in capsys.readouterr().out.splitlines())

    assert cli_main(["logs", "fake-cli-1", "--address", head.address]) == 0
    assert "fake driver wrote 5 results" in capsys.readouterr().out

    assert cli_main(["cancel", "fake-cli-1", "--address", head.address]) == 0
    assert "had already ended" in capsys.readouterr().out

    assert cli_main(["status", "nope", "--address", head.address]) == 2
    assert "no job 'nope'" in capsys.readouterr().err


def test_cli_schedule_commands(tmp_path, capsys):
    spec = tmp_path / "daily.yaml"
    spec.write_text("manifest: /data/p.parquet\noutput: /data/out/{date}\n")
    state = str(tmp_path / "state")
    assert cli_main(["schedule", "add", "daily", "--cron", "0 2 * * *", "--spec", str(spec), "--state", state,
                     "--timezone", "Asia/Shanghai", "--overlap", "queue"]) == 0
    assert "as daily-" in capsys.readouterr().out
    assert cli_main(["schedule", "add", "daily", "--cron", "0 2 * * *", "--spec", str(spec), "--state", state]) == 2
    assert "already exists" in capsys.readouterr().err
    assert cli_main(["schedule", "list", "--state", state, "--json"]) == 0
    [listed] = json.loads(capsys.readouterr().out)
    assert (listed["name"], listed["timezone"], listed["overlap"], listed["spec"]) == (
        "daily", "Asia/Shanghai", "queue", str(spec))
    assert cli_main(["schedule", "remove", "daily", "--state", state]) == 0
    assert cli_main(["schedule", "list", "--state", state]) == 0
    assert "no schedules" in capsys.readouterr().out


def test_progress_from_output_counts_and_rates(tmp_path):
    store = open_store(str(tmp_path / "job"))
    start = datetime(2025, 1, 1, tzinfo=timezone.utc)

    def row(row_id, state, finished_s, image_index=0):
        iso = lambda s: (start + timedelta(seconds=s)).isoformat()
        return ResultRow(row_id=row_id, status=state, image_index=image_index,
                         image_uri=f"images/{row_id}.png" if state == "ok" else None,
                         error=None if state == "ok" else "simulated",
                         started_at=iso(finished_s - 1), finished_at=iso(finished_s))

    store.put("job.json", json.dumps({"total_rows": 10, "started_at": start.isoformat()}).encode())
    store.write_parquet("results/part-00000.parquet", results_to_table([
        row("a", "ok", 2), row("a", "ok", 2, image_index=1), row("b", "failed", 4), row("c", "invalid", 4),
    ]))
    store.write_parquet("results/part-00001.parquet", results_to_table([row("b", "ok", 8), row("d", "ok", 10)]))
    progress = progress_from_output(str(tmp_path / "job"))
    assert (progress.ok, progress.failed, progress.invalid) == (4, 0, 1)
    assert (progress.rows_done, progress.total_rows, progress.shards) == (4, 10, 2)
    # 4 ok images in the 10 s from job start to the last result; 4 rows in 10 s leave 6 rows = 15 s.
    assert progress.images_per_second == pytest.approx(0.4)
    assert progress.seconds_left == pytest.approx(15.0)
    assert progress.finished is False
    later = progress_from_output(str(tmp_path / "job"), now=start + timedelta(seconds=20))
    assert later.seconds_left == pytest.approx(30.0)

    empty = progress_from_output(str(tmp_path / "nothing-yet"))
    assert (empty.rows_done, empty.shards, empty.images_per_second, empty.seconds_left) == (0, 0, None, None)


def test_entrypoint_writes_the_spec_and_runs_the_driver(tmp_path):
    spec = JobSpec(manifest="m.parquet", output="o")
    env = {**os.environ, "PANGUDRAW_JOB_SPEC": json.dumps(spec.job_json()), "TMPDIR": str(tmp_path)}
    command = entrypoint_command(f"{sys.executable} -c 'import sys; print(open(sys.argv[1]).read())'")
    result = subprocess.run(command, shell=True, env=env, capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stderr
    assert JobSpec.model_validate_json(result.stdout).job_id == spec.job_id
