"""Which CAM variants make SnapMix's labels truer? Runs the embedded backbone over the fidelity set
once (plain and mirrored views, keeping the last feature map and the stride-16 stage before it),
then scores each variant's SnapMix weights on the same draws against the masks' truth: the
donor-share MAE and the dominant-label error on cross-label pairs, plus the pointing game.

    python benchmarks/cam_variants.py --size 448 --pairs 3000

In-process, no images written: the draws are SnapMix's own (``mixgen.methods.snapmix.draw``) and the
weights its formulas (``spm_box_mass``), so only the maps differ between rows of the table."""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))

import fidelity  # noqa: E402

from mixgen.backbones import fast_inference_copy, load_backbone  # noqa: E402
from mixgen.cams import LinearHead, normalise_cams, spm_box_mass, to_input  # noqa: E402
from mixgen.methods import snapmix  # noqa: E402
from mixgen.probe import fit_probe  # noqa: E402
from mixgen.sources import scan  # noqa: E402
from mixgen.views import load_view  # noqa: E402

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
        out.append((a, b, snapmix.draw(rng, size, 5.0)))
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
    paths = [item.path for item in index.items]
    result.update(fidelity.score_maps(cams.numpy(), paths, masks, size, "crop"))
    return result


def probe_cams(fmap: torch.Tensor, labels: torch.Tensor, classes: int, l2: float) -> tuple[torch.Tensor, float]:
    result = fit_probe(fmap.mean(dim=(2, 3)), labels, classes, l2)
    return result.head.cams(fmap, labels), result.holdout_accuracy


def class_maps(head: LinearHead, fmap: torch.Tensor) -> torch.Tensor:
    """(B, K, h, w) CAMs of every class."""
    return torch.einsum("bchw,kc->bkhw", fmap, head.weight) + head.bias[None, :, None, None]


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--per-class", type=int, default=30)
    parser.add_argument("--size", type=int, default=448)
    parser.add_argument("--pairs", type=int, default=3000)
    parser.add_argument("--workdir", type=Path, default=Path(tempfile.gettempdir()) / "mixgen-fidelity")
    parser.add_argument("--json", type=Path)
    parser.add_argument("--variants", default="", help="comma-separated groups: first, norm (default: all)")
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

    def record(name: str, cams: torch.Tensor, **extra) -> None:
        results[name] = {**score(cams.float(), plan, index, masks, size), **extra}
        print(f"{name}: {json.dumps(results[name])}", file=sys.stderr, flush=True)

    up_head = F.interpolate(head, size=mid.shape[-2:], mode="bilinear", align_corners=False)
    up_head_f = F.interpolate(head_f, size=mid.shape[-2:], mode="bilinear", align_corners=False)
    fine = torch.cat([up_head, mid], dim=1)
    fine_f = torch.cat([up_head_f, mid_f], dim=1)
    variants = set(args.variants.split(",")) if args.variants else None

    def wanted(group: str) -> bool:
        return variants is None or group in variants

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
    if args.json:
        args.json.write_text(json.dumps(results, indent=2))
    print("| variant | donor-share MAE | dominant wrong | pointing | probe held-out |")
    print("|---|---|---|---|---|")
    for name, r in results.items():
        held = r.get("holdout")
        print(
            f"| {name} | {r['mae']:.3f} | {100 * r['wrong']:.1f} % | {100 * r['pointing']:.1f} % | "
            f"{'' if held is None else f'{100 * held:.0f} %'} |"
        )


if __name__ == "__main__":
    main()
