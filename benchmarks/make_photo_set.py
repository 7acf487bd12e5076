"""Build photo_set.npz, the colour benchmark set: 28 real photographs from packages, split by photo into train and test
(a copy of the workspace's `../shared/data/make_photo_set.py`).

    apt-get download opencv-doc && dpkg -x opencv-doc_*.deb opencv-doc    # Debian package, OpenCV sample data
    pip install numpy pillow scikit-image scikit-learn
    python make_photo_set.py opencv-doc/usr/share/doc/opencv-doc/examples/data photo_set.npz

Every photo is kept whole (longest side at most 640 px) so that a data loader can draw fresh random crops, and fixed
crops are drawn with a seed for benchmarks: a square region of side 32, 64, 128 or 256 px of the photo, resized to
the crop size with Lanczos (the larger regions look like CIFAR-style thumbnails, the smaller like close-ups).
"""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np
import skimage.data
from PIL import Image
from sklearn.datasets import load_sample_images

TRAIN_OPENCV = ["aero1.jpg", "aero3.jpg", "aloeL.jpg", "apple.jpg", "board.jpg", "ela_original.jpg", "graf1.png",
                "home.jpg", "left.jpg", "licenseplate_motion.jpg", "orange.jpg", "rubberwhale1.png", "smarties.png",
                "stuff.jpg"]
TRAIN_SKIMAGE = ["astronaut", "chelsea", "hubble_deep_field", "immunohistochemistry", "retina", "rocket"]
TEST_OPENCV = ["baboon.jpg", "butterfly.jpg", "building.jpg", "fruits.jpg"]
TEST_SKIMAGE = ["coffee"]
MAX_SIDE = 640
REGIONS = {32: (32, 64, 128, 256), 64: (64, 128, 256)}  # crop size -> region sides drawn from the photo
TRAIN_CROPS_PER_PHOTO = 300  # 32x32 crops
TEST_CROPS_PER_PHOTO = {32: 128, 64: 64}


def limit(image: np.ndarray) -> np.ndarray:
    pil = Image.fromarray(image[..., :3])
    if max(pil.size) > MAX_SIDE:
        pil.thumbnail((MAX_SIDE, MAX_SIDE), Image.Resampling.LANCZOS)
    return np.asarray(pil.convert("RGB"), dtype=np.uint8)


def crops(photo: np.ndarray, size: int, count: int, rng: np.random.Generator) -> np.ndarray:
    height, width, _ = photo.shape
    regions = [r for r in REGIONS[size] if r <= min(height, width)]
    out = np.empty((count, size, size, 3), np.uint8)
    for i in range(count):
        r = regions[i % len(regions)]
        y, x = rng.integers(0, height - r + 1), rng.integers(0, width - r + 1)
        region = Image.fromarray(photo[y:y + r, x:x + r])
        out[i] = np.asarray(region.resize((size, size), Image.Resampling.LANCZOS) if r != size else region)
    return out


def main(opencv_dir: str, out: str) -> None:
    photos = {"train": {}, "test": {}}
    for split, opencv, skimage_names in (("train", TRAIN_OPENCV, TRAIN_SKIMAGE), ("test", TEST_OPENCV, TEST_SKIMAGE)):
        for name in opencv:
            photos[split][Path(name).stem] = limit(np.asarray(Image.open(Path(opencv_dir) / name).convert("RGB")))
        for name in skimage_names:
            photos[split][name] = limit(getattr(skimage.data, name)())
    photos["train"]["motorcycle"] = limit(skimage.data.stereo_motorcycle()[0])
    sample = dict(zip([Path(f).stem for f in load_sample_images().filenames], load_sample_images().images))
    photos["train"]["china"], photos["test"]["flower"] = limit(sample["china"]), limit(sample["flower"])
    rng = np.random.default_rng(0)
    arrays = {}
    for split in ("train", "test"):
        for name, photo in sorted(photos[split].items()):
            arrays[f"photo_{split}_{name}"] = photo
    train_photos = [photo for _, photo in sorted(photos["train"].items())]
    arrays["train"] = np.concatenate([crops(photo, 32, TRAIN_CROPS_PER_PHOTO, rng) for photo in train_photos])
    for size, count in TEST_CROPS_PER_PHOTO.items():
        arrays["test" if size == 32 else f"test{size}"] = np.concatenate(
            [crops(p, size, count, rng) for _, p in sorted(photos["test"].items())])
    arrays["test_photo_index"] = np.repeat(np.arange(len(photos["test"])), TEST_CROPS_PER_PHOTO[32]).astype(np.uint8)
    np.savez_compressed(out, **arrays)
    print({k: v.shape for k, v in arrays.items() if not k.startswith("photo_")})
    print("train photos:", sorted(photos["train"]), "test photos:", sorted(photos["test"]))


if __name__ == "__main__":
    main(*sys.argv[1:3])
