"""Reading sources: decoding any supported file (or bytes inside an index file) into a
deterministic S×S RGB view. Pillow releases the GIL while decoding and resizing, so these
functions are meant to run in a thread pool. Outputs are encoded in ``mixgen.pipeline.encode``."""

from __future__ import annotations

import io
import math
import re
import warnings
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError

from mixgen.errors import DecodeError, exc_line

if TYPE_CHECKING:
    from mixgen.sources.index import Source, SourceIndex

# Larger images are refused as decompression bombs (a 100k×100k PNG header, say).
MAX_PIXELS = 16_384 * 16_384

Image.MAX_IMAGE_PIXELS = MAX_PIXELS
# Images between MAX_PIXELS and twice that only warn in Pillow; decode() refuses them itself.
warnings.filterwarnings("ignore", category=Image.DecompressionBombWarning)


def _to_rgb(img: Image.Image) -> Image.Image:
    """8-bit RGB from any mode: 16-bit scaled down, alpha composited on white, CMYK/palette converted."""
    if img.mode.startswith("I;16") or img.mode in ("I", "F"):
        values = np.asarray(img, dtype=np.float64)
        peak = values.max(initial=0)
        # I;16 is 16-bit by definition (a dark 16-bit image must not come out 257× too bright);
        # plain I may hold 8- or 16-bit data; F is commonly 0..1.
        if img.mode.startswith("I;16") or (img.mode == "I" and peak > 255):
            values = values / 257.0
        elif img.mode == "F" and peak <= 1.0:
            values = values * 255.0
        return Image.fromarray(np.clip(np.rint(values), 0, 255).astype(np.uint8)).convert("RGB")
    if img.mode in ("RGBA", "LA", "PA") or (img.mode == "P" and "transparency" in img.info):
        rgba = img.convert("RGBA")
        white = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        return Image.alpha_composite(white, rgba).convert("RGB")
    return img.convert("RGB") if img.mode != "RGB" else img


def decode(path: Path, min_side: int = 0, data: bytes | None = None) -> Image.Image:
    """Open an image as upright 8-bit RGB, from its file or from ``data`` (``path`` then only names
    it in errors). ``min_side`` lets JPEG decode at a reduced DCT scale while keeping the shorter
    side at least that long (the view's size)."""
    try:
        if data is not None and not data:
            raise DecodeError(f"{path}: no image bytes")
        with Image.open(path if data is None else io.BytesIO(data)) as img:
            width, height = img.size
            if width * height > MAX_PIXELS:
                raise DecodeError(f"{path}: {width}×{height} exceeds {MAX_PIXELS} pixels (decompression bomb)")
            if min_side and img.format == "JPEG" and img.mode in ("RGB", "L"):
                scale = min_side / min(width, height)
                img.draft("RGB", (math.ceil(width * scale), math.ceil(height * scale)))
            img.seek(0)
            img.load()
            upright = ImageOps.exif_transpose(img)
            return _to_rgb(upright)
    except DecodeError:
        raise
    except Image.DecompressionBombError as exc:
        raise DecodeError(f"{path}: {exc} (decompression bomb)") from None
    except Exception as exc:  # noqa: BLE001 - a hostile file may raise anything inside a decoder
        if isinstance(exc, OSError) and exc.strerror:
            reason = exc.strerror  # without the path, which the message starts with anyway
        else:
            reason = (str(exc) or type(exc).__name__).replace(f" {str(path)!r}", "").replace(str(path), "the file")
            reason = re.sub(r" ?<_io\.BytesIO object at 0x[0-9a-f]+>", "", reason)
        if isinstance(exc, UnidentifiedImageError) or not reason.strip():
            reason = f"not a readable image ({reason})"
        raise DecodeError(f"{path}: {reason}") from None


def view_box(width: int, height: int, resize: str = "crop") -> tuple[float, float, float, float]:
    """The region of a width × height image that becomes the view: its centre square (crop) or
    all of it (squash)."""
    if resize == "crop":
        side = min(width, height)
        return ((width - side) / 2, (height - side) / 2, (width + side) / 2, (height + side) / 2)
    return (0, 0, width, height)


def make_view(img: Image.Image, size: int, resize: str = "crop") -> np.ndarray:
    """The S×S view: centre square (crop) or whole image (squash), resampled in one step."""
    box = view_box(*img.size, resize)
    view = img.resize((size, size), Image.Resampling.BILINEAR, box=box, reducing_gap=None)
    return np.array(view, dtype=np.uint8)


def load_view(path: Path, size: int, resize: str = "crop") -> np.ndarray:
    return make_view(decode(path, min_side=size), size, resize)


def open_source_image(index: SourceIndex, item: Source, min_side: int = 0) -> Image.Image:
    """Decode one source wherever its pixels are: a file, or bytes inside the index file (a Hugging
    Face Parquet). Every reader of sources goes through here."""
    try:
        where = index.locate(item)
    except Exception as exc:  # noqa: BLE001 - a damaged Parquet may raise anything
        reason = exc_line(exc, 120)
        raise DecodeError(f"{item.path}: image bytes unreadable ({reason})") from None
    if isinstance(where, bytes):
        return decode(Path(item.path), min_side, data=where)
    return decode(where, min_side)


def load_source_view(index: SourceIndex, item: Source, size: int, resize: str = "crop") -> np.ndarray:
    """The S×S view of one source of ``index``."""
    return make_view(open_source_image(index, item, min_side=size), size, resize)


class DecodedViews:
    """The views of a run with no view cache (where they fit on no disk): each one decoded from SRC
    when it is read, the same bytes a cached view holds (decoding is deterministic). ``write`` keeps a
    view in memory until ``forget`` (the source stage's slice, which the backbone reads back); the
    interface is the view cache's (``output.cache.RecordFile``) as far as the pipeline uses it."""

    def __init__(self, index: SourceIndex, size: int, resize: str) -> None:
        import zlib

        self.index, self.size, self.resize = index, size, resize
        self.count, self.shape, self.dtype = len(index), (size, size, 3), np.dtype(np.uint8)
        self.kept: dict[int, np.ndarray] = {}
        self.digests = np.full(self.count, zlib.crc32(bytes(size * size * 3)), dtype=np.uint32)

    def write(self, position: int, record: np.ndarray) -> None:
        import zlib

        self.kept[position] = record
        self.digests[position] = zlib.crc32(memoryview(np.ascontiguousarray(record)).cast("B"))

    def read(self, positions) -> np.ndarray:
        out = np.empty((len(positions), *self.shape), dtype=self.dtype)
        for row, position in enumerate(positions):
            kept = self.kept.get(int(position))
            if kept is None:
                kept = load_source_view(self.index, self.index.items[int(position)], self.size, self.resize)
            out[row] = kept
        return out

    def forget(self) -> None:
        self.kept.clear()

    def sync(self) -> None:
        """Nothing to put on disk."""

    def close(self) -> None:
        self.kept.clear()
