"""``--checkpoint`` loads tensors only: a pickle that would run code is refused without running
it, and a class count that differs from SRC's is refused before any work starts."""

from __future__ import annotations

import os
import pickle
import re

import pytest
import torch

from mixgen.cam.backbones import load_state_dict
from mixgen.errors import MixgenError
from tests.conftest import SAMPLE, run_cli

TINY = ["--device", "cpu", "--size", "64", "--pairs", "4"]


class _RunsCode:
    """Unpickling this calls os.system, which would create the marker file."""

    def __init__(self, marker: str):
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch '{self.marker}'",))


@pytest.mark.parametrize("container", ["torch.save", "raw pickle"])
def test_malicious_pickle_is_refused_and_never_runs(tmp_path, container):
    marker = tmp_path / "pwned"
    path = tmp_path / "evil.pt"
    payload = {"conv.weight": torch.zeros(2), "payload": _RunsCode(str(marker))}
    if container == "torch.save":
        torch.save(payload, path)
    else:
        with open(path, "wb") as f:
            pickle.dump(payload, f)
    out = tmp_path / "out"
    result = run_cli("snapmix", SAMPLE, out, *TINY, "--checkpoint", path, expect=1)
    lines = [line for line in result.output.splitlines() if line.strip()]
    assert len(lines) == 1 and "Traceback" not in result.output
    assert "--checkpoint" in lines[0] and "refused" in lines[0] and "could run code" in lines[0]
    assert "weights_only` set to `False`" not in lines[0]  # never relay the unsafe advice
    assert not marker.exists()  # the code never ran
    assert not out.exists()  # nothing started
    with pytest.raises(MixgenError, match="refused"):
        load_state_dict(path, "--weights")
    assert not marker.exists()


def test_checkpoint_with_other_class_count_is_refused_before_work(tmp_path):
    import timm

    path = tmp_path / "three_classes.pt"
    torch.save(timm.create_model("tf_efficientnet_lite0", num_classes=3).state_dict(), path)
    out = tmp_path / "out"
    result = run_cli("snapmix", SAMPLE, out, *TINY, "--checkpoint", path, expect=1)
    lines = [line for line in result.output.splitlines() if line.strip()]
    assert len(lines) == 1 and "has 3 classes but SRC has 5" in lines[0]
    assert not out.exists()


def test_checkpoint_that_is_not_a_state_dict_is_refused(tmp_path):
    path = tmp_path / "list.pt"
    torch.save([torch.zeros(3)], path)
    result = run_cli("snapmix", SAMPLE, tmp_path / "out", *TINY, "--checkpoint", path, expect=1)
    assert "does not hold a state dict of tensors" in result.output
    garbage = tmp_path / "garbage.pt"
    garbage.write_bytes(b"\x00not a checkpoint")
    result = run_cli("snapmix", SAMPLE, tmp_path / "out", *TINY, "--checkpoint", garbage, expect=1)
    assert "Traceback" not in result.output and "--checkpoint" in result.output


@pytest.mark.parametrize(
    ("content", "found"),
    [
        (b"epoch,loss\n1,0.5\n", "found a text file (it begins 'epoch,loss')"),
        (b"", "found an empty file"),
        (b"\x00\x01not a checkpoint", "found binary data in no format torch.save writes"),
        (b"PK\x03\x04cut short", "found a zip archive that is not a complete torch.save file"),
    ],
    ids=["text", "empty", "binary", "zip"],
)
def test_a_file_torch_cannot_load_is_described_in_words(tmp_path, content, found):
    """Not torch's internals (a bare '(105)' from a text file): what the file should be, what it is."""
    path = tmp_path / "model.pt"
    path.write_bytes(content)
    result = run_cli("snapmix", SAMPLE, tmp_path / "out", *TINY, "--checkpoint", path, expect=1)
    lines = [line for line in result.output.splitlines() if line.strip()]
    assert len(lines) == 1 and "Traceback" not in result.output
    assert f"--checkpoint {path} is not a PyTorch checkpoint" in lines[0] and "saved with torch.save" in lines[0]
    assert found in lines[0] and "could run code" not in lines[0]
    assert not re.search(r"\(\d+\)", lines[0])  # no bare '(105)', torch's opcode number for a text file


def test_a_checkpoint_holding_other_objects_names_them_in_whole_words(tmp_path):
    import argparse

    path = tmp_path / "with_args.pt"
    torch.save({"conv.weight": torch.zeros(2), "args": argparse.Namespace(lr=0.1)}, path)
    with pytest.raises(MixgenError) as raised:
        load_state_dict(path, "--checkpoint")
    message = str(raised.value)
    assert "refused: besides tensors it holds argparse.Namespace, and loading that could run code" in message
    assert "add_safe" not in message and "weights_only" not in message
