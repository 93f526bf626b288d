"""Label fidelity: how true are mixgen's soft labels? A ground-truth set of real objects with exact
masks on real backgrounds, mixgen runs on it, and for every manifest row the true label shares
computed from the masks, against the method's weights and against the area rule.

The set is built from the real photos that ship inside the scikit-image and scikit-learn wheels
(no download): seven objects cut out of them with an alpha mask constructed here (so the mask is
exact by construction: the object *is* the masked pixels), each pasted, flipped, scaled and
colour-jittered, onto crops of eight other real photos, at 3-40 % of the view. ``masks.npz`` holds
every source's alpha at its own resolution; the truth functions push it through the same view
transform as the image (``--resize crop`` or ``squash``).

    python benchmarks/fidelity.py                        # the default table (see benchmarks/README.md)
    python benchmarks/fidelity.py --quick                # a small smoke run
    python benchmarks/fidelity.py --configs snapmix:probe:448:semantic --json fid.json

Needs scikit-image and scikit-learn (the photos) besides mixgen; runs mixgen on the CPU through
its command line, one subprocess per configuration."""

from __future__ import annotations

import argparse
import json
import math
import os
import shutil
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image, ImageDraw

REPO = Path(__file__).resolve().parents[1]
DATASET_VERSION = 1
AREA_RANGE = (0.03, 0.40)
# Rows whose true donor share is this close to 1/2 have no dominant label (typically object a left
# whole and object b pasted whole): they count in the MAE, not in the dominant-label error.
TIE = 1e-3  # object area as a share of the view, log-uniform
SOURCE_SIZES = ((480, 360), (360, 480), (448, 448), (512, 384), (400, 300))

# ---------------------------------------------------------------------------------------------
# Truth: the label shares a row's geometry really gives, from the objects' view masks


def box_indicator(box: tuple[int, int, int, int] | dict[str, int], size: int) -> np.ndarray:
    """(S, S) float mask of a half-open box x0 <= x < x1, y0 <= y < y1 (x = column)."""
    if isinstance(box, dict):
        box = (box["x0"], box["y0"], box["x1"], box["y1"])
    x0, y0, x1, y1 = (int(v) for v in box)
    out = np.zeros((size, size), dtype=np.float64)
    out[max(y0, 0) : max(y1, 0), max(x0, 0) : max(x1, 0)] = 1.0
    return out


def cells_indicator(cells: list[int], grid: int, size: int) -> np.ndarray:
    """(S, S) mask of row-major grid cells; cell r spans rows [⌊rS/G⌋, ⌊(r+1)S/G⌋), as mixgen's
    Attentive CutMix and GridMix cut the view."""
    edges = [g * size // grid for g in range(grid + 1)]
    out = np.zeros((size, size), dtype=np.float64)
    for cell in cells:
        row, col = divmod(int(cell), grid)
        out[edges[row] : edges[row + 1], edges[col] : edges[col + 1]] = 1.0
    return out


def runs_indicator(runs: list[int], size: int) -> np.ndarray:
    """(S, S) donor mask from FMix's row-major run lengths, the first run being canvas pixels."""
    runs = [int(r) for r in runs]
    if sum(runs) != size * size or any(r < 0 for r in runs):
        raise ValueError(f"run lengths sum to {sum(runs)}, not {size * size}")
    values = np.arange(len(runs)) % 2  # 0: canvas, 1: donor
    return np.repeat(values, runs).astype(np.float64).reshape(size, size)


def share_inside(mask: np.ndarray, region: np.ndarray) -> float:
    """Share of an object's mass (a float mask) inside a region (a 0/1 or float indicator);
    NaN for an empty object."""
    total = float(mask.sum())
    return float((mask * region).sum()) / total if total > 0 else float("nan")


@dataclass
class Geometry:
    """Where a row's pixels go: ``canvas`` marks the canvas pixels replaced, ``donor`` the donor
    pixels that appear in the output (both S×S indicators)."""

    canvas: np.ndarray
    donor: np.ndarray


def row_geometry(row: dict[str, Any], size: int, grid: int | None = None) -> Geometry | None:
    """The geometry of one manifest row, from its own columns: boxes (SnapMix: box_b of the donor
    resized into box_a; CutMix/SaliencyMix: the same box; ResizeMix: the whole donor view into
    box_a), grid ``cells`` (Attentive CutMix, GridMix: the same cells in both), or the FMix ``mask``
    (the same pixels in both). None where the row has no geometry (MixUp's blend); an empty
    geometry where nothing was pasted."""
    if row.get("mask") is not None and len(row["mask"]) > 0:
        donor = runs_indicator(list(row["mask"]), size)
        return Geometry(donor, donor)
    if row.get("cells") is not None and row.get("box_a") is None:
        if grid is None:
            raise ValueError("a row with cells needs the run's grid size")
        cells = cells_indicator(list(row["cells"]), grid, size)
        return Geometry(cells, cells)
    if row.get("box_a") is not None and row.get("box_b") is not None:
        return Geometry(box_indicator(row["box_a"], size), box_indicator(row["box_b"], size))
    if row.get("method") == "mixup":
        return None
    empty = np.zeros((size, size))
    return Geometry(empty, empty)


def true_shares(geometry: Geometry, mask_a: np.ndarray, mask_b: np.ndarray) -> tuple[float, float]:
    """(t_a, t_b): the share of object a left outside the replaced pixels and the share of object b
    that arrives in the output."""
    return 1.0 - share_inside(mask_a, geometry.canvas), share_inside(mask_b, geometry.donor)


def donor_share(weight_a: float, weight_b: float) -> float:
    """w_b / (w_a + w_b); NaN when both are 0."""
    total = weight_a + weight_b
    return weight_b / total if total > 0 else float("nan")


def view_mask(alpha: np.ndarray, size: int, resize: str = "crop") -> np.ndarray:
    """An object's alpha (H×W, 0..255 or 0..1) through mixgen's view transform (``make_view``: the
    centre square or the whole image, bilinear, one step), as an S×S float mask in 0..1."""
    alpha = np.asarray(alpha, dtype=np.float32)
    if alpha.max(initial=0) > 1.0:
        alpha = alpha / 255.0
    from mixgen.views import view_box

    height, width = alpha.shape
    box = view_box(width, height, resize)
    image = Image.fromarray(alpha, mode="F")
    out = image.resize((size, size), Image.Resampling.BILINEAR, box=box, reducing_gap=None)
    return np.clip(np.asarray(out, dtype=np.float64), 0.0, 1.0)


def pointing(spm: np.ndarray, mask: np.ndarray) -> tuple[bool, float]:
    """Pointing game of one S×S map: (its peak lies on the object, its mass on the object ÷ the
    object's area share — 1 is no better than uniform)."""
    peak = np.unravel_index(int(np.argmax(spm)), spm.shape)
    area = float(mask.sum()) / mask.size
    mass = float((spm * mask).sum()) / float(spm.sum())
    return bool(mask[peak] >= 0.5), mass / area if area > 0 else float("nan")


# ---------------------------------------------------------------------------------------------
# The ground-truth set


def _photo(package: str, name: str) -> np.ndarray:
    if package == "skimage":
        import skimage.data

        path = Path(skimage.data.__file__).parent / name
    else:
        import sklearn.datasets

        path = Path(sklearn.datasets.__file__).parent / "images" / name
    return np.asarray(Image.open(path).convert("RGB"))


def _shape_mask(shape: tuple[int, ...], ellipses=(), polygons=()) -> np.ndarray:
    mask = Image.new("L", (shape[1], shape[0]), 0)
    draw = ImageDraw.Draw(mask)
    for cx, cy, rx, ry in ellipses:
        draw.ellipse([cx - rx, cy - ry, cx + rx, cy + ry], fill=255)
    for points in polygons:
        draw.polygon(points, fill=255)
    return np.asarray(mask) > 0


def _largest(mask: np.ndarray) -> np.ndarray:
    from scipy import ndimage

    labels, count = ndimage.label(mask)
    if count <= 1:
        return mask
    return labels == (np.bincount(labels.ravel())[1:].argmax() + 1)


def objects() -> dict[str, tuple[np.ndarray, np.ndarray]]:
    """Class name -> (photo cropped to the object's bounding box, its binary mask). The masks are
    drawn here (ellipses and polygons around the object, refined by colour where the object stands
    out), so they are exact by construction: the object is what the mask keeps."""
    from scipy import ndimage

    found: dict[str, tuple[np.ndarray, np.ndarray]] = {}
    photo = _photo("sklearn", "flower.jpg")
    red, blue = photo[..., 0].astype(int), photo[..., 2].astype(int)
    mask = _shape_mask(photo.shape, ellipses=[(308, 222, 142, 142)]) & (red > blue + 40)
    found["flower"] = (photo, _largest(ndimage.binary_fill_holes(ndimage.binary_opening(mask, iterations=2))))
    photo = _photo("skimage", "chelsea.png")
    found["cat"] = (photo, _shape_mask(photo.shape, ellipses=[(225, 150, 205, 145)]))
    photo = _photo("skimage", "coffee.png")
    found["coffee"] = (photo, _shape_mask(photo.shape, ellipses=[(278, 225, 203, 160)]))
    photo = _photo("skimage", "astronaut.png")
    body = [(120, 170), (310, 170), (355, 300), (365, 511), (20, 511), (25, 330), (60, 250)]
    found["astronaut"] = (photo, _shape_mask(photo.shape, ellipses=[(225, 95, 75, 82)], polygons=[body]))
    photo = _photo("skimage", "motorcycle_left.png")
    outline = [(95, 200), (150, 150), (330, 170), (340, 115), (480, 100), (560, 110), (590, 160), (560, 230)]
    outline += [(640, 290), (690, 400), (650, 450), (560, 440), (510, 370), (470, 360), (340, 390), (280, 400)]
    outline += [(200, 400), (130, 370), (110, 300), (100, 250)]
    found["motorcycle"] = (photo, _shape_mask(photo.shape, polygons=[outline]))
    photo = _photo("skimage", "coins.png")
    coins = ndimage.binary_fill_holes(ndimage.binary_opening(photo[..., 0] > 105, iterations=2))
    labels, count = ndimage.label(coins)
    sizes = np.bincount(labels.ravel())
    # Every coin, not the bright band along the top edge.
    keep = [k for k in range(1, count + 1) if 200 < sizes[k] < 6000 and labels[:4].ravel().tolist().count(k) == 0]
    found["coins"] = (photo, np.isin(labels, keep))
    photo = _photo("skimage", "rocket.jpg")
    rocket = _shape_mask(photo.shape, polygons=[[(300, 120), (346, 120), (346, 405), (300, 405)]]) & (
        photo.mean(axis=2) > 90
    )
    found["rocket"] = (photo, _largest(ndimage.binary_fill_holes(ndimage.binary_closing(rocket, iterations=3))))
    out = {}
    for name, (photo, mask) in found.items():
        ys, xs = np.nonzero(mask)
        y0, y1, x0, x1 = ys.min(), ys.max() + 1, xs.min(), xs.max() + 1
        out[name] = (photo[y0:y1, x0:x1], mask[y0:y1, x0:x1])
    return out


def backgrounds() -> list[np.ndarray]:
    """Real photos that hold none of the objects (the flower photo's left edge is bokeh only)."""
    names = [("sklearn", "china.jpg"), ("skimage", "brick.png"), ("skimage", "grass.png")]
    names += [("skimage", "gravel.png"), ("skimage", "hubble_deep_field.jpg"), ("skimage", "ihc.png")]
    names += [("skimage", "moon.png")]
    photos = [_photo(package, name) for package, name in names]
    photos.append(_photo("sklearn", "flower.jpg")[:, :160])
    return photos


def build_ground_truth(root: Path, per_class: int = 30, seed: int = 0) -> Path:
    """Write ``root/src/<class>/<class>_NNN.jpg`` and ``root/masks.npz`` (each source's alpha, uint8
    at the source's resolution, keyed by its path relative to src). Deterministic in
    (per_class, seed); reused when already built."""
    marker = root / "ground_truth.json"
    settings = {"version": DATASET_VERSION, "per_class": per_class, "seed": seed}
    if marker.is_file() and json.loads(marker.read_text()) == settings:
        return root / "src"
    shutil.rmtree(root / "src", ignore_errors=True)
    rng = np.random.default_rng(seed)
    objs, grounds = objects(), backgrounds()
    masks: dict[str, np.ndarray] = {}
    for name in sorted(objs):
        photo, mask = objs[name]
        (root / "src" / name).mkdir(parents=True, exist_ok=True)
        for number in range(per_class):
            width, height = SOURCE_SIZES[int(rng.integers(len(SOURCE_SIZES)))]
            ground = grounds[int(rng.integers(len(grounds)))]
            gh, gw = ground.shape[:2]
            cw, ch = int(gw * rng.uniform(0.5, 1.0)), int(gh * rng.uniform(0.5, 1.0))
            cx, cy = int(rng.integers(gw - cw + 1)), int(rng.integers(gh - ch + 1))
            canvas = Image.fromarray(ground[cy : cy + ch, cx : cx + cw]).resize((width, height), Image.BILINEAR)
            if rng.random() < 0.5:
                canvas = canvas.transpose(Image.Transpose.FLIP_LEFT_RIGHT)
            canvas_arr = np.asarray(canvas, dtype=np.float32) * rng.uniform(0.75, 1.15)
            # Scale so that the object's mask covers the drawn share of the view (the centre square).
            side = min(width, height)
            target = math.exp(rng.uniform(math.log(AREA_RANGE[0]), math.log(AREA_RANGE[1])))
            oh, ow = mask.shape
            scale = math.sqrt(target * side * side / mask.sum())
            scale = min(scale, 0.98 * side / ow, 0.98 * side / oh)
            sw, sh = max(2, round(ow * scale)), max(2, round(oh * scale))
            obj = Image.fromarray(photo).resize((sw, sh), Image.BILINEAR)
            alpha = Image.fromarray(mask.astype(np.uint8) * 255).resize((sw, sh), Image.BILINEAR)
            if rng.random() < 0.5:
                obj, alpha = (im.transpose(Image.Transpose.FLIP_LEFT_RIGHT) for im in (obj, alpha))
            obj_arr = np.asarray(obj, dtype=np.float32) * rng.uniform(0.8, 1.2)
            left, top = (width - side) // 2, (height - side) // 2
            px = left + int(rng.integers(side - sw + 1))
            py = top + int(rng.integers(side - sh + 1))
            full = np.zeros((height, width), dtype=np.float32)
            full[py : py + sh, px : px + sw] = np.asarray(alpha, dtype=np.float32) / 255.0
            patch = np.zeros_like(canvas_arr)
            patch[py : py + sh, px : px + sw] = obj_arr
            image = canvas_arr * (1 - full[..., None]) + patch * full[..., None]
            rel = f"{name}/{name}_{number:03d}.jpg"
            Image.fromarray(np.clip(np.rint(image), 0, 255).astype(np.uint8)).save(root / "src" / rel, quality=92)
            masks[rel] = np.clip(np.rint(full * 255), 0, 255).astype(np.uint8)
    np.savez_compressed(root / "masks.npz", **masks)
    marker.write_text(json.dumps(settings))
    return root / "src"


def load_masks(root: Path) -> dict[str, np.ndarray]:
    with np.load(root / "masks.npz") as data:
        return {key: data[key] for key in data.files}


# ---------------------------------------------------------------------------------------------
# Running mixgen and scoring its manifests


@dataclass(frozen=True)
class Config:
    method: str
    cam: str | None  # None: the method uses no CAM (area weights)
    size: int
    label_weights: str  # area | semantic
    options: str = ""  # further mixgen options of this configuration, e.g. "--cam-norm raw"

    @property
    def name(self) -> str:
        name = f"{self.method}:{self.cam or '-'}:{self.size}:{self.label_weights}"
        return f"{name}:{self.options}" if self.options else name

    @staticmethod
    def parse(text: str) -> Config:
        method, cam, size, weights, *options = text.split(":", 4)
        return Config(method, None if cam in ("", "-") else cam, int(size), weights, options[0] if options else "")


def run_mixgen(config: Config, src: Path, out: Path, pairs: int, seed: int, extra: list[str]) -> float:
    """One ``mixgen METHOD SRC OUT`` process on the CPU; returns its wall time."""
    command = [sys.executable, "-m", "mixgen", config.method, str(src), str(out), "--pairs", str(pairs)]
    command += ["--size", str(config.size), "--seed", str(seed), "--device", "cpu", "--pairing", "cross-class"]
    command += ["--overwrite", "--format", "jpg", "--quality", "75"]
    if config.cam is not None:
        command += ["--cam", config.cam]
    if config.label_weights == "semantic" and config.method != "snapmix":
        command += ["--label-weights", "semantic"]
    command += config.options.split() + extra
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")])}
    started = time.perf_counter()
    done = subprocess.run(command, env=env, capture_output=True, text=True)
    if done.returncode != 0:
        raise RuntimeError(f"{' '.join(command)} failed: {done.stderr.strip()[-800:]}")
    return time.perf_counter() - started


def read_rows(out: Path) -> list[dict[str, Any]]:
    import pyarrow.parquet as pq

    rows: list[dict[str, Any]] = []
    for path in sorted((out / "data").glob("*/metadata.parquet")):
        rows.extend(pq.read_table(path).to_pylist())
    return sorted(rows, key=lambda r: r["index"])


def run_maps(out: Path) -> np.ndarray | None:
    """The run's per-source low-resolution maps (mixgen's cache), in source-index order."""
    found = sorted((out / ".mixgen").glob("maps-*.npy"))
    return np.load(found[0]) if found else None


def score_rows(
    rows: list[dict[str, Any]], masks: dict[str, np.ndarray], size: int, resize: str, grid: int | None
) -> dict[str, Any]:
    """MAE of the donor share and the dominant-label error, for the method's weights and for the
    area rule (``area_ratio``) on the same rows: cross-label rows whose truth is defined (some
    object is left in the output), the dominant label only where the truth is not a tie."""
    cache: dict[str, np.ndarray] = {}

    def mask_of(path: str) -> np.ndarray:
        if path not in cache:
            cache[path] = view_mask(masks[path], size, resize)
        return cache[path]

    method_err, area_err, method_wrong, area_wrong, truths = [], [], [], [], []
    undefined = ties = 0
    for row in rows:
        if row["label_a"] == row["label_b"]:
            continue
        geometry = row_geometry(row, size, grid)
        if geometry is None:
            continue
        mask_a = mask_of(row["source_a"])
        t_a, t_b = true_shares(geometry, mask_a, mask_of(row["source_b"]))
        truth = donor_share(t_a, t_b)
        if not math.isfinite(truth):
            undefined += 1
            continue
        predicted = donor_share(row["weight_a"], row["weight_b"])
        if not math.isfinite(predicted):  # both weights 0: the method names no label
            predicted = 0.5
        area = float(row["area_ratio"])
        method_err.append(abs(predicted - truth))
        area_err.append(abs(area - truth))
        truths.append(truth)
        if abs(truth - 0.5) < TIE:
            ties += 1  # e.g. object a untouched and object b pasted whole: no label dominates
            continue
        method_wrong.append((predicted > 0.5) != (truth > 0.5))
        area_wrong.append((area > 0.5) != (truth > 0.5))
    count = len(truths)
    mean = lambda v: float(np.mean(v)) if v else float("nan")  # noqa: E731
    return {
        "rows": count,
        "undefined_rows": undefined,
        "tie_rows": ties,
        "mae": mean(method_err),
        "wrong": mean(method_wrong),
        "area_mae": mean(area_err),
        "area_wrong": mean(area_wrong),
        "mean_true_share": mean(truths),
    }


def score_maps(
    maps: np.ndarray, paths: list[str], masks: dict[str, np.ndarray], size: int, resize: str
) -> dict[str, Any]:
    """Pointing game over all sources: the share whose SPM peaks on the object, and the mean ratio
    of SPM mass on the object to the object's area share; split by object size."""
    from mixgen.heatmaps import spm_maps

    hits, ratios, areas = [], [], []
    for start in range(0, len(paths), 32):
        spms = spm_maps(maps[start : start + 32], size)
        for spm, path in zip(spms, paths[start : start + 32], strict=True):
            mask = view_mask(masks[path], size, resize)
            hit, ratio = pointing(spm, mask)
            hits.append(hit)
            ratios.append(ratio)
            areas.append(float(mask.mean()))
    areas_arr, hits_arr = np.array(areas), np.array(hits)
    small = areas_arr < 0.1
    return {
        "pointing": float(hits_arr.mean()),
        "pointing_small": float(hits_arr[small].mean()) if small.any() else float("nan"),
        "mass_ratio": float(np.mean(ratios)),
    }


def evaluate(
    config: Config, src: Path, root: Path, masks: dict[str, np.ndarray], work: Path, pairs: int, seed: int, extra
) -> dict[str, Any]:
    from mixgen.sources import scan

    out = work / "".join(c if c.isalnum() else "_" for c in config.name)[:80]
    seconds = run_mixgen(config, src, out, pairs, seed, extra)
    record = json.loads((out / "mixgen.json").read_text())
    resolved = record.get("config", {})
    resize, grid = resolved.get("resize", "crop"), resolved.get("grid")
    result: dict[str, Any] = {"config": config.name, "seconds": round(seconds, 2)}
    result.update(score_rows(read_rows(out), masks, config.size, resize, grid))
    maps = run_maps(out) if config.cam is not None else None
    if maps is not None:
        paths = [item.path for item in scan(src).items]
        result.update(score_maps(maps, paths, masks, config.size, resize))
    probe = record.get("probe") or {}
    if probe.get("holdout_accuracy") is not None:
        result["probe_holdout"] = probe["holdout_accuracy"]
    shutil.rmtree(out, ignore_errors=True)
    return result


EMBEDDED_WEIGHTS_DIR = str(Path(sys.executable).parents[1])
DEFAULT_CONFIGS = (
    "snapmix:probe:448:semantic",
    "snapmix:probe:448:semantic:--cam-norm raw",
    "snapmix:probe:448:semantic:--cam-norm relu",
    "snapmix:probe:224:semantic",
    "snapmix:probe:224:semantic:--cam-norm raw",
    "snapmix:imagenet:448:semantic",
    "snapmix:imagenet:448:semantic:--cam-norm raw",
    "snapmix:mean:448:semantic",
    "cutmix:-:448:area",
    "cutmix:-:224:area",
    "attentive:mean:224:area",
)


def table(results: list[dict[str, Any]]) -> str:
    def f(value: Any, pct: bool = False) -> str:
        if value is None or (isinstance(value, float) and not math.isfinite(value)):
            return "–"
        return f"{100 * value:.1f} %" if pct else f"{value:.3f}"

    lines = [
        "| method | --cam | size | --label-weights | rows | donor-share MAE | dominant wrong | area rule MAE "
        "| area rule wrong | pointing (all / <10 %) | mass ÷ area |",
        "|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in results:
        method, cam, size, weights, *options = r["config"].split(":", 4)
        if options:
            method = f"{method} `{options[0].replace(EMBEDDED_WEIGHTS_DIR, '…')}`"
        if "error" in r:
            lines.append(f"| {method} | {cam} | {size} | {weights} | failed: {r['error'][-120:]} |")
            continue
        pointing_cell = f"{f(r.get('pointing'), True)} / {f(r.get('pointing_small'), True)}" if "pointing" in r else "–"
        lines.append(
            f"| {method} | {cam} | {size} | {weights} | {r['rows']} | {f(r['mae'])} | {f(r['wrong'], True)} "
            f"| {f(r['area_mae'])} | {f(r['area_wrong'], True)} | {pointing_cell} | {f(r.get('mass_ratio'))} |"
        )
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--per-class", type=int, default=30, help="sources per class (7 classes)")
    parser.add_argument("--pairs", type=int, default=400, help="outputs per configuration")
    parser.add_argument("--seed", type=int, default=0, help="mixgen's --seed (the set is always seed 0)")
    parser.add_argument("--configs", nargs="*", default=list(DEFAULT_CONFIGS), help="method:cam:size:label-weights")
    parser.add_argument("--mixgen-args", default="", help="extra options for every mixgen run")
    parser.add_argument("--workdir", type=Path, default=Path(tempfile.gettempdir()) / "mixgen-fidelity")
    parser.add_argument("--quick", action="store_true", help="10 sources per class, 100 pairs, two configurations")
    parser.add_argument("--json", type=Path, help="also write every figure as JSON")
    args = parser.parse_args(argv)
    if args.quick:
        args.per_class, args.pairs = 10, 100
        args.configs = ["snapmix:probe:224:semantic", "cutmix:-:224:area"]
    root = args.workdir / f"set-{args.per_class}"
    print(f"building the ground-truth set in {root} …", file=sys.stderr, flush=True)
    src = build_ground_truth(root, args.per_class)
    masks = load_masks(root)
    results = []
    for number, text in enumerate(args.configs, 1):
        config = Config.parse(text)
        print(f"[{number}/{len(args.configs)}] {config.name} …", file=sys.stderr, flush=True)
        try:
            result = evaluate(config, src, root, masks, args.workdir, args.pairs, args.seed, args.mixgen_args.split())
        except RuntimeError as exc:  # one configuration mixgen refuses: report it, go on with the rest
            result = {"config": config.name, "error": str(exc)[-300:]}
        print(f"    {json.dumps(result)}", file=sys.stderr, flush=True)
        results.append(result)
    print(table(results))
    if args.json:
        args.json.write_text(json.dumps({"sources": len(masks), "pairs": args.pairs, "results": results}, indent=2))


if __name__ == "__main__":
    main()
