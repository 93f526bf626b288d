"""SnapMix (Huang et al., AAAI 2021): paste a resized box of the donor into a box of the canvas and
weight each label by the semantic share (SPM mass) of its image that the output keeps."""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F

from mixgen.methods import MixResult, box_areas, box_axis_masks, random_box

NEEDS_MAPS = True


def draw(rng: np.random.Generator, size: int, beta: float) -> dict:
    """λ_a, λ_b ~ Beta(β, β) independently; box_a from λ_a in the canvas, box_b from λ_b in the donor."""
    lam_a, lam_b = float(rng.beta(beta, beta)), float(rng.beta(beta, beta))
    return {"lam": lam_a, "box_a": random_box(rng, size, lam_a), "box_b": random_box(rng, size, lam_b)}


def paste_resized(canvas: torch.Tensor, donor: torch.Tensor, box_a: torch.Tensor, box_b: torch.Tensor) -> torch.Tensor:
    """A clone of the canvas with box_a replaced by donor's box_b, resized bilinearly
    (align_corners=True, as the official code) to box_a's size. Empty boxes paste nothing."""
    images = canvas.clone()
    for i, ((ax0, ay0, ax1, ay1), (bx0, by0, bx1, by1)) in enumerate(zip(box_a.tolist(), box_b.tolist(), strict=True)):
        if ax1 <= ax0 or ay1 <= ay0 or bx1 <= bx0 or by1 <= by0:
            continue
        # A contiguous NCHW crop: bilinear resizing of a strided (channels-last view) crop is 3-4×
        # slower on CPU, for bit-identical results.
        crop = donor[i : i + 1, :, by0:by1, bx0:bx1].contiguous().float()
        resized = F.interpolate(crop, size=(ay1 - ay0, ax1 - ax0), mode="bilinear", align_corners=True)
        images[i, :, ay0:ay1, ax0:ax1] = resized[0].round_().clamp_(0, 255).to(torch.uint8)
    return images


def spm_mass(spm: torch.Tensor, valid: torch.Tensor, boxes: torch.Tensor) -> torch.Tensor:
    """Σ of a dense (B, S, S) SPM inside each box (NaN where the SPM is invalid, i.e. the CAM was
    constant); a row mask · SPM · column mask product, so no (B, S, S) box mask is built."""
    rows, cols = box_axis_masks(boxes, spm.shape[-1], spm.dtype)
    mass = torch.einsum("bi,bij,bj->b", rows, spm, cols)
    return torch.where(valid, mass, torch.full_like(mass, float("nan")))


def mix(
    canvas: torch.Tensor,
    donor: torch.Tensor,
    mass_a: torch.Tensor,
    mass_b: torch.Tensor,
    box_a: torch.Tensor,
    box_b: torch.Tensor,
    same_label: torch.Tensor,
) -> MixResult:
    """ρ_a = 1 − Σ_{box_a} S(a), ρ_b = Σ_{box_b} S(b), from the SPM masses of the boxes (NaN where
    the CAM is constant: area weights then); (1, 0) and no paste where a box is empty; ρ_a + ρ_b
    on both when the labels agree. ``spm_mass`` or ``mixgen.cams.spm_box_mass`` give the masses."""
    size = canvas.shape[-1]
    area_a, area_b = box_areas(box_a), box_areas(box_b)
    mixed = (area_a > 0) & (area_b > 0)
    area_share = area_a.float() / float(size * size)
    rho_a = 1 - mass_a.float()
    rho_b = mass_b.float()
    rho_a = torch.where(torch.isnan(rho_a), 1 - area_share, rho_a)
    rho_b = torch.where(torch.isnan(rho_b), area_share, rho_b)
    rho_a, rho_b = (
        torch.where(same_label, rho_a + rho_b, rho_a),
        torch.where(same_label, rho_a + rho_b, rho_b),
    )
    rho_a = torch.where(mixed, rho_a, torch.ones_like(rho_a))
    rho_b = torch.where(mixed, rho_b, torch.zeros_like(rho_b))
    pasted = paste_resized(canvas, donor, torch.where(mixed[:, None], box_a, 0), box_b)
    return MixResult(
        images=pasted,
        weight_a=rho_a.float(),
        weight_b=rho_b.float(),
        area_ratio=torch.where(mixed, area_share, torch.zeros_like(area_share)).float(),
        box_a=box_a,
        box_b=box_b,
        has_box=mixed,
    )
