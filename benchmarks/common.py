"""What the benchmark scripts share: the one way they launch mixgen (a whole ``python -m mixgen``
process, start-up included), the description of the machine a number was measured on, and the
95 % bootstrap interval over sources that the label-fidelity scripts report.

The scripts are modules of this package, run from the repository root as
``python -m benchmarks.NAME``, so that they import each other and the mixgen of this tree without
touching ``sys.path``."""

from __future__ import annotations

import hashlib
import os
import platform
import sys
from pathlib import Path
from typing import Any

import numpy as np


def mixgen_command(method: str, src: Path, out: Path, *options: object) -> list[str]:
    """The command line of one mixgen run, in this interpreter."""
    return [sys.executable, "-m", "mixgen", method, str(src), str(out), *(str(o) for o in options)]


def machine(device: str) -> dict[str, Any]:
    gpu = "no GPU used"
    if device.startswith("cuda"):
        import torch

        gpu = torch.cuda.get_device_name(torch.device(device))
    return {
        "platform": platform.platform(terse=True),
        "python": platform.python_version(),
        "cpus": os.cpu_count(),
        "gpu": gpu,
    }


def source_bootstrap(values: np.ndarray, a: np.ndarray, b: np.ndarray, sources: int, rounds: int = 400):
    """95 % interval of the mean of per-row ``values`` (NaN: not counted) from a bootstrap over the
    *sources*: each resampled source set weighs a row by how often its two sources were drawn,
    since rows that share a source are not independent."""
    ok = np.isfinite(values)
    if not ok.any():
        return float("nan"), float("nan")
    rng = np.random.default_rng(0)
    counts = rng.multinomial(sources, np.full(sources, 1 / sources), size=rounds)
    weights = counts[:, a] * counts[:, b] * ok
    filled = np.where(ok, values, 0.0)
    means = (weights * filled).sum(1) / np.maximum(weights.sum(1), 1)
    low, high = np.percentile(means, [2.5, 97.5])
    return float(low), float(high)


def data_digest(out: Path) -> str:
    """One digest of every file under OUT/data, names included: two runs wrote the same bytes."""
    digest = hashlib.sha256()
    for path in sorted((out / "data").rglob("*")):
        if path.is_file():
            digest.update(path.relative_to(out).as_posix().encode() + hashlib.sha256(path.read_bytes()).digest())
    return digest.hexdigest()
