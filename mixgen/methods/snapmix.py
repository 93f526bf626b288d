"""SnapMix (Huang et al., AAAI 2021): paste a resized box of the donor into a box of the canvas and
weight each label by the semantic share (SPM mass) of its image that the output keeps."""

from __future__ import annotations

from typing import Any

import numpy as np

from mixgen.cam.geometry import box_axis_masks
from mixgen.methods import F, Method, MixResult, Preview, beta_option, box_areas, random_box, torch
from mixgen.methods.labels import snapmix_rule


def draw(rng: np.random.Generator, size: int, options: dict) -> dict:
    """λ_a, λ_b ~ Beta(β, β) independently; box_a from λ_a in the canvas, box_b from λ_b in the donor."""
    beta = options["beta"]
    lam_a, lam_b = float(rng.beta(beta, beta)), float(rng.beta(beta, beta))
    return {"lam": lam_a, "box_a": random_box(rng, size, lam_a), "box_b": random_box(rng, size, lam_b)}


def paste_resized(canvas: Any, donor: Any, box_a: Any, box_b: Any) -> Any:
    """A clone of the canvas with box_a replaced by donor's box_b, resized bilinearly
    (align_corners=True, as the official code) to box_a's size. Empty boxes paste nothing."""
    images = canvas.clone()
    for i, ((ax0, ay0, ax1, ay1), (bx0, by0, bx1, by1)) in enumerate(zip(box_a.tolist(), box_b.tolist(), strict=True)):
        if ax1 <= ax0 or ay1 <= ay0 or bx1 <= bx0 or by1 <= by0:
            continue
        # A contiguous NCHW float crop, converted in one copy: bilinear resizing of a strided
        # (channels-last view) crop is 3-4× slower on CPU, for bit-identical results.
        crop = torch.empty((1, 3, by1 - by0, bx1 - bx0), device=donor.device)
        crop.copy_(donor[i : i + 1, :, by0:by1, bx0:bx1])
        resized = F.interpolate(crop, size=(ay1 - ay0, ax1 - ax0), mode="bilinear", align_corners=True)
        # Bilinear weights are convex, so the rounded values are already 0-255: converted to
        # uint8 straight into the canvas, with no clamp and no intermediate tensor.
        images[i, :, ay0:ay1, ax0:ax1].copy_(resized[0].round_())
    return images


def spm_mass(spm: Any, valid: Any, boxes: Any) -> Any:
    """Σ of a dense (B, S, S) SPM inside each box (NaN where the SPM is invalid, i.e. the CAM was
    constant); a row mask · SPM · column mask product, so no (B, S, S) box mask is built."""
    rows, cols = box_axis_masks(boxes, spm.shape[-1], spm.dtype)
    mass = torch.einsum("bi,bij,bj->b", rows, spm, cols)
    return torch.where(valid, mass, torch.full_like(mass, float("nan")))


def mix(canvas: Any, donor: Any, mass_a: Any, mass_b: Any, box_a: Any, box_b: Any, same_label: Any) -> MixResult:
    """ρ_a = 1 − Σ_{box_a} S(a), ρ_b = Σ_{box_b} S(b), from the SPM masses of the boxes (NaN where
    the CAM is constant: area weights then); (1, 0) and no paste where a box is empty; ρ_a + ρ_b
    on both when the labels agree. ``spm_mass`` or ``mixgen.cam.cams.spm_box_mass`` give the masses."""
    size = canvas.shape[-1]
    area_a, area_b = box_areas(box_a), box_areas(box_b)
    mixed = (area_a > 0) & (area_b > 0)
    area_share = area_a.float() / float(size * size)
    rho_a, rho_b = snapmix_rule(mass_a, mass_b, area_share, mixed, same_label)
    pasted = paste_resized(canvas, donor, torch.where(mixed[:, None], box_a, 0), box_b)
    return MixResult(
        images=pasted,
        weight_a=rho_a,
        weight_b=rho_b,
        area_ratio=torch.where(mixed, area_share, torch.zeros_like(area_share)).float(),
        box_a=box_a,
        box_b=box_b,
        has_box=mixed,
        mixed=mixed,
    )


def mix_batch(batch) -> MixResult:
    from mixgen.cam.cams import spm_box_mass

    box_a, box_b = batch.param("box_a"), batch.param("box_b")
    mass_a = spm_box_mass(batch.maps_a, box_a, batch.size)
    mass_b = spm_box_mass(batch.maps_b, box_b, batch.size)
    return mix(batch.canvas, batch.donor, mass_a, mass_b, box_a, box_b, batch.same_label)


METHOD = Method(
    name="snapmix",
    help="SnapMix: paste a resized box of the donor; label weights from CAM semantic mass (Huang et al. 2021).",
    paper="Huang, Wang, Tao: SnapMix: Semantically Proportional Mixing for Augmenting Fine-grained Data, AAAI 2021",
    draw=draw,
    mix=mix_batch,
    options=(beta_option(5.0, "β of the two independent Beta(β, β) draws of λ (one box each)."),),
    default_size=448,
    default_cam="probe",
    label_weights=("semantic", "boxes", "teacher"),
    preview=Preview(titles=("SPM a, box_a", "SPM b, box_b"), heat="spm"),
)
