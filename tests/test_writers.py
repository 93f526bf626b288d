"""The writer interface, one contract every writer passes (``files`` and ``webdataset`` alike): what
the run, resume, a grown run, ``verify`` and ``verify --recompute`` ask of a writer."""

from __future__ import annotations

import hashlib
import os

import pytest

from mixgen.layout import MANIFEST_NAME
from mixgen.options import WRITERS
from mixgen.output import manifest
from mixgen.output.writers import ShardWriter, make_writer

FINGERPRINT = "0123456789abcdef"


def _schema():
    return manifest.schema({"fingerprint": FINGERPRINT}, ["cat", "dog"])


def _row(writer: ShardWriter, index: int, data: bytes) -> dict:
    return {
        "file_name": writer.file_name(index),
        "index": index,
        "method": "cutmix",
        "source_a": "cat/a.jpg",
        "source_b": "dog/b.jpg",
        "label_a": 0,
        "label_b": 1,
        "class_a": "cat",
        "class_b": "dog",
        "weight_a": 0.75,
        "weight_b": 0.25,
        "targets": manifest.soft_targets(0, 1, 0.75, 0.25),
        "box_a": None,
        "box_b": {"x0": 0, "y0": 0, "x1": 4, "y1": 4},
        "cells": None,
        "mask": None,
        "label_weights": "area",
        "lam": 0.75,
        "area_ratio": 0.25,
        "seed": 0,
        "width": 8,
        "height": 8,
        "sha256": hashlib.sha256(data).hexdigest(),
    }


def _write(writer: ShardWriter, shard: int, span: range, keep: int | None = None) -> list[dict]:
    """Write ``span`` as one shard, adding the outputs in reverse order (threads finish in any)."""
    images = {i: f"image {i}".encode() * (i + 1) for i in span}
    rows = [_row(writer, i, images[i]) for i in span]
    kept = writer.kept_rows(shard, keep) if keep is not None else []  # read before the shard reopens
    opened = writer.open(shard, span, _schema(), keep)
    for row in reversed(rows if keep is None else [r for r in rows if r["index"] >= keep]):
        opened.add(row, images[row["index"]])
    opened.commit(kept + [r for r in rows if keep is None or r["index"] >= keep])
    return rows


def test_the_interface_is_abstract():
    with pytest.raises(TypeError):
        ShardWriter("out", "jpg")  # type: ignore[abstract]


@pytest.fixture(params=WRITERS)
def writer(request, tmp_path) -> ShardWriter:
    return make_writer(request.param, tmp_path / "out", "jpg")


def test_every_writer_is_a_shard_writer_named_by_its_option(writer):
    assert isinstance(writer, ShardWriter)
    assert writer.name in WRITERS


def test_file_names_are_distinct_and_keep_the_format(writer):
    names = [writer.file_name(i) for i in range(1000)]
    assert len(set(names)) == len(names)
    assert all(name.endswith(".jpg") for name in names)


def test_a_committed_shard_is_complete_and_stores_every_output_whole(writer):
    rows = _write(writer, 0, range(0, 5))
    assert writer.is_complete(0, range(0, 5), FINGERPRINT)
    assert writer.is_complete(0, range(0, 5), {"other", FINGERPRINT})
    assert not writer.is_complete(0, range(0, 5), "another run")
    assert not writer.is_complete(0, range(0, 6), FINGERPRINT)
    for row in rows:
        assert writer.output_digest(0, row["file_name"]) == row["sha256"]
        assert row["file_name"] in writer.where(0, row["file_name"])
    assert writer.output_digest(0, writer.file_name(99)) is None
    assert (writer.directory(0) / MANIFEST_NAME).is_file()
    assert manifest.read_manifest(writer.out).column("index").to_pylist() == list(range(5))


def test_verify_finds_a_committed_shard_sound(writer):
    rows = _write(writer, 0, range(0, 3))
    data = writer.out / "data"
    extras = {}
    for entry in os.scandir(data):
        shard = writer.claims(entry.name)
        if shard is not None:
            extras[shard] = data / entry.name
    files = {e.name for e in os.scandir(writer.directory(0))}
    listed = ([r["file_name"] for r in rows], [r["sha256"] for r in rows], [r["index"] for r in rows])
    problems, jobs = writer.check_shard(0, files, listed, extras)
    assert [line for lines, _ in problems for line in lines] == []
    assert [problem for job in jobs for problem in job()[0]] == []
    assert writer.leftovers(extras) == []


def test_verify_sees_an_output_that_differs_from_its_manifest(writer):
    rows = _write(writer, 0, range(0, 3))
    rows[1]["sha256"] = hashlib.sha256(b"other bytes").hexdigest()
    manifest.write_shard(writer.directory(0), rows, _schema())
    listed = ([r["file_name"] for r in rows], [r["sha256"] for r in rows], [r["index"] for r in rows])
    data = writer.out / "data"
    extras = {s: data / e.name for e in os.scandir(data) if (s := writer.claims(e.name)) is not None}
    files = {e.name for e in os.scandir(writer.directory(0))}
    problems, jobs = writer.check_shard(0, files, listed, extras)
    found = [line for lines, _ in problems for line in lines] + [p for job in jobs for p in job()[0]]
    assert found, "a sha256 that differs from the manifest went unnoticed"


def test_an_unfinished_shard_is_not_complete_and_is_discarded(writer):
    opened = writer.open(0, range(0, 2), _schema())
    row = _row(writer, 0, b"x")
    opened.add(row, b"x")  # never committed: no manifest
    assert not writer.is_complete(0, range(0, 2), FINGERPRINT)
    writer.discard_unfinished(0)
    assert not writer.directory(0).exists()
    assert writer.output_digest(0, row["file_name"]) is None


def test_a_complete_shard_survives_discard_unfinished(writer):
    _write(writer, 0, range(0, 2))
    writer.discard_unfinished(0)
    assert writer.is_complete(0, range(0, 2), FINGERPRINT)


def test_a_grown_run_extends_a_shorter_shard_keeping_its_outputs(writer):
    rows = _write(writer, 0, range(0, 3))
    assert writer.complete_prefix(0, range(0, 6), FINGERPRINT) == 3
    assert writer.complete_prefix(0, range(0, 6), "another run") == 0
    assert [r["index"] for r in writer.kept_rows(0, 2)] == [0, 1]
    grown = _write(writer, 0, range(0, 6), keep=3)
    assert writer.is_complete(0, range(0, 6), FINGERPRINT)
    for row in rows + grown[3:]:
        assert writer.output_digest(0, row["file_name"]) == row["sha256"]


def test_a_reopened_shard_starts_empty(writer):
    _write(writer, 0, range(0, 3))
    writer.open(0, range(0, 3), _schema())
    assert not writer.is_complete(0, range(0, 3), FINGERPRINT)
    assert all(writer.output_digest(0, writer.file_name(i)) is None for i in range(3))
