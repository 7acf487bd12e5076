"""Shared by the training scripts: YAML configs with `key=value` overrides, accelerate set-up, checkpoints, data
loaders and the evaluation loop."""

from __future__ import annotations

import argparse
import dataclasses
import hashlib
import inspect
import json
import os
import re
import shutil
import time
import types
import typing
from collections.abc import Callable, Collection, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, TypeVar

import numpy as np
import torch
import yaml
from accelerate import Accelerator, DataLoaderConfiguration, DistributedDataParallelKwargs, DistributedType
from accelerate.utils import GradientAccumulationPlugin, ProjectConfiguration, load
from datasets import Dataset, IterableDataset
from datasets.distributed import split_dataset_by_node
from filelock import FileLock, Timeout
from huggingface_hub import ModelCard, ModelCardData, create_repo, upload_folder
from PIL import Image
from safetensors.torch import load_file, save_file
from torch.utils.data import DataLoader
from transformers import PretrainedConfig
from transformers.models.auto.configuration_auto import CONFIG_MAPPING

from qg_tokenizer import QGVAEImageProcessor
from qg_tokenizer.data import EMBEDDED_MNIST, RandomCropStream, load_image_dataset, load_photos, photo_crop_dataset
from qg_tokenizer.metrics import psnr, ssim
from qg_tokenizer.visualize import progressive_grid, save_grid

ConfigT = TypeVar("ConfigT")
REPO_ROOT = Path(__file__).resolve().parents[1]
CHECKPOINT_PREFIX = "checkpoint-"
CHECKPOINT_MANIFEST = "checkpoint.json"  # written last: the files and their digests, the trainer state, the config
TEMP_SUFFIX = ".tmp"  # a checkpoint being written
LOCK_FILE = "train.lock"
# never uploaded from an output folder: checkpoints, optimizer/scheduler/random states, pickles, logs, the lock
HUB_IGNORE_PATTERNS = ["checkpoints/*", "checkpoint-*", "logs/*", "*.lock", "*.pkl", "*.bin", "*.pt", "*.pth"]


class ConfigError(ValueError):
    """An invalid training configuration; the message names the offending key."""


class RunError(ValueError):
    """A run that cannot go ahead as asked: its folder is in use or holds another run's checkpoints, or a checkpoint
    is incomplete, damaged or from a different run; the message names the folder or file and the way out."""


def parse_script_args(
    argv: list[str] | None, description: str, config_class: type, artefact: str
) -> argparse.Namespace:
    """A training script's command line: `--config FILE`, `--resume`, `--push_to_hub REPO_ID`, `key=value` overrides."""
    parser = argparse.ArgumentParser(description=description, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", help=f"YAML file of {config_class.__name__} keys")
    parser.add_argument(
        "--resume", help="'latest' (the newest checkpoint of the run writing output_dir, if any) or a checkpoint folder"
    )
    parser.add_argument("--push_to_hub", metavar="REPO_ID", help=f"upload the trained {artefact} folder to this repo")
    parser.add_argument("overrides", nargs="*", metavar="key=value", help="config overrides, e.g. max_steps=100")
    return parser.parse_args(argv)


def run_script(main: Callable[[], object]) -> None:
    """Run a training script's `main()`; an invalid configuration or a run that cannot go ahead ends it with one
    `error: ...` line, no traceback."""
    try:
        main()
    except (ConfigError, RunError) as err:
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
    # a fixed (map-style) training split: hold its last N images out of training; eval_split "validation" is then them
    validation_images: int = 0


# ---------------------------------------------------------------------------------------------- accelerate set-up
def setup_accelerator(
    project_dir: str | Path,
    mixed_precision: str | None,
    gradient_accumulation_steps: int,
    report_to: str,
    seed: int,
) -> Accelerator:
    """An `Accelerator` for codebook models: DDP without buffer broadcast, seedable data order, fixed accumulation.

    Tensorboard writes to `project_dir/logs`. `mixed_precision=None` keeps the choice of `accelerate launch` /
    `accelerate config`. DDP must not broadcast buffers: the quantiser's `usage_counts` and `reset_statistic` are
    per-process sums that the trainer all-reduces.
    """
    accelerator = Accelerator(
        mixed_precision=mixed_precision,
        gradient_accumulation_plugin=GradientAccumulationPlugin(
            num_steps=gradient_accumulation_steps, sync_with_dataloader=False
        ),
        log_with=None if report_to == "none" else report_to,
        project_config=ProjectConfiguration(project_dir=str(project_dir), logging_dir=str(Path(project_dir) / "logs")),
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
    """Upload a finished run's folder to the hub repo `repo_id`: never checkpoints, optimizer or trainer state,
    pickles, logs or the lock (`HUB_IGNORE_PATTERNS`, also for folders laid out by older versions)."""
    create_repo(repo_id, exist_ok=True)
    upload_folder(
        repo_id=repo_id, folder_path=output_dir, ignore_patterns=HUB_IGNORE_PATTERNS, commit_message=commit_message
    )


def respect_umask(folder: str | Path) -> None:
    """Give the `.safetensors` files of `folder` the mode of an ordinary new file (0o666 less the umask, 0o644
    typically): safetensors >= 0.8 writes through a temporary file created 0o600 (safetensors issue #782)."""
    umask = os.umask(0o077)  # reading the umask sets it: put it back at once
    os.umask(umask)
    for path in Path(folder).rglob("*.safetensors"):
        path.chmod(0o666 & ~umask)


def run_folder(output_dir: str | Path) -> Path:
    """`<output_dir>-training`, beside the output folder: the run's checkpoints, tensorboard logs and lock file, so that
    the output folder holds only what goes to the hub."""
    output_dir = Path(output_dir).resolve()
    return output_dir.with_name(output_dir.name + "-training")


@contextmanager
def locked_run_folder(folder: str | Path, accelerator: Accelerator) -> Iterator[None]:
    """Hold `folder/train.lock` (on the main process) while the run lasts: a second run on the same folder stops at
    once with a [`RunError`] instead of interleaving its checkpoints and logs with the first one's.

    An OS file lock (`filelock`: `flock` on POSIX), released when the run ends, fails or is killed; the empty lock
    file stays.
    """
    if not accelerator.is_main_process:
        yield
        return
    path = Path(folder) / LOCK_FILE
    path.parent.mkdir(parents=True, exist_ok=True)
    lock = FileLock(path)
    try:
        lock.acquire(timeout=0)
    except Timeout:
        raise RunError(
            f"{folder} is in use by another run (it holds the lock {path}): wait for that run to end, or choose "
            "another output_dir"
        ) from None
    try:
        yield
    finally:
        lock.release()


def refuse_old_layout(output_dir: str | Path) -> None:
    """Refuse an output folder that holds checkpoints in the layout of older versions (`output_dir/checkpoints/`,
    the trainer state pickled by `register_for_checkpointing`), which are never resumed: a [`RunError`] names it."""
    if list_checkpoints(output_dir):
        raise RunError(
            f"{Path(output_dir) / 'checkpoints'} holds checkpoints in the layout of an older version, which this one "
            f"does not resume (they keep the trainer state as a pickle): move or delete that folder (checkpoints now "
            f"go to {run_folder(output_dir) / 'checkpoints'})"
        )


def list_checkpoints(run_dir: str | Path) -> list[Path]:
    """`run_dir/checkpoints/checkpoint-<step>` folders, oldest first (not the `.tmp` folders of unfinished writes)."""
    found = [p for p in (Path(run_dir) / "checkpoints").glob(CHECKPOINT_PREFIX + "*") if _step_of(p) is not None]
    return sorted(found, key=_step_of)


def _step_of(path: Path) -> int | None:
    number = path.name[len(CHECKPOINT_PREFIX) :]
    return int(number) if path.name.startswith(CHECKPOINT_PREFIX) and number.isdigit() else None


def resolve_checkpoint(run_dir: str | Path, resume: str | None) -> Path | None:
    """The checkpoint `--resume` names, verified whole (see [`verify_checkpoint`]); None to start afresh.

    `resume` is None (a fresh run: refused while `run_dir` holds checkpoints, whose rotation and `--resume latest`
    would mix with the new run's), `"latest"` (the newest checkpoint, None when there is none yet) or a checkpoint
    folder (refused while `run_dir` holds a checkpoint as new or newer, which `--resume latest` would later take for
    this run's).
    """
    found = list_checkpoints(run_dir)
    if resume is None:
        if found:
            raise RunError(
                f"{Path(run_dir) / 'checkpoints'} holds checkpoints of an earlier run (the newest: {found[-1].name}): "
                "continue that run with --resume latest, or start the new one with another output_dir (or delete "
                "that folder)"
            )
        return None
    if resume == "latest":
        return verify_checkpoint(found[-1]) if found else None
    path = Path(resume)
    if _step_of(path) is None or not path.is_dir():
        raise ConfigError(f"--resume must be 'latest' or a {CHECKPOINT_PREFIX}<step> folder, got {resume!r}")
    newer = [p.name for p in found if _step_of(p) >= _step_of(path) and p.resolve() != path.resolve()]
    if newer:
        raise RunError(
            f"--resume {resume}: {Path(run_dir) / 'checkpoints'} also holds {', '.join(newer)}, which --resume latest "
            "would take for this run's later: move them away, or resume into another output_dir"
        )
    return verify_checkpoint(path)


_WAY_OUT = "delete (or move away) that checkpoint, and --resume latest takes the one before it"


def verify_checkpoint(path: Path) -> Path:
    """`path`, after checking that its manifest lists every file it was written with, each whole and unchanged
    (sizes and SHA-256); a [`RunError`] names what is missing or damaged."""
    manifest = checkpoint_manifest(path)
    for name, written in manifest["files"].items():
        file = path / name
        if not file.is_file():
            raise RunError(f"checkpoint {path} is damaged: {name} is missing; {_WAY_OUT}")
        found = _file_digest(file)
        if found != written:
            raise RunError(
                f"checkpoint {path} is damaged: {name} has {found['bytes']} bytes and SHA-256 {found['sha256'][:12]}, "
                f"it was written with {written['bytes']} bytes and {written['sha256'][:12]}; {_WAY_OUT}"
            )
    return path


def checkpoint_manifest(path: Path) -> dict:
    """`path/checkpoint.json`: the step, the number of processes, the files and their digests, and (for scripts that
    pass them to [`save_checkpoint`]) the trainer state and the training config."""
    manifest = Path(path) / CHECKPOINT_MANIFEST
    if not manifest.is_file():
        raise RunError(
            f"{path} is not a complete checkpoint: it has no {CHECKPOINT_MANIFEST} (written by an older version of "
            "the training scripts, or copied in part)"
        )
    try:
        return json.loads(manifest.read_text())
    except json.JSONDecodeError as err:
        raise RunError(f"checkpoint {path} is damaged: {manifest.name} does not parse ({err})") from None


def _file_digest(path: Path, sync: bool = False) -> dict:
    """Size and SHA-256 of a file; `sync`: flush it to the disk first (a renamed checkpoint must survive a crash)."""
    digest = hashlib.sha256()
    with open(path, "rb") as file:
        if sync:
            os.fsync(file.fileno())
        while block := file.read(2**20):  # (hashlib.file_digest needs Python 3.11)
            digest.update(block)
    return {"bytes": path.stat().st_size, "sha256": digest.hexdigest()}


def check_same_run(checkpoint: Path, config: dict, may_change: Collection[str]) -> None:
    """Refuse to resume `checkpoint` with a `config` that differs from the one it was written with, other than in
    the dotted keys `may_change` (the [`RunError`] lists the differences)."""
    saved = checkpoint_manifest(checkpoint).get("train_config")
    if saved is None:
        raise RunError(f"checkpoint {checkpoint} does not record its training config, so it cannot be checked")
    old, new = _flatten(saved), _flatten(config)
    changed = [
        f"{key}: {repr(old[key]) if key in old else 'unset'} -> {repr(new[key]) if key in new else 'unset'}"
        for key in sorted(old.keys() | new.keys())
        if key not in may_change and (key in old, old.get(key)) != (key in new, new.get(key))
    ]
    if changed:
        raise RunError(
            f"--resume: {checkpoint} was written by a different run ({'; '.join(changed)}); only "
            f"{', '.join(sorted(may_change))} may change when resuming: start the new run with another output_dir"
        )


def _flatten(config: dict, prefix: str = "") -> dict:
    flat = {}
    for key, value in config.items():
        if isinstance(value, dict) and value:
            flat |= _flatten(value, f"{prefix}{key}.")
        else:
            flat[prefix + key] = value
    return flat


def save_checkpoint(
    accelerator: Accelerator, run_dir: str | Path, step: int, total_limit: int | None,
    state: TrainerState | None = None, config: dict | None = None, modules: dict[str, torch.nn.Module] | None = None,
) -> Path:  # fmt: skip
    """`accelerator.save_state` (weights, optimizer, scheduler, random states) to
    `run_dir/checkpoints/checkpoint-<step>`, plus `modules` as `<name>.safetensors` and `checkpoint.json` (the files
    and their digests, `state` and `config` as JSON).

    Written to `checkpoint-<step>.tmp` and renamed when complete (a rename is atomic), so a run killed while saving
    leaves no `checkpoint-<step>` for `--resume latest` to pick. Then keeps the `total_limit` newest checkpoints up to
    this one, by step number (never this one), and removes unfinished writes.
    """
    root = Path(run_dir) / "checkpoints"
    path, temp = root / f"{CHECKPOINT_PREFIX}{step}", root / f"{CHECKPOINT_PREFIX}{step}{TEMP_SUFFIX}"
    if accelerator.is_main_process:
        shutil.rmtree(temp, ignore_errors=True)
    accelerator.wait_for_everyone()
    accelerator.save_state(str(temp))  # every process writes its random states
    accelerator.wait_for_everyone()
    if accelerator.is_main_process:
        for name, module in (modules or {}).items():
            save_file(module.state_dict(), temp / f"{name}.safetensors")
        manifest = {
            "step": step, "num_processes": accelerator.num_processes,
            "files": {p.name: _file_digest(p, sync=True) for p in sorted(temp.iterdir())},
        }  # fmt: skip
        if state is not None:
            manifest["trainer_state"] = state.state_dict()
        if config is not None:
            manifest["train_config"] = config
        with open(temp / CHECKPOINT_MANIFEST, "w") as file:
            json.dump(manifest, file, indent=1)
            file.flush()
            os.fsync(file.fileno())
        temp.rename(path)
        for unfinished in root.glob(f"{CHECKPOINT_PREFIX}*{TEMP_SUFFIX}"):  # left by runs killed while saving
            shutil.rmtree(unfinished)
        if total_limit is not None:
            older = [p for p in list_checkpoints(run_dir) if _step_of(p) < step]
            for old in older[: max(len(older) - (total_limit - 1), 0)]:
                shutil.rmtree(old)
    accelerator.wait_for_everyone()
    return path


def load_checkpoint(
    accelerator: Accelerator, path: Path, state: TrainerState, modules: dict[str, torch.nn.Module] | None = None
) -> None:
    """Restore a checkpoint of [`save_checkpoint`] (verified by [`resolve_checkpoint`]): weights, optimizer and
    scheduler (`accelerator.load_state`, all `torch.load`s with `weights_only=True`), the random states, `modules`
    and `state` (from JSON). Nothing is unpickled beyond what `weights_only` allows; any part that cannot be restored
    raises a [`RunError`] naming it."""
    manifest = checkpoint_manifest(path)
    if manifest["num_processes"] != accelerator.num_processes:
        raise RunError(
            f"checkpoint {path} was written by {manifest['num_processes']} process(es), this run has "
            f"{accelerator.num_processes}: every process resumes its own random states and data"
        )
    pickled = sorted(p.name for p in path.glob("custom_checkpoint_*.pkl"))
    if pickled:
        raise RunError(
            f"checkpoint {path} holds pickled objects ({', '.join(pickled)}), which are never loaded: unpickling can "
            f"run arbitrary code (the trainer state belongs in {CHECKPOINT_MANIFEST})"
        )
    if "trainer_state" not in manifest:
        raise RunError(f"checkpoint {path} does not record its trainer state in {CHECKPOINT_MANIFEST}")
    # weights_only for the optimizer and scheduler whatever accelerate's default; the random states and the fp16
    # scaler get its default (True), and torch >= 2.6 defaults to it too
    try:
        accelerator.load_state(str(path), load_kwargs={"weights_only": True})
    except Exception as err:  # torch, safetensors and accelerate each raise their own errors
        raise RunError(f"cannot restore checkpoint {path}: {type(err).__name__}: {err}") from err
    # accelerate only logs a random-state file it cannot load: check that this process's states were restored
    random_states = path / f"random_states_{accelerator.process_index}.pkl"
    try:
        restored = torch.equal(load(random_states, weights_only=True)["torch_manual_seed"], torch.get_rng_state())
    except Exception as err:
        raise RunError(
            f"cannot restore the random states of checkpoint {path} from {random_states.name}: {err}"
        ) from err
    if not restored:
        raise RunError(f"the random states of checkpoint {path} were not restored from {random_states.name}")
    for name, module in (modules or {}).items():
        try:
            module.load_state_dict(load_file(path / f"{name}.safetensors", device=str(accelerator.device)))
        except Exception as err:
            raise RunError(f"cannot restore {name}.safetensors of checkpoint {path}: {err}") from err
    state.load_state_dict(manifest["trainer_state"])


def trim_log(path: str | Path, step: int) -> None:
    """Keep the lines of a JSON-lines log up to `step` (a resumed run logs the later steps again) and drop a line a
    killed run left half-written."""
    path = Path(path)
    if not path.is_file():
        return
    kept = []
    for line in path.read_text().splitlines():
        try:
            if json.loads(line)["step"] <= step:
                kept.append(line + "\n")
        except (json.JSONDecodeError, KeyError, TypeError):
            continue
    path.write_text("".join(kept))


def reusable_run(output_dir: str | Path, record: str | Path, config: Any) -> dict | None:
    """For scripts that rerun trainings (the benchmarks): the `results.json` of the run in `output_dir` if it finished
    with `config`; else None, once `output_dir` is ready for the run of `config` with `--resume latest`.

    `record` is a YAML file of the config (any YAML value) the run in `output_dir` was started with; `config` is
    written there. A run of `config` that did not finish is kept, to go on from its newest checkpoint. A run of
    another config, of one not recorded, or one that left checkpoints in the layout of older versions (which cannot be
    resumed) has its output folder and run folder (see [`run_folder`]) deleted, with a printed note; a [`RunError`]
    if that run still holds the run folder's lock.
    """
    output_dir, record, run_dir = Path(output_dir), Path(record), run_folder(output_dir)
    same = record.is_file() and yaml.safe_load(record.read_text()) == config
    if same and (output_dir / "results.json").is_file():
        return json.loads((output_dir / "results.json").read_text())
    if not same:
        why = f"a run of {'another config than' if record.is_file() else 'a config not recorded in'} {record}"
    elif list_checkpoints(output_dir):
        why = "checkpoints in the layout of an older version, which cannot be resumed"
    else:
        why = None
    if why is not None and (output_dir.exists() or run_dir.exists()):
        if (run_dir / LOCK_FILE).is_file():
            lock = FileLock(run_dir / LOCK_FILE)
            try:
                lock.acquire(timeout=0)
            except Timeout:
                raise RunError(
                    f"{output_dir} holds {why}, and that run is still going (it holds {lock.lock_file})"
                ) from None
            lock.release()
        print(f"note: deleting {output_dir} and {run_dir}: they hold {why}", flush=True)
        shutil.rmtree(output_dir, ignore_errors=True)
        shutil.rmtree(run_dir, ignore_errors=True)
    record.parent.mkdir(parents=True, exist_ok=True)
    record.write_text(yaml.safe_dump(config))
    return None


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

    eval_split "validation" (for choosing a recipe without the test split) is, with `data.random_crops` and
    `validation_photos`, fixed crops (`image_size` px) of the held-out training photos; with `validation_images`, the
    last `validation_images` images of the training split, which then trains on the others.
    """
    loaded = []
    validation = data.eval_split == "validation" and (
        (data.random_crops and data.validation_photos > 0) or data.validation_images > 0
    )  # fmt: skip
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
    if data.validation_images:
        train_split = loaded[0]
        if data.random_crops or not isinstance(train_split, Dataset):
            raise ConfigError("data.validation_images needs a fixed training split (no random_crops, no streaming)")
        if not 0 < data.validation_images < len(train_split):
            raise ConfigError(
                f"data.validation_images must be in [0, {len(train_split)}), got {data.validation_images}"
            )
        cut = len(train_split) - data.validation_images
        loaded[0] = train_split.select(range(cut))
        if validation:
            loaded.append(train_split.select(range(cut, len(train_split))))
    elif validation:
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
    save_grid(grid, path)  # labelled rows, also as PNG text chunks
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
