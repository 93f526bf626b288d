"""The ``mixgen`` command line: a thin Typer layer over the library (``mixgen.pipeline.run``, the viewers).
Heavy modules (torch, timm, pyarrow) are imported inside the commands so that ``mixgen --help``
stays instant.

Why it is a little over 400 lines: it holds the seven viewer and verify commands besides the
mixing commands built from the method declarations, each a few lines of options over the library,
and the console entry that gives the parser's errors mixgen's one-line form."""

from __future__ import annotations

import dataclasses
import inspect
import json
import os
import sys
import typing
from collections.abc import Callable
from pathlib import Path
from typing import Annotated, Any

import typer
from rich.console import Console

from mixgen.config import RunConfig
from mixgen.console import (
    RichReporter,
    dry_run_lines,
    print_cam_summary,
    print_error,
    print_summary,
    stderr,
    user_errors,
)
from mixgen.faults import interrupts_raise
from mixgen.layout import data_dir
from mixgen.methods import Method, get_method, method_names
from mixgen.options import FLAGS, METHOD, OUTPUT, PANELS, RUN_CONTROL, USED_WITH_SEMANTIC
from mixgen.version import __version__


class Group(typer.core.TyperGroup):
    """The top level's help reads as the commands' do: no type after ``--help``."""

    def get_help_option(self, ctx: Any) -> Any:
        option = super().get_help_option(ctx)
        if option is not None:
            option.metavar = ""
        return option


app = typer.Typer(
    name="mixgen",
    cls=Group,
    help="Turn an image folder into a dataset of CAM-guided mixed images with soft-label Parquet manifests.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)


# What an option takes, named as torchrun's and timm's help name it, instead of typer's <int>/<str>.
METAVARS = {
    "pairs": "N",
    "seed": "N",
    "sample_seed": "N",
    "size": "PX",
    "cam_size": "PX",
    "tile": "PX",
    "quality": "Q",
    "backbone": "NAME",
    "path_column": "NAME",
    "label_column": "NAME",
    "weights": "FILE",
    "checkpoint": "FILE",
    "classes": "FILE",
    "cache_dir": "DIR",
    "output": "FILE",
    "src": "SRC",
    "device": "DEVICE",
    "batch_size": "N",
    "workers": "N",
    "shard_size": "N",
    "num_shards": "N",
    "shard_index": "I",
    "count": "N",
    "sample": "N",
    "limit": "N",
    "colors": "N",
    "recompute": "K|all",
    "beta": "B",
    "top_k": "K",
    "grid": "G",
    "decay": "D",
    "scale_min": "X",
    "scale_max": "X",
}


class Command(typer.core.TyperCommand):
    """A command whose help reads plainly: ``[OPTIONS] SRC OUT`` in the usage line, no type after a
    flag or ``--help``, an option's value named for what it takes (``--pairs N``, ``--device
    DEVICE``), and a default given in words shown as written (not in parentheses)."""

    def __init__(self, *args: Any, **kwargs: Any):
        super().__init__(*args, **kwargs)
        for param in self.params:
            if param.param_type_name == "option" and param.metavar is None and param.name in METAVARS:
                param.metavar = METAVARS[param.name]
            if isinstance(param.show_default, str) and hasattr(param, "_get_default_string"):
                # typer wraps such a default in parentheses; it has no public hook for this.
                param._get_default_string = lambda *, _shown=param.show_default, **_: _shown

    def collect_usage_pieces(self, ctx: Any) -> list[str]:
        arguments = [p for p in self.get_params(ctx) if p.param_type_name == "argument"]
        return [self.options_metavar or "", *(p.metavar or p.name.upper() for p in arguments)]

    def get_help_option(self, ctx: Any) -> Any:
        option = super().get_help_option(ctx)
        if option is not None:
            option.metavar = ""
            if any(getattr(p, "rich_help_panel", None) == RUN_CONTROL for p in self.params):
                option.rich_help_panel = RUN_CONTROL
        return option


def _choices_metavar(choices: Any, width: int = 24) -> str:
    """``[a|b|c]``, broken after a ``|`` into lines of at most ``width``: a long list then wraps
    between choices, and the help beside it keeps its room at 80 columns."""
    lines = ["["]
    for i, choice in enumerate(choices):
        piece = choice + ("]" if i == len(choices) - 1 else "|")
        if len(lines[-1]) + len(piece) > width and lines[-1] != "[":
            lines.append("")
        lines[-1] += piece
    return "\n".join(lines)


def _option(name: str, annotation: Any, help: str, shown: str | bool, panel: str, choices: Any = None) -> Any:
    """A typer option: a bool is a plain flag (``--strict``), choices are listed as ``[a|b]``."""
    if annotation is bool:
        return typer.Option(f"--{name.replace('_', '-')}", help=help, rich_help_panel=panel, metavar="")
    metavar = _choices_metavar(choices) if choices else None
    return typer.Option(help=help, show_default=shown, rich_help_panel=panel, metavar=metavar)


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
                metavar="SRC",
                help="Image folder (SRC/<class>/**/<image>), a CUB_200_2011 folder, or an index file "
                "(.csv, .tsv, .jsonl, .parquet with path and label columns; a Hugging Face image Parquet).",
            ),
        ),
        (
            "out",
            Path,
            ...,
            typer.Argument(metavar="OUT", help="Output folder (created; re-running the same command resumes)."),
        ),
    ]

    hints = typing.get_type_hints(RunConfig)
    fields = {f.name: f for f in dataclasses.fields(RunConfig)}
    maps_always = method.needs_maps(method.defaults(), method.label_weights[0])
    # Defaults that come from the method's declaration rather than RunConfig's fields.
    method_defaults = {"size": method.default_size, "label_weights": method.label_weights[0]}
    method_shown = {"cam": f"{method.default_cam}; checkpoint with --checkpoint"}
    method_choices = {"label_weights": method.label_weights}
    options: list[tuple[str, Any, Any, Any]] = []

    def opt(name: str, annotation: Any, default: Any, help: str, shown: Any, panel: str, choices: Any = None) -> None:
        options.append((name, annotation, default, _option(name, annotation, help, shown, panel, choices)))

    for name, flag in FLAGS.items():
        if name == "label_weights" and len(method.label_weights) < 2:
            continue
        if name == "dry_run":
            opt("json", bool, False, "Print the run summary as JSON on stdout.", True, RUN_CONTROL)
        help = flag.help + (USED_WITH_SEMANTIC if flag.cam and not maps_always else "")
        default = method_defaults.get(name, fields[name].default)
        shown = method_shown.get(name, flag.shown)
        opt(name, hints[name], default, help, shown, flag.panel, method_choices.get(name, flag.choices))
        if name == "writer":
            for option in method.options:
                opt(option.name, option.type, option.default, option.help, True, METHOD, option.choices)
    # Grouped by panel in PANELS' order (and in declaration order within one).
    options.sort(key=lambda spec: PANELS.index(spec[3].rich_help_panel))
    return [
        Param(name, Param.KEYWORD_ONLY, default=default, annotation=Annotated[ann, info])
        for name, ann, default, info in specs + options
    ]


def _mix_command(method: Method) -> Callable[..., None]:
    option_names = {option.name for option in method.options}

    def command(**options: Any) -> None:
        as_json = options.pop("json")
        method_options = {name: options.pop(name) for name in option_names}
        with user_errors():
            from mixgen.pipeline.run import run

            cfg = RunConfig(method=method.name, options=method_options, **options)
            summary = run(cfg, RichReporter(quiet=as_json))
        if as_json:
            typer.echo(json.dumps(summary, indent=2, default=str))
            return
        if summary.get("dry_run"):
            typer.echo("\n".join(dry_run_lines(summary)))
            return
        if summary.get("already_complete"):
            stderr.print(
                f"already complete: {summary['outputs']:,} outputs in {cfg.out}", highlight=False, soft_wrap=True
            )
            typer.echo(str(data_dir(cfg.out)))
            return
        print_summary(summary, data_dir(cfg.out))
        typer.echo(str(data_dir(cfg.out)))

    command.__signature__ = inspect.Signature(_parameters(method))  # type: ignore[attr-defined]
    command.__name__ = method.name
    command.__doc__ = f"{method.help}\n\nPaper: {method.paper}."
    return command


def add_method_command(target: typer.Typer, method: Method) -> None:
    """``mixgen NAME SRC OUT`` with the common options and the method's own."""
    target.command(
        name=method.name, cls=Command, short_help=method.help, help=f"{method.help}\n\nPaper: {method.paper}."
    )(_mix_command(method))


for _name in method_names():
    add_method_command(app, get_method(_name))


def _version(value: bool) -> None:
    if value:
        typer.echo(f"mixgen {__version__}")
        raise typer.Exit()


@app.callback()
def _root(
    version: Annotated[
        bool, typer.Option("--version", callback=_version, is_eager=True, help="Print the version.", metavar="")
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
            Path,
            typer.Argument(metavar="OUT", help="Folder for the overlays (<source>.png) and maps (<source>.npy)."),
        ],
    )
    limit = Param(
        "limit",
        Param.KEYWORD_ONLY,
        default=None,
        annotation=Annotated[
            int | None,
            typer.Option(
                help="Write N sources, taken in turn from each class (the probe still fits on all).",
                show_default="all",
                rich_help_panel=OUTPUT,
            ),
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
        from mixgen.commands.cam import write_cams

        summary = write_cams(RunConfig(method=CAM_DEFAULTS, **options), limit, RichReporter(quiet=as_json))
    if as_json:
        typer.echo(json.dumps(summary, indent=2))
        return
    print_cam_summary(summary, out)
    typer.echo(str(out))


cam_command.__signature__ = inspect.Signature(_cam_parameters())  # type: ignore[attr-defined]
app.command(name="cam", cls=Command)(cam_command)


@app.command(name="preview", cls=Command)
def preview_command(
    out: Annotated[Path, typer.Argument(metavar="OUT", help="Output folder of a mixgen run.")],
    count: Annotated[
        int | None, typer.Option(help="Number of outputs shown (the first N by index).", show_default="16")
    ] = None,
    sample: Annotated[
        int | None, typer.Option(help="Show N outputs drawn at random (with --seed) instead.", show_default="off")
    ] = None,
    seed: Annotated[int, typer.Option(help="Seed of --sample (same seed, same rows).")] = 0,
    classes: Annotated[
        list[str] | None,
        typer.Option(
            "--class",
            metavar="NAME",
            help="Only outputs with this class as canvas or donor (repeat for more).",
            show_default="all",
        ),
    ] = None,
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
        from mixgen.commands.preview import make_preview

        summary = make_preview(
            out,
            output,
            count=count,
            src=src,
            tile=tile,
            device=device,
            reporter=RichReporter(),
            colors=colors,
            sample=sample,
            seed=seed,
            classes=classes,
        )
    stderr.print(f"[dim]{summary['rows']} {summary['method']} outputs, {summary['width']}×{summary['height']} px[/dim]")
    typer.echo(summary["output"])


@app.command(name="stats", cls=Command)
def stats_command(
    out: Annotated[Path, typer.Argument(metavar="OUT", help="Output folder of a mixgen run.")],
    as_json: Annotated[
        bool, typer.Option("--json", help="Print the statistics as JSON on stdout.", metavar="")
    ] = False,
) -> None:
    """Rows, class balance as canvas and donor, weight distributions, and semantic weights' gap to the area rule."""
    with user_errors():
        from mixgen.commands.stats import compute_stats, print_stats

        stats = compute_stats(out)
    if as_json:
        typer.echo(json.dumps(stats, indent=2))
        return
    print_stats(stats, Console())


@app.command(name="verify", cls=Command)
def verify_command(
    out: Annotated[Path, typer.Argument(metavar="OUT", help="Output folder of a mixgen run.")],
    as_json: Annotated[bool, typer.Option("--json", help="Print the report as JSON on stdout.", metavar="")] = False,
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
    """Check a run on disk: exit 0 when sound, 3 with one problem per line (1: no run there, or being written).

    Every shard's manifest must open with its exact rows, every image it names must be there with
    its sha256, no orphan or temp file may remain, and indices 0..pairs-1 must occur exactly once.
    With --recompute, sampled rows are also derived afresh from SRC and must match byte for byte.
    """
    with user_errors():
        from mixgen.commands.recompute import parse_count
        from mixgen.commands.verify import verify

        count = parse_count(recompute) if recompute is not None else None  # a usage error before any work
        reporter = RichReporter(quiet=as_json)
        report = verify(out, workers, reporter)
        if count is not None:
            from mixgen.commands.recompute import recompute as recompute_rows

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


def _typers_click() -> Any:
    """The click that typer runs on: its own copy in recent typer, the click package before."""
    try:
        from typer import _click
    except ImportError:
        import click as _click
    return _click


def usage_error_line(exc: Any) -> str:
    """A click usage error as one line that names the command whose help to read."""
    message = exc.format_message().strip().rstrip(".").replace("\n", " ")
    ctx = getattr(exc, "ctx", None)
    where = f"; see '{ctx.command_path} --help'" if ctx is not None else ""
    return f"{message}{where}"


def main() -> None:
    """Console entry point. Exits with os._exit once output is flushed: every file is closed and
    synced by then, and the interpreter's teardown of torch and its libraries takes over a second."""
    click = _typers_click()
    no_args = getattr(click.exceptions, "NoArgsIsHelpError", ())
    code = 0
    try:
        with interrupts_raise():  # SIGTERM while a command starts up is an interrupt too: 130
            result = app(standalone_mode=False)
        code = result if isinstance(result, int) else 0
    except no_args as exc:  # bare ``mixgen``: its help, as click would
        exc.show()
        code = exc.exit_code
    except click.ClickException as exc:  # a usage error: one line, like every other refusal
        print_error(usage_error_line(exc))
        code = exc.exit_code
    except (KeyboardInterrupt, typer.Abort):  # pragma: no cover - outside any command
        code = 130
    except SystemExit as exc:
        if isinstance(exc.code, str):
            print(exc.code, file=sys.stderr)
        code = exc.code if isinstance(exc.code, int) else (0 if exc.code is None else 1)
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)
