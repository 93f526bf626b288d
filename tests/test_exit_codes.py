"""One rule for exit codes (README, "Exit codes"): 2 when the command line is wrong by itself
(an unknown option, a missing argument, a value or combination the options do not accept);
1 when the command line is fine but what it points at refuses (SRC, OUT, a file an option
names, the disk); 3 when ``verify`` finds problems; 130 when interrupted. Every error is one
line without a traceback."""

from __future__ import annotations

import subprocess
import sys

import pytest

from tests.conftest import REPO, SAMPLE, one_line, run_cli

CUT = ["--size", "32", "--pairs", "4", "--device", "cpu"]


# (name, args after the command with {src} / {out} / {tmp} filled in, text of the error)
USAGE = [
    ("bad value", ["cutmix", "{src}", "{out}", "--pairs", "0"], "--pairs must be a positive integer"),
    ("bad choice", ["snapmix", "{src}", "{out}", "--cam-norm", "soft"], "--cam-norm must be colour, floor"),
    ("combination", ["cutmix", "{src}", "{out}", "--cam", "probe"], "uses no CAM"),
    ("viewer value", ["preview", "{out}", "--count", "0"], "--count must be >= 1"),
    ("verify value", ["verify", "{out}", "--recompute", "some"], "--recompute must be a positive number"),
    ("unknown backbone", ["snapmix", "{src}", "{out}", "--backbone", "nosuchnet"], "no torchvision or timm model"),
]
TYPER_USAGE = [
    ("not a number", ["cutmix", "{src}", "{out}", "--pairs", "many"], "--pairs"),
    ("unknown option", ["cutmix", "{src}", "{out}", "--bogus"], "--bogus"),
    ("missing argument", ["cutmix", "{src}"], "OUT"),
    ("unknown command", ["snapmax", "{src}", "{out}"], "snapmax"),
]
REFUSED = [
    ("missing SRC", ["cutmix", "{tmp}/nowhere", "{out}"], "does not exist"),
    ("empty SRC", ["cutmix", "{tmp}/empty", "{out}"], "no class sub-folders"),
    ("OUT inside SRC", ["cutmix", "{copy}", "{copy}/out"], "choose an OUT outside SRC"),
    ("OUT is a file", ["cutmix", "{src}", "{tmp}/file.txt"], "is a file"),
    ("cam OUT inside SRC", ["cam", "{copy}", "{copy}/cams"], "choose an OUT outside SRC"),
    ("missing --checkpoint", ["snapmix", "{src}", "{out}", "--checkpoint", "{tmp}/no.pt"], "no such file"),
    ("missing --weights", ["attentive", "{src}", "{out}", "--weights", "{tmp}/no.pth"], "no such file"),
    ("missing --classes", ["cutmix", "{src}", "{out}", "--classes", "{tmp}/none.txt"], "no such file"),
    ("index without its column", ["cutmix", "{tmp}/index.csv", "{out}"], "no column 'path'"),
    ("SRC is another file", ["cutmix", "{tmp}/file.txt", "{out}"], "is not a folder or an index file"),
    ("verify of no folder", ["verify", "{tmp}/nowhere"], "is not a folder holding a mixgen run"),
    ("verify of an empty folder", ["verify", "{tmp}/empty"], "is not a folder holding a mixgen run (no mixgen.json"),
]


def fill(args: list[str], tmp_path, copy) -> list[str]:
    (tmp_path / "empty").mkdir(exist_ok=True)
    (tmp_path / "file.txt").write_text("not a folder\n")
    (tmp_path / "index.csv").write_text("file,class\ncat/cat_0.jpg,cat\n")
    names = {"src": SAMPLE, "out": tmp_path / "out", "tmp": tmp_path, "copy": copy}
    small = {"cutmix": CUT, "snapmix": CUT, "cam": CUT[-2:]}.get(args[0], [])  # before the case's own options
    return [args[0], *small, *(arg.format(**names) for arg in args[1:])]


@pytest.mark.parametrize(("name", "args", "text"), USAGE, ids=[c[0] for c in USAGE])
def test_usage_errors_exit_2_with_one_line(tmp_path, sample_copy, name, args, text):
    result = run_cli(*fill(args, tmp_path, sample_copy), expect=2)
    assert text in one_line(result.output)
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize(("name", "args", "text"), TYPER_USAGE, ids=[c[0] for c in TYPER_USAGE])
def test_command_line_parse_errors_exit_2(tmp_path, sample_copy, name, args, text):
    result = run_cli(*fill(args, tmp_path, sample_copy), expect=2)
    assert text in result.output and "Traceback" not in result.output


@pytest.mark.parametrize(("name", "args", "text"), TYPER_USAGE, ids=[c[0] for c in TYPER_USAGE])
def test_command_line_parse_errors_are_one_line_from_the_console_command(tmp_path, sample_copy, name, args, text):
    """What a user sees from ``mixgen``: the parser's errors in mixgen's one-line form, naming
    the help to read, instead of a usage block and a boxed panel."""
    command = [sys.executable, "-m", "mixgen", *fill(args, tmp_path, sample_copy)]
    result = subprocess.run(command, cwd=REPO, capture_output=True, text=True, timeout=120)
    assert result.returncode == 2 and not result.stdout
    line = one_line(result.stderr)
    assert line.startswith("mixgen: error:") and text in line and "--help'" in line


def test_bare_mixgen_prints_its_help():
    result = subprocess.run([sys.executable, "-m", "mixgen"], cwd=REPO, capture_output=True, text=True, timeout=120)
    assert result.returncode == 2 and "Usage:" in result.stdout + result.stderr and "snapmix" in result.stdout


@pytest.mark.parametrize(("name", "args", "text"), REFUSED, ids=[c[0] for c in REFUSED])
def test_refusals_exit_1_with_one_line(tmp_path, sample_copy, name, args, text):
    result = run_cli(*fill(args, tmp_path, sample_copy), expect=1)
    assert text in one_line(result.output)
    assert not (tmp_path / "out").exists() and not (sample_copy / "out").exists()


def test_interrupted_exits_130(tmp_path, monkeypatch):
    import mixgen.pipeline.run

    def interrupted(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(mixgen.pipeline.run, "run", interrupted)
    result = run_cli("cutmix", SAMPLE, tmp_path / "out", *CUT, expect=130)
    assert "interrupted" in one_line(result.output)


def test_verify_problems_exit_3(tmp_path):
    out = tmp_path / "out"
    run_cli("cutmix", SAMPLE, out, *CUT)
    next(out.glob("data/*/*.jpg")).write_bytes(b"changed")
    result = run_cli("verify", out, expect=3)
    assert "sha256" in result.output or "differs" in result.output


HUB_OFFLINE = (
    "An error happened while trying to locate the file on the Hub and we cannot find the requested files in "
    "the local cache. Please check your connection and try again or make sure your Internet connection is on."
)
UNSAFE = (
    "WeightsUnpickler error: Unsupported global: GLOBAL argparse.Namespace was not an allowed global by default "
    "Please use `torch.serialization.add_safe_globals([argparse.Namespace])` or the context manager"
)


@pytest.mark.parametrize("text", [HUB_OFFLINE, UNSAFE, "x" * 20 + " " + "word " * 60])
def test_quoted_exception_text_is_never_cut_mid_word(text):
    """Library messages quoted inside a one-line error keep their first sentence when it fits, or
    are cut at a word boundary with an ellipsis: never 'try aga' or 'add_safe'."""
    from mixgen.errors import one_line

    short = one_line(f"\n  {text}\nsecond line", 160)
    assert len(short) <= 160 and "\n" not in short and "second line" not in short
    if text == HUB_OFFLINE:
        assert short == text.split(". ")[0] + "."  # the whole first sentence
    else:
        assert short.endswith("\u2026")
        kept = short[:-1].split()
        assert kept == text.split()[: len(kept)]  # whole words only
    assert one_line("fits as it is") == "fits as it is" and one_line("") == ""


def test_paths_with_brackets_are_printed_as_typed(tmp_path):
    """Error lines are not rich markup: '[x]' in a path stays, '[/x]' does not crash the printer."""
    for name in ("[x]", "[/x]"):
        result = run_cli("cutmix", tmp_path / name / "nowhere", tmp_path / "out", *CUT, expect=1)
        assert f"{name}/nowhere does not exist" in one_line(result.output)
