"""Encoding: mixed images to their file bytes, on the CPU encoder threads (Pillow releases the
GIL while encoding) or, for ``--codec cuda``, with nvJPEG on the one main thread."""

from __future__ import annotations

import io
from typing import TYPE_CHECKING

import numpy as np
from PIL import Image

if TYPE_CHECKING:
    from mixgen.config import RunConfig


def encode(image: np.ndarray, fmt: str, quality: int) -> bytes:
    """Encode an H×W×3 uint8 array. PNG and WebP use fast settings, never their slow defaults."""
    pil = Image.fromarray(image)
    buffer = io.BytesIO()
    if fmt == "jpg":
        pil.save(buffer, "JPEG", quality=quality, subsampling=0 if quality >= 90 else 2)
    elif fmt == "png":
        pil.save(buffer, "PNG", compress_level=1)
    elif fmt == "webp":
        pil.save(buffer, "WEBP", quality=quality, method=2)
    else:
        raise ValueError(f"unknown format {fmt!r}")
    return buffer.getvalue()


def encode_jpeg_cuda(images, quality: int) -> list[bytes]:
    """Encode a (B, 3, S, S) uint8 CUDA batch with nvJPEG (torchvision); one call per batch."""
    from torchvision.io import encode_jpeg

    encoded = encode_jpeg(list(images), quality=quality)
    return [e.cpu().numpy().tobytes() for e in encoded]


def to_encode(images, cfg: RunConfig) -> list[bytes] | np.ndarray:
    """JPEG bytes from nvJPEG, called here on the one main thread (torchvision's CUDA codec is not
    thread-safe), or H×W×3 arrays for the CPU encoder threads."""
    if cfg.codec == "cuda":
        return encode_jpeg_cuda(images, cfg.quality)
    return images.permute(0, 2, 3, 1).contiguous().cpu().numpy()


def encode_output(image: np.ndarray | bytes, fmt: str, quality: int) -> bytes:
    """One output's file bytes: ``image`` as ``to_encode`` left it (already bytes from nvJPEG)."""
    return image if isinstance(image, bytes) else encode(image, fmt, quality)
