"""Manifest rows, job specs, result rows and keys."""
from __future__ import annotations

import hashlib
import json
import re

import pyarrow as pa
import pytest

from schemas.errors import UserError
from schemas.job import SECRET_MASK, GenerationDefaults, JobSpec, S3Settings
from schemas.keys import image_key, is_safe_key, safe_key
from schemas.manifest import (
    ManifestRow, check_manifest_schema, derive_row_id, derive_seed, passthrough_fields, validate_rows,
)
from schemas.result import (
    RESULT_COLUMNS, JobSummary, ResultRow, result_schema, results_from_table, results_to_table,
)

DEFAULTS = GenerationDefaults()


def validate(records, defaults=DEFAULTS, **kw):
    kw.setdefault("source", "s3://bkt/in/prompts.parquet")
    kw.setdefault("start_index", 0)
    return validate_rows(records, defaults=defaults, **kw)


# ---------------------------------------------------------------- manifest rows

def test_defaults_fill_what_a_row_leaves_out():
    defaults = GenerationDefaults(negative_prompt="blurry", steps=30, sampler="ddim", guidance_scale=7.5,
                                  width=768, height=320, num_images=2)
    valid, invalid = validate([{"prompt": "a cat"}, {"prompt": "a dog", "steps": 12, "aspect": "16:9"}], defaults)
    assert invalid == []
    cat, dog = valid
    assert (cat.row_id, cat.row_index) == ("prompts-00000000", 0)
    assert (cat.negative_prompt, cat.steps, cat.sampler, cat.guidance_scale) == ("blurry", 30, "ddim", 7.5)
    assert (cat.aesthetic_scale, cat.anime_scale, cat.photography_scale) == (4.0, 0.0, 0.0)
    assert (cat.width, cat.height, cat.aspect, cat.num_images) == (768, 320, None, 2)
    # A row that asks for its own size replaces the default size instead of clashing with it.
    assert (dog.steps, dog.width, dog.height, dog.aspect) == (12, None, None, "16:9")
    assert dog.aspect_ratio == pytest.approx(16 / 9)


def test_reference_defaults():
    row = validate([{"prompt": "p"}])[0][0]
    assert (row.steps, row.sampler, row.guidance_scale, row.aesthetic_scale, row.anime_scale,
            row.photography_scale, row.num_images, row.negative_prompt, row.width) == \
        (40, "euler", 6.0, 4.0, 0.0, 0.0, 1, "", None)


def test_seed_derivation_is_stable_and_recorded():
    expected = int.from_bytes(hashlib.sha256(b"row-7").digest()[:8], "big") & (2**63 - 1)
    assert derive_seed("row-7") == expected
    (derived, given), _ = validate([{"prompt": "p", "row_id": "row-7"}, {"prompt": "p", "row_id": "x", "seed": 42}])
    assert (derived.seed, derived.seed_derived) == (expected, True)
    assert (given.seed, given.seed_derived) == (42, False)
    again = validate([{"prompt": "other prompt", "row_id": "row-7", "steps": 3}])[0][0]
    assert again.seed == expected
    assert derived.image_seed(0) == expected
    extreme = ManifestRow(row_id="e", prompt="p", seed=2**63 - 1, num_images=3)
    assert [extreme.image_seed(i) for i in range(3)] == [2**63 - 1, 0, 1]


def test_row_ids_derived_from_file_and_position():
    valid, _ = validate([{"prompt": "a"}, {"prompt": "b", "row_id": None}, {"prompt": "c", "row_id": 17}],
                        source="file:///data/batch-3.parquet", start_index=1000)
    assert [r.row_id for r in valid] == ["batch-3-00001000", "batch-3-00001001", "17"]
    assert derive_row_id("s3://b/p/part.snappy.parquet", 5) == "part.snappy-00000005"


def test_nulls_and_nan_count_as_not_given():
    row = validate([{"prompt": "p", "steps": None, "guidance_scale": float("nan"), "seed": None}])[0][0]
    assert (row.steps, row.guidance_scale, row.seed_derived) == (40, 6.0, True)


@pytest.mark.parametrize("field, value, expected", [
    ("steps", "x", "an integer 1..1000"),
    ("steps", 0, "an integer 1..1000"),
    ("steps", 2.5, "an integer 1..1000"),
    ("steps", True, "an integer 1..1000"),
    ("seed", -1, "an integer 0..2**63-1"),
    ("seed", 2**63, "an integer 0..2**63-1"),
    ("sampler", "plms", "one of euler, ddim, euler_ancestral, dpmpp_2m"),
    ("guidance_scale", -0.5, "a number >= 0"),
    ("aesthetic_scale", float("inf"), "a number >= 0"),
    ("anime_scale", "high", "a number >= 0"),
    ("num_images", 17, "an integer 1..16"),
    ("width", 4, "an integer 8..8192"),
    ("aspect", "wide", "'W:H' with positive numbers"),
    ("aspect", "16:0", "'W:H' with positive numbers"),
    ("prompt", "   ", "a non-empty string"),
    ("prompt", 5, "a non-empty string"),
    ("negative_prompt", 3, "a string"),
    ("helper_weight", 1.5, "a number 0..1"),
    ("helper_window", "0.5:0.2", "'start:end' fractions of the sampling steps"),
    ("helper_window", "half", "'start:end' fractions of the sampling steps"),
    ("row_id", "", "a non-empty string"),
])
def test_invalid_value_message_names_row_field_and_expectation(field, value, expected):
    record = {"prompt": "ok prompt", "row_id": "abc", field: value}
    if field == "width":
        record["height"] = 512
    if field.startswith("helper_"):
        record["helper_model"] = "sd15"
    valid, invalid = validate([record], start_index=17)
    assert valid == []
    (bad,) = invalid
    shown_id = "abc" if field != "row_id" else "prompts-00000017"
    assert bad.row_index == 17 and bad.row_id == shown_id and bad.source == "s3://bkt/in/prompts.parquet"
    assert bad.message.startswith(f"row 17 (id '{shown_id}'): field '{field}': expected {expected}")
    assert f"got {value!r}"[:20] in bad.message


def test_missing_prompt_and_several_errors_in_one_message():
    _, (bad,) = validate([{"row_id": "r1", "steps": 0, "sampler": "x"}], start_index=3)
    assert bad.message.startswith("row 3 (id 'r1'): ")
    assert "field 'prompt': expected a non-empty string, got nothing" in bad.message
    assert "field 'steps': expected an integer 1..1000, got 0" in bad.message
    assert "field 'sampler': expected one of euler" in bad.message


@pytest.mark.parametrize("record, fragment", [
    ({"width": 512}, "field 'height': expected together with 'width', got nothing"),
    ({"width": 512, "height": 512, "aspect": "1:1"}, "field 'aspect': expected either width/height or aspect"),
    ({"output_width": 1024}, "field 'output_height': expected together with 'output_width'"),
    ({"width": 1024, "height": 1024, "output_width": 512, "output_height": 512},
     "field 'output_width': expected an output size of at least the generation size 1024x1024, got 512x512"),
    ({"helper_weight": 0.3}, "field 'helper_weight': expected only together with helper_model"),
    ({"control_image_uri": "s3://b/edge.png"}, "field 'control_image_uri': expected only together with helper_model"),
])
def test_cross_field_errors(record, fragment):
    _, (bad,) = validate([{"prompt": "p", "row_id": "x", **record}], start_index=2)
    assert bad.message.startswith("row 2 (id 'x'): ")
    assert fragment in bad.message


def test_coop_diffusion_fields():
    row = validate([{"prompt": "p", "helper_model": "s3://models/sd15", "control_image_uri": "s3://b/c.png",
                     "width": 512, "height": 512, "output_width": 1024, "output_height": 1024}])[0][0]
    assert (row.helper_weight, row.helper_window, row.helper_window_text()) == (0.5, (0.0, 1.0), "0:1")
    row = validate([{"prompt": "p", "helper_model": "sd15", "helper_weight": 0.25, "helper_window": "0:0.4"}])[0][0]
    assert (row.helper_weight, row.helper_window) == (0.25, (0.0, 0.4))
    plain = validate([{"prompt": "p"}])[0][0]
    assert (plain.helper_model, plain.helper_weight, plain.helper_window) == (None, None, None)


def test_duplicate_ids_later_rows_invalid_across_batches():
    seen: dict[str, int] = {}
    v1, i1 = validate([{"prompt": "a", "row_id": "x"}, {"prompt": "b", "row_id": "y"},
                       {"prompt": "c", "row_id": "x"}], seen_ids=seen)
    v2, i2 = validate([{"prompt": "d", "row_id": "y"}, {"prompt": "e", "row_id": "z"}], start_index=3, seen_ids=seen)
    assert [r.prompt for r in v1 + v2] == ["a", "b", "e"]
    assert [(r.row_id, r.row_index) for r in i1 + i2] == [("x", 2), ("y", 3)]
    assert i1[0].message == "row 2 (id 'x'): field 'row_id': expected a unique id, got 'x' again (first used by row 0)"
    assert "first used by row 1" in i2[0].message
    # Without a shared dict, duplicates are still found within one call.
    _, dup = validate([{"prompt": "a", "row_id": 5}, {"prompt": "b", "row_id": "5"}])
    assert [d.row_index for d in dup] == [1]


def test_unknown_columns_pass_through_unchanged():
    record = {"prompt": "p", "row_id": "r", "caption_source": "laion", "score": 0.75, "tags": ["a", "b"]}
    row = validate([record])[0][0]
    assert row.passthrough == {"caption_source": "laion", "score": 0.75, "tags": ["a", "b"]}
    _, (bad,) = validate([{**record, "steps": -1}])
    assert bad.passthrough == row.passthrough and bad.prompt == "p"


def test_manifest_schema_checks():
    good = pa.schema([("prompt", pa.string()), ("row_id", pa.int64()), ("seed", pa.int64()),
                      ("steps", pa.float64()), ("aspect", pa.dictionary(pa.int32(), pa.string())),
                      ("negative_prompt", pa.null()), ("extra", pa.list_(pa.int8()))])
    check_manifest_schema(good, "m.parquet")
    with pytest.raises(UserError, match=r"manifest m.parquet has no 'prompt' column \(it has: text, id\); add a string"):
        check_manifest_schema(pa.schema([("text", pa.string()), ("id", pa.string())]), "m.parquet")
    with pytest.raises(UserError) as err:
        check_manifest_schema(pa.schema([("prompt", pa.int64()), ("seed", pa.float64()), ("steps", pa.string())]),
                              "s3://b/m.parquet")
    message = str(err.value)
    assert message.startswith("manifest s3://b/m.parquet: ")
    assert "column 'prompt' is int64, expected a string column" in message
    assert "column 'seed' is double, expected an integer column" in message
    assert "column 'steps' is string, expected a numeric column" in message
    assert passthrough_fields(good).names == ["extra"]


# ---------------------------------------------------------------- keys

UNSAFE_IDS = ["../etc/passwd", "a/b", "a\\b", "..", ".", ".hidden", "x" * 129, "", "tab\there", "nul\x00", "a..b",
              "trailing.", "中文提示", "a b", "a/../b", "name-h0123456789abcdef0123"]


@pytest.mark.parametrize("row_id", UNSAFE_IDS)
def test_safe_key_maps_unsafe_ids(row_id):
    key = safe_key(row_id)
    assert key != row_id
    assert "/" not in key and "\\" not in key and ".." not in key and not key.startswith(".")
    assert 0 < len(key) <= 128 and re.fullmatch(r"[A-Za-z0-9._-]+", key)
    assert safe_key(row_id) == key  # deterministic
    assert not is_safe_key(row_id)


def test_safe_key_keeps_safe_ids_and_separates_distinct_ids():
    for row_id in ["abc", "row-00000017", "A_b.c-9", "x" * 128]:
        assert safe_key(row_id) == row_id
    ids = UNSAFE_IDS + ["a_b", "a-b", "a.b", "ab", "a?b", "a*b", "a%2Fb"] + [f"p/{i}" for i in range(500)]
    keys = [safe_key(i) for i in ids]
    assert len(set(keys)) == len(set(ids))
    # An id spelled like another id's mapped key is mapped too, so the two never share a key.
    mapped = safe_key("a/b")
    assert safe_key(mapped) != mapped and not is_safe_key(mapped)


def test_image_key_layout():
    assert image_key("abc", 0, 1, "png") == "images/abc.png"
    assert image_key("a/b", 0, 1, ".JPG") == f"images/{safe_key('a/b')}.jpg"
    assert image_key("abc", 2, 4, "webp") == "images/abc/2.webp"
    with pytest.raises(ValueError):
        image_key("abc", 1, 1, "png")


# ---------------------------------------------------------------- job spec

def test_job_spec_yaml_and_json_load(tmp_path):
    yaml_path = tmp_path / "job.yaml"
    yaml_path.write_text(
        "manifest: s3://bkt/prompts/\n"
        "model: ./models/tiny\n"
        "defaults:\n  steps: 20\n  sampler: dpmpp_2m\n  width: 768\n  height: 320\n"
        "stages:\n  device: npu\n  actors: {structure: 3, texture: 2}\n  image_format: jpeg\n  quality: 90\n"
        "s3:\n  endpoint_url: https://obs.example.com\n  access_key_id: AKIDX\n  secret_access_key: s3cr3t-value\n"
        "  addressing_style: virtual\n"
    )
    spec = JobSpec.from_file(yaml_path)
    assert (spec.defaults.steps, spec.defaults.sampler, spec.defaults.width) == (20, "dpmpp_2m", 768)
    assert spec.stages.actors.chosen() == {"structure": 3, "texture": 2}
    assert spec.stages.image_extension == "jpg" and spec.s3.retry_mode == "standard"
    assert spec.s3.secret_access_key.get_secret_value() == "s3cr3t-value"
    assert spec.job_id.startswith("prompts-") and len(spec.job_id) == len("prompts-") + 10
    assert spec.output == f"./outputs/{spec.job_id}"

    json_path = tmp_path / "job.json"
    json_path.write_text(json.dumps(spec.job_json()))
    again = JobSpec.from_file(json_path)
    assert again.job_id == spec.job_id and again.defaults == spec.defaults and again.stages == spec.stages
    assert again.s3.secret_access_key is None  # a masked secret loads as "not set"


def test_job_id_stable_for_generation_relevant_spec_only():
    base = JobSpec(manifest="s3://bkt/in/prompts.parquet")
    assert base.job_id == JobSpec(manifest="s3://bkt/in/prompts.parquet").job_id
    same = JobSpec(manifest="s3://bkt/in/prompts.parquet", stages={"batch_size": 8, "actors": {"encode": 2}},
                   s3={"max_attempts": 3}, output="s3://bkt/out")
    assert same.job_id == base.job_id
    for changed in ({"defaults": {"steps": 41}}, {"model": "other"}, {"stages": {"image_format": "webp"}},
                    {"manifest": "s3://bkt/in/prompts2.parquet"}):
        assert JobSpec(**{"manifest": "s3://bkt/in/prompts.parquet", **changed}).job_id != base.job_id
    assert JobSpec(manifest="m.parquet", job_id="my-run.1").output == "./outputs/my-run.1"


def test_job_spec_errors_name_file_and_field(tmp_path):
    path = tmp_path / "bad.yaml"
    path.write_text("manifest: m.parquet\ndefaults:\n  steps: 0\n  samplr: euler\nstages:\n  image_format: gif\n"
                    "s3:\n  secret_access_key: [1, 2]\n")
    with pytest.raises(UserError) as err:
        JobSpec.from_file(path)
    message = str(err.value)
    assert message.startswith(f"{path}: ")
    assert "field 'defaults.steps': expected an integer 1..1000 (got 0)" in message
    assert "field 'defaults.samplr': not a known field" in message
    assert "field 'stages.image_format'" in message and "'gif'" in message
    assert "field 's3.secret_access_key'" in message and "[1, 2]" not in message
    with pytest.raises(UserError, match="field 'manifest': required"):
        JobSpec.from_dict({}, source="x.json")
    with pytest.raises(UserError, match="job_id"):
        JobSpec.from_dict({"manifest": "m", "job_id": "../up"})
    (tmp_path / "broken.json").write_text("{not json")
    with pytest.raises(UserError, match="broken.json is not valid JSON"):
        JobSpec.from_file(tmp_path / "broken.json")
    with pytest.raises(UserError, match="cannot read job spec"):
        JobSpec.from_file(tmp_path / "missing.yaml")


def test_secrets_masked_in_dumps():
    spec = JobSpec(manifest="m.parquet", s3=S3Settings(access_key_id="AKIDSECRET", secret_access_key="topsecret",
                                                       session_token="tok3n"))
    for text in (json.dumps(spec.job_json()), spec.model_dump_json(), str(spec.model_dump()), repr(spec), str(spec)):
        for secret in ("AKIDSECRET", "topsecret", "tok3n"):
            assert secret not in text
    assert spec.job_json()["s3"]["secret_access_key"] == SECRET_MASK
    revealed = spec.s3.model_dump(context={"reveal_secrets": True})
    assert revealed["secret_access_key"] == "topsecret"


# ---------------------------------------------------------------- results

def _ok_row(row: ManifestRow, **kw) -> ResultRow:
    return ResultRow.from_row(row, status="ok", image_uri=f"s3://b/out/images/{row.key}.png",
                              image_key=f"images/{row.key}.png", width=512, height=512, bucket=5,
                              size_snapped=False, model_name="tiny", model_hash="ab" * 32, sha256="cd" * 32,
                              bytes=1234, encode_s=0.1, structure_s=1.0, texture_s=0.9, decode_s=0.2, write_s=0.01,
                              started_at="2026-01-01T00:00:00.000Z", finished_at="2026-01-01T00:00:02.500Z", **kw)


def test_result_rows_to_table_and_back():
    manifest = pa.table({"prompt": ["a", "b"], "row_id": ["r1", "r/2"], "score": [0.5, None],
                         "status": ["draft", "final"]})
    passthrough = passthrough_fields(manifest.schema)
    valid, invalid = validate(manifest.to_pylist() + [{"prompt": "c", "steps": "x", "score": 0.1, "status": "q"}])
    rows = [_ok_row(valid[0]), _ok_row(valid[1], fusion=json.dumps({"helpers": []})),
            ResultRow.from_invalid(invalid[0])]
    table = results_to_table(rows, passthrough)
    assert table.schema == result_schema(passthrough)
    assert table.schema.names[: len(RESULT_COLUMNS)] == list(RESULT_COLUMNS)
    # A pass-through column named like a result column is kept under a prefix, not lost.
    assert table.schema.names[len(RESULT_COLUMNS):] == ["score", "manifest_status"]
    assert table.column("status").to_pylist() == ["ok", "ok", "invalid"]
    assert table.column("manifest_status").to_pylist() == ["draft", "final", "q"]
    assert table.column("score").to_pylist() == [0.5, None, 0.1]
    assert table.column("seed").type == pa.int64() and table.column("seed").to_pylist()[0] == valid[0].seed
    assert table.column("image_key").to_pylist()[1] == f"images/{safe_key('r/2')}.png"
    assert table.column("attempts").to_pylist() == [1, 1, 0]
    assert "field 'steps'" in table.column("error").to_pylist()[2]
    back = results_from_table(table)
    assert back == rows


def test_results_to_table_infers_pass_through_types():
    row = ManifestRow(row_id="r", prompt="p", passthrough={"n": 3, "mixed": 1, "empty": None})
    other = ManifestRow(row_id="s", prompt="p", passthrough={"n": 4, "mixed": "one", "empty": None})
    table = results_to_table([_ok_row(row), _ok_row(other)])
    assert table.schema.field("n").type == pa.int64()
    assert table.column("mixed").to_pylist() == ["1", "one"]
    assert table.schema.field("empty").type == pa.string()


def test_result_row_status_rules():
    with pytest.raises(ValueError):
        ResultRow(row_id="r", status="ok")
    with pytest.raises(ValueError):
        ResultRow(row_id="r", status="failed")
    assert ResultRow(row_id="r", status="failed", error="decode: out of memory", attempts=3).attempts == 3


def test_job_summary_counts():
    summary = JobSummary(job_id="j", output_uri="s3://b/out", total=10, ok=6, invalid=1, failed=1,
                         skipped_existing=2, started_at="2026-01-01T00:00:00Z", finished_at="2026-01-01T00:01:00Z",
                         wall_s=60.0, images_per_s=0.1, stage_seconds={"structure": 6.0},
                         stage_seconds_per_image={"structure": 1.0}, actors_per_stage={"structure": 2},
                         expected_efficiency=0.9)
    assert json.loads(summary.model_dump_json())["skipped_existing"] == 2
    with pytest.raises(ValueError, match="total 9"):
        JobSummary(**{**summary.model_dump(), "total": 9})
