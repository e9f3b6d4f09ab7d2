"""Shared fixtures. S3 tests talk to moto's S3 server over real HTTP on 127.0.0.1."""
from __future__ import annotations

import json
import os
import time
import uuid
from dataclasses import dataclass, field

import pytest

# Fake credentials: tests assert that these strings never leak into reprs, logs or messages.
FAKE_ACCESS_KEY_ID = "AKIAFAKETESTKEY12345"
FAKE_SECRET_ACCESS_KEY = "fake-secret-0f1e2d3c4b5a69788796a5b4c3d2e1f0"


@dataclass(frozen=True)
class S3Server:
    """A running S3 endpoint and the environment that points boto3 and pyarrow at it."""

    endpoint_url: str
    env: dict[str, str] = field(default_factory=dict)


@pytest.fixture(scope="session")
def s3_server():
    from moto.server import ThreadedMotoServer

    server = ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
    server.start()
    try:
        host, port = server.get_host_and_port()
        endpoint = f"http://{host}:{port}"
        yield S3Server(endpoint_url=endpoint, env={
            "AWS_ENDPOINT_URL": endpoint,
            "AWS_ACCESS_KEY_ID": FAKE_ACCESS_KEY_ID,
            "AWS_SECRET_ACCESS_KEY": FAKE_SECRET_ACCESS_KEY,
            "AWS_REGION": "us-east-1",
            "AWS_DEFAULT_REGION": "us-east-1",
        })
    finally:
        server.stop()


@pytest.fixture
def s3_env(s3_server, monkeypatch, tmp_path):
    """The S3 server's environment, set for this test only; user AWS config files are hidden."""
    for name in ("AWS_PROFILE", "AWS_SESSION_TOKEN", "AWS_ENDPOINT_URL_S3"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("AWS_CONFIG_FILE", str(tmp_path / "no-aws-config"))
    monkeypatch.setenv("AWS_SHARED_CREDENTIALS_FILE", str(tmp_path / "no-aws-credentials"))
    for name, value in s3_server.env.items():
        monkeypatch.setenv(name, value)
    return s3_server


@pytest.fixture
def s3_bucket(s3_env):
    """A fresh, empty bucket on the S3 server (env set as in `s3_env`); yields its name."""
    import boto3

    name = f"test-{uuid.uuid4().hex[:16]}"
    boto3.client("s3", endpoint_url=s3_env.endpoint_url).create_bucket(Bucket=name)
    yield name


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory):
    """A random tiny model directory (`tiny_config()`, seed 0), built once per test session. Its images are noise."""
    from diffusion.tiny import build_random_model

    return build_random_model(tmp_path_factory.mktemp("tiny-model") / "model", seed=0)


def _recycle_mindspore_memory() -> None:
    import sys

    if "mindspore" in sys.modules:
        import gc

        gc.collect()
        sys.modules["mindspore"].ms_memory_recycle()


@pytest.fixture(scope="module", autouse=True)
def _recycle_mindspore_memory_after_each_file():
    """After each test file (its module fixtures torn down first): MindSpore keeps every compiled graph's runtime
    memory for the life of the process, so a test worker would otherwise grow file by file (past 13 GB in one full
    run). `ms_memory_recycle` lets the next graphs reuse it; a model still alive afterwards recompiles on its next
    call."""
    yield
    _recycle_mindspore_memory()


@pytest.fixture(autouse=True)
def _recycle_mindspore_memory_after_each_test(request):
    """The same after each test, in files that set `RECYCLE_AFTER_EACH_TEST = True`: those whose tests each build
    and train their own models (test_training.py grew a worker by 1.2-1.8 GB a test, to 12 GB)."""
    yield
    if getattr(request.module, "RECYCLE_AFTER_EACH_TEST", False):
        _recycle_mindspore_memory()


# PANGUDRAW_TEST_MEMORY_LOG=FILE: one JSON line per test with its worker's resident memory after it (MindSpore keeps
# each compiled graph for the life of the process, so a worker grows file by file; this shows which files grow it).
# A teardown hook, so only the process that ran the test writes (not xdist's controller), after its fixtures.
_MEMORY_LOG = os.environ.get("PANGUDRAW_TEST_MEMORY_LOG")
if _MEMORY_LOG:
    @pytest.hookimpl(trylast=True)
    def pytest_runtest_teardown(item, nextitem):
        with open("/proc/self/statm") as f:
            rss = int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
        with open(_MEMORY_LOG, "a") as f:
            f.write(json.dumps({"worker": os.environ.get("PYTEST_XDIST_WORKER", "main"), "test": item.nodeid,
                                "rss_gb": round(rss / 2**30, 3), "time": time.time()}) + "\n")
