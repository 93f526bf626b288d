"""Label weights from a mix's own geometry, or from a classifier looking at it. ``semantic`` is
SnapMix's rule generalised to any mask (docs/methods.md, "Semantic label weights"): ρ_a = 1 − Σ
S(a)·M_a over the canvas pixels replaced, ρ_b = Σ S(b)·M_b over the donor pixels that appear, with
SnapMix's same-label sum and its area fallback for a constant CAM. ``teacher`` is the posterior of
each label on the mixed image itself (``teacher_rule``). The ``area`` rule is each method's own
(its paper's) weights."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from mixgen.methods import MAP_RULES, TEACHER, Batch, MixResult, cell_boxes, torch


def snapmix_rule(mass_a: Any, mass_b: Any, area_share: Any, mixed: Any, same_label: Any) -> tuple[Any, Any]:
    """(ρ_a, ρ_b) from the SPM masses of the replaced canvas region and the arriving donor region
    (NaN where the CAM is constant: the area share then), (1, 0) where nothing was mixed, ρ_a + ρ_b
    on both where the labels agree (the official code's rule). A mass is a share of one SPM: clamped
    to [0, 1] against rounding, so no weight is ever written below 0 or above 1."""
    rho_a = 1 - mass_a.float().clamp(0, 1)
    rho_b = mass_b.float().clamp(0, 1)
    rho_a = torch.where(torch.isnan(rho_a), 1 - area_share, rho_a)
    rho_b = torch.where(torch.isnan(rho_b), area_share, rho_b)
    rho_a, rho_b = (
        torch.where(same_label, rho_a + rho_b, rho_a),
        torch.where(same_label, rho_a + rho_b, rho_b),
    )
    rho_a = torch.where(mixed, rho_a, torch.ones_like(rho_a))
    rho_b = torch.where(mixed, rho_b, torch.zeros_like(rho_b))
    return rho_a.float(), rho_b.float()


def region_masses(result: MixResult, batch: Batch) -> tuple[Any, Any]:
    """Σ S(a) over the replaced canvas pixels and Σ S(b) over the donor pixels that appear (NaN
    where a CAM is constant), for boxes, grid cells or a pixel mask."""
    from mixgen.cam.cams import spm, spm_box_mass

    size = batch.size
    if batch.maps_a is None or batch.maps_b is None:
        raise ValueError("semantic label weights need the sources' CAM maps")
    if result.mask is not None:
        masses = []
        for maps in (batch.maps_a, batch.maps_b):
            dense, valid = spm(maps, size)
            mass = (dense * result.mask.to(dense.dtype)).sum(dim=(1, 2))
            masses.append(torch.where(valid, mass, torch.full_like(mass, float("nan"))))
        return masses[0], masses[1]
    if result.cells is not None:
        boxes = cell_boxes(result.cells, result.grid, size)
        count, per_row = boxes.shape[:2]
        flat = boxes.reshape(-1, 4)
        # Summed unrounded, rounded once (in snapmix_rule): float32 cell masses summed over the
        # whole grid came to 1 ± 1.2e-07, and all-donor outputs had weight_a = -1.19e-07.
        masses = [
            spm_box_mass(maps.repeat_interleave(per_row, dim=0), flat, size, torch.float64).view(count, per_row)
            for maps in (batch.maps_a, batch.maps_b)
        ]
        return masses[0].sum(dim=1), masses[1].sum(dim=1)
    if result.box_a is None or result.box_b is None:
        raise ValueError("a mix without boxes, cells or mask has no region for semantic weights")
    return spm_box_mass(batch.maps_a, result.box_a, size), spm_box_mass(batch.maps_b, result.box_b, size)


def mixed_rows(result: MixResult) -> Any:
    return result.mixed if result.mixed is not None else result.area_ratio > 0


def semantic_weights(result: MixResult, batch: Batch) -> tuple[Any, Any]:
    """SnapMix's weights on the method's own mask; a pixel blend keeps its own (ρ = λ, 1 − λ)."""
    if result.blend:
        return result.weight_a, result.weight_b
    mass_a, mass_b = region_masses(result, batch)
    return snapmix_rule(mass_a, mass_b, result.area_ratio, mixed_rows(result), batch.same_label)


def teacher_rule(posterior: Any, label_a: Any, label_b: Any, mixed: Any, same_label: Any) -> tuple[Any, Any]:
    """(ρ_a, ρ_b) = (p(y_a | x), p(y_b | x)) from the (B, K) posterior over the run's classes of each
    mixed image x: both p(y) where the labels agree (the label's weight is the sum, as SnapMix's
    same-label rule makes it), (1, 0) where nothing was mixed. Not renormalised: ρ_a + ρ_b is the
    teacher's belief that the image shows either label (the manifest's ``targets`` normalise)."""
    posterior = posterior.float()
    rho_a = posterior.gather(1, label_a.long().view(-1, 1))[:, 0]
    rho_b = posterior.gather(1, label_b.long().view(-1, 1))[:, 0]
    rho_b = torch.where(same_label, rho_a, rho_b)
    rho_a = torch.where(mixed, rho_a, torch.ones_like(rho_a))
    rho_b = torch.where(mixed, rho_b, torch.zeros_like(rho_b))
    return rho_a, rho_b


def teacher_weights(result: MixResult, batch: Batch, posterior_of: Callable[[Any], Any]) -> tuple[Any, Any]:
    """The teacher's weights of a mixed batch: ``posterior_of`` maps the (B, 3, S, S) uint8 images
    as the method made them to their (B, K) posterior; a pixel blend is looked at like any mix."""
    if batch.label_a is None or batch.label_b is None:
        raise ValueError("teacher label weights need the batch's labels")
    posterior = posterior_of(result.images)
    return teacher_rule(posterior, batch.label_a, batch.label_b, mixed_rows(result), batch.same_label)


def mix_with_label_weights(
    method: Any, batch: Batch, label_weights: str, teacher: Callable[[Any], Any] | None = None
) -> MixResult:
    """The method's mix, with its weights replaced by SnapMix's rule on the batch's maps (CAMs for
    semantic, box coverage for boxes) when asked for; a method without an area rule (SnapMix)
    already weighs with the maps it is given. With ``teacher`` weights, every method's are
    replaced by the posterior ``teacher`` (images -> (B, K) posterior) gives each label."""
    result = method.mix(batch)
    if label_weights == TEACHER:
        if teacher is None:
            raise ValueError("teacher label weights need the run's classifier (backbone and head)")
        result.weight_a, result.weight_b = teacher_weights(result, batch, teacher)
    elif label_weights in MAP_RULES and "area" in method.label_weights:
        result.weight_a, result.weight_b = semantic_weights(result, batch)
    return result
