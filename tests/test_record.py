"""The run record (``mixgen.output.record``): how the workers' records of a split job merge into
OUT's one record."""

from __future__ import annotations

import json

import pytest

from mixgen.layout import CACHE_DIR, RECORD_NAME
from mixgen.output.record import merge_records, publish_record, worker_record_path
from mixgen.output.rundiff import WORKER_SETTINGS

FINGERPRINT = "feedfacefeedface"


def _worker(index: int, status: str, done: int, device: str = "cpu", **extra) -> dict:
    return {
        "fingerprint": FINGERPRINT,
        "status": status,
        "worker": {"index": index, "count": 3},
        "config": {"method": "cutmix", "pairs": 90, "device": device, "workers": index + 1, "batch_size": 8},
        "progress": {"shards_done": done, "outputs_done": done * 10},
        "counts": {"written": done * 10, "kept_from_previous_run": 1, "shards": done, "sources": 20},
        "timings": {"total_s": 1.0},
        **extra,
    }


def _merge(tmp_path, mine: dict, others: dict[int, dict]) -> dict:
    for index, record in others.items():
        worker_record_path(tmp_path, index, 3).write_text(json.dumps(record))
    return merge_records(tmp_path, mine, 3)


def test_complete_only_when_every_worker_is_and_counts_summed(tmp_path):
    merged = _merge(tmp_path, _worker(0, "complete", 3), {1: _worker(1, "complete", 3), 2: _worker(2, "complete", 3)})
    assert merged["status"] == "complete"
    assert merged["progress"] == {"shards_done": 9, "outputs_done": 90}
    assert merged["counts"]["written"] == 90 and merged["counts"]["kept_from_previous_run"] == 3
    assert merged["counts"]["shards"] == 9
    assert merged["counts"]["sources"] == 20  # the same for every worker: not summed
    assert [w["index"] for w in merged["workers"]] == [0, 1, 2]
    assert "worker" not in merged and "timings" not in merged


def test_the_merged_config_is_the_run_s_not_a_worker_s(tmp_path):
    merged = _merge(tmp_path, _worker(1, "complete", 3), {0: _worker(0, "complete", 3), 2: _worker(2, "complete", 3)})
    assert not set(WORKER_SETTINGS) & set(merged["config"])
    assert merged["config"]["num_shards"] == 3 and merged["config"]["pairs"] == 90
    assert [w["device"] for w in merged["workers"]] == ["cpu", "cpu", "cpu"]


@pytest.mark.parametrize(
    ("statuses", "expected"),
    [
        (("complete", "running", "complete"), "running"),
        (("complete", "interrupted", "running"), "interrupted"),
        (("interrupted", "failed", "complete"), "failed"),
    ],
)
def test_any_failed_worker_fails_the_run_then_any_interrupted_one(tmp_path, statuses, expected):
    records = {i: _worker(i, s, 1) for i, s in enumerate(statuses)}
    merged = _merge(tmp_path, records[0], {1: records[1], 2: records[2]})
    assert merged["status"] == expected
    assert "counts" not in merged  # summed only once every worker is complete


def test_a_missing_worker_or_one_of_another_run_has_not_started(tmp_path):
    other = _worker(1, "complete", 3)
    other["fingerprint"] = "another run"
    merged = _merge(tmp_path, _worker(0, "complete", 3), {1: other})
    assert merged["status"] == "running"
    assert [w["status"] for w in merged["workers"]] == ["complete", "not started", "not started"]
    assert merged["progress"] == {"shards_done": 3, "outputs_done": 30}


def test_a_worker_s_error_is_kept_in_its_entry(tmp_path):
    failed = _worker(2, "failed", 0, error="disk full")
    merged = _merge(tmp_path, _worker(0, "complete", 3), {1: _worker(1, "complete", 3), 2: failed})
    assert merged["workers"][2]["error"] == "disk full"
    assert "error" not in merged["workers"][0]


def test_publishing_a_split_job_writes_the_worker_record_and_the_merged_one(tmp_path):
    (tmp_path / CACHE_DIR).mkdir()
    for index in range(3):
        publish_record(tmp_path, _worker(index, "complete", 3), index, 3)
    assert worker_record_path(tmp_path, 2, 3).is_file()
    merged = json.loads((tmp_path / RECORD_NAME).read_text())
    assert merged["status"] == "complete" and merged["counts"]["written"] == 90
