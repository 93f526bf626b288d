"""The encode stage (``mixgen.pipeline.encode``): an image array to its file bytes, and the batch
handed to the encoder threads."""

from __future__ import annotations

import io

import numpy as np
import pytest
import torch
from PIL import Image

from mixgen.config import RunConfig
from mixgen.pipeline.encode import encode, encode_output, to_encode


def _image(h: int = 16, w: int = 24) -> np.ndarray:
    rng = np.random.default_rng(0)
    return rng.integers(0, 256, (h, w, 3), dtype=np.uint8)


def test_png_is_lossless_and_decodes_to_the_same_pixels():
    image = _image()
    data = encode(image, "png", 95)
    assert data[:8] == b"\x89PNG\r\n\x1a\n"
    np.testing.assert_array_equal(np.asarray(Image.open(io.BytesIO(data))), image)


@pytest.mark.parametrize(("fmt", "magic"), [("jpg", b"\xff\xd8"), ("webp", b"RIFF")])
def test_lossy_formats_keep_size_and_stay_close(fmt, magic):
    image = np.full((16, 24, 3), (200, 40, 90), dtype=np.uint8)
    data = encode(image, fmt, 95)
    assert data.startswith(magic)
    decoded = np.asarray(Image.open(io.BytesIO(data)).convert("RGB"))
    assert decoded.shape == image.shape
    assert np.abs(decoded.astype(int) - image).max() <= 8


def test_jpeg_quality_is_honoured_and_high_quality_keeps_full_chroma():
    image = _image(64, 64)
    small, large = encode(image, "jpg", 20), encode(image, "jpg", 95)
    assert len(small) < len(large)
    assert Image.open(io.BytesIO(large)).layer == [(1, 1, 1, 0), (2, 1, 1, 1), (3, 1, 1, 1)]  # 4:4:4


def test_encoding_is_deterministic():
    image = _image()
    for fmt in ("jpg", "png", "webp"):
        assert encode(image, fmt, 90) == encode(image, fmt, 90)


def test_an_unknown_format_is_refused():
    with pytest.raises(ValueError):
        encode(_image(), "gif", 95)


def test_to_encode_hands_the_cpu_threads_hwc_arrays_and_encode_output_passes_bytes_through(tmp_path):
    cfg = RunConfig(method="cutmix", src=tmp_path, out=tmp_path / "out", size=8, codec="cpu")
    batch = torch.arange(2 * 3 * 4 * 5, dtype=torch.uint8).reshape(2, 3, 4, 5)
    arrays = to_encode(batch, cfg)
    assert isinstance(arrays, np.ndarray) and arrays.shape == (2, 4, 5, 3)
    np.testing.assert_array_equal(arrays[1, 2, 3], batch[1, :, 2, 3].numpy())
    assert encode_output(b"already bytes", "jpg", 95) == b"already bytes"
    assert encode_output(arrays[0], "png", 95) == encode(arrays[0], "png", 95)
