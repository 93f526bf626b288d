"""``mixgen preview``: one PNG contact sheet of a run. Per row: canvas view, donor view, both maps
(with the boxes or cells the method used), the mixed output, and its weights and classes, so
a user can judge at a glance whether the labels describe the pixels."""

from __future__ import annotations

import io
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image, ImageDraw, ImageFont

from mixgen.cam.heatmaps import overlay, spm_maps
from mixgen.config import RunConfig, recorded_runtime
from mixgen.errors import DecodeError, MixgenError, UsageError
from mixgen.layout import CACHE_DIR, maps_meta, maps_path
from mixgen.methods import MAP_RULES, TEACHER, cell_edges, get_method, mask_from_runs
from mixgen.options import DEFAULT_CAM_NORM
from mixgen.output.cache import load_checked_array
from mixgen.output.reader import load_rows, read_output, run_metadata, source_root
from mixgen.pipeline.campass import MapMaker
from mixgen.pipeline.prepare import maps_cache_key, views_cache_key
from mixgen.progress import Reporter
from mixgen.sources.index import SourceIndex
from mixgen.sources.views import load_source_view

BOX_A = (255, 59, 48)
BOX_B = (0, 200, 255)
BACKGROUND = (246, 246, 246)
INK = (20, 20, 20)
PLACEHOLDER = (205, 205, 205)
MARGIN = 4
LINE = 14
DEFAULT_COUNT = 16


@dataclass
class Sources:
    """Views and display maps (S×S, any scale) of the sources that the shown rows use."""

    views: dict[str, np.ndarray] = field(default_factory=dict)
    heats: dict[str, np.ndarray] = field(default_factory=dict)
    notes: list[str] = field(default_factory=list)


def _font(size: int = 11) -> ImageFont.ImageFont | ImageFont.FreeTypeFont:
    try:
        return ImageFont.load_default(size=size)
    except (TypeError, OSError, ImportError):  # Pillow without FreeType: the fixed bitmap font
        return ImageFont.load_default()


def _cached_maps(out: Path, meta: dict[str, Any], index: SourceIndex) -> np.ndarray | None:
    """The exact (n, h, w) maps the run mixed with, from OUT/.mixgen, when the cache is still there
    and matches its checksums (same cache key as the pipeline's)."""
    config = meta["config"]
    views_key = views_cache_key(index.digest, config["size"], config["resize"])
    device_type = meta.get("environment", {}).get("device_type")
    maps_key = maps_cache_key(views_key, meta.get("backbone"), config["cam"], config["cam_size"], device_type)
    cache = Path(out) / CACHE_DIR
    maps, _ = load_checked_array(maps_path(cache, maps_key), len(index), maps_meta(cache, maps_key))
    return maps if maps is not None and maps.ndim == 3 else None  # damaged or gone: recomputed


def heat_kind(config: dict[str, Any]) -> Any:
    """What the map columns show: the method's own choice, or the SPMs its semantic weights used (a
    teacher run's SPMs too: its maps, for reference)."""
    heat = get_method(config["method"]).preview.heat
    return "spm" if heat == "attention" and config.get("label_weights") in (*MAP_RULES, TEACHER) else heat


def shows_boxes(config: dict[str, Any]) -> bool:
    """Whether the map columns show the object boxes the weights came from (--label-weights boxes)."""
    return config.get("label_weights") == "boxes" and heat_kind(config) == "spm"


def legend(config: dict[str, Any]) -> str | None:
    """The sheet's one-line key to its map columns, when they show SPMs."""
    if heat_kind(config) != "spm":
        return None
    if shows_boxes(config):
        return "object map: the source's box scaled to sum to 1; a weight is the share of the object its box covers"
    if config.get("label_weights") == TEACHER:
        return (
            "weights: the teacher's posterior of each label on the output (the run's backbone and head); "
            "SPM = semantic percentage map, the class CAM scaled to sum to 1, shown for reference"
        )
    return "SPM = semantic percentage map: the class CAM scaled to sum to 1; a weight is the SPM mass its box covers"


def heat_titles(config: dict[str, Any]) -> tuple[str, str]:
    preview = get_method(config["method"]).preview
    if shows_boxes(config):
        return ("object box a", "object box b")
    semantic = preview.heat == "attention" and config.get("label_weights") in ("semantic", TEACHER)
    return preview.semantic_titles if semantic else preview.titles


def _display_heats(
    config: dict[str, Any], views: dict[str, np.ndarray], cams: dict[str, np.ndarray]
) -> dict[str, np.ndarray]:
    """CAMs -> what the method looked at: SPMs, the G×G attention grid, or the method's own maps."""
    heat = heat_kind(config)
    if callable(heat):
        return heat(views, cams, config)
    if not cams:
        return {}
    paths = list(cams)
    stacked = np.stack([np.asarray(cams[p], dtype=np.float32) for p in paths])
    size = config["size"]
    if heat == "grid":
        import torch

        from mixgen.cam.cams import attention_grid

        grid = attention_grid(torch.from_numpy(stacked), config["grid"]).numpy()
        cell = np.arange(size) * config["grid"] // size  # same pixel→cell rule as the pasted cells
        heats = grid[:, cell][:, :, cell]
    else:
        heats = spm_maps(stacked, size)
    return dict(zip(paths, heats, strict=True))


def _load_sources(
    out: Path, rows: list[dict[str, Any]], meta: dict[str, Any], src: Path | None, device: str, reporter: Reporter
) -> Sources:
    """Views from SRC and maps from the run's cache, else recomputed; whatever is missing becomes a
    note and a grey tile instead of a failure."""
    config = meta["config"]
    result = Sources()
    root = source_root(out, src)
    if root is None:
        result.notes.append("SRC of the run not found; pass --src to show source views and maps")
        return result
    wanted = sorted({r["source_a"] for r in rows} | {r["source_b"] for r in rows})
    try:
        index = RunConfig.from_settings(config, src=root, out=out).scan_sources()
    except MixgenError as exc:
        result.notes.append(f"SRC {root} unreadable: {exc}")
        return result
    items = {item.path: item for item in index.items}
    for path in wanted:
        try:
            result.views[path] = load_source_view(index, items[path], config["size"], config["resize"])
        except KeyError:
            result.notes.append(f"source view unavailable: {path} is no longer in SRC")
        except DecodeError as exc:
            result.notes.append(f"source view unavailable: {exc}")
    try:
        cams = _source_cams(out, meta, root, index, wanted, device, reporter, result.notes)
        result.heats = _display_heats(config, result.views, cams)
    except (MixgenError, ValueError) as exc:
        result.notes.append(f"maps unavailable: {exc}")
    return result


def _source_cams(
    out: Path,
    meta: dict[str, Any],
    root: Path,
    index: SourceIndex,
    wanted: list[str],
    device: str,
    reporter: Reporter,
    notes: list[str],
) -> dict[str, np.ndarray]:
    config = meta["config"]
    if index.digest != meta.get("source_digest"):
        notes.append(f"SRC {root} changed since the run; views and maps may differ from what was mixed")
    position = {item.path: i for i, item in enumerate(index.items)}
    missing = [p for p in wanted if p not in position]
    if missing:
        notes.append(f"{len(missing)} source(s) no longer in SRC, e.g. {missing[0]}")
    wanted = [p for p in wanted if p in position]
    if shows_boxes(config):
        from mixgen.sources.boxes import box_maps

        shown = np.zeros(len(index), bool)
        shown[[position[p] for p in wanted]] = True
        maps = box_maps(index, config["size"], config["resize"], shown)[0]
        return {p: maps[position[p]] for p in wanted}
    if config.get("cam") is not None:
        cached = _cached_maps(out, meta, index)
        if cached is not None:
            return {p: np.array(cached[position[p]]) for p in wanted}
        reporter.info("CAM cache not found in OUT/.mixgen; recomputing the maps")
        # The run's own settings (a run recorded before --cam-norm gets the raw CAM, as it had).
        settings = RunConfig.from_settings(config, src=root, out=out, device=device, runtime=recorded_runtime(meta))
        settings.cam_norm = settings.cam_norm or "raw"
    else:
        # The run used no map; show the embedded backbone's class-agnostic attention instead.
        settings = RunConfig(
            "snapmix", root, out, size=config["size"], resize=config["resize"], device=device, workers=0
        )
        settings.cam, settings.cam_size, settings.cam_norm = "mean", max(config["size"], 32), DEFAULT_CAM_NORM
    settings.batch_size, settings.workers = 32, 0
    maker = MapMaker(index, settings, reporter)
    try:
        return {index.items[s.position].path: s.cam for s in maker.maps([position[p] for p in wanted])}
    finally:
        maker.close()


# ---------------------------------------------------------------------------------------------
# Drawing


def _tile(image: np.ndarray | None, tile: int, label: str) -> Image.Image:
    if image is None:
        placeholder = Image.new("RGB", (tile, tile), PLACEHOLDER)
        ImageDraw.Draw(placeholder).text((6, tile // 2 - 6), label, fill=INK, font=_font())
        return placeholder
    return Image.fromarray(image).resize((tile, tile), Image.Resampling.BILINEAR)


def _rect(draw: ImageDraw.ImageDraw, box: dict[str, int] | tuple, scale: float, color: tuple, width: int = 2) -> None:
    """Outline a half-open pixel box of the view on a tile drawn at ``scale`` × the view's size."""
    x0, y0, x1, y1 = (box["x0"], box["y0"], box["x1"], box["y1"]) if isinstance(box, dict) else box
    left, top = x0 * scale, y0 * scale
    draw.rectangle((left, top, max(x1 * scale - 1, left), max(y1 * scale - 1, top)), outline=color, width=width)


def _cell_boxes(cells: list[int], grid: int, size: int) -> list[tuple[int, int, int, int]]:
    edge = cell_edges(grid, size)
    return [(edge[c % grid], edge[c // grid], edge[c % grid + 1], edge[c // grid + 1]) for c in cells]


def _captions(row: dict[str, Any]) -> tuple[str, str]:
    first = (
        f"#{row['index']}  a: {row['class_a']} {row['weight_a']:.3f}   b: {row['class_b']} {row['weight_b']:.3f}"
        + ("   (same class)" if row["label_a"] == row["label_b"] else "")
    )
    parts = [f"wa+wb {row['weight_a'] + row['weight_b']:.3f}", f"area from b {row['area_ratio']:.3f}"]
    if row.get("label_weights") == "semantic":
        parts.append("weights: SPM mass")
    elif row.get("label_weights") == "boxes":
        parts.append("weights: object box share")
    elif row.get("label_weights") == TEACHER:
        parts.append("weights: teacher posterior")
    if row.get("lam") is not None:
        parts.append(f"lambda {row['lam']:.3f}")
    if row.get("cells") is not None:
        parts.append(f"{len(row['cells'])} cells")
    if row["area_ratio"] == 0:
        parts.append("nothing pasted: not mixed")
    return first, "   ".join(parts)


def _outline_mask(tile: Image.Image, runs: list[int], size: int, color: tuple) -> None:
    """Colour the pixels of ``tile`` on the border of the donor mask (scaled to the tile)."""
    mask = mask_from_runs(runs, size)
    scaled = np.asarray(Image.fromarray(mask.astype(np.uint8) * 255).resize(tile.size, Image.Resampling.NEAREST)) > 0
    edge = np.zeros_like(scaled)
    edge[:-1] |= scaled[:-1] != scaled[1:]
    edge[:, :-1] |= scaled[:, :-1] != scaled[:, 1:]
    pixels = np.asarray(tile).copy()
    pixels[edge] = color
    tile.paste(Image.fromarray(pixels))


def _wrap(text: str, font: Any, width: int) -> list[str]:
    """``text`` in lines no wider than ``width`` pixels, broken between words."""
    lines: list[str] = []
    for word in text.split():
        if lines and font.getlength(f"{lines[-1]} {word}") <= width:
            lines[-1] += f" {word}"
        else:
            lines.append(word)
    return lines


def render(rows: list[dict[str, Any]], config: dict[str, Any], sources: Sources, tile: int) -> Image.Image:
    """The contact sheet: a header with column titles, then one row of five tiles and two caption
    lines per output."""
    method, size = config["method"], config["size"]
    font = _font()
    heat_a_title, heat_b_title = heat_titles(config)
    titles = ["canvas a", "donor b", heat_a_title, heat_b_title, f"output ({method})"]
    width = 5 * tile + 6 * MARGIN
    key = _wrap(legend(config) or "", font, width - 2 * MARGIN)
    header = LINE * (len(key) + 1) + MARGIN
    row_height = tile + 2 * LINE + MARGIN
    height = header + len(rows) * row_height + MARGIN
    sheet = Image.new("RGB", (width, height), BACKGROUND)
    draw = ImageDraw.Draw(sheet)
    for i, line in enumerate(key):
        draw.text((MARGIN, MARGIN + i * LINE), line, fill=INK, font=font)
    for c, title in enumerate(titles):
        draw.text((MARGIN + c * (tile + MARGIN), header - LINE), title, fill=INK, font=font)
    scale = tile / size
    for r, row in enumerate(rows):
        top = header + r * row_height
        view_a, view_b = sources.views.get(row["source_a"]), sources.views.get(row["source_b"])
        heat_a, heat_b = sources.heats.get(row["source_a"]), sources.heats.get(row["source_b"])
        try:
            data = read_output(row["image_path"], row.get("image_offset"), row.get("image_size"))
            with Image.open(io.BytesIO(data)) as output:
                mixed = np.asarray(output.convert("RGB"))
        except OSError:
            mixed = None
        tiles = [
            _tile(view_a, tile, "no source view"),
            _tile(view_b, tile, "no source view"),
            _tile(None if heat_a is None or view_a is None else overlay(view_a, heat_a), tile, "no map"),
            _tile(None if heat_b is None or view_b is None else overlay(view_b, heat_b), tile, "no map"),
            _tile(mixed, tile, "output missing"),
        ]
        drawers = [ImageDraw.Draw(t) for t in tiles]
        if row.get("box_a") is not None:
            for i in (0, 2, 4):
                _rect(drawers[i], row["box_a"], scale, BOX_A)
        if row.get("box_b") is not None:
            for i in (1, 3):
                _rect(drawers[i], row["box_b"], scale, BOX_B)
        if row.get("cells") is not None:
            for box in _cell_boxes(row["cells"], config["grid"], size):
                for i in (3, 4):
                    _rect(drawers[i], box, scale, BOX_B, width=1)
        if row.get("mask") is not None:
            for i in (1, 3, 4):
                _outline_mask(tiles[i], row["mask"], size, BOX_B)
        for c, image in enumerate(tiles):
            sheet.paste(image, (MARGIN + c * (tile + MARGIN), top))
        first, second = _captions(row)
        draw.text((MARGIN, top + tile + 2), first, fill=INK, font=font)
        draw.text((MARGIN, top + tile + 2 + LINE), second, fill=INK, font=font)
    return sheet


def select_rows(
    table: Any, count: int | None, sample: int | None, seed: int, classes: list[str] | None
) -> list[dict[str, Any]]:
    """The rows a sheet shows: those with one of ``classes`` as canvas or donor (all when None),
    then ``sample`` of them drawn at random with ``seed`` (in index order), or else the first
    ``count``."""
    import pyarrow as pa
    import pyarrow.compute as pc

    if classes:
        present = set(table.column("class_a").to_pylist()) | set(table.column("class_b").to_pylist())
        for name in classes:
            if name not in present:
                shown = ", ".join(sorted(present)[:12]) + (", ..." if len(present) > 12 else "")
                raise MixgenError(f"--class {name}: no output of this run has that class; classes: {shown}")
        wanted = pa.array(classes)
        table = table.filter(pc.or_(pc.is_in(table["class_a"], wanted), pc.is_in(table["class_b"], wanted)))
    if sample is None:
        return table.slice(0, count).to_pylist()
    picked = np.random.default_rng(seed).choice(len(table), size=min(sample, len(table)), replace=False)
    return table.take(np.sort(picked)).to_pylist()


def make_preview(
    out: Path,
    output: Path = Path("preview.png"),
    count: int | None = None,
    src: Path | None = None,
    tile: int = 160,
    device: str = "auto",
    reporter: Reporter | None = None,
    colors: int = 0,
    sample: int | None = None,
    seed: int = 0,
    classes: list[str] | None = None,
) -> dict[str, Any]:
    """Render the first ``count`` outputs of OUT (16 when None), or ``sample`` seeded random ones,
    of ``classes`` only when given, into one PNG at ``output``; returns a summary.
    ``colors`` > 0 writes a dithered palette PNG, about a third of the size (for docs and reports)."""
    reporter = reporter or Reporter()
    if count is not None and sample is not None:
        raise UsageError("--count and --sample both choose the rows shown; pass one of them")
    if sample is not None and sample < 1:
        raise UsageError(f"--sample must be >= 1, got {sample}")
    if seed < 0:
        raise UsageError(f"--seed must be >= 0, got {seed}")
    count = DEFAULT_COUNT if count is None else count
    if count < 1:
        raise UsageError(f"--count must be >= 1, got {count}")
    if not 32 <= tile <= 1024:
        raise UsageError(f"--tile must be in 32..1024 pixels, got {tile}")
    if colors and not 2 <= colors <= 256:
        raise UsageError(f"--colors must be 0 (full colour) or 2..256, got {colors}")
    if output.suffix.lower() != ".png":
        raise UsageError(f"--output {output}: the contact sheet is a PNG; use a name ending in .png")
    out = Path(out)
    meta = run_metadata(out)
    rows = select_rows(load_rows(out), count, sample, seed, classes)
    sources = _load_sources(out, rows, meta, src, device, reporter)
    for note in sources.notes:
        reporter.info(note)
    sheet = render(rows, meta["config"], sources, tile)
    if colors:
        palette = sheet.quantize(colors, method=Image.Quantize.MEDIANCUT)
        sheet = sheet.quantize(palette=palette, dither=Image.Dither.FLOYDSTEINBERG)
    output.parent.mkdir(parents=True, exist_ok=True)
    sheet.save(output, optimize=True)
    return {
        "output": str(output),
        "rows": len(rows),
        "indices": [row["index"] for row in rows],
        "method": meta["config"]["method"],
        "width": sheet.width,
        "height": sheet.height,
        "maps": bool(sources.heats),
        "notes": sources.notes,
    }
