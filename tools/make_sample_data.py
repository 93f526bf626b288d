"""Rebuild ``sample_data/`` from the public-domain / CC photos bundled with scikit-image and
scikit-learn (needs both installed; mixgen itself does not)."""

from __future__ import annotations

import pathlib
import sys

import numpy as np
from PIL import Image

PHOTOS = {
    "astronaut": ("skimage", "astronaut.png"),
    "cat": ("skimage", "chelsea.png"),
    "coffee": ("skimage", "coffee.png"),
    "flower": ("sklearn", "flower.jpg"),
    "rocket": ("skimage", "rocket.jpg"),
}
# (left, top, right, bottom) as fractions of the photo, and whether to mirror it.
CROPS = [
    ((0.0, 0.0, 1.0, 1.0), False),
    ((0.05, 0.05, 0.85, 0.95), True),
    ((0.15, 0.0, 1.0, 0.9), False),
    ((0.0, 0.1, 0.8, 1.0), True),
]


def photo_path(package: str, name: str) -> pathlib.Path:
    if package == "skimage":
        import skimage.data

        return pathlib.Path(skimage.data.__file__).parent / name
    import sklearn.datasets

    return pathlib.Path(sklearn.datasets.__file__).parent / "images" / name


def main(out: pathlib.Path) -> None:
    for label, (package, name) in PHOTOS.items():
        photo = Image.open(photo_path(package, name)).convert("RGB")
        width, height = photo.size
        (out / label).mkdir(parents=True, exist_ok=True)
        for number, ((left, top, right, bottom), mirror) in enumerate(CROPS):
            crop = photo.crop((round(left * width), round(top * height), round(right * width), round(bottom * height)))
            if mirror:
                crop = crop.transpose(Image.Transpose.FLIP_LEFT_RIGHT)
            crop.thumbnail((320, 320), Image.Resampling.LANCZOS)
            assert np.asarray(crop).std() > 0
            crop.save(out / label / f"{label}_{number}.jpg", quality=85, optimize=True)


if __name__ == "__main__":
    main(pathlib.Path(sys.argv[1] if len(sys.argv) > 1 else "sample_data"))
