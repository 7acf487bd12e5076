"""Trained to their potential (issue 11): QG-VAE against the patch VQ-VAE at equal bytes and equal wall time.

    nohup python benchmarks/converged.py train [--workdir outputs/converged] > outputs/converged.log 2>&1 &
    python benchmarks/converged.py analyse [--workdir outputs/converged] [--update-readme]

`train` runs two pairs through `training/train.py`, the two runs of a pair side by side with one thread each (both see
the same machine), each run for the same training time (evaluations and checkpoints excluded):
1. `photo_set.npz` (72 bytes: 64 tokens x 9 bits), 60 minutes: QG-VAE from `training/configs/photo-set.yaml`, the
   patch VQ-VAE (8x8 grid, one shared codebook of 512) with the same recipe; trained on fresh random crops of the 22
   training photos, evaluated on the fixed `test` crops of the 6 held-out photos;
2. MNIST (18 bytes: 16 tokens x 9 bits), 30 minutes: QG-VAE `mnist-cpu`, the patch VQ-VAE `mnist-cpu` (4x4 grid).
Both models of a pair get one recipe (`RECIPE`: warm-up and cosine decay over the training time, EMA of the weights,
data-dependent codebook initialisation, the short-run CPU settings). The stage resumes: a finished run (its folder
holds `results.json` for the same config) is kept, an interrupted one continues from its newest checkpoint.

`analyse` reads the runs and writes `benchmarks/results/converged.json`, figures under `benchmarks/results/figures/`
(`converged_<data>_training.png`, `converged_<data>_progressive.png`, `converged_<data>_rate_distortion.png`) and, with
`--update-readme`, the README's headline block.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, replace
from functools import partial
from pathlib import Path

import yaml

sys.path.insert(0, str(Path(__file__).resolve().parent))

from qg_tokenizer import PATCH_VQVAE_PRESETS, QGVAE_PRESETS  # noqa: E402
from qg_tokenizer.demo import REPO_ROOT, run_training  # noqa: E402

HERE = Path(__file__).resolve().parent
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


BENCHMARKS = {
    "photo_set": Benchmark(
        "photo_set", "photos32-cpu",
        {"source": str(PHOTO_SET), "train_split": "train", "eval_split": "test", "random_crops": True,
         "horizontal_flip": True},
        3600.0, 1000, 500, 256,
    ),  # fmt: skip
    "mnist": Benchmark(
        "mnist", "mnist-cpu", {"source": "embedded-mnist", "train_split": "train", "eval_split": "test"},
        1800.0, 2000, 1000, 500,
    ),  # fmt: skip
}


def train_config(bench: Benchmark, model_type: str, workdir: Path) -> dict:
    """The `training/train.py` config of one run."""
    presets = QGVAE_PRESETS if model_type == "qgvae" else PATCH_VQVAE_PRESETS
    model = {"model_type": model_type, **presets[bench.preset], **MODEL_RECIPE}
    return {
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


def train_run(bench: Benchmark, model_type: str, workdir: Path) -> dict:
    """Train (or resume, or reuse) one run; returns its `results.json`."""
    config = train_config(bench, model_type, workdir)
    folder = Path(config["output_dir"])
    config_path, results_path = workdir / "configs" / f"{folder.name}.yaml", folder / "results.json"
    same = config_path.is_file() and yaml.safe_load(config_path.read_text()) == config
    if results_path.is_file() and same:
        return json.loads(results_path.read_text())
    config_path.parent.mkdir(parents=True, exist_ok=True)
    config_path.write_text(yaml.safe_dump(config))
    start = time.perf_counter()
    log = workdir / f"{folder.name}.{int(time.time())}.log"
    results = run_training(folder, ["--resume", "latest"], config=config_path, num_threads=1, log_file=log)
    results["process_seconds"] = time.perf_counter() - start
    results_path.write_text(json.dumps(results, indent=2))
    print(f"{folder.name}: {results['step']} steps, test PSNR {results['eval']['psnr']:.2f} dB", flush=True)
    return results


def train(workdir: Path, names: list[str]) -> None:
    for name in names:
        bench = BENCHMARKS[name]
        print(f"{name}: QG-VAE and patch VQ-VAE side by side, {bench.train_seconds / 60:.0f} min each", flush=True)
        with ThreadPoolExecutor(2) as pool:
            list(pool.map(partial(train_run, bench, workdir=workdir), ("qgvae", "patch_vqvae")))


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("stage", choices=("train", "analyse"))
    parser.add_argument("--workdir", type=Path, default=REPO_ROOT / "outputs" / "converged")
    parser.add_argument("--only", nargs="*", choices=list(BENCHMARKS), default=list(BENCHMARKS))
    parser.add_argument("--train-seconds", type=float, help="override every run's training time (smoke tests)")
    parser.add_argument("--update-readme", action="store_true")
    args = parser.parse_args(argv)
    if args.train_seconds is not None:
        for name, bench in BENCHMARKS.items():
            BENCHMARKS[name] = replace(bench, train_seconds=args.train_seconds, eval_every=20, checkpoint_every=20)
    if args.stage == "train":
        train(args.workdir, args.only)
    else:
        from converged_analysis import analyse

        analyse(args.workdir, args.only, args.update_readme)


if __name__ == "__main__":
    main()
