"""Train a QG-VAE (or another registered tokenizer, e.g. the patch VQ-VAE baseline) with Accelerate.

    accelerate launch training/train.py --config training/configs/mnist-demo.yaml [key=value ...] \
        [--resume latest|PATH] [--push_to_hub REPO_ID]

Overrides use the config's keys, dots reaching into sections: `max_steps=2000 model.num_tokens=32 gan.enabled=true`.
Every default is in `TrainConfig` below. The output folder ends up as what goes to the hub: a `save_pretrained`
folder (config, weights, image processor, model card) plus `results.json`, `train_config.json`, `train_log.jsonl`
and `samples/`. Checkpoints, tensorboard `logs/` and the lock file are beside it, in `<output_dir>-training/`.
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
from huggingface_hub import EvalResult
from torch.optim.swa_utils import AveragedModel, get_ema_multi_avg_fn
from tqdm.auto import tqdm
from transformers import AutoModel, PretrainedConfig, get_scheduler

sys.path.insert(0, str(Path(__file__).resolve().parent))  # `common` next to this script, however it is launched

from common import (  # noqa: E402
    ConfigError,
    DataConfig,
    ImageCollator,
    TrainerState,
    TrainingClock,
    build_eval_dataloader,
    build_model_config,
    build_train_dataloader,
    check_same_run,
    codeword_counts,
    config_to_dict,
    crop_batches,
    endless_batches,
    evaluate,
    init_codebooks_from_data,
    load_checkpoint,
    load_config,
    load_splits,
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
    spread,
    training_photos,
    trim_log,
    write_model_card,
)

from qg_tokenizer import QGVAEImageProcessor  # noqa: E402
from qg_tokenizer.data import EMBEDDED_MNIST  # noqa: E402
from qg_tokenizer.metrics import usage_summary  # noqa: E402
from qg_tokenizer.modeling_qggan import (  # noqa: E402
    QGGANDiscriminator,
    decoder_last_layer,
    hinge_discriminator_loss,
    load_lpips,
    qggan_autoencoder_loss,
)
from qg_tokenizer.quantizer_qgvae import usage_statistics  # noqa: E402

SCHEDULE_TICKS = 10_000  # the resolution of a learning-rate schedule on the time clock
# TrainConfig keys (dotted) a resumed run may change: they bound the run or shape its evaluations, logs and
# checkpoints, not the training itself (see `resumable_changes` for max_steps and max_train_time)
RESUMABLE_CHANGES = frozenset({
    "output_dir", "max_steps", "max_train_time", "eval_every", "eval_batch_size", "max_eval_samples",
    "num_grid_images", "final_usage_samples", "log_every", "checkpoint_every", "checkpoints_total_limit", "report_to",
    "data.num_workers",
})  # fmt: skip
MODEL_NAMES = {"qgvae": "QG-VAE", "patch_vqvae": "Patch VQ-VAE"}  # model card titles


@dataclass
class GANConfig:
    """QGGAN phase (SPEC section 4): after `warmup_steps` of plain QG-VAE, odd steps train D, even steps the AE."""

    enabled: bool = False
    warmup_steps: int = 5000
    discriminator_channels: int = 16
    discriminator_max_channels: int = 128
    perceptual_loss: Literal["lpips", "none"] = "lpips"  # LPIPS-VGG needs the lpips package and its weights
    adaptive_weight_factor: float = 0.75
    learning_rate: float = 2e-4
    weight_decay: float = 0.01


@dataclass
class TrainConfig:
    output_dir: str = "outputs/qgvae"
    seed: int = 0
    model: dict = field(default_factory=lambda: {"model_type": "qgvae"})  # AutoConfig.for_model(**model)
    data: DataConfig = field(default_factory=DataConfig)
    gan: GANConfig = field(default_factory=GANConfig)
    # optimisation (the reference: AdamW 2e-4, weight decay 0.01, default betas, no schedule, fp32)
    batch_size: int = 32  # per process
    gradient_accumulation_steps: int = 1
    max_steps: int = 10_000  # optimizer steps (a QGGAN discriminator step counts as one)
    max_train_time: float | None = None  # seconds of training (evaluations, checkpoints excluded); stop past it
    learning_rate: float = 2e-4
    codebook_learning_rate: float | None = None  # the quantizer's codebooks and offsets (None: learning_rate)
    weight_decay: float = 0.01
    adam_beta1: float = 0.9
    adam_beta2: float = 0.999
    lr_scheduler: str = "constant"  # any name of transformers.get_scheduler
    lr_scheduler_kwargs: dict = field(default_factory=dict)  # its scheduler_specific_kwargs, e.g. min_lr_rate
    lr_warmup_steps: int = 0
    lr_warmup_ratio: float = 0.0  # when > 0: warm-up over this fraction of the schedule (replaces lr_warmup_steps)
    # "time": the schedule runs over max_train_time seconds of training instead of max_steps (for fixed-time budgets)
    lr_schedule_clock: Literal["steps", "time"] = "steps"
    ema_decay: float | None = None  # EMA of the weights (torch AveragedModel), evaluated and saved; None: off
    codebook_init: Literal["uniform", "data"] = "uniform"  # "data": codebooks from the encoder's first outputs
    codebook_init_images: int = 2048  # training images encoded for codebook_init="data"
    max_grad_norm: float | None = None
    mixed_precision: Literal["no", "fp16", "bf16"] | None = None  # None: as set by `accelerate launch/config`
    # evaluation, logging and checkpoints
    eval_every: int = 500
    eval_batch_size: int = 100
    max_eval_samples: int | None = 1000  # periodic evaluations; the final one uses the whole eval split
    num_grid_images: int = 8
    final_usage_samples: int | None = None  # training images encoded at the end to measure codebook usage (None: all)
    log_every: int = 50
    checkpoint_every: int = 1000
    checkpoints_total_limit: int | None = 3
    report_to: str = "tensorboard"  # "tensorboard", "wandb", "all" or "none"


def resumable_changes(cfg: TrainConfig) -> frozenset[str]:
    """The config keys a resume of `cfg` may change: `RESUMABLE_CHANGES`, less the one that sets the length of a
    learning-rate schedule that depends on it (`max_steps`, or `max_train_time` on the time clock)."""
    if cfg.lr_scheduler in ("constant", "constant_with_warmup") and cfg.lr_warmup_ratio == 0:
        return RESUMABLE_CHANGES
    return RESUMABLE_CHANGES - {"max_train_time" if cfg.lr_schedule_clock == "time" else "max_steps"}


def progress_bar_options(max_steps: int, max_train_time: float | None) -> dict:
    """tqdm's total, unit and description: the optimizer steps, or the seconds of the training-time budget when
    `max_train_time` bounds the run (the bar and its ETA then follow the budget; the step count is in the postfix)."""
    if max_train_time is None:
        return {"total": max_steps, "unit": "step", "desc": "train"}
    return {
        "total": max_train_time, "unit": "s", "desc": "train (time budget)",
        "bar_format": "{desc}: {percentage:3.0f}%|{bar}| {n:.0f}/{total:.0f} s [{elapsed}<{remaining}{postfix}]",
    }  # fmt: skip


def progress_position(state: TrainerState, max_train_time: float | None) -> float:
    """Where the bar of [`progress_bar_options`] stands: steps done, or seconds of training (capped at the budget)."""
    return state.step if max_train_time is None else min(state.train_time, max_train_time)


def hub_dataset(data: DataConfig) -> str | None:
    """The hub data set `data.source` names; None for the embedded MNIST and local files and folders."""
    return None if data.source == EMBEDDED_MNIST or Path(data.source).exists() else data.source


def data_name(data: DataConfig) -> str:
    """How the model card names the training data: MNIST, the hub data set, or the local file or folder."""
    if data.source == EMBEDDED_MNIST:
        return "MNIST"
    if hub_dataset(data) is None:
        return Path(data.source).name
    return data.source + (f" ({data.name})" if data.name else "")


def model_card_title(model_config: PretrainedConfig, data: DataConfig) -> str:
    """E.g. "QG-VAE (64 tokens x 9 bits) trained on uoft-cs/cifar10"."""
    name = MODEL_NAMES.get(model_config.model_type, model_config.model_type)
    bits = math.log2(model_config.codebook_size)
    return f"{name} ({model_config.num_tokens} tokens x {bits:g} bits) trained on {data_name(data)}"


def model_card_data(cfg: TrainConfig, model_config: PretrainedConfig, final: dict) -> dict:
    """The model card's metadata: library, tags, the training data set (from the hub) and the final test PSNR and
    SSIM as `model-index` results."""
    eval_results = [
        EvalResult(
            task_type="image-feature-extraction", dataset_type=hub_dataset(cfg.data) or data_name(cfg.data),
            dataset_name=data_name(cfg.data), dataset_config=cfg.data.name, dataset_split=cfg.data.eval_split,
            metric_type=metric, metric_name=name, metric_value=round(final[metric], 4),
        )
        for metric, name in (("psnr", "PSNR (dB)"), ("ssim", "SSIM"))
    ]  # fmt: skip
    return {
        "library_name": "transformers", "license": "apache-2.0", "pipeline_tag": "image-feature-extraction",
        "tags": ["image-tokenizer", "vector-quantization", model_config.model_type],
        "model_name": model_card_title(model_config, cfg.data), "eval_results": eval_results,
        "datasets": [hub_dataset(cfg.data)] if hub_dataset(cfg.data) else None,
    }  # fmt: skip


def check_config(cfg: TrainConfig) -> PretrainedConfig:
    """The model config of `cfg`, after the checks that need no data: a [`ConfigError`] names the key."""
    model_config = build_model_config(cfg.model)
    if cfg.gan.enabled and model_config.model_type != "qgvae":
        raise ConfigError(f"gan.enabled needs model.model_type 'qgvae', got {model_config.model_type!r}")
    if cfg.gan.enabled and cfg.gradient_accumulation_steps != 1:
        raise ConfigError("gan.enabled alternates optimizers every step: gradient_accumulation_steps must be 1")
    positive = ("batch_size", "gradient_accumulation_steps", "max_steps", "eval_every", "log_every", "checkpoint_every")
    for key in positive:
        if getattr(cfg, key) < 1:
            raise ConfigError(f"{key} must be >= 1, got {getattr(cfg, key)}")
    if cfg.lr_schedule_clock == "time" and cfg.max_train_time is None:
        raise ConfigError("lr_schedule_clock 'time' needs max_train_time (the length of the schedule in seconds)")
    if cfg.ema_decay is not None and not 0 < cfg.ema_decay < 1:
        raise ConfigError(f"ema_decay must be in (0, 1) or null, got {cfg.ema_decay}")
    if not 0 <= cfg.lr_warmup_ratio < 1:
        raise ConfigError(f"lr_warmup_ratio must be in [0, 1), got {cfg.lr_warmup_ratio}")
    if cfg.data.streaming and (cfg.max_eval_samples is None or cfg.final_usage_samples is None):
        raise ConfigError("data.streaming needs max_eval_samples and final_usage_samples (a stream has no end)")
    if cfg.checkpoints_total_limit is not None and cfg.checkpoints_total_limit < 1:
        raise ConfigError(f"checkpoints_total_limit must be >= 1 or null, got {cfg.checkpoints_total_limit}")
    return model_config


def main(argv: list[str] | None = None) -> torch.nn.Module:
    """Train as configured by the command line `argv`; returns the trained (unwrapped) model."""
    args = parse_script_args(argv, __doc__, TrainConfig, artefact="model")
    cfg = load_config(TrainConfig, args.config, args.overrides)
    model_config = check_config(cfg)
    run_dir = run_folder(cfg.output_dir)
    accelerator = setup_accelerator(
        run_dir, cfg.mixed_precision, cfg.gradient_accumulation_steps, cfg.report_to, cfg.seed
    )
    with locked_run_folder(run_dir, accelerator):
        return train(cfg, model_config, accelerator, run_dir, args.resume, args.push_to_hub)


def train(
    cfg: TrainConfig, model_config: PretrainedConfig, accelerator: Accelerator, run_dir: Path, resume: str | None,
    push_to_hub: str | None,
) -> torch.nn.Module:  # fmt: skip
    """The run of `main`, in the locked `run_dir` (checkpoints, logs); returns the trained (unwrapped) model."""
    output_dir = Path(cfg.output_dir)
    # ---------------------------------------------------------------- everything that can fail, before training
    # the whole photos a random-crop stream draws from (loaded once; also checks the validation hold-out fits)
    crop_photos = training_photos(cfg.data)[0] if cfg.data.random_crops else None
    perceptual = load_lpips() if cfg.gan.enabled and cfg.gan.perceptual_loss == "lpips" else None
    refuse_old_layout(output_dir)
    resume_from = resolve_checkpoint(run_dir, resume)
    if resume_from is not None:
        check_same_run(resume_from, config_to_dict(cfg), resumable_changes(cfg))
    train_data, eval_data = load_splits(cfg.data, accelerator.num_processes, model_config.image_size)
    processor = QGVAEImageProcessor.from_model_config(model_config)
    collator = ImageCollator(processor, cfg.data.image_column)

    # ------------------------------------------------------------------------------------ model and optimizers
    set_seed(cfg.seed)  # the same initial weights on every process
    model = AutoModel.from_config(model_config)
    # Adam moves every codeword by about the learning rate per step, whatever its gradient: a higher codebook rate
    # lets the codewords follow the encoder's outputs early in training, so that split cells stay in use
    quantizer_params = [p for name, p in model.named_parameters() if name.startswith("quantizer.")]
    other_params = [p for name, p in model.named_parameters() if not name.startswith("quantizer.")]
    optimizer = torch.optim.AdamW(
        [{"params": other_params}, {"params": quantizer_params, "lr": cfg.codebook_learning_rate or cfg.learning_rate}],
        lr=cfg.learning_rate, betas=(cfg.adam_beta1, cfg.adam_beta2), weight_decay=cfg.weight_decay,
        fused=True,  # one kernel for all parameters (CPU and CUDA)
    )  # fmt: skip
    # the prepared scheduler steps once per process per optimizer step (the diffusers convention); on the time clock
    # its steps are SCHEDULE_TICKS ticks of max_train_time, advanced as the training time passes
    schedule_length = SCHEDULE_TICKS if cfg.lr_schedule_clock == "time" else cfg.max_steps
    warmup = round(cfg.lr_warmup_ratio * schedule_length) if cfg.lr_warmup_ratio > 0 else cfg.lr_warmup_steps
    lr_scheduler = get_scheduler(
        cfg.lr_scheduler, optimizer, num_warmup_steps=warmup * accelerator.num_processes,
        num_training_steps=schedule_length * accelerator.num_processes,
        scheduler_specific_kwargs=cfg.lr_scheduler_kwargs or None,
    )  # fmt: skip
    train_loader = None if crop_photos else build_train_dataloader(
        train_data, collator, cfg.data, cfg.batch_size, accelerator, cfg.seed
    )  # fmt: skip
    eval_loader = build_eval_dataloader(eval_data, collator, cfg.eval_batch_size, accelerator, cfg.max_eval_samples)
    model, optimizer, lr_scheduler = accelerator.prepare(model, optimizer, lr_scheduler)
    discriminator = optimizer_d = None
    if cfg.gan.enabled:
        discriminator = QGGANDiscriminator(
            model_config, cfg.gan.discriminator_channels, cfg.gan.discriminator_max_channels
        )
        optimizer_d = torch.optim.AdamW(
            discriminator.parameters(), lr=cfg.gan.learning_rate, weight_decay=cfg.gan.weight_decay
        )
        discriminator, optimizer_d = accelerator.prepare(discriminator, optimizer_d)
        if perceptual is not None:
            perceptual = perceptual.to(accelerator.device)
    unwrapped = accelerator.unwrap_model(model)
    quantizer = unwrapped.quantizer
    reset_interval = model_config.reset_interval

    ema = None
    if cfg.ema_decay is not None:
        ema = AveragedModel(unwrapped, multi_avg_fn=get_ema_multi_avg_fn(cfg.ema_decay))
    state = TrainerState()
    # saved beside accelerate's state: the EMA as safetensors, `state` as JSON (nothing a checkpoint holds is unpickled)
    checkpointed = {"ema": ema} if ema is not None else {}
    set_seed(cfg.seed, device_specific=True)  # token dropout and flips differ between processes
    if resume_from is not None:  # restores weights, optimizers, buffers, RNG states, the EMA and `state`
        accelerator.print(f"resuming from {resume_from}")
        load_checkpoint(accelerator, resume_from, state, checkpointed)
    elif cfg.codebook_init == "data":
        init_loader = build_eval_dataloader(
            spread(train_data, cfg.codebook_init_images), collator, cfg.eval_batch_size, accelerator
        )  # fmt: skip
        init_codebooks_from_data(unwrapped, init_loader, accelerator, torch.Generator().manual_seed(cfg.seed))
        if ema is not None:
            ema.module.load_state_dict(unwrapped.state_dict())

    def eval_model() -> torch.nn.Module:
        """The model to evaluate and save: the EMA weights with the live quantizer (its resets are jumps an average
        would blur) and buffers, or the live model."""
        if ema is None:
            return unwrapped
        ema.module.quantizer.load_state_dict(unwrapped.quantizer.state_dict())
        return ema.module

    if accelerator.is_main_process:
        output_dir.mkdir(parents=True, exist_ok=True)
        if resume_from is None:  # a fresh run does not continue an older run's log
            (output_dir / "train_log.jsonl").unlink(missing_ok=True)
        else:  # the steps after the checkpoint are logged again
            trim_log(output_dir / "train_log.jsonl", state.step)
        (output_dir / "train_config.json").write_text(json.dumps(config_to_dict(cfg), indent=2))
    accelerator.init_trackers(
        "train", config={k: v if isinstance(v, (int, float, str, bool)) else str(v) for k, v in vars(cfg).items()},
        init_kwargs={"tensorboard": {"purge_step": state.step + 1}} if resume_from is not None else None,
    )  # fmt: skip
    accelerator.print(
        f"{model_config.model_type}: {sum(p.numel() for p in unwrapped.parameters()):,} parameters, "
        f"{model_config.bytes_per_image} bytes per image; {accelerator.num_processes} process(es), "
        f"batch {cfg.batch_size} x {cfg.gradient_accumulation_steps} accumulation, "
        f"mixed precision {accelerator.mixed_precision}; starting at step {state.step}"
    )

    def run_evaluation(eval_loader) -> dict:
        """Test metrics, the window's codebook usage (all processes) and a PNG grid, appended to the history."""
        counts = accelerator.reduce(quantizer.usage_counts.clone(), "sum")
        quantizer.usage_counts.zero_()
        metrics = {"step": state.step, "train_time": state.train_time}
        grid_path = output_dir / "samples" / f"step-{state.step:07d}.png"
        metrics |= evaluate(eval_model(), eval_loader, accelerator, grid_path, cfg.num_grid_images)
        if ema is not None:  # the raw weights too, to show what the EMA adds
            metrics["live_psnr"] = evaluate(unwrapped, eval_loader, accelerator)["psnr"]
        metrics |= {f"train_{k}": v for k, v in usage_summary(counts).items()}
        # training images the usage window counted (every image adds C counts, to C codebooks or to the shared one)
        metrics["train_usage_images"] = int(counts.sum().item()) // model_config.num_tokens
        state.history.append(metrics)
        accelerator.log({f"eval/{k}": v for k, v in metrics.items() if k != "step"}, step=state.step)
        return metrics

    # ------------------------------------------------------------------------------------------ training loop
    skip = state.step * cfg.gradient_accumulation_steps
    if crop_photos:
        batches = crop_batches(
            crop_photos, cfg.data, collator, model_config.image_size, cfg.batch_size, accelerator, cfg.seed, skip
        )  # fmt: skip
    else:
        batches = endless_batches(train_loader, accelerator, skip, cfg.data.horizontal_flip)
    progress = tqdm(
        **progress_bar_options(cfg.max_steps, cfg.max_train_time),
        initial=progress_position(state, cfg.max_train_time), disable=not accelerator.is_local_main_process,
    )  # fmt: skip
    model.train()
    clock = TrainingClock(state)
    while state.step < cfg.max_steps:
        gan_phase = cfg.gan.enabled and state.step >= cfg.gan.warmup_steps
        logs = {}
        if gan_phase and state.step % 2 == 1:  # discriminator step; the autoencoder is only evaluated
            pixel_values = next(batches)
            with torch.no_grad(), accelerator.autocast():
                unwrapped.eval()
                fake = unwrapped(pixel_values).reconstruction
                unwrapped.train()
            with accelerator.autocast():
                real_logits, fake_logits = discriminator(torch.cat((pixel_values, fake))).chunk(2)
                d_loss = hinge_discriminator_loss(real_logits.float(), fake_logits.float())
            optimizer_d.zero_grad()  # the autoencoder step also left gradients in D
            accelerator.backward(d_loss)
            if cfg.max_grad_norm is not None:
                accelerator.unscale_gradients(optimizer_d)
                torch.nn.utils.clip_grad_norm_(discriminator.parameters(), cfg.max_grad_norm)
            optimizer_d.step()
            logs["d_loss"] = d_loss.detach()
        else:  # autoencoder step
            for _ in range(cfg.gradient_accumulation_steps):
                pixel_values = next(batches)
                with accelerator.accumulate(model):
                    output = model(pixel_values)
                    loss = output.loss
                    if gan_phase:  # D is not stepped here: use it unwrapped, outside DDP
                        fake_logits = accelerator.unwrap_model(discriminator)(output.reconstruction)
                        loss, gan_logs = qggan_autoencoder_loss(
                            pixel_values, output, fake_logits, decoder_last_layer(unwrapped), perceptual,
                            cfg.gan.adaptive_weight_factor,
                        )  # fmt: skip
                        logs |= gan_logs
                    accelerator.backward(loss)
                    if accelerator.sync_gradients:
                        # the reset statistic needs true gradients: unscale (fp16) before reading them; a step the
                        # fp16 scaler will skip (inf/nan gradients) must not reach the statistic either
                        accelerator.unscale_gradients(optimizer)
                        if accelerator.mixed_precision != "fp16" or all(
                            p.grad is None or torch.isfinite(p.grad).all() for p in unwrapped.parameters()
                        ):
                            unwrapped.accumulate_reset_statistic()
                        if cfg.max_grad_norm is not None:
                            logs["grad_norm"] = torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.max_grad_norm)
                    optimizer.step()
                    if cfg.lr_schedule_clock == "steps":
                        lr_scheduler.step()
                    optimizer.zero_grad()
            if ema is not None:
                ema.update_parameters(unwrapped)
            for key in ("reconstruction_loss", "codebook_loss", "commitment_loss"):
                logs[key] = getattr(output, key).detach()
            logs["loss"] = loss.detach()
        state.step += 1

        # Voronoi reset on the statistic summed over processes, with the same noise everywhere
        if state.step % reset_interval == 0:
            quantizer.reset_statistic.copy_(accelerator.reduce(quantizer.reset_statistic.clone(), "sum"))
            resets = unwrapped.voronoi_reset(torch.Generator().manual_seed(cfg.seed + state.step))
            logs["codewords_reset"] = resets.sum()

        clock.tick()
        progress.update(progress_position(state, cfg.max_train_time) - progress.n)
        if cfg.lr_schedule_clock == "time":  # the underlying schedule, by its ticks of training time (all processes)
            tick = min(SCHEDULE_TICKS, int(state.train_time / cfg.max_train_time * SCHEDULE_TICKS))
            for _ in range(tick * accelerator.num_processes - lr_scheduler.scheduler.last_epoch):
                lr_scheduler.scheduler.step()
        out_of_time = clock.out_of_time(cfg.max_train_time, accelerator)
        last = out_of_time or state.step >= cfg.max_steps

        if state.step % cfg.log_every == 0 or "codewords_reset" in logs:
            logs = {"step": state.step} | {k: float(v) for k, v in logs.items()}
            logs["lr"] = lr_scheduler.get_last_lr()[0]
            if "reconstruction_loss" in logs:
                logs["psnr"] = -10 * math.log10(max(logs["reconstruction_loss"], 1e-10))
            window = usage_statistics(quantizer.usage_counts)["used_fraction"].mean().item()
            progress.set_postfix(
                loss=f"{logs.get('loss', float('nan')):.4f}", psnr=f"{logs.get('psnr', float('nan')):.2f}",
                usage=f"{window:.2f}", **({} if cfg.max_train_time is None else {"step": state.step}),
            )  # fmt: skip
            accelerator.log({f"train/{k}": v for k, v in logs.items() if k != "step"}, step=state.step)
            if accelerator.is_main_process:
                with open(output_dir / "train_log.jsonl", "a") as log_file:
                    log_file.write(json.dumps(logs) + "\n")
        with clock.paused():
            if state.step % cfg.eval_every == 0 and not last:
                metrics = run_evaluation(eval_loader)
                progress.write(
                    f"step {state.step}: test PSNR {metrics['psnr']:.2f} dB, SSIM {metrics['ssim']:.3f}, "
                    f"codeword usage mean {metrics['train_usage_mean']:.3f} min {metrics['train_usage_min']:.3f}"
                )
            if state.step % cfg.checkpoint_every == 0:
                save_checkpoint(
                    accelerator, run_dir, state.step, cfg.checkpoints_total_limit, state, config_to_dict(cfg),
                    checkpointed,
                )  # fmt: skip
        if out_of_time:
            break
    progress.close()

    # ---------------------------------------------------------------------- final evaluation, saving, model card
    full_eval = cfg.max_eval_samples if cfg.data.streaming else None
    final = run_evaluation(build_eval_dataloader(eval_data, collator, cfg.eval_batch_size, accelerator, full_eval))
    usage_loader = build_eval_dataloader(
        train_data, collator, cfg.eval_batch_size, accelerator, cfg.final_usage_samples
    )
    final_model = eval_model()
    train_counts = codeword_counts(final_model, usage_loader, accelerator)
    final_model.quantizer.usage_counts.copy_(train_counts)  # saved with the model (`qg-tokenizer info` reports them)
    train_usage = usage_summary(train_counts) | {
        "used_fraction_per_token": usage_statistics(train_counts)["used_fraction"].tolist(),
        "num_images": int(train_counts.sum().item()) // model_config.num_tokens,
    }
    results = {
        "model_type": model_config.model_type,
        **state.summary(accelerator.num_processes),
        "bytes_per_image": model_config.bytes_per_image,
        "eval": final,
        "train_set_usage": train_usage,
        "history": state.history,
    }
    accelerator.wait_for_everyone()
    if accelerator.is_main_process:
        final_model.save_pretrained(output_dir)
        processor.save_pretrained(output_dir)
        respect_umask(output_dir)
        (output_dir / "results.json").write_text(json.dumps(results, indent=2))
        write_model_card(
            output_dir, card_data=model_card_data(cfg, model_config, final),
            model_name=model_card_title(model_config, cfg.data), repo_id=push_to_hub or str(output_dir),
            config=model_config.to_dict(), train=config_to_dict(cfg), results=results,
        )  # fmt: skip
        if push_to_hub:
            push_output_dir(output_dir, push_to_hub, f"Train {model_config.model_type} for {state.step} steps")
        print(
            f"done: step {state.step} in {state.train_time:.0f} s; test PSNR {final['psnr']:.2f} dB, "
            f"SSIM {final['ssim']:.3f}; {model_config.bytes_per_image} bytes per image; codewords used over "
            f"{train_usage['num_images']} training images: mean {train_usage['usage_mean']:.3f}, "
            f"min {train_usage['usage_min']:.3f}; saved to {output_dir}"
        )
    accelerator.end_training()
    return final_model


if __name__ == "__main__":
    run_script(main)
