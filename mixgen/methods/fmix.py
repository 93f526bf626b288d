"""FMix (Harris et al. 2020, arXiv:2002.12047): a binary mask from a low-frequency grey image —
Fourier-space Gaussian noise scaled by 1/f^δ, inverse FFT, real part — that keeps the top
⌊λS²⌋ pixels of the canvas and takes the rest from the donor at the same place; weights are the
pixel shares."""

from __future__ import annotations

import functools
from collections.abc import Mapping
from typing import Any

import numpy as np

from mixgen.methods import UNUSED_MAPS_PREVIEW, Method, MixResult, Option, beta_option, torch


def draw(rng: np.random.Generator, size: int, options: Mapping[str, Any]) -> dict:
    """λ ~ Beta(α, α) and the seed of this output's Fourier noise (drawn in ``mix``, on the pool)."""
    alpha = options["beta"]
    return {"lam": float(rng.beta(alpha, alpha)), "noise_seed": int(rng.integers(2**63 - 1))}


@functools.lru_cache(maxsize=8)
def spectrum_scale(size: int, decay: float) -> np.ndarray:
    """1 / max(f, 1/S)^δ over the rfft frequency grid (S, S//2 + 1), as the official fftfreqnd/get_spectrum."""
    fy = np.fft.fftfreq(size)[:, None]
    fx = np.fft.fftfreq(size)[: size // 2 + 1]
    freqs = np.sqrt(fx * fx + fy * fy)
    return 1.0 / np.maximum(freqs, 1.0 / size) ** decay


def low_frequency_image(size: int, decay: float, noise_seed: int) -> np.ndarray:
    """The (S, S) grey image: real part of the inverse FFT of scaled complex Gaussian noise."""
    noise = np.random.default_rng(noise_seed).standard_normal((size, size // 2 + 1, 2))
    spectrum = spectrum_scale(size, decay) * (noise[..., 0] + 1j * noise[..., 1])
    return np.fft.irfft2(spectrum, s=(size, size))


def donor_mask(grey: np.ndarray, lam: float) -> np.ndarray:
    """True where the donor shows: every pixel but the ⌊λS²⌋ brightest of ``grey`` (which keep the canvas)."""
    flat = grey.ravel()
    keep = int(np.floor(lam * flat.size))
    mask = np.ones(flat.size, dtype=bool)
    if keep >= flat.size:
        mask[:] = False
    elif keep > 0:
        mask[np.argpartition(-flat, keep - 1)[:keep]] = False
    return mask.reshape(grey.shape)


def mix(canvas: Any, donor: Any, masks: Any, lam: Any) -> MixResult:
    """Pixels where ``masks`` is True from the donor, the rest from the canvas; weight_a is the
    canvas pixel share, weight_b = 1 − weight_a."""
    size = canvas.shape[-1]
    images = torch.where(masks[:, None], donor, canvas)
    share_b = masks.flatten(1).sum(dim=1).float() / float(size * size)
    return MixResult(
        images=images,
        weight_a=1 - share_b,
        weight_b=share_b,
        area_ratio=share_b,
        mask=masks,
        lam=lam.float(),
    )


def mix_batch(batch) -> MixResult:
    size, decay = batch.size, batch.options["decay"]
    masks = np.stack([donor_mask(low_frequency_image(size, decay, p["noise_seed"]), p["lam"]) for p in batch.params])
    return mix(batch.canvas, batch.donor, torch.from_numpy(masks).to(batch.canvas.device), batch.param("lam"))


METHOD = Method(
    name="fmix",
    help="FMix: a low-frequency Fourier mask keeps ⌊λS²⌋ canvas pixels, the donor fills the rest (Harris et al. 2020).",
    paper="Harris, Marcu, Painter, Niranjan, Prügel-Bennett, Hare: FMix: Enhancing Mixed Sample Data Augmentation, "
    "arXiv:2002.12047",
    draw=draw,
    mix=mix_batch,
    options=(
        beta_option(1.0, "α of the paper: λ ~ Beta(α, α), the share of canvas pixels kept."),
        Option("decay", float, 3.0, "Decay power δ of the 1/f^δ spectrum (larger: smoother masks).", above=0.0),
    ),
    preview=UNUSED_MAPS_PREVIEW,
)
