"""Trained to their potential (issue 11): QG-VAE against the patch VQ-VAE at equal bytes and equal wall time.

    nohup sh -c 'python benchmarks/converged.py ablate && python benchmarks/converged.py refine --only photo_set &&
        python benchmarks/converged.py long --only photo_set && python benchmarks/converged.py train' \
        > outputs/converged.log 2>&1 &
    python benchmarks/converged.py analyse [--workdir outputs/converged] [--update-readme]

`train` runs two pairs through `training/train.py`, the two runs of a pair side by side with one thread each (both see
the same machine), each run for the same training time (evaluations and checkpoints excluded):
1. `photo_set.npz` (72 bytes: 64 tokens x 9 bits), 60 minutes: QG-VAE from `training/configs/photo-set.yaml`, the
   patch VQ-VAE (8x8 grid, one shared codebook of 512) with the same recipe; trained on fresh random crops of the 22
   training photos, evaluated on the fixed `test` crops of the 6 held-out photos;
2. MNIST (18 bytes: 16 tokens x 9 bits), 30 minutes: QG-VAE `mnist-cpu`, the patch VQ-VAE `mnist-cpu` (4x4 grid).
Each model's recipe on each benchmark is chosen by `ablate` (run it first): every model type trains `RECIPE`
(warm-up and cosine decay over the training time, EMA of the weights, data-dependent codebook initialisation, the
short-run CPU settings) and each one-at-a-time change of `VARIANTS` for the same short time (5 minutes on photo_set,
8 on MNIST), scored on data held out of training (crops of 3 training photos held out of the stream; the last 1,000
training digits), never the test split; `select_changes` keeps an addition only if removing it loses validation PSNR
and takes an alternative only if it gains (the same sweep for both models). On MNIST, QG-VAE also runs the
`diagnostic_changes` (no token dropout, one head per token), reported and never selected. `refine` is a second round
(run on photo_set): each of `REFINEMENTS` on top of each model's round-1 selection, for the same time on the same
validation split, taken where it beats the round-1 selection. `long` is a third round (on photo_set, 12 minutes a
run): each of `LONG_TRIALS` on top of rounds 1 and 2, the best run taken. The stages resume: a finished run (its
folder holds `results.json` for the same config) is kept, an interrupted one continues from its newest checkpoint,
and a folder whose run had another config is deleted (with a note) and trained again (`common.reusable_run`).

`analyse` reads the runs and writes `benchmarks/results/converged.json`, figures under `benchmarks/results/figures/`
(`converged_<data>_training.png`, `converged_<data>_progressive.png`, `converged_<data>_rate_distortion.png`) and, with
`--update-readme`, the README's headline block.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
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

from bench_model import count_flops  # noqa: E402
from common import reusable_run  # noqa: E402
from demo import REPO_ROOT, run_training  # noqa: E402
from image_codecs import jpeg_webp_at_budget, to_tensor  # noqa: E402
from rate_distortion import analyse_model, best_fitting, codec_rows, paired_difference, psnr_at_time  # noqa: E402
from readme_blocks import replace_block  # noqa: E402

from qg_tokenizer import PATCH_VQVAE_PRESETS, QGVAE_PRESETS  # noqa: E402
from qg_tokenizer.data import MNIST_NUM_TRAIN, MNIST_PATH  # noqa: E402

HERE = Path(__file__).resolve().parent
RESULTS = HERE / "results" / "converged.json"
# earlier runs of the same benchmarks, kept beside the current one in the README: their JSON and recipe
EARLIER_RUNS = {
    "converged_shared_recipe.json": "before any selection (commit ca0bf35): one shared recipe, warm-up and cosine "
    "decay, an EMA of the weights as the saved model, data-dependent codebook init",
    "converged_photo_selected_recipe.json": "with the recipes selected on photo_set's ablations (commit 7f1b9d8)",
    "converged_photo_lr1e3.json": "QG-VAE at lr 1e-3 on photo_set (commit 06e4e3e): its doubled-rate ablation had "
    "shared the cores with other work (far fewer steps) and lost; run again on idle cores, it won",
    "converged_photo_round1.json": "photo_set with round 1's selections only (commit 25e3d0c): QG-VAE at lr 2e-3, "
    "constant (round 2 kept none of its changes), the patch VQ-VAE with D = 64 and a reset every 50 steps",
    "converged_photo_round2.json": "photo_set with the selections of rounds 1 and 2 (commit ddd5956): QG-VAE as in "
    "round 1, the patch VQ-VAE with 16-dimensional codewords and a reset every 25 steps",
}
FIGURES = HERE / "results" / "figures"
README_START, README_END = "<!-- converged:start -->", "<!-- converged:end -->"
USAGE_TARGET = 0.9
CURVE_STEP = 5  # JPEG/WebP curve points off the models' budget use every 5th test image
ABLATION_NAMES = {
    "full": "full recipe (raw weights)", "ema": "full recipe, its EMA model (decay 0.999)",
    "no_codebook_init": "without data-dependent codebook init", "no_schedule": "without warm-up and cosine decay",
    "reset_every_200": "Voronoi reset every 200 steps instead of 50",
    "lr_2x": "learning rates doubled (2e-3, codebooks 2e-2)", "reference": "reference recipe (SPEC section 6)",
    "ordering_off": "diagnostic: no token dropout (unordered tokens)",
    "heads_per_token": "diagnostic: one projection head per token",
    "selected": "selection of the earlier rounds",
    "codebook_lr_1x": "codebooks at the model's learning rate (no 10x boost)",
    "codeword_dim_16": "16-dimensional codewords (D = 16, not 64)",
    "reset_every_25": "Voronoi reset every 25 steps instead of 50",
    "decay": "warm-up and cosine decay over the run's time", "decay_codebook_lr_1x": "decay, codebooks at 1x rate",
    "round_1_decay": "decay on round 1's selection (round 2 undone)",
}  # fmt: skip
PHOTO_SET = REPO_ROOT.parent / "shared" / "data" / "photo_set.npz"
MODEL_NAMES = {"qgvae": "QG-VAE", "patch_vqvae": "patch VQ-VAE"}
# shared by both models of a pair (the model-independent part of `training/configs/photo-set.yaml`)
RECIPE = {
    "batch_size": 32,
    "max_steps": 10**7,  # bounded by max_train_time
    "learning_rate": 1e-3,
    "codebook_learning_rate": 1e-2,
    "lr_scheduler": "cosine_with_min_lr",
    "lr_scheduler_kwargs": {"min_lr_rate": 0.05},
    "lr_schedule_clock": "time",
    "lr_warmup_ratio": 0.02,
    "ema_decay": 0.999,
    "codebook_init": "data",
    "mixed_precision": "no",
    "report_to": "none",
    "checkpoints_total_limit": 2,
    "log_every": 50,
}
MODEL_RECIPE = {"reset_interval": 50, "codebook_loss_weight": 0.25, "commitment_loss_weight": 0.1}


@dataclass(frozen=True)
class Benchmark:
    name: str
    preset: str
    data: dict
    train_seconds: float
    eval_every: int
    checkpoint_every: int
    max_eval_samples: int | None
    prefixes: tuple[int, ...] = ()  # QG-VAE token prefixes of the rate-distortion curve
    codec_budgets: tuple[int, ...] = ()  # JPEG/WebP curve points (bytes per image) besides the models' budget
    psnr_target: float = 0.0  # the issue's QG-VAE test-PSNR target
    validation: dict | None = None  # the `data` keys of the ablations' validation split (held out of training)
    validation_name: str = ""
    variants: tuple[str, ...] = ()  # the ablation runs of both models (`VARIANTS`)
    diagnostics: bool = False  # also the QG-VAE runs of `diagnostic_changes`
    ablation_seconds: float = 300.0  # training time of each ablation run


# one-at-a-time changes of the recipe, each ablated for both models; "model" holds model-config changes
VARIANTS = {
    "full": {},
    "no_codebook_init": {"codebook_init": "uniform"},
    "no_schedule": {"lr_scheduler": "constant", "lr_warmup_ratio": 0.0, "lr_scheduler_kwargs": {}},
    # each token's codebook sees batch x interval samples between resets: 1,600 for 512 codewords at 50 steps
    "reset_every_200": {"model": {"reset_interval": 200}},
    "lr_2x": {"learning_rate": 2e-3, "codebook_learning_rate": 2e-2},
    "reference": {"learning_rate": 2e-4, "codebook_learning_rate": None, "lr_scheduler": "constant",
                  "lr_warmup_ratio": 0.0, "lr_scheduler_kwargs": {}, "ema_decay": None, "codebook_init": "uniform",
                  "model": {"commitment_loss_weight": 1.0, "reset_interval": 100}},
}  # fmt: skip
SELECTABLE = ("no_codebook_init", "no_schedule", "reset_every_200", "lr_2x")  # "reference" is a yardstick only
# the second round (`refine`), around each model's round-1 selection: the quantiser's settings, which round 1 left
# alone. With Adam every codeword moves about the learning rate per step whatever its gradient, which at the boosted
# codebook rate may be large against the spread of some tokens' encoder outputs (codewords the reset split could lose
# their cells again: QG-VAE's least-used codebooks fill slowly); 16-dimensional codewords leave fewer directions to fill
REFINEMENTS = {
    "selected": {},
    "codebook_lr_1x": {"codebook_learning_rate": None},
    "codeword_dim_16": {"model": {"codeword_dim": 16}},
    # round 1 found 50 steps better than 200 for both models: one more step in that direction
    "reset_every_25": {"model": {"reset_interval": 25}},
}
DECAY = {key: RECIPE[key] for key in VARIANTS["no_schedule"]}  # the starting recipe's warm-up and cosine decay
# the third round (`long`), around each model's selection of rounds 1 and 2, for 12 minutes instead of 5: twice a
# 5-minute winner lost over the hour. Cosine decay over the run's time lost round 1 at 5 minutes, where the rate
# matters most; QG-VAE's hour at a constant rate flattened out after 45 minutes, where decay usually helps. The
# 1x codebook rate filled QG-VAE's codebooks in round 2. "round_1_decay" is the decay on round 1's selection alone
# (round 2's changes undone; run where round 2 took any). The best-scoring run of the round is taken.
LONG_TRIALS = {
    "selected": {},
    "decay": DECAY,
    "decay_codebook_lr_1x": DECAY | {"codebook_learning_rate": None},
    "round_1_decay": DECAY,
}


def diagnostic_changes(model: dict) -> dict[str, dict]:
    """QG-VAE only, reported beside the ablations and never selected: what ordering the tokens costs at full length
    (the SPEC's dropout of trailing tokens, which makes every prefix an image) and one projection per token."""
    return {
        "ordering_off": {"model": {"token_dropout_prob": 0.0}},
        "heads_per_token": {"model": {"num_heads": model["num_tokens"]}},
    }


BENCHMARKS = {
    "photo_set": Benchmark(
        "photo_set", "photos32-cpu",
        {"source": str(PHOTO_SET), "train_split": "train", "eval_split": "test", "random_crops": True,
         "horizontal_flip": True},
        3600.0, 1000, 500, 256, (1, 2, 4, 8, 16, 32, 48, 64), (18, 36, 54, 108, 144, 288), 25.6,
        {"validation_photos": 3, "eval_split": "validation", "num_validation_crops": 512},
        "512 crops of 3 training photos held out", ("full", *SELECTABLE, "reference"),
    ),  # fmt: skip
    "mnist": Benchmark(
        "mnist", "mnist-cpu", {"source": "embedded-mnist", "train_split": "train", "eval_split": "test"},
        1800.0, 2000, 1000, 500, (1, 2, 3, 4, 6, 8, 12, 16), (9, 36, 72, 144, 288), 23.0,
        {"validation_images": 1000, "eval_split": "validation"}, "the last 1,000 training digits, held out",
        ("full", *SELECTABLE), diagnostics=True, ablation_seconds=480.0,
    ),  # fmt: skip
}


def with_changes(config: dict, changes: dict) -> dict:
    """`config` with `changes` applied (their "model" entries merged into the model config)."""
    return config | changes | {"model": config["model"] | changes.get("model", {})}


def train_config(bench: Benchmark, model_type: str, workdir: Path, changes: dict | None = None) -> dict:
    """The `training/train.py` config of one run: `RECIPE` with `changes` (see `select_changes`)."""
    presets = QGVAE_PRESETS if model_type == "qgvae" else PATCH_VQVAE_PRESETS
    model = {"model_type": model_type, **presets[bench.preset], **MODEL_RECIPE}
    config = {
        "output_dir": str(workdir / f"{bench.name}-{model_type}"),
        "seed": 0,
        "model": model,
        "data": bench.data,
        **RECIPE,
        "max_train_time": bench.train_seconds,
        "eval_every": bench.eval_every,
        "checkpoint_every": bench.checkpoint_every,
        "max_eval_samples": bench.max_eval_samples,
        "eval_batch_size": 256,
        "final_usage_samples": None,
    }
    return with_changes(config, changes or {})


def select_changes(rows: dict) -> dict:
    """The recipe changes one model's ablation `rows` (`ablation_rows(...)["runs"]`) choose: each selectable variant
    that beats the full recipe's validation PSNR, and no EMA unless its model beats the raw weights. The changes are
    combined as if independent (a one-at-a-time sweep, not a grid)."""
    full = rows["full"]["validation_psnr"]
    changes: dict = {"model": {}}
    for name in SELECTABLE:
        if name in rows and rows[name]["validation_psnr"] > full:
            changes = with_changes(changes, VARIANTS[name])
    if rows["ema"]["validation_psnr"] <= full:
        changes["ema_decay"] = None
    return changes


def selected_changes(bench: str, model_type: str, rounds: int = 3, results: dict | None = None) -> dict:
    """The recipe changes of `model_type` on `bench` after the first `rounds` sweep rounds in `results` (default:
    `converged.json`): round 1's `select_changes`, round 2's `select_refinements` and round 3's best run
    (`select_long_trial`, which may undo round 2: "round_1_decay"); an error if `ablate` has not run for them."""
    if results is None:
        results = json.loads(RESULTS.read_text()) if RESULTS.is_file() else {}
    runs = results.get("ablations", {}).get(bench, {}).get(model_type, {}).get("runs", {})
    if not {"full", "ema"} <= set(runs):
        raise SystemExit(f"no finished {model_type} ablations on {bench} in {RESULTS}: "
                         f"run `converged.py ablate --only {bench}` first")  # fmt: skip
    changes = select_changes(runs)
    rows = {stage: results.get(stage, {}).get(bench, {}).get(model_type, {}).get("runs", {})
            for stage in ("refinements", "long_trials")}  # fmt: skip
    best = select_long_trial(rows["long_trials"]) if rounds >= 3 else None
    if rounds >= 2 and best != "round_1_decay":
        changes = with_changes(changes, select_refinements(rows["refinements"]))
    return with_changes(changes, LONG_TRIALS[best]) if best else changes


def select_refinements(rows: dict) -> dict:
    """The `REFINEMENTS` whose run beats the round-1 selection's validation PSNR (`refine`'s `rows`), combined."""
    changes: dict = {"model": {}}
    base = rows.get("selected", {}).get("validation_psnr", math.inf)  # no round-1 run: nothing wins
    for name, row in rows.items():
        if row["validation_psnr"] > base:
            changes = with_changes(changes, REFINEMENTS[name])
    return changes


def select_long_trial(rows: dict) -> str | None:
    """The name of round 3's best run by validation PSNR (`long`'s `rows`), None before the round has run."""
    return max(rows, key=lambda name: rows[name]["validation_psnr"]) if rows else None


def train_run(config: dict, workdir: Path) -> dict:
    """Train (or resume, or reuse) the run of one `training/train.py` config; returns its `results.json`."""
    folder = Path(config["output_dir"])
    config_path, results_path = workdir / "configs" / f"{folder.name}.yaml", folder / "results.json"
    results = reusable_run(folder, config_path, config)  # writes `config_path`, the config train.py reads
    if results is not None:
        return results
    start = time.perf_counter()
    log = workdir / f"{folder.name}.{int(time.time())}.log"
    results = run_training(folder, ["--resume", "latest"], config=config_path, num_threads=1, log_file=log)
    results["process_seconds"] = time.perf_counter() - start
    results_path.write_text(json.dumps(results, indent=2))
    print(f"{folder.name}: {results['step']} steps, eval PSNR {results['eval']['psnr']:.2f} dB", flush=True)
    return results


def train_pairs(configs: list[dict], workdir: Path) -> list[dict]:
    """Train `configs` two at a time, one thread each."""
    with ThreadPoolExecutor(2) as pool:
        return list(pool.map(train_run, configs, [workdir] * len(configs)))


def train(workdir: Path, names: list[str]) -> None:
    for name in names:
        bench = BENCHMARKS[name]
        print(f"{name}: QG-VAE and patch VQ-VAE side by side, {bench.train_seconds / 60:.0f} min each", flush=True)
        configs = [train_config(bench, m, workdir, selected_changes(name, m)) for m in MODEL_NAMES]
        train_pairs(configs, workdir)


def validation_config(workdir: Path, seconds: float, model_type: str, bench: Benchmark) -> dict:
    """`train_config` of a short sweep run: `seconds` of training, scored once at the end on the benchmark's
    validation split (held out of the training data, never the test split)."""
    base = train_config(bench, model_type, workdir / "ablations")
    base |= {"max_train_time": seconds, "eval_every": 10**6, "max_eval_samples": None, "checkpoint_every": 250}
    return base | {"data": base["data"] | bench.validation}


def ablation_configs(workdir: Path, seconds: float, model_type: str, bench: Benchmark) -> dict[str, dict]:
    """`model_type` on `bench`, `seconds` each (`validation_config`): the full recipe and each of `bench.variants`
    (the EMA's effect is read from the full run's EMA model against its raw weights, `live_psnr`), and for QG-VAE
    `diagnostic_changes` if `bench.diagnostics`; "reference" is SPEC section 6 (lr 2e-4, no codebook-rate boost,
    commitment 1.0, reset every 100 steps, no schedule, EMA or data initialisation)."""
    base = validation_config(workdir, seconds, model_type, bench)
    changes = {name: VARIANTS[name] for name in bench.variants}
    if bench.diagnostics and model_type == "qgvae":
        changes |= diagnostic_changes(base["model"])
    folder = workdir / "ablations"
    return {
        name: with_changes(base, change) | {"output_dir": str(folder / f"{bench.name}-{model_type}-{name}")}
        for name, change in changes.items()
    }


def refinement_configs(workdir: Path, seconds: float, model_type: str, bench: Benchmark) -> dict[str, dict]:
    """The second round of the sweep: `model_type`'s round-1 selection on `bench` and each of `REFINEMENTS` on top
    of it, `seconds` each (`validation_config`)."""
    base = with_changes(validation_config(workdir, seconds, model_type, bench),
                        selected_changes(bench.name, model_type, rounds=1))  # fmt: skip
    folder = workdir / "refinements"
    return {
        name: with_changes(base, change) | {"output_dir": str(folder / f"{bench.name}-{model_type}-{name}")}
        for name, change in REFINEMENTS.items()
    }


def long_trial_configs(workdir: Path, seconds: float, model_type: str, bench: Benchmark) -> dict[str, dict]:
    """The third round: `model_type`'s selection of rounds 1 and 2 on `bench` and each of `LONG_TRIALS` on top of
    it, `seconds` each (`validation_config`); "round_1_decay" adds its change to round 1's selection only. A run the
    same as an earlier one is left out."""
    base = validation_config(workdir, seconds, model_type, bench)
    selections = {rounds: selected_changes(bench.name, model_type, rounds=rounds) for rounds in (1, 2)}
    folder = workdir / "long"
    configs = {}
    for name, change in LONG_TRIALS.items():
        config = with_changes(with_changes(base, selections[1 if name == "round_1_decay" else 2]), change)
        if config not in configs.values():
            configs[name] = config
    return {name: config | {"output_dir": str(folder / f"{bench.name}-{model_type}-{name}")}
            for name, config in configs.items()}  # fmt: skip


def sweep(stage: str, workdir: Path, names: list[str], seconds: float | None = None) -> dict:
    """Train both models' runs of one sweep round on each benchmark of `names` and add their validation scores to
    `converged.json` under `stage`: "ablations" (`ablation_configs`, round 1), "refinements" (`refinement_configs`,
    round 2) or "long_trials" (`long_trial_configs`, round 3). The two models' runs of each change are paired, two
    at a time (one model's runs of its own after them), each for `seconds` (default: the benchmark's
    `ablation_seconds`)."""
    build, select = SWEEPS[stage]
    results = json.loads(RESULTS.read_text()) if RESULTS.is_file() else {"benchmarks": {}, "figures": {}}
    for name in names:
        bench = BENCHMARKS[name]
        seconds_ = bench.ablation_seconds if seconds is None else seconds
        configs = {m: build(workdir, seconds_, m, bench) for m in MODEL_NAMES}
        shared = [v for v in configs["qgvae"] if v in configs["patch_vqvae"]]
        own = [(m, v) for m, c in configs.items() for v in c if v not in shared]
        order = [(m, v) for v in shared for m in MODEL_NAMES] + own
        train_pairs([configs[m][v] for m, v in order], workdir)
        results.setdefault(stage, {})[name] = {m: ablation_rows(c, bench) for m, c in configs.items()}
        RESULTS.write_text(json.dumps(results, indent=2))
        for model_type, rows in results[stage][name].items():
            for variant, row in rows["runs"].items():
                print(f"{name:10} {model_type:12} {variant:18} {row['validation_psnr']:.2f} dB  {row['steps']} steps")
            print(f"{name:10} {model_type:12} {stage} select: {select(rows['runs'])}")
    return results


def ablation_rows(configs: dict[str, dict], bench: Benchmark) -> dict:
    """Validation PSNR of each finished ablation run, from the raw weights (`live_psnr`) where the run kept an EMA:
    a few hundred steps are too few for an EMA of decay 0.999 to forget its start; `ema` reports the full run's EMA
    model beside them. Where the benchmark runs the QG-VAE diagnostics (the price of ordering), QG-VAE's rows also
    hold the PSNR of the first C/2 tokens (`half_prefix_psnr`) of the saved model."""
    runs = {}
    for name, config in configs.items():
        path = Path(config["output_dir"]) / "results.json"
        if path.is_file():
            runs[name] = json.loads(path.read_text())
    rows = {}
    for name, r in runs.items():
        final, model = r["history"][-1], configs[name]["model"]
        rows[name] = {"validation_psnr": final.get("live_psnr", final["psnr"]), "steps": r["step"],
                      "train_time": r["train_time"], "usage_min": r["train_set_usage"]["usage_min"]}  # fmt: skip
        if bench.diagnostics and model["model_type"] == "qgvae":  # the first C/2 tokens, from the saved model
            rows[name]["half_prefix_psnr"] = final[f"psnr_k{model['num_tokens'] // 2}"]
    if "full" in runs:
        rows["ema"] = rows["full"] | {"validation_psnr": runs["full"]["history"][-1]["psnr"]}
    seconds = next(iter(configs.values()))["max_train_time"]
    return {"seconds": seconds, "validation": bench.validation_name, "runs": rows}


# each sweep round's key in `converged.json`: the configs of its runs and the changes its rows select
SWEEPS = {"ablations": (ablation_configs, select_changes), "refinements": (refinement_configs, select_refinements),
          "long_trials": (long_trial_configs, select_long_trial)}  # fmt: skip
SWEEP_STAGES = {"ablate": "ablations", "refine": "refinements", "long": "long_trials"}  # command -> JSON key
LONG_TRIAL_SECONDS = 720.0  # round 3's training time per run


# ---------------------------------------------------------------------------------------------------- analysis
def test_images(name: str) -> np.ndarray:
    """uint8 test images: the last 1,000 MNIST digits `[N, 28, 28]` or photo_set's `test` crops `[768, 32, 32, 3]`."""
    if name == "mnist":
        with np.load(MNIST_PATH) as npz:
            return npz["images"][MNIST_NUM_TRAIN:]
    with np.load(PHOTO_SET) as npz:
        return npz["test"]


@torch.no_grad()
def flops_per_image(model, images: torch.Tensor) -> dict[str, float]:
    """Encode and decode GFLOPs per image (`bench_model.count_flops`, batch of 8)."""
    batch = images[:8]
    token_ids = model.encode(batch).token_ids
    return {
        "encode_gflops_per_image": count_flops(lambda: model.encode(batch)) / len(batch) / 1e9,
        "decode_gflops_per_image": count_flops(lambda: model.decode(token_ids)) / len(batch) / 1e9,
    }


def summarize_run(results: dict, analysis: dict) -> dict:
    usage = results["train_set_usage"]
    return analysis | {
        "steps": results["step"], "train_time": results["train_time"],
        "seconds_per_step": results["seconds_per_step"], "process_seconds": results.get("process_seconds"),
        "usage_mean": usage["usage_mean"], "usage_min": usage["usage_min"], "history": results["history"],
    }  # fmt: skip


def compare_codecs(bench: Benchmark, images: np.ndarray, budget: int) -> tuple[list[dict], list[dict]]:
    """JPEG/WebP at the models' budget on every test image, and at the curve budgets on every 5th (photo_set's test
    crops cycle through 4 region sides, so a step of 4 would see one scale only; 5 sees every scale and photo)."""
    at_budget = codec_rows(jpeg_webp_at_budget(images, budget))
    curve = []
    for bytes_ in bench.codec_budgets:
        for row in codec_rows(jpeg_webp_at_budget(images[::CURVE_STEP], bytes_)):
            curve.append({"bytes": bytes_} | {k: v for k, v in row.items() if k != "psnr_per_image"})
    return at_budget, curve


def analyse_benchmark(bench: Benchmark, workdir: Path, models: dict) -> dict:
    """Test metrics, FLOPs and training history of the pair `models` (by model type) trained in `workdir`, their
    paired difference, JPEG/WebP on the same images and the target verdicts."""
    uint8_images = test_images(bench.name)
    images = to_tensor(uint8_images)
    entry = {"num_test_images": len(images), "train_seconds": bench.train_seconds}
    for model_type, model in models.items():
        results = json.loads((workdir / f"{bench.name}-{model_type}" / "results.json").read_text())
        prefixes = bench.prefixes if model_type == "qgvae" else ()
        entry[model_type] = summarize_run(results, analyse_model(model, images, prefixes, influence_images=4))
        entry[model_type] |= flops_per_image(model, images)
    qg, patch = entry["qgvae"], entry["patch_vqvae"]
    entry["budget_bytes"] = budget = qg["bytes_per_image"]
    entry["qgvae_minus_patch_per_image"] = paired_difference(qg["psnr_per_image"], patch["psnr_per_image"])
    seconds = min(qg["train_time"], patch["train_time"])
    entry["equal_time"] = {"seconds": seconds} | {f"{m}_psnr": psnr_at_time(entry[m]["history"], seconds) for m in
                                                  ("qgvae", "patch_vqvae")}  # fmt: skip
    print(f"{bench.name}: JPEG/WebP", flush=True)
    variants, entry["codec_curve"] = compare_codecs(bench, uint8_images, budget)
    for variant in variants:  # QG-VAE minus the codec on the images the codec fits
        pairs = [(q, c) for q, c in zip(qg["psnr_per_image"], variant.pop("psnr_per_image")) if c is not None]
        variant["qgvae_minus_codec"] = float(np.mean([q - c for q, c in pairs])) if pairs else None
    entry["codecs_at_budget"] = variants
    entry["targets"] = targets(bench, entry)
    return entry


def targets(bench: Benchmark, entry: dict) -> list[dict]:
    """The issue's targets, each with its measured value and whether it is met."""
    qg, patch = entry["qgvae"], entry["patch_vqvae"]
    rows = [{"target": f"QG-VAE test PSNR >= {bench.psnr_target} dB", "measured": f"{qg['psnr']:.2f} dB",
             "met": qg["psnr"] >= bench.psnr_target}]  # fmt: skip
    file_fits = [v for v in entry["codecs_at_budget"] if " file " in v["name"] and v["fraction_fit"] == 1.0]
    best_file, best_any = best_fitting(file_fits), best_fitting(entry["codecs_at_budget"])
    rows.append({
        "target": "QG-VAE above every whole-file JPEG/WebP setting that fits every image",
        "measured": f"best whole-file codec that fits: {best_file['name']} {best_file['psnr']:.2f} dB"
        if best_file else "no whole-file JPEG/WebP setting fits every image",
        "met": best_file is None or qg["psnr"] > best_file["psnr"],
    })  # fmt: skip
    if best_any:
        rows.append({"target": "QG-VAE above header-stripped JPEG/WebP (the codec lower bound)",
                     "measured": f"{best_any['name']} {best_any['psnr']:.2f} dB", "met": qg["psnr"] > best_any["psnr"]})
    diff = entry["qgvae_minus_patch_per_image"]
    rows.append({
        "target": "QG-VAE vs the patch VQ-VAE at equal bytes and training time (verdict, whatever it is)",
        "measured": f"{qg['psnr']:.2f} vs {patch['psnr']:.2f} dB, difference {diff['mean']:+.2f} dB "
        f"(95% interval over test images [{diff['ci95'][0]:+.2f}, {diff['ci95'][1]:+.2f}])",
        "met": diff["ci95"][0] > 0,
    })  # fmt: skip
    for model_type in ("qgvae", "patch_vqvae"):
        run = entry[model_type]
        rows.append({"target": f"{MODEL_NAMES[model_type]}: codeword usage >= {USAGE_TARGET:.0%} for every codebook",
                     "measured": f"min {run['usage_min']:.1%}, mean {run['usage_mean']:.1%}",
                     "met": run["usage_min"] >= USAGE_TARGET})  # fmt: skip
    return rows


def plot_benchmark(name: str, entry: dict, models: dict) -> dict[str, str]:
    """Training curves, the rate-distortion curve against JPEG/WebP and labelled progressive grids."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    FIGURES.mkdir(parents=True, exist_ok=True)
    paths = {}
    fig, axes = plt.subplots(1, 2, figsize=(11, 3.8))
    for model_type, style, color in (("qgvae", "o-", "C0"), ("patch_vqvae", "s--", "C1")):
        history = entry[model_type]["history"]
        minutes = [h["train_time"] / 60 for h in history]
        saved = "EMA" if "live_psnr" in history[0] else "raw weights"
        axes[0].plot(minutes, [h["psnr"] for h in history], style, color=color, ms=3,
                     label=f"{MODEL_NAMES[model_type]} (saved: {saved})")  # fmt: skip
        if "live_psnr" in history[0]:
            axes[0].plot(minutes, [h["live_psnr"] for h in history], style, color=color, ms=2, alpha=0.4,
                         label=f"{MODEL_NAMES[model_type]} (raw weights)")  # fmt: skip
        axes[1].plot(minutes, [h["train_usage_min"] for h in history], style, color=color, ms=3,
                     label=MODEL_NAMES[model_type])  # fmt: skip
    evaluated = BENCHMARKS[name].max_eval_samples  # periodic evaluations; the final one uses every test image
    last = entry["num_test_images"]
    title = name if evaluated is None else f"{name}: first {evaluated} test images, the last point all {last}"
    axes[0].set(xlabel="training minutes (1 thread each, side by side)", ylabel="test PSNR (dB)", title=title)
    axes[1].set(xlabel="training minutes", ylabel="codeword usage, least-used codebook", ylim=(0, 1.02),
                title="over the training batches since the previous point")  # fmt: skip
    for ax in axes:
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
    fig.tight_layout()
    paths["training"] = save_figure(fig, f"converged_{name}_training.png")

    fig, ax = plt.subplots(figsize=(6.5, 4.2))
    curve = entry["qgvae"]["prefix_curve"]
    ax.plot([p["bytes"] for p in curve], [p["psnr"] for p in curve], "o-", ms=4, label="QG-VAE (prefixes of one model)")
    patch = entry["patch_vqvae"]
    ax.plot([patch["bytes_per_image"]], [patch["psnr"]], "s", ms=7, label="patch VQ-VAE")
    for variant, marker in (("jpeg file resized", "^"), ("jpeg payload resized", "v"), ("webp file resized", "D"),
                            ("webp payload resized", "P")):  # fmt: skip
        points = [r for r in entry["codec_curve"] if r["name"] == variant and r["fraction_fit"] == 1.0]
        if points:
            ax.plot([r["bytes"] for r in points], [r["psnr"] for r in points], marker + "-", alpha=0.7,
                    label=variant.replace("resized", f"(best scale), every {CURVE_STEP}th test image"))  # fmt: skip
    ax.axvline(entry["budget_bytes"], color="k", lw=0.6)
    ax.set(xscale="log", xlabel="bytes per image", ylabel="test PSNR (dB)", title=f"{name}: rate-distortion")
    ax.grid(alpha=0.3, which="both")
    ax.legend(fontsize=7)
    fig.tight_layout()
    paths["rate_distortion"] = save_figure(fig, f"converged_{name}_rate_distortion.png")

    images = to_tensor(test_images(name))
    picks = images[np.linspace(0, len(images) - 1, 8).round().astype(int)]
    fig, axes = plt.subplots(2, 1, figsize=(8, 8), height_ratios=(5, 2))
    for ax, model_type in zip(axes, ("qgvae", "patch_vqvae")):
        labelled_progressive(ax, models[model_type], picks)
        ax.set_title(f"{MODEL_NAMES[model_type]}, {entry['budget_bytes']} bytes per image", fontsize=10)
    fig.tight_layout()
    paths["progressive"] = save_figure(fig, f"converged_{name}_progressive.png")
    return paths


@torch.no_grad()
def labelled_progressive(ax, model, images: torch.Tensor) -> None:
    """Rows: the input, then the reconstruction from the first k tokens (QG-VAE: k = C/16 ... C; a patch model:
    all tokens only, its prefixes are not images), each row labelled with k and its bytes."""
    c = model.config.num_tokens
    lengths = [k for k in (c // 16, c // 4, c // 2, c) if k >= 1] if model.config.model_type == "qgvae" else [c]
    token_ids = model.encode(images).token_ids
    rows = [images] + [model.decode(token_ids, prefix_length=k).pixel_values.clamp(0, 1) for k in lengths]
    labels = ["input"] + [f"first {k} tokens ({math.ceil(k * math.log2(model.config.codebook_size) / 8)} B)"
                          for k in lengths]  # fmt: skip
    size = images.shape[-1]
    canvas = torch.ones(len(rows), images.shape[1], size + 2, len(images) * (size + 2))
    for r, row in enumerate(rows):
        for i, image in enumerate(row):
            canvas[r, :, 1 : size + 1, i * (size + 2) + 1 : i * (size + 2) + size + 1] = image
    grid = torch.cat(list(canvas), dim=1).permute(1, 2, 0).squeeze(-1).numpy()
    ax.imshow(grid, cmap="gray", vmin=0, vmax=1, interpolation="nearest")
    ax.set_yticks([(size + 2) * (r + 0.5) for r in range(len(rows))], labels, fontsize=8)
    ax.set_xticks([])


def save_figure(fig, filename: str) -> str:
    fig.savefig(FIGURES / filename, dpi=110)
    import matplotlib.pyplot as plt

    plt.close(fig)
    return f"benchmarks/results/figures/{filename}"


def render_block(results: dict) -> str:
    """The README's headline block, generated from `converged.json` only."""
    mark = {True: "yes", False: "**no**"}
    lines = [
        README_START,
        "Generated by `python benchmarks/converged.py analyse --update-readme` from "
        f"`benchmarks/results/converged.json` ({results['machine']}). Each pair trained side by side, one thread "
        "each, for the same training time.",
        "",
        "| data | model | bytes | params | GFLOP/img (enc+dec) | steps | train min | test PSNR (dB) | SSIM | "
        "usage min / mean |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for name, entry in results["benchmarks"].items():
        for model_type in ("qgvae", "patch_vqvae"):
            r = entry[model_type]
            lines.append(
                f"| {name} | {MODEL_NAMES[model_type]} | {r['bytes_per_image']} | {r['parameters']:,} | "
                f"{r['encode_gflops_per_image'] + r['decode_gflops_per_image']:.3f} | {r['steps']:,} | "
                f"{r['train_time'] / 60:.0f} | {r['psnr']:.2f} | {r['ssim']:.3f} | "
                f"{r['usage_min']:.1%} / {r['usage_mean']:.1%} |"
            )
        best = best_fitting(entry["codecs_at_budget"])
        if best:
            lines.append(f"| {name} | {best['name']} (best that fits every image) | <= {entry['budget_bytes']} | - | "
                         f"- | - | - | {best['psnr']:.2f} | {best['ssim']:.3f} | - |")  # fmt: skip
    lines += ["", "| data | target | measured | met |", "|---|---|---|---|"]
    for name, entry in results["benchmarks"].items():
        lines += [f"| {name} | {t['target']} | {t['measured']} | {mark[t['met']]} |" for t in entry["targets"]]
    for name, benchmark_ablations in results.get("ablations", {}).items():
        for model_type, ablations in benchmark_ablations.items():
            lines += ablation_table(name, model_type, ablations)
    for name, benchmark_refinements in results.get("refinements", {}).items():
        for model_type, refinements in benchmark_refinements.items():
            lines += refinement_table(name, model_type, refinements)
    for name, benchmark_trials in results.get("long_trials", {}).items():
        for model_type, trials in benchmark_trials.items():
            lines += long_trial_table(name, model_type, trials)
    if results.get("earlier_runs"):
        lines += [
            "",
            "Earlier runs of the same benchmarks (PSNR of the saved model, with the raw weights' after a slash where "
            "the saved model is an EMA), in `benchmarks/results/`:",
            "",
            *[f"- `{run['file']}`: {run['recipe']}" for run in results["earlier_runs"]],
            "",
            "| run | data | QG-VAE test PSNR (dB) | patch VQ-VAE (dB) | steps (QG / patch) | QG-VAE minus patch, 95% "
            "interval |",
            "|---|---|---|---|---|---|",
        ]
        for run in results["earlier_runs"]:
            for name, row in run["benchmarks"].items():
                qg, patch, diff = row["qgvae"], row["patch_vqvae"], row["qgvae_minus_patch_per_image"]
                lines.append(
                    f"| `{run['file']}` | {name} | {earlier_psnr(qg)} | "
                    f"{earlier_psnr(patch)} | {qg['steps']:,} / {patch['steps']:,} | {diff['mean']:+.2f} "
                    f"[{diff['ci95'][0]:+.2f}, {diff['ci95'][1]:+.2f}] |"
                )
    lines += ["", "Figures: " + ", ".join(f"[{k}]({v})" for k, v in results["figures"].items()), README_END]
    return "\n".join(lines)


def ablation_table(name: str, model_type: str, ablations: dict) -> list[str]:
    """README lines of one model's round-1 ablations on benchmark `name` and the changes they select."""
    heading = (f"Recipe ablations ({MODEL_NAMES[model_type]}, {name}, {ablations['seconds'] / 60:.0f} min each, two at "
               f"a time; scored on {ablations['validation']}, never the test split). Selected changes (round 1): "
               f"`{json.dumps(select_changes(ablations['runs']))}`")  # fmt: skip
    return sweep_table(heading, ablations["runs"], "full", "vs full recipe",
                       model_type == "qgvae" and BENCHMARKS[name].diagnostics)  # fmt: skip


def refinement_table(name: str, model_type: str, refinements: dict) -> list[str]:
    """README lines of one model's second sweep round on benchmark `name` and the refinements it selects."""
    heading = (f"Round 2 ({MODEL_NAMES[model_type]}, {name}, {refinements['seconds'] / 60:.0f} min each, in pairs; "
               f"scored on {refinements['validation']}): each change on top of the round-1 selection. Taken (trained "
               f"by the {name} benchmark above with the changes of rounds 1 and 3, unless round 3 undid them): "
               f"`{json.dumps(select_refinements(refinements['runs']))}`")  # fmt: skip
    return sweep_table(heading, refinements["runs"], "selected", "vs round 1")


def long_trial_table(name: str, model_type: str, trials: dict) -> list[str]:
    """README lines of one model's third sweep round on benchmark `name` and the run it takes."""
    heading = (f"Round 3 ({MODEL_NAMES[model_type]}, {name}, {trials['seconds'] / 60:.0f} min each, in pairs; scored "
               f"on {trials['validation']}): changes on top of rounds 1 and 2. Taken, and trained by the {name} "
               f"benchmark above: the best run, `{select_long_trial(trials['runs'])}`")  # fmt: skip
    return sweep_table(heading, trials["runs"], "selected", "vs rounds 1-2")


def sweep_table(heading: str, runs: dict, base: str, versus: str, prefix_column: bool = False) -> list[str]:
    """A sweep round's README lines: `heading`, then each run's validation PSNR, its difference to run `base`, its
    steps and least-used codebook (and the first C/2 tokens' PSNR with `prefix_column`)."""
    lines = [
        "", heading, "",
        f"| run | validation PSNR (dB) | {versus} | steps | usage min |" + (" first C/2 tokens, EMA (dB) |" if
                                                                           prefix_column else ""),
        "|---|---|---|---|---|" + ("---|" if prefix_column else ""),
    ]  # fmt: skip
    for variant, row in runs.items():
        psnr_, half = row["validation_psnr"], row.get("half_prefix_psnr")
        prefix = (f" {half:.2f} |" if half is not None else " - |") if prefix_column else ""
        lines.append(f"| {ABLATION_NAMES[variant]} | {psnr_:.2f} | {psnr_ - runs[base]['validation_psnr']:+.2f} | "
                     f"{row['steps']:,} | {row['usage_min']:.1%} |{prefix}")  # fmt: skip
    return lines


def earlier_psnr(row: dict) -> str:
    """"saved" or "saved / raw" test PSNR of an earlier run's model (`earlier_run_rows`)."""
    return f"{row['psnr']:.2f}" + (f" / {row['raw_psnr']:.2f}" if row["raw_psnr"] is not None else "")


def earlier_run_rows(previous: dict) -> dict[str, dict]:
    """The test PSNRs (saved model, and raw weights where the saved model is an EMA), steps and paired QG-VAE minus
    patch difference of an earlier run (`EARLIER_RUNS`), per benchmark."""
    rows = {}
    for name, entry in previous["benchmarks"].items():
        rows[name] = {m: {"psnr": entry[m]["psnr"], "raw_psnr": entry[m]["history"][-1].get("live_psnr"),
                          "steps": entry[m]["steps"]} for m in MODEL_NAMES}  # fmt: skip
        rows[name]["qgvae_minus_patch_per_image"] = entry["qgvae_minus_patch_per_image"]
    return rows


def analyse(workdir: Path, names: list[str], update_readme: bool) -> dict:
    results = json.loads(RESULTS.read_text()) if RESULTS.is_file() else {"benchmarks": {}, "figures": {}}
    results["machine"] = f"{os.cpu_count()}-core {platform.machine()} CPU, torch {torch.__version__}"
    for name in names:
        models = {m: AutoModel.from_pretrained(workdir / f"{name}-{m}").eval() for m in MODEL_NAMES}
        entry = analyse_benchmark(BENCHMARKS[name], workdir, models)
        results["benchmarks"][name] = entry
        results["figures"] |= {f"{name} {k}": v for k, v in plot_benchmark(name, entry, models).items()}
    for stage, (build, _) in SWEEPS.items():  # re-read: a run may have finished since
        for name, model_type in [(n, m) for n, rounds in results.get(stage, {}).items() for m in rounds]:
            bench, seconds = BENCHMARKS[name], results[stage][name][model_type]["seconds"]
            rows = ablation_rows(build(workdir, seconds, model_type, bench), bench)
            if rows["runs"]:  # a checkout without the runs keeps the JSON's
                results[stage][name][model_type] = rows
    earlier = {file: HERE / "results" / file for file in EARLIER_RUNS}
    results["earlier_runs"] = [
        {"file": file, "recipe": EARLIER_RUNS[file], "benchmarks": earlier_run_rows(json.loads(path.read_text()))}
        for file, path in earlier.items() if path.is_file()
    ]  # fmt: skip
    selected = {name: {m: selected_changes(name, m, results=results) for m in ablations}
                for name, ablations in results["ablations"].items()}  # fmt: skip
    results["recipe"] = {"train": RECIPE, "model": MODEL_RECIPE, "selected_changes": selected}
    RESULTS.write_text(json.dumps(results, indent=2))
    block = render_block(results)
    print(block)
    if update_readme:
        replace_block(block, README_START, README_END)
    return results


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("stage", choices=("train", *SWEEP_STAGES, "analyse"))
    parser.add_argument("--workdir", type=Path, default=REPO_ROOT / "outputs" / "converged")
    parser.add_argument("--only", nargs="*", choices=list(BENCHMARKS), default=list(BENCHMARKS))
    parser.add_argument("--train-seconds", type=float, help="override every run's training time (smoke tests)")
    own = ", ".join(f"{bench.ablation_seconds:.0f} s on {name}" for name, bench in BENCHMARKS.items())
    parser.add_argument("--ablation-seconds", type=float,
                        help=f"training time of each sweep run (default: the benchmark's, {own}; "
                             f"`long`: {LONG_TRIAL_SECONDS:.0f} s)")  # fmt: skip
    parser.add_argument("--update-readme", action="store_true")
    args = parser.parse_args(argv)
    if args.train_seconds is not None:
        for name, bench in BENCHMARKS.items():
            BENCHMARKS[name] = replace(bench, train_seconds=args.train_seconds, eval_every=20, checkpoint_every=20)
    if args.stage == "train":
        train(args.workdir, args.only)
    elif args.stage in SWEEP_STAGES:
        seconds = args.ablation_seconds
        if args.stage == "long" and seconds is None:
            seconds = LONG_TRIAL_SECONDS
        sweep(SWEEP_STAGES[args.stage], args.workdir, args.only, seconds)
    else:
        analyse(args.workdir, args.only, args.update_readme)


if __name__ == "__main__":
    main()
