"""The store interface, run against a local directory and an S3 server over HTTP."""
from __future__ import annotations

import logging
import threading

import boto3
import pyarrow as pa
import pyarrow.dataset as pads
import pytest
from botocore.exceptions import ClientError
from botocore.stub import Stubber

from conftest import FAKE_ACCESS_KEY_ID, FAKE_SECRET_ACCESS_KEY
from schemas.errors import UserError
from schemas.job import S3Settings
from storage import LocalStore, NotFound, open_store, read_uri, split_uri
from storage.s3 import S3Store


@pytest.fixture(params=["local", "s3"])
def store_root(request, tmp_path):
    """Root URI of an empty store of each kind."""
    if request.param == "local":
        return (tmp_path / "store").as_uri()
    bucket = request.getfixturevalue("s3_bucket")
    return f"s3://{bucket}/jobs/run1"


def test_put_get_exists_list_delete(store_root):
    store = open_store(store_root)
    store.put("images/a.png", b"\x89PNG a")
    store.put("images/b.png", b"\x89PNG b", content_type="image/png")
    store.put("images2/c.png", b"c")
    store.put("job.json", b"{}")
    assert store.get("images/a.png") == b"\x89PNG a"
    assert store.exists("images/b.png") and not store.exists("images/zz.png")
    assert store.list() == ["images/a.png", "images/b.png", "images2/c.png", "job.json"]
    assert store.list("images/") == ["images/a.png", "images/b.png"]
    assert store.list("images") == ["images/a.png", "images/b.png", "images2/c.png"]
    assert store.list("nothing/") == []
    store.put("images/a.png", b"replaced")
    assert store.get("images/a.png") == b"replaced"
    store.delete("images/a.png")
    store.delete("images/a.png")  # deleting a missing key is fine
    assert not store.exists("images/a.png")
    assert store.list("images/") == ["images/b.png"]
    with pytest.raises(NotFound):
        store.get("images/a.png")


def test_put_if_absent_keeps_first(store_root):
    store = open_store(store_root)
    assert store.put_if_absent("results/part-00000.parquet", b"first") is True
    assert store.put_if_absent("results/part-00000.parquet", b"second") is False
    assert store.get("results/part-00000.parquet") == b"first"
    assert store.list("results/") == ["results/part-00000.parquet"]


def test_parquet_round_trip(store_root):
    store = open_store(store_root)
    table = pa.table({"row_id": ["a", "b", "c"], "seed": pa.array([1, 2**63 - 1, 0], pa.int64()),
                      "score": [0.5, None, 1.5]})
    store.write_parquet("results/part-00000.parquet", table)
    back = store.read_parquet("results/part-00000.parquet")
    assert back.equals(table)
    with pytest.raises(NotFound):
        store.read_parquet("results/missing.parquet")


def test_arrow_filesystem_reads_a_prefix_of_shards(store_root):
    store = open_store(store_root)
    for shard in range(3):
        ids = [f"row-{shard}-{i}" for i in range(4)]
        store.write_parquet(f"results/part-{shard:05d}.parquet", pa.table({"row_id": ids, "shard": [shard] * 4}))
    store.put("results_other/x.parquet", b"not read")
    fs, base = store.arrow_filesystem()
    table = pads.dataset(f"{base}/results", filesystem=fs, format="parquet").to_table()
    assert table.num_rows == 12
    assert sorted(table.column("row_id").to_pylist()) == sorted(f"row-{s}-{i}" for s in range(3) for i in range(4))
    assert sorted(set(table.column("shard").to_pylist())) == [0, 1, 2]


def test_uri_for_and_read_uri(store_root):
    store = open_store(store_root)
    store.put("control/edge map.png", b"edges")
    uri = store.uri_for("control/edge map.png")
    assert uri.startswith(store_root.split("://")[0] + "://")
    assert read_uri(uri) == b"edges"
    root, key = split_uri(uri)
    assert key == "edge map.png" and open_store(root).get(key) == b"edges"


@pytest.mark.parametrize("key", ["../escape", "/abs/key", "a//b", "a/../../b", "a\\b", "", "a/./b", "bad\x00key",
                                 "new\nline", "dir/"])
def test_unsafe_keys_rejected(store_root, key):
    store = open_store(store_root)
    for call in (lambda: store.put(key, b"x"), lambda: store.get(key), lambda: store.put_if_absent(key, b"x"),
                 lambda: store.delete(key), lambda: store.exists(key)):
        with pytest.raises(ValueError):
            call()
    assert store.list() == []


def test_local_writes_stay_under_root_and_leave_no_temp_files(tmp_path):
    store = open_store(str(tmp_path / "root"))
    with pytest.raises(ValueError):
        store.put("../outside.txt", b"x")
    assert not (tmp_path / "outside.txt").exists()
    store.put("a/b.bin", b"1")
    store.put_if_absent("a/c.bin", b"2")
    store.write_parquet("a/d.parquet", pa.table({"x": [1]}))
    assert sorted(p.name for p in (tmp_path / "root" / "a").iterdir()) == ["b.bin", "c.bin", "d.parquet"]
    assert isinstance(store, LocalStore) and store.root_uri == (tmp_path / "root").as_uri()


def test_temporaries_of_a_killed_writer_are_skipped_then_removed(tmp_path):
    store = open_store(str(tmp_path / "root"))
    store.put("images/a.png", b"a")
    store.put("results/s.parquet", b"s")
    left = tmp_path / "root" / "images" / "sub" / (".b.png." + "0123456789abcdef" * 2 + ".part")
    left.parent.mkdir(parents=True)
    left.write_bytes(b"half")
    lookalike = tmp_path / "root" / "images" / ".notes.part"  # not a temporary's name: kept
    lookalike.write_bytes(b"n")
    other = tmp_path / "root" / "results" / (".s.parquet." + "f" * 32 + ".part")
    other.write_bytes(b"x")
    assert store.list("images/") == ["images/.notes.part", "images/a.png"]
    assert store.remove_temporaries("images/") == [f"images/sub/{left.name}"]
    assert not left.exists() and lookalike.exists() and other.exists() and store.get("images/a.png") == b"a"
    assert store.remove_temporaries("images/") == []
    assert store.remove_temporaries() == [f"results/{other.name}"]


def test_local_put_if_absent_race_has_one_winner(tmp_path):
    store = open_store(str(tmp_path))
    results: dict[int, bool] = {}
    start = threading.Barrier(8)

    def writer(i: int) -> None:
        start.wait(timeout=10)
        results[i] = store.put_if_absent("_SUCCESS.json", f"writer {i}".encode())

    threads = [threading.Thread(target=writer, args=(i,)) for i in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=10)
    winners = [i for i, won in results.items() if won]
    assert len(results) == 8 and len(winners) == 1
    assert store.get("_SUCCESS.json") == f"writer {winners[0]}".encode()
    assert store.list() == ["_SUCCESS.json"]


def test_split_uri_forms():
    assert split_uri("s3://bkt/a/b/c.parquet") == ("s3://bkt/a/b", "c.parquet")
    assert split_uri("s3://bkt/c.parquet") == ("s3://bkt", "c.parquet")
    assert split_uri("file:///data/in/p.parquet") == ("file:///data/in", "p.parquet")
    assert split_uri("/data/in/p.parquet") == ("/data/in", "p.parquet")
    assert split_uri("p.parquet") == (".", "p.parquet")
    for bad in ("s3://bkt", "s3://bkt/", "gs://b/x", "/data/in/"):
        with pytest.raises(UserError):
            split_uri(bad)


def test_open_store_rejects_unknown_scheme_and_bad_bucket():
    with pytest.raises(UserError, match="unsupported storage scheme 'gs'"):
        open_store("gs://bucket/x")
    with pytest.raises(UserError, match="not a valid S3 bucket name"):
        open_store("s3://Bad_Bucket/x")


# ---------------------------------------------------------------- S3 specifics

def test_s3_explicit_settings_without_environment(s3_bucket, s3_server, monkeypatch):
    for name in s3_server.env:
        monkeypatch.delenv(name)
    settings = S3Settings(endpoint_url=s3_server.endpoint_url, region="us-east-1", access_key_id=FAKE_ACCESS_KEY_ID,
                          secret_access_key=FAKE_SECRET_ACCESS_KEY, addressing_style="path", max_attempts=2)
    store = open_store(f"s3://{s3_bucket}/p", settings)
    store.write_parquet("results/part-00000.parquet", pa.table({"v": [1, 2, 3]}))
    fs, base = store.arrow_filesystem()
    assert base == f"{s3_bucket}/p"
    assert pads.dataset(f"{base}/results", filesystem=fs).to_table().column("v").to_pylist() == [1, 2, 3]
    assert read_uri(f"s3://{s3_bucket}/p/results/part-00000.parquet", settings)[:4] == b"PAR1"


def test_s3_credentials_absent_from_reprs_logs_and_errors(s3_bucket, caplog):
    caplog.set_level(logging.DEBUG)
    settings = S3Settings(access_key_id=FAKE_ACCESS_KEY_ID, secret_access_key=FAKE_SECRET_ACCESS_KEY)
    store = open_store(f"s3://{s3_bucket}/p", settings)
    store.put("a.txt", b"x")
    assert store.get("a.txt") == b"x"
    store.put_if_absent("a.txt", b"y")
    with pytest.raises(UserError) as missing_bucket:
        open_store("s3://no-such-bucket-here/p", settings).put("a.txt", b"x")
    texts = [repr(store), str(store), repr(settings), str(settings), settings.model_dump_json(),
             str(settings.model_dump()), str(missing_bucket.value), caplog.text]
    for text in texts:
        assert FAKE_SECRET_ACCESS_KEY not in text
    # Our own log records and messages carry no part of the credentials either (botocore's DEBUG output
    # names the access key id in the signed Authorization header, never the secret).
    ours = " ".join(r.getMessage() for r in caplog.records if r.name.startswith("storage"))
    assert FAKE_ACCESS_KEY_ID not in ours + repr(store) + str(missing_bucket.value) + repr(settings)


def test_s3_missing_bucket_is_a_user_error(s3_env):
    store = open_store("s3://no-such-bucket-anywhere/out")
    with pytest.raises(UserError, match="bucket 'no-such-bucket-anywhere' does not exist"):
        store.put("job.json", b"{}")
    with pytest.raises(UserError, match="does not exist"):
        store.list()


def test_s3_unreachable_endpoint_is_a_user_error(monkeypatch, tmp_path):
    import socket

    with socket.socket() as sock:  # a port that nothing listens on
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    monkeypatch.setenv("AWS_CONFIG_FILE", str(tmp_path / "none"))
    settings = S3Settings(endpoint_url=f"http://user:pw@127.0.0.1:{port}", access_key_id=FAKE_ACCESS_KEY_ID,
                          secret_access_key=FAKE_SECRET_ACCESS_KEY, max_attempts=1, connect_timeout_s=2)
    with pytest.raises(UserError, match=f"cannot reach the S3 endpoint http://127.0.0.1:{port}") as err:
        open_store("s3://some-bucket/x", settings).get("a.txt")
    assert "pw" not in str(err.value)


def test_s3_access_denied_is_a_user_error(s3_env):
    store = open_store("s3://locked-bucket/x")
    with Stubber(store._client) as stub:
        stub.add_client_error("get_object", service_error_code="AccessDenied", http_status_code=403)
        with pytest.raises(UserError, match=r"S3 denied reading s3://locked-bucket/x/a.txt \(AccessDenied\)"):
            store.get("a.txt")


def test_s3_put_if_absent_falls_back_when_conditional_writes_are_not_implemented(s3_bucket, monkeypatch):
    store = open_store(f"s3://{s3_bucket}")
    assert isinstance(store, S3Store)
    real_put = store._client.put_object
    conditional_calls = []

    def put_without_conditions(**kwargs):
        if "IfNoneMatch" in kwargs:
            conditional_calls.append(kwargs["Key"])
            raise ClientError({"Error": {"Code": "NotImplemented", "Message": "If-None-Match"},
                               "ResponseMetadata": {"HTTPStatusCode": 501}}, "PutObject")
        return real_put(**kwargs)

    monkeypatch.setattr(store._client, "put_object", put_without_conditions)
    assert store.put_if_absent("k", b"first") is True
    assert store.put_if_absent("k", b"second") is False
    assert store.get("k") == b"first"
    assert conditional_calls == ["k"]  # asked once, then remembered the store cannot


def test_s3_store_reads_objects_written_by_another_client(s3_bucket, s3_env):
    boto3.client("s3", endpoint_url=s3_env.endpoint_url).put_object(Bucket=s3_bucket, Key="in/m.parquet", Body=b"raw")
    store = open_store(f"s3://{s3_bucket}/in/")
    assert store.list() == ["m.parquet"]
    assert store.uri_for("m.parquet") == f"s3://{s3_bucket}/in/m.parquet"
