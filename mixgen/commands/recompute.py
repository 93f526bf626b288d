"""``mixgen verify OUT --recompute K|all``: redo sampled rows from SRC and compare.

``verify`` alone checks files against the manifest, so an image replaced together with its
sha256, or a manifest with wrong weights, passes it. Recompute trusts nothing in OUT but the
run's recorded configuration: it rescans SRC (refusing when SRC is gone or changed), decodes the
views and computes the maps afresh in a temporary folder (never OUT's caches), plans and mixes
with the run's own stage functions on the run's device type, encodes, and compares each sampled
row's image bytes (sha256, against the manifest and the file on disk) and every manifest column.

The run mixes outputs in fixed batches aligned to each shard's start, and float results may
depend on what else is in a batch, so the whole batch holding a sampled row is recomputed and
only the sampled rows are compared."""

from __future__ import annotations

import hashlib
import tempfile
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from mixgen.config import RunConfig, recorded_runtime
from mixgen.errors import MixgenError, UsageError
from mixgen.files import read_json
from mixgen.layout import RECORD_NAME

MAX_DETAIL = 3  # columns named per differing row


@dataclass
class Recomputed:
    """What ``recompute`` compared: rows sampled, batches mixed, and one line per differing row."""

    sampled: int = 0
    batches: int = 0
    device_type: str = ""
    problems: list[str] = field(default_factory=list)


def parse_count(text: str | None) -> int | None:
    """--recompute K|all: a positive count, or 0 for every row; None when not asked."""
    if text is None:
        return None
    if text.strip().lower() == "all":
        return 0
    try:
        count = int(text)
    except ValueError:
        count = -1
    if count < 1:
        raise UsageError(f"--recompute must be a positive number of rows or 'all', got {text!r}")
    return count


def sample_rows(indices: list[int], count: int, seed: int) -> list[int]:
    """``count`` of ``indices`` (all for 0), the same for the same seed: a reproducible check."""
    if count == 0 or count >= len(indices):
        return sorted(indices)
    rng = np.random.default_rng(np.random.SeedSequence([seed, len(indices)]))
    return sorted(int(i) for i in rng.choice(np.array(sorted(indices)), size=count, replace=False))


def _run_config(meta: dict[str, Any], src: Path, out: Path, device_type: str) -> RunConfig:
    """The run's configuration as recorded in its manifests, pointed at a scratch OUT."""
    settings = dict(meta.get("config") or {})
    if "method" not in settings:
        raise MixgenError("the run's manifests record no configuration; recompute with the mixgen version that made it")
    try:
        # The CAM pass's runtime is not an output setting, but its maps are its own: use the run's.
        runtime = recorded_runtime(meta)
        return RunConfig.from_settings(settings, src=src, out=out, device=device_type, runtime=runtime).resolve()
    except UsageError as exc:
        raise MixgenError(
            f"the run's recorded configuration does not fit this mixgen ({exc}); "
            "recompute with the mixgen version that made the run"
        ) from None


def _recorded_src(out: Path, record: dict[str, Any], src: Path | None) -> Path:
    if src is None:
        root = (record.get("source") or {}).get("root")
        if not root:
            raise MixgenError(f"{out / RECORD_NAME} does not name the run's SRC; pass --src")
        src = Path(root)
    if not src.exists():
        raise MixgenError(f"SRC {src} of the run is gone; pass --src with its new place to recompute")
    return src


def _record_disagrees(meta: dict[str, Any], record: dict[str, Any]) -> str:
    """The settings (method first) in which the run record and the manifests' metadata differ:
    rows are recomputed from the manifests' settings, so a record of another run would pass."""
    recorded = record.get("config") or {}
    ran = meta.get("config") or {}
    keys = sorted((k for k in ran if k in recorded and recorded[k] != ran[k]), key=lambda k: (k != "method", k))
    parts = [f"{k} {_short(recorded[k])} in the record, {_short(ran[k])} in the manifests" for k in keys[:MAX_DETAIL]]
    if not parts and record.get("fingerprint") and meta.get("fingerprint") not in (None, record["fingerprint"]):
        parts = ["their fingerprints differ"]
    return "; ".join(parts)


def _device(device_type: str):
    import torch

    from mixgen.device import resolve_device

    if device_type == "cuda" and not torch.cuda.is_available():
        raise MixgenError("the run was made on CUDA and no CUDA device is here; recompute on a CUDA machine")
    return resolve_device("auto" if device_type == "cuda" else device_type)


def recompute(
    out: Path, count: int, seed: int = 0, src: Path | None = None, workers: int = 0, reporter: Any = None
) -> Recomputed:
    """Recompute ``count`` sampled rows of OUT (0: all) and compare them; see the module doc.
    Raises MixgenError (one line) when the rows cannot be recomputed: SRC gone or changed, no
    device of the run's type, another backbone."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    from mixgen.device import MIX_THREADS, torch_threads
    from mixgen.output.manifest import manifest_paths, read_manifest, read_run_metadata
    from mixgen.output.writers import make_writer
    from mixgen.pipeline.plan import Pairing, batch_of, mix_batch_size, plan_outputs
    from mixgen.progress import Reporter

    out = Path(out)
    reporter = reporter or Reporter()
    try:
        meta = read_run_metadata(out)
        table = read_manifest(out)
        arrow_schema = pq.read_schema(manifest_paths(out)[0])
    except (FileNotFoundError, OSError, KeyError, ValueError) as exc:
        raise MixgenError(f"OUT {out}: no readable manifest to recompute ({exc})") from None
    record = read_json(out / RECORD_NAME) or {}
    device_type = (meta.get("environment") or {}).get("device_type") or record.get("device_type") or "cpu"
    result = Recomputed(device_type=device_type)
    if differing := _record_disagrees(meta, record):
        result.problems.append(f"{out / RECORD_NAME} and the manifests record different runs ({differing})")
    src = _recorded_src(out, record, src)
    device = _device(device_type)

    with tempfile.TemporaryDirectory(prefix="mixgen-recompute-") as scratch:
        cfg = _run_config(meta, src, Path(scratch), device_type)
        if workers:
            cfg.workers = workers
        ctx = _prepare(cfg, out, meta, record, device, reporter, result)
        rows_by_index = {row["index"]: row for row in table.to_pylist()}
        sampled = sample_rows(list(rows_by_index), count, seed)
        result.sampled = len(sampled)
        batches: dict[tuple[int, int], list[int]] = {}
        size = mix_batch_size(cfg)
        for i in sampled:
            batches.setdefault(batch_of(i, cfg.pairs, cfg.shard_size, size), []).append(i)
        result.batches = len(batches)
        writer = make_writer(cfg.writer, out, cfg.format)  # OUT's layout: its names and stored bytes
        pairing = Pairing(ctx.labels[ctx.positions], cfg.pairing)
        with reporter.stage("recompute", len(sampled)) as advance, torch_threads(MIX_THREADS):
            for (start, stop), wanted in batches.items():
                fresh = _mix_rows(ctx, plan_outputs(cfg, pairing, start, stop), wanted)
                for row in pa.Table.from_pylist(fresh, schema=arrow_schema).to_pylist():
                    problem = _compare(writer, row, rows_by_index[row["index"]], cfg.shard_size)
                    if problem:
                        result.problems.append(problem)
                advance(len(fresh))
    return result


def _prepare(
    cfg: RunConfig, out: Path, meta: dict[str, Any], record: dict[str, Any], device, reporter: Any, result: Recomputed
) -> Any:
    """Rescan SRC, load the run's backbone and prepare every source afresh in the scratch OUT, as
    the run did; returns the mixing context. Refuses changed sources and another backbone."""
    import torch

    from mixgen.output.rundiff import describe_sources
    from mixgen.output.writers import make_writer
    from mixgen.pipeline.campass import (
        campass_record,
        changed_head,
        load_campass,
        teacher_record,
        use_cached_head,
    )
    from mixgen.pipeline.mixing import MixContext
    from mixgen.pipeline.prepare import prepare_sources

    index = cfg.scan_sources()
    what = describe_sources(out, record, index) if record else None  # also a source changed in place
    if index.digest != meta.get("source_digest") or what:
        raise MixgenError(
            f"SRC {cfg.src} changed since the run ({what or 'its digest differs'}); "
            "recompute needs the sources the run was made from"
        )
    campass = load_campass(cfg, index, device)
    if (campass_record(campass).get("identity") or None) != (meta.get("backbone") or None):
        raise MixgenError(
            "the backbone or its weights differ from the run's (recorded "
            f"{meta.get('backbone')}); recompute with the same --weights/--checkpoint files"
        )
    torch.manual_seed(cfg.seed)
    with ThreadPoolExecutor(cfg.workers) as pool:
        prepared = prepare_sources(cfg, index, device, pool, reporter, campass)
    use_cached_head(campass, prepared.head)  # the teacher's (--label-weights teacher), fitted afresh
    teacher = teacher_record(cfg, campass)
    if teacher is not None and (recorded := changed_head(meta.get("teacher"), teacher)) is not None:
        result.problems.append(
            f"the teacher's head differs from the run's (sha256 {recorded[:12]}… recorded, "
            f"{teacher['head_sha256'][:12]}… recomputed): every row's weights may differ"
        )
    recorded_skips = sorted(s.get("path") for s in record.get("skipped") or [])
    # The run records the scan's refusals (a listed file not there, a bad index row) with the
    # images it could not decode: both count.
    skips_now = sorted(s["path"] for s in [*index.rejected, *prepared.skipped])
    if record and recorded_skips != skips_now:
        result.problems.append(
            f"the readable sources differ from the run's ({len(skips_now)} unreadable now, "
            f"{len(recorded_skips)} then): every row may differ"
        )
    positions = np.flatnonzero(prepared.readable)
    file_name = make_writer(cfg.writer, out, cfg.format).file_name
    return MixContext(cfg, index, positions, prepared, device, file_name, campass)


def _mix_rows(ctx: Any, planned: list, wanted: list[int]) -> list[dict[str, Any]]:
    """Mix a whole batch as the run did and return the wanted rows with their images' sha256."""
    from mixgen.pipeline.encode import encode_output, to_encode
    from mixgen.pipeline.mixing import mix_batch

    cfg = ctx.cfg
    images, rows = mix_batch(ctx, planned)
    fresh = []
    for image, row in zip(to_encode(images, cfg), rows, strict=True):
        if row["index"] in wanted:
            row["sha256"] = hashlib.sha256(encode_output(image, cfg.format, cfg.quality)).hexdigest()
            fresh.append(row)
    return fresh


def _compare(writer: Any, fresh: dict[str, Any], recorded: dict[str, Any], shard_size: int) -> str | None:
    """One line naming row i and what differs between its recomputation and OUT, or None. The
    stored image is read through the run's writer (a file, or a member of the shard's tar)."""
    i = fresh["index"]
    shard, name = i // shard_size, str(recorded.get("file_name"))
    where = f"row {i} ({writer.where(shard, name)})"
    if fresh["sha256"] != recorded.get("sha256"):
        image = "image differs from its recomputation (the manifest's sha256 too)"
    elif writer.output_digest(shard, name) != fresh["sha256"]:
        image = "image file differs from its recomputation"
    else:
        image = None
    columns = [c for c in fresh if c != "sha256" and fresh[c] != recorded.get(c)]
    details = [f"{c} {_short(recorded.get(c))} in the manifest, {_short(fresh[c])} recomputed" for c in columns]
    if len(details) > MAX_DETAIL:
        details = [*details[:MAX_DETAIL], f"{len(details) - MAX_DETAIL} more columns"]
    parts = ([image] if image else []) + details
    return f"{where}: {'; '.join(parts)}" if parts else None


def _short(value: Any) -> str:
    text = f"{value:.7g}" if isinstance(value, float) else str(value)
    return text if len(text) <= 48 else text[:45] + "..."
