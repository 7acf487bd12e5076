"""Equal-bytes evidence (issue 4): QG-VAE versus the patch VQ-VAE, JPEG and WebP, and the paper's claims tested.

    python benchmarks/rate_distortion.py [--quick] [--workdir outputs/rate-distortion] [--update-readme]

Both tokenizers are trained by `training/train.py` (configs generated here from the `mnist-cpu` / `photos32-cpu`
presets; the `mnist-demo` recipe for both: commitment 0.1, reset every 50 steps, codebook learning rate 10x) on
1. the embedded MNIST (16 tokens x 9 bits = 18 bytes; test: the last 1,000 digits) and
2. `../shared/data/photo_patches32.npz` (64 tokens x 9 bits = 72 bytes, the paper's CIFAR budget; test: 514 patches).

Stages (a run whose folder already holds `results.json` for the same config is reused, an interrupted one goes on
from its newest checkpoint, and a folder whose run had another config is deleted with a note and trained again:
`common.reusable_run`; so an interrupted benchmark resumes):
- sweep (full mode, MNIST): both models at learning rates 3e-4, 1e-3, 3e-3 (batch 32) and batch 16 (lr 1e-3), each
  for the same training time, scored on a validation split (the last 900 of the 9,000 training digits, held out of
  training); each model then uses its own best setting everywhere.
- headline: both models, the same number of optimizer steps, seeds 0 and 1 (full) on each dataset.
- ablations (MNIST, seed 0): QG-VAE without the Voronoi reset, and without token dropout.
- diagnostics (full mode, MNIST, seed 0): the pair at 4x the steps; QG-VAE with its parameters moved from codebooks to
  convolutions (D = 16); the patch VQ-VAE with a codebook per grid cell and QG-VAE's parameter split.
- analysis on the test images: PSNR/SSIM, per-token codebook usage over 3,000 training images (the patch VQ-VAE: its one
  shared codebook), encode/decode throughput, parameters, bytes; token influence (fraction of pixels a token moves by
  more than 1% of the range, `qg_tokenizer.visualize.token_influence`); PSNR of every token prefix (the
  rate-distortion curve); JPEG/WebP at the same budgets (`image_codecs.jpeg_webp_at_budget`).

Runs go two at a time with one thread each (the two runs of one seed side by side, so both see the same machine);
training time excludes evaluations. Equal wall-clock compares each model's test PSNR at the training time of the
faster of the pair, read (linearly interpolated) from its evaluation history.

Writes `benchmarks/results/rate_distortion[_quick].json`, figures under `benchmarks/results/figures/` and, with
`--update-readme`, the "Results: equal bytes" table of README.md (generated from the JSON by `render_claims`).
`--quick` (one seed, short runs, no sweep, the first 300 test images) takes under 10 minutes and is a smoke test,
not a result; the full run takes under 60.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import statistics
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np
import torch
from transformers import AutoModel

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "training"))  # demo.run_training

from common import reusable_run  # noqa: E402
from demo import run_training  # noqa: E402
from image_codecs import DEFAULT_PHOTOS, jpeg_webp_at_budget, to_tensor  # noqa: E402
from readme_blocks import replace_block  # noqa: E402

from qg_tokenizer import PATCH_VQVAE_PRESETS, QGVAE_PRESETS  # noqa: E402
from qg_tokenizer.data import EMBEDDED_MNIST, MNIST_NUM_TRAIN, MNIST_PATH  # noqa: E402
from qg_tokenizer.metrics import psnr, ssim  # noqa: E402
from qg_tokenizer.visualize import influence_coverage, influence_grid, progressive_grid, token_influence  # noqa: E402

HERE = Path(__file__).resolve().parent
FIGURES = HERE / "results" / "figures"
README_START, README_END = "<!-- rate-distortion:start -->", "<!-- rate-distortion:end -->"
MODEL_NAMES = {"qgvae": "QG-VAE", "patch_vqvae": "patch VQ-VAE"}
PRESETS = {"qgvae": QGVAE_PRESETS, "patch_vqvae": PATCH_VQVAE_PRESETS}
RECIPE = {"commitment_loss_weight": 0.1, "reset_interval": 50}  # the mnist-demo recipe, for both models
CODEBOOK_LR_FACTOR = 10
NO_RESET = 10**9  # a reset interval no run reaches
# diagnostic (capacity): QG-VAE "mnist-cpu" keeps 60% of its parameters in its 16 codebooks (16 x 512 x 64); with
# D = 16 and wider convolutions it has the same parameter count (+0.4%) and twice the patch model's share in convs
CAPACITY_OVERRIDES = (("codeword_dim", 16), ("max_channels", 64))
# diagnostic (per-token codebooks): the patch VQ-VAE with QG-VAE's quantiser, a codebook per grid cell (16 x 512 x 64),
# and convolutions narrowed to QG-VAE's parameter count (853,601, -2.6%): QG-VAE's parameter split with local tokens
PER_TOKEN_OVERRIDES = (("per_token_codebooks", True), ("block_out_channels", [16, 24, 40, 56]))
# a pixel "changes" when it moves by more than this fraction of the [0, 1] range (1%: about 2.5 grey levels, the
# claim's threshold, the default of `influence_coverage`; 5%: a clearly visible change, reported alongside)
INFLUENCE_THRESHOLDS = (0.01, 0.05)
GLOBAL_COVERAGE, LOCAL_COVERAGE = 0.5, 0.25  # claim: QG tokens reach most pixels, a patch token a compact region
DROPOUT_COST_DB = 0.5
MONOTONE_TOLERANCE_DB = 0.01
TARGET_MARGIN_DB = 1.0


@dataclass(frozen=True)
class Dataset:
    name: str
    preset: str
    source: str
    horizontal_flip: bool
    prefixes: tuple[int, ...]  # token prefix lengths of the rate-distortion curve
    codec_budgets: tuple[int, ...]  # bytes per image of the JPEG/WebP curve points (besides the models' budget)


DATASETS = {
    "mnist": Dataset(
        "mnist", "mnist-cpu", EMBEDDED_MNIST, False, (1, 2, 3, 4, 6, 8, 12, 16), (6, 9, 12, 36, 72, 144, 288)
    ),
    "photos32": Dataset(
        "photos32", "photos32-cpu", str(DEFAULT_PHOTOS), True, (1, 2, 4, 8, 16, 32, 48, 64), (18, 36, 54, 144, 288)
    ),
}


@dataclass(frozen=True)
class Mode:
    seeds: tuple[int, ...]
    steps: dict
    eval_every: dict
    sweep_seconds: float | None  # None: no sweep (learning rate 1e-3, batch 32)
    codec_curve_images: int  # test images for the JPEG/WebP points off the models' budget
    codec_images: int | None  # test images for JPEG/WebP at the models' budget (None: all)
    influence_images: int
    usage_images: int  # training images encoded at the end of a run to measure codebook usage (500 in the sweep)
    long_factor: int | None = None  # diagnostic: the MNIST seed-0 pair again at this many times the steps
    capacity: bool = False  # diagnostics (MNIST seed 0): QG-VAE with CAPACITY_OVERRIDES, patch with PER_TOKEN_OVERRIDES
    test_images: int | None = None  # the analysis uses the first this many test images (None: all)


MODES = {
    "quick": Mode(
        (0,), {"mnist": 150, "photos32": 20}, {"mnist": 75, "photos32": 20}, None, 20, 100, 4, 1000, test_images=300
    ),
    "full": Mode(
        (0, 1), {"mnist": 600, "photos32": 300}, {"mnist": 150, "photos32": 150}, 90.0, 100, None, 16, 3000,
        long_factor=4, capacity=True,
    ),
}
SWEEP = ((3e-4, 32), (1e-3, 32), (3e-3, 32), (1e-3, 16))  # (learning rate, batch size)
DEFAULT_SETTING = (1e-3, 32)


@dataclass(frozen=True)
class Run:
    """One `training/train.py` run."""

    name: str
    dataset: str
    model_type: str
    seed: int
    learning_rate: float
    batch_size: int
    max_steps: int
    eval_every: int
    usage_images: int
    max_train_time: float | None = None
    model_overrides: tuple = ()
    source: str | None = None  # data source other than the dataset's (the sweep's validation split)

    def train_config(self, workdir: Path) -> dict:
        data = DATASETS[self.dataset]
        model = {"model_type": self.model_type, **PRESETS[self.model_type][data.preset], **RECIPE}
        return {
            "output_dir": str(workdir / self.name),
            "seed": self.seed,
            "model": model | dict(self.model_overrides),
            "data": {"source": self.source or data.source, "horizontal_flip": data.horizontal_flip},
            "batch_size": self.batch_size,
            "max_steps": self.max_steps,
            "max_train_time": self.max_train_time,
            "learning_rate": self.learning_rate,
            "codebook_learning_rate": CODEBOOK_LR_FACTOR * self.learning_rate,
            "eval_every": self.eval_every,
            "max_eval_samples": None,
            "final_usage_samples": self.usage_images,
            "log_every": 25,
            "checkpoint_every": 10**9,
            "mixed_precision": "no",
            "report_to": "none",
        }


def train_all(runs: list[Run], workdir: Path, jobs: int) -> dict[str, dict]:
    """Train every run (`jobs` at a time, one thread each); returns name -> `results.json` (reused when the run's
    folder already holds results for the same config, see `common.reusable_run`)."""

    def train(run: Run) -> dict:
        config, folder = run.train_config(workdir), workdir / run.name
        config_path, results_path = workdir / "configs" / f"{run.name}.yaml", folder / "results.json"
        results = reusable_run(folder, config_path, config)  # writes `config_path`, the config train.py reads
        if results is not None:
            return results  # reused: its `process_seconds` are from when it ran
        start = time.perf_counter()
        results = run_training(
            folder, ["--resume", "latest"], config=config_path, num_threads=1, log_file=workdir / f"{run.name}.log"
        )
        results["process_seconds"] = time.perf_counter() - start  # start-up, training, evaluations and saving
        results_path.write_text(json.dumps(results, indent=2))
        print(f"  {run.name}: {results['step']} steps, test PSNR {results['eval']['psnr']:.2f} dB "
              f"({results['process_seconds']:.0f} s)", flush=True)  # fmt: skip
        return results

    with ThreadPoolExecutor(jobs) as pool:
        return dict(zip([run.name for run in runs], pool.map(train, runs)))


# ------------------------------------------------------------------------------------------------ test images
def test_images(dataset: str) -> np.ndarray:
    """uint8 test images: `[N, 28, 28]` MNIST digits or `[N, 32, 32, 3]` photo patches."""
    if dataset == "mnist":
        with np.load(MNIST_PATH) as npz:
            return npz["images"][MNIST_NUM_TRAIN:]
    with np.load(DATASETS[dataset].source) as npz:
        return npz["test"]


def write_validation_split(workdir: Path) -> str:
    """The 9,000 MNIST training digits as an `images` .npz, whose last 900 `load_npz_dataset` holds out ("test")."""
    path = workdir / "mnist-validation.npz"
    if not path.is_file():
        with np.load(MNIST_PATH) as npz:
            np.savez(path, images=npz["images"][:MNIST_NUM_TRAIN])
    return str(path)


# ------------------------------------------------------------------------------------------------ model analysis
def throughput(fn, batch: torch.Tensor, repeats: int = 3) -> float:
    """Images per second of `fn(batch)`, best of `repeats` after one warm-up call."""
    fn(batch)
    best = math.inf
    for _ in range(repeats):
        start = time.perf_counter()
        fn(batch)
        best = min(best, time.perf_counter() - start)
    return len(batch) / best


@torch.no_grad()
def analyse_model(model, images: torch.Tensor, prefixes: tuple[int, ...], influence_images: int) -> dict:
    """Per-image PSNR of the full reconstruction and of every prefix, SSIM, influence coverage, speed, parameters of
    the (eval-mode) `model`."""
    config = model.config
    token_ids = torch.cat([model.encode(chunk).token_ids for chunk in images.split(250)])
    per_prefix = {}
    for k in sorted(set(prefixes) | {config.num_tokens}):
        decoded = torch.cat([model.decode(ids, prefix_length=k).pixel_values for ids in token_ids.split(250)])
        per_prefix[k] = psnr(decoded, images)
        if k == config.num_tokens:
            full_ssim = ssim(decoded, images).mean().item()
    influence = token_influence(model, token_ids[:influence_images], generator=torch.Generator().manual_seed(0))
    batch = images[:100]
    return {
        "parameters": sum(p.numel() for p in model.parameters()),
        "bytes_per_image": config.bytes_per_image,
        "num_tokens": config.num_tokens,
        "psnr": per_prefix[config.num_tokens].mean().item(),
        "ssim": full_ssim,
        "psnr_per_image": per_prefix[config.num_tokens].tolist(),
        "prefix_curve": [
            {"num_tokens": k, "bytes": math.ceil(k * config.bits_per_image / config.num_tokens / 8),
             "psnr": values.mean().item()}
            for k, values in per_prefix.items()
        ],  # fmt: skip
        "influence_coverage": {
            f"{t:g}": influence_coverage(influence, t).mean().item() for t in INFLUENCE_THRESHOLDS
        },
        "influence_area": influence_area(influence).mean().item(),
        "encode_images_per_s": throughput(model.encode, batch),
        "decode_images_per_s": throughput(model.decode, token_ids[: len(batch)]),
    }


def influence_area(influence: torch.Tensor) -> torch.Tensor:
    """`[B, C]` effective fraction of the image a token changes, without a threshold: the participation ratio
    `(sum |d|)^2 / (H W sum d^2)` of its change map `[B, C, H, W]` (1: an even change everywhere; a / (H W) for an
    even change over a pixels)."""
    flat = influence.flatten(2)
    return flat.sum(-1).square() / (flat.shape[-1] * flat.square().sum(-1)).clamp_min(1e-20)


def psnr_at_time(history: list[dict], seconds: float) -> float:
    """Test PSNR at `seconds` of training, linearly interpolated between evaluations (clamped to the first/last)."""
    times, values = [h["train_time"] for h in history], [h["psnr"] for h in history]
    return float(np.interp(seconds, times, values))


def paired_difference(a: list[float], b: list[float]) -> dict:
    """Mean of a - b over paired images and its 95% interval (normal approximation)."""
    diff = np.asarray(a) - np.asarray(b)
    half = 1.96 * diff.std(ddof=1) / math.sqrt(len(diff))
    return {"mean": float(diff.mean()), "ci95": [float(diff.mean() - half), float(diff.mean() + half)]}


def codec_rows(codecs: dict) -> list[dict]:
    """Flat JPEG/WebP variants (codec x accounting x direct/resized): fit fraction, PSNR, SSIM and per-image PSNR."""
    return [
        {"name": f"{codec} {accounting} {variant}", **{k: s[k] for k in ("fraction_fit", "psnr", "ssim", "mean_bytes")},
         "psnr_per_image": s["psnr_per_image"]}
        for codec in ("jpeg", "webp") for accounting in ("file", "payload") for variant in ("direct", "resized")
        for s in [codecs[codec][accounting][variant]]
    ]  # fmt: skip


# ------------------------------------------------------------------------------------------------ the benchmark
def plan(mode: Mode, settings: dict[str, tuple[float, int]]) -> tuple[list[Run], list[Run], list[Run]]:
    """Headline runs (both models, every seed, both datasets), the MNIST ablations and the diagnostics (the longer
    MNIST pair, the QG-VAE with its parameters moved from codebooks to convolutions, the patch VQ-VAE with per-token
    codebooks)."""
    headline = [
        Run(f"{dataset}-{model_type}-seed{seed}", dataset, model_type, seed, *settings[model_type],
            mode.steps[dataset], mode.eval_every[dataset], mode.usage_images)
        for dataset in DATASETS for seed in mode.seeds for model_type in PRESETS
    ]  # fmt: skip
    base = next(r for r in headline if r.dataset == "mnist" and r.model_type == "qgvae" and r.seed == mode.seeds[0])
    ablations = [
        replace(base, name="mnist-qgvae-no-reset", model_overrides=(("reset_interval", NO_RESET),)),
        replace(base, name="mnist-qgvae-no-dropout", model_overrides=(("token_dropout_prob", 0.0),)),
    ]
    diagnostics = [
        replace(r, name=f"{r.name}-x{mode.long_factor}", max_steps=r.max_steps * mode.long_factor,
                eval_every=r.eval_every * mode.long_factor)
        for r in headline if mode.long_factor and r.dataset == "mnist" and r.seed == mode.seeds[0]
    ]  # fmt: skip
    if mode.capacity:
        patch = next(r for r in headline if r.name == base.name.replace("qgvae", "patch_vqvae"))
        diagnostics += [
            replace(base, name="mnist-qgvae-d16", model_overrides=CAPACITY_OVERRIDES),
            replace(patch, name="mnist-patch_vqvae-per-token", model_overrides=PER_TOKEN_OVERRIDES),
        ]
    return headline, ablations, diagnostics


def run_sweep(mode: Mode, workdir: Path, jobs: int) -> tuple[dict, list[dict]]:
    """Each model's best (learning rate, batch) on the MNIST validation split at equal training time."""
    if mode.sweep_seconds is None:
        return {model_type: DEFAULT_SETTING for model_type in PRESETS}, []
    source = write_validation_split(workdir)
    runs = [
        Run(f"sweep-{model_type}-lr{lr:g}-b{batch}", "mnist", model_type, 0, lr, batch, 10**6, 10**6, 500,
            mode.sweep_seconds, source=source)
        for lr, batch in SWEEP for model_type in PRESETS
    ]  # fmt: skip
    results = train_all(runs, workdir, jobs)
    rows = [
        {"model_type": r.model_type, "learning_rate": r.learning_rate, "batch_size": r.batch_size,
         "steps": results[r.name]["step"], "train_time": results[r.name]["train_time"],
         "validation_psnr": results[r.name]["eval"]["psnr"], "process_seconds": results[r.name].get("process_seconds")}
        for r in runs
    ]  # fmt: skip
    best = {
        model_type: max((row for row in rows if row["model_type"] == model_type), key=lambda r: r["validation_psnr"])
        for model_type in PRESETS
    }
    return {m: (row["learning_rate"], row["batch_size"]) for m, row in best.items()}, rows


def compare_codecs(dataset: Dataset, mode: Mode, images: np.ndarray, budget: int) -> tuple[dict, list[dict]]:
    """JPEG/WebP at the models' budget (on `mode.codec_images` test images) and at the curve budgets (on fewer)."""
    at_budget = codec_rows(jpeg_webp_at_budget(images[: mode.codec_images], budget))
    curve = []
    for bytes_ in sorted(set(dataset.codec_budgets)):
        for row in codec_rows(jpeg_webp_at_budget(images[: mode.codec_curve_images], bytes_)):
            curve.append({"bytes": bytes_} | {k: v for k, v in row.items() if k != "psnr_per_image"})
    return at_budget, curve


def best_fitting(rows: list[dict]) -> dict | None:
    """The JPEG/WebP variant with the best PSNR among those that fit every image."""
    return max((r for r in rows if r["fraction_fit"] == 1.0), key=lambda r: r["psnr"], default=None)


def evaluate_claims(results: dict) -> list[dict]:
    """The paper's claims, each a row: what was measured, whether it holds, whether the issue's target is met."""
    claims = []
    for name, data in results["datasets"].items():
        seeds = data["seeds"]
        qg = [s["qgvae"]["psnr"] for s in seeds]
        patch = [s["patch_vqvae"]["psnr"] for s in seeds]
        diffs = [a - b for a, b in zip(qg, patch)]
        claims.append({
            "claim": "QG-VAE beats the patch VQ-VAE in PSNR at equal bytes, training steps and parameters",
            "dataset": name,
            "measured": f"{statistics.mean(qg):.2f} vs {statistics.mean(patch):.2f} dB "
                        f"(diff per seed: {', '.join(f'{d:+.2f}' for d in diffs)}; 95% interval over test images, "
                        "per seed: " + ", ".join("[{:+.2f}, {:+.2f}]".format(*s["qgvae_minus_patch_per_image"]["ci95"])
                                                  for s in seeds) + ")",
            "holds": all(d > 0 for d in diffs),
            "target": f">= {TARGET_MARGIN_DB:g} dB",
            "target_met": all(d >= TARGET_MARGIN_DB for d in diffs),
        })  # fmt: skip
        wall = [(s["equal_time"]["qgvae_psnr"], s["equal_time"]["patch_vqvae_psnr"], s["equal_time"]["seconds"])
                for s in seeds]  # fmt: skip
        claims.append({
            "claim": "... and at equal training time on this CPU",
            "dataset": name,
            "measured": "; ".join(f"{a:.2f} vs {b:.2f} dB at {t:.0f} s" for a, b, t in wall),
            "holds": all(a > b for a, b, _ in wall),
            "target": f">= {TARGET_MARGIN_DB:g} dB",
            "target_met": all(a - b >= TARGET_MARGIN_DB for a, b, _ in wall),
        })  # fmt: skip
        codec = data["codecs_at_budget"]
        best = best_fitting(codec["variants"])
        partial = [v for v in codec["variants"] if 0 < v["fraction_fit"] < 1]
        beats_partial = all(v["paired_qgvae_minus_codec"]["mean"] > 0 for v in partial)
        measured = f"QG-VAE {statistics.mean(qg):.2f} dB; best codec fitting every image: " + (
            f"{best['name']} {best['psnr']:.2f} dB" if best else "none fits"
        )
        if partial:
            measured += "; partial fits (QG-VAE minus codec on the same images): " + ", ".join(
                f"{v['name']} {v['fraction_fit']:.0%} {v['paired_qgvae_minus_codec']['mean']:+.2f} dB" for v in partial
            )
        margin = min([statistics.mean(qg) - best["psnr"]] if best else [math.inf])
        claims.append({
            "claim": "QG-VAE beats every JPEG/WebP setting that fits the same bytes",
            "dataset": name,
            "measured": measured,
            "holds": margin > 0 and beats_partial,
            "target": f">= {TARGET_MARGIN_DB:g} dB over codecs that fit",
            "target_met": margin >= TARGET_MARGIN_DB and beats_partial,
        })  # fmt: skip
        coverage = {m: {t: statistics.mean(s[m]["influence_coverage"][f"{t:g}"] for s in seeds)
                        for t in INFLUENCE_THRESHOLDS} for m in PRESETS}  # fmt: skip
        threshold = INFLUENCE_THRESHOLDS[0]
        fractions = {m: " / ".join(f"{c:.0%}" for c in coverage[m].values()) for m in PRESETS}
        areas = {m: statistics.mean(s[m]["influence_area"] for s in seeds) for m in PRESETS}
        claims.append({
            "claim": "tokens are global: one token changes most pixels, a patch token a compact region",
            "dataset": name,
            "measured": "pixels a token changes by > " + " / > ".join(f"{t:.0%}" for t in INFLUENCE_THRESHOLDS)
                        + " of the range: " + ", ".join(f"{MODEL_NAMES[m]} {fractions[m]}" for m in PRESETS)
                        + "; effective area (participation ratio, no threshold): "
                        + ", ".join(f"{MODEL_NAMES[m]} {areas[m]:.0%}" for m in PRESETS),
            "holds": coverage["qgvae"][threshold] > GLOBAL_COVERAGE
                     and coverage["patch_vqvae"][threshold] < LOCAL_COVERAGE,
            "target": f"> {GLOBAL_COVERAGE:.0%} vs < {LOCAL_COVERAGE:.0%} (at {threshold:.0%})",
            "target_met": None,
        })  # fmt: skip
        curves = [s["qgvae"]["prefix_curve"] for s in seeds]
        monotone = all(all(b["psnr"] > a["psnr"] - MONOTONE_TOLERANCE_DB for a, b in zip(c, c[1:])) for c in curves)
        claims.append({
            "claim": "ordering: with token dropout, prefix PSNR rises monotonically with k",
            "dataset": name,
            "measured": "k=" + ", ".join(f"{p['num_tokens']}: {p['psnr']:.2f}" for p in curves[0]) + " dB (seed 0)",
            "holds": monotone,
            "target": f"no longer prefix worse by > {MONOTONE_TOLERANCE_DB:g} dB",
            "target_met": None,
        })  # fmt: skip
        codec_curve = data["codec_curve"]
        below = []
        for point in curves[0]:
            rows = [r for r in codec_curve if r["bytes"] <= point["bytes"]]
            best_codec = best_fitting(rows)
            if best_codec and best_codec["psnr"] >= point["psnr"]:
                below.append(f"{point['bytes']} B")
        claims.append({
            "claim": "rate-distortion: one QG-VAE's prefixes beat JPEG/WebP at every byte budget up to its own",
            "dataset": name,
            "measured": "prefix curve above every fully-fitting codec point" if not below
                        else f"a codec point at or above the curve at {', '.join(below)}",
            "holds": not below,
            "target": "see figure",
            "target_met": None,
        })  # fmt: skip
        ablations = data.get("ablations")
        if ablations:
            with_reset, no_reset = seeds[0]["qgvae"], ablations["no_reset"]
            claims.append({
                "claim": "the Voronoi reset raises codebook usage and PSNR",
                "dataset": name,
                "measured": f"usage {with_reset['train_usage_mean']:.1%} vs {no_reset['train_usage_mean']:.1%}, "
                            f"PSNR {with_reset['psnr']:.2f} vs {no_reset['psnr']:.2f} dB (with vs without)",
                "holds": with_reset["train_usage_mean"] > no_reset["train_usage_mean"]
                         and with_reset["psnr"] > no_reset["psnr"],
                "target": "both higher",
                "target_met": None,
            })  # fmt: skip
            cost = ablations["no_dropout"]["psnr"] - with_reset["psnr"]
            claims.append({
                "claim": "token dropout costs < 0.5 dB of full-token PSNR",
                "dataset": name,
                "measured": f"{with_reset['psnr']:.2f} dB with vs {ablations['no_dropout']['psnr']:.2f} dB without "
                            f"({cost:+.2f} dB)",
                "holds": cost < DROPOUT_COST_DB,
                "target": f"< {DROPOUT_COST_DB:g} dB",
                "target_met": cost < DROPOUT_COST_DB,
            })  # fmt: skip
        long, capacity, per_token = (data.get(k) for k in ("long", "capacity", "per_token_patch"))
        qg0, patch0 = seeds[0]["qgvae"], seeds[0]["patch_vqvae"]
        if long:
            claims.append(diagnostic_row(
                "training length", f"QG-VAE vs the patch VQ-VAE at {long['factor']}x the steps", name,
                long["qgvae"], long["patch_vqvae"],
                f"at {long['qgvae']['steps']} steps (seed 0; {qg0['psnr']:.2f} vs {patch0['psnr']:.2f} dB at "
                f"{qg0['steps']})",
            ))  # fmt: skip
        if capacity:
            claims.append(diagnostic_row(
                "capacity", "QG-VAE with codeword_dim 16 and 64-wide convolutions (same parameters) vs the patch "
                "VQ-VAE", name, capacity, patch0,
                f"at {capacity['steps']} steps, {capacity['parameters']:,} parameters (seed 0; D=64: "
                f"{qg0['psnr']:.2f} dB); {capacity['seconds_per_step']:.2f} vs {patch0['seconds_per_step']:.2f} s/step",
            ))  # fmt: skip
        if per_token:
            claims.append(diagnostic_row(
                "per-token codebooks", "QG-VAE vs a patch VQ-VAE with a codebook per grid cell and QG-VAE's "
                "parameter split", name, qg0, per_token,
                f"at {per_token['steps']} steps, {per_token['parameters']:,} parameters (seed 0; shared-codebook "
                f"patch VQ-VAE: {patch0['psnr']:.2f} dB)",
            ))  # fmt: skip
    return claims


def diagnostic_row(kind: str, comparison: str, dataset: str, first: dict, second: dict, details: str) -> dict:
    """The claim row of a diagnostic: does `first` beat `second` in PSNR, and by the target margin?"""
    margin = first["psnr"] - second["psnr"]
    return {
        "claim": f"diagnostic ({kind}): {comparison}",
        "dataset": dataset,
        "measured": f"{first['psnr']:.2f} vs {second['psnr']:.2f} dB {details}",
        "holds": margin > 0,
        "target": f">= {TARGET_MARGIN_DB:g} dB",
        "target_met": margin >= TARGET_MARGIN_DB,
    }


def summarize_run(results: dict, analysis: dict) -> dict:
    usage = results["train_set_usage"]
    return analysis | {
        "steps": results["step"],
        "train_time": results["train_time"],
        "seconds_per_step": results["seconds_per_step"],
        "train_usage_mean": usage["usage_mean"],
        "train_usage_min": usage["usage_min"],
        "train_perplexity_mean": usage["perplexity_mean"],
        "history": [{k: h[k] for k in ("step", "train_time", "psnr", "train_usage_mean", "train_usage_min")}
                    for h in results["history"]],
    }  # fmt: skip


# ------------------------------------------------------------------------------------------------ figures
def plot_dataset(name: str, data: dict, prefix: str) -> dict[str, str]:
    """Rate-distortion curve and training curves (PSNR and codebook usage over steps and time) of one dataset."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    FIGURES.mkdir(parents=True, exist_ok=True)
    paths = {}
    seed0 = data["seeds"][0]
    fig, ax = plt.subplots(figsize=(6.5, 4.2))
    for model_type, style in (("qgvae", "o-"), ("patch_vqvae", "s--")):
        curve = seed0[model_type]["prefix_curve"]
        label = f"{MODEL_NAMES[model_type]} (prefixes of one model)"
        ax.plot([p["bytes"] for p in curve], [p["psnr"] for p in curve], style, label=label, markersize=4)
    no_dropout = data.get("ablations", {}).get("no_dropout")
    if no_dropout:
        curve = no_dropout["prefix_curve"]
        ax.plot([p["bytes"] for p in curve], [p["psnr"] for p in curve], ":", color="grey",
                label="QG-VAE without token dropout")  # fmt: skip
    for variant, marker in (("jpeg file resized", "^"), ("jpeg payload resized", "v"), ("webp file resized", "D"),
                            ("webp payload resized", "P")):  # fmt: skip
        points = [r for r in data["codec_curve"] if r["name"] == variant and r["fraction_fit"] == 1.0]
        if points:
            ax.plot([r["bytes"] for r in points], [r["psnr"] for r in points], marker + "-", alpha=0.7,
                    label=variant.replace("resized", "(best scale)"))  # fmt: skip
    ax.axvline(seed0["qgvae"]["bytes_per_image"], color="k", lw=0.6)
    ax.set(xscale="log", xlabel="bytes per image", ylabel="test PSNR (dB)", title=f"{name}: rate-distortion")
    ax.grid(alpha=0.3, which="both")
    ax.legend(fontsize=7)
    fig.tight_layout()
    paths["rate_distortion"] = f"{prefix}{name}_rate_distortion.png"
    fig.savefig(FIGURES / Path(paths["rate_distortion"]).name, dpi=110)
    plt.close(fig)

    fig, axes = plt.subplots(1, 3, figsize=(13, 3.6))
    runs = [(MODEL_NAMES[m], seed0[m]) for m in PRESETS]
    if data.get("ablations"):
        runs.append(("QG-VAE without reset", data["ablations"]["no_reset"]))
    if data.get("long"):
        runs += [(f"{MODEL_NAMES[m]}, {data['long']['factor']}x steps", data["long"][m]) for m in PRESETS]
    for label, run in runs:
        history = run["history"]
        axes[0].plot([h["step"] for h in history], [h["train_usage_mean"] for h in history], "o-", label=label, ms=3)
        axes[1].plot([h["step"] for h in history], [h["psnr"] for h in history], "o-", label=label, ms=3)
        axes[2].plot([h["train_time"] for h in history], [h["psnr"] for h in history], "o-", label=label, ms=3)
    axes[0].set(xlabel="step", ylabel="codewords in use (window)", ylim=(0, 1.02), title="codebook usage")
    axes[1].set(xlabel="step", ylabel="test PSNR (dB)", title="equal steps")
    axes[2].set(xlabel="training seconds (1 thread)", ylabel="test PSNR (dB)", title="equal wall-clock")
    for ax in axes:
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
    fig.tight_layout()
    paths["training"] = f"{prefix}{name}_training.png"
    fig.savefig(FIGURES / Path(paths["training"]).name, dpi=110)
    plt.close(fig)
    return paths


@torch.no_grad()
def image_figures(name: str, folders: dict[str, Path], images: torch.Tensor, prefix: str) -> dict[str, str]:
    """Influence maps (as the paper's Figure 1) and progressive grids of QG-VAE and the patch VQ-VAE side by side."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    paths = {}
    models = {m: AutoModel.from_pretrained(folder).eval() for m, folder in folders.items()}
    for kind in ("influence", "progressive"):
        fig, axes = plt.subplots(1, 2, figsize=(11, 5.2))
        for ax, (model_type, model) in zip(axes, models.items()):
            if kind == "influence":
                grid = influence_grid(model, images[:1], generator=torch.Generator().manual_seed(0))
                title = "input | all tokens | one panel per token"
            else:
                grid = progressive_grid(model, images[:8])
                title = "input, then the first 1, 2, 4, ... tokens"
            ax.imshow(np.asarray(grid), cmap="gray", interpolation="nearest")
            ax.set_title(f"{MODEL_NAMES[model_type]}: {title}", fontsize=9)
            ax.axis("off")
        fig.tight_layout()
        paths[kind] = f"{prefix}{name}_{kind}.png"
        fig.savefig(FIGURES / Path(paths[kind]).name, dpi=110)
        plt.close(fig)
    return paths


# ------------------------------------------------------------------------------------------------ README table
def render_claims(results: dict) -> str:
    """The README "Results: equal bytes" block, generated from the results JSON only."""
    mark = {True: "yes", False: "**no**", None: "-"}
    lines = [
        README_START,
        f"Generated by `{results['command']}` from `benchmarks/results/{results['file']}` "
        f"({results['machine']['cpus']}-core CPU; {results['training_process_seconds']['runs']} training runs, "
        f"{results['training_process_seconds']['sum'] / 60:.0f} min of process time "
        f"{results['training_process_seconds']['jobs']} at a time; this invocation {results['wall_seconds'] / 60:.0f} "
        "min).",
        "",
        "| dataset | model | bytes | params | steps | test PSNR (dB) | SSIM | codebook usage | encode / decode img/s |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for name, data in results["datasets"].items():
        for model_type in PRESETS:
            runs = [s[model_type] for s in data["seeds"]]
            psnrs = [r["psnr"] for r in runs]
            spread = f" ± {(max(psnrs) - min(psnrs)) / 2:.2f}" if len(runs) > 1 else ""
            r = runs[0]
            lines.append(
                f"| {name} | {MODEL_NAMES[model_type]} | {r['bytes_per_image']} | {r['parameters']:,} | {r['steps']} | "
                f"{statistics.mean(psnrs):.2f}{spread} | {statistics.mean(x['ssim'] for x in runs):.3f} | "
                f"{statistics.mean(x['train_usage_mean'] for x in runs):.1%} | "
                f"{r['encode_images_per_s']:.0f} / {r['decode_images_per_s']:.0f} |"
            )
        best = best_fitting(data["codecs_at_budget"]["variants"])
        if best:
            lines.append(f"| {name} | {best['name']} (best that fits) | <= {data['budget_bytes']} | - | - | "
                         f"{best['psnr']:.2f} | {best['ssim']:.3f} | - | - |")  # fmt: skip
    for name, data in results["datasets"].items():
        codecs = data["codecs_at_budget"]
        lines.append(
            f"\nJPEG/WebP at {data['budget_bytes']} bytes on {codecs['num_images']} {name} test images (fraction of "
            "images that fit; mean PSNR over those): "
            + "; ".join(f"{v['name']} {v['fraction_fit']:.0%}" + (f" {v['psnr']:.2f} dB" if v["psnr"] else "")
                        for v in codecs["variants"])
            + ". \"file\": the whole file; \"payload\": header-stripped, a lower bound that favours the codecs; "
            "\"resized\": the best of shrink, encode, upscale (see `benchmarks/image_codecs.py`)."
        )  # fmt: skip
    lines += [
        "",
        f"PSNR: mean over {len(results['seeds'])} seed(s) ± half the range between seeds. Codebook usage: fraction of "
        "codewords chosen over the training set (QG-VAE: mean over its per-token codebooks; patch VQ-VAE: its shared "
        "codebook). Learning rate and batch per model: "
        + ", ".join(f"{MODEL_NAMES[m]} {lr:g} / {b}" for m, (lr, b) in results["settings"].items())
        + (" (chosen by the sweep)." if results["sweep"] else " (no sweep in this mode)."),
        "",
        "| claim (paper) | dataset | measured | holds | target | target met |",
        "|---|---|---|---|---|---|",
    ]
    for c in results["claims"]:
        lines.append(f"| {c['claim']} | {c['dataset']} | {c['measured']} | {mark[c['holds']]} | {c['target']} | "
                     f"{mark[c['target_met']]} |")  # fmt: skip
    lines += ["", "Figures: " + ", ".join(f"[{k}]({v})" for k, v in results["figures"].items()), README_END]
    return "\n".join(lines)


# ------------------------------------------------------------------------------------------------ main
def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="one seed, short runs, no sweep (under 10 minutes)")
    parser.add_argument("--workdir", type=Path, help="training runs (default outputs/rate-distortion[-quick])")
    parser.add_argument("--jobs", type=int, default=2, help="training runs side by side, one thread each")
    parser.add_argument("--update-readme", action="store_true", help="rewrite README.md's results block")
    args = parser.parse_args(argv)
    mode_name = "quick" if args.quick else "full"
    mode = MODES[mode_name]
    suffix = "_quick" if args.quick else ""
    workdir = args.workdir or Path(f"outputs/rate-distortion{'-quick' if args.quick else ''}")
    workdir.mkdir(parents=True, exist_ok=True)
    start = time.perf_counter()

    print(f"[{time.perf_counter() - start:5.0f} s] sweep", flush=True)
    settings, sweep = run_sweep(mode, workdir, args.jobs)
    headline, ablations, diagnostics = plan(mode, settings)
    runs = headline + ablations + diagnostics
    print(f"[{time.perf_counter() - start:5.0f} s] training {len(runs)} runs", flush=True)
    trained = train_all(runs, workdir, args.jobs)

    print(f"[{time.perf_counter() - start:5.0f} s] analysis", flush=True)
    results = {"command": "python benchmarks/rate_distortion.py" + (" --quick" if args.quick else ""),
               "file": f"rate_distortion{suffix}.json", "mode": mode_name, "seeds": list(mode.seeds),
               "settings": settings, "sweep": sweep, "datasets": {}, "figures": {}}  # fmt: skip
    for name, dataset in DATASETS.items():
        uint8_images = test_images(name)[: mode.test_images]
        images = to_tensor(uint8_images)
        budget = PRESETS["qgvae"][dataset.preset]
        budget = math.ceil(budget["num_tokens"] * math.log2(budget["codebook_size"]) / 8)

        def analyse(run: Run, prefixes: tuple[int, ...] = dataset.prefixes, images: torch.Tensor = images) -> dict:
            model = AutoModel.from_pretrained(workdir / run.name).eval()
            analysis = analyse_model(model, images, prefixes, mode.influence_images)
            return summarize_run(trained[run.name], analysis)

        seeds = []
        for seed in mode.seeds:
            pair = {r.model_type: r for r in headline if r.dataset == name and r.seed == seed}
            entry = {m: analyse(run) for m, run in pair.items()}
            seconds = min(entry[m]["train_time"] for m in PRESETS)
            entry["equal_time"] = {"seconds": seconds} | {
                f"{m}_psnr": psnr_at_time(entry[m]["history"], seconds) for m in PRESETS
            }
            entry["qgvae_minus_patch_per_image"] = paired_difference(
                entry["qgvae"]["psnr_per_image"], entry["patch_vqvae"]["psnr_per_image"]
            )
            seeds.append(entry)
        data = {"budget_bytes": budget, "num_test_images": len(images), "seeds": seeds}
        if name == "mnist":
            no_reset, no_dropout = ablations
            data["ablations"] = {"no_reset": analyse(no_reset, ()), "no_dropout": analyse(no_dropout)}
            if mode.long_factor:
                data["long"] = {"factor": mode.long_factor} | {r.model_type: analyse(r, ()) for r in diagnostics[:2]}
            if mode.capacity:
                data["capacity"] = analyse(diagnostics[-2], ()) | {"overrides": dict(CAPACITY_OVERRIDES)}
                data["per_token_patch"] = analyse(diagnostics[-1], ()) | {"overrides": dict(PER_TOKEN_OVERRIDES)}
        print(f"[{time.perf_counter() - start:5.0f} s] {name}: JPEG/WebP", flush=True)
        variants, data["codec_curve"] = compare_codecs(dataset, mode, uint8_images, budget)
        qg_per_image = seeds[0]["qgvae"]["psnr_per_image"]
        for variant in variants:
            pairs = [(q, c) for q, c in zip(qg_per_image, variant.pop("psnr_per_image")) if c is not None]
            if pairs:
                variant["paired_qgvae_minus_codec"] = paired_difference(*zip(*pairs)) if len(pairs) > 1 else {
                    "mean": pairs[0][0] - pairs[0][1], "ci95": None}
        data["codecs_at_budget"] = {"num_images": len(uint8_images[: mode.codec_images]), "variants": variants}
        for run in (*seeds, *data.get("ablations", {}).values()):
            for m in PRESETS:
                run.get(m, {}).pop("psnr_per_image", None)
            run.pop("psnr_per_image", None)
        results["datasets"][name] = data
        figure_prefix = "figures/"
        FIGURES.mkdir(parents=True, exist_ok=True)
        folders = {r.model_type: workdir / r.name for r in headline if r.dataset == name and r.seed == mode.seeds[0]}
        stem = f"{name}{suffix}"
        results["figures"] |= {f"{name} {k}": f"benchmarks/results/{v}" for k, v in
                               plot_dataset(stem, data, figure_prefix).items()}  # fmt: skip
        results["figures"] |= {f"{name} {k}": f"benchmarks/results/{v}" for k, v in
                               image_figures(stem, folders, images, figure_prefix).items()}  # fmt: skip

    results["claims"] = evaluate_claims(results)
    # each training process's wall-clock when it ran (reused runs keep theirs), `jobs` at a time
    seconds = [r.get("process_seconds") for r in trained.values()] + [row["process_seconds"] for row in sweep]
    results["training_process_seconds"] = {"sum": sum(s for s in seconds if s), "runs": len(seconds),
                                           "unknown": seconds.count(None), "jobs": args.jobs}  # fmt: skip
    results["wall_seconds"] = time.perf_counter() - start
    results["machine"] = {"platform": platform.platform(), "cpus": os.cpu_count(), "torch": torch.__version__}
    path = HERE / "results" / results["file"]
    path.write_text(json.dumps(results, indent=1) + "\n")
    block = render_claims(results)
    print(block)
    if args.update_readme:
        replace_block(block, README_START, README_END)
    print(f"written to {path} in {results['wall_seconds'] / 60:.1f} min")
    return results


if __name__ == "__main__":
    main()
