"""Datasets: the embedded 10k-digit MNIST subset and local `.npz` image files, as `datasets.DatasetDict`s."""

from __future__ import annotations

import io
import os
from pathlib import Path

import numpy as np
import PIL.Image
from datasets import ClassLabel, Dataset, DatasetDict, Features, Image, Value

MNIST_PATH = Path(__file__).parent / "data" / "mnist10k.npz"
MNIST_NUM_TRAIN = 9000


def _png(image: np.ndarray) -> dict:
    """uint8 `(H, W)` or `(H, W, 3)` -> the `Image` feature's storage; fast zlib level 1 (PNG is lossless anyway)."""
    buffer = io.BytesIO()
    PIL.Image.fromarray(image).save(buffer, format="PNG", compress_level=1)
    return {"bytes": buffer.getvalue(), "path": None}


def _to_dataset(
    images: np.ndarray, labels: np.ndarray | None = None, label_names: list[str] | None = None
) -> Dataset:
    """uint8 `(N, H, W)` (mode "L") or `(N, H, W, 3)` (mode "RGB") -> `Dataset` with columns `image`[, `label`]."""
    mode = "L" if images.ndim == 3 else "RGB"
    features = {"image": Image(mode=mode)}
    columns = {"image": [_png(im) for im in images]}
    if labels is not None:
        features["label"] = ClassLabel(names=label_names) if label_names else Value("int64")
        columns["label"] = labels.tolist()
    return Dataset.from_dict(columns, features=Features(features))


def _check_images(images: np.ndarray, name: str, path: str | os.PathLike) -> np.ndarray:
    if images.dtype != np.uint8 or not (images.ndim == 3 or (images.ndim == 4 and images.shape[-1] == 3)):
        raise ValueError(
            f"{path}: array {name!r} must be uint8 (N, H, W) or (N, H, W, 3), got {images.dtype} {images.shape}"
        )
    return images


def load_embedded_mnist() -> DatasetDict:
    """The packaged 10,000 MNIST digits: "train" (first 9,000) and "test" (last 1,000).

    Columns: `image` (28x28 PIL mode "L", pixels 0-255) and `label` (`ClassLabel` named "0".."9").
    """
    with np.load(MNIST_PATH) as npz:
        images, labels = npz["images"], npz["labels"]
    names = [str(d) for d in range(10)]
    return DatasetDict(
        train=_to_dataset(images[:MNIST_NUM_TRAIN], labels[:MNIST_NUM_TRAIN], names),
        test=_to_dataset(images[MNIST_NUM_TRAIN:], labels[MNIST_NUM_TRAIN:], names),
    )


def load_npz_dataset(path: str | os.PathLike, test_fraction: float = 0.1) -> DatasetDict:
    """A local `.npz` of uint8 images `(N, H, W)` (grey) or `(N, H, W, 3)` (RGB) as "train"/"test" splits.

    Either the keys `train` and `test` hold the two splits' images, or `images` (with optional integer `labels`) is
    split deterministically: the last `ceil(test_fraction * N)` rows are the test split.
    """
    if not 0 < test_fraction < 1:
        raise ValueError(f"test_fraction must be in (0, 1), got {test_fraction}")
    if not os.path.isfile(path):
        raise FileNotFoundError(f"no .npz dataset file at {os.fspath(path)!r}")
    with np.load(path) as npz:
        keys = set(npz.files)
        if {"train", "test"} <= keys:
            return DatasetDict({s: _to_dataset(_check_images(npz[s], s, path)) for s in ("train", "test")})
        if "images" not in keys:
            raise ValueError(
                f"{os.fspath(path)!r} must hold arrays 'train' and 'test', or 'images' (and optionally 'labels'); "
                f"found keys {sorted(keys)}"
            )
        images = _check_images(npz["images"], "images", path)
        labels = npz["labels"] if "labels" in keys else None
    if labels is not None and labels.shape != (len(images),):
        raise ValueError(f"{path}: 'labels' must have shape ({len(images)},), got {labels.shape}")
    n_train = len(images) - int(np.ceil(test_fraction * len(images)))
    return DatasetDict(
        train=_to_dataset(images[:n_train], None if labels is None else labels[:n_train]),
        test=_to_dataset(images[n_train:], None if labels is None else labels[n_train:]),
    )


__all__ = ["MNIST_PATH", "load_embedded_mnist", "load_npz_dataset"]
