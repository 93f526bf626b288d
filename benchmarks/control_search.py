"""The positive-control search of issue 34: clean photos against online CutMix on a CUB-layout
folder, a pretrained EfficientNet-Lite with its first blocks frozen, trained on the CPU. Each
protocol is one command line; the JSON keeps every run's per-photo hits (rewritten after each run,
continued when run again). Its results and the commands: benchmarks/README.md, "Positive control".
train_eval.py's default CPU protocol is the kept protocol, rebuilt around mixgen.MixSchedule.

    python -m benchmarks.control_search CUB_DIR --json p2.json --freeze 5 --size 80 --epochs 60 --seeds 0,1
"""

import argparse
import json
import math
import os
import sys
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image
from torch import nn

if not __package__:  # run as a file (python benchmarks/control_search.py): import the package from the repository root
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks.lite_nets import lite_network
from benchmarks.train_eval import crop_flip


def load_cub(root: Path, side: int):
    def table(name: str) -> dict[str, str]:
        return dict(line.split()[:2] for line in open(root / name) if line.strip())

    paths, labels, split = table("images.txt"), table("image_class_labels.txt"), table("train_test_split.txt")
    ids = sorted(paths, key=int)
    classes = sorted({int(labels[i]) for i in ids})

    def view(i):
        with Image.open(root / "images" / paths[i]) as im:
            im = im.convert("RGB")
            w, h = im.size
            s = side / min(w, h)
            im = im.resize((max(side, round(w * s)), max(side, round(h * s))), Image.BILINEAR)
            w, h = im.size
            left, top = (w - side) // 2, (h - side) // 2
            return np.asarray(im.crop((left, top, left + side, top + side))).transpose(2, 0, 1)

    out = {}
    for part, flag in (("train", "1"), ("test", "0")):
        sel = [i for i in ids if split[i] == flag]
        out[part] = (
            torch.from_numpy(np.stack([view(i) for i in sel])),
            torch.tensor([classes.index(int(labels[i])) for i in sel]),
        )
    return out, len(classes)


class Net(nn.Module):
    def __init__(self, variant, freeze, classes, dropout):
        super().__init__()
        lite = lite_network(variant)
        self.stem, self.bn0, self.lower = lite._conv_stem, lite._bn0, lite._blocks[:freeze]
        self.upper, self.head, self.bn1 = lite._blocks[freeze:], lite._conv_head, lite._bn1
        for p in [*self.stem.parameters(), *self.bn0.parameters(), *self.lower.parameters()]:
            p.requires_grad_(False)
        self.drop, self.fc = nn.Dropout(dropout), nn.Linear(lite._fc.in_features, classes)

    def train(self, mode=True):
        super().train(mode)
        for m in (self.stem, self.bn0, self.lower):
            m.eval()
        return self

    def forward(self, x):
        with torch.no_grad():
            x = self.lower(F.relu6(self.bn0(self.stem(x))))
        x = F.relu6(self.bn1(self.head(self.upper(x))))
        return self.fc(self.drop(x.mean((2, 3))))


def normalise(x):
    return (x - 0.5) / 0.5


def cutmix(x, y1h, lam, rng):
    n, side = x.shape[0], x.shape[-1]
    perm = rng.permutation(n)
    cut = side * np.sqrt(1 - lam)
    cx, cy = rng.uniform(0, side, n), rng.uniform(0, side, n)
    x0 = np.clip(np.round(cx - cut / 2), 0, side).astype(int)
    x1 = np.clip(np.round(cx + cut / 2), 0, side).astype(int)
    y0 = np.clip(np.round(cy - cut / 2), 0, side).astype(int)
    y1 = np.clip(np.round(cy + cut / 2), 0, side).astype(int)
    out = x.clone()
    for i in range(n):
        out[i, :, y0[i] : y1[i], x0[i] : x1[i]] = x[perm[i], :, y0[i] : y1[i], x0[i] : x1[i]]
    share = torch.from_numpy((x1 - x0) * (y1 - y0) / side**2).float()[:, None]
    return out, (1 - share) * y1h + share * y1h[perm]


def train(arm, seed, data, classes, a):
    torch.manual_seed(seed)
    order_rng, aug_rng, mix_rng = (np.random.default_rng([seed, k]) for k in range(3))
    model = Net(a.net, a.freeze, classes, a.dropout)
    x_train, y_train = data["train"]
    n = len(y_train)
    steps = math.ceil(n / a.batch)
    total = a.epochs * steps
    head = list(model.fc.parameters())
    body = [p for p in model.parameters() if p.requires_grad and all(p is not q for q in head)]
    opt = torch.optim.SGD(
        [{"params": head, "lr": a.lr}, {"params": body, "lr": a.lr * a.body_lr}],
        momentum=0.9,
        nesterov=True,
        weight_decay=a.wd,
    )
    warm = steps
    sched = torch.optim.lr_scheduler.LambdaLR(
        opt, lambda s: min(1, (s + 1) / warm) * 0.5 * (1 + math.cos(math.pi * s / total))
    )
    mix_epochs = a.epochs - round(a.mix_off * a.epochs)
    t0 = time.perf_counter()
    model.train()
    correct = seen = 0
    for epoch in range(a.epochs):
        perm = order_rng.permutation(n)
        correct = seen = 0
        for s in range(steps):
            idx = perm[s * a.batch : (s + 1) * a.batch]
            x = crop_flip(x_train[idx].float() / 255, aug_rng, a.size, a.min_scale)
            y = F.one_hot(y_train[idx], classes).float()
            coin = mix_rng.random()
            lam = mix_rng.beta(a.beta, a.beta, len(idx))
            if arm == "online-cutmix" and epoch < mix_epochs and coin < a.mix_prob:
                x, y = cutmix(x, y, lam, mix_rng)
            logits = model(normalise(x))
            loss = -(y * F.log_softmax(logits, 1)).sum(1).mean()
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            sched.step()
            correct += int((logits.argmax(1) == y.argmax(1)).sum())
            seen += len(idx)
    train_acc = correct / seen
    model.eval()
    x_test, y_test = data["test"]
    hits = []
    with torch.inference_mode():
        for st in range(0, len(y_test), 128):
            xb = x_test[st : st + 128].float() / 255
            off = (xb.shape[-1] - a.size) // 2
            xb = xb[..., off : off + a.size, off : off + a.size]
            hits.append(model(normalise(xb)).argmax(1) == y_test[st : st + 128])
    hits = torch.cat(hits).numpy().astype(int)
    return {
        "top1": float(hits.mean()),
        "train_acc_last_epoch": train_acc,
        "wall_s": time.perf_counter() - t0,
        "hits": hits.tolist(),
        "final_loss": float(loss.detach()),
    }


def main():
    p = argparse.ArgumentParser()
    p.add_argument("cub", type=Path)
    p.add_argument("--json", type=Path, required=True)
    p.add_argument("--net", type=int, default=0)
    p.add_argument("--freeze", type=int, default=3)
    p.add_argument("--size", type=int, default=128)
    p.add_argument("--epochs", type=int, default=30)
    p.add_argument("--batch", type=int, default=32)
    p.add_argument("--lr", type=float, default=0.05)
    p.add_argument("--body-lr", type=float, default=0.2)
    p.add_argument("--wd", type=float, default=1e-4)
    p.add_argument("--dropout", type=float, default=0.2)
    p.add_argument("--min-scale", type=float, default=0.35)
    p.add_argument("--beta", type=float, default=1.0)
    p.add_argument("--mix-prob", type=float, default=1.0)
    p.add_argument("--mix-off", type=float, default=0.1)
    p.add_argument("--seeds", default="0,1")
    p.add_argument("--arms", default="clean,online-cutmix")
    p.add_argument("--threads", type=int, default=2)
    a = p.parse_args()
    torch.set_num_threads(a.threads)
    data, classes = load_cub(a.cub, round(a.size / 0.875))
    rec = {"args": {k: str(v) for k, v in vars(a).items()}, "runs": {}}
    if a.json.exists():
        rec = json.loads(a.json.read_text())
    for seed in map(int, a.seeds.split(",")):
        for arm in a.arms.split(","):
            key = f"{arm}/{seed}"
            if key in rec["runs"]:
                continue
            r = train(arm, seed, data, classes, a)
            rec["runs"][key] = r
            a.json.write_text(json.dumps(rec))
            print(
                f"{key}: top1 {r['top1']:.4f} train {r['train_acc_last_epoch']:.3f} loss {r['final_loss']:.3f} "
                f"{r['wall_s']:.0f}s load {os.getloadavg()[0]:.1f}",
                flush=True,
            )


if __name__ == "__main__":
    main()
