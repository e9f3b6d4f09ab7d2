"""ray_cluster.yaml passes the checks `ray up` makes, and its start commands declare what its nodes have."""
import copy
import json
import re
import shlex
from pathlib import Path

import jsonschema
import pytest
import ray.autoscaler
import yaml
from ray.autoscaler._private.util import prepare_config, validate_config

CONFIG_PATH = Path(__file__).resolve().parent.parent / "ray_cluster.yaml"
RAY_SCHEMA_PATH = Path(ray.autoscaler.__file__).parent / "ray-schema.json"


@pytest.fixture(scope="module")
def config():
    return yaml.safe_load(CONFIG_PATH.read_text())


def ray_start_flags(commands):
    """Flags of the one `ray start` invocation among shell commands, as a dict (repeated flags keep the last)."""
    starts = []
    for command in commands:
        for part in re.split(r"&&|;", command):
            words = shlex.split(part)
            if words[:2] == ["ray", "start"]:
                starts.append(words[2:])
    assert len(starts) == 1, f"expected one `ray start`, found {len(starts)} in {commands}"
    flags = {}
    for word in starts[0]:
        assert word.startswith("--"), f"unexpected positional argument {word!r} to ray start"
        name, _, value = word[2:].partition("=")
        flags[name] = value if value else True
    return flags


def test_matches_ray_schema(config):
    schema = json.loads(RAY_SCHEMA_PATH.read_text())
    jsonschema.validate(config, schema)


def test_ray_up_preparation_accepts_it(config):
    # The same steps `ray up` runs before touching a node: merge defaults, prepare the local provider
    # (which refuses available_node_types), validate docker options, then validate the result.
    prepared = prepare_config(copy.deepcopy(config))
    validate_config(prepared)
    node_type = prepared["available_node_types"][prepared["head_node_type"]]
    assert node_type["max_workers"] == len(config["provider"]["worker_ips"])
    assert prepared["docker"]["container_name"] == "pangudraw"
    # setup_commands reach both node kinds.
    assert prepared["worker_setup_commands"][: len(config["setup_commands"])] == config["setup_commands"]
    assert prepared["head_setup_commands"][: len(config["setup_commands"])] == config["setup_commands"]


def test_local_provider_has_head_and_workers(config):
    provider = config["provider"]
    assert provider["type"] == "local"
    assert isinstance(provider["head_ip"], str) and provider["head_ip"]
    assert len(provider["worker_ips"]) >= 1
    assert "available_node_types" not in config


@pytest.mark.parametrize("role, commands_key", [("head", "head_start_ray_commands"), ("worker", "worker_start_ray_commands")])
def test_start_commands_declare_the_node_resources(config, role, commands_key):
    declared = config["metadata"]["pangudraw"]["node_resources"][role]
    flags = ray_start_flags(config[commands_key])
    assert json.loads(flags["resources"]) == {"NPU": declared["NPU"]}
    assert int(flags["num-cpus"]) == declared["CPU"]
    if role == "head":
        assert flags["head"] is True
        assert flags["port"] == "6379"
        assert flags["dashboard-host"] == "0.0.0.0"
        assert flags["autoscaling-config"] == "~/ray_bootstrap_config.yaml"
    else:
        assert flags["address"] == "$RAY_HEAD_IP:6379"
    # Token auth is required, so a node without the shared token fails instead of running open.
    assert any("RAY_AUTH_MODE=token" in command for command in config[commands_key])
    assert config[commands_key][0] == "ray stop"


def test_container_sees_every_declared_npu_and_the_driver(config):
    options = config["docker"]["run_options"]
    devices = sorted(
        int(match.group(1)) for option in options if (match := re.fullmatch(r"--device=/dev/davinci(\d+)", option))
    )
    resources = config["metadata"]["pangudraw"]["node_resources"]
    assert devices == list(range(resources["head"]["NPU"])) == list(range(resources["worker"]["NPU"]))
    for device in ("/dev/davinci_manager", "/dev/devmm_svm", "/dev/hisi_hdc"):
        assert f"--device={device}" in options
    mounts = [option.split()[1].split(":")[0] for option in options if option.startswith("-v ")]
    assert "/usr/local/Ascend/driver" in mounts
    assert "/usr/local/bin/npu-smi" in mounts


def test_setup_installs_the_project_that_file_mounts_copy(config):
    assert config["file_mounts"]["~/pangudraw"] == "."
    assert any("pip install ~/pangudraw" in command for command in config["setup_commands"])
    assert "~/.ray/auth_token" in config["file_mounts"]
    assert "**/.venv" in config["rsync_exclude"]
