"""Index files as SRC (docs/sources-and-outputs.md, "Sources"): CSV, TSV, JSONL and Parquet tables of (path, label),
and Hugging Face image Parquet files that hold the image bytes themselves. Each must give the very
manifest the equivalent ImageFolder gives; bad rows are listed like unreadable images."""

from __future__ import annotations

import csv
import json
import shutil
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from PIL import Image

from mixgen.errors import MixgenError
from mixgen.output.manifest import read_manifest
from mixgen.sources.scan import scan
from tests.conftest import SAMPLE, SMALL, one_line, run_cli

CUT = ["--device", "cpu", "--size", "64", "--pairs", "12"]


def _reference_items() -> tuple[list[str], list[tuple[str, int]]]:
    index = scan(SAMPLE)
    return index.classes, [(s.path, s.label) for s in index.items]


def write_csv(folder: Path, name: str = "index.csv", delimiter: str = ",", extra: list[list[str]] = ()) -> Path:
    classes, items = _reference_items()
    path = folder / name
    with open(path, "w", newline="") as f:
        writer = csv.writer(f, delimiter=delimiter)
        writer.writerow(["path", "label"])
        writer.writerows([[p, classes[label]] for p, label in items])
        writer.writerows(extra)
    return path


def write_jsonl(folder: Path) -> Path:
    """Integer labels, named by --classes."""
    classes, items = _reference_items()
    path = folder / "index.jsonl"
    path.write_text("".join(json.dumps({"path": p, "label": label}) + "\n" for p, label in items))
    (folder / "classes.txt").write_text("\n".join(classes) + "\n")
    return path


def write_hf_parquet(folder: Path, name: str = "train.parquet", corrupt: int | None = None) -> Path:
    """A Hugging Face image Parquet written by `datasets` itself, bytes embedded (no image files
    next to it), recorded paths as in the ImageFolder."""
    from datasets import ClassLabel, Dataset
    from datasets import Image as HFImage

    classes, items = _reference_items()
    images = [{"bytes": (SAMPLE / p).read_bytes(), "path": p} for p, _ in items]
    if corrupt is not None:
        images[corrupt] = {"bytes": b"not an image at all", "path": images[corrupt]["path"]}
    dataset = Dataset.from_dict({"image": images, "label": [label for _, label in items]})
    dataset = dataset.cast_column("image", HFImage()).cast_column("label", ClassLabel(names=classes))
    path = folder / name
    dataset.to_parquet(str(path))
    return path


@pytest.fixture(scope="module")
def index_sources(tmp_path_factory) -> dict[str, tuple[Path, list[str]]]:
    """SRC and extra options per index kind; the CSV and JSONL lie beside a copy of the images."""
    copy = tmp_path_factory.mktemp("indexed") / "images"
    shutil.copytree(SAMPLE, copy)
    hf = tmp_path_factory.mktemp("hub")
    return {
        "csv": (write_csv(copy), []),
        "jsonl": (write_jsonl(copy), ["--classes", str(copy / "classes.txt")]),
        "hf-parquet": (write_hf_parquet(hf), []),
    }


def rows_without_metadata(out: Path) -> pa.Table:
    return read_manifest(out).replace_schema_metadata(None)


@pytest.mark.parametrize("kind", ["csv", "jsonl", "hf-parquet"])
@pytest.mark.parametrize("method", ["cutmix", pytest.param("snapmix", marks=pytest.mark.slow)])
def test_index_file_gives_the_imagefolder_manifest(method_outputs, index_sources, tmp_path, kind, method):
    src, extra = index_sources[kind]
    out = tmp_path / "out"
    run_cli(method, src, out, "--device", "cpu", *SMALL[method], *extra)
    reference = rows_without_metadata(method_outputs[method])
    table = rows_without_metadata(out)
    for column in ("source_a", "source_b", "label_a", "label_b", "weight_a", "weight_b", "sha256"):
        assert table.column(column).equals(reference.column(column)), column
    assert table.equals(reference)  # every column, row for row
    meta = json.loads(pq.read_schema(next((out / "data").glob("*/metadata.parquet"))).metadata[b"mixgen"])
    assert meta["classes"] == ["astronaut", "cat", "coffee", "flower", "rocket"]
    record = json.loads((out / "mixgen.json").read_text())
    assert record["source"]["layout"] == ("hf-parquet" if kind == "hf-parquet" else "index")
    assert record["skipped"] == []
    run_cli("verify", out)


def test_hf_parquet_is_read_from_its_bytes_with_classlabel_names(tmp_path):
    path = write_hf_parquet(tmp_path)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["train.parquet"]  # no image files beside it
    index = scan(path)
    classes, items = _reference_items()
    assert index.layout == "hf-parquet" and index.classes == classes
    assert [(s.path, s.label) for s in index.items] == items
    assert [s.row for s in index.items] == list(range(len(items)))
    from mixgen.sources.views import load_source_view

    view = load_source_view(index, index.items[3], 64)
    assert view.shape == (64, 64, 3) and view.std() > 0


def test_hf_parquet_rows_without_a_recorded_path_are_named_by_row(tmp_path):
    from datasets import ClassLabel, Dataset
    from datasets import Image as HFImage

    data = (SAMPLE / "cat" / "cat_0.jpg").read_bytes()
    other = (SAMPLE / "rocket" / "rocket_0.jpg").read_bytes()
    dataset = Dataset.from_dict(
        {"img": [{"bytes": data, "path": None}, {"bytes": other, "path": None}], "y": [1, 0]}
    ).cast_column("img", HFImage())
    dataset = dataset.cast_column("y", ClassLabel(names=["rocket", "cat"]))
    path = tmp_path / "part-0.parquet"
    dataset.to_parquet(str(path))
    index = scan(path, path_column="img", label_column="y")
    assert [(s.path, s.label) for s in index.items] == [("part-0.parquet#0", 1), ("part-0.parquet#1", 0)]
    assert index.classes == ["rocket", "cat"]


def test_unreadable_bytes_are_skipped_and_listed_and_strict_fails(tmp_path):
    src = write_hf_parquet(tmp_path, corrupt=2)
    out = tmp_path / "out"
    result = run_cli("cutmix", src, out, *CUT)
    record = json.loads((out / "mixgen.json").read_text())
    assert [s["path"] for s in record["skipped"]] == ["astronaut/astronaut_2.jpg"]
    assert record["counts"]["skipped_sources"] == 1
    assert "astronaut/astronaut_2.jpg" in result.output  # in the summary
    assert "astronaut/astronaut_2.jpg" not in set(read_manifest(out).column("source_a").to_pylist())
    strict = run_cli("cutmix", src, tmp_path / "strict", *CUT, "--strict", expect=1)
    assert "astronaut/astronaut_2.jpg" in strict.output and "Traceback" not in strict.output


def test_bad_rows_are_skipped_listed_and_fail_with_strict(tmp_path):
    folder = tmp_path / "images"
    shutil.copytree(SAMPLE, folder)
    bad = [["cat/nope.jpg", "cat"], ["cat/cat_0.jpg", "cat"], ["rocket/rocket_1.jpg", " "], ["", "cat"]]
    src = write_csv(folder, extra=bad)
    index = scan(src)
    reasons = [r["reason"] for r in index.rejected]
    assert len(index) == 20 and len(reasons) == 4
    assert "cat/nope.jpg: file not found (index.csv line 22)" in reasons
    assert "cat/cat_0.jpg: listed again (first at line 6) (index.csv line 23)" in reasons
    assert any("rocket/rocket_1.jpg" in r and "empty label" in r for r in reasons)
    assert any("line 25: empty path" in r for r in reasons)
    out = tmp_path / "out"
    result = run_cli("cutmix", src, out, *CUT)
    summary = " ".join(result.output.split())
    assert "cat/nope.jpg: file not found" in summary and "cat/cat_0.jpg: listed again" in summary
    record = json.loads((out / "mixgen.json").read_text())
    assert len(record["skipped"]) == 4 and record["counts"]["skipped_sources"] == 4
    strict = run_cli("cutmix", src, tmp_path / "strict", *CUT, "--strict", expect=1)
    line = one_line(strict.output)
    assert "--strict" in line and "file not found" in line
    assert not (tmp_path / "strict").exists()


def sample_with_index(tmp_path: Path, text: str) -> Path:
    """A copy of sample_data with an index.csv of ``text`` in it."""
    folder = tmp_path / "images"
    shutil.copytree(SAMPLE, folder)
    src = folder / "index.csv"
    src.write_text(text)
    return src


def test_missing_column_is_one_line_exit_1(tmp_path):
    src = sample_with_index(tmp_path, "file,class\ncat/cat_0.jpg,cat\nrocket/rocket_0.jpg,rocket\n")
    result = run_cli("cutmix", src, tmp_path / "out", *CUT, expect=1)
    line = one_line(result.output)
    assert "no column 'path'" in line and "--path-column" in line
    renamed = run_cli("cutmix", src, tmp_path / "out", *CUT, "--path-column", "file", "--label-column", "class")
    assert "Traceback" not in renamed.output
    assert set(read_manifest(tmp_path / "out").column("class_a").to_pylist()) <= {"cat", "rocket"}
    labels = run_cli("cutmix", src, tmp_path / "x", *CUT, "--path-column", "file", expect=1)
    assert "no column 'label'" in labels.output and "--label-column" in labels.output


@pytest.mark.parametrize(
    ("name", "content"),
    [("index.csv", ""), ("index.csv", "\n"), ("index.csv", "  \n\n"), ("index.tsv", "\n"), ("index.jsonl", "\n")],
    ids=["csv", "csv-newline", "csv-blank-lines", "tsv-newline", "jsonl-newline"],
)
def test_empty_index_file_says_it_is_empty(tmp_path, name, content):
    """An index file with nothing (or only blank lines) in it is called empty, naming the file,
    not a file without its 'path' column."""
    src = tmp_path / name
    src.write_text(content)
    result = run_cli("cutmix", src, tmp_path / "out", *CUT, expect=1)
    line = one_line(result.output)
    assert f"SRC {src}: the index file is empty" in line
    assert "no column" not in line and "--path-column" not in line
    assert not (tmp_path / "out").exists()


def test_blank_lines_before_the_header_are_skipped(tmp_path):
    src = sample_with_index(tmp_path, "\n\npath,label\ncat/cat_0.jpg,cat\nrocket/rocket_0.jpg,rocket\n")
    assert [s.path for s in scan(src).items] == ["cat/cat_0.jpg", "rocket/rocket_0.jpg"]


def test_integer_labels_tsv_named_by_themselves_or_classes(tmp_path):
    folder = tmp_path / "images"
    shutil.copytree(SAMPLE, folder)
    _, items = _reference_items()
    src = folder / "index.tsv"
    src.write_text("path\tlabel\n" + "".join(f"{p}\t{label}\n" for p, label in items))
    index = scan(src)
    assert index.classes == ["0", "1", "2", "3", "4"]
    assert [(s.path, s.label) for s in index.items] == items
    names = folder / "names.txt"
    names.write_text("a\nb\nc\nd\ne\n")
    assert scan(src, classes=names).classes == ["a", "b", "c", "d", "e"]
    names.write_text("a\nb\n")
    short = scan(src, classes=names)  # ids 2..4 have no name: refused rows, listed
    assert {s.label for s in short.items} == {0, 1}
    assert any("class id 4 outside 0..1" in r["reason"] for r in short.rejected)


def test_plain_parquet_index_with_string_labels(tmp_path):
    folder = tmp_path / "images"
    shutil.copytree(SAMPLE, folder)
    classes, items = _reference_items()
    table = pa.table({"path": [p for p, _ in items], "label": [classes[label] for _, label in items]})
    pq.write_table(table, folder / "index.parquet")
    index = scan(folder / "index.parquet")
    assert index.layout == "index" and index.classes == classes
    assert [(s.path, s.label) for s in index.items] == items


def test_absolute_paths_and_mixed_label_kinds(tmp_path):
    src = tmp_path / "index.jsonl"
    rows = [{"path": str(SAMPLE / "cat" / "cat_0.jpg"), "label": "cat"}, {"path": "../x.jpg", "label": 3}]
    Image.new("RGB", (20, 20)).save(tmp_path.parent / "x.jpg")
    src.write_text("".join(json.dumps(r) + "\n" for r in rows))
    mixed = r"mixes class ids \(integers\) and class names \(first class id '3' at line 2\)"
    with pytest.raises(MixgenError, match=mixed):
        scan(src)
    src.write_text(json.dumps(rows[0]) + "\n" + "this is not json\n")
    index = scan(src)
    assert index.items[0].path == str(SAMPLE / "cat" / "cat_0.jpg")
    assert [r["reason"] for r in index.rejected] == ["index.jsonl line 2: not a JSON object"]


def test_index_options_are_validated(tmp_path):
    result = run_cli("cutmix", SAMPLE, tmp_path / "o", *CUT, "--classes", tmp_path / "none.txt", expect=1)
    assert "--classes" in result.output and "no such file" in result.output
    folder = run_cli("cutmix", SAMPLE, tmp_path / "o", *CUT, "--path-column", "file", expect=2)
    assert "--path-column applies to an index file SRC only" in folder.output
    empty = run_cli("cutmix", SAMPLE, tmp_path / "o", *CUT, "--label-column", " ", expect=2)
    assert "--label-column must name a column" in empty.output
    index = write_jsonl(tmp_path)
    (tmp_path / "blank.txt").write_text("a\n\nb\n")
    with pytest.raises(MixgenError, match="line 2 is blank"):
        scan(index, classes=tmp_path / "blank.txt")
    other = tmp_path / "index.txt"
    other.write_text("path,label\n")
    assert "is not a folder or an index file" in run_cli("cutmix", other, tmp_path / "o", *CUT, expect=1).output


def test_digest_follows_the_index_and_the_bytes(tmp_path):
    folder = tmp_path / "images"
    shutil.copytree(SAMPLE, folder)
    src = write_csv(folder)
    before = scan(src).digest
    assert scan(src).digest == before
    text = src.read_text().replace("cat/cat_0.jpg,cat", "cat/cat_0.jpg,coffee")
    src.write_text(text)
    assert scan(src).digest != before
    Image.new("RGB", (30, 30), "red").save(folder / "coffee" / "coffee_0.jpg")  # a source's file changes
    changed = scan(src).digest
    assert changed != before
    hub = tmp_path / "hub"
    hub.mkdir()
    first = scan(write_hf_parquet(hub)).digest
    assert scan(write_hf_parquet(hub, corrupt=5)).digest != first


def test_cam_command_reads_a_hf_parquet(tmp_path):
    src = write_hf_parquet(tmp_path)
    out = tmp_path / "cams"
    run_cli("cam", src, out, "--device", "cpu", "--size", "64", "--cam", "mean", "--limit", "2")
    cams = json.loads((out / "cams.json").read_text())
    assert [item["source"] for item in cams["items"]] == ["astronaut/astronaut_0.jpg", "cat/cat_0.jpg"]  # one a class
    assert (out / "astronaut" / "astronaut_0.jpg.png").is_file()


@pytest.mark.parametrize(
    ("kind", "label"),
    [("csv", "5000000"), ("csv", "9" * 5000), ("jsonl", 1e300), ("jsonl", 2**63), ("parquet", 2**63)],
)
def test_huge_integer_labels_are_refused_rows_not_a_huge_class_list(tmp_path, kind, label):
    """A class id far beyond what the rows can hold needs --classes: the row is refused with a
    reason instead of a class list of range(id + 1) (seconds, gigabytes, or a hang)."""
    folder = tmp_path / "images"
    shutil.copytree(SAMPLE, folder)
    _, items = _reference_items()
    rows = [("cat/cat_0.jpg", label)] + [(p, lab) for p, lab in items if p != "cat/cat_0.jpg"]
    if kind == "csv":
        src = folder / "index.csv"
        src.write_text("path,label\n" + "".join(f"{p},{lab}\n" for p, lab in rows))
    elif kind == "jsonl":
        src = folder / "index.jsonl"
        src.write_text("".join(json.dumps({"path": p, "label": lab}) + "\n" for p, lab in rows))
    else:
        src = folder / "index.parquet"
        table = pa.table({"path": [p for p, _ in rows], "label": pa.array([lab for _, lab in rows], pa.uint64())})
        pq.write_table(table, src)
    index = scan(src)
    assert index.classes == ["0", "1", "2", "3", "4"]
    assert len(index) == 19 and "cat/cat_0.jpg" not in {s.path for s in index.items}
    [refused] = index.rejected
    assert refused["path"] == "cat/cat_0.jpg" and "--classes" in refused["reason"]
    names = folder / "names.txt"
    names.write_text("a\nb\nc\nd\ne\n")
    named = scan(src, classes=names)
    assert named.classes == ["a", "b", "c", "d", "e"] and [r["path"] for r in named.rejected] == ["cat/cat_0.jpg"]


@pytest.mark.parametrize("label", [2.5, "NaN", "Infinity", "-Infinity"])
def test_non_integral_or_non_finite_number_labels_are_bad_rows(tmp_path, label):
    folder = tmp_path / "images"
    shutil.copytree(SAMPLE, folder)
    _, items = _reference_items()
    lines = [json.dumps({"path": p, "label": lab}) for p, lab in items[1:]]
    lines.insert(0, f'{{"path": "{items[0][0]}", "label": {label}}}')  # NaN, Infinity: Python's JSON tokens
    src = folder / "index.jsonl"
    src.write_text("\n".join(lines) + "\n")
    index = scan(src)
    assert len(index) == 19
    [refused] = index.rejected
    assert refused["path"] == items[0][0] and "not an integer class id" in refused["reason"]


@pytest.mark.parametrize(
    ("names", "problem"), [(["a", "b", "a", "d", "e"], "'a' is listed twice"), (["a", "", "c", "d", "e"], "blank")]
)
def test_hf_parquet_classlabel_names_duplicate_or_blank_are_refused(tmp_path, names, problem):
    """`datasets.load_dataset("imagefolder")` fails on the folders such names give: refused as
    --classes refuses them, and --classes overrides the metadata."""
    table = pq.read_table(write_hf_parquet(tmp_path, "hub.parquet"))
    meta = json.loads(table.schema.metadata[b"huggingface"])
    meta["info"]["features"]["label"]["names"] = names
    src = tmp_path / "bad.parquet"
    pq.write_table(table.replace_schema_metadata({b"huggingface": json.dumps(meta).encode()}), src)
    with pytest.raises(MixgenError, match=problem) as caught:
        scan(src)
    assert "ClassLabel" in str(caught.value) and "--classes" in str(caught.value)
    result = run_cli("cutmix", src, tmp_path / "out", *CUT, expect=1)
    assert len([line for line in result.output.splitlines() if line.strip()]) == 1
    (tmp_path / "names.txt").write_text("a\nb\nc\nd\ne\n")
    assert scan(src, classes=tmp_path / "names.txt").classes == ["a", "b", "c", "d", "e"]


def test_one_file_written_several_ways_is_one_source(tmp_path):
    folder = tmp_path / "images"
    shutil.copytree(SAMPLE, folder)
    same = ["cat/cat_0.jpg", str(folder / "cat" / "cat_0.jpg"), "cat//cat_0.jpg", "../images/cat/cat_0.jpg"]
    src = folder / "index.csv"
    src.write_text("path,label\n" + "".join(f"{p},cat\n" for p in [*same, "rocket/rocket_0.jpg"]))
    index = scan(src)
    assert [s.path for s in index.items] == ["cat/cat_0.jpg", "rocket/rocket_0.jpg"]
    assert [r["path"] for r in index.rejected] == [same[1], "cat/cat_0.jpg", same[3]]  # names normalised
    assert all("listed again (first at line 2)" in r["reason"] for r in index.rejected)


def test_an_index_listing_images_inside_out_is_refused_before_out_is_touched(tmp_path):
    out = tmp_path / "out"
    run_cli("cutmix", SAMPLE, out, *CUT)
    outputs = sorted((out / "data" / "00000").glob("*.jpg"))[:2]
    src = tmp_path / "index.csv"
    src.write_text("path,label\n" + "".join(f"{p},x{i}\n" for i, p in enumerate(outputs)))
    for extra in ((), ("--overwrite",), ("--dry-run",)):
        line = one_line(run_cli("cutmix", src, out, *CUT, *extra, expect=1).output)
        assert f"lists images inside OUT {out}" in line
    assert all(p.is_file() for p in outputs)


def test_a_2_mb_value_in_another_column_is_read(tmp_path):
    """A valid CSV is read whatever the length of a value in a column mixgen does not use (the csv
    module refuses fields over 128 kB by default); the limit is put back after."""
    import csv as csv_module

    folder = tmp_path / "images"
    shutil.copytree(SAMPLE, folder)
    classes, items = _reference_items()
    src = folder / "index.csv"
    with open(src, "w", newline="") as f:
        writer = csv_module.writer(f)
        writer.writerow(["path", "caption", "label"])
        for k, (path, label) in enumerate(items):
            writer.writerow([path, "x" * (2 << 20) if k == 3 else "a bird", classes[label]])
    before = csv_module.field_size_limit()
    index = scan(src)
    assert csv_module.field_size_limit() == before
    assert [(s.path, s.label) for s in index.items] == items and index.rejected == []
    run_cli("cutmix", src, tmp_path / "out", *CUT)
