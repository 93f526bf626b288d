"""mixgen: CAM-guided mixed-image datasets (SnapMix, Attentive CutMix, CutMix, MixUp) on disk."""

from __future__ import annotations

from typing import Any

__version__ = "0.4.0"
__all__ = ["MixSchedule", "MixedDataset", "snapmix_loss", "__version__"]


def __getattr__(name: str) -> Any:
    # Lazy so that `import mixgen` (and `mixgen --help`) never imports torch.
    if name in ("MixedDataset", "snapmix_loss"):
        from mixgen import dataset

        return getattr(dataset, name)
    if name == "MixSchedule":
        from mixgen.schedule import MixSchedule

        return MixSchedule
    raise AttributeError(f"module 'mixgen' has no attribute {name!r}")
