"""Source scanning for the ImageFolder and CUB layouts (docs/sources-and-outputs.md, "Sources")."""

from __future__ import annotations

from pathlib import Path

import pytest
from PIL import Image

from mixgen.errors import MixgenError
from mixgen.output.manifest import soft_targets
from mixgen.sources.scan import scan


def test_imagefolder_classes_sorted_and_paths_relative(sample_src):
    index = scan(sample_src)
    assert index.layout == "imagefolder"
    assert index.classes == sorted(index.classes) == ["astronaut", "cat", "coffee", "flower", "rocket"]
    assert len(index) == 20
    assert index.items[0].path == "astronaut/astronaut_0.jpg" and index.items[0].label == 0
    assert [s.path for s in index.items] == sorted(s.path for s in index.items)
    assert scan(sample_src).digest == index.digest


def test_digest_changes_when_sources_change(sample_copy):
    before = scan(sample_copy).digest
    Image.new("RGB", (20, 20)).save(sample_copy / "cat" / "extra.png")
    assert scan(sample_copy).digest != before


def make_cub(root: Path) -> Path:
    (root / "images" / "001.Albatross").mkdir(parents=True)
    (root / "images" / "002.Bunting").mkdir(parents=True)
    rows = [
        ("1", "001.Albatross/a1.jpg", "1", "1"),
        ("2", "001.Albatross/a2.jpg", "1", "0"),
        ("3", "002.Bunting/b1.jpg", "2", "1"),
        ("4", "002.Bunting/b2.jpg", "2", "0"),
    ]
    for _, rel, _, _ in rows:
        Image.new("RGB", (30, 20), "red").save(root / "images" / rel)
    (root / "images.txt").write_text("".join(f"{i} {rel}\n" for i, rel, _, _ in rows))
    (root / "image_class_labels.txt").write_text("".join(f"{i} {c}\n" for i, _, c, _ in rows))
    (root / "train_test_split.txt").write_text("".join(f"{i} {t}\n" for i, _, _, t in rows))
    (root / "classes.txt").write_text("1 001.Albatross\n2 002.Bunting\n")
    return root


def test_cub_layout_detected_with_zero_based_labels_and_splits(tmp_path):
    root = make_cub(tmp_path / "CUB_200_2011")
    train = scan(root)
    assert train.layout == "cub"
    assert train.classes == ["001.Albatross", "002.Bunting"]
    assert [(s.path, s.label) for s in train.items] == [
        ("images/001.Albatross/a1.jpg", 0),
        ("images/002.Bunting/b1.jpg", 1),
    ]
    assert len(scan(root, split="test")) == 2
    assert len(scan(root, split="all")) == 4
    assert scan(root, layout="imagefolder").layout == "imagefolder"


@pytest.mark.parametrize(
    ("name", "text", "where"),
    [
        ("image_class_labels.txt", b"1 1\n2 1\n3 abc\n4 2\n", "image_class_labels.txt line 3"),
        ("images.txt", b"1 001.Albatross/a1.jpg\n2\n", "images.txt line 2"),
        ("images.txt", b"1 001.Albatross/a1.jpg\n2 001.Albatross/a\xe92.jpg\n", "images.txt line 2"),
        ("classes.txt", b"1 001.Albatross\nx 002.Bunting\n", "classes.txt line 2"),
        ("classes.txt", b"1 001.Albatross\n1 002.Bunting\n", "classes.txt line 2"),
        ("train_test_split.txt", b"1 1\n2\n", "train_test_split.txt line 2"),
        # 31.7: files that contradict themselves or each other
        (
            "images.txt",
            b"1 001.Albatross/a1.jpg\n2 001.Albatross/a2.jpg\n3 002.Bunting/b1.jpg\n"
            b"4 002.Bunting/b2.jpg\n5 001.Albatross/a1.jpg\n",
            "images.txt line 5: 001.Albatross/a1.jpg is listed again",
        ),
        ("images.txt", b"1 001.Albatross/a1.jpg\n2 001.Albatross/a2.jpg\n1 002.Bunting/b1.jpg\n", "images.txt line 3"),
        ("image_class_labels.txt", b"1 1\n2 1\n3 2\n4 2\n1 2\n", "image_class_labels.txt line 5"),
        ("train_test_split.txt", b"1 1\n2 0\n4 0\n", "image 3 (images.txt line 3) has no line in train_test_split.txt"),
        ("train_test_split.txt", b"1 1\n2 0\n3 2\n4 0\n", "train_test_split.txt line 3: '2' is not 1"),
        ("train_test_split.txt", b"1 1\n2 0\n3 yes\n4 0\n", "train_test_split.txt line 3: 'yes' is not 1"),
    ],
)
def test_malformed_cub_files_are_one_line_naming_file_and_line(tmp_path, name, text, where):
    root = make_cub(tmp_path / "CUB_200_2011")
    (root / name).write_bytes(text)
    with pytest.raises(MixgenError) as caught:
        scan(root)
    message = str(caught.value)
    assert where in message and "\n" not in message


def test_cub_subset_maps_the_ids_of_classes_txt_to_0_based_in_file_order(tmp_path):
    """A zero-shot split keeps the original species ids (here 26 and 27 of 200) in every file."""
    root = make_cub(tmp_path / "CUB_200_2011")
    (root / "image_class_labels.txt").write_text("1 26\n2 26\n3 27\n4 27\n")
    (root / "classes.txt").write_text("27 002.Bunting\n26 001.Albatross\n")
    index = scan(root, split="all")
    assert index.classes == ["002.Bunting", "001.Albatross"]
    assert [(s.path, s.label) for s in index.items] == [
        ("images/001.Albatross/a1.jpg", 1),
        ("images/001.Albatross/a2.jpg", 1),
        ("images/002.Bunting/b1.jpg", 0),
        ("images/002.Bunting/b2.jpg", 0),
    ]
    (root / "classes.txt").unlink()  # no classes.txt: the ids used, sorted, named by their folders
    index = scan(root, split="all")
    assert index.classes == ["001.Albatross", "002.Bunting"]
    assert [s.label for s in index.items] == [0, 0, 1, 1]
    (root / "classes.txt").write_text("26 001.Albatross\n")
    with pytest.raises(MixgenError, match="image 3 .*class 27.*classes.txt"):
        scan(root, split="all")


def test_missing_and_empty_src_are_clear_errors(tmp_path):
    with pytest.raises(MixgenError, match="does not exist"):
        scan(tmp_path / "nope")
    (tmp_path / "empty").mkdir()
    with pytest.raises(MixgenError, match="no class sub-folders"):
        scan(tmp_path / "empty")
    (tmp_path / "empty" / "cls").mkdir()
    with pytest.raises(MixgenError, match="holds no images"):
        scan(tmp_path / "empty")


def test_soft_targets_merge_same_class_and_sum_to_one():
    assert soft_targets(3, 3, 0.7, 0.6) == [{"class_id": 3, "weight": 1.0}]
    merged = soft_targets(4, 1, 0.6, 0.2)
    assert [t["class_id"] for t in merged] == [1, 4]
    assert abs(sum(t["weight"] for t in merged) - 1) < 1e-9
    assert merged[1]["weight"] == pytest.approx(0.75)
    assert soft_targets(2, 5, 1.0, 0.0) == [{"class_id": 2, "weight": 1.0}]
