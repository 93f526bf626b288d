"""Device and thread policy: which device a run uses, how many torch CPU threads each stage gets,
and whether batches mix on the thread pool. The thread counts are fixed per machine because
reductions split over threads round differently: every CAM and probe fit is then the same in any
worker layout."""

from __future__ import annotations

import contextlib
import os
import sys
from collections.abc import Iterator

from mixgen.errors import MixgenError

# The backbone's CPU kernels and the probe's reductions round differently with the thread count:
# one count per machine, whatever OMP_NUM_THREADS a launcher (torchrun sets 1) gives each worker,
# so every CAM is the same in any worker layout.
BACKBONE_THREADS = PROBE_THREADS = os.cpu_count() or 1
# The mixing kernels are small; with the encoder pool busy on every core, torch's OpenMP threads
# would mostly wait for one another (spm_box_mass: 0.45 ms alone, 16 ms beside the encoders).
MIX_THREADS = 1


def device_type_of(requested: str) -> str:
    """The device type a run would use, without importing torch (seconds) where the answer is
    plain: the one asked for, or the CPU where no NVIDIA driver is loaded."""
    if requested != "auto":
        return requested.partition(":")[0]
    if sys.platform.startswith("linux") and not os.path.exists("/proc/driver/nvidia/version"):
        return "cpu"
    return resolve_device(requested).type


def resolve_device(requested: str):
    """auto: CUDA when present (cuda:LOCAL_RANK under torchrun), else the CPU."""
    import torch

    if requested == "auto":
        if not torch.cuda.is_available():
            return torch.device("cpu")
        return torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")) % torch.cuda.device_count())
    if requested.startswith("cuda") and not torch.cuda.is_available():
        raise MixgenError(f"--device {requested}: CUDA is not available here; use --device cpu or auto")
    device = torch.device(requested)
    if device.type == "cuda" and device.index is not None and device.index >= torch.cuda.device_count():
        raise MixgenError(f"--device {requested}: only {torch.cuda.device_count()} CUDA device(s) present")
    return device


def mixes_on_pool(device) -> bool:
    """A CPU mixes each batch on a pool thread, beside the encoders of other batches (torch
    releases the GIL), so mixing and encoding share every core. A GPU mixes on the main thread and
    the pool only encodes and writes: nvJPEG must stay on one thread anyway."""
    return device.type == "cpu"


@contextlib.contextmanager
def torch_threads(count: int) -> Iterator[None]:
    """Run a block with a fixed number of torch CPU threads. Reductions split over threads round
    differently, and an L-BFGS fit amplifies that: fixing the count makes the probe, and so every
    CAM, the same whatever OMP_NUM_THREADS a worker runs with (torchrun sets it to 1)."""
    import torch

    previous = torch.get_num_threads()
    torch.set_num_threads(count)
    try:
        yield
    finally:
        torch.set_num_threads(previous)
