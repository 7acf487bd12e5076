"""`tokenize_dataset`, `load_tokenizer`, `token_dtype` and the `training/tokenize_dataset.py` wrapper."""

import io
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import PIL.Image
import pyarrow as pa
import pytest
import torch
from datasets import Array2D, Dataset, DatasetDict, Features, Image, load_from_disk

from qg_tokenizer import QGVAEImageProcessor, QGVAEModel
from qg_tokenizer.data import load_embedded_mnist
from qg_tokenizer.image_io import load_image
from qg_tokenizer.tokenize import encode_images, load_tokenizer, token_dtype, tokenize_dataset
from tests.conftest import tiny_config

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def model() -> QGVAEModel:
    torch.manual_seed(0)
    return QGVAEModel(tiny_config(codebook_size=300)).eval()


@pytest.fixture(scope="module")
def digits() -> Dataset:
    """24 test digits with their labels and a row number."""
    data = load_embedded_mnist()["test"].select(range(24))
    return data.add_column("row", list(range(len(data))))


def reference_tokens(model: QGVAEModel, images) -> tuple[torch.Tensor, torch.Tensor]:
    processor = QGVAEImageProcessor.from_model_config(model.config)
    pixel_values = processor(list(images), return_tensors="pt")["pixel_values"]
    with torch.no_grad():
        return model.encode(pixel_values).token_ids, pixel_values


@pytest.mark.parametrize(
    "codebook_size, dtype",
    [(2, "uint8"), (256, "uint8"), (257, "int16"), (300, "int16"), (2**15, "int16"), (2**15 + 1, "uint16"),
     (2**16, "uint16"), (2**16 + 1, "int32"), (2**31, "int32"), (2**31 + 1, "int64")],
)  # fmt: skip
def test_token_dtype_is_the_smallest_that_holds_k(codebook_size, dtype):
    assert token_dtype(codebook_size) == dtype
    assert np.iinfo(dtype).max >= codebook_size - 1


def test_token_dtype_rejects_invalid_sizes():
    with pytest.raises(ValueError, match="codebook_size"):
        token_dtype(1)


def test_tokens_decode_to_the_model_reconstructions_and_labels_are_kept(model, digits):
    model.train()  # tokenize_dataset must encode in eval mode and restore the mode afterwards
    tokens = tokenize_dataset(digits, model, batch_size=5)
    assert model.training and model.quantizer.usage_counts.sum() == 0
    model.eval()

    assert tokens.column_names == ["label", "row", "token_ids"]
    assert tokens.features["token_ids"].feature.dtype == "int16"
    assert tokens.features["token_ids"].length == 8
    assert tokens.features["label"] == digits.features["label"]
    assert tokens["label"] == digits["label"] and tokens["row"] == list(range(24))

    token_ids = torch.tensor(tokens["token_ids"])
    expected, pixel_values = reference_tokens(model, digits["image"])
    assert torch.equal(token_ids, expected)
    with torch.no_grad():
        decoded = model.decode(token_ids).pixel_values
        forward = model(pixel_values).reconstruction
    torch.testing.assert_close(decoded, forward, atol=1e-5, rtol=1e-5)


def test_small_codebooks_are_stored_as_uint8_and_read_as_tensors(digits):
    torch.manual_seed(1)
    model = QGVAEModel(tiny_config(codebook_size=64)).eval()
    tokens = tokenize_dataset(digits.select(range(6)), model, keep_columns=["label"])
    assert tokens.column_names == ["label", "token_ids"]
    assert tokens.features["token_ids"].feature.dtype == "uint8"
    assert tokens.data.schema.field("token_ids").type == pa.list_(pa.uint8(), 8)  # 8 bytes per image in Arrow
    token_ids = tokens.with_format("torch")[:]["token_ids"]  # the formatters widen integers to int64
    assert token_ids.dtype == torch.int64
    assert torch.equal(token_ids, reference_tokens(model, digits.select(range(6))["image"])[0])


def test_two_worker_processes_cover_each_row_exactly_once(model, digits):
    single = tokenize_dataset(digits, model, batch_size=4)
    sharded = tokenize_dataset(digits, model, batch_size=4, num_proc=2)
    assert sharded["row"] == list(range(len(digits)))  # every row once, in order
    assert sharded["token_ids"] == single["token_ids"]
    assert sharded["label"] == digits["label"]


def test_dataset_dict_is_tokenised_split_by_split(model, digits):
    splits = DatasetDict(train=digits.select(range(10)), test=digits.select(range(10, 13)))
    tokens = tokenize_dataset(splits, model, keep_columns=["row"])
    assert {name: len(ds) for name, ds in tokens.items()} == {"train": 10, "test": 3}
    assert tokens["test"]["row"] == [10, 11, 12]
    assert tokens["test"]["token_ids"] == tokenize_dataset(digits, model)["token_ids"][10:13]


def test_image_column_can_be_kept_and_arrays_work(model, digits):
    kept = tokenize_dataset(digits.select(range(3)), model, keep_columns=["image"])
    assert kept.features["image"] == digits.features["image"] and isinstance(kept[0]["image"], PIL.Image.Image)

    arrays = np.stack([np.asarray(im) for im in digits.select(range(3))["image"]])  # uint8 (3, 28, 28)
    data = Dataset.from_dict({"pixels": arrays}, features=Features({"pixels": Array2D((28, 28), "uint8")}))
    tokens = tokenize_dataset(data, model, image_column="pixels")
    assert tokens["token_ids"] == kept["token_ids"]


def test_an_undecodable_image_fails_with_its_row_index(model):
    good = io.BytesIO()
    PIL.Image.new("L", (16, 16), 128).save(good, format="PNG")
    cells = [{"bytes": good.getvalue(), "path": None}] * 7
    cells[5] = {"bytes": b"\x89PNG not really", "path": None}
    data = Dataset.from_dict({"image": cells}, features=Features({"image": Image()}))
    with pytest.raises(ValueError, match="row 5 cannot be decoded"):
        tokenize_dataset(data, model, batch_size=4)  # row 5 is the second row of the second batch


def test_invalid_arguments_name_the_argument(model, digits):
    with pytest.raises(ValueError, match="image_column 'picture'"):
        tokenize_dataset(digits, model, image_column="picture")
    with pytest.raises(ValueError, match=r"keep_columns .*\['caption'\]"):
        tokenize_dataset(digits, model, keep_columns=["label", "caption"])
    with pytest.raises(ValueError, match="output_column 'label'"):
        tokenize_dataset(digits, model, output_column="label")
    with pytest.raises(ValueError, match="batch_size"):
        tokenize_dataset(digits, model, batch_size=0)
    with pytest.raises(TypeError, match="dataset must be"):
        tokenize_dataset({"image": []}, model)


def test_load_tokenizer_reads_the_saved_processor_or_falls_back_to_the_config(model, tmp_path):
    model.save_pretrained(tmp_path / "bare")
    loaded, processor = load_tokenizer(tmp_path / "bare")
    assert not loaded.training and processor.image_size == 16 and processor.num_channels == 1
    assert loaded.codebook_fingerprint() == model.codebook_fingerprint()

    model.save_pretrained(tmp_path / "full")
    QGVAEImageProcessor.from_model_config(model.config, resample=0).save_pretrained(tmp_path / "full")
    assert load_tokenizer(tmp_path / "full")[1].resample == 0


def test_load_tokenizer_refuses_a_processor_that_does_not_fit_the_model(model, tmp_path):
    model.save_pretrained(tmp_path)  # 16 x 16 grey
    QGVAEImageProcessor(image_size=28, num_channels=3).save_pretrained(tmp_path)
    with pytest.raises(ValueError, match=r"preprocessor_config.json of .* does not fit the model's config.json: the "
                       r"image processor makes 28x28 images with num_channels=3, but the model \(QGVAEConfig\) takes "
                       r"16x16 images with num_channels=1"):  # fmt: skip
        load_tokenizer(tmp_path)


def test_load_tokenizer_fails_on_a_corrupt_processor_config(model, tmp_path):
    model.save_pretrained(tmp_path)
    (tmp_path / "preprocessor_config.json").write_text('{"num_channels": 1,')  # truncated: not the config's defaults
    with pytest.raises(OSError, match=r"preprocessor_config.json' is not a valid JSON file"):
        load_tokenizer(tmp_path)
    (tmp_path / "preprocessor_config.json").write_text('{"num_channels": 2}')
    with pytest.raises(ValueError, match=r"preprocessor_config.json of .* not a valid .*num_channels must be 1 or 3"):
        load_tokenizer(tmp_path)


def png_bytes(image: PIL.Image.Image, format: str = "PNG", **save_kwargs) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format=format, **save_kwargs)
    return buffer.getvalue()


def test_dataset_images_decode_as_the_image_loader_decodes_files(model, digits, tmp_path):
    # a JPEG with an EXIF orientation, and a 16-bit PNG: the tokens of tokenize_dataset are those of `load_image`
    digit = np.asarray(digits[0]["image"])  # uint8 (28, 28)
    exif = PIL.Image.Exif()
    exif[PIL.Image.ExifTags.Base.Orientation] = 8  # displayed rotated 90 degrees anticlockwise
    path = tmp_path / "digit.jpg"
    PIL.Image.fromarray(digit[:, 4:24]).save(path, quality=95, exif=exif)  # 20 wide x 28 high on disk
    deep = png_bytes(PIL.Image.fromarray(digit.astype(np.uint16) * 257))
    cells = [{"bytes": None, "path": str(path)}, {"bytes": deep, "path": None}]
    data = Dataset.from_dict({"image": cells}, features=Features({"image": Image()}))
    tokens = torch.tensor(tokenize_dataset(data, model)["token_ids"])
    loaded = [load_image(path), load_image(deep)]
    assert loaded[0].size == (28, 20) and loaded[1].mode == "L"
    np.testing.assert_array_equal(np.asarray(loaded[1]), digit)  # the 16-bit digit is the 8-bit digit, not clipped
    processor = QGVAEImageProcessor.from_model_config(model.config)
    assert torch.equal(tokens, encode_images(model, processor, loaded).cpu())
    assert torch.equal(tokens[1], reference_tokens(model, [digits[0]["image"]])[0][0])


def test_an_absurd_aspect_ratio_is_refused_with_its_row_index(model):
    cells = [{"bytes": png_bytes(PIL.Image.new("L", (16, 16), 128)), "path": None}] * 3
    cells[2] = {"bytes": png_bytes(PIL.Image.new("L", (100_000, 1))), "path": None}
    data = Dataset.from_dict({"image": cells}, features=Features({"image": Image()}))
    with pytest.raises(ValueError, match=r"row 2 cannot be decoded as an image: .*100000x1 pixels .*exceeds 64:1"):
        tokenize_dataset(data, model)


def test_training_script_tokenises_every_split(model, tmp_path):
    model.save_pretrained(tmp_path / "model")
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "OMP_NUM_THREADS": "1",
           "ACCELERATE_USE_CPU": "true"}  # fmt: skip
    launch = [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2"]
    result = subprocess.run(
        [*launch, str(ROOT / "training" / "tokenize_dataset.py"), "--model", str(tmp_path / "model"),
         "--max_samples", "21", "--output_dir", str(tmp_path / "tokens"), "--batch_size", "4"],
        capture_output=True, text=True, env=env, timeout=300,
    )  # fmt: skip
    assert result.returncode == 0, result.stderr[-2000:]
    tokens = load_from_disk(tmp_path / "tokens")
    assert sorted(tokens) == ["test", "train"] and not (tmp_path / "tokens" / ".shards").exists()
    mnist = load_embedded_mnist()
    for split in ("train", "test"):
        assert tokens[split]["label"] == mnist[split]["label"][:21]  # two shards of 11 and 10 rows, joined in order
        expected = reference_tokens(model, mnist[split].select(range(21))["image"])[0]
        assert torch.equal(torch.tensor(tokens[split]["token_ids"]), expected)
