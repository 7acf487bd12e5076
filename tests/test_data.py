"""Embedded MNIST and the local `.npz` loader."""

import numpy as np
import pytest
from datasets import ClassLabel, DatasetDict

from qg_tokenizer.data import MNIST_PATH, load_embedded_mnist, load_npz_dataset


@pytest.fixture(scope="module")
def mnist() -> DatasetDict:
    return load_embedded_mnist()


@pytest.fixture(scope="module")
def mnist_npz() -> dict[str, np.ndarray]:
    with np.load(MNIST_PATH) as npz:
        return {k: npz[k] for k in npz.files}


def test_embedded_mnist_splits_and_labels(mnist, mnist_npz):
    assert set(mnist) == {"train", "test"}
    assert (mnist["train"].num_rows, mnist["test"].num_rows) == (9000, 1000)
    label = mnist["train"].features["label"]
    assert isinstance(label, ClassLabel) and label.names == [str(d) for d in range(10)]
    np.testing.assert_array_equal(mnist["train"]["label"], mnist_npz["labels"][:9000])
    np.testing.assert_array_equal(mnist["test"]["label"], mnist_npz["labels"][9000:])
    assert set(mnist["test"]["label"]) == set(range(10))


def test_embedded_mnist_is_built_once_and_callers_cannot_change_the_cache(mnist):
    again = load_embedded_mnist()
    assert again is not mnist and again["train"] is mnist["train"]  # new dict, the same immutable splits
    again["train"] = again["test"]
    assert load_embedded_mnist()["train"].num_rows == 9000


@pytest.mark.parametrize("split, rows, offset", [("train", [0, 1, 4321, 8999], 0), ("test", [0, 999], 9000)])
def test_embedded_mnist_pixels(mnist, mnist_npz, split, rows, offset):
    for row in rows:
        image = mnist[split][row]["image"]
        assert image.mode == "L" and image.size == (28, 28)
        np.testing.assert_array_equal(np.asarray(image), mnist_npz["images"][offset + row])


def test_npz_train_test_keys(tmp_path):
    rng = np.random.default_rng(0)
    train, test = (rng.integers(0, 256, (n, 8, 6, 3), dtype=np.uint8) for n in (7, 3))
    np.savez(tmp_path / "rgb.npz", train=train, test=test)
    data = load_npz_dataset(tmp_path / "rgb.npz")
    assert (data["train"].num_rows, data["test"].num_rows) == (7, 3)
    assert data["train"].column_names == ["image"]
    image = data["test"][2]["image"]
    assert image.mode == "RGB" and image.size == (6, 8)
    np.testing.assert_array_equal(np.asarray(image), test[2])
    np.testing.assert_array_equal(np.asarray(data["train"][6]["image"]), train[6])


def test_npz_images_labels_split_90_10(tmp_path):
    rng = np.random.default_rng(0)
    images = rng.integers(0, 256, (25, 5, 5), dtype=np.uint8)
    labels = np.arange(25) % 4
    np.savez(tmp_path / "grey.npz", images=images, labels=labels)
    data = load_npz_dataset(str(tmp_path / "grey.npz"))
    assert (data["train"].num_rows, data["test"].num_rows) == (22, 3)  # last ceil(2.5) = 3 rows are test
    assert data["test"]["label"] == labels[22:].tolist()
    np.testing.assert_array_equal(np.asarray(data["test"][0]["image"]), images[22])
    assert data["train"][0]["image"].mode == "L"

    np.savez(tmp_path / "unlabelled.npz", images=images[:10])
    data = load_npz_dataset(tmp_path / "unlabelled.npz")
    assert (data["train"].num_rows, data["test"].num_rows, data["test"].column_names) == (9, 1, ["image"])
    np.testing.assert_array_equal(np.asarray(data["test"][0]["image"]), images[9])


def test_npz_errors(tmp_path):
    missing = tmp_path / "nope.npz"
    with pytest.raises(FileNotFoundError, match="nope.npz"):
        load_npz_dataset(missing)
    np.savez(tmp_path / "bad.npz", pixels=np.zeros((2, 4, 4), np.uint8), train=np.zeros((2, 4, 4), np.uint8))
    with pytest.raises(ValueError, match=r"bad\.npz.*found keys \['pixels', 'train'\]"):
        load_npz_dataset(tmp_path / "bad.npz")
    np.savez(tmp_path / "float.npz", images=np.zeros((2, 4, 4), np.float32))
    with pytest.raises(ValueError, match="'images' must be uint8"):
        load_npz_dataset(tmp_path / "float.npz")
    np.savez(tmp_path / "labels.npz", images=np.zeros((4, 4, 4), np.uint8), labels=np.zeros(3))
    with pytest.raises(ValueError, match=r"'labels' must have shape \(4,\)"):
        load_npz_dataset(tmp_path / "labels.npz")
