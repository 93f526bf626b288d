"""SnapMix (Huang et al., AAAI 2021): paste a resized box of the donor into a box of the canvas and
weight each label by the semantic share (SPM mass) of its image that the output keeps."""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F

from mixgen.methods import MixResult, box_areas, box_masks, random_box

NEEDS_MAPS = True


def draw(rng: np.random.Generator, size: int, beta: float) -> dict:
    """λ_a, λ_b ~ Beta(β, β) independently; box_a from λ_a in the canvas, box_b from λ_b in the donor."""
    lam_a, lam_b = float(rng.beta(beta, beta)), float(rng.beta(beta, beta))
    return {"lam": lam_a, "box_a": random_box(rng, size, lam_a), "box_b": random_box(rng, size, lam_b)}


def paste_resized(canvas: torch.Tensor, donor: torch.Tensor, box_a: torch.Tensor, box_b: torch.Tensor) -> torch.Tensor:
    """Canvas with box_a replaced by donor's box_b, bilinearly resized (align_corners=True) to
    box_a's size. One grid_sample call does every output of the batch, whatever its box sizes."""
    batch, _, size, _ = canvas.shape
    coords = torch.arange(size, device=canvas.device, dtype=torch.float32)

    def source_coords(a0, a1, b0, b1):
        len_a, len_b = (a1 - a0).float(), (b1 - b0).float()
        scale = torch.where(len_a > 1, (len_b - 1) / (len_a - 1).clamp(min=1), torch.zeros_like(len_a))
        src = b0.float()[:, None] + (coords[None, :] - a0.float()[:, None]) * scale[:, None]
        return src / max(size - 1, 1) * 2 - 1

    gx = source_coords(box_a[:, 0], box_a[:, 2], box_b[:, 0], box_b[:, 2])  # (B, S) over columns
    gy = source_coords(box_a[:, 1], box_a[:, 3], box_b[:, 1], box_b[:, 3])  # (B, S) over rows
    grid = torch.stack(torch.broadcast_tensors(gx[:, None, :], gy[:, :, None]), dim=-1)
    sampled = F.grid_sample(donor.float(), grid, mode="bilinear", padding_mode="border", align_corners=True)
    sampled = sampled.round().clamp(0, 255).to(torch.uint8)
    mask = box_masks(box_a, size)[:, None]
    return torch.where(mask.expand(batch, canvas.shape[1], size, size), sampled, canvas)


def spm_mass(spm: torch.Tensor, valid: torch.Tensor, boxes: torch.Tensor) -> torch.Tensor:
    """Σ of the SPM inside each box (NaN where the SPM is invalid, i.e. the CAM was constant)."""
    mass = (spm * box_masks(boxes, spm.shape[-1])).sum(dim=(1, 2))
    return torch.where(valid, mass, torch.full_like(mass, float("nan")))


def mix(
    canvas: torch.Tensor,
    donor: torch.Tensor,
    spm_a: torch.Tensor,
    spm_b: torch.Tensor,
    valid_a: torch.Tensor,
    valid_b: torch.Tensor,
    box_a: torch.Tensor,
    box_b: torch.Tensor,
    same_label: torch.Tensor,
) -> MixResult:
    """ρ_a = 1 − Σ_{box_a} S(a), ρ_b = Σ_{box_b} S(b); area weights where an SPM is constant;
    (1, 0) and no paste where a box is empty; ρ_a + ρ_b on both when the labels agree."""
    size = canvas.shape[-1]
    area_a, area_b = box_areas(box_a), box_areas(box_b)
    mixed = (area_a > 0) & (area_b > 0)
    area_share = area_a.float() / float(size * size)
    rho_a = 1 - spm_mass(spm_a, valid_a, box_a)
    rho_b = spm_mass(spm_b, valid_b, box_b)
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
