"""Maps made visible: a colormap, an overlay of a map on its view, and the SPM (the normalised,
upsampled CAM SnapMix weighs with) as ``mixgen cam``, ``preview`` and the methods' previews show it."""

from __future__ import annotations

import numpy as np
from PIL import Image

# Anchors of a perceptually ordered blue → cyan → yellow → red map (close to matplotlib's turbo).
_ANCHORS = np.array(
    [[48, 18, 59], [65, 105, 225], [30, 190, 220], [70, 245, 120], [200, 240, 50], [250, 150, 30], [122, 4, 3]],
    dtype=np.float64,
)
_LUT = np.stack(
    [np.interp(np.linspace(0, 1, 256), np.linspace(0, 1, len(_ANCHORS)), _ANCHORS[:, c]) for c in range(3)], axis=1
).astype(np.uint8)


def colorize(heat: np.ndarray) -> np.ndarray:
    """(H, W) map of any scale -> (H, W, 3) uint8 colours, min to max stretched over the colormap."""
    heat = np.asarray(heat, dtype=np.float64)
    low, high = float(heat.min()), float(heat.max())
    scaled = (heat - low) / (high - low) if high > low else np.zeros_like(heat)
    return _LUT[np.clip(np.rint(scaled * 255), 0, 255).astype(np.uint8)]


def overlay(view: np.ndarray, heat: np.ndarray, alpha: float = 0.5) -> np.ndarray:
    """The view blended with the colorized map; the map is resized to the view first."""
    height, width = view.shape[:2]
    colors = colorize(heat)
    if colors.shape[:2] != (height, width):
        colors = np.asarray(Image.fromarray(colors).resize((width, height), Image.Resampling.BILINEAR))
    blended = (1 - alpha) * view.astype(np.float32) + alpha * colors.astype(np.float32)
    return np.clip(np.rint(blended), 0, 255).astype(np.uint8)


def spm_maps(cams: np.ndarray, size: int) -> np.ndarray:
    """(B, h, w) CAMs -> (B, S, S) float32 SPMs summing to 1 (uniform where a CAM is constant)."""
    import torch

    from mixgen.cam.cams import spm

    maps, valid = spm(torch.from_numpy(np.array(cams, dtype=np.float32)), size)
    maps = maps.numpy()
    maps[~valid.numpy()] = 1.0 / (size * size)
    return maps.astype(np.float32)
