"""``mixgen verify OUT``: re-check a run from what is on disk alone, the way a user would before
training on it: every shard's manifest opens and holds exactly its rows, every image it names is
there with the recorded sha256, nothing else lies in the shard folders, and the indices
0..pairs-1 occur exactly once over all shards."""

from __future__ import annotations

import os
import re
from collections import Counter
from collections.abc import Iterable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from mixgen.errors import MixgenError
from mixgen.files import read_json
from mixgen.layout import DATA_DIR, MANIFEST_NAME, RECORD_NAME, TEMP_SUFFIX, data_dir
from mixgen.output.lock import live_holders
from mixgen.output.writers import HashJob
from mixgen.progress import Reporter

SHARD_NAME = re.compile(r"^\d{5}$")
MAX_LISTED = 10  # per kind of problem and shard; the rest is counted in one line


@dataclass
class Report:
    """What ``verify`` found. ``problems`` holds one line each; empty means the run is sound."""

    out: str
    status: str | None = None
    expected_outputs: int | None = None
    shard_size: int | None = None
    writer: str = "files"
    shards: int = 0
    rows: int = 0
    files_hashed: int = 0
    problems: list[str] = field(default_factory=list)
    recomputed: dict[str, Any] | None = None  # what --recompute redid (see mixgen.commands.recompute)

    @property
    def ok(self) -> bool:
        return not self.problems

    def as_dict(self) -> dict[str, Any]:
        return {**asdict(self), "ok": self.ok}


def _ranges(values: Iterable[int]) -> str:
    """'3, 7..9, 12' from sorted integers, at most a few runs shown."""
    runs: list[list[int]] = []
    for v in sorted(values):
        if runs and v == runs[-1][1] + 1:
            runs[-1][1] = v
        else:
            runs.append([v, v])
    return _shown_runs([(a, b) for a, b in runs])


def _shown_runs(runs: list[tuple[int, int]]) -> str:
    shown = ", ".join(str(a) if a == b else f"{a}..{b}" for a, b in runs[:6])
    return shown + (f" and {len(runs) - 6} more runs" if len(runs) > 6 else "")


def _gaps(seen: set[int], pairs: int) -> tuple[int, list[tuple[int, int]]]:
    """How many of 0..pairs-1 are not in ``seen``, and those runs: from the indices seen alone, so
    that a run of 10^12 outputs with a few written costs what was written, not 10^12."""
    runs, expected = [], 0
    for v in sorted(i for i in seen if 0 <= i < pairs):
        if v > expected:
            runs.append((expected, v - 1))
        expected = v + 1
    if expected < pairs:
        runs.append((expected, pairs - 1))
    return sum(b - a + 1 for a, b in runs), runs


def _listed(problems: list[str], lines: list[str], what: str) -> None:
    problems.extend(lines[:MAX_LISTED])
    if len(lines) > MAX_LISTED:
        problems.append(f"... and {len(lines) - MAX_LISTED} more {what}")


def _expected(out: Path, report: Report) -> tuple[int | None, int | None, str | None]:
    """(pairs, shard_size, the record's fingerprint) from the run record, else (pairs, shard_size,
    None) from a manifest's own metadata."""
    record_path = out / RECORD_NAME
    record = read_json(record_path)
    if record is None:
        report.problems.append(
            f"{record_path}: missing or unreadable run record"
            if not record_path.exists()
            else f"{record_path}: unreadable run record (not a JSON object)"
        )
        try:
            from mixgen.output.manifest import read_run_metadata

            config = read_run_metadata(out).get("config", {})
        except Exception:  # noqa: BLE001 - no readable manifest either; reported per shard below
            return None, None, None
    else:
        config = record.get("config") or {}
        report.status = record.get("status")
        if report.status != "complete":
            workers = record.get("workers") or []
            unfinished = [str(w.get("index")) for w in workers if w.get("status") != "complete"]
            detail = f" (workers not complete: {', '.join(unfinished)})" if unfinished else ""
            report.problems.append(
                f"{record_path}: status is {report.status!r}, not 'complete'{detail}; "
                "re-run the same command to finish the run"
            )
    pairs, shard_size = config.get("pairs"), config.get("shard_size")
    report.writer = config.get("writer") or "files"
    if not isinstance(pairs, int) or not isinstance(shard_size, int) or pairs < 1 or shard_size < 1:
        report.problems.append(f"{record_path}: config lacks valid 'pairs' and 'shard_size'")
        return None, None, None
    return pairs, shard_size, (record or {}).get("fingerprint")


def verify(out: Path, workers: int = 0, reporter: Any = None) -> Report:
    """Check OUT and return a Report. Raises MixgenError (one line, exit 1) only when OUT holds no
    mixgen run at all or a live process is writing it now (see ``_refuse_unless_a_run``).
    ``reporter`` (a mixgen.progress.Reporter) shows the hashing progress."""
    from mixgen.output.manifest import shard_count
    from mixgen.output.writers import make_writer

    out = Path(out)
    _refuse_unless_a_run(out)
    report = Report(out=str(out))
    problems = report.problems
    pairs, shard_size, fingerprint = _expected(out, report)
    report.expected_outputs, report.shard_size = pairs, shard_size
    expected_shards = None if pairs is None else shard_count(pairs, shard_size)

    stray = sorted(e.name for e in os.scandir(out) if e.name.startswith(".") and e.name.endswith(TEMP_SUFFIX))
    _listed(problems, [f"{out / name}: stray temp file (left by a killed run; delete it)" for name in stray], "temps")

    data = data_dir(out)
    if not data.is_dir():
        problems.append(f"{data}: missing (no shard was ever written)")
        return report

    writer = make_writer(report.writer, out, "")
    shard_dirs, extras = _shard_folders(data, writer, expected_shards, problems)
    # Manifests first (cheap), collecting the writer's hashing jobs; then run them all in parallel.
    jobs: list[HashJob] = []
    seen: set[int] = set()  # output indices over all shards
    duplicates: set[int] = set()
    for shard, directory in shard_dirs:
        rows = _check_manifest(report, shard, directory, pairs, shard_size, fingerprint, writer.file_name)
        if rows is None:
            continue
        files, names, digests, indices = rows
        for i in indices:
            if i in seen:
                duplicates.add(i)
            seen.add(i)
        layout, shard_jobs = writer.check_shard(shard, files, (names, digests, indices), extras)
        for lines, what in layout:
            _listed(problems, lines, what)
        jobs.extend(shard_jobs)
    problems.extend(writer.leftovers(extras))
    _run_hash_jobs(report, jobs, workers, reporter or Reporter())
    _check_indices(problems, seen, duplicates, pairs)
    return report


def _refuse_unless_a_run(out: Path) -> None:
    """Refuse, in one line, an OUT that holds no run to check (no such folder, a file, a folder with
    neither a run record nor data/) and one that a live mixgen process is writing now: its record
    says 'running' and its shards are half-written, which is no damage to report."""
    why = "no such folder" if not out.exists() else "it is a file" if not out.is_dir() else ""
    if not why:
        holders = live_holders(out, remove_stale=False)
        if holders:
            first = holders[0][1]
            who = "a mixgen run" if len(holders) == 1 else f"{len(holders)} workers of a sharded job"
            rest = [f"pid {h.pid}" if h.pid else "a process starting up" for _, h in holders[1:]]
            also = f"; also {', '.join(rest)}" if rest else ""
            raise MixgenError(
                f"OUT {out} is being written by {who} ({first.describe()}{also}); "
                f"wait for it to finish, then run `mixgen verify {out}` again"
            )
        from mixgen.output.record import run_record_paths

        if run_record_paths(out) or os.path.lexists(data_dir(out)):
            return
        why = f"no {RECORD_NAME} and no {DATA_DIR}/ in it"
    raise MixgenError(
        f"OUT {out} is not a folder holding a mixgen run ({why}); check the path, "
        f"or make a run there first (e.g. `mixgen cutmix SRC {out}`)"
    )


def _shard_folders(
    data: Path, writer: Any, expected_shards: int | None, problems: list[str]
) -> tuple[list[tuple[int, Path]], dict[int, Path]]:
    """The shard folders of data/ and the writer's own entries there (webdataset: data/NNNNN.tar);
    anything else is a problem."""
    shard_dirs: list[tuple[int, Path]] = []
    extras: dict[int, Path] = {}
    for entry in sorted(os.scandir(data), key=lambda e: e.name):
        path = Path(entry.path)
        claimed = writer.claims(entry.name) if entry.is_file(follow_symlinks=False) else None
        if claimed is not None:
            extras[claimed] = path
        elif not entry.is_dir(follow_symlinks=False) or not SHARD_NAME.match(entry.name):
            problems.append(f"{path}: unexpected entry in data/ (not a shard folder)")
        elif expected_shards is not None and int(entry.name) >= expected_shards:
            problems.append(f"{path}: shard folder beyond the run's {expected_shards} shards")
        else:
            shard_dirs.append((int(entry.name), path))
    return shard_dirs, extras


def _check_manifest(
    report: Report,
    shard: int,
    directory: Path,
    pairs: int | None,
    shard_size: int | None,
    fingerprint: str | None,
    file_name: Any = None,
) -> tuple[set[str], list[str], list[str], list[int]] | None:
    """Check one shard folder's temps, folders and manifest (also that the run the record names
    made it); returns the folder's file names and the manifest's file names, sha256 and indices,
    or None when there is no usable manifest."""
    import pyarrow.parquet as pq

    from mixgen.output.manifest import COLUMNS, metadata_of, shard_span

    problems = report.problems
    manifest = directory / MANIFEST_NAME
    entries = list(os.scandir(directory))
    temps = sorted(e.name for e in entries if e.name.startswith("."))
    _listed(
        problems,
        [f"{directory / t}: stray temp file (unfinished write; re-run the same command)" for t in temps],
        f"temp files in {directory}",
    )
    subdirs = sorted(e.name for e in entries if e.is_dir(follow_symlinks=False) and not e.name.startswith("."))
    _listed(problems, [f"{directory / d}: unexpected folder in a shard" for d in subdirs], "folders")
    files = {e.name for e in entries if not e.name.startswith(".") and not e.is_dir(follow_symlinks=False)}
    if MANIFEST_NAME not in files:
        images = len(files)
        problems.append(
            f"{directory}: no {MANIFEST_NAME} ({images} image(s) without a manifest: an unfinished shard; "
            "re-run the same command to redo it)"
        )
        return None
    try:
        parquet = pq.ParquetFile(manifest)
        columns = parquet.schema_arrow.names
        table = parquet.read(columns=[c for c in ("index", "file_name", "sha256") if c in columns])
    except Exception as exc:  # noqa: BLE001 - any reader error means a broken manifest
        problems.append(f"{manifest}: cannot be read ({str(exc).splitlines()[0][:160] if str(exc) else exc!r})")
        return None
    report.shards += 1
    meta = metadata_of(parquet.schema_arrow)
    made_by = meta.get("fingerprint")
    if not made_by:
        problems.append(
            f"{manifest}: carries no mixgen metadata (no run fingerprint: rewritten by another tool?), so a "
            f"re-run would redo the shard as another run's; remove {directory} and re-run the command that "
            "made the run"
        )
    if fingerprint and made_by and made_by != fingerprint:
        problems.append(
            f"{manifest}: made by another run than {RECORD_NAME} records (fingerprint {made_by}, "
            f"the record's {fingerprint}); re-run the command that made the run to redo the shard"
        )
    if columns != COLUMNS:
        missing = [c for c in COLUMNS if c not in columns]
        problems.append(
            f"{manifest}: columns differ from the mixgen schema"
            + (f" (missing: {', '.join(missing)})" if missing else "")
        )
        if any(c not in columns for c in ("index", "file_name", "sha256")):
            return None
    indices = table.column("index").to_pylist()
    names = table.column("file_name").to_pylist()
    digests = table.column("sha256").to_pylist()
    report.rows += len(indices)
    if shard_size is not None:
        span = shard_span(shard, pairs, shard_size)
        if len(indices) != len(span):
            problems.append(f"{manifest}: {len(indices)} rows, expected {len(span)}")
        outside = set(indices) - set(span)
        if outside:
            problems.append(
                f"{manifest}: indices outside the shard's range {span.start}..{span.stop - 1}: " + _ranges(outside)
            )
    counted = Counter(names)
    repeated = sorted(n for n, c in counted.items() if c > 1)
    _listed(problems, [f"{manifest}: file_name {n!r} listed {counted[n]} times" for n in repeated], "repeats")
    _check_rows(problems, parquet, columns, manifest, indices, names, meta.get("classes"), file_name)
    return files, names, digests, indices


def _check_rows(
    problems: list[str],
    parquet: Any,
    columns: list[str],
    manifest: Path,
    indices: list[int],
    names: list[str],
    classes: Any,
    file_name: Any,
) -> None:
    """What a manifest must say of itself, cheaply, without hashing: each row names its own output's
    file (rows whose file_name and sha256 were swapped hash fine but label the wrong image), each
    label is one of the run's classes and agrees with its class name, and the weights are numbers
    >= 0. A broken row is no unfinished write that a re-run redoes: the shard must be remade."""
    import math

    lines: list[str] = []
    redo = f"remove {manifest.parent} and re-run the command that made the run"
    if file_name is not None:
        for index, name in zip(indices, names, strict=True):
            own = file_name(index).partition(".")[0]
            if not isinstance(name, str) or name.partition(".")[0] != own:
                lines.append(f"{manifest}: output {index}'s row names {name!r}, not its own file ({own}.*); {redo}")
    wanted = [c for c in ("label_a", "label_b", "class_a", "class_b", "weight_a", "weight_b") if c in columns]
    try:
        table = parquet.read(columns=wanted).to_pydict()
    except Exception:  # noqa: BLE001 - read once already: a column that fails now is reported as unreadable
        table = {}
        lines.append(f"{manifest}: label and weight columns cannot be read; {redo}")
    class_names = classes if isinstance(classes, list) else None
    for side in ("a", "b"):
        labels, names_of = table.get(f"label_{side}"), table.get(f"class_{side}")
        if class_names is None or labels is None or names_of is None:
            continue
        known = set(class_names)
        for index, label, name in zip(indices, labels, names_of, strict=True):
            if name not in known:
                lines.append(f"{manifest}: output {index}: class_{side} {name!r} is no class of the run; {redo}")
            elif not isinstance(label, int) or not 0 <= label < len(class_names) or class_names[label] != name:
                lines.append(
                    f"{manifest}: output {index}: label_{side} {label} does not match class_{side} {name!r}; {redo}"
                )
    for side in ("a", "b"):
        for index, weight in zip(indices, table.get(f"weight_{side}") or [], strict=False):
            if weight is None or not math.isfinite(weight) or weight < 0:
                lines.append(f"{manifest}: output {index}: weight_{side} is {weight} (not a number >= 0); {redo}")
    _listed(problems, lines, f"contradictions in {manifest}")


def _run_hash_jobs(report: Report, jobs: list[HashJob], workers: int, reporter: Any) -> None:
    mismatched: list[str] = []
    with ThreadPoolExecutor(workers or os.cpu_count() or 1) as pool, reporter.stage("verify", len(jobs)) as advance:
        for job_problems, hashed in pool.map(lambda job: job(), jobs):
            report.files_hashed += hashed
            mismatched.extend(job_problems)
            advance(1)
    _listed(report.problems, mismatched, "corrupt files")


def _check_indices(problems: list[str], seen: set[int], duplicates: set[int], pairs: int | None) -> None:
    """Every index 0..pairs-1 exactly once over all shards."""
    if duplicates:
        problems.append(f"indices listed in more than one row: {_ranges(duplicates)}")
    if pairs is not None:
        missing, runs = _gaps(seen, pairs)
        if missing:
            problems.append(
                f"{missing} of {pairs} outputs missing: indices {_shown_runs(runs)}; "
                "re-run the same command to write them"
            )
        extra = {i for i in seen if not 0 <= i < pairs}
        if extra:
            problems.append(f"indices outside 0..{pairs - 1}: {_ranges(extra)}")
