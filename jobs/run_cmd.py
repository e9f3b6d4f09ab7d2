"""`pangudraw run MANIFEST` (generate every row's images, resumable) and `pangudraw validate MANIFEST`."""
from __future__ import annotations

import argparse
import json
import logging
import sys
from pathlib import Path
from typing import Any

import yaml

from schemas.errors import UserError
from schemas.job import JobSpec

log = logging.getLogger(__name__)

MODEL_STAGES = ("encode", "structure", "texture", "decode")


def register(sub: argparse._SubParsersAction) -> None:
    run = sub.add_parser("run", help="generate the images of a Parquet manifest on Ray (rerun to resume)")
    run.add_argument("manifest", nargs="?", help="Parquet file or prefix (local path, file:// or s3://)")
    run.add_argument("--out", help="output URI (default ./outputs/<job id>)")
    run.add_argument("--model", help="model directory (default: the shipped tiny model)")
    run.add_argument("--device", choices=["cpu", "npu"], help="where model stages run (default cpu)")
    run.add_argument("--actors-per-stage", metavar="N|STAGE=N,...",
                     help="actors of every model stage (e.g. 2) or per stage (e.g. structure=3,texture=2); "
                          "default: from measured stage times")
    run.add_argument("--fusion-actors", type=int, metavar="N",
                     help="actors of the Coop-Diffusion fusion stage (default 1 when the manifest has rows with "
                          "helper_model, none otherwise)")
    run.add_argument("--batch-size", type=int, help="rows per model batch (default 4)")
    run.add_argument("--format", choices=["png", "jpeg", "webp"], help="image format (default png)")
    run.add_argument("--spec", help="job spec file (YAML or JSON); flags override its fields")
    run.add_argument("--job-id", help="job id (default: from the manifest and the settings that change images)")
    run.add_argument("--steps", type=int, help="default sampling steps for rows that give none")
    run.set_defaults(func=run_command)

    check = sub.add_parser("validate", help="check a manifest without generating anything")
    check.add_argument("manifest", nargs="?", help="Parquet file or prefix (local path, file:// or s3://)")
    check.add_argument("--spec", help="job spec file, for its defaults and S3 settings")
    check.add_argument("--model", help="model directory whose sizes rows must fit (default: the shipped model)")
    check.add_argument("--max-errors", type=int, default=20, help="invalid rows to list (default 20)")
    check.set_defaults(func=validate_command)


# ---------------------------------------------------------------- the job spec from flags

def parse_actors(text: str) -> dict[str, int]:
    """'2' -> every model stage 2; 'structure=3,texture=2' -> those stages."""
    text = text.strip()
    try:
        if "=" not in text:
            n = int(text)
            if n < 1:
                raise ValueError
            return {stage: n for stage in MODEL_STAGES}
        counts = {}
        for part in text.split(","):
            stage, _, value = part.partition("=")
            stage = stage.strip()
            if stage not in MODEL_STAGES:
                raise UserError(f"--actors-per-stage: unknown stage {stage!r}; stages are {', '.join(MODEL_STAGES)}")
            counts[stage] = int(value)
            if counts[stage] < 1:
                raise ValueError
        return counts
    except ValueError:
        raise UserError(f"--actors-per-stage {text!r}: expected a positive number, or STAGE=N pairs separated by "
                        "commas (e.g. structure=3,texture=2)") from None


def _spec_data(path: str | None) -> dict[str, Any]:
    if not path:
        return {}
    JobSpec.from_file(path)  # every problem of the file itself, with its messages
    text = Path(path).read_text(encoding="utf-8")
    data = json.loads(text) if path.lower().endswith(".json") else yaml.safe_load(text)
    return data or {}


def spec_from_args(args: argparse.Namespace) -> JobSpec:
    data = _spec_data(args.spec)
    if args.manifest:
        data["manifest"] = args.manifest
    if not data.get("manifest"):
        raise UserError("give a manifest: `pangudraw run MANIFEST` (a Parquet file or prefix), or a --spec that has one")
    for flag, name in (("out", "output"), ("model", "model"), ("job_id", "job_id")):
        if getattr(args, flag, None):
            data[name] = getattr(args, flag)
    stages = dict(data.get("stages") or {})
    if getattr(args, "device", None):
        stages["device"] = args.device
    if getattr(args, "batch_size", None):
        stages["batch_size"] = args.batch_size
    if getattr(args, "format", None):
        stages["image_format"] = args.format
    if getattr(args, "actors_per_stage", None):
        stages["actors"] = {**dict(stages.get("actors") or {}), **parse_actors(args.actors_per_stage)}
    if getattr(args, "fusion_actors", None) is not None:
        if args.fusion_actors < 1:
            raise UserError(f"--fusion-actors {args.fusion_actors}: expected a positive number")
        stages["actors"] = {**dict(stages.get("actors") or {}), "fusion": args.fusion_actors}
    if stages:
        data["stages"] = stages
    if getattr(args, "steps", None):
        data["defaults"] = {**dict(data.get("defaults") or {}), "steps": args.steps}
    return JobSpec.from_dict(data, source=args.spec or "command line")


# ---------------------------------------------------------------- output

def _duration(seconds: float | None) -> str:
    if seconds is None:
        return "?"
    seconds = int(round(seconds))
    if seconds < 60:
        return f"{seconds}s"
    if seconds < 3600:
        return f"{seconds // 60}m{seconds % 60:02d}s"
    return f"{seconds // 3600}h{seconds % 3600 // 60:02d}m"


def format_progress(p) -> str:
    """One progress line: images done of the run's total, failures, images/s and time left."""
    return (f"[{_duration(p.elapsed_s):>6}] {p.done}/{p.total} done (ok {p.ok}, failed {p.failed}, "
            f"invalid {p.invalid}) {p.images_per_s:.2f} images/s, {_duration(p.eta_s)} left")


def format_placement(placement, achieved: float | None = None) -> str:
    """Actors per stage, the devices they share and the expected (and achieved) efficiency, on one line."""
    actors = ", ".join(f"{stage} {n}" for stage, n in placement.actors.items())
    line = (f"actors: {actors} on {placement.devices:g} device(s), chosen by {placement.chosen_by}; "
            f"expected efficiency {placement.efficiency:.2f} (bottleneck {placement.bottleneck})")
    return line + (f", achieved {achieved:.2f}" if achieved is not None else "")


def print_summary(result, out=sys.stdout) -> None:
    from jobs import results

    s = result.summary
    root = result.output_uri.rstrip("/")
    lines = [
        f"job {s.job_id}: {s.ok} ok, {s.failed} failed, {s.invalid} invalid"
        + (f", {s.skipped_existing} already done earlier" if s.skipped_existing else "")
        + f" in {s.wall_s:.1f}s ({s.images_per_s:.2f} images/s)",
        f"  results:  {root}/{results.RESULTS_PREFIX}  (Parquet shards; one record per image)",
        f"  images:   {root}/{results.IMAGES_PREFIX}",
    ]
    if result.contact_sheet:
        lines.append(f"  contact sheet: {root}/{result.contact_sheet[0]}")
    lines.append(f"  summary:  {root}/{results.SUCCESS_FILE}")
    if result.placement is not None:
        lines.append("  " + format_placement(result.placement, s.efficiency))
    if result.fusion_actors:
        lines.append(f"  fusion actors (Coop-Diffusion rows): {result.fusion_actors}")
    if s.stage_seconds_per_image:
        stages = ", ".join(f"{k} {v:.3f}" for k, v in s.stage_seconds_per_image.items())
        lines.append(f"  seconds per image: {stages}")
    if s.failed or s.invalid:
        lines.append("  rows that did not make an image are listed in the results with status and error;")
        lines.append("  run the same command again to retry failed rows")
    print("\n".join(lines), file=out)


# ---------------------------------------------------------------- commands

def run_command(args: argparse.Namespace) -> int:
    from jobs.pipeline import run_pipeline

    spec = spec_from_args(args)
    print(f"job {spec.job_id}: {spec.manifest} -> {spec.output}", file=sys.stderr)
    result = run_pipeline(spec, on_progress=lambda p: print(format_progress(p), file=sys.stderr, flush=True))
    print_summary(result)
    return 1 if result.summary.failed else 0


def validate_command(args: argparse.Namespace) -> int:
    from diffusion.config import ModelConfig
    from diffusion.model import read_model_manifest
    from jobs.manifest import validate_manifest
    from jobs.pipeline import resolve_model_dir, resolved_s3

    data = _spec_data(args.spec)
    if args.manifest:
        data["manifest"] = args.manifest
    if not data.get("manifest"):
        raise UserError("give a manifest: `pangudraw validate MANIFEST`, or a --spec that has one")
    spec = JobSpec.from_dict(data, source=args.spec or "command line")
    model_dir = resolve_model_dir(args.model or spec.model)
    config = ModelConfig.model_validate(read_model_manifest(model_dir)["config"])
    report = validate_manifest(spec.manifest, s3=resolved_s3(spec.s3, [spec.manifest]), defaults=spec.defaults,
                               model_config=config, max_errors=args.max_errors)
    m = report.manifest
    print(f"{spec.manifest}: {len(m.files)} file(s), {m.total_rows} rows: {report.valid_rows} valid "
          f"({report.images} images), {report.invalid_rows} invalid; model {config.name}")
    for line in report.errors:
        print(f"  {line}")
    if report.invalid_rows > len(report.errors):
        print(f"  ... and {report.invalid_rows - len(report.errors)} more")
    return 1 if report.invalid_rows else 0
