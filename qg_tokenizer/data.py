"""Datasets: the embedded 10k-digit MNIST subset, local `.npz` files, image folders, `save_to_disk` folders and hub
data sets, as `datasets` objects."""

from __future__ import annotations

import functools
import io
import os
from pathlib import Path

import numpy as np
import PIL.Image
import torch
from datasets import (
    ClassLabel,
    Dataset,
    DatasetDict,
    Features,
    Image,
    IterableDataset,
    Value,
    load_dataset,
    load_from_disk,
)

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

    Columns: `image` (28x28 PIL mode "L", pixels 0-255) and `label` (`ClassLabel` named "0".."9"). Built once per
    process; every call returns a new `DatasetDict` of the same (immutable) splits.
    """
    return DatasetDict(_embedded_mnist_splits())


@functools.cache
def _embedded_mnist_splits() -> DatasetDict:
    with np.load(MNIST_PATH) as npz:
        images, labels = npz["images"], npz["labels"]
    names = [str(d) for d in range(10)]
    return DatasetDict(
        train=_to_dataset(images[:MNIST_NUM_TRAIN], labels[:MNIST_NUM_TRAIN], names),
        test=_to_dataset(images[MNIST_NUM_TRAIN:], labels[MNIST_NUM_TRAIN:], names),
    )


PHOTO_SET_HELP = (
    "photo_set.npz, the colour benchmark set, is not shipped with the package: it is built from the sample photos of "
    "OpenCV, scikit-image and scikit-learn (see the README's Data section); pass its path as data.source=PATH"
)


def _check_npz_exists(path: str | os.PathLike, what: str) -> None:
    """`FileNotFoundError` naming `path` (and where the photo set comes from) unless it is a file."""
    if not os.path.isfile(path):
        hint = f": {PHOTO_SET_HELP}" if Path(path).name == "photo_set.npz" else ""
        raise FileNotFoundError(f"no .npz {what} file at {os.fspath(path)!r}{hint}")


def load_npz_dataset(path: str | os.PathLike, test_fraction: float = 0.1) -> DatasetDict:
    """A local `.npz` of uint8 images `(N, H, W)` (grey) or `(N, H, W, 3)` (RGB) as "train"/"test" splits.

    Either the keys `train` and `test` hold the two splits' images (further `(N, H, W, 3)` arrays such as `test64`
    become splits of their own; whole photos `photo_*` do not, see [`load_photos`]), or `images` (with optional
    integer `labels`) is split deterministically: the last `ceil(test_fraction * N)` rows are the test split.
    """
    if not 0 < test_fraction < 1:
        raise ValueError(f"test_fraction must be in (0, 1), got {test_fraction}")
    _check_npz_exists(path, "dataset")
    with np.load(path) as npz:
        keys = set(npz.files)
        if {"train", "test"} <= keys:  # and any further image arrays (e.g. `test64`), except whole photos
            names = [k for k in npz.files if k in ("train", "test") or (npz[k].ndim == 4 and k[:6] != "photo_")]
            return DatasetDict({s: _to_dataset(_check_images(npz[s], s, path)) for s in names})
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


EMBEDDED_MNIST = "embedded-mnist"


def load_image_splits(source: str, streaming: bool = False, name: str | None = None) -> DatasetDict | dict:
    """All splits of `source` (see [`load_image_dataset`]) as a split name -> data set mapping."""
    if source == EMBEDDED_MNIST:
        return load_embedded_mnist()
    path = Path(source)
    if source.endswith(".npz"):
        return load_npz_dataset(path)
    if path.is_dir() and ((path / "dataset_dict.json").is_file() or (path / "state.json").is_file()):
        data = load_from_disk(source)
        if not isinstance(data, DatasetDict):
            raise ValueError(f"{source!r} holds a single Dataset; save a DatasetDict with named splits instead")
        return data
    if path.is_dir():
        return load_dataset("imagefolder", data_dir=source, streaming=streaming)
    if path.suffix or source.startswith((".", "/", "~")):
        raise FileNotFoundError(f"no data set file or folder at {source!r}")
    return load_dataset(source, name, streaming=streaming)


def load_image_dataset(
    source: str | os.PathLike = EMBEDDED_MNIST,
    split: str = "train",
    image_column: str = "image",
    streaming: bool = False,
    name: str | None = None,
    num_shards: int = 1,
) -> Dataset | IterableDataset:
    """One split of an image data set, reduced to its image column.

    Args:
        source: `"embedded-mnist"` (the packaged digits), a `.npz` file (see [`load_npz_dataset`]), a folder written
            by `save_to_disk` (a `DatasetDict`), an image folder (the `imagefolder` builder: `train/`, `test/`
            subfolders, optionally with class subfolders) or a hub data set name.
        split: the split to return, e.g. `"train"` or `"test"`.
        image_column: the column holding the images (an `Image` feature).
        streaming: return an `IterableDataset`; hub data sets and image folders stream without being downloaded or
            decoded first, the other sources are converted with `num_shards` shards (for per-process sharding).
        name: the hub data set's configuration name, if it has several.
        num_shards: shards of a converted `IterableDataset` (at least the number of processes that share it).
    """
    source = os.fspath(source)
    splits = load_image_splits(source, streaming, name)
    if split not in splits:
        raise ValueError(f"split {split!r} not found in data set {source!r}; available splits: {sorted(splits)}")
    data = splits[split]
    # some streamed data sets only know their columns once read
    columns = list(data.features) if data.features is not None else list(next(iter(data)))
    if image_column not in columns:
        raise ValueError(
            f"image_column {image_column!r} not found in split {split!r} of {source!r}; columns: {sorted(columns)}"
        )
    if data.features is not None and not isinstance(data.features[image_column], Image):
        raise ValueError(
            f"image_column {image_column!r} of {source!r} must be an Image feature, "
            f"got {data.features[image_column]}"
        )
    data = data.select_columns([image_column])
    if streaming and isinstance(data, Dataset):
        data = data.to_iterable_dataset(num_shards=num_shards)
    return data


# ------------------------------------------------------------------------------------------- whole-photo crops
PHOTO_TRAIN_PREFIX = "photo_train_"


def load_photos(path: str | os.PathLike, prefix: str = PHOTO_TRAIN_PREFIX) -> dict[str, np.ndarray]:
    """The whole photos `<prefix><name>` (uint8 `(H, W, 3)`) of a `.npz` such as `photo_set.npz`, by name."""
    _check_npz_exists(path, "photo")
    with np.load(path) as npz:
        photos = {key[len(prefix) :]: npz[key] for key in sorted(npz.files) if key.startswith(prefix)}
    if not photos:
        raise ValueError(f"{os.fspath(path)!r} holds no arrays named {prefix}<name> (whole photos to crop from)")
    for name, photo in photos.items():
        if photo.dtype != np.uint8 or photo.ndim != 3 or photo.shape[-1] != 3:
            raise ValueError(f"{path}: photo {name!r} must be uint8 (H, W, 3), got {photo.dtype} {photo.shape}")
    return photos


class RandomCropStream(torch.utils.data.IterableDataset):
    """An endless stream of fresh random crops of whole photos: `{"image": PIL RGB size x size}` examples.

    Crop i picks a photo uniformly, a square side log-uniform in [`min_side`, the photo's short side] (the scales of
    32 px up to the whole photo equally often), a uniform position and a left-right flip with probability 1/2, and
    resizes the region with Lanczos (antialiased). It is a pure function of `(seed, process_index, i)`: the stream is
    reproducible, differs between processes, and `start` continues it where a resumed run left off. DataLoader
    workers take interleaved indices.
    """

    def __init__(
        self, photos: list[np.ndarray], size: int, seed: int = 0, process_index: int = 0, start: int = 0,
        min_side: int = 32, horizontal_flip: bool = True,
    ):  # fmt: skip
        if not photos:
            raise ValueError("RandomCropStream needs at least one photo")
        if min(min(p.shape[:2]) for p in photos) < min_side:
            raise ValueError(f"every photo must be at least min_side={min_side} px on its short side")
        self.photos, self.size, self.seed, self.process_index = photos, size, seed, process_index
        self.start, self.min_side, self.horizontal_flip = start, min_side, horizontal_flip

    def crop_box(self, index: int) -> tuple[int, int, int, int, bool]:
        """`(photo, top, left, side, flip)` of crop `index`."""
        rng = np.random.default_rng((self.seed, self.process_index, index))
        photo = int(rng.integers(len(self.photos)))
        height, width = self.photos[photo].shape[:2]
        side = int(round(np.exp(rng.uniform(np.log(self.min_side), np.log(min(height, width))))))
        top, left = int(rng.integers(height - side + 1)), int(rng.integers(width - side + 1))
        return photo, top, left, side, bool(self.horizontal_flip and rng.random() < 0.5)

    def crop(self, index: int) -> PIL.Image.Image:
        photo, top, left, side, flip = self.crop_box(index)
        image = PIL.Image.fromarray(self.photos[photo][top : top + side, left : left + side])
        image = image.resize((self.size, self.size), PIL.Image.Resampling.LANCZOS, reducing_gap=3.0)
        return image.transpose(PIL.Image.Transpose.FLIP_LEFT_RIGHT) if flip else image

    def __iter__(self):
        worker = torch.utils.data.get_worker_info()
        index, stride = self.start + (worker.id if worker else 0), worker.num_workers if worker else 1
        while True:
            yield {"image": self.crop(index)}
            index += stride


def photo_crop_dataset(photos: list[np.ndarray], size: int, num_crops: int, seed: int) -> Dataset:
    """A fixed `Dataset` of `num_crops` crops drawn as by [`RandomCropStream`] (e.g. a validation split)."""
    stream = RandomCropStream(photos, size, seed=seed, horizontal_flip=False)
    return _to_dataset(np.stack([np.asarray(stream.crop(i)) for i in range(num_crops)]))


__all__ = [
    "EMBEDDED_MNIST",
    "PHOTO_TRAIN_PREFIX",
    "RandomCropStream",
    "load_photos",
    "photo_crop_dataset",
    "MNIST_PATH",
    "load_embedded_mnist",
    "load_image_dataset",
    "load_image_splits",
    "load_npz_dataset",
]
