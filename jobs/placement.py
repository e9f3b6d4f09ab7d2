"""How many actors each pipeline stage gets, and where Ray places them.

Every model actor holds one device (an NPU, or a CPU slot on machines without one). A stage with `n` actors
that each take `s` seconds per image moves `n / s` images per second, and a pipeline moves as many images as
its slowest stage. The devices are therefore shared out so that the slowest stage is as fast as it can be.
"""
from __future__ import annotations

import logging
import math
from typing import Mapping

from pydantic import BaseModel, Field

from schemas.errors import UserError

logger = logging.getLogger(__name__)

# Canonical stage order of the PanGu-Draw pipeline; `plan_placement` accepts any other stage names too.
PIPELINE_STAGES = ("encode", "structure", "texture", "decode")

# Ray resource name that the cluster declares for Ascend devices (`ray start --resources='{"NPU": 8}'`).
NPU_RESOURCE = "NPU"


class Placement(BaseModel):
    """Actors per stage and what that choice is expected to deliver."""

    devices: float = Field(description="devices shared out (NPUs or CPU slots)")
    actors: dict[str, int] = Field(description="actors per stage, in pipeline order")
    device_per_actor: float = Field(1.0, description="fraction of a device each actor reserves")
    seconds_per_image: dict[str, float] = Field(description="measured device-seconds per image of each stage")
    images_per_second: float = Field(description="expected throughput of the whole pipeline")
    ceiling_images_per_second: float = Field(description="devices / device-seconds per image summed over stages")
    efficiency: float = Field(description="images_per_second / ceiling_images_per_second")
    bottleneck: str = Field(description="the stage that limits throughput")
    chosen_by: str = Field("measured", description="measured | hand | hand+measured | shared (fewer devices than stages)")


def _validated_seconds(seconds_per_image: Mapping[str, float]) -> dict[str, float]:
    if not seconds_per_image:
        raise UserError("placement needs the seconds per image of at least one stage")
    seconds = {}
    for stage, value in seconds_per_image.items():
        value = float(value)
        if not math.isfinite(value) or value <= 0:
            raise UserError(f"stage {stage!r}: seconds per image must be a positive number, got {value!r}")
        seconds[stage] = value
    return seconds


def stage_rates(seconds_per_image: Mapping[str, float], actors: Mapping[str, float]) -> dict[str, float]:
    """Images per second each stage can move with the given actor counts."""
    return {stage: actors[stage] / seconds for stage, seconds in seconds_per_image.items()}


def evaluate_placement(
    seconds_per_image: Mapping[str, float],
    actors: Mapping[str, int],
    devices: float | None = None,
    device_per_actor: float = 1.0,
    chosen_by: str = "hand",
) -> Placement:
    """Expected throughput and efficiency of a given actor count per stage.

    `devices` defaults to the devices the actors reserve. Actors that share a device
    (`device_per_actor` < 1) take turns on it, so a stage's speed scales with its share.
    """
    seconds = _validated_seconds(seconds_per_image)
    missing = [stage for stage in seconds if actors.get(stage, 0) < 1]
    if missing:
        raise UserError(f"every stage needs at least one actor; none given for {missing}")
    counts = {stage: int(actors[stage]) for stage in seconds}
    reserved = device_per_actor * sum(counts.values())
    devices = reserved if devices is None else float(devices)
    if reserved > devices + 1e-9:
        raise UserError(f"{sum(counts.values())} actors reserve {reserved:g} devices but only {devices:g} are available")
    rates = stage_rates(seconds, {stage: n * device_per_actor for stage, n in counts.items()})
    bottleneck = min(rates, key=rates.get)
    achieved = rates[bottleneck]
    ceiling = devices / sum(seconds.values())
    return Placement(
        devices=devices,
        actors=counts,
        device_per_actor=device_per_actor,
        seconds_per_image=seconds,
        images_per_second=achieved,
        ceiling_images_per_second=ceiling,
        efficiency=achieved / ceiling,
        bottleneck=bottleneck,
        chosen_by=chosen_by,
    )


def plan_placement(
    seconds_per_image: Mapping[str, float],
    devices: int,
    fixed: Mapping[str, int] | None = None,
) -> Placement:
    """Choose actors per stage that maximise pipeline throughput on `devices` devices.

    `fixed` pins the actor count of some stages (set by hand in a job spec); the other stages share the rest.
    With fewer devices than stages, every stage gets one actor and the actors share the devices evenly
    (fractional resources), which still reaches the ceiling when the stages keep each other busy.
    """
    seconds = _validated_seconds(seconds_per_image)
    fixed = dict(fixed or {})
    unknown = sorted(set(fixed) - set(seconds))
    if unknown:
        raise UserError(f"actor counts given for unknown stages {unknown}; stages are {list(seconds)}")
    if devices < 1:
        raise UserError(f"placement needs at least one device, got {devices}")

    if devices < len(seconds):
        if any(n != 1 for n in fixed.values()):
            raise UserError(f"{devices} device(s) for {len(seconds)} stages: each stage can have only one actor")
        share = devices / len(seconds)
        return evaluate_placement(seconds, {s: 1 for s in seconds}, devices, share, chosen_by="shared")

    free = [stage for stage in seconds if stage not in fixed]
    pinned = sum(fixed.values())
    if any(n < 1 for n in fixed.values()) or pinned + len(free) > devices:
        raise UserError(f"fixed actor counts {fixed} leave fewer than one device for each of the stages {free}")

    actors = {stage: fixed.get(stage, 1) for stage in seconds}
    # Water-filling: each spare device goes to the stage that is currently slowest. Raising the minimum
    # one step at a time is optimal for a max-min objective with rates that grow with the count.
    for _ in range(devices - pinned - len(free)):
        if not free:
            break
        slowest = min(free, key=lambda stage: actors[stage] / seconds[stage])
        actors[slowest] += 1
    placement = evaluate_placement(seconds, actors, devices, chosen_by="measured" if not fixed else "hand+measured")
    logger.info(
        "placement on %d devices: %s -> %.3f images/s (efficiency %.2f, bottleneck %s)",
        devices, placement.actors, placement.images_per_second, placement.efficiency, placement.bottleneck,
    )
    return placement


def count_devices(cluster_resources: Mapping[str, float], device: str) -> int:
    """Devices of a kind in `ray.cluster_resources()`: NPUs for 'npu', CPU slots for 'cpu'."""
    key = {"npu": NPU_RESOURCE, "cpu": "CPU"}.get(device)
    if key is None:
        raise UserError(f"unknown device {device!r}; expected 'npu' or 'cpu'")
    return int(cluster_resources.get(key, 0))


def model_actor_options(device: str, device_per_actor: float = 1.0, num_cpus: float = 1.0) -> dict:
    """Ray remote options for one model actor of a stage (for `map_batches(..., **options)` or `.options()`).

    SPREAD places the actors of a pool on as many nodes as hold the resource, so one node's loss costs a
    stage only part of its actors and host memory and PCIe bandwidth are shared evenly.
    """
    if device == "npu":
        return {
            "num_cpus": num_cpus,
            "resources": {NPU_RESOURCE: device_per_actor},
            "scheduling_strategy": "SPREAD",
        }
    if device == "cpu":
        return {"num_cpus": num_cpus * device_per_actor, "scheduling_strategy": "SPREAD"}
    raise UserError(f"unknown device {device!r}; expected 'npu' or 'cpu'")

