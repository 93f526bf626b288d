"""A run, stage by stage: scan SRC (``mixgen.sources``) → prepare views and the one CAM pass
(``prepare``, ``campass``) → plan (``plan``) → mix (``mixing``) → encode in a thread pool (``encode``)
→ write shards with atomic manifests (``mixgen.output.writers``), keeping the run record
(``mixgen.output.record``) at every step. This module only strings the stages together; it reports
progress through a ``Reporter`` and never prints.

Every worker runs two halves: opening OUT (``mixgen.pipeline.open_out``: resume, grow, already
complete, dry run) and the shard loop here, which carries its state in one ``WorkerRun``."""

from __future__ import annotations

import contextlib
import functools
import hashlib
import threading
import time
from collections import deque
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from mixgen.config import RunConfig
from mixgen.device import MIX_THREADS, mixes_on_pool, resolve_device, torch_threads
from mixgen.errors import MixgenError
from mixgen.faults import fault_error, interrupts_raise, interrupts_seen, raise_if_interrupted_since
from mixgen.files import remove_stale_temps
from mixgen.output.checks import check_out_outside_src, check_sources_outside_out
from mixgen.output.lock import refuse_if_taken
from mixgen.output.record import environment, look_at_out, publish
from mixgen.output.writers import Shard, ShardWriter, make_writer
from mixgen.pipeline.campass import (
    CamPass,
    campass_record,
    changed_head,
    check_probe_classes,
    load_campass,
    teacher_identity,
    teacher_record,
    use_cached_head,
)
from mixgen.pipeline.distributed import Coordinator, coordinator_for
from mixgen.pipeline.mixing import MixContext, mix_batch
from mixgen.pipeline.open_out import (
    already_complete,
    cache_folders,
    dry_run,
    kept_on_disk,
    open_out,
    outputs_of_worker,
)
from mixgen.pipeline.prepare import Prepared
from mixgen.progress import Reporter
from mixgen.sources.index import NOT_FOUND, SourceIndex, shortfall
from mixgen.version import __version__


def check_sources(cfg: RunConfig, index: SourceIndex) -> None:
    """What the scan alone can refuse: rejected rows under --strict, and one class where the
    probe or cross-class pairing needs two (random pairing of one class only warns)."""
    if cfg.strict and index.rejected:
        first, count = index.rejected[0]["reason"], len(index.rejected)
        if index.layout == "cub" and NOT_FOUND in first:
            raise MixgenError(
                f"missing source {first} (--strict; {count} unusable in all); "
                "restore it, or drop its line from images.txt"
            )
        if index.layout in ("imagefolder", "cub"):  # a FIFO, socket or device among the images
            raise MixgenError(f"unusable source {first} (--strict; {count} in all); move it out of SRC")
        raise MixgenError(f"unusable index row {first} (--strict; {count} in all); fix the index")
    if index.root.is_file():  # an index file may list images anywhere, OUT included
        check_sources_outside_out(index, cfg.out)
    if cfg.needs_maps and cfg.cam == "probe":
        check_probe_classes(len(index.classes), cfg.src)
    from mixgen.pipeline.plan import one_class_warning

    if note := one_class_warning(cfg.src, index.classes, (item.label for item in index.items), cfg.pairing):
        index.warnings.append(note)


def run(cfg: RunConfig, reporter: Reporter | None = None) -> dict[str, Any]:
    """Run one mixgen job end to end and return its summary (also written to OUT/mixgen.json).
    Holds this worker's lock on OUT (mixgen.output.lock) from before OUT is looked at to the end."""
    with interrupts_raise(), contextlib.ExitStack() as held:
        return _run(cfg, reporter or Reporter(), held)


def _run(cfg: RunConfig, reporter: Reporter, held: contextlib.ExitStack) -> dict[str, Any]:
    started = time.perf_counter()
    coordinator = coordinator_for(cfg)  # under torchrun: joins the process group (before a refusal can end a rank)
    held.callback(coordinator.close)
    with coordinator.together():
        cfg.resolve()
    coordinator.check_settings(cfg)  # a rank started with other settings: every rank refuses, before any work
    from mixgen.output.manifest import shards_of_worker

    writer = make_writer(cfg.writer, cfg.out, cfg.format)
    my_shards = shards_of_worker(cfg.pairs, cfg.shard_size, cfg.shard_index, cfg.num_shards)
    with coordinator.together():
        check_out_outside_src(cfg.src, cfg.out)
        index = cfg.scan_sources()
        scan_s = time.perf_counter() - started
        check_sources(cfg, index)
        if not cfg.dry_run and (note := shortfall(index)):  # said at once, before the long work
            reporter.info(f"warning: {note}")
        # Refusals and a finished run's answer come before the slow start-up; claim() below decides.
        refuse_if_taken(cfg.out, cfg.shard_index)
        action, previous = look_at_out(cfg, index)
        if action == "resume" and already_complete(cfg, writer, previous, my_shards):
            action = "complete"
    coordinator.check_sources(cfg, index)
    if cfg.dry_run:
        return dry_run(cfg, writer, index, my_shards, action, previous)
    if coordinator.all_true(action == "complete"):
        return {**previous, "already_complete": True, "outputs": outputs_of_worker(cfg, my_shards)}
    with coordinator.together():
        device = resolve_device(cfg.device)
        if cfg.codec == "cuda" and device.type != "cuda":
            raise MixgenError("--codec cuda needs CUDA, which is not available here; use --codec cpu")
        began, seen = time.perf_counter(), interrupts_seen()
        campass = load_campass(cfg, index, device)
        raise_if_interrupted_since(seen)  # its imports may have turned Ctrl-C into a fallback
        load_s = time.perf_counter() - began
        described = campass_record(campass)
        if teacher := teacher_identity(cfg, campass):
            described["teacher"] = teacher
        if (described.get("runtime") or {}).get("note"):
            reporter.info(described["runtime"]["note"])
        record, fingerprints = open_out(cfg, index, device, described, held, len(my_shards))
    job = WorkerRun(cfg, index, device, reporter, writer, my_shards, record, fingerprints, campass, coordinator)
    prepared, summary = _produce(job)
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
    if coordinator.world > 1 and coordinator.coordination:
        record["coordination"] = coordinator.coordination
    publish(cfg, record)
    coordinator.finish()  # under torchrun: every rank leaves together (a killed one is restarted with all)
    return {**record, "throughput": summary["counts"]["written"] / max(timings["total_s"], 1e-9)}


@dataclass
class WorkerRun:
    """One worker's run as it passes from stage to stage: its settings and sources, the device and
    CAM pass, the shards it writes through OUT's writer, and the record it keeps publishing."""

    cfg: RunConfig
    index: SourceIndex
    device: Any
    reporter: Reporter
    writer: ShardWriter
    my_shards: range
    record: dict[str, Any]
    fingerprints: set[str]  # what a kept shard's manifest may carry: this run's, and a grown run's
    campass: CamPass | None = None
    coordinator: Coordinator = field(default_factory=Coordinator)  # how the job's workers share the source stage


@dataclass
class ShardLoop:
    """What writing each shard of the mix stage shares."""

    ctx: MixContext
    writer: ShardWriter
    table_schema: Any
    pairing: Any
    pool: ThreadPoolExecutor
    seconds: dict[str, float]  # time spent per step, summed over the shards
    advance: Callable[[int], None]  # the progress bar


def _produce(job: WorkerRun) -> tuple[Prepared, dict[str, Any]]:
    """Prepare the sources and write this worker's shards. On any failure the pool has finished
    every queued write: drop the unfinished shard (no manifest means it was never complete) and
    this process's temps, then record why."""
    import torch

    cfg, record = job.cfg, job.record
    torch.manual_seed(cfg.seed)
    # Not on the pool: an interrupt that lands inside an import can leave that module's lock held,
    # and a pool thread importing the same module would then hang the pool's shutdown for ever.
    threading.Thread(target=_warm_up_pyarrow, name="mixgen-warm-up", daemon=True).start()
    try:
        with ThreadPoolExecutor(cfg.workers) as pool:
            prepared = job.coordinator.prepare(cfg, job.index, job.device, pool, job.reporter, job.campass)
            use_cached_head(job.campass, prepared.head)
            unreadable = [{"path": s["path"], "reason": s["reason"]} for s in prepared.skipped]
            record["skipped"] = job.index.rejected + unreadable
            record["shortfall"] = shortfall(job.index, prepared.readable)
            record["cache_rebuilt"] = prepared.notes
            if cfg.strict and record["skipped"]:  # also when the views came from an earlier run's cache
                first = record["skipped"][0]
                raise MixgenError(
                    f"unreadable image {first['reason']} (--strict; "
                    f"{len(record['skipped'])} unreadable in all); fix or remove it"
                )
            return prepared, _mix_all(job, prepared, pool)
    except BaseException as exc:
        error = fault_error(exc, cfg.out) if isinstance(exc, OSError) else exc
        record["status"] = "interrupted" if isinstance(exc, KeyboardInterrupt) else "failed"
        record["error"] = str(error) or type(exc).__name__
        with contextlib.suppress(OSError):
            from mixgen.output.manifest import shards_on_disk

            for shard in shards_on_disk(cfg.out):
                if shard in job.my_shards:
                    job.writer.discard_unfinished(shard)
            remove_stale_temps(cfg.out, *cache_folders(cfg), include_own=True)
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
    cfg: RunConfig,
    index: SourceIndex,
    backbone: dict[str, Any] | None,
    device,
    fingerprint: str,
    teacher: dict[str, Any] | None = None,
) -> dict[str, Any]:
    """What every manifest's schema metadata records of the run; its fingerprint proves on resume
    that a shard found in OUT is this run's. A teacher run also says what its teacher was."""
    from mixgen.methods import MAP_RULES, TEACHER
    from mixgen.output.manifest import SCHEMA_VERSION

    same_label = "sum" if cfg.label_weights in MAP_RULES else None
    metadata = {
        "schema_version": SCHEMA_VERSION,
        "mixgen_version": __version__,
        "config": cfg.output_settings(),
        "classes": index.classes,
        "backbone": backbone,
        "cam": cfg.cam,
        "seed": cfg.seed,
        "source_digest": index.digest,
        "label_weights": cfg.label_weights,
        "same_label_weights": "posterior" if cfg.label_weights == TEACHER else same_label,
        "environment": environment(device.type),
        "fingerprint": fingerprint,
    }
    if teacher is not None:
        metadata["teacher"] = teacher
    return metadata


def _mix_all(job: WorkerRun, prepared: Prepared, pool: ThreadPoolExecutor) -> dict[str, Any]:
    from mixgen.output.manifest import outputs_of, restamp, schema, shard_span
    from mixgen.pipeline.plan import Pairing

    cfg, index, device, reporter, writer = job.cfg, job.index, job.device, job.reporter, job.writer
    my_shards, record = job.my_shards, job.record

    positions = np.flatnonzero(prepared.readable)
    if len(positions) < 2:
        raise MixgenError(f"SRC {cfg.src}: fewer than 2 readable images; nothing to mix")
    pairing = Pairing(np.array([index.items[p].label for p in positions]), cfg.pairing)
    began = time.perf_counter()
    ctx = MixContext(cfg, index, positions, prepared, device, writer.file_name, job.campass)
    inputs_s = time.perf_counter() - began  # the method's per-source inputs (grids, saliency peaks)
    span_of = functools.partial(shard_span, pairs=cfg.pairs, shard_size=cfg.shard_size)
    # Only shards already on disk can be kept: look at those, never at every shard of --pairs.
    starts = kept_on_disk(cfg, writer, my_shards, job.fingerprints)
    teacher = teacher_record(cfg, job.campass)
    if teacher is not None:
        _check_teacher_head(cfg, record.get("teacher"), teacher, bool(starts))
        record["teacher"] = teacher
    metadata = run_metadata(cfg, index, record["backbone"], device, record["fingerprint"], teacher)
    table_schema = schema(metadata, index.classes)
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
        loop = ShardLoop(ctx, writer, table_schema, pairing, pool, seconds, job.coordinator.progress(advance))
        for shards_done, (shard, span, start) in enumerate(todo, start=len(complete) + 1):
            written += _write_shard(loop, shard, span, start)
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
        "timings": {
            **seconds,
            "inputs_s": inputs_s,
            "mix_stage_s": time.perf_counter() - stage_started,
            # The teacher's backbone passes over the mixed images (within mix_s).
            **({"teacher_s": job.campass.teacher_seconds} if teacher is not None else {}),
        },
        "environment": metadata["environment"],
    }


def _check_teacher_head(cfg: RunConfig, before: dict[str, Any] | None, now: dict[str, Any], kept: bool) -> None:
    """Outputs kept from an earlier try of the run were weighed by the head it recorded: another head
    now (a cache rebuilt where the probe fits to other floats) would mix two teachers in one run."""
    recorded = changed_head(before, now)
    if kept and recorded is not None:
        raise MixgenError(
            f"OUT {cfg.out}: the teacher's head differs from the one its kept outputs were weighed with "
            f"(sha256 {recorded[:12]}… then, {now['head_sha256'][:12]}… now: the probe was refitted to other "
            "floats); choose a new OUT, or delete this one to start afresh"
        )


def _write_shard(loop: ShardLoop, shard: int, span: range, start_at: int) -> int:
    """Plan, mix, encode and write one shard's outputs from ``start_at`` (those before it are kept)
    in fixed batches (mixing on the pool on a CPU, on the main thread on a GPU), then commit its
    manifest; returns the outputs written."""
    from mixgen.pipeline.plan import mix_batch_size, plan_outputs

    ctx, writer, pool, seconds = loop.ctx, loop.writer, loop.pool, loop.seconds
    cfg = ctx.cfg
    rows: list[dict[str, Any]] = writer.kept_rows(shard, start_at) if start_at > span.start else []
    kept = len(rows)
    shard_out = writer.open(shard, span, loop.table_schema, start_at)
    futures: deque[Future] = deque()
    # The teacher's backbone call sets torch's (process-wide) thread count for its duration, and a
    # bilinear resize rounds differently at another count: mixed on the pool beside it, some
    # SnapMix pastes came out 1 level off, differently from run to run. So a teacher run mixes
    # one batch at a time on this thread (its backbone pass is most of the cost anyway).
    mix_on_pool = mixes_on_pool(ctx.device) and ctx.teacher is None

    def collect(future: Future) -> None:
        batch_rows, spent = future.result()
        for key, value in spent.items():
            seconds[key] += value
        rows.extend(batch_rows)
        loop.advance(len(batch_rows))

    batch_size = mix_batch_size(cfg)
    for start in range(start_at, span.stop, batch_size):
        began = time.perf_counter()
        planned = plan_outputs(cfg, loop.pairing, start, min(start + batch_size, span.stop))
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
    from mixgen.pipeline.encode import to_encode

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
    from mixgen.pipeline.encode import encode_output

    started = time.perf_counter()
    data = encode_output(image, fmt, quality)
    encoded = time.perf_counter()
    row["sha256"] = hashlib.sha256(data).hexdigest()
    shard.add(row, data)
    return row["sha256"], encoded - started, time.perf_counter() - encoded
