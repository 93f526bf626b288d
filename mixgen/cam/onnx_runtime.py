"""ONNX Runtime for the CAM pass on a CPU.

The feature network the pipeline uses (the folded inference copy) is exported once per backbone,
weights and input side to ONNX (opset 17, the TorchScript exporter) and cached under the user's
cache folder; ONNX Runtime then runs it about 1.5× faster than PyTorch eager on the CPU. The
graph normalises its input itself, so the object handed back takes the (B, 3, side, side) batch
of pixel values (``takes_pixels``; channels_last, as the views are) and gives the (B, C, h, w)
float32 map, and ``cams.invariant_feature_maps`` and its fixed call sizes work unchanged.
Anything that goes wrong on the way (no onnxruntime, an operator the exporter cannot write, maps
that differ from PyTorch's) leaves the run on PyTorch with a one-line note."""

from __future__ import annotations

import contextlib
import copy
import dataclasses
import hashlib
import io
import json
import os
import re
import time
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from mixgen.cam.backbones import Backbone, weights_digest
from mixgen.errors import UsageError, one_line
from mixgen.files import atomic_file
from mixgen.options import RUNTIMES
from mixgen.version import __version__

OPSET = 17
# Bump when the exported graph changes for the same weights (the wrapper, the frozen convs).
# 2: pixel values in NHWC order in, normalised inside the graph.
EXPORT_FORMAT = 2
CACHE_ENV = "MIXGEN_CACHE_DIR"


def cache_dir() -> Path:
    """$MIXGEN_CACHE_DIR/onnx, else $XDG_CACHE_HOME/mixgen/onnx, else ~/.cache/mixgen/onnx."""
    if os.environ.get(CACHE_ENV):
        return Path(os.environ[CACHE_ENV]).expanduser() / "onnx"
    base = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(base).expanduser() / "mixgen" / "onnx"


@dataclass
class RuntimeReport:
    """Which runtime the CAM pass uses and why; goes into the run record (``runtime``)."""

    name: str  # "torch" or "onnxruntime"
    requested: str
    note: str | None = None  # one line when a requested ONNX Runtime could not be used
    model: str | None = None  # the cached .onnx file
    exported: bool = False  # this run paid the export
    export_s: float = 0.0
    versions: dict[str, str] = dataclasses.field(default_factory=dict)

    def as_record(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


class OnnxFeatures:
    """An ONNX Runtime session called like ``Backbone.features``, but on pixel values: its graph
    transposes and normalises them, which saves the CAM pass two float passes and a transposing
    copy per batch (the maps are bit-identical to normalising first). Sequential execution on a
    fixed number of intra-op threads: as with PyTorch, the thread count and the call's batch
    shape decide how sums are split, so both are fixed for byte-identical maps."""

    takes_pixels = True

    # Images × side² per call (``cams.micro_batch``): 8 at 448 px, 32 at 224. On 2 cores, 448 px
    # through mixgen's feature_maps: 28.6 images/s in calls of 1, 37.6 of 4, 38.6 of 8, 40.1 of 16
    # (PyTorch's best, calls of 1: 32.0).
    call_pixels = 8 * 448 * 448

    def __init__(self, model: bytes | str, side: int, threads: int):
        import onnxruntime as ort

        options = ort.SessionOptions()
        options.intra_op_num_threads = threads
        options.inter_op_num_threads = 1
        options.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
        options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        options.log_severity_level = 3  # errors only: its warnings are not the user's business
        # Its workers otherwise spin on the cores for a while after each call, against the torch
        # threads that prepare the next batch, then the probe's and the encoders'.
        options.add_session_config_entry("session.force_spinning_stop", "1")
        self.session = ort.InferenceSession(model, options, providers=["CPUExecutionProvider"])
        self.input = self.session.get_inputs()[0].name
        self.side = side
        self.threads = threads

    def __call__(self, pixels: torch.Tensor) -> torch.Tensor:
        """(B, 3, side, side) pixel values -> (B, C, h, w); a channels_last batch goes in uncopied."""
        if pixels.device.type != "cpu" or tuple(pixels.shape[1:]) != (3, self.side, self.side):
            raise ValueError(
                f"the ONNX model takes (B, 3, {self.side}, {self.side}) CPU batches, got {tuple(pixels.shape)}"
            )
        nhwc = pixels.detach().float().permute(0, 2, 3, 1).contiguous().numpy()
        return torch.from_numpy(self.session.run(None, {self.input: nhwc})[0])


class _FrozenSameConv(nn.Module):
    """``lite0.SameConv2d`` with its grown stride-2 kernel as a constant: the TorchScript
    exporter cannot write a convolution whose kernel is computed in the graph."""

    def __init__(self, conv: nn.Conv2d):
        super().__init__()
        self.conv = conv
        self.grown = nn.Parameter(F.pad(conv.weight.detach(), (1, 0, 1, 0)).contiguous(), requires_grad=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        from mixgen.cam.lite0 import _tf_same_padding

        conv = self.conv
        kernel, stride = conv.kernel_size[0], conv.stride[0]
        if stride == 1:
            return F.conv2d(x, conv.weight, conv.bias, 1, kernel // 2, 1, conv.groups)
        height, width = int(x.shape[-2]), int(x.shape[-1])
        if height % 2 == 0 and width % 2 == 0:
            return F.conv2d(x, self.grown, conv.bias, 2, kernel // 2, 1, conv.groups)
        top, bottom = _tf_same_padding(height, kernel, stride)
        left, right = _tf_same_padding(width, kernel, stride)
        return F.conv2d(F.pad(x, (left, right, top, bottom)), conv.weight, conv.bias, stride, 0, 1, conv.groups)


class _Exported(nn.Module):
    """A deep copy of the features network as one module (``features`` may be a bound method
    such as ``model.forward_features``), contiguous float32 on the CPU, ready to trace, behind
    the input transform of ``cams.to_input``: NHWC pixel values in, transposed, then
    pixel · scale − shift, the same two float operations in the same order."""

    def __init__(self, backbone: Backbone):
        super().__init__()
        from mixgen.cam.cams import normalisation

        features = backbone.features
        scale, shift = normalisation(backbone)
        self.register_buffer("scale", scale)
        self.register_buffer("shift", shift)
        if isinstance(features, nn.Module):
            self.net = copy.deepcopy(features)
            self._call = self.net
        else:
            self.net = copy.deepcopy(features.__self__)
            self._call = getattr(self.net, features.__name__)
        self.net.to(torch.device("cpu"), dtype=torch.float32, memory_format=torch.contiguous_format).eval()
        from mixgen.cam.lite0 import SameConv2d

        for parent in list(self.net.modules()):
            for name, child in list(parent.named_children()):
                if isinstance(child, SameConv2d):
                    setattr(parent, name, _FrozenSameConv(child))

    def forward(self, nhwc: torch.Tensor) -> torch.Tensor:
        return self._call(nhwc.permute(0, 3, 1, 2) * self.scale - self.shift)


def _owner(features: Any) -> nn.Module | None:
    if isinstance(features, nn.Module):
        return features
    owner = getattr(features, "__self__", None)
    return owner if isinstance(owner, nn.Module) else None


def versions() -> dict[str, str]:
    """The versions the exported graph and its kernels depend on (part of the cache key). The
    ``onnx`` package is needed only to export, so its absence shows at export, not here."""
    import onnxruntime

    return {"torch": torch.__version__, "onnxruntime": onnxruntime.__version__}


def model_path(backbone: Backbone, side: int, digest: str, found: dict[str, str]) -> Path:
    """Where the ONNX model of this backbone, weights, side and tool versions is cached."""
    blob = json.dumps(
        {
            "name": backbone.name,
            "weights": digest,
            "side": side,
            "opset": OPSET,
            "format": EXPORT_FORMAT,
            "mixgen": __version__,
            **found,
        },
        sort_keys=True,
    )
    key = hashlib.sha256(blob.encode()).hexdigest()[:20]
    stem = re.sub(r"[^A-Za-z0-9_.-]+", "_", backbone.name)[:60]
    return cache_dir() / f"{stem}-{side}px-{key}.onnx"


def export_onnx(backbone: Backbone, side: int) -> bytes:
    """The features network as ONNX bytes (opset 17, batch axis dynamic, side fixed; a
    (B, side, side, 3) float input of pixel values, see ``_Exported``). The
    TorchScript exporter (``dynamo=False``) needs only ``onnx``; the dynamo exporter would also
    need onnxscript and is slower to run for a graph as plain as a CNN's."""
    module = _Exported(backbone)
    example = torch.zeros(1, side, side, 3)
    buffer = io.BytesIO()
    with warnings.catch_warnings(), torch.no_grad():
        warnings.simplefilter("ignore")  # the exporter's deprecation and tracer warnings
        torch.onnx.export(
            module,
            (example,),
            buffer,
            opset_version=OPSET,
            dynamo=False,
            input_names=["input"],
            output_names=["features"],
            dynamic_axes={"input": {0: "batch"}, "features": {0: "batch"}},
            do_constant_folding=True,
        )
    return buffer.getvalue()


def _write_atomic(path: Path, data: bytes) -> None:
    """``data`` as the whole of ``path`` or nothing (workers may export at once)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with atomic_file(path) as f:
        f.write(data)


def _agrees(backbone: Backbone, runner: OnnxFeatures, side: int) -> str | None:
    """None when ONNX Runtime's map of a fixed random batch matches PyTorch's to float rounding
    (the pipeline's inference copy, in its own layout); else why not."""
    from mixgen.cam.cams import feature_maps

    views = torch.randint(0, 256, (2, side, side, 3), dtype=torch.uint8, generator=torch.Generator().manual_seed(0))
    expected = feature_maps(backbone, views, side)
    got = feature_maps(dataclasses.replace(backbone, features=runner), views, side)
    if got.shape != expected.shape:
        return f"ONNX map shape {tuple(got.shape)} differs from PyTorch's {tuple(expected.shape)}"
    scale = max(expected.abs().max().item(), 1e-6)
    error = (got - expected).abs().max().item()
    if not error <= 1e-3 * scale:
        return f"ONNX Runtime's maps differ from PyTorch's by {error:.2g} (scale {scale:.2g})"
    return None


def _one_line(exc: BaseException) -> str:
    first = one_line(exc)
    return f"{type(exc).__name__}: {first}" if first else type(exc).__name__


def cam_pass_backbone(
    backbone: Backbone, requested: str, device: torch.device, side: int, threads: int
) -> tuple[Backbone, RuntimeReport]:
    """The backbone whose ``features`` the CAM pass calls, and the report of the runtime chosen.
    auto: ONNX Runtime on a CPU, PyTorch on CUDA. The ONNX model is loaded from the cache, or
    exported, checked against PyTorch and cached; every failure falls back to PyTorch."""
    if requested not in RUNTIMES:
        raise UsageError(f"--runtime must be one of {', '.join(RUNTIMES)}, got {requested!r}")
    if requested == "onnxruntime" and device.type != "cpu":
        raise UsageError("--runtime onnxruntime runs on the CPU; with a CUDA --device use --runtime torch or auto")
    if requested == "torch" or device.type != "cpu":
        return backbone, RuntimeReport("torch", requested)
    report = RuntimeReport("torch", requested)

    def fall_back(why: str) -> tuple[Backbone, RuntimeReport]:
        report.note = f"ONNX Runtime not used ({why}); the CAM pass runs on PyTorch"
        return backbone, report

    try:
        report.versions = versions()
    except ImportError as exc:
        return fall_back(f"{exc.name or 'onnxruntime'} is not installed: pip install onnxruntime onnx")
    owner = _owner(backbone.features)
    if owner is None:
        return fall_back("the backbone's feature extractor is not a torch module")
    path = model_path(backbone, side, weights_digest(owner), report.versions)
    failed = path.with_suffix(".failed.json")
    report.model = str(path)
    if failed.is_file():
        with contextlib.suppress(OSError, ValueError, KeyError, TypeError):  # a damaged marker: retry
            return fall_back(f"{json.loads(failed.read_text())['reason']}; cached in {failed}")
    runner = None
    if path.is_file():
        with contextlib.suppress(Exception):  # a damaged cache file is simply exported again
            runner = OnnxFeatures(str(path), side, threads)
            runner(torch.zeros(1, 3, side, side))  # a run it cannot do shows now, not mid-pass
    if runner is None:
        started = time.perf_counter()
        try:
            data = export_onnx(backbone, side)
            runner = OnnxFeatures(data, side, threads)
            problem = _agrees(backbone, runner, side)
        except Exception as exc:  # noqa: BLE001 - exporter and runtime raise many types
            problem = f"export failed: {_one_line(exc)}"
        report.export_s = round(time.perf_counter() - started, 3)
        if problem is not None:
            with contextlib.suppress(OSError):
                _write_atomic(failed, json.dumps({"reason": problem, **report.versions}).encode())
            return fall_back(problem)
        report.exported = True
        try:
            _write_atomic(path, data)
        except OSError as exc:
            report.model = None
            report.note = f"ONNX model not cached ({exc.strerror or exc}: {path.parent}); set {CACHE_ENV}"
    report.name = "onnxruntime"
    return dataclasses.replace(backbone, features=runner), report
