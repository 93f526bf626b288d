"""--pairs has no size cost: a run plans and writes shard by shard from (seed, i), so neither the
dry run nor a real run holds anything per shard of --pairs, and resuming or failing looks only at
the shards on disk (issue 24 item 6)."""

from __future__ import annotations

import json
import tracemalloc

import pytest

import mixgen.pipeline.run as run_module
from mixgen.config import RunConfig
from mixgen.output.manifest import outputs_of, shard_span, shards_of_worker, shards_on_disk
from mixgen.output.writers import FilesWriter
from tests.conftest import SAMPLE


def _config(out, **overrides) -> RunConfig:
    settings = dict(method="cutmix", src=SAMPLE, out=out, size=32, device="cpu", workers=1)
    return RunConfig(**{**settings, **overrides})


def test_a_dry_run_of_many_shards_holds_nothing_per_shard(tmp_path):
    tracemalloc.start()
    try:
        summary = run_module.run(_config(tmp_path / "out", pairs=10**7, shard_size=1, dry_run=True))
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert summary["shards"] == 10**7 and summary["outputs"] == 10**7
    assert peak < 30 * 2**20, f"dry run of 10^7 shards peaked at {peak / 2**20:.0f} MiB"


def test_a_huge_run_writes_its_first_shards_and_resumes_looking_only_at_disk(tmp_path, monkeypatch):
    """10^9 outputs in shards of 4: the run starts writing at once, an interrupt discards only the
    unfinished shard, and the resume checks only the shards on disk for completeness."""
    asked: list[int] = []
    is_complete = FilesWriter.is_complete

    def counted(self, shard, expected, fingerprint):
        asked.append(shard)
        assert len(asked) < 100, "completeness asked of every shard of --pairs"
        return is_complete(self, shard, expected, fingerprint)

    monkeypatch.setattr(FilesWriter, "is_complete", counted)
    write_shard = run_module._write_shard
    writes: list[int] = []

    def interrupt_after(count: int):
        def write(loop, shard, span, start_at):
            if len(writes) == count:
                (loop.writer.directory(shard)).mkdir(parents=True)  # an unfinished shard: no manifest
                raise KeyboardInterrupt
            writes.append(shard)
            return write_shard(loop, shard, span, start_at)

        return write

    out = tmp_path / "out"
    monkeypatch.setattr(run_module, "_write_shard", interrupt_after(2))
    with pytest.raises(KeyboardInterrupt):
        run_module.run(_config(out, pairs=10**9, shard_size=4))
    assert shards_on_disk(out) == [0, 1]  # shard 2 had no manifest: discarded
    record = json.loads((out / "mixgen.json").read_text())
    assert record["status"] == "interrupted" and record["progress"]["shards"] == 25 * 10**7
    assert asked == []

    monkeypatch.setattr(run_module, "_write_shard", interrupt_after(3))
    with pytest.raises(KeyboardInterrupt):
        run_module.run(_config(out, pairs=10**9, shard_size=4))
    assert sorted(asked) == [0, 1] and writes == [0, 1, 2]
    assert shards_on_disk(out) == [0, 1, 2]


@pytest.mark.parametrize(("pairs", "shard_size", "workers"), [(10, 3, 1), (10, 3, 2), (9, 3, 2), (5, 10, 3), (7, 1, 3)])
def test_worker_shards_and_their_outputs_are_counted_without_a_list(pairs, shard_size, workers):
    for index in range(workers):
        shards = shards_of_worker(pairs, shard_size, index, workers)
        assert isinstance(shards, range)
        assert outputs_of(shards, pairs, shard_size) == sum(len(shard_span(s, pairs, shard_size)) for s in shards)


def test_pairs_beyond_the_manifest_index_are_refused_in_one_line(tmp_path):
    from mixgen.errors import UsageError

    with pytest.raises(UsageError, match=r"--pairs must be at most 2\^63-1 \(the manifest's int64 index\)"):
        _config(tmp_path / "out", pairs=2**63).resolve()
    assert _config(tmp_path / "out", pairs=2**63 - 1).resolve().pairs == 2**63 - 1
