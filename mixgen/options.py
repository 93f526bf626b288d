"""The run options, declared once: their choices, ``--help`` panels and ``FLAGS`` (help, choices,
panel, and whether an option only changes how fast a run goes). ``RunConfig`` (``mixgen.config``)
holds the defaults; the CLI, validation, the run record and the method registry's check of a
plugin's option names all read these declarations. Imports nothing of mixgen."""

from __future__ import annotations

import re
from dataclasses import dataclass

# Choices of the run options (validated in RunConfig; the CLI's help names them).
RESIZE_MODES = ("crop", "squash")
FORMATS = ("jpg", "png", "webp")
WRITERS = ("files", "webdataset")
PAIRINGS = ("random", "cross-class", "same-class")
LAYOUTS = ("auto", "imagefolder", "cub")
SPLITS = ("train", "test", "all")
CODECS = ("cpu", "cuda")
CAM_MODES = ("probe", "checkpoint", "imagenet", "mean")
# How a class CAM becomes the map SnapMix's SPM is taken of (mixgen.cam.cams.normalise_cams): "raw" the
# official code's, "floor" mixgen 0.2's, "colour" 0.3's. The default is chosen on real photos
# (benchmarks/README.md, issue 21), where the synthetic sets' winners, floor and colour, lose to raw.
CAM_NORMS = ("colour", "floor", "relu", "raw")
DEFAULT_CAM_NORM = "raw"
DEFAULT_BACKBONE = "efficientnet_lite0"  # the embedded Lite0 (mixgen.cam.backbones.EMBEDDED)
MIN_SIZE = 8
MAX_SIZE = 4096  # one S×S view per source is cached: beyond this the cache alone reaches many GB
MIN_CAM_SIZE = 32
DEVICE_PATTERN = re.compile(r"^(auto|cpu|cuda(:\d+)?)$")
RUNTIMES = ("auto", "torch", "onnxruntime")  # of the CAM pass (mixgen.cam.onnx_runtime)


@dataclass(frozen=True)
class Flag:
    """How one ``RunConfig`` field is offered: its help, its choices, and whether it only changes
    how fast a run goes (then it stays out of the output settings and the fingerprint). The
    default is the field's own (a method's declaration gives ``size`` and ``label_weights``)."""

    help: str
    choices: tuple[str, ...] | None = None
    shown: str | bool = True  # the default ``--help`` shows; True: the value itself
    execution: bool = False
    cam: bool = False  # a CAM-pass setting: used only with semantic weights by methods without maps
    panel: str = ""  # the --help panel it is listed in (one of PANELS)


USED_WITH_SEMANTIC = " Used with --label-weights semantic or teacher."
# The --help panels, in the order shown; a method's own options go in METHOD.
INPUT, OUTPUT, METHOD, CAM = "Input", "Output", "Method", "CAM and backbone"
PERFORMANCE, RUN_CONTROL = "Performance and parallelism", "Run control"
PANELS = (INPUT, OUTPUT, METHOD, CAM, PERFORMANCE, RUN_CONTROL)
# Every run option, in the command line's order (a method's own options follow ``writer``).
FLAGS: dict[str, Flag] = {
    "pairs": Flag("Number of mixed images to write (at most 2^63-1; memory does not grow with it).", panel=OUTPUT),
    "seed": Flag("Seed; output i depends only on (seed, i).", panel=OUTPUT),
    "size": Flag("View side S in pixels (every source becomes one S×S view).", panel=OUTPUT),
    "resize": Flag("crop: shorter side to S then centre crop; squash: whole image to S×S.", RESIZE_MODES, panel=OUTPUT),
    "format": Flag("Image format.", FORMATS, panel=OUTPUT),
    "quality": Flag("JPEG/WebP quality 1..100.", panel=OUTPUT),
    "writer": Flag(
        "files: images next to each shard's manifest; webdataset: one tar per shard.", WRITERS, panel=OUTPUT
    ),
    "label_weights": Flag(
        "Label weights: area (the paper's rule), semantic (SnapMix's CAM rule on this method's own mask), "
        "boxes (the share of each object's box that stays and arrives: SRC's bounding_boxes.txt, no CAM) or "
        "teacher (the run's classifier, --cam probe or --checkpoint, scores each label on the mixed image: "
        "one more backbone pass per output).",
        panel=METHOD,
    ),
    "backbone": Flag(
        "Embedded EfficientNet-Lite0, or a torchvision/timm CNN name (torchvision:NAME, timm:NAME).",
        cam=True,
        panel=CAM,
    ),
    "weights": Flag(
        "State dict replacing the backbone's pretrained ImageNet weights (offline use).", shown=False, panel=CAM
    ),
    "checkpoint": Flag(
        "State dict of the backbone fine-tuned on SRC's classes (loaded weights_only).", shown=False, panel=CAM
    ),
    "cam": Flag("Where the CAM's linear head comes from.", CAM_MODES, cam=True, panel=CAM),
    "cam_size": Flag("Side the backbone sees; smaller is faster but coarser.", shown="--size", panel=CAM),
    "runtime": Flag(
        "CAM pass runtime; auto: ONNX Runtime on a CPU, PyTorch on CUDA.",
        RUNTIMES,
        execution=True,  # the runtime that ran is in the fingerprint (as device_type is), not the request
        cam=True,
        panel=CAM,
    ),
    "cam_norm": Flag(
        "Map the SPM is taken of: raw (the CAM as is, the paper's; truest on real photos), relu (max(CAM, 0)), "
        "floor (max(CAM − 0.1·peak, 0)) or colour (floor, weighted by each pixel colour's object posterior).",
        CAM_NORMS,
        shown=DEFAULT_CAM_NORM,
        cam=True,
        panel=CAM,
    ),
    "pairing": Flag("Donor choice (never the canvas itself).", PAIRINGS, panel=METHOD),
    "layout": Flag("Input layout; auto tells them apart.", LAYOUTS, panel=INPUT),
    "split": Flag("CUB split.", SPLITS, shown="train for CUB", panel=INPUT),
    "path_column": Flag("Index file SRC: the column of image paths (or HF image structs).", panel=INPUT),
    "label_column": Flag("Index file SRC: the column of labels (class names or integer ids).", panel=INPUT),
    "classes": Flag("Index file SRC: class names, one per line (line i names id i-1).", shown=False, panel=INPUT),
    "device": Flag("auto (CUDA when present), cpu, cuda or cuda:N.", execution=True, panel=PERFORMANCE),
    "batch_size": Flag(
        "Sources decoded per backbone step (the backbone itself runs fixed-size calls).",
        execution=True,
        panel=PERFORMANCE,
    ),
    "workers": Flag(
        "Decode/encode threads (0: one per CPU core).", shown="all cores", execution=True, panel=PERFORMANCE
    ),
    "shard_size": Flag("Rows per shard (one manifest and image folder each).", panel=OUTPUT),
    "num_shards": Flag("Split the job over N workers.", shown="$WORLD_SIZE or 1", execution=True, panel=PERFORMANCE),
    "shard_index": Flag("This worker's number 0..N-1.", shown="$RANK or 0", execution=True, panel=PERFORMANCE),
    "cache_dir": Flag(
        "Where the views, CAM maps and probe features are cached: a local disk per machine under torchrun "
        "(workers started without torchrun must share it).",
        shown="OUT/.mixgen",
        execution=True,
        panel=PERFORMANCE,
    ),
    "strict": Flag("Fail on the first unreadable image instead of skipping it.", execution=True, panel=RUN_CONTROL),
    "overwrite": Flag(
        "Replace a different earlier run in OUT (removes only mixgen's files).", execution=True, panel=RUN_CONTROL
    ),
    "codec": Flag(
        "JPEG encoder: cpu (thread pool) or cuda (nvJPEG via torchvision, on the main thread).",
        CODECS,
        panel=PERFORMANCE,
    ),
    "dry_run": Flag(
        "Check everything the run checks, OUT included, and say what it would do (start, resume, grow) with a "
        "rough disk and time estimate; write nothing.",
        execution=True,
        panel=RUN_CONTROL,
    ),
}
# The CAM's own settings (not --runtime, a speed setting): a run that uses no CAM refuses them.
CAM_SETTINGS = tuple(name for name, flag in FLAGS.items() if flag.panel == CAM and not flag.execution)
# Settings that change how fast a run goes but never what it writes.
EXECUTION_ONLY = frozenset({"src", "out", *(name for name, flag in FLAGS.items() if flag.execution)})
