"""Mixing methods. Each module declares one method as a ``Method`` (name, help, paper, options,
the per-source inputs it needs, its per-output draw, its batched mix and what ``preview`` shows)
and holds its pure, batched, device-agnostic tensor functions:

- ``draw(rng, size, options) -> dict`` draws one output's random parameters from that output's
  own generator (so output i never depends on the batch it lands in);
- ``mix(batch) -> MixResult`` mixes a ``Batch`` of views (B, 3, S, S) uint8.

The CLI, ``RunConfig``, the pipeline, ``preview`` and ``stats`` reach methods only through these
declarations (``get_method``, ``method_names``), so a method is one file: the built-in modules
below, a package exposing a ``mixgen.methods`` entry point, or ``register()`` at run time. Torch is
imported lazily (``torch`` / ``F`` below) so that ``mixgen --help`` can read every declaration
without paying for it.
"""

from __future__ import annotations

import importlib
import keyword
import math
import sys
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import numpy as np

if TYPE_CHECKING:
    import torch as torch_module

BUILTIN = ("snapmix", "attentive", "cutmix", "mixup", "resizemix", "saliencymix", "fmix", "gridmix")
ENTRY_POINT_GROUP = "mixgen.methods"
LABEL_WEIGHTS = ("area", "semantic", "boxes", "teacher")
# Rules that weigh a mix's regions with per-source maps, by SnapMix's rule: the CAM's SPM
# (semantic) or the object box drawn in the view (boxes, from the sources' own box file).
MAP_RULES = ("semantic", "boxes")
# The rule that weighs each label by the run's own classifier's posterior of it on the mixed image
# (``labels.teacher_rule``): one more backbone pass per output, any geometry, a pixel blend too.
TEACHER = "teacher"


class _Lazy:
    """A module imported on first attribute access."""

    def __init__(self, name: str):
        self._name = name

    def __getattr__(self, attr: str) -> Any:
        return getattr(importlib.import_module(self._name), attr)


torch: Any = _Lazy("torch")
F: Any = _Lazy("torch.nn.functional")


# ---------------------------------------------------------------------------------------------
# Declarations


@dataclass(frozen=True)
class Option:
    """One method option: ``--name-with-dashes`` on the command line, ``name`` in the run config."""

    name: str
    type: type
    default: Any
    help: str
    minimum: float | None = None  # inclusive
    maximum: float | None = None  # inclusive
    above: float | None = None  # exclusive lower bound
    choices: tuple[str, ...] | None = None

    @property
    def flag(self) -> str:
        return "--" + self.name.replace("_", "-")

    def check(self, value: Any) -> str | None:
        """The one-line problem with ``value``, or None."""
        if self.choices is not None:
            return None if value in self.choices else f"{self.flag} must be {' or '.join(self.choices)}, got {value!r}"
        finite = self.type is not float or (isinstance(value, (int, float)) and math.isfinite(value))
        too_low = finite and (
            (self.minimum is not None and value < self.minimum) or (self.above is not None and value <= self.above)
        )
        too_high = finite and self.maximum is not None and value > self.maximum
        if finite and not (too_low or too_high):
            return None
        if self.minimum is not None and self.maximum is not None:
            bound = f"in {self.minimum:g}..{self.maximum:g}"
        elif self.above is not None:
            bound = f"> {self.above:g}" + (f" and <= {self.maximum:g}" if self.maximum is not None else "")
        elif self.minimum is not None:
            bound = f">= {self.minimum:g}"
        else:
            bound = f"<= {self.maximum:g}" if self.maximum is not None else ""
        kind = "a finite number " if self.type is float else ""
        return f"{self.flag} must be {kind}{bound}".rstrip() + f", got {value}"


@dataclass(frozen=True)
class SourceInput:
    """A per-source array a method needs, derived once per run from the sources' views and maps
    (never once per pair). ``compute(sources, options)`` returns one row per source position."""

    compute: Callable[[SourceData, Mapping[str, Any]], np.ndarray]
    uses_maps: Callable[[Mapping[str, Any]], bool] = lambda options: False


@dataclass(frozen=True)
class Preview:
    """What ``mixgen preview`` shows in the two map columns. ``heat``: ``spm`` (the run's maps as
    SPMs), ``grid`` (the maps average-pooled on the method's ``grid`` option), ``attention`` (the
    embedded backbone's mean attention, for methods that use no map), or a callable
    ``(views, cams, config) -> {source path: S×S map}`` for anything else."""

    titles: tuple[str, str]
    heat: str | Callable[[dict[str, np.ndarray], dict[str, np.ndarray], Mapping[str, Any]], dict[str, np.ndarray]]
    semantic_titles: tuple[str, str] = ("SPM a", "SPM b")


# The preview of a method that looks at no map: the backbone's mean attention, marked unused.
UNUSED_MAPS_PREVIEW = Preview(titles=("mean attention a (unused)", "mean attention b (unused)"), heat="attention")


@dataclass(frozen=True)
class Method:
    """Everything mixgen knows about a method."""

    name: str
    help: str
    paper: str
    draw: Callable[[np.random.Generator, int, Mapping[str, Any]], dict[str, Any]]
    mix: Callable[[Batch], MixResult]
    preview: Preview
    options: tuple[Option, ...] = ()
    default_size: int = 224
    # Whether the method's geometry needs the backbone's CAM maps (its labels' need is semantic_uses_maps).
    maps: Callable[[Mapping[str, Any]], bool] = lambda options: False
    inputs: Mapping[str, SourceInput] = field(default_factory=dict)
    default_cam: str = "probe"  # for the maps, when no --checkpoint is given
    # The first is the default; a method whose mix already weighs semantically offers ("semantic",).
    label_weights: tuple[str, ...] = LABEL_WEIGHTS
    # False where semantic weights need no map (a pixel blend keeps ρ = λ, 1 − λ).
    semantic_uses_maps: bool = True
    # Cross-option checks: (options, view size) -> one-line problem or None.
    validate: Callable[[Mapping[str, Any], int], str | None] = lambda options, size: None

    def defaults(self) -> dict[str, Any]:
        return {option.name: option.default for option in self.options}

    def needs_maps(self, options: Mapping[str, Any], label_weights: str) -> bool:
        """Whether a run needs the CAM pass over the sources: for its maps, or (teacher) for the
        backbone and the head fitted there, which then look at every mixed image."""
        return (
            (label_weights == "semantic" and self.semantic_uses_maps)
            or label_weights == TEACHER
            or self.maps(options)
            or any(source_input.uses_maps(options) for source_input in self.inputs.values())
        )


@dataclass
class SourceData:
    """What per-source inputs are derived from: every source's view and (if computed) map."""

    views: Any  # RecordFile of (S, S, 3) uint8 records
    maps: np.ndarray | None  # (n, h, w) float32 CAMs
    readable: np.ndarray  # (n,) bool
    size: int
    device: Any


@dataclass
class Batch:
    """One batch of planned outputs, on the mixing device."""

    canvas: torch_module.Tensor  # (B, 3, S, S) uint8
    donor: torch_module.Tensor
    params: list[dict[str, Any]]  # each output's draw
    options: Mapping[str, Any]
    same_label: torch_module.Tensor  # (B,) bool
    maps_a: torch_module.Tensor | None = None  # (B, h, w) float32 CAMs, when the run has maps
    maps_b: torch_module.Tensor | None = None
    inputs_a: dict[str, torch_module.Tensor] = field(default_factory=dict)  # the method's SourceInputs
    inputs_b: dict[str, torch_module.Tensor] = field(default_factory=dict)
    label_a: torch_module.Tensor | None = None  # (B,) int64 class ids, for label rules that need them
    label_b: torch_module.Tensor | None = None

    @property
    def size(self) -> int:
        return self.canvas.shape[-1]

    def param(self, key: str, dtype: Any = None) -> torch_module.Tensor:
        """The draws' ``key`` of every output as one tensor on the batch's device."""
        return torch.tensor([p[key] for p in self.params], dtype=dtype, device=self.canvas.device)


@dataclass
class MixResult:
    """One batch of mixed outputs and the geometry that made them: ``box_a``/``box_b`` (donor box_b
    resized into canvas box_a), ``cells`` of a ``grid``×``grid`` split, or a pixel ``mask``
    (True where the donor shows). Rows where ``has_box`` is False have no box (null in the
    manifest); ``mixed`` is False where nothing was pasted."""

    images: torch_module.Tensor  # (B, 3, S, S) uint8
    weight_a: torch_module.Tensor  # (B,) float32
    weight_b: torch_module.Tensor  # (B,) float32
    area_ratio: torch_module.Tensor  # (B,) float32: fraction of output pixels taken from the donor
    box_a: torch_module.Tensor | None = None  # (B, 4) int64 x0, y0, x1, y1 (half-open)
    box_b: torch_module.Tensor | None = None
    has_box: torch_module.Tensor | None = None  # (B,) bool
    cells: torch_module.Tensor | None = None  # (B, k) int64 row-major grid cells, -1 pads unequal rows
    grid: int | None = None
    mask: torch_module.Tensor | None = None  # (B, S, S) bool, True: pixel from the donor
    lam: torch_module.Tensor | None = None  # (B,) float32, when λ is only known after mixing
    mixed: torch_module.Tensor | None = None  # (B,) bool; None: every row with area_ratio > 0
    blend: bool = False  # a pixel blend (MixUp): no mask, semantic weights are the method's own


# ---------------------------------------------------------------------------------------------
# The registry


_REGISTRY: dict[str, Method] = {}
_LOADED = False


def register(method: Method) -> Method:
    """Make ``method`` available to the CLI, the pipeline, preview and stats by its name. A name
    already taken (a built-in's too) or an option that the mixing commands could not hold is
    refused: replacing a method silently, or crashing every command while the CLI is built, is worse."""
    if not method.name.isidentifier() or method.name in ("cam", "preview", "stats", "verify"):
        raise ValueError(f"method name {method.name!r} must be an identifier and not a mixgen tool command")
    if _REGISTRY.get(method.name, method) is not method:
        raise ValueError(f"method name {method.name!r} is taken by another method; rename the plugin's method")
    if problem := _option_problem(method):
        raise ValueError(problem)
    _REGISTRY[method.name] = method
    return method


def _option_problem(method: Method) -> str | None:
    """Why ``method``'s options cannot become command-line options beside the common ones, or None."""
    from mixgen.options import FLAGS

    taken = {"src", "out", "json", "help", *FLAGS}
    seen: set[str] = set()
    for option in method.options:
        name = option.name
        if not name.isidentifier() or keyword.iskeyword(name) or name.startswith("_"):
            return f"option name {name!r} of method {method.name!r} must be an identifier not starting with _"
        if name in taken:
            return f"option {option.flag} of method {method.name!r} clashes with mixgen's own {option.flag}; rename it"
        if name in seen:
            return f"option {option.flag} of method {method.name!r} is declared twice"
        seen.add(name)
    return None


def _load() -> None:
    global _LOADED
    if _LOADED:
        return
    _LOADED = True
    for name in BUILTIN:
        register(importlib.import_module(f"mixgen.methods.{name}").METHOD)
    from importlib.metadata import entry_points

    for entry in entry_points(group=ENTRY_POINT_GROUP):
        try:
            method = entry.load()
            register(method() if callable(method) and not isinstance(method, Method) else method)
        except Exception as exc:  # noqa: BLE001 - a broken plugin must not take mixgen down
            print(f"mixgen: warning: method plugin {entry.value} not loaded: {exc}", file=sys.stderr)


def method_names() -> list[str]:
    _load()
    return list(_REGISTRY)


def get_method(name: str) -> Method:
    _load()
    try:
        return _REGISTRY[name]
    except KeyError:
        raise KeyError(name) from None


# ---------------------------------------------------------------------------------------------
# Geometry shared by several methods


def box_areas(boxes: torch_module.Tensor) -> torch_module.Tensor:
    return (boxes[:, 2] - boxes[:, 0]).clamp(min=0) * (boxes[:, 3] - boxes[:, 1]).clamp(min=0)


def box_around(cx: int, cy: int, side: int, size: int) -> tuple[int, int, int, int]:
    """A square of ``side`` centred on (cx, cy), clipped to the image (CutMix's rule)."""
    x0, y0 = cx - side // 2, cy - side // 2
    clip = lambda v: min(max(v, 0), size)  # noqa: E731
    return clip(x0), clip(y0), clip(x0 + side), clip(y0 + side)


def box_side(size: int, lam: float) -> int:
    return int(size * (1.0 - lam) ** 0.5)


def random_box(rng, size: int, lam: float) -> tuple[int, int, int, int]:
    """Side int(S·sqrt(1−λ)), centre uniform over the pixels, clipped to the image."""
    side = box_side(size, lam)
    cx, cy = int(rng.integers(size)), int(rng.integers(size))
    return box_around(cx, cy, side, size)


def cell_edges(grid: int, size: int) -> list[int]:
    """Pixel boundaries of a G×G grid: cell r spans rows [⌊rS/G⌋, ⌊(r+1)S/G⌋)."""
    return [g * size // grid for g in range(grid + 1)]


def cell_boxes(cells: torch_module.Tensor, grid: int, size: int) -> torch_module.Tensor:
    """(B, k) row-major cell ids (-1: none) -> (B, k, 4) pixel boxes (empty for -1)."""
    edges = torch.tensor(cell_edges(grid, size), device=cells.device)
    valid = cells >= 0
    row, col = torch.div(cells.clamp(min=0), grid, rounding_mode="floor"), cells.clamp(min=0) % grid
    boxes = torch.stack([edges[col], edges[row], edges[col + 1], edges[row + 1]], dim=-1)
    return torch.where(valid[..., None], boxes, torch.zeros_like(boxes))


def paste_cells(canvas, donor, cells: list[list[int]], grid: int) -> torch_module.Tensor:
    """A clone of the canvas with the listed cells copied in place from the donor: slice copies
    move only the pasted pixels (a full-image masked select costs several times more on a CPU)."""
    size = canvas.shape[-1]
    edges = cell_edges(grid, size)
    images = canvas.clone()
    for i, chosen in enumerate(cells):
        for cell in chosen:
            row, col = divmod(cell, grid)
            rows, cols = slice(edges[row], edges[row + 1]), slice(edges[col], edges[col + 1])
            images[i, :, rows, cols] = donor[i, :, rows, cols]
    return images


def cells_area(cells: torch_module.Tensor, grid: int, size: int) -> torch_module.Tensor:
    """(B,) share of the image covered by each row's cells (-1 entries ignored)."""
    boxes = cell_boxes(cells, grid, size)
    area = box_areas(boxes.reshape(-1, 4)).view(boxes.shape[:2])
    return area.sum(dim=1).float() / float(size * size)


def beta_option(default: float, help: str = "β of the Beta(β, β) draw of λ.") -> Option:
    return Option("beta", float, default, help, above=0.0)


def mask_runs(mask: np.ndarray) -> list[int]:
    """Run lengths of a row-major boolean donor mask, alternating canvas and donor runs and
    starting with a canvas run (0 when the first pixel is the donor's): the manifest's ``mask``."""
    flat = np.asarray(mask, dtype=bool).ravel()
    changes = np.flatnonzero(flat[1:] != flat[:-1]) + 1
    bounds = np.concatenate([[0], changes, [flat.size]])
    runs = np.diff(bounds).tolist()
    return ([0] + runs) if flat.size and flat[0] else runs


def mask_from_runs(runs: list[int], height: int, width: int | None = None) -> np.ndarray:
    """The (H, W) boolean donor mask (True: pixel from the donor) of a ``mask`` column entry."""
    width = height if width is None else width
    values = np.arange(len(runs)) % 2 == 1
    flat = np.repeat(values, np.asarray(runs, dtype=np.int64))
    if flat.size != height * width:
        raise ValueError(f"mask runs cover {flat.size} pixels, not {height}×{width}")
    return flat.reshape(height, width)
