"""A run, stage by stage: scan SRC (``mixgen.sources``) → prepare views and the one CAM pass
(``mixgen.prepare``, ``mixgen.campass``) → plan (``mixgen.plan``) → mix (``mixgen.mixing``) →
encode in a thread pool (``mixgen.encode``) → write shards with atomic manifests
(``mixgen.writers``), keeping the run record (``mixgen.record``) at every step. This module only
strings the stages together; it reports progress through a ``Reporter`` and never prints.

Why it is over 400 lines: besides the stage order it holds the two halves every worker runs —
opening OUT (resume, grow, already complete, dry run) and the shard loop that feeds the mixing,
encoding and writing stages — which share the run record and the writer; splitting them would
pass that state through a second module without making either half shorter to read."""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import hashlib
import threading
import time
from collections import deque
from concurrent.futures import Future, ThreadPoolExecutor
from typing import Any

import numpy as np

from mixgen import __version__
from mixgen.campass import CamPass, campass_record, check_probe_classes, load_campass
from mixgen.config import RunConfig
from mixgen.device import MIX_THREADS, device_type_of, mixes_on_pool, resolve_device, torch_threads
from mixgen.errors import MixgenError
from mixgen.faults import fault_error, interrupts_raise, interrupts_seen, raise_if_interrupted_since
from mixgen.lock import Door, claim, refuse_if_taken
from mixgen.mixing import MixContext, mix_batch
from mixgen.outdir import (
    CACHE_DIR,
    check_out_is_ours,
    check_out_outside_src,
    check_sources_outside_out,
    remove_stale_temps,
)
from mixgen.prepare import Prepared, prepare_sources
from mixgen.progress import Reporter
from mixgen.record import environment, look_at_out, new_record, prepare_out, publish, remove_worker_records
from mixgen.source_index import SourceIndex
from mixgen.writers import Shard, ShardWriter, make_writer


def check_sources(cfg: RunConfig, index: SourceIndex) -> None:
    """What the scan alone can refuse: rejected rows under --strict, and one class where the
    probe or cross-class pairing needs two (random pairing of one class only warns)."""
    if cfg.strict and index.rejected:
        first, count = index.rejected[0]["reason"], len(index.rejected)
        if index.layout in ("imagefolder", "cub"):  # a FIFO, socket or device among the images
            raise MixgenError(f"unusable source {first} (--strict; {count} in all); move it out of SRC")
        raise MixgenError(f"unusable index row {first} (--strict; {count} in all); fix the index")
    if index.root.is_file():  # an index file may list images anywhere, OUT included
        check_sources_outside_out(index, cfg.out)
    if cfg.needs_maps and cfg.cam == "probe":
        check_probe_classes(len(index.classes), cfg.src)
    from mixgen.plan import one_class_warning

    if note := one_class_warning(cfg.src, index.classes, (item.label for item in index.items), cfg.pairing):
        index.warnings.append(note)


def run(cfg: RunConfig, reporter: Reporter | None = None) -> dict[str, Any]:
    """Run one mixgen job end to end and return its summary (also written to OUT/mixgen.json).
    Holds this worker's lock on OUT (mixgen.lock) from before OUT is looked at to the end."""
    with interrupts_raise(), contextlib.ExitStack() as held:
        return _run(cfg, reporter or Reporter(), held)


def _run(cfg: RunConfig, reporter: Reporter, held: contextlib.ExitStack) -> dict[str, Any]:
    started = time.perf_counter()
    cfg.resolve()
    check_out_outside_src(cfg.src, cfg.out)
    index = cfg.scan_sources()
    scan_s = time.perf_counter() - started
    check_sources(cfg, index)
    from mixgen.manifest import shards_of_worker

    my_shards = shards_of_worker(cfg.pairs, cfg.shard_size, cfg.shard_index, cfg.num_shards)
    # Refusals and a finished run's answer come before the slow start-up; claim() below decides.
    refuse_if_taken(cfg.out, cfg.shard_index)
    action, previous = look_at_out(cfg, index)
    if action == "resume" and _already_complete(cfg, previous, my_shards):
        action = "complete"
    if cfg.dry_run:
        return _dry_run(cfg, index, my_shards, action, previous)
    if action == "complete":
        return {**previous, "already_complete": True, "outputs": _outputs_of(cfg, my_shards)}
    device = resolve_device(cfg.device)
    if cfg.codec == "cuda" and device.type != "cuda":
        raise MixgenError("--codec cuda needs CUDA, which is not available here; use --codec cpu")
    began, seen = time.perf_counter(), interrupts_seen()
    campass = load_campass(cfg, index, device)
    raise_if_interrupted_since(seen)  # its imports may have turned Ctrl-C into a fallback
    load_s = time.perf_counter() - began
    described = campass_record(campass)
    if (described.get("runtime") or {}).get("note"):
        reporter.info(described["runtime"]["note"])
    record, fingerprints = _open_out(cfg, index, device, described, held, len(my_shards))
    prepared, summary = _produce(cfg, index, device, campass, reporter, my_shards, record, fingerprints)
    timings = {"scan_s": scan_s, "load_s": load_s, **prepared.timings, **summary.pop("timings")}
    timings["total_s"] = time.perf_counter() - started
    record.update(
        status="complete",
        probe=prepared.probe or None,
        counts={**summary["counts"], **prepared.work},
        timings={k: round(v, 3) for k, v in timings.items()},
        environment=summary["environment"],
    )
    record.pop("error", None)
    publish(cfg, record)
    return {**record, "throughput": summary["counts"]["written"] / max(timings["total_s"], 1e-9)}


def _outputs_of(cfg: RunConfig, shards: range) -> int:
    from mixgen.manifest import outputs_of

    return outputs_of(shards, cfg.pairs, cfg.shard_size)


def _already_complete(cfg: RunConfig, previous: dict[str, Any], my_shards: range) -> bool:
    """Nothing is left to do: this worker's record (of a run made as this one is: in one process or
    as this worker) says complete, every shard it covers is whole on disk and the record's run's,
    and what only the loaded backbone would tell cannot differ (the weight files, the runtime asked
    for, the device type; a timm/torchvision pretrained backbone, whose weights are digested once
    loaded, is always loaded), and --strict has nothing to refuse. Only the shards on disk are looked
    at: one missing is work to do."""
    from mixgen.manifest import shard_span, shards_on_disk
    from mixgen.outdir import file_digest, read_json
    from mixgen.record import worker_record_path

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
    writer = make_writer(cfg.writer, cfg.out, cfg.format)
    fingerprint = previous.get("fingerprint") or ""
    on_disk = [shard for shard in shards_on_disk(cfg.out) if shard in my_shards]
    return len(on_disk) == len(my_shards) and all(
        writer.is_complete(shard, shard_span(shard, cfg.pairs, cfg.shard_size), fingerprint) for shard in on_disk
    )


def _dry_run(
    cfg: RunConfig, index: SourceIndex, my_shards: range, action: str, previous: dict[str, Any] | None
) -> dict[str, Any]:
    """What the run would do, without writing: its action on OUT, what it would make and a rough
    estimate of the disk it takes and the time (from the earlier run's own rates where OUT holds one)."""
    from mixgen.estimate import estimate
    from mixgen.manifest import shard_span

    if cfg.needs_maps:  # a file the backbone stage would refuse is refused here too
        from mixgen.backbones import load_state_dict

        for option, path in (("--weights", cfg.weights), ("--checkpoint", cfg.checkpoint)):
            if path is not None:
                load_state_dict(path, option)
    outputs = _outputs_of(cfg, my_shards)
    done = 0
    if action in ("resume", "grow", "complete"):
        writer = make_writer(cfg.writer, cfg.out, cfg.format)
        fingerprints = {(previous or {}).get("fingerprint") or ""}
        starts = _kept_on_disk(cfg, writer, my_shards, fingerprints)
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
        "strict": cfg.strict,
    }


def _kept_on_disk(cfg: RunConfig, writer: ShardWriter, my_shards: range, fingerprints: set[str]) -> dict[int, int]:
    """The first output to write of each shard of this worker that OUT already holds outputs of
    (only shards on disk are looked at, never every shard of --pairs): its end for a complete shard;
    of the shorter last shard of a run that is grown, the end of its last whole mixing batch (so that
    every output comes from the batch a fresh run would mix it in). A shard is kept only when its
    manifest carries one of ``fingerprints`` (this run's; a grown run's too). Shards absent here are
    written whole."""
    from mixgen.manifest import shard_span, shards_on_disk
    from mixgen.plan import mix_batch_size

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


def _open_out(
    cfg: RunConfig,
    index: SourceIndex,
    device,
    described: dict[str, Any],
    held: contextlib.ExitStack,
    shards: int,
) -> tuple[dict[str, Any], set[str]]:
    """Claim OUT for this worker, make it ready (resume, refuse or overwrite) and publish the
    starting record, all inside the OUT lock's door (see mixgen.lock). Returns the record and the
    fingerprints a kept shard may carry: this run's, and the earlier run's when this one grows it."""
    from mixgen.rundiff import load_source_table, save_source_stats, save_source_table

    identity = described.get("identity", {})
    extra = {"sources": index.digest, "backbone": identity, "device_type": device.type, "version": __version__}
    fingerprint = cfg.fingerprint(extra)
    check_out_is_ours(cfg.out)
    cfg.out.mkdir(parents=True, exist_ok=True)
    door = held.enter_context(Door(cfg.out))  # until the first record is out: see mixgen.lock
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
    remove_stale_temps(cfg.out, cfg.out / CACHE_DIR, *(cfg.out / CACHE_DIR).glob("slices-*"))
    if cfg.num_shards == 1:
        remove_worker_records(cfg.out)
    publish(cfg, record)
    door.close()
    return record, fingerprints


def unfinished_grow_base(previous: dict[str, Any] | None) -> int | None:
    """The --pairs of the finished run that ``previous`` (a run record) was growing when it was cut,
    or None when it is no cut grow: a grow keeps that run's outputs until its own are whole."""
    base = (previous or {}).get("grown_from")
    return base if isinstance(base, int) and (previous or {}).get("status") != "complete" else None


def _settle_grown_shards(cfg: RunConfig) -> None:
    """This worker's shards as their committed manifests say, before anything looks at them: a
    grown shard whose commit was cut is finished, what a cut grow added beside a kept manifest goes
    (mixgen.writers). Under the OUT lock: no other process writes these shards."""
    from mixgen.manifest import shards_on_disk

    writer = make_writer(cfg.writer, cfg.out, cfg.format)
    for shard in shards_on_disk(cfg.out):
        if shard % cfg.num_shards == cfg.shard_index:
            writer.settle(shard)


def _produce(
    cfg: RunConfig,
    index: SourceIndex,
    device,
    campass: CamPass | None,
    reporter: Reporter,
    my_shards: range,
    record: dict[str, Any],
    fingerprints: set[str],
) -> tuple[Prepared, dict[str, Any]]:
    """Prepare the sources and write this worker's shards. On any failure the pool has finished
    every queued write: drop the unfinished shard (no manifest means it was never complete) and
    this process's temps, then record why."""
    import torch

    torch.manual_seed(cfg.seed)
    # Not on the pool: an interrupt that lands inside an import can leave that module's lock held,
    # and a pool thread importing the same module would then hang the pool's shutdown for ever.
    threading.Thread(target=_warm_up_pyarrow, name="mixgen-warm-up", daemon=True).start()
    try:
        with ThreadPoolExecutor(cfg.workers) as pool:
            prepared = prepare_sources(cfg, index, device, pool, reporter, campass)
            record["skipped"] = index.rejected + [{"path": s["path"], "reason": s["reason"]} for s in prepared.skipped]
            record["cache_rebuilt"] = prepared.notes
            if cfg.strict and record["skipped"]:  # also when the views came from an earlier run's cache
                first = record["skipped"][0]
                raise MixgenError(
                    f"unreadable image {first['reason']} (--strict; "
                    f"{len(record['skipped'])} unreadable in all); fix or remove it"
                )
            return prepared, _mix_all(cfg, index, prepared, device, pool, reporter, my_shards, record, fingerprints)
    except BaseException as exc:
        error = fault_error(exc, cfg.out) if isinstance(exc, OSError) else exc
        record["status"] = "interrupted" if isinstance(exc, KeyboardInterrupt) else "failed"
        record["error"] = str(error) or type(exc).__name__
        with contextlib.suppress(OSError):
            from mixgen.manifest import shards_on_disk

            writer = make_writer(cfg.writer, cfg.out, cfg.format)
            for shard in shards_on_disk(cfg.out):
                if shard in my_shards:
                    writer.discard_unfinished(shard)
            remove_stale_temps(cfg.out, cfg.out / CACHE_DIR, *(cfg.out / CACHE_DIR).glob("slices-*"), include_own=True)
        with contextlib.suppress(OSError):
            publish(cfg, record)
        if error is not exc:
            raise error from None
        raise


def _warm_up_pyarrow() -> None:
    """pyarrow's first Python-to-Arrow conversion imports pandas (about 0.5 s): pay it on a pool
    thread while sources decode, not on the main thread when the first manifest is written."""
    import pyarrow as pa

    pa.array([0])


# ---------------------------------------------------------------------------------------------
# Plan → mix → encode → write, shard by shard


def run_metadata(
    cfg: RunConfig, index: SourceIndex, backbone: dict[str, Any] | None, device, fingerprint: str
) -> dict[str, Any]:
    """What every manifest's schema metadata records of the run; its fingerprint proves on resume
    that a shard found in OUT is this run's."""
    from mixgen.manifest import SCHEMA_VERSION

    return {
        "schema_version": SCHEMA_VERSION,
        "mixgen_version": __version__,
        "config": cfg.output_settings(),
        "classes": index.classes,
        "backbone": backbone,
        "cam": cfg.cam,
        "seed": cfg.seed,
        "source_digest": index.digest,
        "label_weights": cfg.label_weights,
        "same_label_weights": "sum" if cfg.label_weights == "semantic" else None,
        "environment": environment(device.type),
        "fingerprint": fingerprint,
    }


def _mix_all(
    cfg: RunConfig,
    index: SourceIndex,
    prepared: Prepared,
    device,
    pool: ThreadPoolExecutor,
    reporter: Reporter,
    my_shards: range,
    record: dict[str, Any],
    fingerprints: set[str],
) -> dict[str, Any]:
    from mixgen.manifest import outputs_of, restamp, schema, shard_span
    from mixgen.plan import Pairing

    positions = np.flatnonzero(prepared.readable)
    if len(positions) < 2:
        raise MixgenError(f"SRC {cfg.src}: fewer than 2 readable images; nothing to mix")
    pairing = Pairing(np.array([index.items[p].label for p in positions]), cfg.pairing)
    writer = make_writer(cfg.writer, cfg.out, cfg.format)
    began = time.perf_counter()
    ctx = MixContext(cfg, index, positions, prepared, device, writer.file_name)
    inputs_s = time.perf_counter() - began  # the method's per-source inputs (grids, saliency peaks)
    metadata = run_metadata(cfg, index, record["backbone"], device, record["fingerprint"])
    table_schema = schema(metadata, index.classes)
    span_of = functools.partial(shard_span, pairs=cfg.pairs, shard_size=cfg.shard_size)
    # Only shards already on disk can be kept: look at those, never at every shard of --pairs.
    starts = _kept_on_disk(cfg, writer, my_shards, fingerprints)
    complete = {shard for shard, start in starts.items() if start == span_of(shard).stop}
    for shard in sorted(complete):
        restamp(writer.directory(shard), table_schema)
    kept = sum(start - span_of(shard).start for shard, start in starts.items())
    if record.get("grown_from"):
        reporter.info(f"growing the run of {record['grown_from']} outputs to {cfg.pairs}: {kept} outputs kept")
    elif kept:
        reporter.info(f"resuming: {kept} outputs in complete shards kept")
    todo = (
        (shard, span_of(shard), starts.get(shard, span_of(shard).start)) for shard in my_shards if shard not in complete
    )
    written = 0
    stage_started = time.perf_counter()
    seconds = dict.fromkeys(("plan_s", "mix_s", "encode_s", "write_s", "wait_s", "manifest_s"), 0.0)
    to_write = outputs_of(my_shards, cfg.pairs, cfg.shard_size) - kept
    with reporter.stage("mix + encode", to_write) as advance, torch_threads(MIX_THREADS):
        for shards_done, (shard, span, start) in enumerate(todo, start=len(complete) + 1):
            written += _write_shard(ctx, writer, shard, span, start, table_schema, pairing, pool, seconds, advance)
            record["progress"] = {"shards_done": shards_done, "shards": len(my_shards), "outputs_done": kept + written}
            publish(cfg, record)
    return {
        "counts": {
            "outputs": cfg.pairs,
            "written": written,
            "kept_from_previous_run": kept,
            "sources": len(index),
            "readable_sources": int(len(positions)),
            "skipped_sources": len(prepared.skipped) + len(index.rejected),
            "shards": len(my_shards),
        },
        "timings": {**seconds, "inputs_s": inputs_s, "mix_stage_s": time.perf_counter() - stage_started},
        "environment": metadata["environment"],
    }


def _write_shard(
    ctx: MixContext,
    writer: ShardWriter,
    shard: int,
    span: range,
    start_at: int,
    table_schema: Any,
    pairing,
    pool: ThreadPoolExecutor,
    seconds: dict[str, float],
    advance,
) -> int:
    """Plan, mix, encode and write one shard's outputs from ``start_at`` (those before it are kept)
    in fixed batches (mixing on the pool on a CPU, on the main thread on a GPU), then commit its
    manifest; returns the outputs written."""
    from mixgen.plan import mix_batch_size, plan_outputs

    cfg = ctx.cfg
    rows: list[dict[str, Any]] = writer.kept_rows(shard, start_at) if start_at > span.start else []
    kept = len(rows)
    shard_out = writer.open(shard, span, table_schema, start_at)
    futures: deque[Future] = deque()
    mix_on_pool = mixes_on_pool(ctx.device)

    def collect(future: Future) -> None:
        batch_rows, spent = future.result()
        for key, value in spent.items():
            seconds[key] += value
        rows.extend(batch_rows)
        advance(len(batch_rows))

    batch_size = mix_batch_size(cfg)
    for start in range(start_at, span.stop, batch_size):
        began = time.perf_counter()
        planned = plan_outputs(cfg, pairing, start, min(start + batch_size, span.stop))
        seconds["plan_s"] += time.perf_counter() - began
        mixed = None if mix_on_pool else _mix(ctx, planned)
        futures.append(pool.submit(_finish_batch, ctx, planned, shard_out, mixed))
        began = time.perf_counter()
        while len(futures) > cfg.workers:  # every worker busy, one batch queued
            collect(futures.popleft())
        seconds["wait_s"] += time.perf_counter() - began
    began = time.perf_counter()
    while futures:
        collect(futures.popleft())
    seconds["wait_s"] += time.perf_counter() - began
    began = time.perf_counter()
    shard_out.commit(rows)
    seconds["manifest_s"] += time.perf_counter() - began
    return len(rows) - kept


def _mix(ctx: MixContext, planned: list) -> tuple[list[bytes] | np.ndarray, list[dict[str, Any]], float]:
    """Mix a batch and bring it into the encoders' form; also returns the seconds it took."""
    from mixgen.encode import to_encode

    began = time.perf_counter()
    images, rows = mix_batch(ctx, planned)
    return to_encode(images, ctx.cfg), rows, time.perf_counter() - began


def _finish_batch(
    ctx: MixContext, planned: list, shard: Shard, mixed: tuple | None
) -> tuple[list[dict[str, Any]], dict[str, float]]:
    """Mix the batch (unless the device already has), encode and write its images; returns its
    manifest rows with their sha256 and the seconds spent in each step."""
    encoded, rows, mix_s = mixed if mixed is not None else _mix(ctx, planned)
    spent = {"mix_s": mix_s, "encode_s": 0.0, "write_s": 0.0}
    for image, row in zip(encoded, rows, strict=True):
        row["sha256"], encode_s, write_s = _write_output(shard, row, image, ctx.cfg.format, ctx.cfg.quality)
        spent["encode_s"] += encode_s
        spent["write_s"] += write_s
    return rows, spent


def _write_output(
    shard: Shard, row: dict[str, Any], image: np.ndarray | bytes, fmt: str, quality: int
) -> tuple[str, float, float]:
    """Encode (unless already encoded) and hand one output to its shard; returns its sha256 and the
    seconds spent encoding and writing, for the run record."""
    from mixgen.encode import encode_output

    started = time.perf_counter()
    data = encode_output(image, fmt, quality)
    encoded = time.perf_counter()
    row["sha256"] = hashlib.sha256(data).hexdigest()
    shard.add(row, data)
    return row["sha256"], encoded - started, time.perf_counter() - encoded
