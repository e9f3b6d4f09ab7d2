"""Actors per stage from measured stage times: optimal, explained, and honest about efficiency."""
import itertools

import pytest

from jobs.placement import (
    NPU_RESOURCE,
    count_devices,
    evaluate_placement,
    model_actor_options,
    plan_placement,
)
from schemas.errors import UserError

# Seconds per image on one device, shaped like PanGu-Draw at 40 steps (structure runs 21 steps, texture 19
# plus the VAE decode and image encode).
PANGU_STAGES = {"encode": 0.05, "structure": 2.1, "texture": 1.9, "decode": 0.45}


def best_by_brute_force(seconds, devices):
    stages = list(seconds)
    best = 0.0
    for counts in itertools.product(range(1, devices + 1), repeat=len(stages)):
        if sum(counts) > devices:
            continue
        best = max(best, min(n / seconds[s] for n, s in zip(counts, stages)))
    return best


@pytest.mark.parametrize("devices", [4, 5, 8, 11, 16])
def test_plan_matches_exhaustive_search(devices):
    plan = plan_placement(PANGU_STAGES, devices)
    assert sum(plan.actors.values()) == devices
    assert plan.images_per_second == pytest.approx(best_by_brute_force(PANGU_STAGES, devices))


def test_eight_npus_give_most_actors_to_the_denoising_stages():
    plan = plan_placement(PANGU_STAGES, 8)
    assert plan.actors == {"encode": 1, "structure": 3, "texture": 3, "decode": 1}
    assert list(plan.actors) == list(PANGU_STAGES)
    # Texture with 3 actors moves 3/1.9 = 1.579 images/s, structure 3/2.1 = 1.429: structure limits.
    assert plan.bottleneck == "structure"
    assert plan.images_per_second == pytest.approx(3 / 2.1)
    ceiling = 8 / sum(PANGU_STAGES.values())
    assert plan.ceiling_images_per_second == pytest.approx(ceiling)
    assert plan.efficiency == pytest.approx((3 / 2.1) / ceiling)
    assert 0 < plan.efficiency <= 1


def test_balanced_stages_reach_the_ceiling():
    plan = plan_placement({"a": 1.0, "b": 2.0, "c": 3.0}, 12)
    assert plan.actors == {"a": 2, "b": 4, "c": 6}
    assert plan.efficiency == pytest.approx(1.0)
    assert plan.images_per_second == pytest.approx(2.0)


def test_fixed_counts_are_kept_and_the_rest_is_planned():
    plan = plan_placement(PANGU_STAGES, 8, fixed={"structure": 2})
    assert plan.actors["structure"] == 2
    assert sum(plan.actors.values()) == 8
    assert plan.chosen_by == "hand+measured"
    assert plan.bottleneck == "structure"
    assert plan.images_per_second == pytest.approx(2 / 2.1)


def test_fewer_devices_than_stages_share_devices():
    plan = plan_placement(PANGU_STAGES, 2)
    assert plan.actors == {stage: 1 for stage in PANGU_STAGES}
    assert plan.device_per_actor == pytest.approx(0.5)
    assert plan.chosen_by == "shared"
    # Each actor gets half a device: structure moves 0.5 / 2.1 images/s.
    assert plan.images_per_second == pytest.approx(0.5 / 2.1)
    assert plan.ceiling_images_per_second == pytest.approx(2 / 4.5)


def test_evaluate_hand_placement_reports_bottleneck_and_efficiency():
    result = evaluate_placement(PANGU_STAGES, {"encode": 1, "structure": 4, "texture": 2, "decode": 1})
    assert result.devices == 8
    assert result.bottleneck == "texture"
    assert result.images_per_second == pytest.approx(2 / 1.9)
    assert result.chosen_by == "hand"
    dumped = result.model_dump()
    assert dumped["actors"]["structure"] == 4 and dumped["efficiency"] == pytest.approx(result.efficiency)


@pytest.mark.parametrize(
    "call, message",
    [
        (lambda: plan_placement({}, 4), "at least one stage"),
        (lambda: plan_placement({"a": 0.0}, 4), "positive"),
        (lambda: plan_placement({"a": float("nan")}, 4), "positive"),
        (lambda: plan_placement({"a": 1.0}, 0), "at least one device"),
        (lambda: plan_placement({"a": 1.0, "b": 1.0}, 4, fixed={"c": 1}), "unknown stages"),
        (lambda: plan_placement({"a": 1.0, "b": 1.0}, 4, fixed={"a": 4}), "fewer than one device"),
        (lambda: evaluate_placement({"a": 1.0, "b": 1.0}, {"a": 1}), "at least one actor"),
        (lambda: evaluate_placement({"a": 1.0}, {"a": 3}, devices=2), "only 2"),
    ],
)
def test_bad_input_is_a_user_error(call, message):
    with pytest.raises(UserError, match=message):
        call()


def test_actor_options_spread_model_actors_by_npu():
    options = model_actor_options("npu", num_cpus=0.25)
    assert options == {"num_cpus": 0.25, "resources": {NPU_RESOURCE: 1.0}, "scheduling_strategy": "SPREAD"}
    shared = model_actor_options("npu", device_per_actor=0.5)
    assert shared["resources"] == {"NPU": 0.5}
    assert model_actor_options("cpu") == {"num_cpus": 1.0, "scheduling_strategy": "SPREAD"}
    with pytest.raises(UserError):
        model_actor_options("gpu")


def test_count_devices_reads_cluster_resources():
    resources = {"CPU": 192.0, "NPU": 16.0, "memory": 1e12}
    assert count_devices(resources, "npu") == 16
    assert count_devices(resources, "cpu") == 192
    assert count_devices({"CPU": 2.0}, "npu") == 0
