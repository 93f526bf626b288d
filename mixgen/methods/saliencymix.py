"""SaliencyMix (Uddin et al., ICLR 2021): a CutMix box, side int(S·sqrt(1−λ)) with λ ~ Beta(1, 1),
centred on the donor's most salient pixel and pasted at the same place in the canvas; weights are
the pasted area shares. Saliency: spectral residual (Hou & Zhang 2007, as OpenCV's
``StaticSaliencySpectralResidual`` computes it) or the donor's SPM."""

from __future__ import annotations

import functools
from collections.abc import Mapping
from typing import Any

import numpy as np

from mixgen.methods import (
    F,
    Method,
    MixResult,
    Option,
    Preview,
    SourceData,
    SourceInput,
    box_around,
    box_side,
    cutmix,
    torch,
)

RESIDUAL_SIDE = 64  # OpenCV's resImWidth/resImHeight
CHUNK = 64  # views read at a time when deriving the saliency peaks


def draw(rng: np.random.Generator, size: int, options: Mapping[str, Any]) -> dict:
    beta = options["beta"]
    return {"lam": float(rng.beta(beta, beta))}


def _gray(views: np.ndarray) -> np.ndarray:
    """RGB uint8 -> OpenCV's 8-bit luma (fixed-point 0.299 R + 0.587 G + 0.114 B, rounded)."""
    rgb = views.astype(np.int32)
    return ((rgb[..., 0] * 4899 + rgb[..., 1] * 9617 + rgb[..., 2] * 1868 + 8192) >> 14).astype(np.float64)


def _resize(images: np.ndarray, side: int) -> np.ndarray:
    """Bilinear resize with half-pixel centres and no antialiasing (OpenCV's INTER_LINEAR)."""
    tensor = torch.from_numpy(np.ascontiguousarray(images, dtype=np.float64))[:, None]
    return F.interpolate(tensor, size=(side, side), mode="bilinear", align_corners=False)[:, 0].numpy()


def _reflect_filter(images: np.ndarray, kernel: np.ndarray) -> np.ndarray:
    """Separable filtering of (B, H, W) with OpenCV's BORDER_REFLECT_101 border."""
    pad = len(kernel) // 2
    padded = np.pad(images, ((0, 0), (pad, pad), (pad, pad)), mode="reflect")
    rows = sum(kernel[i] * padded[:, i : i + images.shape[1], :] for i in range(len(kernel)))
    return sum(kernel[i] * rows[:, :, i : i + images.shape[2]] for i in range(len(kernel)))


@functools.lru_cache(maxsize=1)
def _gaussian_5x5_sigma8() -> np.ndarray:
    taps = np.exp(-((np.arange(5) - 2.0) ** 2) / (2 * 8.0**2))
    return taps / taps.sum()


def spectral_residual(views: np.ndarray) -> np.ndarray:
    """(B, S, S, 3) uint8 views -> (B, S, S) saliency in [0, 1], step by step as OpenCV: grey, 64×64,
    DFT, log(|F| + 1) minus its 3×3 mean, back with the original phase, |inverse DFT|,
    Gaussian-blurred (5×5, σ 8), squared, divided by its maximum, resized to S×S."""
    size = views.shape[1]
    small = np.rint(_resize(_gray(views), RESIDUAL_SIDE))
    spectrum = np.fft.fft2(small)
    log_amplitude = np.log(np.abs(spectrum) + 1.0)
    residual = log_amplitude - _reflect_filter(log_amplitude, np.full(3, 1.0 / 3.0))
    back = np.abs(np.fft.ifft2(np.exp(residual) * np.exp(1j * np.angle(spectrum))))
    saliency = _reflect_filter(back, _gaussian_5x5_sigma8()) ** 2
    saliency /= np.maximum(saliency.max(axis=(1, 2), keepdims=True), 1e-300)
    return _resize(saliency, size).astype(np.float32)


def peaks(maps: np.ndarray) -> np.ndarray:
    """(B, S, S) maps -> (B, 2) (y, x) of each maximum after quantising to 8 bits as the official
    code does (``(map * 255).astype(uint8)``), ties to the first pixel in row-major order."""
    size = maps.shape[-1]
    quantised = (np.clip(maps, 0.0, 1.0) * 255).astype(np.uint8).reshape(len(maps), -1)
    flat = quantised.argmax(axis=1)
    return np.stack([flat // size, flat % size], axis=1).astype(np.int64)


def saliency_peaks(sources: SourceData, options: Mapping[str, Any]) -> np.ndarray:
    """Each source's most salient pixel (y, x) in its view, once per source. With ``cam`` the map is
    the SPM; a constant CAM (no peak) gives the centre."""
    size, count = sources.size, len(sources.readable)
    result = np.full((count, 2), size // 2, dtype=np.int64)
    positions = np.flatnonzero(sources.readable)
    for start in range(0, len(positions), CHUNK):
        chunk = positions[start : start + CHUNK]
        if options["saliency"] == "cam":
            from mixgen.cam.cams import spm

            maps, valid = spm(torch.from_numpy(sources.maps[chunk]), size)
            scaled = maps / maps.amax(dim=(1, 2), keepdim=True).clamp(min=1e-30)
            found = peaks(scaled.numpy())
            result[chunk[valid.numpy()]] = found[valid.numpy()]
        else:
            result[chunk] = peaks(spectral_residual(sources.views.read(chunk)))
    return result


def mix(canvas: Any, donor: Any, lam: Any, peak_b: Any) -> MixResult:
    """Box of side int(S·sqrt(1−λ)) centred on the donor's peak, clipped, pasted in place;
    weight_b = pasted area / S² (area-corrected as in CutMix)."""
    size = canvas.shape[-1]
    boxes = [
        box_around(int(x), int(y), box_side(size, float(lam_i)), size)
        for lam_i, (y, x) in zip(lam.tolist(), peak_b.tolist(), strict=True)
    ]
    return cutmix.mix(canvas, donor, torch.tensor(boxes, dtype=torch.int64, device=canvas.device))


METHOD = Method(
    name="saliencymix",
    help="SaliencyMix: a CutMix box centred on the donor's saliency peak, pasted in place; area weights "
    "(Uddin et al. 2021).",
    paper="Uddin, Monira, Shin, Chung, Bae: SaliencyMix: A Saliency Guided Data Augmentation Strategy, ICLR 2021",
    draw=draw,
    mix=lambda batch: mix(batch.canvas, batch.donor, batch.param("lam"), batch.inputs_b["peak"]),
    options=(
        Option("beta", float, 1.0, "β of the Beta(β, β) draw of λ (box side int(S·sqrt(1−λ))).", above=0.0),
        Option(
            "saliency",
            str,
            "spectral",
            "Saliency map: spectral (spectral residual, Hou & Zhang 2007) or cam (the donor's SPM).",
            choices=("spectral", "cam"),
        ),
    ),
    inputs={"peak": SourceInput(saliency_peaks, uses_maps=lambda options: options["saliency"] == "cam")},
    preview=Preview(
        titles=("saliency a", "saliency b, box"),
        heat=lambda views, cams, config: _preview_heats(views, cams, config),
    ),
)


def _preview_heats(views: dict[str, np.ndarray], cams: dict[str, np.ndarray], config: Mapping[str, Any]) -> dict:
    """The maps the peaks came from: spectral residual of the views, or the SPMs."""
    if config["saliency"] == "cam":
        from mixgen.cam.heatmaps import spm_maps

        paths = list(cams)
        return (
            dict(zip(paths, spm_maps(np.stack([cams[p] for p in paths]), config["size"]), strict=True)) if paths else {}
        )
    paths = list(views)
    return dict(zip(paths, spectral_residual(np.stack([views[p] for p in paths])), strict=True)) if paths else {}
