"""``--help`` as a user reads it at 80 columns: options in panels, choices as choices, flags
without a type, ``SRC OUT`` in the usage line, plain defaults, no line wider than the terminal,
and no heavy import (torch, timm, pyarrow) to print it."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

from mixgen.options import FLAGS, PANELS

ROOT = Path(__file__).resolve().parents[1]
# Prints a command's help as the console entry point does, then which heavy modules it imported.
HELP = """
import sys
from mixgen.cli import app
try:
    app(sys.argv[1:], prog_name="mixgen")
except SystemExit:
    pass
sys.stdout.flush()
print(__import__("json").dumps(sorted({"torch", "timm", "pyarrow", "torchvision"} & set(sys.modules))))
"""


def help_at_80(*command: str) -> tuple[str, list[str]]:
    env = {**os.environ, "COLUMNS": "80", "TERMINAL_WIDTH": "80", "PYTHONPATH": str(ROOT), "NO_COLOR": "1"}
    env.pop("FORCE_COLOR", None)
    done = subprocess.run(
        [sys.executable, "-c", HELP, *command, "--help"], capture_output=True, text=True, env=env, timeout=120
    )
    assert done.returncode == 0, done.stderr
    text, _, imported = done.stdout.rstrip().rpartition("\n")
    return text, json.loads(imported)


def panel(text: str, title: str) -> str:
    """The lines of one help panel (from its title to the next panel)."""
    match = re.search(rf"╭─ {re.escape(title)}[^\n]*\n(.*?)╰", text, re.S)
    assert match, f"no panel {title!r} in\n{text}"
    return match.group(1)


@pytest.fixture(scope="module")
def snapmix_help() -> tuple[str, list[str]]:
    return help_at_80("snapmix")


def test_snapmix_help_reads_well_at_80_columns(snapmix_help):
    text, imported = snapmix_help
    assert imported == [], f"--help imported {imported}"
    assert "Usage: mixgen snapmix [OPTIONS] SRC OUT" in text
    assert max(len(line) for line in text.splitlines()) <= 80
    for title in PANELS:
        panel(text, title)
    assert "--beta" in panel(text, "Method") and "[semantic|boxes|teacher]" in panel(text, "Method")  # no area rule
    assert "--cam-norm" in panel(text, "CAM and backbone") and "--workers" in panel(text, "Performance")
    assert "--layout" in panel(text, "Input") and "--dry-run" in panel(text, "Run control")
    assert "[colour|floor|relu|raw]" in text and "[crop|squash]" in text
    assert "<bool>" not in text and "--no-strict" not in text
    assert "<str>" not in panel(text, "Output")  # --format, --resize, --writer show their choices
    assert "[default: (" not in text and "[default: all cores]" in text and "[default: probe; checkpoint" in text


def test_every_option_declares_a_known_panel():
    assert all(flag.panel in PANELS for flag in FLAGS.values())


@pytest.mark.parametrize("command", ["cutmix", "cam", "preview", "verify"])
def test_other_commands_fit_80_columns(command):
    text, imported = help_at_80(command)
    assert imported == []
    assert max(len(line) for line in text.splitlines()) <= 80
    assert "<bool>" not in text and "[default: (" not in text
    assert re.search(r"Usage: mixgen \S+ \[OPTIONS\] (SRC OUT|OUT) *\n", text), text


@pytest.mark.parametrize(
    "command",
    ["snapmix", "attentive", "cutmix", "mixup", "resizemix", "saliencymix", "fmix", "gridmix", "cam"]
    + ["preview", "stats", "verify"],
)
def test_options_name_what_they_take(command):
    """31.4: ``--pairs N``, ``--device DEVICE``, never typer's ``<int>`` or ``<str>``."""
    text, _ = help_at_80(command)
    options = [line for line in text.splitlines() if re.match(r"│ +--", line)]
    assert options and not [line for line in options if re.search(r"<[a-z]+>", line)]
    named = {"cutmix": ["--pairs  +N ", "--device  +DEVICE ", "--path-column  +NAME "], "snapmix": ["--cam-size  +PX "]}
    for pattern in named.get(command, []):
        assert re.search(pattern, text), pattern
