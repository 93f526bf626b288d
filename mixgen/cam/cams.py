"""Class activation maps: the backbone pass over views, the four CAM heads (probe, checkpoint,
imagenet, mean), semantic percentage maps (SPM) and attention grids."""

from __future__ import annotations

import contextlib
import functools
import hashlib
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F

from mixgen.cam.backbones import Backbone
from mixgen.cam.geometry import box_axis_masks
from mixgen.errors import UsageError


def to_pixels(views: torch.Tensor, cam_size: int) -> torch.Tensor:
    """(B, S, S, 3) uint8 views -> the (B, 3, cam, cam) float batch of pixel values (0–255), in
    channels_last layout (which the permuted NHWC views already have: no copy for it)."""
    x = views.permute(0, 3, 1, 2).float()
    if x.shape[-1] != cam_size:
        x = F.interpolate(x, size=(cam_size, cam_size), mode="bilinear", align_corners=False, antialias=True)
    return x


def normalisation(backbone: Backbone, device: torch.device | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """(scale, shift), each (1, 3, 1, 1): pixel · scale − shift is what the weights expect."""
    scale = torch.tensor([1 / (255 * s) for s in backbone.std], device=device).view(1, 3, 1, 1)
    shift = torch.tensor([m / s for m, s in zip(backbone.mean, backbone.std, strict=True)], device=device)
    return scale, shift.view(1, 3, 1, 1)


def to_input(views: torch.Tensor, cam_size: int, backbone: Backbone) -> torch.Tensor:
    """(B, S, S, 3) uint8 views -> the normalised (B, 3, cam, cam) float batch, channels_last."""
    x = to_pixels(views, cam_size)
    scale, shift = normalisation(backbone, x.device)
    return x.mul_(scale).sub_(shift).contiguous(memory_format=torch.channels_last)


@torch.inference_mode()
def feature_maps(backbone: Backbone, views: torch.Tensor, cam_size: int) -> torch.Tensor:
    """Last conv feature map F (B, C, h, w) in float32; bf16 autocast on CUDA. A ``features``
    that normalises its input itself (ONNX Runtime's graph, ``takes_pixels``) gets pixel values."""
    if getattr(backbone.features, "takes_pixels", False):
        x = to_pixels(views, cam_size)
    else:
        x = to_input(views, cam_size, backbone)
    autocast = torch.autocast("cuda", dtype=torch.bfloat16) if x.device.type == "cuda" else contextlib.nullcontext()
    with autocast:
        fmap = backbone.features(x)
    if fmap.ndim != 4:
        raise ValueError(f"backbone {backbone.name} gives no conv feature map (shape {tuple(fmap.shape)})")
    return fmap.float()


# On a CPU, the batch × side² of one backbone call: at 4 × 224² the embedded network's largest
# activation (96 × 112² floats per image) stays under glibc's 32 MB mmap threshold, so its buffers
# are reused from the heap instead of being mapped and page-faulted in anew by every call —
# 1.8× faster per image at 224 px than batches of 8, 2× at 448 px than batches of 2.
CPU_CALL_PIXELS = 4 * 224 * 224


def micro_batch(device: torch.device, cam_size: int, backbone: Backbone | None = None) -> int:
    """The fixed number of images per backbone call: on a GPU large, on a CPU the largest power of
    two within the runtime's call pixels (CPU_CALL_PIXELS for PyTorch; ONNX Runtime's own arena
    has no mmap cliff and gains from larger calls), at least 1."""
    if device.type == "cuda":
        return 64
    pixels = getattr(getattr(backbone, "features", None), "call_pixels", CPU_CALL_PIXELS)
    size = 1
    while 2 * size * cam_size * cam_size <= pixels:
        size *= 2
    return size


def invariant_feature_maps(backbone: Backbone, views: torch.Tensor, cam_size: int) -> torch.Tensor:
    """``feature_maps`` computed in calls of exactly ``micro_batch`` images (the last one padded):
    kernels pick algorithms by batch shape, so this keeps every source's F bit-identical
    whatever --batch-size is or which sources share its batch."""
    size = micro_batch(views.device, cam_size, backbone)
    parts = []
    for start in range(0, len(views), size):
        chunk = views[start : start + size]
        count = len(chunk)
        if count < size:
            chunk = torch.cat([chunk, chunk.new_zeros((size - count, *chunk.shape[1:]))])
        parts.append(feature_maps(backbone, chunk, cam_size)[:count])
    return torch.cat(parts)


@dataclass
class LinearHead:
    """A linear classifier (w, b) on globally pooled F; the CAM of class k is w_k · F + b_k."""

    weight: torch.Tensor  # (K, C)
    bias: torch.Tensor  # (K,)

    def logits(self, pooled: torch.Tensor) -> torch.Tensor:
        return pooled @ self.weight.T + self.bias

    def cams(self, fmap: torch.Tensor, classes: torch.Tensor) -> torch.Tensor:
        """(B, C, h, w) and (B,) class ids -> (B, h, w) CAMs of those classes."""
        w = self.weight[classes].to(fmap.dtype)
        return torch.einsum("bchw,bc->bhw", fmap, w) + self.bias[classes].to(fmap.dtype)[:, None, None]

    def to_array(self) -> np.ndarray:
        """(K, C + 1) float32 on the CPU, each class's weights then its bias: how the head is cached
        (``maps_cache_key``'s head file) and digested."""
        weight, bias = self.weight.detach().float().cpu(), self.bias.detach().float().cpu()
        return np.ascontiguousarray(torch.cat([weight, bias[:, None]], dim=1).numpy(), dtype="<f4")

    @classmethod
    def from_array(cls, array: np.ndarray, device: torch.device | str | None = None) -> LinearHead:
        rows = torch.from_numpy(np.ascontiguousarray(array, dtype=np.float32))
        return cls(rows[:, :-1].contiguous().to(device), rows[:, -1].contiguous().to(device))

    def digest(self) -> str:
        """SHA-256 of the head's float32 values: what the run record says the teacher was."""
        return hashlib.sha256(self.to_array().tobytes()).hexdigest()


def head_of(backbone: Backbone) -> LinearHead:
    if backbone.head is None:
        raise ValueError(f"backbone {backbone.name} has no linear head")
    return LinearHead(backbone.head.weight.detach().float(), backbone.head.bias.detach().float())


def fixed_head(backbone: Backbone, cam: str) -> LinearHead | None:
    """The backbone's own head for --cam checkpoint or imagenet; None for probe (fitted on the
    sources later) and mean (no head)."""
    if cam not in ("checkpoint", "imagenet"):
        return None
    try:
        return head_of(backbone)
    except ValueError as exc:
        raise UsageError(f"--cam {cam}: {exc}; use --cam probe or mean") from None


# --cam-norm floor: positions under this share of a map's peak get no mass.
CAM_FLOOR = 0.1
# --cam-norm colour: the map's grid is this many times finer than the CAM's (8 × 8 view pixels
# per cell at 448 px), and the colour model has this many levels per channel (8³ colour bins).
COLOUR_GRID = 4
COLOUR_LEVELS = 8
FIXED_POINT = 2**24


def normalise_cams(cams: torch.Tensor, norm: str, views: torch.Tensor | None = None) -> torch.Tensor:
    """The map a class CAM contributes to SnapMix's SPM, (map − min) / Σ(map − min), for (B, h, w)
    CAMs. ``raw``: the CAM itself (the official code), whose min-subtraction leaves every
    background position some mass, so a box over background takes label weight; ``relu``:
    max(CAM, 0), only positions with positive evidence for the class; ``floor``:
    max(CAM − 0.1·peak, 0), the positions within 90 % of the map's range below its peak, which
    also drops the weak positive evidence that spreads around an object; ``colour``: the floor map
    weighted by each pixel colour's object posterior (``colour_posterior``; needs the (B, S, S, 3)
    ``views``), on a 4× finer grid. The sharper maps won on synthetic pasted objects but lose on
    real photos (CUB birds with their boxes, benchmarks/fidelity.py --real, 448 px: donor-share
    error 0.10 raw, 0.11 relu, 0.15 floor, 0.17 colour), where a fine-grained CAM peaks on the
    discriminative parts and the raw map's spread is what an object's share needs: ``raw`` is the
    default. A map left without mass is constant: SnapMix falls back to area weights."""
    if norm == "raw":
        return cams
    if norm == "relu":
        return cams.clamp(min=0)
    if norm in ("floor", "colour"):
        peak = cams.amax(dim=(-2, -1), keepdim=True)
        floored = (cams - CAM_FLOOR * peak).clamp(min=0)
        if norm == "floor":
            return floored
        if views is None:
            raise ValueError("--cam-norm colour needs the views")
        return colour_posterior(floored, views)
    raise ValueError(f"unknown CAM normalisation {norm!r}")


def colour_posterior(maps: torch.Tensor, views: torch.Tensor) -> torch.Tensor:
    """(B, h, w) non-negative maps and their (B, S, S, 3) uint8 views -> (B, 4h, 4w) maps, each
    position's upsampled map value times P(object | its colour).

    The CAM's resolution (a 14 × 14 grid at 448 px) smears it over the background around an object
    and over gaps inside it. Its own support says which colours the object has: a per-image
    colour model in the manner of GrabCut (Rother et al. 2004), with the upsampled map U (scaled
    to peak 1) as the soft object mask — for each of 8³ colour bins, object weight Σ U and
    background weight Σ (1 − U) over the view's pixels (averaged to the map's grid) in that bin,
    P = (object + ½) / (object + background + 1). The map can only lose mass where the colour is
    the background's: a view whose colours do not tell object from background gets a nearly
    constant P, which leaves the map as it was, and an empty map stays empty."""
    _, low_h, low_w = maps.shape
    grid = (COLOUR_GRID * low_h, COLOUR_GRID * low_w)
    up = F.interpolate(maps[:, None].float(), size=grid, mode="bilinear", align_corners=False)[:, 0]
    guide = F.adaptive_avg_pool2d(views.permute(0, 3, 1, 2).float(), grid) / 255
    return up * object_posterior(up, guide)


def object_posterior(mask: torch.Tensor, guide: torch.Tensor, levels: int = COLOUR_LEVELS) -> torch.Tensor:
    """P(object | colour) at each position of the (B, 3, h, w) guide (colours in 0–1), from the
    (B, h, w) non-negative soft object mask (scaled to peak 1 here): per image and colour bin
    (``levels``³ of them), (Σ mask + ½) / (positions + 1)."""
    batch = mask.shape[0]
    quantised = torch.clamp(guide, 0, 1 - 1e-6).mul_(levels).floor_().long()
    bins = levels**3
    cell = (quantised[:, 0] * levels + quantised[:, 1]) * levels + quantised[:, 2]
    cell = (cell + bins * torch.arange(batch, device=mask.device)[:, None, None]).flatten()
    weight = (mask / mask.amax(dim=(1, 2), keepdim=True).clamp(min=1e-12)).flatten()
    # Sums in 2⁻²⁴ fixed point: integer additions give the same histogram in any order, which
    # float atomics on CUDA do not (every output is byte-reproducible).
    fixed = weight.mul(FIXED_POINT).round_().long()
    objects = torch.zeros(batch * bins, dtype=torch.long, device=mask.device).scatter_add_(0, cell, fixed)
    total = torch.bincount(cell, minlength=batch * bins)
    posterior = (objects.double() / FIXED_POINT + 0.5) / (total.double() + 1)
    return posterior.float()[cell].view_as(mask)


def maps_for(
    fmap: torch.Tensor,
    mode: str,
    head: LinearHead | None,
    labels: torch.Tensor,
    *,
    norm: str = "raw",
    views: torch.Tensor | None = None,
) -> torch.Tensor:
    """The map each source contributes: its own label's CAM (probe/checkpoint), the CAM of the
    predicted ImageNet class (imagenet), normalised by ``norm`` (``colour`` reads the sources'
    ``views``); or the channel mean of F (mean, non-negative already: ``norm`` does not apply)."""
    if mode == "mean":
        return fmap.mean(dim=1)
    assert head is not None
    if mode == "imagenet":
        labels = head.logits(fmap.mean(dim=(2, 3))).argmax(dim=1)
    return normalise_cams(head.cams(fmap, labels), norm, views)


def spm(maps: torch.Tensor, size: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Semantic percentage maps S = (CAM − min) / Σ(CAM − min), upsampled bilinearly
    (align_corners=False) to S×S first. Returns (B, S, S) and a validity flag: False where the
    CAM is constant (sum 0) and SnapMix must fall back to area weights."""
    up = F.interpolate(maps[:, None].float(), size=(size, size), mode="bilinear", align_corners=False)[:, 0]
    up = up - up.amin(dim=(1, 2), keepdim=True)
    total = up.sum(dim=(1, 2))
    valid = torch.isfinite(total) & (total > 0)
    normalised = up / torch.where(valid, total, torch.ones_like(total))[:, None, None]
    return torch.where(valid[:, None, None], normalised, torch.zeros_like(normalised)), valid


@functools.lru_cache(maxsize=8)
def interpolation_matrix(low: int, size: int) -> torch.Tensor:
    """(size, low) weights of 1-D linear upsampling with align_corners=False. Bilinear upsampling
    is separable, so the S×S map of an h×w CAM M is ``R_h · M · R_wᵀ``. Cached: it depends only on
    the two sides, and every mixed batch needs it."""
    eye = torch.eye(low, dtype=torch.float64)[None]
    return F.interpolate(eye, size=size, mode="linear", align_corners=False)[0].T


@functools.lru_cache(maxsize=8)
def _cell_extremes(low: int, size: int) -> list[int]:
    """Output positions at either end of each run that interpolates between the same two inputs:
    the upsampled map is bilinear on each such cell, so its minimum over the S×S grid lies at
    these rows and columns."""
    scale = low / size
    source = [min(int(max((o + 0.5) * scale - 0.5, 0.0)), low - 1) for o in range(size)]
    return [o for o in range(size) if o in (0, size - 1) or source[o] != source[o - 1] or source[o] != source[o + 1]]


def spm_box_mass(
    cams: torch.Tensor, boxes: torch.Tensor, size: int, dtype: torch.dtype = torch.float32
) -> torch.Tensor:
    """Σ of the SPM S(I) = (up − min up) / Σ(up − min up) inside each box, where ``up`` is the CAM
    upsampled bilinearly to S×S — computed without building any S×S map: box sums and the total
    are ``r · R_h · M · R_wᵀ · c`` products, and the minimum comes from the cell corners only.
    NaN where the CAM is constant (SnapMix then falls back to area weights). ``dtype`` float64 keeps
    the masses unrounded, for a caller that sums several boxes (grid cells) and rounds once."""
    batch, low_h, low_w = cams.shape
    device = cams.device
    maps = cams.to(torch.float64)
    rows_h, rows_w = interpolation_matrix(low_h, size).to(device), interpolation_matrix(low_w, size).to(device)
    corners = rows_h[_cell_extremes(low_h, size)] @ maps @ rows_w[_cell_extremes(low_w, size)].T
    minimum = corners.amin(dim=(1, 2))
    total = torch.einsum("i,bij,j->b", rows_h.sum(0), maps, rows_w.sum(0)) - minimum * size * size
    in_rows, in_cols = box_axis_masks(boxes, size, torch.float64)
    area = in_rows.sum(1) * in_cols.sum(1)
    inside = torch.einsum("bi,bij,bj->b", in_rows @ rows_h, maps, in_cols @ rows_w) - minimum * area
    valid = torch.isfinite(total) & (total > 1e-12 * size * size * maps.abs().amax(dim=(1, 2)).clamp(min=1e-30))
    mass = inside / torch.where(valid, total, torch.ones_like(total))
    return torch.where(valid, mass, torch.full_like(mass, float("nan"))).to(dtype)


def attention_grid(maps: torch.Tensor, grid: int) -> torch.Tensor:
    """(B, h, w) maps average-pooled to (B, G, G); channel mean and pooling commute, so for
    mode 'mean' this is the Attentive CutMix grid."""
    return F.adaptive_avg_pool2d(maps[:, None].float(), (grid, grid))[:, 0]
