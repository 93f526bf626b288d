"""Opening OUT, the first half of every worker's run: whether the run is already complete, what a
dry run reports, which outputs OUT already holds (resume, a grown run), and claiming OUT and
publishing the starting record inside the lock's door. ``mixgen.pipeline.run`` calls these before
any backbone loads or shard is written."""

from __future__ import annotations

import contextlib
import dataclasses
from typing import Any

from mixgen.config import RunConfig
from mixgen.device import device_type_of
from mixgen.files import remove_stale_temps
from mixgen.layout import CACHE_DIR, SLICES_GLOB
from mixgen.output.checks import check_out_is_ours
from mixgen.output.lock import Door, claim
from mixgen.output.record import new_record, prepare_out, publish, remove_worker_records, unfinished_grow_base
from mixgen.output.writers import ShardWriter, make_writer
from mixgen.sources.index import SourceIndex, shortfall
from mixgen.version import __version__


def cache_folders(cfg: RunConfig) -> list:
    """OUT/.mixgen, the cache folder (when --cache-dir names another) and their slice boards: where
    a dead writer's temps may be left."""
    folders = [cfg.out / CACHE_DIR]
    if cfg.cache != cfg.out / CACHE_DIR:
        folders.append(cfg.cache)
    return [*folders, *(board for folder in folders for board in folder.glob(SLICES_GLOB))]


def outputs_of_worker(cfg: RunConfig, shards: range) -> int:
    from mixgen.output.manifest import outputs_of

    return outputs_of(shards, cfg.pairs, cfg.shard_size)


def already_complete(cfg: RunConfig, writer: ShardWriter, previous: dict[str, Any], my_shards: range) -> bool:
    """Nothing is left to do: this worker's record (of a run made as this one is: in one process or
    as this worker) says complete, every shard it covers is whole on disk and the record's run's,
    and what only the loaded backbone would tell cannot differ (the weight files, the runtime asked
    for, the device type; a timm/torchvision pretrained backbone, whose weights are digested once
    loaded, is always loaded), and --strict has nothing to refuse. Only the shards on disk are looked
    at: one missing is work to do."""
    from mixgen.files import file_digest, read_json
    from mixgen.output.manifest import shard_span, shards_on_disk
    from mixgen.output.record import worker_record_path

    mine = previous if "workers" not in previous else {}  # one process takes over a sharded job's record
    if cfg.num_shards > 1:
        mine = read_json(worker_record_path(cfg.out, cfg.shard_index, cfg.num_shards)) or {}
    if mine.get("status") != "complete" or previous.get("device_type") != device_type_of(cfg.device):
        return False
    if cfg.strict and mine.get("skipped"):
        return False  # the run skipped unreadable sources: --strict refuses it on the full path
    backbone = previous.get("backbone") or {}
    weights = cfg.checkpoint or cfg.weights
    if weights is not None and (not weights.is_file() or file_digest(weights) != backbone.get("weights")):
        return False
    if weights is None and backbone.get("library"):
        return False  # timm/torchvision pretrained weights: only loading them tells whether they changed
    if backbone and cfg.runtime != "auto" and backbone.get("runtime") != cfg.runtime:
        return False
    if cfg.label_weights == "boxes":
        from mixgen.sources.boxes import boxes_file_digest

        if previous.get("boxes_sha256") != boxes_file_digest(cfg.src):
            return False  # new boxes, new labels: the full path refuses or redoes the run
    fingerprint = previous.get("fingerprint") or ""
    on_disk = [shard for shard in shards_on_disk(cfg.out) if shard in my_shards]
    return len(on_disk) == len(my_shards) and all(
        writer.is_complete(shard, shard_span(shard, cfg.pairs, cfg.shard_size), fingerprint) for shard in on_disk
    )


def dry_run(
    cfg: RunConfig,
    writer: ShardWriter,
    index: SourceIndex,
    my_shards: range,
    action: str,
    previous: dict[str, Any] | None,
) -> dict[str, Any]:
    """What the run would do, without writing: its action on OUT, what it would make and a rough
    estimate of the disk it takes and the time (from the earlier run's own rates where OUT holds one)."""
    from mixgen.output.manifest import shard_span
    from mixgen.pipeline.estimate import estimate

    if cfg.needs_maps:  # a file the backbone stage would refuse is refused here too
        from mixgen.cam.backbones import load_state_dict

        for option, path in (("--weights", cfg.weights), ("--checkpoint", cfg.checkpoint)):
            if path is not None:
                load_state_dict(path, option)
    outputs = outputs_of_worker(cfg, my_shards)
    done = 0
    if action in ("resume", "grow", "complete"):
        fingerprints = {(previous or {}).get("fingerprint") or ""}
        starts = kept_on_disk(cfg, writer, my_shards, fingerprints)
        done = sum(start - shard_span(shard, cfg.pairs, cfg.shard_size).start for shard, start in starts.items())
    return {
        "dry_run": True,
        "action": action,
        "out": str(cfg.out),
        "sources": len(index),
        "layout": index.layout,
        "split": cfg.split,
        "classes": len(index.classes),
        "outputs": cfg.pairs,
        "shards": len(my_shards),
        "to_write": outputs - done,
        "previous_outputs": ((previous or {}).get("config") or {}).get("pairs"),
        "estimate": estimate(cfg, index, outputs - done, previous, prepare=action in ("start", "overwrite", "restart")),
        "config": cfg.output_settings(),
        "warnings": index.warnings,
        "skipped": index.rejected,
        "shortfall": shortfall(index),
        "strict": cfg.strict,
    }


def kept_on_disk(cfg: RunConfig, writer: ShardWriter, my_shards: range, fingerprints: set[str]) -> dict[int, int]:
    """The first output to write of each shard of this worker that OUT already holds outputs of
    (only shards on disk are looked at, never every shard of --pairs): its end for a complete shard;
    of the shorter last shard of a run that is grown, the end of its last whole mixing batch (so that
    every output comes from the batch a fresh run would mix it in). A shard is kept only when its
    manifest carries one of ``fingerprints`` (this run's; a grown run's too). Shards absent here are
    written whole."""
    from mixgen.output.manifest import shard_span, shards_on_disk
    from mixgen.pipeline.plan import mix_batch_size

    batch = mix_batch_size(cfg)
    starts = {}
    for shard in shards_on_disk(cfg.out):
        if shard not in my_shards:
            continue
        span = shard_span(shard, cfg.pairs, cfg.shard_size)
        if writer.is_complete(shard, span, fingerprints):
            start = span.stop
        else:
            start = span.start + (writer.complete_prefix(shard, span, fingerprints) - span.start) // batch * batch
        if start > span.start:
            starts[shard] = start
    return starts


def open_out(
    cfg: RunConfig,
    index: SourceIndex,
    device,
    described: dict[str, Any],
    held: contextlib.ExitStack,
    shards: int,
) -> tuple[dict[str, Any], set[str]]:
    """Claim OUT for this worker, make it ready (resume, refuse or overwrite) and publish the
    starting record, all inside the OUT lock's door (see mixgen.output.lock). Returns the record and the
    fingerprints a kept shard may carry: this run's, and the earlier run's when this one grows it."""
    from mixgen.output.rundiff import load_source_table, save_source_stats, save_source_table

    identity = described.get("identity", {})
    extra = {"sources": index.digest, "backbone": identity, "device_type": device.type, "version": __version__}
    if cfg.label_weights == "boxes":  # the labels are the boxes': new boxes, another run
        from mixgen.sources.boxes import read_boxes

        extra["boxes"] = read_boxes(index)[1]
    if described.get("teacher"):  # the labels are the teacher's: another head, another run
        extra["teacher"] = described["teacher"]
    fingerprint = cfg.fingerprint(extra)
    check_out_is_ours(cfg.out)
    cfg.out.mkdir(parents=True, exist_ok=True)
    door = held.enter_context(Door(cfg.out))  # until the first record is out: see mixgen.output.lock
    held.callback(claim(cfg.out, fingerprint, cfg.shard_index, cfg.num_shards).release)
    held.callback(door.close)  # before the release, which passes the door again
    _settle_grown_shards(cfg)
    previous = prepare_out(cfg, fingerprint, index, extra)
    if previous is None or load_source_table(cfg.out) is None:  # what a later refusal compares with
        (cfg.out / CACHE_DIR).mkdir(exist_ok=True)
        save_source_table(cfg.out, index)
    (cfg.out / CACHE_DIR).mkdir(exist_ok=True)
    save_source_stats(cfg.out, index)  # what a later run checks sources changed in place against
    record = new_record(cfg, index, fingerprint, device, described, previous is not None)
    if "boxes" in extra:
        record["boxes_sha256"] = extra["boxes"]
    if "teacher" in extra:  # a resumed run's says which head its kept outputs were weighed with
        record["teacher"] = (previous or {}).get("teacher") or extra["teacher"]
    old_pairs = ((previous or {}).get("config") or {}).get("pairs")
    fingerprints = {fingerprint}
    base = unfinished_grow_base(previous)
    if base is not None:  # a grow that was cut (resumed, or taken back): its finished run's shards stay
        base_fingerprint = dataclasses.replace(cfg, pairs=base).fingerprint(extra)
        fingerprints |= {previous.get("fingerprint") or fingerprint, base_fingerprint}
        if cfg.pairs != base:
            record["grown_from"] = base
    elif old_pairs != cfg.pairs and previous is not None:
        record["grown_from"] = old_pairs
        fingerprints.add(previous.get("fingerprint") or fingerprint)
    elif (previous or {}).get("grown_from") is not None:  # resuming an interrupted grow
        record["grown_from"] = previous["grown_from"]
    record["progress"] = {"shards_done": 0, "shards": shards, "outputs_done": 0}
    remove_stale_temps(cfg.out, *cache_folders(cfg))
    if cfg.num_shards == 1:
        remove_worker_records(cfg.out)
    publish(cfg, record)
    door.close()
    return record, fingerprints


def _settle_grown_shards(cfg: RunConfig) -> None:
    """This worker's shards as their committed manifests say, before anything looks at them: a
    grown shard whose commit was cut is finished, what a cut grow added beside a kept manifest goes
    (mixgen.output.writers). Under the OUT lock: no other process writes these shards."""
    from mixgen.output.manifest import shards_on_disk

    writer = make_writer(cfg.writer, cfg.out, cfg.format)
    for shard in shards_on_disk(cfg.out):
        if shard % cfg.num_shards == cfg.shard_index:
            writer.settle(shard)
