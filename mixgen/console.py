"""The terminal side of the commands: rich progress bars, one-line errors with their exit codes,
and the summary tables printed after a run and after ``mixgen cam``."""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import typer
from rich.console import Console
from rich.markup import escape
from rich.progress import BarColumn, MofNCompleteColumn, Progress, ProgressColumn, TextColumn, TimeRemainingColumn
from rich.table import Table
from rich.text import Text

from mixgen.errors import MixgenError
from mixgen.layout import CAMS_INDEX, MANIFEST_NAME, RECORD_NAME

stderr = Console(stderr=True)


class RateColumn(ProgressColumn):
    def render(self, task) -> Text:
        return Text(f"{task.speed:,.1f} it/s" if task.speed else "… it/s", style="progress.data.speed")


class RichReporter:
    """Progress bars (items/s and ETA) and notes on stderr."""

    def __init__(self, quiet: bool = False):
        self.quiet = quiet

    @contextlib.contextmanager
    def stage(self, name: str, total: int | None) -> Iterator[Callable[[int], None]]:
        if self.quiet or not total:
            yield lambda n: None
            return
        columns = (
            TextColumn("{task.description}"),
            BarColumn(),
            MofNCompleteColumn(),
            RateColumn(),
            TimeRemainingColumn(),
        )
        with Progress(*columns, console=stderr, transient=False) as progress:
            task = progress.add_task(name, total=total)
            yield lambda n: progress.advance(task, n)

    def info(self, message: str) -> None:
        if not self.quiet:
            stderr.print(f"[dim]{escape(message)}[/dim]")


def print_error(line: str) -> None:
    """``mixgen: error: <line>`` on stderr. Messages quote paths and library text: a "[x]" in
    them is text, not rich markup."""
    stderr.print(f"[bold red]mixgen: error:[/bold red] {escape(line)}", highlight=False, soft_wrap=True)


def fail(exc: MixgenError) -> typer.Exit:
    print_error(str(exc))
    return typer.Exit(exc.exit_code)


@contextlib.contextmanager
def user_errors() -> Iterator[None]:
    """One line and an exit code for anything the user can fix; 130 on Ctrl-C."""
    try:
        yield
    except MixgenError as exc:
        raise fail(exc) from None
    except KeyboardInterrupt:
        stderr.print("[yellow]mixgen: interrupted; re-run the same command to resume[/yellow]")
        raise typer.Exit(130) from None
    except OSError as exc:
        print_error(f"{exc.strerror or exc}: {exc.filename or ''}")
        raise typer.Exit(1) from None


def print_summary(summary: dict[str, Any], data_dir: Path) -> None:
    """A run's summary table on stderr (the data folder goes to stdout)."""
    counts, timings = summary["counts"], summary["timings"]
    table = Table(title=f"mixgen {summary['config']['method']}", show_header=False, box=None)
    if summary.get("shortfall"):  # a large share of SRC unusable, or a class without a photo: first
        table.add_row("[bold yellow]warning[/bold yellow]", escape(summary["shortfall"]))
    table.add_row(
        "outputs written", f"{counts['written']:,} (kept from an earlier run: {counts['kept_from_previous_run']:,})"
    )
    table.add_row("sources", f"{counts['readable_sources']:,} readable, {counts['skipped_sources']:,} skipped")
    for item in summary.get("skipped", [])[:10]:
        # The path relative to SRC: a long absolute one would be cut off by the table.
        reason = item["reason"].partition(f"{item['path']}: ")[2] or item["reason"]
        table.add_row("  skipped", f"{item['path']}: {reason}")
    if len(summary.get("skipped", [])) > 10:
        table.add_row("  skipped", f"… and {len(summary['skipped']) - 10} more (all listed in {RECORD_NAME})")
    for warning in (summary.get("source") or {}).get("warnings", [])[:10]:
        table.add_row("warning", warning)
    for note in summary.get("cache_rebuilt") or []:
        table.add_row("cache", note)
    if summary.get("probe") and summary["probe"].get("train_accuracy") is not None:
        _probe_row(table, summary["probe"])
    runtime = summary.get("runtime")
    if runtime:
        table.add_row("backbone runtime", runtime["name"] + (f" ({runtime['note']})" if runtime.get("note") else ""))
    table.add_row("throughput", f"{summary['throughput']:,.1f} outputs/s over {timings['total_s']:.1f} s")
    table.add_row("manifests", f"{data_dir}/*/{MANIFEST_NAME}")
    if summary["config"].get("writer") == "webdataset":
        table.add_row("tar shards", f"{data_dir}/*.tar")
    table.add_row("run record", str(data_dir.parent / RECORD_NAME))
    stderr.print(table)


ACTIONS = {
    "start": "would start a new run",
    "resume": "would resume the run there",
    "grow": "would grow the run there from {previous:,} outputs",
    "overwrite": "would replace the different run there (--overwrite)",
    "restart": "would replace the different run there, which stopped before writing any output",
    "complete": "already complete: nothing to write",
}


def dry_run_lines(summary: dict[str, Any]) -> list[str]:
    """A dry run's answer in words: what the run would find, do and take."""
    estimate, config = summary["estimate"], summary["config"]
    split = f", split {summary['split'] or 'train'}" if summary["layout"] == "cub" else ""
    skipped = f"; {len(summary['skipped']):,} unusable rows skipped" if summary["skipped"] else ""
    layout = f"{summary['layout']} layout{split}"
    action = ACTIONS[summary["action"]].format(previous=summary["previous_outputs"] or 0)
    to_write = f"{summary['to_write']:,} outputs to write"
    cache = ""
    if estimate.get("cache_bytes"):
        cache = f"; view cache: {_size(estimate['cache_bytes'])} for the {summary['sources']:,} sources found"
    lines = [
        f"dry run of mixgen {config['method']}: nothing written",
        *([f"warning: {summary['shortfall']}"] if summary.get("shortfall") else []),
        f"sources: {summary['sources']:,} images of {summary['classes']:,} classes ({layout}){skipped}",
        f"outputs: {summary['outputs']:,} {config['format']} images of {config['size']}×{config['size']} px "
        f"in {summary['shards']:,} shard(s) of up to {config['shard_size']:,} ({config['writer']} writer)",
        f"OUT {summary['out']}: {action}" + ("" if summary["action"] == "complete" else f"; {to_write}"),
        f"estimate: about {_size(estimate['disk_bytes'])} on disk and {_duration(estimate['seconds'])} "
        f"({estimate['basis']}; rough){cache}",
    ]
    if teacher := estimate.get("teacher"):
        lines.append(
            f"teacher labels: one backbone pass per output at {teacher['cam_size']} px on the mixed image "
            f"({teacher['backbone_passes']:,} passes, about {_duration(teacher['seconds'])}; included above)"
        )
    if summary.get("strict") and summary["action"] != "complete":
        lines.append("--strict: images are decoded only by the run; one it cannot read will stop it there")
    return lines + [f"warning: {warning}" for warning in summary["warnings"]]


def _size(count: float) -> str:
    for unit in ("bytes", "kB", "MB", "GB"):
        if count < 1000:
            return f"{count:,.0f} {unit}" if unit == "bytes" else f"{count:,.1f} {unit}"
        count /= 1000
    return f"{count:,.1f} TB"


def _duration(seconds: float) -> str:
    if seconds < 1:
        return "under a second"
    if seconds < 120:
        return f"{seconds:,.0f} s"
    return f"{seconds / 60:,.0f} min" if seconds < 7200 else f"{seconds / 3600:,.1f} h"


def _probe_row(table: Table, probe: dict[str, Any]) -> None:
    held, empty = probe.get("holdout_accuracy"), probe.get("classes_empty")
    line = f"train {probe['train_accuracy']:.1%}" + (f", held-out {held:.1%}" if held is not None else "")
    if empty:  # the accuracies are over the classes that have photos
        present = probe.get("classes")
        line += f" (over the {present:,} classes with photos; {empty:,} have none)" if present else ""
    table.add_row("probe accuracy", line)


def print_cam_summary(summary: dict[str, Any], out: Path) -> None:
    """What ``mixgen cam`` wrote, on stderr (OUT itself goes to stdout)."""
    table = Table(title=f"mixgen cam ({summary['settings']['cam']})", show_header=False, box=None)
    table.add_row("written", f"{summary['written']:,} of {summary['sources']:,} sources")
    for item in summary["skipped"][:10]:
        table.add_row("  skipped", item["reason"])
    if summary.get("probe"):
        _probe_row(table, summary["probe"])
    runtime = summary["settings"]["runtime"]
    table.add_row("backbone runtime", runtime + (f" ({summary['runtime_note']})" if summary["runtime_note"] else ""))
    table.add_row("maps", f"{out}/<source>.npy: S×S float32 SPM, sums to 1")
    table.add_row("index", str(out / CAMS_INDEX))
    stderr.print(table)
