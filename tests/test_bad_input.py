"""Bad input (docs/operations.md, "Bad input"): unreadable files are skipped and listed (``--strict``
fails), readable oddities are converted to upright 8-bit RGB, odd names and symlinks are handled,
and a bad SRC is one clear line. Never a traceback."""

from __future__ import annotations

import json
import os
import shutil
import struct
import zlib
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from mixgen.errors import DecodeError
from mixgen.sources.scan import scan
from mixgen.sources.views import load_view
from tests.conftest import SAMPLE, run_cli

CUT = ["--device", "cpu", "--size", "64", "--pairs", "24", "--workers", "2"]


def no_traceback(result) -> None:
    assert "Traceback" not in result.output
    assert result.exception is None or isinstance(result.exception, SystemExit), result.exception


def flat(text: str) -> str:
    """Output without whitespace: rich wraps long paths in its summary table."""
    return "".join(text.split())


def png_header(width: int, height: int) -> bytes:
    """A valid PNG signature and IHDR claiming ``width``×``height``, with a tiny IDAT: the header
    of a decompression bomb, without the bomb."""

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF)

    ihdr = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", zlib.compress(b"\0" * 64)) + chunk(b"IEND", b"")


def _zero(d: Path) -> str:
    (d / "zero.jpg").write_bytes(b"")
    return "zero.jpg"


def _truncated(d: Path) -> str:
    data = (d / "cat_0.jpg").read_bytes()
    (d / "truncated.jpg").write_bytes(data[: len(data) // 2])
    return "truncated.jpg"


def _text(d: Path) -> str:
    (d / "notes.jpg").write_text("this is a text file, not a JPEG\n")
    return "notes.jpg"


def _bomb(d: Path) -> str:
    (d / "bomb.png").write_bytes(png_header(100_000, 100_000))
    return "bomb.png"


def _bomb_below_pillow_limit(d: Path) -> str:
    # 20k×20k is over mixgen's limit but under twice Pillow's, where Pillow only warns.
    (d / "big.png").write_bytes(png_header(20_000, 20_000))
    return "big.png"


def _dangling(d: Path) -> str:
    os.symlink("no-such-file.jpg", d / "dangling.jpg")
    return "dangling.jpg"


UNREADABLE = {
    "zero-byte": _zero,
    "truncated-jpeg": _truncated,
    "text-named-jpg": _text,
    "decompression-bomb": _bomb,
    "bomb-under-pillow-limit": _bomb_below_pillow_limit,
    "dangling-symlink": _dangling,
}


@pytest.mark.filterwarnings("ignore::PIL.Image.DecompressionBombWarning")
@pytest.mark.parametrize("kind", UNREADABLE)
def test_unreadable_file_is_skipped_listed_and_strict_fails(sample_copy, tmp_path, kind):
    name = UNREADABLE[kind](sample_copy / "cat")
    out = tmp_path / "out"
    result = run_cli("cutmix", sample_copy, out, *CUT)
    no_traceback(result)
    record = json.loads((out / "mixgen.json").read_text())
    assert record["status"] == "complete"
    assert [s["path"] for s in record["skipped"]] == [f"cat/{name}"]
    assert record["counts"]["readable_sources"] == 20 and record["counts"]["skipped_sources"] == 1
    assert "20 readable, 1 skipped" in result.output and name in flat(result.output)
    run_cli("verify", out)

    strict = run_cli("cutmix", sample_copy, tmp_path / "strict", *CUT, "--strict", expect=1)
    no_traceback(strict)
    errors = [line for line in strict.output.splitlines() if "error" in line]
    assert len(errors) == 1 and "--strict" in errors[0] and name in errors[0]
    # --strict also holds when the views come from an earlier, lenient run's cache.
    again = run_cli("cutmix", sample_copy, out, *CUT, "--strict", expect=1)
    assert "--strict" in again.output


@pytest.mark.filterwarnings("ignore::PIL.Image.DecompressionBombWarning")
def test_decode_refuses_bombs_before_decoding(tmp_path):
    for make in (_bomb, _bomb_below_pillow_limit):
        with pytest.raises(DecodeError, match="decompression bomb"):
            load_view(tmp_path / make(tmp_path), 32)


# ---------------------------------------------------------------------------------------------
# Readable oddities: the view each still gets (docs/sources-and-outputs.md, "Sources")


def test_cmyk_jpeg_becomes_rgb(tmp_path):
    Image.new("CMYK", (40, 30), (0, 255, 255, 0)).save(tmp_path / "cmyk.jpg", quality=95)
    view = load_view(tmp_path / "cmyk.jpg", 16)
    assert view.shape == (16, 16, 3) and view.dtype == np.uint8
    assert np.abs(view.astype(int) - [255, 0, 0]).max() <= 8  # red


@pytest.mark.parametrize(("value", "expected"), [(65535, 255), (32896, 128), (200, 1)])
def test_16_bit_png_is_scaled_to_8_bit(tmp_path, value, expected):
    Image.fromarray(np.full((30, 40), value, np.uint16)).save(tmp_path / "deep.png")
    assert Image.open(tmp_path / "deep.png").mode.startswith("I")
    view = load_view(tmp_path / "deep.png", 16)
    assert (view == expected).all()  # gray, and a dark 16-bit image stays dark


def test_rgba_png_is_composited_on_white(tmp_path):
    pixels = np.zeros((32, 32, 4), np.uint8)
    pixels[:, :16] = [255, 0, 0, 0]  # fully transparent red: white
    pixels[:, 16:] = [255, 0, 0, 128]  # half-transparent red: pink
    Image.fromarray(pixels, "RGBA").save(tmp_path / "rgba.png")
    view = load_view(tmp_path / "rgba.png", 32)
    assert (view[:, :12] == 255).all()
    assert np.abs(view[:, 20:].astype(int) - [255, 127, 127]).max() <= 1


def test_palette_gif_first_frame_with_transparency(tmp_path):
    frames = [Image.new("RGB", (30, 30), (0, 0, 255)), Image.new("RGB", (30, 30), (0, 255, 0))]
    frames = [f.convert("P", palette=Image.Palette.ADAPTIVE) for f in frames]
    frames[0].save(tmp_path / "anim.gif", save_all=True, append_images=frames[1:])
    view = load_view(tmp_path / "anim.gif", 16)
    assert (view == [0, 0, 255]).all()  # first frame, palette resolved
    transparent = Image.new("P", (20, 20), 0)
    transparent.putpalette([0, 255, 0] * 256)
    transparent.save(tmp_path / "clear.gif", transparency=0)
    assert (load_view(tmp_path / "clear.gif", 16) == 255).all()  # transparency on white


@pytest.mark.parametrize(("orientation", "top"), [(6, "red"), (8, "blue"), (1, None)])
def test_exif_orientation_is_applied(tmp_path, orientation, top):
    pixels = np.zeros((32, 64, 3), np.uint8)
    pixels[:, :32] = [255, 0, 0]  # stored: left half red, right half blue
    pixels[:, 32:] = [0, 0, 255]
    exif = Image.Exif()
    exif[0x0112] = orientation
    Image.fromarray(pixels).save(tmp_path / "rotated.jpg", exif=exif, quality=95)
    view = load_view(tmp_path / "rotated.jpg", 32, "squash").astype(int)
    red, blue = np.array([255, 0, 0]), np.array([0, 0, 255])
    if top is None:  # upright: left red, right blue
        assert np.abs(view[:, 4] - red).max() < 40 and np.abs(view[:, -4] - blue).max() < 40
    else:  # 6: rotate 90° clockwise to display, so the stored left half ends on top; 8: the other way
        first, second = (red, blue) if top == "red" else (blue, red)
        assert np.abs(view[4] - first).max() < 40 and np.abs(view[-4] - second).max() < 40


def test_one_pixel_image_is_scaled_up(tmp_path):
    Image.new("RGB", (1, 1), (0, 200, 0)).save(tmp_path / "dot.png")
    for resize in ("crop", "squash"):
        assert (load_view(tmp_path / "dot.png", 24, resize) == [0, 200, 0]).all()


@pytest.mark.parametrize("suffix", ["webp", "bmp", "tiff", "png"])
def test_other_formats_decode(tmp_path, suffix):
    Image.new("RGB", (30, 20), (10, 120, 240)).save(
        tmp_path / f"x.{suffix}", **({"lossless": True} if suffix == "webp" else {})
    )
    assert (load_view(tmp_path / f"x.{suffix}", 16) == [10, 120, 240]).all()


def test_all_oddities_together_end_to_end(sample_copy, tmp_path):
    """CMYK, 16-bit, RGBA, palette GIF, EXIF-rotated, 1×1, non-ASCII and spaced names, a symlinked
    file: every one is read (none skipped) and named correctly in the manifest."""
    cat = sample_copy / "cat"
    Image.new("CMYK", (40, 30), (0, 255, 255, 0)).save(cat / "cmyk.jpg")
    Image.fromarray(np.full((30, 40), 40000, np.uint16)).save(cat / "deep16.png")
    Image.new("RGBA", (40, 30), (255, 0, 0, 100)).save(cat / "alpha.png")
    Image.new("RGB", (40, 30), (0, 0, 255)).convert("P", palette=Image.Palette.ADAPTIVE).save(cat / "pal.gif")
    exif = Image.Exif()
    exif[0x0112] = 6
    Image.new("RGB", (60, 30), (9, 9, 9)).save(cat / "rotated.jpg", exif=exif)
    Image.new("RGB", (1, 1), (0, 255, 0)).save(cat / "dot.png")
    shutil.copy(cat / "cat_0.jpg", cat / "chat noir é ü 猫.jpg")
    (sample_copy / "café au lait").mkdir()
    shutil.copy(sample_copy / "coffee" / "coffee_0.jpg", sample_copy / "café au lait" / "tasse n°1.jpg")
    shutil.copy(sample_copy / "coffee" / "coffee_1.jpg", sample_copy / "café au lait" / "tasse 2.JPG")
    os.symlink("cat_1.jpg", cat / "linked.jpg")
    odd = ["cat/cmyk.jpg", "cat/deep16.png", "cat/alpha.png", "cat/pal.gif", "cat/rotated.jpg", "cat/dot.png"]
    odd += ["cat/chat noir é ü 猫.jpg", "café au lait/tasse n°1.jpg", "café au lait/tasse 2.JPG", "cat/linked.jpg"]
    out = tmp_path / "out"
    result = run_cli("cutmix", sample_copy, out, *CUT, "--pairs", "60")
    no_traceback(result)
    record = json.loads((out / "mixgen.json").read_text())
    assert record["skipped"] == [] and record["counts"]["readable_sources"] == 30
    assert "café au lait" in record["source"]["classes"]
    import pyarrow.dataset as ds

    table = ds.dataset(str(out / "data"), format="parquet").to_table()
    canvases = set(table.column("source_a").to_pylist())
    assert set(odd) <= canvases  # 60 pairs over 30 sources: each is a canvas twice
    run_cli("verify", out)


# ---------------------------------------------------------------------------------------------
# Names, symlinks and folders


def test_symlink_loops_and_odd_entries_never_break_the_scan(sample_copy, tmp_path):
    cat = sample_copy / "cat"
    os.symlink(".", cat / "self-loop")  # a folder linking to itself: never descended
    os.symlink("ring", cat / "ring")  # a link to itself: ELOOP on stat
    os.symlink("ring.jpg", cat / "ring.jpg")  # the same, with an image suffix: skipped at decode
    os.symlink("..", sample_copy / "up")  # a class folder linking back above SRC
    os.symlink("selfish", sample_copy / "selfish")  # ELOOP at the top level
    os.symlink(str(sample_copy / "flower"), sample_copy / "zz-flower-link")  # a symlinked class folder
    index = scan(sample_copy)
    assert "up" not in index.classes and "selfish" not in index.classes
    assert "zz-flower-link" in index.classes
    assert any("'up'" in w and "loop" in w for w in index.warnings)
    assert len(index) == 20 + 4 + 1  # sample, the linked class, ring.jpg
    out = tmp_path / "out"
    result = run_cli("cutmix", sample_copy, out, *CUT)
    no_traceback(result)
    record = json.loads((out / "mixgen.json").read_text())
    assert [s["path"] for s in record["skipped"]] == ["cat/ring.jpg"]
    assert "loop" in flat(result.output)  # the warning is in the summary


def test_file_names_that_are_not_utf8_are_ignored_with_a_warning(sample_copy, tmp_path):
    try:
        bad = os.path.join(os.fsencode(sample_copy / "cat"), b"caf\xe9.jpg")
        shutil.copy(os.fsencode(sample_copy / "cat" / "cat_0.jpg"), bad)
    except (OSError, UnicodeError):
        pytest.skip("this filesystem refuses non-UTF-8 names")
    out = tmp_path / "out"
    result = run_cli("cutmix", sample_copy, out, *CUT)
    no_traceback(result)
    record = json.loads((out / "mixgen.json").read_text())
    assert record["counts"]["sources"] == 20
    assert any("not valid UTF-8" in w for w in record["source"]["warnings"])


def test_empty_class_folder_keeps_its_id_and_warns(sample_copy, tmp_path):
    (sample_copy / "dog").mkdir()
    out = tmp_path / "out"
    result = run_cli("cutmix", sample_copy, out, *CUT)
    no_traceback(result)
    record = json.loads((out / "mixgen.json").read_text())
    assert record["source"]["classes"] == ["astronaut", "cat", "coffee", "dog", "flower", "rocket"]
    assert "class folder 'dog' holds no images" in record["source"]["warnings"]
    assert "dog" in flat(result.output)


@pytest.fixture
def one_class(tmp_path) -> Path:
    src = tmp_path / "one"
    shutil.copytree(SAMPLE / "cat", src / "cat")
    return src


def test_single_class_probe_is_a_clear_error(one_class, tmp_path):
    result = run_cli("snapmix", one_class, tmp_path / "out", *CUT, expect=1)
    no_traceback(result)
    lines = [line for line in result.output.splitlines() if line.strip()]
    assert len(lines) == 1 and "one class only" in lines[0] and "--cam mean" in lines[0]
    assert not (tmp_path / "out").exists()
    cross = run_cli("cutmix", one_class, tmp_path / "out", *CUT, "--pairing", "cross-class", expect=1)
    assert "one class only" in cross.output


@pytest.mark.parametrize(
    ("method", "options"), [pytest.param("attentive", ["--grid", "4"], marks=pytest.mark.slow), ("cutmix", [])]
)
def test_single_class_mixes_with_a_warning_that_both_labels_are_that_class(one_class, tmp_path, method, options):
    out = tmp_path / "out"
    result = run_cli(method, one_class, out, "--device", "cpu", "--size", "64", "--pairs", "6", *options)
    no_traceback(result)
    record = json.loads((out / "mixgen.json").read_text())
    assert record["status"] == "complete"
    [warning] = [w for w in record["source"]["warnings"] if "one class only" in w]
    assert "'cat'" in warning and "--pairing same-class" in warning
    assert "oneclassonly" in flat(result.output)  # in the summary too
    same = run_cli(method, one_class, tmp_path / "same", "--device", "cpu", "--size", "64", "--pairs", "6", *options,
                   "--pairing", "same-class")  # fmt: skip
    assert "one class only" not in json.dumps(json.loads((tmp_path / "same" / "mixgen.json").read_text()))
    no_traceback(same)


@pytest.mark.parametrize("case", ["missing", "file", "empty", "no-images"])
def test_bad_src_is_one_line_exit_1(tmp_path, case):
    src = tmp_path / "src"
    if case == "file":
        src.write_text("not a folder")
    elif case == "empty":
        src.mkdir()
    elif case == "no-images":
        (src / "cat").mkdir(parents=True)
        (src / "cat" / "readme.txt").write_text("no images here")
    result = run_cli("cutmix", src, tmp_path / "out", *CUT, expect=1)
    no_traceback(result)
    lines = [line for line in result.output.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("mixgen: error: SRC") and str(src) in lines[0]


def test_all_sources_unreadable_is_a_clear_error(tmp_path):
    src = tmp_path / "src"
    for name in ("a", "b"):
        (src / name).mkdir(parents=True)
        (src / name / "x.jpg").write_bytes(b"")
    result = run_cli("cutmix", src, tmp_path / "out", *CUT, expect=1)
    no_traceback(result)
    assert "fewer than 2 readable images" in result.output


def test_fifos_in_src_are_skipped_with_a_reason_never_opened(sample_copy, tmp_path):
    """A FIFO (or a symlink to one) named like an image would block the decoder's open for good:
    only regular files are read, anything else is refused at the scan with its reason."""
    from tests.test_cache_checksums import fifo_watchdog
    from tests.test_sources import make_cub

    os.mkfifo(sample_copy / "cat" / "pipe.jpg")
    (sample_copy / "cat" / "deeper").mkdir()
    os.symlink("../pipe.jpg", sample_copy / "cat" / "deeper" / "link.png")
    os.mkfifo(sample_copy / "stray.jpg")  # directly in SRC: ignored like any stray image
    index = scan(sample_copy)
    assert len(index) == 20
    assert [(r["path"], "FIFO" in r["reason"]) for r in index.rejected] == [
        ("cat/deeper/link.png", True),
        ("cat/pipe.jpg", True),
    ]
    out = tmp_path / "out"
    with fifo_watchdog(sample_copy / "cat" / "pipe.jpg") as released:
        result = run_cli("cutmix", sample_copy, out, *CUT)
    assert not released.is_set()
    no_traceback(result)
    record = json.loads((out / "mixgen.json").read_text())
    assert record["status"] == "complete" and record["counts"]["sources"] == 20
    assert sorted(s["path"] for s in record["skipped"]) == ["cat/deeper/link.png", "cat/pipe.jpg"]
    strict = run_cli("cutmix", sample_copy, tmp_path / "strict", *CUT, "--strict", expect=1)
    assert "unusable source cat/deeper/link.png" in strict.output and "index" not in strict.output
    assert "move it out of SRC" in strict.output

    cub = make_cub(tmp_path / "cub")
    (cub / "images" / "001.Albatross" / "a1.jpg").unlink()
    os.mkfifo(cub / "images" / "001.Albatross" / "a1.jpg")
    index = scan(cub)
    assert [s.path for s in index.items] == ["images/002.Bunting/b1.jpg"]
    [refused] = index.rejected
    assert refused["path"] == "images/001.Albatross/a1.jpg" and "FIFO" in refused["reason"]

    listed = sample_copy / "index.csv"
    listed.write_text("path,label\ncat/pipe.jpg,cat\ncat/cat_0.jpg,cat\nrocket/rocket_0.jpg,rocket\n")
    [refused] = scan(listed).rejected
    assert refused["path"] == "cat/pipe.jpg" and "FIFO" in refused["reason"]


def test_after_a_strict_failure_fixing_src_lets_the_same_command_start_afresh(sample_copy, tmp_path):
    """Following --strict's advice (remove the bad file) must not be refused as 'a different run':
    the failed run wrote no output, so there is nothing in OUT to keep."""
    bad = sample_copy / "cat" / UNREADABLE["truncated-jpeg"](sample_copy / "cat")
    out = tmp_path / "out"
    run_cli("cutmix", sample_copy, out, *CUT, "--strict", expect=1)
    assert json.loads((out / "mixgen.json").read_text())["status"] == "failed"
    bad.unlink()
    dry = run_cli("cutmix", sample_copy, out, *CUT, "--strict", "--dry-run")
    assert flat("stopped before writing any output") in flat(dry.output)
    run_cli("cutmix", sample_copy, out, *CUT, "--strict")
    assert json.loads((out / "mixgen.json").read_text())["status"] == "complete"
    run_cli("verify", out)
    # A run that wrote outputs is still protected: other settings are refused without --overwrite.
    refused = run_cli("cutmix", sample_copy, out, *CUT, "--seed", "1", expect=1)
    assert flat("holds a different mixgen run (--seed 0 → 1)") in flat(refused.output)
