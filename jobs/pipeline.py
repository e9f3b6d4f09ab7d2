"""The batch generation dataflow on Ray Data, from a job spec to images, result shards and a summary.

    read manifest (ManifestDatasource, small blocks) -> ValidateStage (rows -> units; resume filter)
      -> EncodeStage -> StructureStage -> [FusionStage] -> TextureStage -> DecodeStage   (fixed-size actor pools)
      -> WriteStage (images, create-only) -> driver: result shards, progress, then _SUCCESS.json

Plain rows take the encode/structure/texture path; Coop-Diffusion rows (`helper_model` set) are made whole by the
fusion stage, which exists only when the manifest has such rows, and the other stages pass them through. Both
meet again at the decode stage. Stages without rows left to make are not started.

`run_pipeline` checks everything that can stop a job (model, manifest, output) before it writes anything, then
writes `job.json`, streams the dataset and commits result shards as rows arrive.
"""
from __future__ import annotations

import logging
import os
import platform
import time
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

import pyarrow as pa
import pyarrow.compute as pc
from pydantic import BaseModel, ConfigDict, Field, SecretStr

from actors.decode import DecodeStage
from actors.encode import EncodeStage
from actors.fusion import FusionStage, HelperModel, check_helper_models
from actors.structure import StructureStage
from actors.texture import TextureStage
from actors.writer import WriteStage
from diffusion.config import ModelConfig
from jobs import contact_sheet, results
from jobs.manifest import Manifest, PriorResult, ValidateStage, manifest_datasource, open_manifest
from jobs.placement import NPU_RESOURCE, Placement, count_devices, evaluate_placement, model_actor_options, \
    plan_placement
from schemas.errors import UserError
from schemas.job import JobSpec, S3Settings
from schemas.result import JobSummary, utc_now

log = logging.getLogger(__name__)

MODEL_STAGES = ("encode", "structure", "texture", "decode")
# The model stages fused (Coop-Diffusion) rows need besides the fusion stage.
FUSED_ONLY_STAGES = ("decode",)
# Share of a CPU-only cluster's CPUs given to model actors; the rest keeps reads, validation and writes moving.
CPU_SHARE_FOR_MODELS = 0.75
LIGHT_CPUS = 0.25


class PipelineOptions(BaseModel):
    """How the driver runs a job; none of it changes an image (that is the job spec's part)."""

    model_config = ConfigDict(extra="forbid")

    block_rows: int = Field(8, ge=1, description="manifest rows per block read; small blocks let stages overlap")
    shard_rows: int = Field(1000, ge=1, description="result rows per shard")
    shard_seconds: float = Field(30.0, gt=0, description="commit waiting results at least this often")
    progress_seconds: float = Field(5.0, gt=0)
    # Padding keeps one compiled graph per shape group (seconds on CPU, minutes on Ascend) at the cost of computing
    # the copies in a group's last, short batch.
    pad_batches: bool = Field(True, description="pad each shape group's short batches to batch_size")
    cpus_per_model_actor: float | None = Field(None, gt=0, description="None: 1 on NPU, a share of the CPUs on CPU")
    write_actors: int = Field(1, ge=1)
    calibrate: bool = Field(True, description="measure stage times when actor counts are left to the driver")
    contact_sheet_images: int = Field(16, ge=0)
    split_rule: str = "reference"
    dtype: str = "float32"
    ray_progress_bars: bool = False
    # For testing placement and node loss on machines without Ascend: actors still hold {"NPU": 1} when the job
    # runs on "npu", but MindSpore inside them computes on the CPU.
    compute_device: Literal["cpu", "npu"] | None = Field(
        None, description="MindSpore device inside model actors; None: the job's device (stages.device)")
    max_runs: int = Field(3, ge=1, description="runs of the dataflow in one call: after a model actor or its node "
                                                "is lost, the driver chooses actors again on the nodes left and "
                                                "resumes the rows not yet recorded")


@dataclass
class StageClasses:
    """The callable classes of each stage (replaceable, e.g. to inject faults in tests)."""

    encode: type = EncodeStage
    structure: type = StructureStage
    fusion: type = FusionStage
    texture: type = TextureStage
    decode: type = DecodeStage
    write: type = WriteStage


@dataclass
class Progress:
    """Where a running job stands; `total` counts the images this run has to make (plus invalid rows)."""

    total: int
    done: int
    ok: int
    failed: int
    invalid: int
    elapsed_s: float
    images_per_s: float
    eta_s: float | None


@dataclass
class JobResult:
    summary: JobSummary
    output_uri: str
    shards_written: list[str] = field(default_factory=list)
    contact_sheet: list[str] = field(default_factory=list)
    placement: Placement | None = None
    fusion_actors: int = 0


# ---------------------------------------------------------------- set-up

def ensure_ray(num_cpus: float | None = None) -> None:
    """Connect to the cluster in RAY_ADDRESS (a Ray Job sets it; `auto` finds one started with `ray start`), or
    start a private local Ray: a plain `ray.init()` would join any cluster that happens to run on this machine."""
    import ray

    if ray.is_initialized():
        return
    address = os.environ.get("RAY_ADDRESS")
    if address:
        log.info("connecting to the Ray cluster at %s", address)
        ray.init(address=address, logging_level=logging.WARNING)
    else:
        log.info("starting a local Ray")
        ray.init(address="local", num_cpus=num_cpus, include_dashboard=False, logging_level=logging.WARNING)


def resolve_model_dir(model: str | None) -> Path:
    """The model directory the actors load: the given one, else the default (`diffusion.model.default_model_dir`:
    the shipped tiny model, or a random tiny stand-in whose images are noise)."""
    from diffusion.model import default_model_dir, read_model_manifest

    if model:
        if "://" in model and not model.startswith("file://"):
            raise UserError(f"model {model}: give a local directory (or one on a filesystem every node mounts)")
        root = Path(model.removeprefix("file://")).expanduser().resolve()
    else:
        root = default_model_dir().resolve()
    read_model_manifest(root)
    return root


def resolved_s3(settings: S3Settings, uris: list[str]) -> S3Settings:
    """S3 settings with endpoint, region and credentials taken from this process's environment.

    Actors on other nodes (or started before the environment was set) then reach the same service as the driver.
    """
    if not any(str(u).startswith("s3://") for u in uris):
        return settings
    import boto3

    secret = lambda v: None if v is None else v.get_secret_value()  # noqa: E731
    session = boto3.session.Session(
        aws_access_key_id=secret(settings.access_key_id), aws_secret_access_key=secret(settings.secret_access_key),
        aws_session_token=secret(settings.session_token),
    )
    update: dict = {
        "endpoint_url": settings.endpoint_url or os.environ.get("AWS_ENDPOINT_URL_S3")
        or os.environ.get("AWS_ENDPOINT_URL") or None,
        "region": settings.region or os.environ.get("AWS_REGION") or os.environ.get("AWS_DEFAULT_REGION"),
    }
    credentials = session.get_credentials()
    if credentials is not None:
        frozen = credentials.get_frozen_credentials()
        update.update(access_key_id=SecretStr(frozen.access_key), secret_access_key=SecretStr(frozen.secret_key),
                      session_token=SecretStr(frozen.token) if frozen.token else None)
    return settings.model_copy(update=update)


# ---------------------------------------------------------------- placement

def estimated_seconds(config: ModelConfig, spec: JobSpec) -> dict[str, float]:
    """Relative cost per image of each stage from the job's default row, in UNet evaluations.

    Used when stage times are not measured: sampling costs one UNet pass per branch and step; encoding about one
    pass in all; decoding about two.
    """
    from diffusion.guidance import active_branches
    from diffusion.schedule import Schedule, split_index

    d = spec.defaults
    branches = len(active_branches({"aesthetic": d.aesthetic_scale, "anime": d.anime_scale,
                                    "photography": d.photography_scale}))
    timesteps = Schedule(config.num_train_timesteps, config.beta_start, config.beta_end).timesteps(d.steps)
    split = split_index(timesteps, config.switch_timestep, "reference")
    return {"encode": 1.0, "structure": max(split, 1) * branches,
            "texture": max(d.steps - split, 1) * branches, "decode": 2.0}


def cpu_devices(cluster_resources: dict) -> int:
    return max(1, int(cluster_resources.get("CPU", 1) * CPU_SHARE_FOR_MODELS))


def choose_placement(spec: JobSpec, seconds: dict[str, float], cluster_resources: dict,
                     measure: Callable[[], dict[str, float]] | None = None, *, reserved: int = 0) -> Placement:
    """Actors per model stage (the stages `seconds` names): the job's own counts where given, the rest from
    (measured) stage times, on the devices left after `reserved` ones (the fusion actors')."""
    device = spec.stages.device
    if device == "npu":
        devices = count_devices(cluster_resources, "npu")
        if devices < 1:
            raise UserError(f"--device npu, but the Ray cluster has no '{NPU_RESOURCE}' resource; start the nodes "
                            f"with `ray start --resources='{{\"{NPU_RESOURCE}\": 8}}'` or use --device cpu")
        if devices - reserved < 1:
            raise UserError(f"--device npu: the Ray cluster has {devices} NPU(s), and {reserved} fusion actor(s) "
                            f"leave none for the other model stages; use fewer --fusion-actors")
        devices -= reserved
    else:
        devices = max(1, cpu_devices(cluster_resources) - reserved)
    stages = tuple(seconds)
    fixed = {k: v for k, v in spec.stages.actors.chosen().items() if k in stages}
    if len(fixed) == len(stages):
        if device == "npu":
            return evaluate_placement(seconds, fixed, devices=devices, chosen_by="hand")
        # CPU actors beyond the CPU slots share them.
        share = min(1.0, devices / sum(fixed.values()))
        return evaluate_placement(seconds, fixed, devices=devices, device_per_actor=share, chosen_by="hand")
    if devices >= len(stages) and measure is not None:
        measured = measure()
        return plan_placement({stage: measured[stage] for stage in stages}, devices, fixed)
    placement = plan_placement(seconds, devices, fixed)
    # The times are estimates (UNet evaluations per image), and the record says so.
    return placement.model_copy(update={"chosen_by": placement.chosen_by.replace("measured", "estimated")})


def actor_options(device: str, placement: Placement, cpus_per_model_actor: float | None) -> dict:
    share = placement.device_per_actor
    if device == "npu":
        return model_actor_options("npu", share, num_cpus=cpus_per_model_actor or 1.0)
    return model_actor_options("cpu", 1.0, num_cpus=cpus_per_model_actor or share)


def fusion_actor_options(device: str, placement: Placement, cpus_per_model_actor: float | None) -> dict:
    """A fusion actor holds a whole device on NPU (`resources={"NPU": 1}`), and a model actor's CPU share on CPU."""
    if device == "npu":
        return model_actor_options("npu", 1.0, num_cpus=cpus_per_model_actor or 1.0)
    return model_actor_options("cpu", 1.0, num_cpus=cpus_per_model_actor or placement.device_per_actor)


def fusion_actor_count(spec: JobSpec, manifest: Manifest, helpers: dict[str, HelperModel] | None = None) -> int:
    """Fusion actors: none without Coop-Diffusion rows left to make (rows naming a helper model known to be
    unusable are only recorded as invalid), else the job's count (default 1)."""
    usable = sum(n for value, n in manifest.fused_pending_by_helper.items()
                 if helpers is None or value not in helpers or helpers[value].error is None)
    if usable == 0:
        if spec.stages.actors.fusion:
            log.info("no Coop-Diffusion rows to make: no fusion actor is started")
        return 0
    return spec.stages.actors.fusion or 1


def needed_stages(manifest: Manifest) -> tuple[str, ...]:
    """The model stages (besides fusion) that have rows to make: all of them unless every row left is fused."""
    return FUSED_ONLY_STAGES if manifest.pending_units == manifest.fused_pending else MODEL_STAGES


# ---------------------------------------------------------------- the dataflow

def build_dataset(manifest: Manifest, spec: JobSpec, *, model_dir: Path, model_config: ModelConfig,
                  identity: dict, placement: Placement, prior: dict, s3: S3Settings, options: PipelineOptions,
                  stages: StageClasses, helpers: dict[str, HelperModel] | None = None, fusion_actors: int = 0):
    """The Ray Dataset of result rows (lazy: nothing runs until it is iterated).

    The model stages are those `placement` names, in pipeline order, with `fusion_actors` fusion actors after the
    structure stage (none: no fusion stage).
    """
    import ray.data
    from ray.data import ActorPoolStrategy

    device = spec.stages.device
    batch_size = spec.stages.batch_size
    model_args = dict(model_dir=str(model_dir), device=options.compute_device or device, batch_size=batch_size,
                      pad_batches=options.pad_batches, split_rule=options.split_rule, dtype=options.dtype)
    remote = actor_options(device, placement, options.cpus_per_model_actor)
    # Ray Data spreads actor pools over the nodes itself (its default strategy is SPREAD) and deprecates passing
    # a strategy, so only the resources are given.
    remote.pop("scheduling_strategy", None)

    ds = ray.data.read_datasource(manifest_datasource(manifest, options.block_rows), num_cpus=LIGHT_CPUS)
    ds = ds.map_batches(
        ValidateStage, batch_size=None, batch_format="pyarrow", compute=ActorPoolStrategy(size=1),
        num_cpus=LIGHT_CPUS,
        fn_constructor_kwargs=dict(defaults=spec.defaults, model_config=model_config, split_rule=options.split_rule,
                                   duplicates=manifest.duplicates, prior=prior, helpers=helpers),
    )
    helper_dirs = {value: h.dir for value, h in (helpers or {}).items() if h.dir}
    fusion_remote = fusion_actor_options(device, placement, options.cpus_per_model_actor)
    fusion_remote.pop("scheduling_strategy", None)
    for name in MODEL_STAGES:
        if name == "texture" and fusion_actors:
            ds = ds.map_batches(
                stages.fusion, batch_size=batch_size, batch_format="pyarrow",
                compute=ActorPoolStrategy(size=fusion_actors),
                fn_constructor_kwargs=dict(model_args, helper_dirs=helper_dirs, s3=s3), **fusion_remote,
            )
        if name not in placement.actors:
            continue
        ds = ds.map_batches(
            getattr(stages, name), batch_size=batch_size, batch_format="pyarrow",
            compute=ActorPoolStrategy(size=placement.actors[name]), fn_constructor_kwargs=model_args, **remote,
        )
    return ds.map_batches(
        stages.write, batch_size=batch_size, batch_format="pyarrow",
        compute=ActorPoolStrategy(size=options.write_actors), num_cpus=LIGHT_CPUS,
        fn_constructor_kwargs=dict(output_uri=spec.output, s3=s3, image_format=spec.stages.image_format,
                                   quality=spec.stages.quality, model_identity=identity,
                                   passthrough=manifest.passthrough),
    )


def _configure_ray_data(options: PipelineOptions) -> None:
    from ray.data import DataContext

    from jobs import node_loss

    ctx = DataContext.get_current()
    ctx.enable_progress_bars = options.ray_progress_bars
    ctx.execution_options.preserve_order = False
    ctx.print_on_execution_start = False
    node_loss.install(ctx)
    # Model actors' memory is the model's; the detector's advice to request it repeats every 30 s.
    ctx.issue_detectors_config.detectors = [
        d for d in ctx.issue_detectors_config.detectors if d.__name__ != "HighMemoryIssueDetector"
    ]
    logging.getLogger("ray.data").setLevel(logging.WARNING)
    if not options.ray_progress_bars:
        # Ray Data warns once that its bars are off; our own progress lines replace them.
        logging.getLogger("ray.data._internal.progress").setLevel(logging.ERROR)


def lost_worker_errors() -> tuple[type[BaseException], ...]:
    """What the driver sees when a node, or an actor or blocks that Ray could not restore, is gone."""
    from ray import exceptions

    from jobs import node_loss

    return (node_loss.NodeLostError, exceptions.RayActorError, exceptions.WorkerCrashedError,
            exceptions.NodeDiedError, exceptions.ObjectLostError)


class _Tally:
    """Counts of this run's result rows, and the stage seconds they report."""

    def __init__(self, total: int):
        self.total = total
        self.status: Counter[str] = Counter()
        self.stage_seconds: Counter[str] = Counter()
        self.stage_rows: Counter[str] = Counter()
        self.keys: set[tuple[str, int]] = set()
        self.start = time.monotonic()

    def add(self, table: pa.Table) -> None:
        for status, count in zip(*pc.value_counts(table["status"]).flatten()):
            self.status[status.as_py()] += count.as_py()
        for stage in (*MODEL_STAGES, "fusion", "write"):
            column = table[f"{stage}_s"]
            self.stage_seconds[stage] += pc.sum(column).as_py() or 0.0
            self.stage_rows[stage] += len(column) - column.null_count
        self.keys.update(zip(table["row_id"].to_pylist(), table["image_index"].to_pylist()))

    def progress(self) -> Progress:
        elapsed = time.monotonic() - self.start
        done = sum(self.status.values())
        made = self.status["ok"] + self.status["failed"]
        rate = self.status["ok"] / elapsed if elapsed > 0 else 0.0
        remaining = max(self.total - done, 0)
        eta = remaining / (made / elapsed) if made and elapsed > 0 else None
        return Progress(self.total, done, self.status["ok"], self.status["failed"], self.status["invalid"],
                        elapsed, rate, eta)


def run_pipeline(spec: JobSpec, options: PipelineOptions | None = None, *, stages: StageClasses | None = None,
                 on_progress: Callable[[Progress], None] | None = None) -> JobResult:
    """Run (or resume) one job to the end and return its summary.

    Raises UserError, before anything is written, when the model, the manifest or the output cannot be used.
    """
    import ray

    from diffusion.model import read_model_manifest
    from storage import open_store

    options = options or PipelineOptions()
    stages = stages or StageClasses()
    started_at = utc_now()
    model_dir = resolve_model_dir(spec.model)
    model_json = read_model_manifest(model_dir)
    model_config = ModelConfig.model_validate(model_json["config"])
    identity = {"name": model_config.name, "hash": model_json.get("hash")}
    s3 = resolved_s3(spec.s3, [spec.manifest, spec.output])
    store = open_store(spec.output, s3)
    prior = results.prior_results(store)
    manifest = open_manifest(spec.manifest, s3, spec.defaults,
                             done={key for key, p in prior.items() if p.status == "ok"})
    # Checked once per job from model.json and the file listing (no weights); rows naming an unusable one are
    # invalid, with the reason. Builtin helpers are built into the user's cache here the first time.
    helpers = check_helper_models(manifest.helper_models, model_config)
    fusion_actors = fusion_actor_count(spec, manifest, helpers)
    job_record = {
        "job_id": spec.job_id, "spec": spec.job_json(), "model": {**identity, "dir": str(model_dir)},
        "total_rows": manifest.total_rows, "total_images": manifest.total_units,
        "manifest_files": [f.source for f in manifest.files], "started_at": started_at, "versions": _versions(),
        "helper_models": {value: {"dir": h.dir, "name": h.name, "hash": h.hash} if h.error is None
                          else {"error": h.error} for value, h in helpers.items()},
        "fusion_actors": fusion_actors,
    }
    tally = _Tally(manifest.pending_units)
    if manifest.pending_units == 0:
        # A rerun of a finished job: no actor is started and nothing but the run records is written.
        log.info("every image of %s already has an ok result under %s; nothing to generate", spec.manifest,
                 store.root_uri)
        results.write_json(store, results.JOB_FILE, job_record)
        final = results.read_results(store)
        summary = _summary(spec, tally, final, None, identity, started_at)
        results.write_summary(store, summary)
        sheet = [k for k in (results.CONTACT_SHEET_PNG, results.CONTACT_SHEET_HTML) if store.exists(k)]
        return JobResult(summary, store.root_uri, contact_sheet=sheet)

    ensure_ray()
    _configure_ray_data(options)
    seconds = {stage: value for stage, value in estimated_seconds(model_config, spec).items()
               if stage in needed_stages(manifest)}
    placement = choose_placement(
        spec, seconds, ray.cluster_resources(),
        measure=(lambda: measure_stage_seconds(store, model_dir, model_config, identity, spec, options))
        if options.calibrate else None, reserved=fusion_actors,
    )
    if fusion_actors:
        log.info("fusion actors: %d (Coop-Diffusion rows to make: %d)", fusion_actors, manifest.fused_pending)
    log.info("actors per stage %s (%s; expected efficiency %.2f, bottleneck %s)", placement.actors,
             placement.chosen_by, placement.efficiency, placement.bottleneck)
    results.write_json(store, results.JOB_FILE, {**job_record, "placement": placement.model_dump()})

    sink = results.ResultSink(store, manifest.passthrough, shard_rows=options.shard_rows,
                              shard_seconds=options.shard_seconds)
    last_report = time.monotonic()
    for run in range(1, options.max_runs + 1):
        dataset = build_dataset(manifest, spec, model_dir=model_dir, model_config=model_config, identity=identity,
                                placement=placement, prior=prior, s3=s3, options=options, stages=stages,
                                helpers=helpers, fusion_actors=fusion_actors)
        try:
            for block in dataset.iter_batches(batch_size=None, batch_format="pyarrow", prefetch_batches=0):
                sink.add(block)
                tally.add(block)
                if on_progress and time.monotonic() - last_report >= options.progress_seconds:
                    on_progress(tally.progress())
                    last_report = time.monotonic()
            break
        except lost_worker_errors() as exc:
            # Committing what arrived makes the rerun safe: it makes only images that have no result yet.
            sink.flush()
            if run == options.max_runs:
                raise
            log.warning("run %d of job %s lost a worker (%s: %s); resuming on the nodes left", run, spec.job_id,
                        type(exc).__name__, str(exc).splitlines()[0] if str(exc) else "")
            prior = _settled(results.prior_results(store), tally.keys)
            placement = _replan(spec, seconds, placement, ray.cluster_resources(), fusion_actors)
            results.write_json(store, results.JOB_FILE, {**job_record, "placement": placement.model_dump(),
                                                         "runs": run + 1})
    sink.flush()
    if on_progress:
        on_progress(tally.progress())

    # Every writer of this job has stopped: what a killed one left half-written goes (a local store's temporaries).
    removed = store.remove_temporaries(results.IMAGES_PREFIX)
    if removed:
        log.info("removed %d temporary file(s) that killed writers left under %s/: %s", len(removed),
                 store.root_uri, ", ".join(removed[:5]))
    final = results.read_results(store)
    summary = _summary(spec, tally, final, placement, identity, started_at, fusion_actors)
    sheet = contact_sheet.write_contact_sheet(store, final, title=f"{spec.job_id}",
                                              limit=options.contact_sheet_images) \
        if options.contact_sheet_images else []
    results.write_summary(store, summary)
    return JobResult(summary, store.root_uri, sink.shards, sheet, placement, fusion_actors)


def _settled(prior: dict[tuple[str, int], PriorResult], recorded: set[tuple[str, int]]
             ) -> dict[tuple[str, int], PriorResult]:
    """Prior results for a rerun inside one call: images this call already recorded count as settled.

    A row that failed or was invalid is tried again by the next call of the job, not by a rerun of this one, so
    each image has one result per call.
    """
    settled = dict(prior)
    for key in recorded:
        earlier = prior.get(key)
        settled[key] = PriorResult("ok", None, earlier.attempts if earlier else 0)
    return settled


def _replan(spec: JobSpec, seconds: dict[str, float], previous: Placement, cluster_resources: dict,
            reserved: int = 0) -> Placement:
    """Actors per stage for the devices left after a loss; hand-set counts that no longer fit are chosen again."""
    measured = previous.seconds_per_image if "measured" in previous.chosen_by else None
    try:
        placement = choose_placement(spec, seconds, cluster_resources,
                                     measure=(lambda: measured) if measured else None, reserved=reserved)
    except UserError as exc:
        devices = count_devices(cluster_resources, "npu") - reserved if spec.stages.device == "npu" \
            else max(1, cpu_devices(cluster_resources) - reserved)
        if devices < 1:
            raise
        log.warning("%s; choosing actors for the %d device(s) left", exc, devices)
        placement = plan_placement(measured or seconds, devices)
        if not measured:
            placement = placement.model_copy(update={"chosen_by": placement.chosen_by.replace("measured", "estimated")})
    log.info("actors per stage now %s (%s; expected efficiency %.2f, bottleneck %s)", placement.actors,
             placement.chosen_by, placement.efficiency, placement.bottleneck)
    return placement


def _summary(spec: JobSpec, tally: _Tally, final: pa.Table | None, placement: Placement | None, identity: dict,
             started_at: str, fusion_actors: int = 0) -> JobSummary:
    wall = time.monotonic() - tally.start
    ok, failed, invalid = tally.status["ok"], tally.status["failed"], tally.status["invalid"]
    recorded = 0 if final is None else final.num_rows
    per_image = {stage: tally.stage_seconds[stage] / tally.stage_rows[stage]
                 for stage in tally.stage_seconds if tally.stage_rows[stage]}
    images_per_s = ok / wall if wall > 0 else 0.0
    model_seconds = sum(per_image.get(stage, 0.0) for stage in MODEL_STAGES)
    ceiling = placement.devices / model_seconds if placement and model_seconds > 0 else None
    if fusion_actors and placement and ok:
        # Plain and fused rows take different stages: the ceiling is all model devices over the device-seconds
        # the images of this run took, whichever path they went.
        spent = sum(tally.stage_seconds[stage] for stage in (*MODEL_STAGES, "fusion"))
        ceiling = (placement.devices + fusion_actors) / (spent / ok) if spent > 0 else None
    return JobSummary(
        job_id=spec.job_id, output_uri=spec.output, total=ok + failed + invalid + max(recorded - len(tally.keys), 0),
        ok=ok, invalid=invalid, failed=failed, skipped_existing=max(recorded - len(tally.keys), 0),
        started_at=started_at, finished_at=utc_now(), wall_s=wall, images_per_s=images_per_s,
        stage_seconds=dict(tally.stage_seconds), stage_seconds_per_image=per_image,
        actors_per_stage={**(placement.actors if placement else {}),
                          **({"fusion": fusion_actors} if fusion_actors else {})},
        expected_efficiency=placement.efficiency if placement else None,
        efficiency=(images_per_s / ceiling) if ceiling and ok else None,
        model_name=identity.get("name"), model_hash=identity.get("hash"),
    )


def _versions() -> dict[str, str]:
    from importlib.metadata import PackageNotFoundError, version

    out = {"python": platform.python_version()}
    for name in ("pangudraw", "mindspore", "ray", "pyarrow", "numpy"):
        try:
            out[name] = version(name)
        except PackageNotFoundError:
            continue
    return out


# ---------------------------------------------------------------- stage times

CALIBRATION_FILE = "calibration.json"


def measure_stage_seconds(store, model_dir: Path, model_config: ModelConfig, identity: dict, spec: JobSpec,
                          options: PipelineOptions) -> dict[str, float]:
    """Seconds per image of each model stage on one device, measured after a warm-up batch (cached per job)."""
    import ray

    key = {"model_hash": identity.get("hash"), "device": spec.stages.device, "batch_size": spec.stages.batch_size,
           "defaults": spec.defaults.model_dump(mode="json")}
    cached = results.read_json(store, CALIBRATION_FILE)
    if cached and cached.get("key") == key:
        return cached["seconds_per_image"]
    resources = model_actor_options(spec.stages.device, 1.0, num_cpus=1.0)
    resources.pop("scheduling_strategy", None)
    task = ray.remote(_time_stages).options(**resources)
    log.info("measuring stage times on one %s (a warm-up batch, then a timed one)", spec.stages.device)
    seconds = ray.get(task.remote(str(model_dir), options.compute_device or spec.stages.device, spec.defaults,
                                  spec.stages.batch_size, options.split_rule, options.dtype), timeout=3600)
    results.write_json(store, CALIBRATION_FILE, {"key": key, "seconds_per_image": seconds, "measured_at": utc_now()})
    return seconds


def _time_stages(model_dir: str, device: str, defaults, batch_size: int, split_rule: str, dtype: str) -> dict:
    from diffusion.model import GenerationRequest, PanGuDraw

    model = PanGuDraw.load(model_dir, device=device, split_rule=split_rule, dtype=dtype)
    requests = [GenerationRequest(
        prompt=f"calibration prompt {i}", seed=i, negative_prompt=defaults.negative_prompt, width=defaults.width,
        height=defaults.height, steps=defaults.steps, sampler=defaults.sampler,
        guidance_scale=defaults.guidance_scale, aesthetic_scale=defaults.aesthetic_scale,
        anime_scale=defaults.anime_scale, photography_scale=defaults.photography_scale,
    ) for i in range(batch_size)]
    timed: dict[str, float] = {}
    for _ in range(2):  # the first pass compiles every graph
        t0 = time.perf_counter()
        conds = model.encode(requests)
        t1 = time.perf_counter()
        handoffs = model.sample_structure(requests, conds)
        t2 = time.perf_counter()
        latents = model.sample_texture(requests, conds, handoffs)
        t3 = time.perf_counter()
        model.decode(latents)
        t4 = time.perf_counter()
        timed = {"encode": t1 - t0, "structure": t2 - t1, "texture": t3 - t2, "decode": t4 - t3}
    return {stage: max(value / batch_size, 1e-6) for stage, value in timed.items()}
