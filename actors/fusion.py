"""Fusion stage: Coop-Diffusion rows (SPEC section 8), with the job's model and the helper models rows name.

A manifest row asks for Coop-Diffusion by naming a `helper_model`; its other columns choose the mode:

    latent_bridge     helper_weight, helper_window: the helper joins the steps of its window through pixel space
                      (`diffusion.coop.CoopFusion`); its latent space (VAE, latent scale) and size may differ.
    control           + control_image_uri: the same, with the helper seeing the control image.
    super_resolution  + output_width, output_height: one-stage super-resolution. The helper is the low-resolution
                      model: it makes the row's size (width/height or aspect) for the steps with t >= 500; the job's
                      model continues at output_width x output_height. The image is the job's model's, decoded by
                      its VAE at the output size. Weight and window are not used.

Every mode ends in clean latents of the job's model, so the decode and write stages treat fused rows like plain
ones. A helper model is a model directory `PanGuDraw.load` accepts, or a builtin alias (`builtin:tiny-sd15`,
`builtin:tiny-lowres`, `builtin:tiny-control`; see `builtin_model_dir`). A helper trained to take an image
(`control_channels` > 0, such as tiny-control) reads a control row's image as an input; any other helper sees it
through its latents (diffusion.coop). A control image URI is `s3://`, `file://`, an absolute path, or a path
relative to the folder of the manifest file that names it.
"""
from __future__ import annotations

import dataclasses
import io
import json
import logging
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import numpy as np

from actors.base import ModelStage, failed_update
from actors.rows import FAILED, load_row, pack, request_for
from diffusion.config import ModelConfig, tiny_control_config, tiny_lowres_config, tiny_sd15_config
from diffusion.model import COMPONENTS, TOKENIZER_DIRS, WEIGHT_FILES, GenerationRequest, PanGuDraw
from schemas.errors import UserError
from schemas.job import S3Settings
from schemas.manifest import ManifestRow

log = logging.getLogger(__name__)

LATENT_BRIDGE, CONTROL, SUPER_RESOLUTION = "latent_bridge", "control", "super_resolution"
# The low-resolution model of one-stage super-resolution runs every step with t >= this (SPEC section 8, t_s).
SUPER_RESOLUTION_T_SWITCH = 500
BUILTIN_PREFIX = "builtin:"
# Builtin helper models: (config factory, seed of the random weights used where no trained one is shipped).
BUILTIN_HELPERS: dict[str, tuple[Callable[[str], ModelConfig], int]] = {
    "tiny-sd15": (tiny_sd15_config, 1),
    "tiny-lowres": (tiny_lowres_config, 2),
    "tiny-control": (tiny_control_config, 3),
}
HELPER_EXPECTED = ("a model directory (model.json, weights, tokenizers) or one of "
                   + ", ".join(BUILTIN_PREFIX + name for name in BUILTIN_HELPERS))


# ---------------------------------------------------------------- helper models

def builtin_model_dir(name: str) -> Path:
    """The directory of builtin helper `name`: shipped in the package when trained weights exist, else random tiny
    weights built once into the user's cache (`PANGUDRAW_CACHE`, default ~/.cache/pangudraw), with a warning."""
    if name not in BUILTIN_HELPERS:
        raise UserError(f"unknown builtin model {BUILTIN_PREFIX}{name}; builtin models are "
                        + ", ".join(BUILTIN_PREFIX + n for n in BUILTIN_HELPERS))
    shipped = _shipped_helper_dir(name)
    if (shipped / "model.json").is_file():
        return shipped
    cache = Path(os.environ.get("PANGUDRAW_CACHE", Path.home() / ".cache" / "pangudraw")) / f"random-{name}-v1"
    if not (cache / "model.json").is_file():
        from diffusion.tiny import build_random_model

        make_config, seed = BUILTIN_HELPERS[name]
        log.warning("no trained %s model is shipped; building a random one at %s (its images are noise)", name, cache)
        tmp = cache.with_name(cache.name + f".tmp{os.getpid()}")
        build_random_model(tmp, config=make_config(f"{name}-random"), seed=seed)
        try:
            tmp.rename(cache)
        except OSError:  # another process finished first
            import shutil

            shutil.rmtree(tmp, ignore_errors=True)
    return cache


def _shipped_helper_dir(name: str) -> Path:
    from diffusion.training.helpers import shipped_helper_dir

    return shipped_helper_dir(name)


def resolve_helper_model(value: str) -> Path:
    """The directory a manifest's `helper_model` names: a builtin alias, a `file://` URI or a path (relative to the
    current directory). UserError when it cannot name a local directory."""
    if value.startswith(BUILTIN_PREFIX):
        return builtin_model_dir(value[len(BUILTIN_PREFIX):])
    if "://" in value and not value.startswith("file://"):
        raise UserError(f"{value} is not local: give a directory every node can read")
    return Path(value.removeprefix("file://")).expanduser().resolve()


@dataclass
class HelperModel:
    """A manifest's `helper_model` value checked once per job: its directory and config, or why it cannot be used."""

    value: str
    dir: str | None = None
    config: ModelConfig | None = None
    name: str | None = None
    hash: str | None = None
    error: str | None = None
    _planner: PanGuDraw | None = field(default=None, repr=False, compare=False)

    def planner(self) -> PanGuDraw:
        """The helper as a `PanGuDraw` without weights: sizes, buckets and timesteps only."""
        if self._planner is None:
            self._planner = PanGuDraw(self.config)
        return self._planner

    def __getstate__(self) -> dict:
        return {**self.__dict__, "_planner": None}


def check_helper_model(value: str, primary: ModelConfig) -> HelperModel:
    """Check that `value` names a loadable model directory whose noise schedule is the job model's, from its
    model.json and file listing only (no weights are read)."""
    from diffusion.model import read_model_manifest

    try:
        root = resolve_helper_model(value)
        manifest = read_model_manifest(root)
        config = ModelConfig.model_validate(manifest["config"])
        files = set(manifest.get("files", WEIGHT_FILES).values())
        missing = sorted(f for f in files if not (root / f).is_file())
        missing += sorted(d for d in manifest.get("tokenizers", TOKENIZER_DIRS).values() if not (root / d).is_dir())
        if missing:
            raise UserError(f"{root} lacks {', '.join(missing)}")
        ours = (config.num_train_timesteps, config.beta_start, config.beta_end)
        theirs = (primary.num_train_timesteps, primary.beta_start, primary.beta_end)
        if ours != theirs:
            raise UserError(f"{root} has the noise schedule (T, beta_start, beta_end) = {ours}, the job's model "
                            f"{theirs}; Coop-Diffusion pairs timesteps one to one")
    except UserError as exc:
        return HelperModel(value, error=str(exc))
    return HelperModel(value, str(root), config, config.name, manifest.get("hash"))


def check_helper_models(values, primary: ModelConfig) -> dict[str, HelperModel]:
    checked = {value: check_helper_model(value, primary) for value in sorted(values)}
    for helper in checked.values():
        if helper.error:
            log.warning("helper_model %r cannot be used: %s", helper.value, helper.error)
        else:
            log.info("helper_model %r: %s (%s)", helper.value, helper.dir, helper.name)
    return checked


# ---------------------------------------------------------------- planning a fused row (no weights)

@dataclass(frozen=True)
class FusedPlan:
    """What the fusion stage will do for a row: the image's size (bucket), its batching group, the first record."""

    width: int
    height: int
    bucket: int
    snapped: bool
    group: str
    record: dict[str, Any]


def resolve_control_uri(uri: str, manifest_source: str) -> str:
    """Where a control image is read: URIs and absolute paths as given; a relative path from the folder of the
    manifest file (`manifest_source`) that names it."""
    from storage import split_uri

    if "://" in uri:
        return uri
    path = os.path.expanduser(uri)
    if os.path.isabs(path):
        return Path(path).as_uri()
    root, _ = split_uri(manifest_source)
    if root.startswith("s3://"):
        return f"{root.rstrip('/')}/{uri}"
    base = root.removeprefix("file://") if root.startswith("file://") else root
    return Path(os.path.normpath(os.path.join(os.path.abspath(base), path))).as_uri()


def plan_fused_row(row: ManifestRow, primary: PanGuDraw, helper: HelperModel, source: str) -> FusedPlan:
    """Check a fused row against the job's model (`primary`, weights not needed) and its helper; ValueError names
    the field and what was expected."""
    from diffusion import coop

    if helper.error:
        raise ValueError(f"field 'helper_model': expected {HELPER_EXPECTED}, got {row.helper_model!r} ({helper.error})")
    request = request_for(row, 0)
    record: dict[str, Any] = {"helper_model": row.helper_model, "helper_dir": Path(helper.dir).name,
                              "helper_name": helper.name, "helper_hash": helper.hash}
    if row.output_width is not None:
        if row.control_image_uri is not None:
            raise ValueError("field 'control_image_uri': expected no control image on a super-resolution row "
                             "(output_width/output_height set)")
        low = helper.planner().plan(request)
        output = (row.output_width, row.output_height)
        high = primary.plan(dataclasses.replace(request, width=output[0], height=output[1], aspect=None))
        if (high.size.width, high.size.height) != output:
            raise ValueError(f"field 'output_width': expected a size the job's model makes exactly (the nearest is "
                             f"{high.size.width}x{high.size.height}), got {output[0]}x{output[1]}")
        if high.size.bucket != low.size.bucket:
            raise ValueError(f"field 'output_width': expected the aspect of the generation size "
                             f"{low.size.width}x{low.size.height}, got {output[0]}x{output[1]}")
        record.update(mode=SUPER_RESOLUTION, weight=None, window=None, control_image_uri=None,
                      low_size=[low.size.width, low.size.height], output_size=list(output),
                      t_switch=SUPER_RESOLUTION_T_SWITCH)
        group = (f"{output[0]}x{output[1]}:{row.steps}:{row.sampler}:{len(high.branches)}|{SUPER_RESOLUTION}|"
                 f"{row.helper_model}|{low.size.width}x{low.size.height}")
        return FusedPlan(output[0], output[1], high.size.bucket, low.size.snapped, group, record)
    plan = primary.plan(request)
    helper_request = coop.CoopHelper(helper.planner(), row.helper_weight, row.helper_window).request_for(request, plan)
    helper_plan = helper.planner().plan(helper_request)
    control = None if row.control_image_uri is None else resolve_control_uri(row.control_image_uri, source)
    mode = LATENT_BRIDGE if control is None else CONTROL
    record.update(mode=mode, weight=row.helper_weight, window=list(row.helper_window), control_image_uri=control,
                  size=[plan.size.width, plan.size.height],
                  helper_size=[helper_plan.size.width, helper_plan.size.height])
    group = (f"{plan.size.width}x{plan.size.height}:{row.steps}:{row.sampler}:{len(plan.branches)}|{mode}|"
             f"{row.helper_model}|{row.helper_weight:g}|{row.helper_window_text()}")
    return FusedPlan(plan.size.width, plan.size.height, plan.size.bucket, plan.size.snapped, group, record)


# ---------------------------------------------------------------- the stage

class FusionStage(ModelStage):
    """Holds the job's model (every component) and the helper models its rows name (loaded on first use, one per
    directory); turns a fused unit into `latent` (clean, in the job's model's latent space) and fills `fusion` with
    the record of what was fused. Plain units pass through.

    Rows of one sub-batch share the mode, helper, weight, window, size, steps, sampler and the control image's
    shape; each row's image equals `coop_generate` / `super_resolve` of that row alone.
    """

    name = "fusion"
    components = COMPONENTS
    serves = "fused"

    def __init__(self, model_dir: str, *, helper_dirs: dict[str, str] | None = None, s3: S3Settings | None = None,
                 split_rule: str = "reference", dtype: str = "float32", **kwargs):
        self.helper_dirs = dict(helper_dirs or {})
        self.s3 = s3
        self.load_options = dict(split_rule=split_rule, dtype=dtype)
        self.helpers: dict[str, PanGuDraw] = {}
        self.controls: dict[str, np.ndarray] = {}
        super().__init__(model_dir, split_rule=split_rule, dtype=dtype, **kwargs)

    # ---------------------------------------------------------------- models and control images

    def helper(self, value: str) -> PanGuDraw:
        """The loaded helper model of a `helper_model` value (one instance per directory)."""
        directory = self.helper_dirs.get(value)
        if directory is None or not Path(directory).is_dir():
            # A builtin built on the driver's node only: build (the same deterministic weights) here.
            directory = str(resolve_helper_model(value))
        model = self.helpers.get(directory)
        if model is None:
            model = self.helpers[directory] = PanGuDraw.load(directory, device=self.device, **self.load_options)
            log.info("fusion: helper %s loaded from %s", model.identity.get("name"), directory)
        return model

    def prepare(self, units: list[dict]) -> None:
        """Read the control images of this block's fused units; a unit whose image cannot be read fails alone."""
        self.controls = {}
        for unit in units:
            uri = json.loads(unit["fusion"]).get("control_image_uri")
            if uri is None or uri in self.controls:
                continue
            try:
                self.controls[uri] = read_control_image(uri, self.s3)
            except Exception as exc:  # noqa: BLE001 - a missing or broken image fails its rows only
                self.controls[uri] = exc
        for unit in units:
            uri = json.loads(unit["fusion"]).get("control_image_uri")
            problem = self.controls.get(uri) if uri is not None else None
            if isinstance(problem, Exception):
                log.warning("fusion: row %r: control image %s cannot be read: %s", unit["row_id"], uri, problem)
                unit.update(status=FAILED, error=f"fusion: control image {uri} cannot be read "
                                                 f"({type(problem).__name__}: {problem})"[:500])

    def group_of(self, unit: dict) -> str:
        uri = json.loads(unit["fusion"]).get("control_image_uri")
        return unit["group"] if uri is None else f"{unit['group']}|control {self.controls[uri].shape}"

    # ---------------------------------------------------------------- one sub-batch

    def process(self, units, requests):
        row = load_row(units[0]["row"])
        first = json.loads(units[0]["fusion"])
        helper = self.helper(row.helper_model)
        if first["mode"] == SUPER_RESOLUTION:
            latents, details = self.super_resolve(helper, requests, tuple(first["output_size"]))
        else:
            controls = None
            if first["mode"] == CONTROL:
                controls = [self.controls[json.loads(u["fusion"])["control_image_uri"]] for u in units]
            latents, details = self.fuse(helper, requests, row.helper_weight, row.helper_window, controls)
        details.update(helper_name=helper.identity.get("name"), helper_hash=helper.identity.get("hash"))
        updates = []
        for unit, latent in zip(units, latents):
            record = json.dumps({**json.loads(unit["fusion"]), **details}, sort_keys=True)
            if not np.isfinite(latent).all():
                update = failed_update(self.name, "the latent has non-finite values (NaN or inf)")
            else:
                update = {"latent": pack({"latent": latent.astype(np.float32)})}
            updates.append({**update, "fusion": record})
        return updates

    def fuse(self, helper: PanGuDraw, requests: list[GenerationRequest], weight: float,
             window: tuple[float, float], controls: list[np.ndarray] | None) -> tuple[np.ndarray, dict]:
        """Latent bridge or control: `coop_generate` of the batch with one helper."""
        from diffusion import coop

        n = len(requests)
        if controls is None:
            (padded,) = self.padded(requests)
            control = None
        else:
            padded, padded_controls = self.padded(requests, controls)
            control = np.stack(padded_controls)
        fusion = coop.CoopFusion(self.model, padded, [coop.CoopHelper(helper, weight, tuple(window),
                                                                      control_image=control)])
        latents = fusion.sample(self.model.encode(padded))[:n]
        (record,) = fusion.record()
        out = {"bridge": record["bridge"], "latent": list(fusion.plan.latent_shape),
               "helper_latent": list(fusion.links[0].plan.latent_shape), "fused_steps": record["steps"]}
        if record["control_mode"] is not None:
            out["control_mode"] = record["control_mode"]  # "input": a control model read it; "latents": seen in latents
        return latents, out

    def super_resolve(self, low: PanGuDraw, requests: list[GenerationRequest],
                      output_size: tuple[int, int]) -> tuple[np.ndarray, dict]:
        """One-stage super-resolution: the helper (low) for t >= t_switch, the job's model (high) for the rest."""
        from diffusion import coop

        n = len(requests)
        (padded,) = self.padded(requests)
        sr = coop.plan_super_resolution(low, self.model, padded, SUPER_RESOLUTION_T_SWITCH, output_size=output_size)
        x0_low = coop.low_stage(low, sr)
        latents = coop.high_stage(self.model, sr, coop.handover(low, self.model, sr, x0_low))[:n]
        return latents, {"low_latent": list(sr.low_shape), "latent": list(sr.high_shape), "steps": sr.steps,
                         "handover_step": sr.handover_step, "handover_timestep": sr.handover_timestep,
                         "handover_sigma": sr.handover_sigma}


def read_control_image(uri: str, s3: S3Settings | None = None) -> np.ndarray:
    """A control image as uint8 (H, W, 3) RGB, from a file or S3 URI or a path."""
    from PIL import Image

    from storage import read_uri

    with Image.open(io.BytesIO(read_uri(uri, s3))) as image:
        return np.asarray(image.convert("RGB"), dtype=np.uint8).copy()

