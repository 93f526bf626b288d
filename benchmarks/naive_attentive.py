"""The obvious Attentive CutMix script a user would write instead of mixgen: the baseline of target 1.

Modelled on the code in the Attentive CutMix review (SPEC seeds/004), with its two bugs fixed
(cells ranked by the channel mean, inputs normalised) so that it does the same work as
``mixgen attentive``: for every output pair it decodes both images with PIL, resizes them to S×S,
runs the same embedded EfficientNet-Lite0 on both (one batch of 2), pastes the donor's top-k cells
of the G×G attention grid onto the canvas, JPEG-encodes and writes the result, and finally writes a
CSV of labels. Single process, torch's default thread count, no caching: that is the point.

    python -m benchmarks.naive_attentive SRC OUT --pairs 800 [--size 224] [--device cpu]
"""

from __future__ import annotations

import argparse
import csv
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image

from mixgen.cam.backbones import load_backbone

SUFFIXES = {".jpg", ".jpeg", ".png", ".webp", ".bmp"}


def list_images(src: Path) -> tuple[list[Path], list[int], list[str]]:
    """ImageFolder scan: SRC/<class>/<image>, classes sorted by name."""
    classes = sorted(p.name for p in src.iterdir() if p.is_dir())
    paths, labels = [], []
    for label, name in enumerate(classes):
        for path in sorted((src / name).rglob("*")):
            if path.suffix.lower() in SUFFIXES:
                paths.append(path)
                labels.append(label)
    return paths, labels, classes


def load(path: Path, size: int) -> Image.Image:
    """Decode and resize as the review's code does: full-size decode, Pillow's default resampling."""
    with Image.open(path) as img:
        return img.convert("RGB").resize((size, size))


def attention(features, images: list[Image.Image], mean: torch.Tensor, std: torch.Tensor, grid: int) -> np.ndarray:
    """Attention grids (B, G, G) of a batch of PIL images: channel mean of the last conv feature map,
    average-pooled to G×G (at 224 px EfficientNet's 7×7 map is already the 7×7 grid)."""
    x = torch.stack([torch.from_numpy(np.asarray(img)).permute(2, 0, 1) for img in images]).float() / 255
    x = (x.to(mean.device) - mean) / std
    with torch.no_grad():
        fmap = features(x)
        return F.adaptive_avg_pool2d(fmap.mean(dim=1, keepdim=True), grid)[:, 0].float().cpu().numpy()


def paste_top_cells(canvas: np.ndarray, donor: np.ndarray, grid_b: np.ndarray, k: int) -> list[int]:
    """Paste the donor's k most attended cells onto the canvas at the same place; returns the cells."""
    size, grid = canvas.shape[0], grid_b.shape[0]
    cells = sorted(int(c) for c in np.argsort(-grid_b.ravel(), kind="stable")[:k])
    for cell in cells:
        r, c = divmod(cell, grid)
        y0, y1 = r * size // grid, (r + 1) * size // grid
        x0, x1 = c * size // grid, (c + 1) * size // grid
        canvas[y0:y1, x0:x1] = donor[y0:y1, x0:x1]
    return cells


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("src", type=Path)
    parser.add_argument("out", type=Path)
    parser.add_argument("--pairs", type=int, default=1000)
    parser.add_argument("--size", type=int, default=224)
    parser.add_argument("--top-k", type=int, default=6)
    parser.add_argument("--grid", type=int, default=7)
    parser.add_argument("--quality", type=int, default=95)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--device", default="cpu")
    args = parser.parse_args(argv)

    started = time.perf_counter()
    device = torch.device(args.device)
    backbone = load_backbone("efficientnet_lite0")
    model = backbone.model.to(device).eval()
    mean = torch.tensor(backbone.mean, device=device).view(1, 3, 1, 1)
    std = torch.tensor(backbone.std, device=device).view(1, 3, 1, 1)
    paths, labels, classes = list_images(args.src)
    images_dir = args.out / "images"
    images_dir.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(args.seed)
    share = args.top_k / args.grid**2

    rows = []
    for i in range(args.pairs):
        a = i % len(paths)
        b = int(rng.integers(len(paths) - 1))
        b += b >= a
        img_a, img_b = load(paths[a], args.size), load(paths[b], args.size)
        grids = attention(model.forward_features, [img_a, img_b], mean, std, args.grid)
        canvas = np.array(img_a)
        cells = paste_top_cells(canvas, np.asarray(img_b), grids[1], args.top_k)
        name = f"{i:09d}.jpg"
        Image.fromarray(canvas).save(images_dir / name, quality=args.quality)
        rows.append((name, labels[a], labels[b], classes[labels[a]], classes[labels[b]], 1 - share, share, cells))

    with open(args.out / "labels.csv", "w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(["file_name", "label_a", "label_b", "class_a", "class_b", "weight_a", "weight_b", "cells"])
        for row in rows:
            writer.writerow([*row[:-1], " ".join(map(str, row[-1]))])
    seconds = time.perf_counter() - started
    print(f"naive attentive: {args.pairs} outputs in {seconds:.2f} s ({args.pairs / seconds:.1f} outputs/s)")


if __name__ == "__main__":
    main()
