"""Train the autoregressive prior (`QGPriorForCausalLM`) on image tokens with Accelerate.

    accelerate launch training/train_prior.py --config training/configs/prior-mnist.yaml [key=value ...] \
        [--resume latest|PATH] [--push_to_hub REPO_ID]

The tokens come from a `save_to_disk` folder of `qg_tokenizer.tokenize.tokenize_dataset` (`tokens=PATH`), or are
made on the fly from the images of `data.source` with a tokenizer checkpoint (`tokenizer=PATH`, `tokens=null`).
With a tokenizer, every evaluation also writes a grid of samples (one row per class) and the output folder gets a
ready `QGVAEPipeline` in `pipeline/`. Every default is in `PriorTrainConfig` below; overrides use its keys, dots
reaching into sections (`model.vocab_layout=shared data.source=embedded-mnist`). The output folder ends up as what
goes to the hub: a `save_pretrained` folder of the prior plus `results.json`, `train_config.json`, `samples/` and
`pipeline/`. Checkpoints, tensorboard `logs/` and the lock file are beside it, in `<output_dir>-training/`, as for
`train.py` (see training/README.md, "Checkpoints and resuming").
"""

from __future__ import annotations

import json
import math
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

import torch
from accelerate import Accelerator
from accelerate.utils import set_seed
from datasets import ClassLabel, Dataset, DatasetDict, load_from_disk
from tqdm.auto import tqdm
from transformers import get_scheduler

sys.path.insert(0, str(Path(__file__).resolve().parent))  # `common` next to this script, however it is launched

from common import (  # noqa: E402
    ConfigError,
    DataConfig,
    TrainerState,
    TrainingClock,
    build_eval_dataloader,
    build_train_dataloader,
    check_same_run,
    config_to_dict,
    endless_batches,
    load_checkpoint,
    load_config,
    locked_run_folder,
    parse_script_args,
    push_output_dir,
    refuse_old_layout,
    resolve_checkpoint,
    respect_umask,
    run_folder,
    run_script,
    save_checkpoint,
    setup_accelerator,
)

from qg_tokenizer import QGPriorConfig, QGPriorForCausalLM, QGVAEPipeline  # noqa: E402
from qg_tokenizer.data import load_image_splits  # noqa: E402
from qg_tokenizer.tokenize import TOKEN_IDS_COLUMN, load_tokenizer, tokenize_dataset  # noqa: E402
from qg_tokenizer.visualize import READABLE_WIDTH, image_grid, save_grid  # noqa: E402

# PriorTrainConfig keys (dotted) a resumed run may change: they bound the run or shape its evaluations, samples, logs
# and checkpoints, not the training itself (see `resumable_changes` for max_steps)
RESUMABLE_CHANGES = frozenset({
    "output_dir", "max_steps", "max_train_time", "eval_every", "eval_batch_size", "max_eval_samples",
    "samples_per_class", "sample_guidance_scale", "log_every", "checkpoint_every", "checkpoints_total_limit",
    "report_to", "data.num_workers",
})  # fmt: skip


@dataclass
class PriorTrainConfig:
    output_dir: str = "outputs/prior"
    seed: int = 0
    tokens: str | None = None  # save_to_disk folder (a DatasetDict) of tokenize_dataset output
    tokenizer: str | None = None  # tokenizer folder/repo: tokenises `data` when `tokens` is null; decodes the samples
    data: DataConfig = field(default_factory=DataConfig)  # images (with `tokenizer`) and the split names
    token_column: str = TOKEN_IDS_COLUMN
    label_column: str | None = "label"  # null: an unconditional prior
    # QGPriorConfig fields; num_image_tokens, num_classes and class_names come from the data, codebook_size from the
    # tokenizer (set it here when training from `tokens` alone)
    model: dict = field(default_factory=lambda: {"vocab_layout": "offset", "class_dropout_prob": 0.1})
    # optimisation
    batch_size: int = 64  # per process
    max_steps: int = 3000
    max_train_time: float | None = None  # seconds of training (evaluations, checkpoints excluded); stop past it
    learning_rate: float = 1e-3
    weight_decay: float = 0.1
    adam_beta1: float = 0.9
    adam_beta2: float = 0.95
    lr_scheduler: str = "cosine"  # any name of transformers.get_scheduler
    lr_warmup_steps: int = 100
    max_grad_norm: float | None = 1.0
    mixed_precision: Literal["no", "fp16", "bf16"] | None = None  # None: as set by `accelerate launch/config`
    # evaluation, samples, logging and checkpoints
    eval_every: int = 500
    eval_batch_size: int = 500
    max_eval_samples: int | None = None  # periodic evaluations; the final one uses the whole eval split
    samples_per_class: int = 8
    sample_guidance_scale: float = 2.0  # classifier-free guidance of the sample grids (1: none)
    log_every: int = 50
    checkpoint_every: int = 1000
    checkpoints_total_limit: int | None = 3
    report_to: str = "tensorboard"  # "tensorboard", "wandb", "all" or "none"


class TokenCollator:
    """Rows of a token data set -> prior input ids `[B, 1 + C]`: the class (or null) token, then the image tokens."""

    def __init__(self, prior: QGPriorForCausalLM, token_column: str, label_column: str | None):
        self.prior, self.token_column, self.label_column = prior, token_column, label_column

    def __call__(self, examples: list[dict]) -> torch.Tensor:
        token_ids = torch.tensor([ex[self.token_column] for ex in examples], dtype=torch.long)
        labels = None if self.label_column is None else [ex[self.label_column] for ex in examples]
        return self.prior.prepare_input_ids(token_ids, labels)


def load_token_splits(cfg: PriorTrainConfig, vqvae, processor) -> tuple[Dataset, Dataset]:
    """The training and evaluation token splits: read from `cfg.tokens`, or tokenised from `cfg.data` on the fly."""
    keep = [] if cfg.label_column is None else [cfg.label_column]
    if cfg.tokens is not None:
        if not Path(cfg.tokens, "dataset_dict.json").is_file():
            raise ConfigError(f"tokens: {cfg.tokens!r} is not a DatasetDict folder written by save_to_disk")
        splits = load_from_disk(cfg.tokens)
    else:
        if vqvae is None:
            raise ConfigError("set `tokens` (a tokenised data set folder) or `tokenizer` (to tokenise data.source)")
        images = load_image_splits(cfg.data.source, False, cfg.data.name)
        chosen = {s: images[s] for s in (cfg.data.train_split, cfg.data.eval_split) if s in images}
        splits = tokenize_dataset(
            DatasetDict(chosen), vqvae, processor, image_column=cfg.data.image_column, keep_columns=keep
        )
    loaded = []
    for key, split in (("data.train_split", cfg.data.train_split), ("data.eval_split", cfg.data.eval_split)):
        if split not in splits:
            raise ConfigError(f"{key}: split {split!r} not found; available: {sorted(splits)}")
        missing = [c for c in [cfg.token_column, *keep] if c not in splits[split].column_names]
        if missing:
            raise ConfigError(f"columns {missing} not in split {split!r}; columns: {splits[split].column_names}")
        loaded.append(splits[split].select_columns([cfg.token_column, *keep]))
    return loaded[0], loaded[1]


def build_prior_config(cfg: PriorTrainConfig, train_data: Dataset, vqvae) -> QGPriorConfig:
    """`QGPriorConfig(**cfg.model)` with C, K, the classes and their names filled in from the data and tokenizer."""
    section = dict(cfg.model)
    derived = {"num_image_tokens": train_data.features[cfg.token_column].length}
    if vqvae is not None:
        derived["codebook_size"] = vqvae.config.codebook_size
    elif "codebook_size" not in section:
        raise ConfigError("model.codebook_size must be set when training from `tokens` without a `tokenizer`")
    if cfg.label_column is None:
        derived["num_classes"] = 0
    else:
        feature = train_data.features[cfg.label_column]
        names = feature.names if isinstance(feature, ClassLabel) else None
        num_classes = len(names) if names else int(max(train_data[cfg.label_column])) + 1
        derived |= {"num_classes": num_classes, "class_names": list(names or map(str, range(num_classes)))}
    for key, value in derived.items():
        if key in section and section[key] != value:
            raise ConfigError(f"model.{key} is {section[key]!r} but the data/tokenizer give {value!r}: drop the key")
    try:
        return QGPriorConfig(**section, **{k: v for k, v in derived.items() if k not in section})
    except (TypeError, ValueError) as err:
        raise ConfigError(f"model: {err}") from err


@torch.no_grad()
def evaluate_bits(prior: QGPriorForCausalLM, dataloader, accelerator) -> dict[str, float]:
    """Held-out negative log2-likelihood per image (`bits_per_image`, and `bits_per_image_null` given the null token
    when the prior has one besides its classes), over all processes."""
    was_training = prior.training
    prior.eval()
    with_null = prior.config.num_classes > 0 and prior.config.has_null_token
    rows = []
    for input_ids in dataloader:
        variants = [input_ids]
        if with_null:
            variants.append(input_ids.clone().index_fill_(1, input_ids.new_zeros(1), prior.config.null_token_id))
        bits = []
        for ids in variants:
            with accelerator.autocast():
                logits = prior(ids, use_cache=False).logits
            bits.append(prior.token_nll(logits, ids).sum(1) / math.log(2))
        rows.append(accelerator.gather_for_metrics(torch.stack(bits, 1)))  # (B, 1 or 2)
    means = torch.cat(rows).mean(0).tolist()
    prior.train(was_training)
    metrics = {"bits_per_image": means[0], "bits_per_token": means[0] / prior.config.num_image_tokens}
    if with_null:
        metrics["bits_per_image_null"] = means[1]
    return metrics | {"num_images": sum(len(r) for r in rows)}


def save_sample_grid(pipe: QGVAEPipeline, cfg: PriorTrainConfig, path: Path) -> None:
    """PNG with one row of `samples_per_class` samples per class (one row when unconditional), each row labelled with
    its class name, readable size, the labels also as PNG text chunks."""
    num_classes = pipe.prior.config.num_classes
    guided = num_classes > 0 and pipe.prior.config.class_dropout_prob > 0
    images = pipe(
        class_labels=list(range(num_classes)) if num_classes else None,
        num_images_per_label=cfg.samples_per_class,
        guidance_scale=cfg.sample_guidance_scale if guided else 1.0,
        generator=torch.Generator().manual_seed(cfg.seed),
        output_type="pt",
    ).images
    path.parent.mkdir(parents=True, exist_ok=True)
    names = pipe.prior.config.class_names if num_classes else ["unconditional"]
    rows = list(images.split(cfg.samples_per_class))
    save_grid(image_grid(rows, row_labels=[f"class {name}" for name in names], min_width=READABLE_WIDTH), path)


def resumable_changes(cfg: PriorTrainConfig) -> frozenset[str]:
    """The config keys a resume of `cfg` may change: `RESUMABLE_CHANGES`, less `max_steps` when it sets the length
    of the learning-rate schedule (every schedule but the constant ones; the warm-up is counted in steps)."""
    if cfg.lr_scheduler in ("constant", "constant_with_warmup"):
        return RESUMABLE_CHANGES
    return RESUMABLE_CHANGES - {"max_steps"}


def main(argv: list[str] | None = None) -> QGPriorForCausalLM:
    """Train as configured by the command line `argv`; returns the trained (unwrapped) prior."""
    args = parse_script_args(argv, __doc__, PriorTrainConfig, artefact="prior")
    cfg = load_config(PriorTrainConfig, args.config, args.overrides)
    for key in ("batch_size", "max_steps", "eval_every", "log_every", "checkpoint_every", "samples_per_class"):
        if getattr(cfg, key) < 1:
            raise ConfigError(f"{key} must be >= 1, got {getattr(cfg, key)}")
    if cfg.checkpoints_total_limit is not None and cfg.checkpoints_total_limit < 1:
        raise ConfigError(f"checkpoints_total_limit must be >= 1 or null, got {cfg.checkpoints_total_limit}")
    run_dir = run_folder(cfg.output_dir)
    accelerator = setup_accelerator(run_dir, cfg.mixed_precision, 1, cfg.report_to, cfg.seed)
    with locked_run_folder(run_dir, accelerator):
        return train(cfg, accelerator, run_dir, args.resume, args.push_to_hub)


def train(
    cfg: PriorTrainConfig, accelerator: Accelerator, run_dir: Path, resume: str | None, push_to_hub: str | None
) -> QGPriorForCausalLM:
    """The run of `main`, in the locked `run_dir` (checkpoints, logs); returns the trained (unwrapped) prior."""
    output_dir = Path(cfg.output_dir)
    # ---------------------------------------------------------------- everything that can fail, before training
    refuse_old_layout(output_dir)
    resume_from = resolve_checkpoint(run_dir, resume)
    if resume_from is not None:
        check_same_run(resume_from, config_to_dict(cfg), resumable_changes(cfg))
    vqvae = processor = None
    if cfg.tokenizer is not None:
        try:
            vqvae, processor = load_tokenizer(cfg.tokenizer, device=accelerator.device)
        except (OSError, ValueError) as err:
            raise ConfigError(f"tokenizer: cannot load {cfg.tokenizer!r}: {err}") from err
    with accelerator.main_process_first():  # the main process tokenises and fills the datasets cache
        train_data, eval_data = load_token_splits(cfg, vqvae, processor)
    prior_config = build_prior_config(cfg, train_data, vqvae)
    if len(train_data) < cfg.batch_size * accelerator.num_processes:
        raise ConfigError(
            f"batch_size ({cfg.batch_size} per process, {accelerator.num_processes} processes) is larger than the "
            f"training split ({len(train_data)} sequences)"
        )

    # ---------------------------------------------------------------------------------- model and optimizer
    set_seed(cfg.seed)  # the same initial weights on every process
    prior = QGPriorForCausalLM(prior_config)
    decay = [p for n, p in prior.named_parameters() if p.ndim >= 2 and "embed" not in n]
    no_decay = [p for n, p in prior.named_parameters() if not (p.ndim >= 2 and "embed" not in n)]
    optimizer = torch.optim.AdamW(
        [{"params": decay, "weight_decay": cfg.weight_decay}, {"params": no_decay, "weight_decay": 0.0}],
        lr=cfg.learning_rate, betas=(cfg.adam_beta1, cfg.adam_beta2),
    )  # fmt: skip
    lr_scheduler = get_scheduler(
        cfg.lr_scheduler, optimizer, num_warmup_steps=cfg.lr_warmup_steps * accelerator.num_processes,
        num_training_steps=cfg.max_steps * accelerator.num_processes,
    )  # fmt: skip
    collator = TokenCollator(prior, cfg.token_column, cfg.label_column)
    train_loader = build_train_dataloader(train_data, collator, cfg.data, cfg.batch_size, accelerator, cfg.seed)
    eval_loader = build_eval_dataloader(eval_data, collator, cfg.eval_batch_size, accelerator, cfg.max_eval_samples)
    model, optimizer, lr_scheduler = accelerator.prepare(prior, optimizer, lr_scheduler)
    pipe = QGVAEPipeline(vqvae=vqvae, prior=prior) if vqvae is not None else None

    state = TrainerState()  # saved as JSON in the checkpoint's manifest (nothing a checkpoint holds is unpickled)
    set_seed(cfg.seed, device_specific=True)  # class dropout differs between processes
    if resume_from is not None:  # restores weights, optimizer, scheduler, RNG states and `state`
        accelerator.print(f"resuming from {resume_from}")
        load_checkpoint(accelerator, resume_from, state)
    if accelerator.is_main_process:
        output_dir.mkdir(parents=True, exist_ok=True)
        (output_dir / "train_config.json").write_text(json.dumps(config_to_dict(cfg), indent=2))
    accelerator.init_trackers(
        "train_prior",
        config={k: v if isinstance(v, (int, float, str, bool)) else str(v) for k, v in vars(cfg).items()},
        init_kwargs={"tensorboard": {"purge_step": state.step + 1}} if resume_from is not None else None,
    )
    accelerator.print(
        f"qgprior ({prior_config.vocab_layout} layout): {sum(p.numel() for p in prior.parameters()):,} parameters, "
        f"C={prior_config.num_image_tokens} tokens of K={prior_config.codebook_size}, {prior_config.num_classes} "
        f"classes; {len(train_data)} training / {len(eval_data)} eval sequences; {accelerator.num_processes} "
        f"process(es), batch {cfg.batch_size}, mixed precision {accelerator.mixed_precision}; starting at step "
        f"{state.step}"
    )

    def run_evaluation(loader) -> dict:
        """Held-out bits per image and (with a tokenizer) a sample grid, appended to the history."""
        prior.eval()
        metrics = {"step": state.step, "train_time": state.train_time} | evaluate_bits(prior, loader, accelerator)
        if pipe is not None and accelerator.is_main_process:
            save_sample_grid(pipe, cfg, output_dir / "samples" / f"step-{state.step:07d}.png")
        prior.train()
        state.history.append(metrics)
        accelerator.log({f"eval/{k}": v for k, v in metrics.items() if k != "step"}, step=state.step)
        return metrics

    # ------------------------------------------------------------------------------------------ training loop
    batches = endless_batches(train_loader, accelerator, state.step)
    progress = tqdm(
        total=cfg.max_steps, initial=state.step, desc="train", disable=not accelerator.is_local_main_process
    )
    model.train()
    clock = TrainingClock(state)
    while state.step < cfg.max_steps:
        input_ids = next(batches)
        with accelerator.autocast():
            loss = model(input_ids, labels=input_ids).loss  # class dropout to the null token happens in here
        accelerator.backward(loss)
        grad_norm = None
        if cfg.max_grad_norm is not None:
            grad_norm = accelerator.clip_grad_norm_(model.parameters(), cfg.max_grad_norm)
        optimizer.step()
        lr_scheduler.step()
        optimizer.zero_grad()
        state.step += 1
        progress.update(1)

        clock.tick()
        out_of_time = clock.out_of_time(cfg.max_train_time, accelerator)
        last = out_of_time or state.step >= cfg.max_steps

        if state.step % cfg.log_every == 0:
            logs = {"loss": loss.item(), "lr": lr_scheduler.get_last_lr()[0]}
            logs["bits_per_image"] = logs["loss"] * prior_config.num_image_tokens / math.log(2)
            if grad_norm is not None:
                logs["grad_norm"] = float(grad_norm)
            progress.set_postfix(loss=f"{logs['loss']:.4f}", bits=f"{logs['bits_per_image']:.1f}")
            accelerator.log({f"train/{k}": v for k, v in logs.items()}, step=state.step)
        with clock.paused():
            if state.step % cfg.eval_every == 0 and not last:
                metrics = run_evaluation(eval_loader)
                progress.write(f"step {state.step}: held-out {metrics['bits_per_image']:.2f} bits per image")
            if state.step % cfg.checkpoint_every == 0:
                save_checkpoint(
                    accelerator, run_dir, state.step, cfg.checkpoints_total_limit, state, config_to_dict(cfg)
                )
        if out_of_time:
            break
    progress.close()

    # ------------------------------------------------------------------------------- final evaluation, saving
    full_eval = build_eval_dataloader(eval_data, collator, cfg.eval_batch_size, accelerator)
    final = run_evaluation(full_eval)
    results = {
        "model_type": prior_config.model_type,
        "vocab_layout": prior_config.vocab_layout,
        "num_parameters": sum(p.numel() for p in prior.parameters()),
        **state.summary(accelerator.num_processes),
        "uniform_bits_per_image": prior_config.num_image_tokens * math.log2(prior_config.codebook_size),
        "eval": final,
        "history": state.history,
    }
    accelerator.wait_for_everyone()
    if accelerator.is_main_process:
        prior.save_pretrained(output_dir)
        if pipe is not None:
            pipe.save_pretrained(output_dir / "pipeline")
        respect_umask(output_dir)
        (output_dir / "results.json").write_text(json.dumps(results, indent=2))
        if push_to_hub:
            push_output_dir(output_dir, push_to_hub, f"Train qgprior for {state.step} steps")
        print(
            f"done: step {state.step} in {state.train_time:.0f} s; held-out {final['bits_per_image']:.2f} bits per "
            f"image (uniform: {results['uniform_bits_per_image']:.0f}); saved to {output_dir}"
        )
    accelerator.end_training()
    return prior


if __name__ == "__main__":
    run_script(main)
