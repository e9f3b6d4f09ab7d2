"""Pipeline parts without Ray: manifest checks, validation and resume, result shards, contact sheet, command line."""
from __future__ import annotations

import io
import json
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from PIL import Image

from actors.rows import INVALID, PENDING, from_table, load_row, pack, unpack
from actors.writer import WriteStage, encode_image
from diffusion.config import tiny_config
from jobs import results
from jobs.cli import main as cli_main
from jobs.contact_sheet import render_html, render_png
from jobs.manifest import (
    INDEX_COLUMN, SOURCE_COLUMN, PriorResult, ValidateStage, open_manifest, validate_manifest,
)
from jobs.run_cmd import parse_actors
from schemas.errors import UserError
from schemas.manifest import GenerationDefaults
from schemas.result import ResultRow, results_to_table
from storage import open_store


def write(path: Path, **columns) -> Path:
    pq.write_table(pa.table(columns), path)
    return path


# ---------------------------------------------------------------- manifests that stop a job

def test_missing_manifest_says_what_to_give(tmp_path):
    with pytest.raises(UserError, match="does not exist: give a Parquet file or a folder"):
        open_manifest(str(tmp_path / "nope.parquet"))


def test_manifest_without_prompt_column(tmp_path):
    path = write(tmp_path / "m.parquet", text=["a cat"], row_id=["a"])
    with pytest.raises(UserError, match="has no 'prompt' column \\(it has: text, row_id\\)"):
        open_manifest(str(path))


def test_manifest_with_wrong_column_types(tmp_path):
    path = write(tmp_path / "m.parquet", prompt=["a cat"], steps=["twenty"], seed=[1.5])
    with pytest.raises(UserError) as info:
        open_manifest(str(path))
    assert "column 'steps' is string, expected a numeric column" in str(info.value)
    assert "column 'seed' is double, expected an integer column" in str(info.value)


def test_unreadable_manifest_file(tmp_path):
    path = tmp_path / "m.parquet"
    path.write_bytes(b"this is not parquet")
    with pytest.raises(UserError, match="cannot be read as Parquet"):
        open_manifest(str(path))


def test_prefix_whose_files_disagree_on_types(tmp_path):
    write(tmp_path / "a.parquet", prompt=["a"], priority=[1])
    write(tmp_path / "b.parquet", prompt=["b"], priority=["high"])
    with pytest.raises(UserError, match="files disagree on column types"):
        open_manifest(str(tmp_path))


def test_empty_prefix(tmp_path):
    (tmp_path / "notes.txt").write_text("no parquet here")
    with pytest.raises(UserError, match="holds no .parquet files"):
        open_manifest(str(tmp_path))


def test_prefix_scan_counts_rows_images_and_repeated_ids(tmp_path):
    write(tmp_path / "a.parquet", prompt=["a", "b", "c"], row_id=["x", "y", None], num_images=[1, 2, None])
    write(tmp_path / "b.parquet", prompt=["d", "e"], row_id=["x", "z"])
    (tmp_path / "_hidden").mkdir()
    write(tmp_path / "_hidden" / "c.parquet", prompt=["ignored"])
    m = open_manifest(str(tmp_path), defaults=GenerationDefaults(num_images=3), done={("y", 0), ("z", 0)})
    assert [Path(f.source).name for f in m.files] == ["a.parquet", "b.parquet"]
    assert (m.total_rows, m.total_units) == (5, 1 + 2 + 3 + 3 + 3)
    assert m.pending_units == 12 - 2
    assert m.duplicates == {(str(tmp_path / "b.parquet"), 0): ("x", 0)}


def test_cli_stops_an_unusable_manifest_before_writing_anything(tmp_path, capsys, tiny_model_dir):
    path = write(tmp_path / "m.parquet", text=["a cat"])
    out = tmp_path / "out"
    code = cli_main(["run", str(path), "--out", str(out), "--model", str(tiny_model_dir)])
    err = capsys.readouterr().err
    assert code == 2
    assert "\nerror: manifest" in err and "add a string column named 'prompt'" in err
    assert "Traceback" not in err
    assert not out.exists()


# ---------------------------------------------------------------- validation and resume

def stage(**kw) -> ValidateStage:
    return ValidateStage(defaults=GenerationDefaults(steps=4), model_config=tiny_config(), **kw)


def records(*rows: dict, source: str = "/data/m.parquet") -> pa.Table:
    out = []
    for i, row in enumerate(rows):
        out.append({"row_id": None, "prompt": None, "num_images": None, "width": None, "height": None,
                    "helper_model": None, "tag": None, **row, SOURCE_COLUMN: source, INDEX_COLUMN: i})
    return pa.Table.from_pylist(out)


def test_validate_stage_makes_one_unit_per_image_and_invalid_units():
    table = records(
        {"row_id": "a", "prompt": "a cat", "num_images": 2, "tag": "x"},
        {"row_id": None, "prompt": "a dog"},
        {"row_id": "bad", "prompt": ""},
        {"row_id": "odd", "prompt": "a cat", "width": 100, "height": 10},
        {"row_id": "helper", "prompt": "a cat", "helper_model": "sd15"},
    )
    units = from_table(stage()(table))
    got = [(u["row_id"], u["image_index"], u["status"]) for u in units]
    assert got == [("a", 0, PENDING), ("a", 1, PENDING), ("m-00000001", 0, PENDING), ("bad", 0, INVALID),
                   ("odd", 0, PENDING), ("helper", 0, INVALID)]
    first = units[0]
    assert (first["width"], first["height"], first["bucket"], first["group"]) == (64, 64, 5, "64x64:4:euler:3")
    assert load_row(first["row"]).passthrough == {"tag": "x"} and first["attempts"] == 1
    assert units[3]["error"].startswith("row 2 (id 'bad'): field 'prompt'")
    assert units[4]["size_snapped"] is True
    # A helper model that is not a model directory (here: none at ./sd15) makes its row invalid.
    assert units[5]["error"].startswith("row 4 (id 'helper'): field 'helper_model': expected a model directory")


def test_validate_stage_skips_done_images_and_counts_attempts():
    table = records({"row_id": "a", "prompt": "a cat", "num_images": 2}, {"row_id": "bad", "prompt": ""})
    first = from_table(stage()(table))
    invalid_error = first[2]["error"]
    prior = {("a", 0): PriorResult("ok", None, 1), ("a", 1): PriorResult("failed", "texture: NaN", 2),
             ("bad", 0): PriorResult("invalid", invalid_error, 0)}
    units = from_table(stage(prior=prior)(table))
    assert [(u["row_id"], u["image_index"], u["attempts"]) for u in units] == [("a", 1, 3)]
    # The same invalid row with another reason than last time is recorded again.
    prior[("bad", 0)] = PriorResult("invalid", "an older message", 0)
    assert [u["row_id"] for u in from_table(stage(prior=prior)(table))] == ["a", "bad"]


def test_repeated_row_ids_are_invalid_after_their_first_use():
    table = records({"row_id": "x", "prompt": "a"}, {"row_id": "x", "prompt": "b"})
    units = from_table(stage(duplicates={("/data/m.parquet", 1): ("x", 0)})(table))
    assert [u["status"] for u in units] == [PENDING, INVALID]
    assert "expected a unique id" in units[1]["error"] and "first used by row 0" in units[1]["error"]


def test_validate_manifest_reports_invalid_rows(tmp_path):
    path = write(tmp_path / "m.parquet", prompt=["a cat", "", "a dog"], row_id=["a", "b", "c"],
                 sampler=["euler", "euler", "magic"])
    report = validate_manifest(str(path), model_config=tiny_config())
    assert (report.valid_rows, report.invalid_rows, report.images) == (1, 2, 1)
    assert "field 'prompt'" in report.errors[0] and "field 'sampler'" in report.errors[1]


def test_validate_command(tmp_path, capsys, tiny_model_dir):
    path = write(tmp_path / "m.parquet", prompt=["a cat", ""], row_id=["a", "b"])
    code = cli_main(["validate", str(path), "--model", str(tiny_model_dir)])
    out = capsys.readouterr().out
    assert code == 1
    assert "2 rows: 1 valid (1 images), 1 invalid" in out and "(id 'b'): field 'prompt'" in out


# ---------------------------------------------------------------- result shards and the result manifest

def result(row_id, status, finished, image_index=0, attempts=1, **kw) -> ResultRow:
    extra = {"image_uri": f"file:///x/{row_id}.png"} if status == "ok" else {"error": f"{status} reason"}
    return ResultRow(row_id=row_id, image_index=image_index, status=status, attempts=attempts,
                     finished_at=finished, **extra, **kw)


def test_result_manifest_prefers_ok_then_latest(tmp_path):
    store = open_store(str(tmp_path))
    results.write_shard(store, results_to_table([
        result("a", "failed", "2024-01-01T00:00:01.000Z"), result("b", "failed", "2024-01-01T00:00:01.000Z"),
        result("c", "ok", "2024-01-01T00:00:01.000Z"),
    ]))
    results.write_shard(store, results_to_table([
        result("a", "ok", "2024-01-01T00:00:02.000Z", attempts=2),
        result("b", "failed", "2024-01-01T00:00:03.000Z", attempts=2),
        result("c", "failed", "2024-01-01T00:00:04.000Z", attempts=2),
        result("c", "ok", "2024-01-01T00:00:05.000Z", image_index=1),
    ]))
    table = results.read_results(store)
    got = {(r["row_id"], r["image_index"]): (r["status"], r["attempts"]) for r in table.to_pylist()}
    assert got == {("a", 0): ("ok", 2), ("b", 0): ("failed", 2), ("c", 0): ("ok", 1), ("c", 1): ("ok", 1)}
    assert results.read_shards(store).num_rows == 7
    prior = results.prior_results(store)
    assert prior[("b", 0)] == PriorResult("failed", "failed reason", 2)


def test_shard_names_are_deterministic_and_create_only(tmp_path):
    store = open_store(str(tmp_path))
    rows = [result("a", "ok", "t1"), result("b", "failed", "t2")]
    table = results_to_table(rows)
    key = results.write_shard(store, table)
    assert key == results.shard_key(results_to_table(list(reversed(rows))))
    assert key.startswith("results/part-") and key.endswith(".parquet")
    assert results.write_shard(store, table) is None  # the same results again: no second shard
    assert results.shard_key(results_to_table([result("a", "ok", "t1"), result("b", "failed", "t2", attempts=2)])) \
        != key
    assert results.read_results(store) is not None and results.shard_keys(store) == [key]


def test_result_sink_commits_by_rows_and_at_flush(tmp_path):
    store = open_store(str(tmp_path))
    sink = results.ResultSink(store, pa.schema([]), shard_rows=3, shard_seconds=3600)
    sink.add(results_to_table([result("a", "ok", "t"), result("b", "ok", "t")], pa.schema([])))
    assert results.shard_keys(store) == []
    sink.add(results_to_table([result("c", "ok", "t")], pa.schema([])))
    assert len(results.shard_keys(store)) == 1
    sink.add(results_to_table([result("d", "ok", "t")], pa.schema([])))
    sink.flush()
    assert len(sink.shards) == 2 and results.read_results(store).num_rows == 4


def test_no_results_yet(tmp_path):
    store = open_store(str(tmp_path / "nothing"))
    assert results.read_results(store) is None and results.prior_results(store) == {}


# ---------------------------------------------------------------- writing images

def test_write_stage_stores_images_create_only_and_describes_the_stored_object(tmp_path):
    from actors.rows import dump_row, to_table
    from schemas.manifest import validate_rows

    (row,), _ = validate_rows([{"row_id": "../up", "prompt": "a cat", "seed": 1, "note": 7}],
                              defaults=GenerationDefaults(), source="m.parquet")
    pixels = np.arange(64 * 64 * 3, dtype=np.uint8).reshape(64, 64, 3)
    unit = {"row_id": row.row_id, "image_index": 0, "status": PENDING, "attempts": 1, "row": dump_row(row),
            "width": 64, "height": 64, "bucket": 5, "size_snapped": False, "pixels": pack({"image": pixels})}
    writer = WriteStage(str(tmp_path), passthrough=pa.schema([pa.field("note", pa.int64())]))
    first = writer(to_table([unit])).to_pylist()[0]
    assert first["status"] == "ok" and first["image_key"].startswith("images/up-h") and first["note"] == 7
    stored = (tmp_path / first["image_key"]).read_bytes()
    assert np.array_equal(np.asarray(Image.open(io.BytesIO(stored))), pixels)
    # A retry with other pixels keeps the stored object, and says so in its sha256.
    unit["pixels"] = pack({"image": pixels[::-1].copy()})
    second = writer(to_table([unit])).to_pylist()[0]
    assert second["sha256"] == first["sha256"] and (tmp_path / first["image_key"]).read_bytes() == stored


def test_image_encoding_is_deterministic():
    pixels = np.random.default_rng(0).integers(0, 255, (48, 80, 3), dtype=np.uint8)
    for fmt in ("png", "jpeg", "webp"):
        assert encode_image(pixels, fmt, 90) == encode_image(pixels.copy(), fmt, 90)
    assert unpack(pack({"a": pixels}))["a"].tobytes() == pixels.tobytes()


# ---------------------------------------------------------------- contact sheet and flags

def test_contact_sheet_png_and_html():
    records_ = []
    for i in range(5):
        buf = io.BytesIO()
        Image.new("RGB", (64, 48), (i * 40, 0, 0)).save(buf, format="PNG")
        records_.append(({"row_id": f"r{i}", "image_index": 0, "prompt": "蓝色 <b>cat</b>", "image_key": f"images/r{i}.png",
                          "width": 64, "height": 48}, buf.getvalue()))
    with Image.open(io.BytesIO(render_png(records_, thumb=100, columns=4))) as sheet:
        assert sheet.size == (4 * 116, 2 * (100 + 48 + 16))
    page = render_html([r for r, _ in records_], "job <1>")
    assert "蓝色 &lt;b&gt;cat&lt;/b&gt;" in page and "job &lt;1&gt;" in page and page.count("<figure>") == 5


def test_contact_sheet_captions_draw_cjk_in_a_cjk_font_and_wrap_to_the_cell(monkeypatch):
    from PIL import ImageFont

    from jobs import contact_sheet

    stand_in = ImageFont.load_default(size=13)  # any second font object shows which runs go to the CJK font
    monkeypatch.setattr(contact_sheet, "_cjk_font", lambda size: stand_in)
    fonts = contact_sheet._CaptionFonts(11)
    runs = fonts.runs("a 红色 striped 圆形，blue")
    assert [(text, font is stand_in) for text, font in runs] == [
        ("a ", False), ("红色", True), (" striped ", False), ("圆形，", True), ("blue", False)]
    assert fonts.width("红色") == stand_in.getlength("红色")
    prompt = "a large red 条纹 circle on the left on a 蓝色 background, every word of it"
    lines = contact_sheet._wrap(prompt, lambda line: fonts.width(line) <= 100, 2)
    assert len(lines) == 2 and all(fonts.width(line) <= 100 for line in lines)
    assert lines[-1].endswith("…") and prompt.startswith(lines[0])
    assert contact_sheet._wrap("short", lambda line: fonts.width(line) <= 100, 2) == ["short"]
    # Without a CJK font everything is drawn in Pillow's own font (the CJK characters then show as boxes).
    monkeypatch.setattr(contact_sheet, "_cjk_font", lambda size: None)
    assert len(contact_sheet._CaptionFonts(11).runs("a 红色 b")) == 1


def test_parse_actors():
    assert parse_actors("2") == {"encode": 2, "structure": 2, "texture": 2, "decode": 2}
    assert parse_actors("structure=3, texture=2") == {"structure": 3, "texture": 2}
    for bad in ("0", "x", "fusion=2", "structure=0"):
        with pytest.raises(UserError):
            parse_actors(bad)


def test_run_spec_from_flags_and_file(tmp_path):
    import argparse

    from jobs.run_cmd import spec_from_args

    spec_file = tmp_path / "job.yaml"
    spec_file.write_text("manifest: from-file.parquet\nstages: {batch_size: 8, actors: {encode: 1}}\n"
                         "defaults: {steps: 10}\n")
    args = argparse.Namespace(manifest="m.parquet", spec=str(spec_file), out=None, model=None, job_id=None,
                              device="cpu", batch_size=None, format="webp", actors_per_stage="structure=3",
                              steps=None)
    spec = spec_from_args(args)
    assert spec.manifest == "m.parquet" and spec.output == f"./outputs/{spec.job_id}"
    assert spec.job_id.startswith("m-") and spec.defaults.steps == 10
    assert (spec.stages.batch_size, spec.stages.image_format) == (8, "webp")
    assert spec.stages.actors.chosen() == {"encode": 1, "structure": 3}
    json.dumps(spec.job_json())
