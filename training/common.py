"""Shared by the training scripts: YAML configs with `key=value` overrides, accelerate set-up, checkpoints, data
loaders and the evaluation loop."""

from __future__ import annotations

import argparse
import dataclasses
import inspect
import re
import shutil
import time
import types
import typing
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, TypeVar

import numpy as np
import torch
import yaml
from accelerate import Accelerator, DataLoaderConfiguration, DistributedDataParallelKwargs, DistributedType
from accelerate.utils import GradientAccumulationPlugin, ProjectConfiguration
from datasets import Dataset, IterableDataset
from datasets.distributed import split_dataset_by_node
from huggingface_hub import ModelCard, ModelCardData, create_repo, upload_folder
from PIL import Image
from torch.utils.data import DataLoader
from transformers import PretrainedConfig
from transformers.models.auto.configuration_auto import CONFIG_MAPPING

from qg_tokenizer import QGVAEImageProcessor
from qg_tokenizer.data import EMBEDDED_MNIST, RandomCropStream, load_image_dataset, load_photos, photo_crop_dataset
from qg_tokenizer.metrics import psnr, ssim
from qg_tokenizer.visualize import progressive_grid

ConfigT = TypeVar("ConfigT")
REPO_ROOT = Path(__file__).resolve().parents[1]
CHECKPOINT_PREFIX = "checkpoint-"


class ConfigError(ValueError):
    """An invalid training configuration; the message names the offending key."""


def parse_script_args(
    argv: list[str] | None, description: str, config_class: type, artefact: str
) -> argparse.Namespace:
    """A training script's command line: `--config FILE`, `--resume`, `--push_to_hub REPO_ID`, `key=value` overrides."""
    parser = argparse.ArgumentParser(description=description, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", help=f"YAML file of {config_class.__name__} keys")
    parser.add_argument("--resume", help="'latest' (newest checkpoint in output_dir, if any) or a checkpoint folder")
    parser.add_argument("--push_to_hub", metavar="REPO_ID", help=f"upload the trained {artefact} folder to this repo")
    parser.add_argument("overrides", nargs="*", metavar="key=value", help="config overrides, e.g. max_steps=100")
    return parser.parse_args(argv)


def run_script(main: Callable[[], object]) -> None:
    """Run a training script's `main()`; an invalid configuration ends it with one `error: ...` line, no traceback."""
    try:
        main()
    except ConfigError as err:
        raise SystemExit(f"error: {err}") from None


# ------------------------------------------------------------------------------------------------ config parsing
class _YamlLoader(yaml.SafeLoader):
    """`yaml.SafeLoader` with YAML 1.2 scalars: `1e-4` (no decimal point) is a float, and only true/false are
    booleans (`mixed_precision=no` stays the string "no")."""

    yaml_implicit_resolvers = {
        first: [(tag, regexp) for tag, regexp in resolvers if tag != "tag:yaml.org,2002:bool"]
        for first, resolvers in yaml.SafeLoader.yaml_implicit_resolvers.items()
    }


_YamlLoader.add_implicit_resolver(
    "tag:yaml.org,2002:bool", re.compile(r"^(?:true|True|TRUE|false|False|FALSE)$"), list("tTfF")
)
_YamlLoader.add_implicit_resolver(
    "tag:yaml.org,2002:float", re.compile(r"^[-+]?[0-9][0-9_]*(\.[0-9_]*)?[eE][-+]?[0-9]+$"), list("-+0123456789")
)


def parse_value(text: str) -> Any:
    """A command-line override value read as YAML: `10` -> int, `1e-4` -> float, `true` -> bool, `null` -> None."""
    return yaml.load(text, Loader=_YamlLoader)


def load_config(cls: type[ConfigT], path: str | Path | None, overrides: list[str] = ()) -> ConfigT:
    """Build the dataclass `cls` from a YAML file and `key=value` overrides (dots reach nested sections).

    Unknown keys and values of the wrong type raise [`ConfigError`] naming the key.
    """
    raw: dict = {}
    if path is not None:
        if not Path(path).is_file():
            raise ConfigError(f"--config: no config file at {str(path)!r}")
        raw = yaml.load(Path(path).read_text(), Loader=_YamlLoader) or {}
        if not isinstance(raw, dict):
            raise ConfigError(f"--config: {str(path)!r} must hold a mapping of keys, got {type(raw).__name__}")
    for item in overrides:
        key, sep, value = item.partition("=")
        if not sep or not key:
            raise ConfigError(f"override {item!r} must have the form key=value (e.g. max_steps=100)")
        *parents, leaf = key.split(".")
        section = raw
        for depth, parent in enumerate(parents):
            section = section.setdefault(parent, {})
            if not isinstance(section, dict):
                raise ConfigError(f"override {item!r}: {'.'.join(parents[: depth + 1])!r} is not a section")
        section[leaf] = parse_value(value)
    return _build(cls, raw, prefix="")


def _build(cls: type[ConfigT], raw: dict, prefix: str) -> ConfigT:
    hints = typing.get_type_hints(cls)
    fields = {f.name: f for f in dataclasses.fields(cls)}
    kwargs = {}
    for key, value in raw.items():
        if key not in fields:
            raise ConfigError(f"unknown config key {prefix + str(key)!r}; known keys: {', '.join(fields)}")
        kwargs[key] = _check_type(prefix + key, value, hints[key])
        if hints[key] is dict:  # a free-form section (e.g. `model`) completes its default
            kwargs[key] = {**fields[key].default_factory(), **kwargs[key]}
    return cls(**kwargs)


def _type_name(annotation: Any) -> str:
    if typing.get_origin(annotation) is Literal:
        return " or ".join(repr(v) for v in typing.get_args(annotation))
    if typing.get_origin(annotation) in (typing.Union, types.UnionType):
        return " or ".join(_type_name(a) for a in typing.get_args(annotation))
    return "null" if annotation is type(None) else getattr(annotation, "__name__", str(annotation))


def _check_type(key: str, value: Any, annotation: Any) -> Any:
    """`value` converted to `annotation` (int -> float is the only conversion), or a [`ConfigError`] naming `key`."""
    origin, args = typing.get_origin(annotation), typing.get_args(annotation)
    if dataclasses.is_dataclass(annotation):
        if not isinstance(value, dict):
            raise ConfigError(f"{key} must be a section (mapping), got {type(value).__name__} {value!r}")
        return _build(annotation, value, prefix=key + ".")
    if origin in (typing.Union, types.UnionType):
        for option in args:
            try:
                return _check_type(key, value, option)
            except ConfigError:
                continue
    elif origin is Literal:
        if value in args:
            return value
    elif origin is dict or annotation is dict:
        if isinstance(value, dict):
            return value
    elif origin is list:
        if isinstance(value, list):
            return [_check_type(f"{key}[{i}]", item, args[0]) for i, item in enumerate(value)]
    elif annotation is float:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
    elif annotation is type(None):
        if value is None:
            return None
    elif isinstance(value, annotation) and not (annotation is int and isinstance(value, bool)):
        return value
    raise ConfigError(f"{key} must be {_type_name(annotation)}, got {type(value).__name__} {value!r}")


def config_to_dict(config: Any) -> dict:
    """A config dataclass as a plain nested dict (for logs, trackers and `results.json`)."""
    return dataclasses.asdict(config)


def build_model_config(section: dict, key: str = "model") -> PretrainedConfig:
    """`AutoConfig.for_model(**section)`, with unknown keys and mistyped values reported as `model.<name>`.

    `section["model_type"]` must be registered with `AutoConfig` (importing `qg_tokenizer` registers "qgvae" and
    "patch_vqvae"); every other key must be an argument of that config class's `__init__`.
    """
    section = dict(section)
    model_type = section.pop("model_type", None)
    if model_type not in CONFIG_MAPPING:
        raise ConfigError(f"{key}.model_type must name a registered model type (e.g. 'qgvae'), got {model_type!r}")
    config_class = CONFIG_MAPPING[model_type]
    params = inspect.signature(config_class.__init__).parameters
    for name, value in section.items():
        param = params.get(name)
        if param is None or param.kind in (param.VAR_KEYWORD, param.VAR_POSITIONAL) or name == "self":
            known = [p for p, v in params.items() if p != "self" and v.kind not in (v.VAR_KEYWORD, v.VAR_POSITIONAL)]
            raise ConfigError(f"unknown config key '{key}.{name}' for model_type {model_type!r}; known keys: {known}")
        if type(param.default) in (int, float, bool, str):
            _check_type(f"{key}.{name}", value, float if type(param.default) is float else type(param.default))
    try:
        return config_class(**section)
    except (TypeError, ValueError) as err:
        raise ConfigError(f"{key}: {err}") from err


@dataclass
class DataConfig:
    """Where the images come from (see `qg_tokenizer.data.load_image_dataset`) and how they are batched."""

    source: str = EMBEDDED_MNIST  # "embedded-mnist", a .npz file, an image folder, a save_to_disk folder or a hub name
    name: str | None = None  # configuration name of a hub data set
    train_split: str = "train"
    eval_split: str = "test"
    image_column: str = "image"
    streaming: bool = False  # stream (hub data sets without downloading first); each process reads its own shards
    shuffle_buffer_size: int = 10_000  # streaming only: the shuffle buffer of `IterableDataset.shuffle`
    horizontal_flip: bool = False  # random left-right flips of training images
    num_workers: int = 0
    # an endless stream of fresh random crops of the whole photos `photo_train_*` of the .npz `source` (photo_set.npz)
    # replaces the training split (`train_split` still gives the images the final codebook usage is measured on)
    random_crops: bool = False
    crop_min_side: int = 32
    # random_crops only: hold the last N training photos out of the stream; eval_split "validation" is then
    # `num_validation_crops` fixed crops of them (for choosing a recipe without the test photos)
    validation_photos: int = 0
    num_validation_crops: int = 512


# ---------------------------------------------------------------------------------------------- accelerate set-up
def setup_accelerator(
    output_dir: str | Path,
    mixed_precision: str | None,
    gradient_accumulation_steps: int,
    report_to: str,
    seed: int,
) -> Accelerator:
    """An `Accelerator` for codebook models: DDP without buffer broadcast, seedable data order, fixed accumulation.

    `mixed_precision=None` keeps the choice of `accelerate launch` / `accelerate config`. DDP must not broadcast
    buffers: the quantiser's `usage_counts` and `reset_statistic` are per-process sums that the trainer all-reduces.
    """
    accelerator = Accelerator(
        mixed_precision=mixed_precision,
        gradient_accumulation_plugin=GradientAccumulationPlugin(
            num_steps=gradient_accumulation_steps, sync_with_dataloader=False
        ),
        log_with=None if report_to == "none" else report_to,
        project_config=ProjectConfiguration(project_dir=str(output_dir), logging_dir=str(Path(output_dir) / "logs")),
        dataloader_config=DataLoaderConfiguration(use_seedable_sampler=True, data_seed=seed),
        kwargs_handlers=[DistributedDataParallelKwargs(broadcast_buffers=False)],
    )
    if accelerator.distributed_type == DistributedType.DEEPSPEED or (
        accelerator.distributed_type == DistributedType.FSDP
        and str(accelerator.state.fsdp_plugin.sharding_strategy).rsplit(".", 1)[-1] != "NO_SHARD"
    ):
        raise ConfigError(
            "the Voronoi reset needs whole codebook gradients on every process: use DDP (the default) or FSDP with "
            f"fsdp_sharding_strategy NO_SHARD, got {accelerator.distributed_type}"
        )
    return accelerator


# --------------------------------------------------------------------------------------------------- checkpoints
@dataclass
class TrainerState:
    """Progress saved in every checkpoint: optimizer steps done, seconds spent training, and the evaluation log."""

    step: int = 0
    train_time: float = 0.0
    history: list[dict] = field(default_factory=list)

    def state_dict(self) -> dict:
        return dataclasses.asdict(self)

    def load_state_dict(self, state: dict) -> None:
        self.step, self.train_time, self.history = state["step"], state["train_time"], state["history"]

    def summary(self, num_processes: int) -> dict:
        """The progress part of a run's `results.json`."""
        return {
            "step": self.step, "train_time": self.train_time, "seconds_per_step": self.train_time / max(self.step, 1),
            "num_processes": num_processes,
        }  # fmt: skip


class TrainingClock:
    """Keeps `state.train_time`: seconds of training since the loop (re)started, on top of what a resumed run had
    already spent, leaving out what runs inside `paused()` (evaluations, checkpoints)."""

    def __init__(self, state: TrainerState):
        self.state, self.start, self.before, self.paused_seconds = state, time.perf_counter(), state.train_time, 0.0

    def tick(self) -> None:
        self.state.train_time = self.before + time.perf_counter() - self.start - self.paused_seconds

    @contextmanager
    def paused(self) -> Iterator[None]:
        start = time.perf_counter()
        try:
            yield
        finally:
            self.paused_seconds += time.perf_counter() - start

    def out_of_time(self, max_train_time: float | None, accelerator: Accelerator) -> bool:
        """Whether `max_train_time` is reached on any process (all processes agree, so they stop at the same step)."""
        if max_train_time is None:
            return False
        done = torch.tensor(float(self.state.train_time >= max_train_time), device=accelerator.device)
        return bool(accelerator.reduce(done) > 0)


def push_output_dir(output_dir: str | Path, repo_id: str, commit_message: str) -> None:
    """Upload a finished run's folder (without `checkpoints/` and `logs/`) to the hub repo `repo_id`."""
    create_repo(repo_id, exist_ok=True)
    upload_folder(
        repo_id=repo_id, folder_path=output_dir, ignore_patterns=["checkpoints/*", "logs/*"],
        commit_message=commit_message,
    )  # fmt: skip


def list_checkpoints(output_dir: str | Path) -> list[Path]:
    """`output_dir/checkpoints/checkpoint-<step>` folders, oldest first."""
    folder = Path(output_dir) / "checkpoints"
    found = [p for p in folder.glob(CHECKPOINT_PREFIX + "*") if p.name[len(CHECKPOINT_PREFIX) :].isdigit()]
    return sorted(found, key=lambda p: int(p.name[len(CHECKPOINT_PREFIX) :]))


def resolve_checkpoint(output_dir: str | Path, resume: str | None) -> Path | None:
    """The checkpoint `--resume` names: `latest` (None when there is none yet) or a checkpoint folder."""
    if resume is None:
        return None
    if resume == "latest":
        found = list_checkpoints(output_dir)
        return found[-1] if found else None
    if not (Path(resume) / "custom_checkpoint_0.pkl").is_file():
        raise ConfigError(f"--resume must be 'latest' or a checkpoint folder written by save_state, got {resume!r}")
    return Path(resume)


def save_checkpoint(accelerator: Accelerator, output_dir: str | Path, step: int, total_limit: int | None) -> Path:
    """`accelerator.save_state` to `checkpoints/checkpoint-<step>`, keeping the newest `total_limit` checkpoints."""
    path = Path(output_dir) / "checkpoints" / f"{CHECKPOINT_PREFIX}{step}"
    accelerator.save_state(str(path))
    if accelerator.is_main_process and total_limit is not None:
        for old in list_checkpoints(output_dir)[:-total_limit]:
            shutil.rmtree(old)
    accelerator.wait_for_everyone()
    return path


# ---------------------------------------------------------------------------------------------------------- data
class ImageCollator:
    """Examples -> `pixel_values [B, ch, S, S]` in [0, 1] through the model's image processor."""

    def __init__(self, processor: QGVAEImageProcessor, image_column: str):
        self.processor, self.image_column = processor, image_column

    def __call__(self, examples: list[dict]) -> torch.Tensor:
        return self.processor([ex[self.image_column] for ex in examples], return_tensors="pt")["pixel_values"]


def training_photos(data: DataConfig) -> tuple[list[np.ndarray], list[np.ndarray]]:
    """`data.random_crops`: the whole photos the stream crops from and the `validation_photos` held out of it."""
    if not data.source.endswith(".npz"):
        raise ConfigError(f"data.random_crops needs a .npz source of whole photos, got {data.source!r}")
    try:
        photos = list(load_photos(data.source).values())
    except FileNotFoundError as err:
        raise ConfigError(f"data.source: {err}") from err
    except ValueError as err:
        raise ConfigError(f"data.random_crops: {err}") from err
    if not 0 <= data.validation_photos < len(photos):
        raise ConfigError(f"data.validation_photos must be in [0, {len(photos)}), got {data.validation_photos}")
    cut = len(photos) - data.validation_photos
    return photos[:cut], photos[cut:]


def load_splits(
    data: DataConfig, num_processes: int, image_size: int | None = None
) -> tuple[Dataset | IterableDataset, Dataset | IterableDataset]:
    """The training and evaluation splits, with load errors reported as [`ConfigError`]s naming the `data.` key.

    With `data.random_crops` and `validation_photos`, eval_split "validation" is fixed crops (`image_size` px) of
    the held-out training photos.
    """
    loaded = []
    validation = data.random_crops and data.eval_split == "validation" and data.validation_photos > 0
    splits = [("train_split", data.train_split)] + ([] if validation else [("eval_split", data.eval_split)])
    for split_key, split in splits:
        try:
            loaded.append(
                load_image_dataset(
                    data.source, split, data.image_column, data.streaming, data.name, num_shards=num_processes
                )
            )
        except FileNotFoundError as err:
            raise ConfigError(f"data.source: {err}") from err
        except ValueError as err:
            key = "image_column" if "image_column" in str(err) else split_key if "split" in str(err) else "source"
            raise ConfigError(f"data.{key}: {err}") from err
        except Exception as err:  # hub look-ups fail with network/hub-specific errors
            raise ConfigError(f"data.source: could not load {data.source!r}: {err}") from err
    if validation:
        loaded.append(photo_crop_dataset(training_photos(data)[1], image_size, data.num_validation_crops, seed=10**6))
    return loaded[0], loaded[1]


def build_train_dataloader(
    dataset: Dataset | IterableDataset, collator: ImageCollator, data: DataConfig, batch_size: int,
    accelerator: Accelerator, seed: int,
) -> DataLoader:  # fmt: skip
    """Shuffled, full batches for this process.

    A map-style data set goes through `accelerator.prepare` (seedable sampler: the order depends on seed and epoch
    only, so a resumed run sees the same batches). A streamed one is split between processes by shards
    (`split_dataset_by_node`) and shuffled in a buffer; it is not prepared, so batches arrive on the CPU.
    """
    if isinstance(dataset, IterableDataset):
        dataset = split_dataset_by_node(dataset, accelerator.process_index, accelerator.num_processes)
        dataset = dataset.shuffle(seed=seed, buffer_size=data.shuffle_buffer_size)
        return DataLoader(dataset, batch_size, collate_fn=collator, num_workers=data.num_workers, drop_last=True)
    loader = DataLoader(
        dataset, batch_size, shuffle=True, drop_last=True, collate_fn=collator, num_workers=data.num_workers,
        generator=torch.Generator().manual_seed(seed),  # iterators draw their seed here, not from the global RNG
    )  # fmt: skip
    return accelerator.prepare(loader)


def build_eval_dataloader(
    dataset: Dataset | IterableDataset, collator: ImageCollator, batch_size: int, accelerator: Accelerator,
    max_samples: int | None = None,
) -> DataLoader:  # fmt: skip
    """The first `max_samples` images (all when None) in order, split between processes by `accelerator.prepare`."""
    if isinstance(dataset, IterableDataset):
        if max_samples is None:
            raise ConfigError("max_eval_samples must be set when data.streaming is true (a stream has no end)")
        dataset = Dataset.from_list(list(dataset.take(max_samples)), features=dataset.features)
    elif max_samples is not None:
        dataset = dataset.select(range(min(max_samples, len(dataset))))
    # an own generator: creating the iterator must not draw from the global RNG (resumed runs replay it exactly)
    return accelerator.prepare(DataLoader(dataset, batch_size, collate_fn=collator, generator=torch.Generator()))


def crop_batches(
    photos: list[np.ndarray], data: DataConfig, collator: ImageCollator, image_size: int, batch_size: int,
    accelerator: Accelerator, seed: int, skip_batches: int = 0,
) -> Iterator[torch.Tensor]:  # fmt: skip
    """Training batches from [`RandomCropStream`] over `photos` (`data.random_crops`): a stream of its own on every
    process, continued `skip_batches` batches in (crop i is a function of seed, process and i, so resuming is exact)."""
    stream = RandomCropStream(
        photos, image_size, seed=seed, process_index=accelerator.process_index,
        start=skip_batches * batch_size, min_side=data.crop_min_side, horizontal_flip=data.horizontal_flip,
    )  # fmt: skip
    loader = DataLoader(stream, batch_size, collate_fn=collator, num_workers=data.num_workers)
    for batch in loader:
        yield batch.to(accelerator.device)


def endless_batches(
    dataloader: DataLoader, accelerator: Accelerator, skip_batches: int = 0, horizontal_flip: bool = False
) -> Iterator[torch.Tensor]:
    """Training batches epoch after epoch, starting `skip_batches` batches in (to continue a resumed run mid-epoch).

    Random flips are drawn here, as each batch is consumed, rather than when a loader prefetches it: the global RNG
    state a checkpoint saves then replays exactly on resume.
    """
    epoch = 0
    if not isinstance(dataloader.dataset, torch.utils.data.IterableDataset):
        epoch, skip_batches = divmod(skip_batches, len(dataloader))
    while True:
        # a map-style loader reshuffles by epoch through its seedable sampler, a stream through its shuffle buffer
        target = dataloader if hasattr(dataloader, "set_epoch") else dataloader.dataset
        target.set_epoch(epoch)
        loader = accelerator.skip_first_batches(dataloader, skip_batches) if skip_batches else dataloader
        for batch in loader:
            batch = batch.to(accelerator.device)
            if horizontal_flip:
                flip = torch.rand(len(batch), device=batch.device) < 0.5
                batch = torch.where(flip[:, None, None, None], batch.flip(-1), batch)
            yield batch
        epoch, skip_batches = epoch + 1, 0


# ---------------------------------------------------------------------------------------------------- evaluation
def eval_prefix_lengths(num_tokens: int) -> list[int]:
    """k = C/8, C/4, C/2 and C (at least 1, without repeats), the prefix lengths every evaluation reports."""
    return sorted({max(1, num_tokens // d) for d in (8, 4, 2, 1)})


@torch.no_grad()
def save_eval_grid(model, pixel_values: torch.Tensor, path: str | Path, accelerator: Accelerator) -> Image.Image:
    """PNG rows: input | full reconstruction | reconstructions from the first C/8, C/4, C/2 tokens (`model` in
    eval mode)."""
    lengths = eval_prefix_lengths(model.config.num_tokens)
    with accelerator.autocast():
        grid = progressive_grid(model, pixel_values, lengths=lengths[-1:] + lengths[:-1])
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    grid.save(path)
    return grid


@torch.no_grad()
def evaluate(
    model, dataloader: DataLoader, accelerator: Accelerator, grid_path: str | Path | None = None,
    num_grid_images: int = 8,
) -> dict[str, float]:  # fmt: skip
    """Mean test PSNR and SSIM of full reconstructions and PSNR of decoding only the first k tokens, over all
    processes; the main process also saves a grid of its first `num_grid_images` images to `grid_path`.

    `model` is the unwrapped model (`encode`/`decode`); returns `psnr`, `ssim`, `psnr_k<k>` for k < C and
    `num_images`.
    """
    was_training = model.training
    model.eval()
    lengths = eval_prefix_lengths(model.config.num_tokens)
    rows = []
    for pixel_values in dataloader:
        if grid_path is not None and not rows and accelerator.is_main_process:
            save_eval_grid(model, pixel_values[:num_grid_images], grid_path, accelerator)
        with accelerator.autocast():
            token_ids = model.encode(pixel_values).token_ids
            decoded = [model.decode(token_ids, prefix_length=k).pixel_values for k in lengths]  # the last one is full
        scores = [ssim(decoded[-1], pixel_values)] + [psnr(image, pixel_values) for image in decoded]
        rows.append(accelerator.gather_for_metrics(torch.stack(scores, 1)))  # (B, 1 + len(lengths))
    scores = torch.cat(rows)
    means = scores.mean(0).tolist()
    model.train(was_training)
    prefixes = {f"psnr_k{k}": m for k, m in zip(lengths[:-1], means[1:])}
    return {"psnr": means[-1], "ssim": means[0], **prefixes, "num_images": len(scores)}


def spread(dataset: Dataset | IterableDataset, num: int) -> Dataset | IterableDataset:
    """`num` images spread evenly over a map-style data set (all when it is smaller), or the first `num` of a
    stream."""
    if isinstance(dataset, IterableDataset):
        return Dataset.from_list(list(dataset.take(num)), features=dataset.features)
    return dataset.select(np.linspace(0, len(dataset) - 1, min(num, len(dataset))).round().astype(int).tolist())


@torch.no_grad()
def init_codebooks_from_data(
    model, dataloader: DataLoader, accelerator: Accelerator, generator: torch.Generator
) -> None:
    """Data-dependent codebook initialisation: every codebook from its own encoder outputs on the images of
    `dataloader` (gathered from all processes; the same `generator` everywhere gives the same codebooks)."""
    quantizer = model.quantizer
    outputs = []
    for pixel_values in dataloader:
        with accelerator.autocast():
            z = model.encoder(pixel_values)  # (B, C, D)
        outputs.append(accelerator.gather_for_metrics(z.float()).reshape(-1, quantizer.num_tokens, z.shape[-1]))
    quantizer.init_from_samples(torch.cat(outputs), generator)


@torch.no_grad()
def codeword_counts(model, dataloader: DataLoader, accelerator: Accelerator) -> torch.Tensor:
    """`[num_codebooks, K]` how often each codeword is chosen when encoding every image of `dataloader` (all
    processes): one row per token for QG-VAE (C codebooks), one row summed over the grid for a shared codebook."""
    was_training = model.training
    model.eval()
    num_codebooks = model.quantizer.codebook.shape[0]
    counts = torch.zeros(num_codebooks, model.config.codebook_size, device=accelerator.device)
    for pixel_values in dataloader:
        with accelerator.autocast():
            token_ids = accelerator.gather_for_metrics(model.encode(pixel_values).token_ids)  # (N, C)
        token_ids = token_ids.T.reshape(num_codebooks, -1)  # (C, N), or (1, C * N) for a shared codebook
        counts.scatter_add_(1, token_ids, torch.ones(token_ids.shape, device=counts.device))
    model.train(was_training)
    return counts


# ---------------------------------------------------------------------------------------------------- model card
def write_model_card(output_dir: str | Path, card_data: dict, **values) -> ModelCard:
    """Fill the repository's `model_card.md` template (`values` are its Jinja fields) into `output_dir/README.md`."""
    card = ModelCard.from_template(
        ModelCardData(**card_data), template_path=str(REPO_ROOT / "model_card.md"), **values
    )
    card.save(Path(output_dir) / "README.md")
    return card
