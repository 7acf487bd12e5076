"""Turn image datasets into fixed-length QG-VAE token ids for downstream transformers, on `datasets.Dataset.map`.

```python
>>> import qg_tokenizer
>>> from qg_tokenizer.tokenize import load_tokenizer, tokenize_dataset
>>> model, processor = load_tokenizer("path/or/org-name")
>>> tokens = tokenize_dataset(load_dataset("mnist"), model, processor, batch_size=256)
>>> tokens["train"].features["token_ids"]  # List(Value('int16'), length=C) for K = 512
```
"""

from __future__ import annotations

import os
from collections.abc import Sequence

import numpy as np
import PIL.Image
import torch
from datasets import Dataset, DatasetDict, Features, Image, List, Value
from datasets.fingerprint import Hasher
from datasets.utils.file_utils import is_local_path, xopen
from transformers import AutoModel, PreTrainedModel
from transformers.utils import CONFIG_NAME, IMAGE_PROCESSOR_NAME, cached_file

from .image_io import load_image
from .image_processing_qgvae import QGVAEImageProcessor

TOKEN_IDS_COLUMN = "token_ids"
_TOKEN_DTYPES = ("uint8", "int16", "uint16", "int32", "int64")


def token_dtype(codebook_size: int) -> str:
    """The smallest `datasets` / NumPy integer dtype holding ids in [0, K): uint8, int16, uint16, int32 or int64.

    int16 is preferred to uint16 (same size) because torch indexes with signed integers.
    """
    if isinstance(codebook_size, bool) or not isinstance(codebook_size, (int, np.integer)) or codebook_size < 2:
        raise ValueError(f"codebook_size must be an int >= 2, got {codebook_size!r}")
    return next(name for name in _TOKEN_DTYPES if codebook_size - 1 <= np.iinfo(name).max)


def load_tokenizer(
    name_or_path: str | os.PathLike, device: str | torch.device | None = None, **kwargs
) -> tuple[PreTrainedModel, QGVAEImageProcessor]:
    """A saved image tokenizer (QG-VAE or patch VQ-VAE; local folder or hub repo id) in eval mode, and its processor.

    The processor is read from `preprocessor_config.json` when the folder has one, else made from the model config
    (`QGVAEImageProcessor.from_model_config`). `AutoImageProcessor.from_pretrained` cannot do the latter: transformers
    5 reads `preprocessor_config.json` before it looks at `config.json`, and raises an `OSError` when it is missing.
    `kwargs` go to `AutoModel.from_pretrained`.

    Raises:
        ValueError: the saved processor does not make the images the model takes (`image_size`, `num_channels`).
        OSError: the model cannot be loaded, or `preprocessor_config.json` is not valid JSON (naming the file).
    """
    model = AutoModel.from_pretrained(name_or_path, **kwargs).eval()
    if device is not None:
        model.to(device)
    hub_kwargs = {k: v for k, v in kwargs.items() if k in ("cache_dir", "local_files_only", "revision", "token")}
    # only a missing file falls back to the config: a corrupt one must fail, not give silently different images
    saved = cached_file(name_or_path, IMAGE_PROCESSOR_NAME, _raise_exceptions_for_missing_entries=False, **hub_kwargs)
    if saved is None:
        return model, QGVAEImageProcessor.from_model_config(model.config)
    where = f"{IMAGE_PROCESSOR_NAME} of {str(name_or_path)!r}"
    try:
        processor = QGVAEImageProcessor.from_pretrained(name_or_path, **hub_kwargs)
    except (ValueError, TypeError) as error:
        raise ValueError(f"{where} is not a valid QGVAEImageProcessor config: {error}") from error
    try:
        processor.check_model_config(model.config)
    except ValueError as error:
        raise ValueError(f"{where} does not fit the model's {CONFIG_NAME}: {error}") from None
    return model, processor


@torch.inference_mode()
def encode_images(
    model: PreTrainedModel, processor: QGVAEImageProcessor, images: Sequence, indices: Sequence[int] | None = None
) -> torch.Tensor:
    """Images (PIL, arrays or tensors) -> token ids `[B, C]` int64 on the model's device; the model should be in eval.

    If the processor rejects the batch, the first offending image is named by its entry in `indices` (default its
    position in `images`).
    """
    try:
        pixel_values = processor(list(images), return_tensors="pt")["pixel_values"]
    except Exception:
        indices = range(len(images)) if indices is None else indices
        for image, index in zip(images, indices):  # find the image the processor cannot handle
            try:
                processor([image])
            except Exception as row_error:
                raise ValueError(f"image of row {index} cannot be processed: {row_error}") from row_error
        raise
    return model.encode(pixel_values.to(model.device)).token_ids


def _decode_image(feature: Image, value: dict, index: int, column: str) -> PIL.Image.Image:
    """One undecoded `Image` cell `{"bytes", "path"}` -> a PIL image by `image_io.load_image`; failures name the row.

    `load_image` is the decoder of the CLI too (EXIF orientation, 16-bit and float images scaled, no bombs); the
    feature's `mode`, if set, is applied after it, as `Image.decode_example` would.
    """
    try:
        source, path = value["bytes"], value["path"]
        if source is None and path is not None and not is_local_path(path):
            with xopen(path, "rb") as f:  # a file of a hub or remote dataset
                source = f.read()
        image = load_image(source if source is not None else path, name=path)
        if feature.mode and feature.mode != image.mode:
            image = image.convert(feature.mode)
    except Exception as error:
        raise ValueError(f"column {column!r} of row {index} cannot be decoded as an image: {error}") from error
    return image


def _model_fingerprint(model: PreTrainedModel) -> str:
    """Hash of the config and every parameter and buffer (what the token ids depend on)."""
    hasher = Hasher()
    hasher.update(model.config.to_json_string(use_diff=False))
    for name, tensor in model.state_dict().items():
        hasher.update(name)
        hasher.update(tensor.detach().cpu().float().numpy())
    return hasher.hexdigest()


class _TokenizeBatch:
    """The `map` function: decode the images of a batch, process, encode; moves the model to the rank's device."""

    def __init__(
        self, model: PreTrainedModel, processor: QGVAEImageProcessor, image_column: str, output_column: str,
        decode_feature: Image | None, dtype: str, device: torch.device | None, threads_per_process: int | None,
    ):  # fmt: skip
        self.model, self.processor, self.decode_feature, self.dtype = model, processor, decode_feature, dtype
        self.image_column, self.output_column = image_column, output_column
        self.device, self.threads_per_process = device, threads_per_process

    def _prepare_worker(self, rank: int) -> None:
        device = self.device
        if device is None and torch.cuda.is_available():
            device = torch.device("cuda", rank % torch.cuda.device_count())
        if device is not None and self.model.device != device:
            self.model.to(device)
        if self.model.device.type == "cpu" and self.threads_per_process:
            torch.set_num_threads(self.threads_per_process)  # share the cores between the worker processes

    def __call__(self, batch: dict[str, list], indices: list[int], rank: int | None = None) -> dict[str, np.ndarray]:
        if rank is not None:
            self._prepare_worker(rank)
        images = batch[self.image_column]
        if self.decode_feature is not None:
            images = [
                _decode_image(self.decode_feature, value, index, self.image_column)
                for value, index in zip(images, indices)
            ]
        token_ids = encode_images(self.model, self.processor, images, indices)
        return {self.output_column: token_ids.cpu().numpy().astype(self.dtype)}


def tokenize_dataset(
    dataset: Dataset | DatasetDict,
    model: PreTrainedModel,
    processor: QGVAEImageProcessor | None = None,
    image_column: str = "image",
    batch_size: int = 64,
    keep_columns: Sequence[str] | None = None,
    num_proc: int | None = None,
    device: str | torch.device | None = None,
    output_column: str = TOKEN_IDS_COLUMN,
    desc: str | None = None,
    **map_kwargs,
) -> Dataset | DatasetDict:
    """Encode every image of `dataset` into `model.config.num_tokens` token ids with `Dataset.map(batched=True)`.

    Args:
        dataset: a `Dataset` (or a `DatasetDict`, tokenised split by split) with an image column: the `Image`
            feature (decoded here, so a broken image fails with its row index) or anything the processor accepts.
        model: a `QGVAEModel`, or another tokenizer with `encode(...).token_ids` and `config.num_tokens` /
            `config.codebook_size` (the patch VQ-VAE); put in eval mode (then restored) and moved to `device`.
        processor: defaults to `QGVAEImageProcessor.from_model_config(model.config)`.
        image_column: the column holding the images.
        batch_size: images per encoder call.
        keep_columns: columns copied to the output beside the token ids (e.g. `["label"]`); default all but
            `image_column`. Listing `image_column` keeps the images too.
        num_proc: worker processes, each with a copy of the model (`map(num_proc=..., with_rank=True)`): on CPU they
            share the cores; with GPUs, worker `rank` uses `cuda:{rank % device_count}` unless `device` is given.
            Keep the model on the CPU when `num_proc > 1`.
        device: where the model runs (default: where it is).
        output_column: name of the token ids column.
        desc: progress bar label.
        map_kwargs: more `Dataset.map` arguments (`cache_file_name`, `writer_batch_size`, ...).

    Returns:
        The kept columns and `output_column`: `List(Value(token_dtype(K)), length=C)`, ids in [0, K), row i
        holding the tokens of input row i (stored in Arrow as that dtype; the "torch" and "numpy" formats read
        them back as int64).
    """
    if isinstance(dataset, DatasetDict):
        return DatasetDict({
            split: tokenize_dataset(
                ds, model, processor, image_column, batch_size, keep_columns, num_proc, device, output_column,
                desc or f"Tokenizing {split}", **map_kwargs,
            )
            for split, ds in dataset.items()
        })  # fmt: skip
    if not isinstance(dataset, Dataset):
        raise TypeError(f"dataset must be a datasets.Dataset or DatasetDict, got {type(dataset).__name__}")
    if not all(hasattr(model.config, name) for name in ("num_tokens", "codebook_size")) or not hasattr(model, "encode"):
        raise TypeError(f"model must be an image tokenizer such as QGVAEModel, got {type(model).__name__}")
    columns = dataset.column_names
    if image_column not in columns:
        raise ValueError(f"image_column {image_column!r} is not a column of the dataset; columns: {columns}")
    if isinstance(keep_columns, str):
        raise TypeError(f"keep_columns must be a list of column names, got the string {keep_columns!r}")
    kept = [c for c in columns if c != image_column] if keep_columns is None else list(keep_columns)
    missing = [c for c in kept if c not in columns]
    if missing:
        raise ValueError(f"keep_columns names columns the dataset does not have: {missing}; columns: {columns}")
    if output_column in kept:
        raise ValueError(f"output_column {output_column!r} would overwrite a kept column; rename it or drop it")
    if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
        raise ValueError(f"batch_size must be an int >= 1, got {batch_size!r}")
    if num_proc is not None and (isinstance(num_proc, bool) or not isinstance(num_proc, int) or num_proc < 1):
        raise ValueError(f"num_proc must be None or an int >= 1, got {num_proc!r}")
    num_proc = num_proc if num_proc and num_proc > 1 and len(dataset) > 1 else None
    if num_proc and model.device.type == "cuda":
        raise ValueError("with num_proc > 1 the model must stay on the CPU: each worker moves its copy to its device")

    config = model.config
    processor = processor if processor is not None else QGVAEImageProcessor.from_model_config(config)
    dtype = token_dtype(config.codebook_size)
    image_feature = dataset.features[image_column]
    decode_feature = image_feature if isinstance(image_feature, Image) and image_feature.decode else None
    if decode_feature is not None:  # decode in the map function, where the row index is known
        dataset = dataset.cast_column(image_column, Image(mode=image_feature.mode, decode=False))
    features = Features({c: dataset.features[c] for c in kept})
    features[output_column] = List(Value(dtype), length=config.num_tokens)
    device = torch.device(device) if device is not None else None
    function = _TokenizeBatch(
        model, processor, image_column, output_column, decode_feature, dtype, device,
        max(1, torch.get_num_threads() // num_proc) if num_proc else None,
    )  # fmt: skip
    fingerprint = Hasher.hash(
        (dataset._fingerprint, _model_fingerprint(model), processor.to_json_string(), kept, image_column,
         output_column, dtype)  # fmt: skip
    )
    was_training = model.training
    model.eval()
    if device is not None and not num_proc:
        model.to(device)
    try:
        # arrays (e.g. an `Array2D` column) reach the processor as NumPy arrays, not nested lists
        source = dataset.with_format(
            None if decode_feature else "numpy", columns=[image_column], output_all_columns=True
        )
        tokens = source.map(
            function,
            batched=True,
            batch_size=batch_size,
            with_indices=True,
            with_rank=num_proc is not None,
            num_proc=num_proc,
            remove_columns=[c for c in dataset.column_names if c not in kept],
            features=features,
            new_fingerprint=fingerprint,
            desc=desc or f"Tokenizing {image_column!r} into {config.num_tokens} tokens",
            **map_kwargs,
        )
    finally:
        model.train(was_training)
    tokens = tokens.with_format(None)
    if decode_feature is not None and image_column in kept:
        tokens = tokens.cast_column(image_column, image_feature)
    return tokens


__all__ = ["TOKEN_IDS_COLUMN", "encode_images", "load_tokenizer", "token_dtype", "tokenize_dataset"]
