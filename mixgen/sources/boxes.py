"""Object boxes that a source folder ships (CUB-200-2011's ``bounding_boxes.txt``), as the maps the
``boxes`` label rule weighs with. Each source's box is drawn into its own view as a coverage map
(the share of each map cell the object box covers), so SnapMix's rule on these maps gives the share
of each object that stays on the canvas and the share of the donor's object that arrives: the
object-share judge of ``benchmarks/fidelity.py`` as a label rule, with no CAM and no backbone."""

from __future__ import annotations

import hashlib
from pathlib import Path

import numpy as np
from PIL import Image

from mixgen.errors import MixgenError, UsageError
from mixgen.sources.index import SourceIndex
from mixgen.sources.views import view_box

BOXES_FILE = "bounding_boxes.txt"
# Side of the coverage maps: fine enough that a box edge blurs by under two pixels of a 91-px view
# and 7 of a 448-px one, small enough that 10,000 sources take 160 MB.
MAX_MAP_SIDE = 64
EXIF_ORIENTATION = 0x0112


def map_side(size: int) -> int:
    return min(size, MAX_MAP_SIDE)


def read_boxes(index: SourceIndex) -> tuple[dict[str, tuple[float, float, float, float]], str]:
    """{source path: (x0, y0, x1, y1)} in the stored image's pixels, and the file's SHA-256 (part of
    the run's fingerprint: new boxes make new labels). Only a CUB-layout SRC has them; a source
    without its line, or a line that is not a box, is refused naming file and line."""
    from mixgen.sources.scan import cub_table

    path = index.root / BOXES_FILE
    if index.layout != "cub" or not path.is_file():
        raise UsageError(
            f"--label-weights boxes needs object boxes: SRC {index.root} must be a CUB-200-2011 folder "
            f"with {BOXES_FILE}; use --label-weights semantic otherwise"
        )
    images = cub_table(index.root / "images.txt")
    boxes = {}
    for image_id, (value, number) in cub_table(path).items():
        parts = value.split()
        try:
            x, y, width, height = (float(part) for part in parts)
        except ValueError:
            x = y = width = height = float("nan")
        if len(parts) != 4 or not (np.isfinite([x, y, width, height]).all() and width > 0 and height > 0):
            raise MixgenError(
                f"CUB layout: {path} line {number}: {value[:60]!r} is not 'x y width height'; fix the line"
            )
        if image_id in images:
            boxes["images/" + images[image_id][0]] = (x, y, x + width, y + height)
    for item in index.items:
        if item.path not in boxes:
            raise MixgenError(f"CUB layout: {item.path} has no box in {path}; add its line")
    return boxes, boxes_file_digest(index.root)


def boxes_file_digest(src: Path) -> str | None:
    """SHA-256 of SRC's box file (None without one): what a run with box labels records."""
    path = Path(src) / BOXES_FILE
    return hashlib.sha256(path.read_bytes()).hexdigest() if path.is_file() else None


def upright_box(
    box: tuple[float, float, float, float], width: int, height: int, orientation: int
) -> tuple[tuple[float, float, float, float], int, int]:
    """The box and the image size once the image is turned upright by its EXIF orientation (as the
    views are, by ``ImageOps.exif_transpose``)."""
    x0, y0, x1, y1 = box
    turn = {
        2: lambda x, y: (width - x, y),
        3: lambda x, y: (width - x, height - y),
        4: lambda x, y: (x, height - y),
        5: lambda x, y: (y, x),
        6: lambda x, y: (height - y, x),
        7: lambda x, y: (height - y, width - x),
        8: lambda x, y: (y, width - x),
    }.get(orientation)
    if turn is None:
        return box, width, height
    (ax, ay), (bx, by) = turn(x0, y0), turn(x1, y1)
    size = (height, width) if orientation >= 5 else (width, height)
    return (min(ax, bx), min(ay, by), max(ax, bx), max(ay, by)), *size


def coverage_map(box: tuple[float, float, float, float], region: tuple[float, float, float, float], side: int):
    """(side, side) share of each cell of ``region`` (the part of the image the view shows) that
    ``box`` covers: the product of the box's overlap with each cell's row and column."""
    left, top, right, bottom = region
    edges = np.linspace(0.0, 1.0, side + 1)

    def overlap(low: float, high: float, start: float, extent: float) -> np.ndarray:
        low, high = (low - start) / extent, (high - start) / extent
        return np.clip(np.minimum(edges[1:], high) - np.maximum(edges[:-1], low), 0, None) * side

    rows = overlap(box[1], box[3], top, bottom - top)
    cols = overlap(box[0], box[2], left, right - left)
    return np.outer(rows, cols).astype(np.float32)


def box_maps(index: SourceIndex, size: int, resize: str, readable: np.ndarray) -> tuple[np.ndarray, str]:
    """(n, m, m) coverage maps of every readable source's box in its view (zeros elsewhere) and the
    boxes file's digest. Reads each image's header only (size and EXIF orientation)."""
    boxes, digest = read_boxes(index)
    side = map_side(size)
    maps = np.zeros((len(index), side, side), dtype=np.float32)
    for position in np.flatnonzero(readable):
        item = index.items[position]
        where = index.locate(item)
        try:
            with Image.open(where) as img:
                width, height = img.size
                orientation = int(img.getexif().get(EXIF_ORIENTATION, 1) or 1)
        except (OSError, ValueError, SyntaxError) as exc:
            raise MixgenError(f"{item.path}: cannot read its size for its box ({exc}); re-run") from None
        box, width, height = upright_box(boxes[item.path], width, height, orientation)
        maps[position] = coverage_map(box, view_box(width, height, resize), side)
    return maps, digest
