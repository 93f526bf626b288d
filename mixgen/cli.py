"""The ``mixgen`` command line: a thin Typer layer over ``mixgen.pipeline``. Heavy modules (torch,
timm, pyarrow) are imported inside the commands so that ``mixgen --help`` stays instant."""

from __future__ import annotations

import contextlib
import inspect
import json
import os
import sys
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Annotated, Any

import typer
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, ProgressColumn, TextColumn, TimeRemainingColumn
from rich.table import Table
from rich.text import Text

from mixgen import __version__
from mixgen.config import RunConfig
from mixgen.errors import MixgenError
from mixgen.methods import Method, get_method, method_names

stderr = Console(stderr=True)
app = typer.Typer(
    name="mixgen",
    help="Turn an image folder into a dataset of CAM-guided mixed images with soft-label Parquet manifests.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)


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
            stderr.print(f"[dim]{message}[/dim]")


def fail(exc: MixgenError) -> typer.Exit:
    stderr.print(f"[bold red]mixgen: error:[/bold red] {exc}", highlight=False, soft_wrap=True)
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
        stderr.print(
            f"[bold red]mixgen: error:[/bold red] {exc.strerror or exc}: {exc.filename or ''}", highlight=False
        )
        raise typer.Exit(1) from None


def print_summary(summary: dict[str, Any], data_dir: Path) -> None:
    counts, timings = summary["counts"], summary["timings"]
    table = Table(title=f"mixgen {summary['config']['method']}", show_header=False, box=None)
    table.add_row(
        "outputs written", f"{counts['written']:,} (kept from an earlier run: {counts['kept_from_previous_run']:,})"
    )
    table.add_row("sources", f"{counts['readable_sources']:,} readable, {counts['skipped_sources']} skipped")
    for item in summary.get("skipped", [])[:10]:
        # The path relative to SRC: a long absolute one would be cut off by the table.
        reason = item["reason"].partition(f"{item['path']}: ")[2] or item["reason"]
        table.add_row("  skipped", f"{item['path']}: {reason}")
    if len(summary.get("skipped", [])) > 10:
        table.add_row("  skipped", f"… and {len(summary['skipped']) - 10} more (all listed in mixgen.json)")
    for warning in (summary.get("source") or {}).get("warnings", [])[:10]:
        table.add_row("warning", warning)
    for note in summary.get("cache_rebuilt") or []:
        table.add_row("cache", note)
    if summary.get("probe") and summary["probe"].get("train_accuracy") is not None:
        probe = summary["probe"]
        held = probe.get("holdout_accuracy")
        table.add_row(
            "probe accuracy",
            f"train {probe['train_accuracy']:.1%}" + (f", held-out {held:.1%}" if held is not None else ""),
        )
    runtime = summary.get("runtime")
    if runtime:
        table.add_row("backbone runtime", runtime["name"] + (f" ({runtime['note']})" if runtime.get("note") else ""))
    table.add_row("throughput", f"{summary['throughput']:,.1f} outputs/s over {timings['total_s']:.1f} s")
    table.add_row("manifests", f"{data_dir}/*/metadata.parquet")
    if summary["config"].get("writer") == "webdataset":
        table.add_row("tar shards", f"{data_dir}/*.tar")
    table.add_row("run record", str(data_dir.parent / "mixgen.json"))
    stderr.print(table)


# ---------------------------------------------------------------------------------------------
# The mixing commands share one implementation; each is built from its method's declaration.

Param = inspect.Parameter


def _parameters(method: Method) -> list[Param]:
    specs: list[tuple[str, Any, Any, Any]] = [
        (
            "src",
            Path,
            ...,
            typer.Argument(
                help="Image folder (SRC/<class>/**/<image>), a CUB_200_2011 folder, or an index file "
                "(.csv, .tsv, .jsonl, .parquet with path and label columns; a Hugging Face image Parquet)."
            ),
        ),
        ("out", Path, ..., typer.Argument(help="Output folder (created; re-running the same command resumes).")),
    ]

    def opt(name: str, annotation: Any, default: Any, help: str, shown: str | bool = True) -> None:
        specs.append((name, annotation, default, typer.Option(help=help, show_default=shown)))

    opt("pairs", int, 1000, "Number of mixed images to write.")
    opt("seed", int, 0, "Seed; output i depends only on (seed, i).")
    opt("size", int, method.default_size, "View side S in pixels (every source becomes one S×S view).")
    opt("resize", str, "crop", "crop: shorter side to S then centre crop; squash: whole image to S×S.")
    opt("format", str, "jpg", "Image format: jpg, png or webp.")
    opt("quality", int, 95, "JPEG/WebP quality 1..100.")
    opt("writer", str, "files", "files: images next to each shard's manifest; webdataset: one tar per shard.")
    for option in method.options:
        opt(option.name, option.type, option.default, option.help)
    if len(method.label_weights) > 1:
        opt(
            "label_weights",
            str,
            method.label_weights[0],
            "Label weights: area (the paper's rule) or semantic (SnapMix's CAM rule on this method's own mask).",
        )
    maps_always = method.needs_maps(method.defaults(), method.label_weights[0])
    when = "" if maps_always else " Used with --label-weights semantic."
    opt(
        "backbone",
        str,
        "efficientnet_lite0",
        "Embedded EfficientNet-Lite0, or a torchvision/timm CNN name (torchvision:NAME, timm:NAME)." + when,
    )
    opt(
        "weights",
        Path | None,
        None,
        "State dict replacing the backbone's pretrained ImageNet weights (offline use).",
        False,
    )
    opt(
        "checkpoint",
        Path | None,
        None,
        "State dict of the backbone fine-tuned on SRC's classes (loaded weights_only).",
        False,
    )
    opt(
        "cam",
        str | None,
        None,
        "Where the CAM's linear head comes from: probe, checkpoint, imagenet or mean." + when,
        f"{method.default_cam} (checkpoint with --checkpoint)",
    )
    opt("cam_size", int | None, None, "Side the backbone sees; smaller is faster but coarser.", "--size")
    opt(
        "runtime",
        str,
        "auto",
        "CAM pass runtime: auto (ONNX Runtime on a CPU, PyTorch on CUDA), torch or onnxruntime." + when,
    )
    opt(
        "cam_norm",
        str | None,
        None,
        "Map the SPM is taken of: raw (the CAM as is, the paper's; truest on real photos), relu (max(CAM, 0)), "
        "floor (max(CAM − 0.1·peak, 0)) or colour (floor, weighted by each pixel colour's object posterior)." + when,
        "raw",
    )
    opt("pairing", str, "random", "Donor choice: random, cross-class or same-class (never the canvas itself).")
    opt("layout", str, "auto", "Input layout: auto, imagefolder or cub.")
    opt("split", str | None, None, "CUB split: train, test or all.", "train for CUB")
    opt("path_column", str, "path", "Index file SRC: the column of image paths (or HF image structs).")
    opt("label_column", str, "label", "Index file SRC: the column of labels (class names or integer ids).")
    opt("classes", Path | None, None, "Index file SRC: class names, one per line (line i names id i-1).", False)
    opt("device", str, "auto", "auto (CUDA when present), cpu, cuda or cuda:N.")
    opt("batch_size", int, 32, "Sources decoded per backbone step (the backbone itself runs fixed-size calls).")
    opt("workers", int, 0, "Decode/encode threads (0: one per CPU core).", "all cores")
    opt("shard_size", int, 10_000, "Rows per shard (one manifest and image folder each).")
    opt("num_shards", int | None, None, "Split the job over N workers (default: $WORLD_SIZE or 1).", "$WORLD_SIZE or 1")
    opt("shard_index", int | None, None, "This worker's number 0..N-1 (default: $RANK or 0).", "$RANK or 0")
    opt("strict", bool, False, "Fail on the first unreadable image instead of skipping it.")
    opt("overwrite", bool, False, "Replace a different earlier run in OUT (removes only mixgen's files).")
    opt("codec", str, "cpu", "JPEG encoder: cpu (thread pool) or cuda (nvJPEG via torchvision, on the main thread).")
    opt("json", bool, False, "Print the run summary as JSON on stdout.")
    opt("dry_run", bool, False, "Scan and check everything, write nothing.")
    return [
        Param(name, Param.KEYWORD_ONLY, default=default, annotation=Annotated[ann, info])
        for name, ann, default, info in specs
    ]


def _mix_command(method: Method) -> Callable[..., None]:
    option_names = {option.name for option in method.options}

    def command(**options: Any) -> None:
        as_json = options.pop("json")
        method_options = {name: options.pop(name) for name in option_names}
        with user_errors():
            from mixgen.pipeline import run

            cfg = RunConfig(method=method.name, options=method_options, **options)
            summary = run(cfg, RichReporter(quiet=as_json))
        if as_json or summary.get("dry_run"):
            typer.echo(json.dumps(summary, indent=2, default=str))
            return
        print_summary(summary, cfg.out / "data")
        typer.echo(str(cfg.out / "data"))

    command.__signature__ = inspect.Signature(_parameters(method))  # type: ignore[attr-defined]
    command.__name__ = method.name
    command.__doc__ = f"{method.help}\n\nPaper: {method.paper}."
    return command


def add_method_command(target: typer.Typer, method: Method) -> None:
    """``mixgen NAME SRC OUT`` with the common options and the method's own."""
    target.command(name=method.name, short_help=method.help, help=f"{method.help}\n\nPaper: {method.paper}.")(
        _mix_command(method)
    )


for _name in method_names():
    add_method_command(app, get_method(_name))


def _version(value: bool) -> None:
    if value:
        typer.echo(f"mixgen {__version__}")
        raise typer.Exit()


@app.callback()
def _root(
    version: Annotated[
        bool, typer.Option("--version", callback=_version, is_eager=True, help="Print the version.")
    ] = False,
) -> None:
    """mixgen: CAM-guided mixed image datasets with soft-label Parquet manifests."""


# ---------------------------------------------------------------------------------------------
# Looking at the result: CAMs before mixing, a contact sheet and statistics of a run.


# `mixgen cam` shows the maps SnapMix weighs with: its defaults and the options it shares with it.
CAM_DEFAULTS = "snapmix"
CAM_OPTIONS = (
    "cam",
    "cam_norm",
    "size",
    "resize",
    "cam_size",
    "runtime",
    "backbone",
    "weights",
    "checkpoint",
    "layout",
    "split",
    "path_column",
    "label_column",
    "classes",
)
CAM_EXECUTION = ("device", "batch_size", "workers", "json")


def _cam_parameters() -> list[Param]:
    shared = {p.name: p for p in _parameters(get_method(CAM_DEFAULTS))}
    out = Param(
        "out",
        Param.KEYWORD_ONLY,
        default=...,
        annotation=Annotated[
            Path, typer.Argument(help="Folder for the overlays (<source>.png) and maps (<source>.npy).")
        ],
    )
    limit = Param(
        "limit",
        Param.KEYWORD_ONLY,
        default=None,
        annotation=Annotated[
            int | None,
            typer.Option(help="Write only the first N sources (the probe still fits on all).", show_default="all"),
        ],
    )
    return [
        shared["src"],
        out,
        *(shared[name] for name in CAM_OPTIONS),
        limit,
        *(shared[name] for name in CAM_EXECUTION),
    ]


def cam_command(**options: Any) -> None:
    """Overlay each source's CAM / SPM on its view and save the SPM as .npy (S×S float32, sums to 1)."""
    as_json, limit, out = options.pop("json"), options.pop("limit"), options["out"]
    with user_errors():
        from mixgen.camview import write_cams

        summary = write_cams(RunConfig(method=CAM_DEFAULTS, **options), limit, RichReporter(quiet=as_json))
    if as_json:
        typer.echo(json.dumps(summary, indent=2))
        return
    table = Table(title=f"mixgen cam ({summary['settings']['cam']})", show_header=False, box=None)
    table.add_row("written", f"{summary['written']:,} of {summary['sources']:,} sources")
    for item in summary["skipped"][:10]:
        table.add_row("  skipped", item["reason"])
    probe = summary.get("probe")
    if probe:
        held = probe.get("holdout_accuracy")
        table.add_row(
            "probe accuracy",
            f"train {probe['train_accuracy']:.1%}" + (f", held-out {held:.1%}" if held is not None else ""),
        )
    runtime = summary["settings"]["runtime"]
    table.add_row("backbone runtime", runtime + (f" ({summary['runtime_note']})" if summary["runtime_note"] else ""))
    table.add_row("maps", f"{out}/<source>.npy: S×S float32 SPM, sums to 1")
    table.add_row("index", str(out / "cams.json"))
    stderr.print(table)
    typer.echo(str(out))


cam_command.__signature__ = inspect.Signature(_cam_parameters())  # type: ignore[attr-defined]
app.command(name="cam")(cam_command)


@app.command(name="preview")
def preview_command(
    out: Annotated[Path, typer.Argument(help="Output folder of a mixgen run.")],
    count: Annotated[int, typer.Option(help="Number of outputs shown (the first N by index).")] = 16,
    output: Annotated[Path, typer.Option(help="PNG file to write the contact sheet to.")] = Path("preview.png"),
    src: Annotated[
        Path | None, typer.Option(help="SRC of the run, if it moved.", show_default="as recorded in mixgen.json")
    ] = None,
    tile: Annotated[int, typer.Option(help="Side of each image tile in pixels.")] = 160,
    colors: Annotated[
        int, typer.Option(help="Palette size for a smaller, dithered PNG (2..256); 0 keeps full colour.")
    ] = 0,
    device: Annotated[str, typer.Option(help="Device for maps not found in the run's cache.")] = "auto",
) -> None:
    """One PNG contact sheet: canvas, donor, both maps, the output with its boxes or cells, weights and classes."""
    with user_errors():
        from mixgen.preview import make_preview

        summary = make_preview(
            out, output, count=count, src=src, tile=tile, device=device, reporter=RichReporter(), colors=colors
        )
    stderr.print(f"[dim]{summary['rows']} {summary['method']} outputs, {summary['width']}×{summary['height']} px[/dim]")
    typer.echo(summary["output"])


@app.command(name="stats")
def stats_command(
    out: Annotated[Path, typer.Argument(help="Output folder of a mixgen run.")],
    as_json: Annotated[bool, typer.Option("--json", help="Print the statistics as JSON on stdout.")] = False,
) -> None:
    """Rows, class balance as canvas and donor, weight distributions, and semantic weights' gap to the area rule."""
    with user_errors():
        from mixgen.stats import compute_stats, print_stats

        stats = compute_stats(out)
    if as_json:
        typer.echo(json.dumps(stats, indent=2))
        return
    print_stats(stats, Console())


@app.command(name="verify")
def verify_command(
    out: Annotated[Path, typer.Argument(help="Output folder of a mixgen run.")],
    as_json: Annotated[bool, typer.Option("--json", help="Print the report as JSON on stdout.")] = False,
    workers: Annotated[int, typer.Option(help="Hashing threads (0: one per CPU core).", show_default="all cores")] = 0,
    recompute: Annotated[
        str | None,
        typer.Option(
            help="Also redo K sampled rows (or 'all') from SRC with the run's configuration and device type, "
            "without OUT's caches, and compare image bytes and every column.",
            show_default="off",
        ),
    ] = None,
    sample_seed: Annotated[int, typer.Option(help="Seed of the --recompute sample (same seed, same rows).")] = 0,
    src: Annotated[
        Path | None, typer.Option(help="SRC of the run, if it moved.", show_default="as recorded in mixgen.json")
    ] = None,
) -> None:
    """Check a run on disk: exit 0 when sound, 3 with one problem per line.

    Every shard's manifest must open with its exact rows, every image it names must be there with
    its sha256, no orphan or temp file may remain, and indices 0..pairs-1 must occur exactly once.
    With --recompute, sampled rows are also derived afresh from SRC and must match byte for byte.
    """
    with user_errors():
        from mixgen.verify import verify

        reporter = RichReporter(quiet=as_json)
        report = verify(out, workers, reporter)
        if recompute is not None:
            from mixgen.recompute import parse_count
            from mixgen.recompute import recompute as recompute_rows

            count = parse_count(recompute)
            done = recompute_rows(out, count, sample_seed, src, workers, reporter)
            report.problems.extend(done.problems)
            report.recomputed = {"rows": done.sampled, "batches": done.batches, "device_type": done.device_type}
    if as_json:
        typer.echo(json.dumps(report.as_dict(), indent=2))
    else:
        for problem in report.problems:
            typer.echo(problem)
        if report.ok:
            stderr.print(f"[green]ok:[/green] {report.rows:,} outputs in {report.shards} shard(s), all files match")
            if report.recomputed:
                stderr.print(f"[green]ok:[/green] {report.recomputed['rows']:,} sampled rows recomputed from SRC match")
        else:
            stderr.print(f"[bold red]{len(report.problems)} problem(s)[/bold red] in {out}")
    if not report.ok:
        raise typer.Exit(3)


def main() -> None:
    """Console entry point. Exits with os._exit once output is flushed: every file is closed and
    synced by then, and the interpreter's teardown of torch and its libraries takes over a second."""
    code = 0
    try:
        app()
    except KeyboardInterrupt:  # pragma: no cover - outside any command
        code = 130
    except SystemExit as exc:
        if isinstance(exc.code, str):
            print(exc.code, file=sys.stderr)
        code = exc.code if isinstance(exc.code, int) else (0 if exc.code is None else 1)
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)
